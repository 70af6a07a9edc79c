"""The seam between latentlm and a training objective: what a method is, what it needs, what it does.

A method owns the core :class:`~latentlm.model.transformer.Transformer` (as ``self.model``)
plus any parameters of its own, and describes itself, so the rest of latentlm asks the class
and never compares its name (docs/WRITING_A_METHOD.md walks through a complete one):

- **Settings.** :attr:`sections` maps each config section the method reads to its settings
  dataclass (``{"ponder": PonderSettings}``). Reusable blocks, e.g. the teacher
  (:class:`~latentlm.concepts.teacher.TeacherSettings`), are shared sections: any method that
  declares ``"teacher"`` reads the same ``teacher:`` section.
- **Capabilities.** :attr:`needs_teacher`, :attr:`needs_concept_labels`, :attr:`plain_lm`,
  :attr:`has_concepts`, :attr:`eval_modes`; ``compare``, ``export``, ``flops``, the CLI, concept
  inspection and the teacher loader decide from these.
- **Checks.** :meth:`resolve_config` fills settings derived from inputs before the method is built
  (e.g. the concept-head size from the SAE); :meth:`validate_inputs` checks and loads every input
  training will use (teacher vs data tokenizer, SAE vs concept head, label cache vs data) before
  anything is written.
- **Compute.** :meth:`loss` for a training batch (reached through ``forward`` so DDP/FSDP hooks
  fire), with per-batch extras from :meth:`batch_inputs` (the batch's window ids and optimizer step
  are arguments); :meth:`eval_logits` the logits that evaluation scores (perplexity, zero-shot).
- **Cost.** :meth:`train_flops_per_token`, :meth:`teacher_flops_per_token`, :meth:`infer_flops_per_token`.
- **Generation.** :meth:`step` advances a KV cache by a chunk of tokens; :meth:`cache_slots`
  says how many cache slots ``n`` tokens need.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from latentlm.errors import LatentLMError
from latentlm.model.flops import forward_flops_per_slot
from latentlm.model.losses import head_cross_entropy
from latentlm.model.transformer import KVCache, Transformer

if TYPE_CHECKING:  # annotations only: the run config is built above the methods (latentlm.config)
    from latentlm.config import Config

CAPABILITIES = ("needs_teacher", "needs_concept_labels", "plain_lm", "has_concepts")


class Method(nn.Module):
    name = "base"
    # Config sections this method reads: section name -> settings dataclass (``cfg.<section>``).
    sections: dict[str, type] = {}
    # Capabilities, asked by compare / export / flops / cli / inspect / the teacher loader.
    needs_teacher = False  # trains against a frozen teacher (``teacher:`` section)
    needs_concept_labels = False  # trains on a teacher's SAE concept labels (``concepts:`` section)
    plain_lm = False  # the checkpoint is a plain next-token LM: exportable, usable as a teacher
    # Predicts concepts: ``concepts inspect`` and ``generate --steer`` apply. Such a method has
    # ``n_concepts``, ``concept_logits(idx) -> [B, T, C]`` and ``set_steering(ids, alphas, on_prompt)``.
    has_concepts = False
    # Ways ``forward(..., nll=True)`` can evaluate, first = default (e.g. ponder: jacobi, exact).
    eval_modes: tuple[str, ...] = ()

    def __init__(self, model: Transformer, cfg: Config):
        super().__init__()
        self.model = model
        self.cfg = cfg

    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        """The capability flags and evaluation modes, as recorded in checkpoint manifests."""
        return {**{c: bool(getattr(cls, c)) for c in CAPABILITIES}, "eval_modes": list(cls.eval_modes)}

    @classmethod
    def upgrade_state_dict(cls, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` (a checkpoint's tensors) with names an older latentlm saved mapped onto today's
        parameters; loading and resuming apply it before their strict key check."""
        return state

    # --- checks -----------------------------------------------------------------------------------

    @classmethod
    def resolve_config(cls, cfg: Config) -> None:
        """Fill settings derived from the method's inputs in ``cfg`` itself (so a saved config carries
        them) and check what can be checked without loading anything large. Called before the method
        is built and outside any meta device; must be idempotent."""

    def validate_inputs(self, device: torch.device) -> None:
        """The one place the method checks every input training will use (teacher, SAE, label
        cache, data tokenizer), loading and keeping what :meth:`batch_inputs` needs on ``device``.
        The trainer calls it before writing anything, so a mismatch fails a run up front."""

    # --- compute ----------------------------------------------------------------------------------

    def batch_inputs(self, x: torch.Tensor, y: torch.Tensor, *, windows: np.ndarray, step: int) -> dict[str, Any]:
        """Extra keyword inputs of :meth:`loss` for a training batch, computed outside the wrapped
        (DDP/FSDP/compiled) forward: e.g. CoCoMix's concept labels of the batch's window ids
        ``windows`` (int64 [B]), or ponder's Jacobi iteration count for optimizer step ``step``."""
        return {}

    def loss(self, x: torch.Tensor, y: torch.Tensor, **inputs: Any) -> tuple[torch.Tensor, dict[str, Any]]:
        """``(loss, metrics)`` of a training batch ``x`` -> ``y`` [B, T] with :meth:`batch_inputs`."""
        raise NotImplementedError

    def eval_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Next-token logits [B, T, V] of the language model as evaluation scores it (perplexity,
        zero-shot); methods with several :attr:`eval_modes` use the one set by :meth:`set_eval_mode`."""
        raise NotImplementedError

    # True when eval_hidden can run a sequence piece by piece through a KV cache, giving eval_logits'
    # values (zero-shot scoring then runs each shared context once for all its continuations).
    cached_eval = False

    def eval_hidden(self, idx: torch.Tensor, position_ids: torch.Tensor, valid: torch.Tensor | None,
                    cache: KVCache) -> torch.Tensor:
        """The stream [B, T, d] whose ``self.model.head`` is :meth:`eval_logits`' logits at tokens ``idx``
        (positions ``position_ids``, ``valid`` False for padding) following what ``cache`` already holds,
        which it extends as :meth:`step` does. Implemented where :attr:`cached_eval` is true."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor, y: torch.Tensor, nll: bool = False, **inputs: Any):
        """``(loss, metrics)`` of a training batch, or with ``nll`` the per-token NLL [B, T] of
        :meth:`eval_logits`. One entry point, so wrappers (DDP, FSDP, compile) see every call."""
        if nll:
            return token_nll(self.eval_logits(x), y)
        return self.loss(x, y, **inputs)

    # --- cost -------------------------------------------------------------------------------------

    def forward_flops_per_token(self, seq_len: int) -> float:
        """The student's forward FLOPs per token of a ``seq_len`` window (flops.py's convention)."""
        return forward_flops_per_slot(self.model.cfg, seq_len)

    def train_flops_per_token(self, seq_len: int) -> float:
        """The student's forward + backward FLOPs per training token: 3 x forward, as gradients flow
        through every pass."""
        return 3.0 * self.forward_flops_per_token(seq_len)

    def teacher_flops_per_token(self, seq_len: int) -> float:
        """FLOPs per training token spent in a frozen teacher (0 without one). Paid once per token
        whether computed on the fly or ahead into a label cache, so fair comparisons count it."""
        return 0.0

    def infer_flops_per_token(self, context: int) -> float:
        """Forward FLOPs to generate one token with the KV cache holding ``context`` tokens. It runs
        the same slots as a training token with a ``context``-token window (flops.py counts attention
        over the whole context), so the default is the forward formula."""
        return self.forward_flops_per_token(context)

    # --- evaluation modes ---------------------------------------------------------------------------

    def set_eval_mode(self, mode: str) -> None:
        """Choose how ``nll=True`` evaluates; only methods with several :attr:`eval_modes` have a choice."""
        if mode not in self.eval_modes:
            allowed = ", ".join(self.eval_modes) or "none (this method evaluates one way)"
            raise LatentLMError(f"method {self.name!r} has no evaluation mode {mode!r}; choose from: {allowed}")

    def pop_eval_metrics(self) -> dict[str, float]:
        """Method-specific statistics gathered by ``nll=True`` calls since the last pop
        (e.g. ponder's Jacobi residual); evaluation reports them next to the loss."""
        return {}

    # --- generation -------------------------------------------------------------------------------

    def cache_slots(self, n_tokens: int) -> int:
        """KV-cache slots per layer needed to hold ``n_tokens`` tokens."""
        return n_tokens

    def new_cache(self, batch: int, n_tokens: int) -> KVCache:
        return self.model.new_cache(batch, self.cache_slots(n_tokens))

    def step(self, idx: torch.Tensor, position_ids: torch.Tensor, valid: torch.Tensor,
             cache: KVCache) -> torch.Tensor:
        """Feed tokens ``idx`` [B, T] (token positions ``position_ids``, ``valid`` False for
        padding) through the cache; return next-token logits [B, T, V]."""
        raise NotImplementedError


