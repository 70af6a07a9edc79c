"""PonderLM-2: latent thoughts trained in parallel by Jacobi iteration (arXiv 2509.23184).

Before predicting token t+1 the model "thinks" K times at token t: the first thought is the
final-normed hidden state at x_t's slot, each next thought is the final-normed hidden state
at the previous thought's slot, and thoughts are fed back unchanged as input embeddings. The
sequence is interleaved ``x_1, z_1^1..z_1^K, x_2, ...`` under plain causal attention, every
thought sharing its token's position id; only the last thought of each token is scored.

Training runs the interleaved sequence in parallel and refines all thoughts at once by Jacobi
iteration (K growing init passes, n full passes, one scored pass; gradients flow through all).
Exact evaluation and generation produce thoughts one slot at a time through the KV cache.

``ponder.thought interpolate`` is the authors' ablation: a thought is instead the softmax-weighted
mix of the scaled token embeddings under the logits of that hidden state (optionally over its
``thought_topk`` most likely tokens). See docs/PONDER.md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch
from torch.utils.checkpoint import checkpoint

from latentlm.errors import LatentLMError
from latentlm.methods.base import Method, token_positions
from latentlm.model.losses import head_cross_entropy
from latentlm.model.flops import forward_flops_per_slot
from latentlm.model.transformer import KVCache, Transformer
from latentlm.settings import Settings, setting

if TYPE_CHECKING:
    from latentlm.config import Config

PAPER_EMBED_FACTOR = 2.5  # the paper scales token embeddings by sqrt(2.5 d)


def paper_embed_scale(n_embd: int) -> float:
    """The paper's ``model.embed_scale``: sqrt(2.5 d), bringing scaled token embeddings near
    the size of the final-normed thoughts they are interleaved with."""
    return math.sqrt(PAPER_EMBED_FACTOR * n_embd)


@dataclass
class PonderSettings(Settings):
    """The ``ponder:`` section (docs/PONDER.md). The paper's embedding scaling is not set here:
    pass ``--model.embed_scale`` (sqrt(2.5 d)) to ponder runs and their vanilla controls alike."""

    n_thoughts: int = setting(1, "K: latent thoughts per token before it predicts the next one")
    train_iters_min: int = setting(2, "fewest Jacobi iterations per optimizer step (n uniform in [min, max])")
    train_iters_max: int = setting(3, "most Jacobi iterations per optimizer step")
    eval_iters: int = setting(3, "Jacobi iterations in evaluation (eval_mode jacobi)")
    eval_mode: Literal["jacobi", "exact"] = setting("jacobi", "evaluation: eval_iters Jacobi iterations as the "
                                                    "paper, or exact = sequential thoughts via the KV cache")
    checkpoint: Literal["none", "pass", "block"] = setting("none", "activation checkpointing: keep each pass's "
                                                           "(pass) or each block's (block) inputs, recompute in backward")
    prefill: Literal["exact", "jacobi"] = setting("exact", "how generation fills the cache for a prompt: exact = "
                                                  "sequential; jacobi = eval_iters parallel iterations (faster for "
                                                  "long prompts, exact for the first 1 + floor(eval_iters / K) "
                                                  "positions)")
    thought: Literal["hidden", "interpolate"] = setting("hidden", "what a thought is: hidden = the final-normed "
                                                        "hidden state (PonderLM-2); interpolate = the softmax(head(h))-"
                                                        "weighted mix of token embeddings x embed_scale (authors' ablation)")
    thought_topk: int = setting(0, "interpolate over the thought_topk most likely tokens (0 = all; the authors' option: 100)")
    section, positive_fields = "ponder", ("n_thoughts", "train_iters_min", "eval_iters")
    non_negative_fields = ("thought_topk",)

    def validate(self) -> None:
        super().validate()
        if self.train_iters_max < self.train_iters_min:
            raise LatentLMError(f"ponder.train_iters_max={self.train_iters_max} is below "
                                f"ponder.train_iters_min={self.train_iters_min}; n is drawn from [min, max]")
        if self.thought_topk and self.thought != "interpolate":
            raise LatentLMError(f"ponder.thought_topk={self.thought_topk} applies to interpolated thoughts only; "
                                "add --ponder.thought interpolate or drop thought_topk")


# --- thought passes: reusable by any method that thinks in latent slots ---------------------------

# run(slots [B, N, d], position_ids [B, N], valid [B, N] | None, cache | None) -> hidden [B, N, d]:
# the method's stack over already-embedded slot inputs (positions, blocks; not the final norm).
SlotRunner = Callable[[torch.Tensor, torch.Tensor, "torch.Tensor | None", "KVCache | None"], torch.Tensor]
# to_thought(hidden [..., d]) -> the next slot's input [..., d]: norm_f for PonderLM-2's thoughts.
ThoughtMap = Callable[[torch.Tensor], torch.Tensor]


def thought_pass(run: SlotRunner, emb: torch.Tensor, thoughts: torch.Tensor, position_ids: torch.Tensor,
                 valid: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
    """One causal pass over tokens interleaved with their thoughts.

    ``emb`` [B, T, d] token inputs, ``thoughts`` [B, T, S-1, d] the inputs of the thought slots,
    ``position_ids`` and ``valid`` [B, T] per token, repeated for each of its slots (a pad is
    invalid in all of them); with a ``cache`` the slots are appended to it. Returns the hidden
    states per slot [B, T, S, d].
    """
    b, t, d = emb.shape
    slots = torch.cat([emb[:, :, None], thoughts.to(emb.dtype)], dim=2)
    s = slots.shape[2]
    pos = position_ids.repeat_interleave(s, dim=-1)
    ok = None if valid is None else valid.repeat_interleave(s, dim=-1)
    return run(slots.reshape(b, t * s, d), pos, ok, cache).view(b, t, s, -1)


def jacobi_thoughts(run: SlotRunner, to_thought: ThoughtMap, emb: torch.Tensor, n_thoughts: int, n_iters: int,
                    position_ids: torch.Tensor, valid: torch.Tensor | None = None,
                    cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden state [B, T, d] at each token's last thought after K growing init passes, ``n_iters``
    >= 1 Jacobi iterations refining all K thoughts at once, and a final pass (the only one through
    ``cache``, if given); and the Jacobi residual, the mean |change| of the thoughts in the last
    iteration. A thought is ``to_thought`` of the hidden state of the slot before it (PonderLM-2:
    ``norm_f``, docs/METHODS.md §3.2)."""
    thoughts = emb.new_zeros(*emb.shape[:2], 0, emb.shape[2])  # no thought slots yet
    for _ in range(n_thoughts):  # init passes of T, 2T, ..., KT slots
        thoughts = to_thought(thought_pass(run, emb, thoughts, position_ids, valid))
    for _ in range(n_iters):
        previous = thoughts
        thoughts = to_thought(thought_pass(run, emb, thoughts, position_ids, valid)[:, :, :n_thoughts])
    residual = (thoughts - previous).abs().mean().detach()
    return thought_pass(run, emb, thoughts, position_ids, valid, cache)[:, :, n_thoughts], residual


