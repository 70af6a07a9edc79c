"""The seam between the trainer / generator and a training objective.

A method owns the core :class:`~latentlm.model.transformer.Transformer` (as ``self.model``)
plus any parameters of its own, and answers four questions:

- ``forward(x, y)`` -> ``(loss, metrics)`` for a training batch (called through the wrapper
  so DDP/FSDP hooks fire); ``forward(x, y, nll=True)`` -> per-token NLL [B, T] of the language
  model part alone, for perplexity and bits per byte.
- :meth:`train_flops_per_token` (the student's forward + backward), :meth:`teacher_flops_per_token`
  (frozen teacher passes: KD logits, CoCoMix labels) and :meth:`infer_flops_per_token` (one
  generated token) for MFU and compute-matched comparisons.
- :meth:`step` how a chunk of tokens advances a KV cache during generation, and
  :meth:`cache_slots` how many cache slots ``n`` tokens need.

The trainer and the generation loop know nothing else about methods.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from latentlm.config import Config
from latentlm.errors import LatentLMError
from latentlm.model.flops import forward_flops_per_slot
from latentlm.model.transformer import KVCache, Transformer


class Method(nn.Module):
    name = "base"
    # Ways ``forward(..., nll=True)`` can evaluate, first = default (e.g. ponder: jacobi, exact).
    eval_modes: tuple[str, ...] = ()

    def __init__(self, model: Transformer, cfg: Config):
        super().__init__()
        self.model = model
        self.cfg = cfg

    def forward(self, x: torch.Tensor, y: torch.Tensor, nll: bool = False):
        raise NotImplementedError

    def batch_inputs(self, x: torch.Tensor, y: torch.Tensor, windows) -> dict[str, torch.Tensor]:
        """Extra keyword inputs of ``forward`` for a training batch, computed outside the wrapped
        (DDP/FSDP/compiled) forward: e.g. CoCoMix's concept labels from a cache (by the
        batch's window ids ``windows``, numpy int64 [B]) or from a frozen teacher."""
        return {}

    def prepare_training(self, device: torch.device) -> None:
        """Load and check what :meth:`batch_inputs` needs (a teacher, a label cache) on ``device``.
        The trainer calls it before writing anything, so a mismatched input fails a run up front."""

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

    def set_eval_mode(self, mode: str) -> None:
        """Choose how ``nll=True`` evaluates; only methods with several :attr:`eval_modes` have a choice."""
        if mode not in self.eval_modes:
            allowed = ", ".join(self.eval_modes) or "none (this method evaluates one way)"
            raise LatentLMError(f"method {self.name!r} has no evaluation mode {mode!r}; choose from: {allowed}")

    def pop_eval_metrics(self) -> dict[str, float]:
        """Method-specific statistics gathered by ``nll=True`` calls since the last pop
        (e.g. ponder's Jacobi residual); evaluation reports them next to the loss."""
        return {}

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
    """A method whose loss is next-token cross-entropy on ``logits(idx, position_ids, valid, cache)``
    and whose generation step is the same call through the cache. Subclasses define ``logits`` and
    ``forward_flops_per_token``."""

    def logits(self, idx: torch.Tensor, position_ids: torch.Tensor, valid: torch.Tensor | None = None,
               cache: KVCache | None = None) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, y: torch.Tensor, nll: bool = False):
        losses = token_nll(self.logits(x, token_positions(x)), y)
        if nll:
            return losses
        loss = losses.mean()
        return loss, {f"{self.name}_loss": loss.detach()}

    def step(self, idx, position_ids, valid, cache):
        return self.logits(idx, position_ids, valid, cache)