def unwrap(module: nn.Module) -> Method:
    """The :class:`Method` inside DDP and ``torch.compile`` wrappers (FSDP2 wraps in place)."""
    while not isinstance(module, Method):
        module = getattr(module, "module", None) or module._orig_mod
    return module


def token_positions(x: torch.Tensor) -> torch.Tensor:
    """Position ids 0..T-1 for every row of ``x`` [B, T]."""
    return torch.arange(x.shape[1], device=x.device)[None].expand(x.shape[0], -1)


def token_nll(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Per-token cross-entropy [B, T] in float32."""
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view_as(y)


class LogitsMethod(Method):
    """A method whose loss is next-token cross-entropy on ``logits(idx, position_ids, valid, cache)``,
    evaluated and generated through the same call. Subclasses define ``hidden`` (the stream the
    core's head reads: ``logits`` is its head, and the loss is computed without materialising the
    logits, :func:`~latentlm.model.losses.head_cross_entropy`) or ``logits`` itself, and
    ``forward_flops_per_token``."""

    def hidden(self, idx: torch.Tensor, position_ids: torch.Tensor, valid: torch.Tensor | None = None,
               cache: KVCache | None = None) -> torch.Tensor:
        """The stream [B, T, d] before the core's final norm and head, whose head gives the logits."""
        raise NotImplementedError

    def logits(self, idx: torch.Tensor, position_ids: torch.Tensor, valid: torch.Tensor | None = None,
               cache: KVCache | None = None) -> torch.Tensor:
        return self.model.head(self.hidden(idx, position_ids, valid, cache))

    def eval_logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.logits(x, token_positions(x))

    @property
    def cached_eval(self) -> bool:  # logits are the head of hidden(), which runs through a cache
        return type(self).logits is LogitsMethod.logits

    def eval_hidden(self, idx, position_ids, valid, cache):
        return self.hidden(idx, position_ids, valid, cache)

    def loss(self, x: torch.Tensor, y: torch.Tensor, **inputs: Any):
        if type(self).logits is LogitsMethod.logits:  # logits are the head of hidden(): train on hidden
            loss = head_cross_entropy(self.model, self.hidden(x, token_positions(x)), y,
                                      fused=self.cfg.train.fused_loss)
        else:
            loss = token_nll(self.eval_logits(x), y).mean()
        return loss, {f"{self.name}_loss": loss.detach()}

    def step(self, idx, position_ids, valid, cache):
        return self.logits(idx, position_ids, valid, cache)