def sequential_thoughts(run: SlotRunner, to_thought: ThoughtMap, emb: torch.Tensor, n_thoughts: int,
                        position_ids: torch.Tensor, valid: torch.Tensor | None, cache: KVCache) -> torch.Tensor:
    """The exact model (docs/METHODS.md §3.1): feed each token of ``emb`` [B, T, d] and then its K
    thoughts (``to_thought`` of the previous slot's hidden state) one cached slot at a time (all at
    the token's position id, validity shared); return the hidden state [B, T, d] at each token's
    last thought."""
    out = []
    for i in range(emb.shape[1]):
        pos = position_ids[:, i:i + 1]
        ok = None if valid is None else valid[:, i:i + 1]
        slot = emb[:, i:i + 1]
        for k in range(n_thoughts + 1):
            h = run(slot, pos, ok, cache)
            if k < n_thoughts:
                slot = to_thought(h)  # the next thought
        out.append(h)
    return torch.cat(out, dim=1)


def draw_train_iters(seed: int, step: int, lo: int, hi: int) -> int:
    """n for optimizer step ``step``: uniform over [lo, hi] from a generator seeded by (seed, step),
    so every micro-batch and rank of a step draws the same n and a resumed run continues the stream."""
    g = torch.Generator().manual_seed((seed * 1_000_003 + step) % 2**63)
    return int(torch.randint(lo, hi + 1, (1,), generator=g))


class JacobiEvaluation:
    """Evaluation of a method whose thoughts are trained by Jacobi iteration (the ``ponder:``
    section's ``eval_mode``, ``eval_iters``): ``jacobi`` scores ``jacobi_logits`` after
    ``eval_iters`` iterations (its residual reported), ``exact`` the sequential model, which also runs
    through a KV cache (:attr:`cached_eval`). A subclass provides ``jacobi_logits``, ``exact_logits``
    and ``_advance_hidden`` (the sequential model's last-thought stream through a cache)."""

    eval_modes = ("jacobi", "exact")
    _eval_residuals: list[torch.Tensor]  # per nll batch, popped by evaluation

    def eval_logits(self, x: torch.Tensor) -> torch.Tensor:
        p = self.cfg.ponder
        if p.eval_mode == "exact":
            return self.exact_logits(x)
        logits, residual = self.jacobi_logits(x, p.eval_iters)
        self._eval_residuals.append(residual)
        return logits

    def set_eval_mode(self, mode: str) -> None:
        super().set_eval_mode(mode)
        self.cfg.ponder.eval_mode = mode

    @property
    def cached_eval(self) -> bool:  # Jacobi evaluation iterates over the whole sequence at once
        return self.cfg.ponder.eval_mode == "exact"

    def eval_hidden(self, idx, position_ids, valid, cache):
        """The exact (sequential) model's last-thought outputs, what ``exact`` evaluation's head reads."""
        return self._advance_hidden(idx, position_ids, valid, cache)

    def pop_eval_metrics(self) -> dict[str, float]:
        p = self.cfg.ponder
        out: dict[str, float] = {"eval_mode": p.eval_mode}
        if p.eval_mode == "jacobi":
            out["jacobi_iters"] = p.eval_iters
        if self._eval_residuals:
            out["jacobi_residual"] = float(torch.stack(self._eval_residuals).mean())
        self._eval_residuals = []
        return out


class Ponder(JacobiEvaluation, Method):
    name = "ponder"
    sections = {"ponder": PonderSettings}

    def __init__(self, model: Transformer, cfg: Config):
        super().__init__(model, cfg)
        self.n_thoughts = cfg.ponder.n_thoughts
        self._eval_residuals: list[torch.Tensor] = []  # per nll batch, popped by evaluation

    @classmethod
    def upgrade_state_dict(cls, state):
        """latentlm 0.1 kept a training-call counter buffer (``calls``); the trainer now passes the step,
        from which the same n is drawn, so the buffer is dropped."""
        return {k: v for k, v in state.items() if k != "calls"}

    def _run(self, x: torch.Tensor, pos: torch.Tensor, valid: torch.Tensor | None,
             cache: KVCache | None) -> torch.Tensor:
        """The core over slot inputs (positions, blocks), with ``ponder.checkpoint``'s recomputation."""
        mode = self.cfg.ponder.checkpoint if torch.is_grad_enabled() else "none"
        if mode == "pass":
            return checkpoint(self._blocks, x, pos, valid, cache, False, use_reentrant=False)
        return self._blocks(x, pos, valid, cache, mode == "block")

    def _blocks(self, x, pos, valid, cache, per_block: bool) -> torch.Tensor:
        m = self.model
        return m.run_blocks(m.add_positions(x, pos), pos, cache=cache, valid=valid, checkpoint_blocks=per_block)

    def to_thought(self, h: torch.Tensor) -> torch.Tensor:
        """The next slot's input from a slot's hidden state ``h`` [..., d] (``ponder.thought``)."""
        return self.model.norm_f(h) if self.cfg.ponder.thought == "hidden" else self.interpolate(h)

    def interpolate(self, h: torch.Tensor) -> torch.Tensor:
        """An interpolated thought from hidden states ``h`` [..., d]: p @ (W_E[:V] embed_scale) with
        p = softmax(head(h)) over the real vocabulary (float32), or over its ``thought_topk`` largest
        logits, the others zero. The top-k weights are scattered into a dense [..., V] row so the mix
        is one V x d matmul either way (no [..., k, d] gather, which is larger than V for big d)."""
        m = self.model
        w = m.wte.weight[: m.cfg.vocab_size] * m.cfg.embed_scale  # the tokens' own scale
        logits = m.head(h).float()
        k = self.cfg.ponder.thought_topk
        if 0 < k < logits.shape[-1]:
            values, ids = logits.topk(k, dim=-1)
            probs = torch.zeros_like(logits).scatter(-1, ids, values.softmax(-1))
        else:
            probs = logits.softmax(-1)
        return probs.to(w.dtype) @ w

    # --- parallel (Jacobi) and sequential (exact) forwards --------------------------------------

    def jacobi_logits(self, x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits [B, T, V] after K init passes and ``n`` >= 1 Jacobi iterations, and
        the Jacobi residual: mean |change| of the thoughts in the last iteration."""
        h, residual = self.jacobi_hidden(x, n)
        return self.model.head(h), residual

    def jacobi_hidden(self, x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """:meth:`jacobi_logits` before the head: the last thoughts' outputs [B, T, d] and the residual."""
        pos = torch.arange(x.shape[1], device=x.device)
        return jacobi_thoughts(self._run, self.to_thought, self.model.embed(x), self.n_thoughts, n, pos)

    def exact_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] of the sequential model: thoughts produced token by token."""
        b, t = x.shape
        return self._advance(x, token_positions(x), None, self.new_cache(b, t))

    def _advance(self, idx, position_ids, valid, cache) -> torch.Tensor:
        return self.model.head(self._advance_hidden(idx, position_ids, valid, cache))

    def _advance_hidden(self, idx, position_ids, valid, cache) -> torch.Tensor:
        """Each token of ``idx`` and then its K thoughts through ``cache``, one slot at a time: the
        last thoughts' outputs [B, T, d]."""
        return sequential_thoughts(self._run, self.to_thought, self.model.embed(idx), self.n_thoughts,
                                   position_ids, valid, cache)

    # --- the Method seam ------------------------------------------------------------------------

    def iters_for_step(self, step: int) -> int:
        p = self.cfg.ponder
        return draw_train_iters(self.cfg.train.seed, step, p.train_iters_min, p.train_iters_max)

    def batch_inputs(self, x: torch.Tensor, y: torch.Tensor, *, windows: np.ndarray, step: int) -> dict[str, int]:
        """This optimizer step's n, drawn here, outside the wrapped (compiled) forward, so the
        compiled training step has no graph break (one graph per value of n)."""
        return {"iters": self.iters_for_step(step)}

    def loss(self, x: torch.Tensor, y: torch.Tensor, iters: int | None = None):
        """``iters`` is n from :meth:`batch_inputs`; a direct call without it uses ``train_iters_max``."""
        n = self.cfg.ponder.train_iters_max if iters is None else iters
        h, residual = self.jacobi_hidden(x, n)
        loss = head_cross_entropy(self.model, h, y, fused=self.cfg.train.fused_loss)
        return loss, {"ponder_loss": loss.detach(), "jacobi_residual": residual, "jacobi_iters": float(n)}

    def thought_flops(self) -> float:
        """FLOPs of turning one hidden state into a thought: 0 for a hidden-state thought (a norm);
        an interpolated one costs the head (2 d V_pad) and the mix p @ W_E (2 V d, real vocabulary,
        top-k or not: the top-k weights are mixed densely)."""
        cfg = self.model.cfg
        if self.cfg.ponder.thought == "hidden":
            return 0.0
        return forward_flops_per_slot(cfg, 0, n_layers=0) + 2.0 * cfg.vocab_size * cfg.n_embd

    def forward_flops_per_token(self, seq_len: int, n: float) -> float:
        """Forward FLOPs per token of one Jacobi forward with ``n`` iterations: init passes of
        kT slots (k = 1..K, context kT), n + 1 passes of (K+1)T slots, the head once per token, and
        the thoughts made: k per token in init pass k and K per iteration (K(K+1)/2 + n K)."""
        k, cfg = self.n_thoughts, self.model.cfg
        init = sum(j * forward_flops_per_slot(cfg, j * seq_len, head=False) for j in range(1, k + 1))
        full = (k + 1) * forward_flops_per_slot(cfg, (k + 1) * seq_len, head=False)
        head = forward_flops_per_slot(cfg, 0, n_layers=0)
        thoughts = (k * (k + 1) / 2 + n * k) * self.thought_flops()
        return init + (n + 1) * full + head + thoughts

    def train_flops_per_token(self, seq_len: int) -> float:
        """3 x forward (gradients flow through every pass) at the mean of the drawn n."""
        p = self.cfg.ponder
        return 3.0 * self.forward_flops_per_token(seq_len, (p.train_iters_min + p.train_iters_max) / 2)

    def infer_flops_per_token(self, context: int) -> float:
        """Generation is exact and sequential: K + 1 slots per token, each through every block over a
        (K+1) x ``context`` slot cache, K thoughts made, and the head once (on the last thought)."""
        k, cfg = self.n_thoughts, self.model.cfg
        return (k + 1) * forward_flops_per_slot(cfg, (k + 1) * context, head=False) + \
            k * self.thought_flops() + forward_flops_per_slot(cfg, 0, n_layers=0)

    def cache_slots(self, n_tokens: int) -> int:
        return n_tokens * (self.n_thoughts + 1)

    def step(self, idx: torch.Tensor, position_ids: torch.Tensor, valid: torch.Tensor,
             cache: KVCache) -> torch.Tensor:
        """Advance the cache by ``idx`` [B, T]. A prompt (T > 1) with ``prefill jacobi`` gets its
        thoughts from ``eval_iters`` parallel Jacobi iterations (fewer sequential steps than
        (K+1)T single slots; exact for the first 1 + eval_iters // K positions), the final pass
        filling the cache with the same slots as the sequential path; otherwise sequential.
        Jacobi prefill needs an empty cache (its passes see only this chunk)."""
        p = self.cfg.ponder
        if idx.shape[1] > 1 and p.prefill == "jacobi" and cache.lengths[0] == 0:
            h, _ = jacobi_thoughts(self._run, self.to_thought, self.model.embed(idx), self.n_thoughts,
                                   p.eval_iters, position_ids, valid, cache)
            return self.model.head(h)
        return self._advance(idx, position_ids, valid, cache)
