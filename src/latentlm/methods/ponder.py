"""PonderLM-2: latent thoughts trained in parallel by Jacobi iteration (arXiv 2509.23184).

Before predicting token t+1 the model "thinks" K times at token t: the first thought is the
final-normed hidden state at x_t's slot, each next thought is the final-normed hidden state
at the previous thought's slot, and thoughts are fed back unchanged as input embeddings. The
sequence is interleaved ``x_1, z_1^1..z_1^K, x_2, ...`` under plain causal attention, every
thought sharing its token's position id; only the last thought of each token is scored.

Training runs the interleaved sequence in parallel and refines all thoughts at once by Jacobi
iteration (K growing init passes, n full passes, one scored pass; gradients flow through all).
Exact evaluation and generation produce thoughts one slot at a time through the KV cache.
See docs/PONDER.md.
"""

from __future__ import annotations

import math

import torch
from torch.utils.checkpoint import checkpoint

from latentlm.config import Config
from latentlm.methods.base import Method, token_nll, token_positions
from latentlm.model.flops import forward_flops_per_slot
from latentlm.model.transformer import KVCache, Transformer

PAPER_EMBED_FACTOR = 2.5  # the paper scales token embeddings by sqrt(2.5 d)


def paper_embed_scale(n_embd: int) -> float:
    """The paper's ``model.embed_scale``: sqrt(2.5 d), bringing scaled token embeddings near
    the size of the final-normed thoughts they are interleaved with."""
    return math.sqrt(PAPER_EMBED_FACTOR * n_embd)


class Ponder(Method):
    name = "ponder"
    eval_modes = ("jacobi", "exact")

    def __init__(self, model: Transformer, cfg: Config):
        super().__init__(model, cfg)
        self.k = cfg.ponder.thoughts
        # Training forward calls so far; a buffer so checkpoints carry it and a resumed run
        # draws the same iteration counts. ``_calls`` mirrors it on the host (no device sync).
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))
        self._calls: int | None = None
        self.register_load_state_dict_post_hook(lambda module, keys: setattr(module, "_calls", None))
        # Host-side bookkeeping stays out of torch.compile graphs (wrapped here, not at import,
        # because the wrapper imports the compiler).
        self._draw_train_iters = torch.compiler.disable(Ponder._train_iters)  # unbound: copies stay correct
        self._eval_residuals: list[torch.Tensor] = []  # per nll batch, popped by evaluation

    # --- the number of Jacobi iterations --------------------------------------------------------

    def _train_iters(self) -> int:
        """n for this training call: uniform over [train_iters_min, train_iters_max], drawn from
        a generator seeded by (train seed, optimizer step); step = calls // grad_accum, so all
        micro-batches of a step and all ranks use the same n, and a resume continues the stream."""
        if self._calls is None:
            self._calls = int(self.calls)
        step = self._calls // self.cfg.train.grad_accum
        self._calls += 1
        self.calls.fill_(self._calls)
        p = self.cfg.ponder
        g = torch.Generator().manual_seed((self.cfg.train.seed * 1_000_003 + step) % 2**63)
        return int(torch.randint(p.train_iters_min, p.train_iters_max + 1, (1,), generator=g))

    # --- parallel (Jacobi) forward --------------------------------------------------------------

    def _pass(self, emb: torch.Tensor, thoughts: torch.Tensor, position_ids: torch.Tensor,
              valid: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """One causal pass over tokens interleaved with their thoughts.

        ``emb`` [B, T, d] scaled token embeddings, ``thoughts`` [B, T, S-1, d] the inputs of the
        thought slots, ``position_ids`` [T] or [B, T] and ``valid`` [B, T] per token, repeated
        for each of its slots (a pad is invalid in all of them); with a ``cache`` the slots are
        appended to it. Returns the raw hidden states per slot [B, T, S, d].
        """
        b, t, d = emb.shape
        slots = torch.cat([emb[:, :, None], thoughts.to(emb.dtype)], dim=2)
        s = slots.shape[2]
        pos = position_ids.repeat_interleave(s, dim=-1)
        ok = None if valid is None else valid.repeat_interleave(s, dim=-1)
        x = self.model.add_positions(slots.reshape(b, t * s, d), pos)
        per_block = self.cfg.ponder.checkpoint == "block" and torch.is_grad_enabled()
        return self.model.run_blocks(x, pos, cache=cache, valid=ok, checkpoint_blocks=per_block).view(b, t, s, -1)

    def _run(self, emb: torch.Tensor, thoughts: torch.Tensor, position_ids: torch.Tensor,
             valid: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        if self.cfg.ponder.checkpoint == "pass" and torch.is_grad_enabled():
            return checkpoint(self._pass, emb, thoughts, position_ids, valid, cache, use_reentrant=False)
        return self._pass(emb, thoughts, position_ids, valid, cache)

    def _jacobi(self, idx: torch.Tensor, n: int, position_ids: torch.Tensor, valid: torch.Tensor | None = None,
                cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits [B, T, V] of ``idx`` after K init passes, ``n`` >= 1 Jacobi iterations and a
        final pass (the only one through ``cache``, if given), and the Jacobi residual."""
        emb = self.model.embed(idx)
        thoughts = emb.new_zeros(*emb.shape[:2], 0, emb.shape[2])  # no thought slots yet
        for _ in range(self.k):  # init passes of T, 2T, ..., KT slots
            thoughts = self.model.norm_f(self._run(emb, thoughts, position_ids, valid))
        for _ in range(n):
            previous = thoughts
            thoughts = self.model.norm_f(self._run(emb, thoughts, position_ids, valid)[:, :, :self.k])
        residual = (thoughts - previous).abs().mean().detach()
        return self.model.head(self._run(emb, thoughts, position_ids, valid, cache)[:, :, self.k]), residual

    def jacobi_logits(self, x: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Next-token logits [B, T, V] after K init passes and ``n`` >= 1 Jacobi iterations, and
        the Jacobi residual: mean |change| of the thoughts in the last iteration."""
        return self._jacobi(x, n, torch.arange(x.shape[1], device=x.device))

    # --- sequential (exact) forward -------------------------------------------------------------

    def _advance(self, idx: torch.Tensor, position_ids: torch.Tensor, valid: torch.Tensor | None,
                 cache: KVCache) -> torch.Tensor:
        """Feed each token of ``idx`` [B, T] and then its K thoughts, one cached slot at a time
        (all at the token's position id, validity shared); return logits [B, T, V]."""
        out = []
        for i in range(idx.shape[1]):
            pos = position_ids[:, i:i + 1]
            ok = None if valid is None else valid[:, i:i + 1]
            slot = self.model.embed(idx[:, i:i + 1])
            for k in range(self.k + 1):
                h = self.model.run_blocks(self.model.add_positions(slot, pos), pos, cache=cache, valid=ok)
                if k < self.k:
                    slot = self.model.norm_f(h)  # the next thought
            out.append(self.model.head(h))
        return torch.cat(out, dim=1)

    def exact_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, V] of the sequential model: thoughts produced token by token."""
        b, t = x.shape
        pos = token_positions(x)
        return self._advance(x, pos, None, self.new_cache(b, t))

    # --- the Method seam ------------------------------------------------------------------------

    def batch_inputs(self, x: torch.Tensor, y: torch.Tensor, windows) -> dict[str, int]:
        """This training batch's n, drawn here, outside the wrapped (compiled) forward, so the
        compiled training step has no graph break (one graph per value of n)."""
        return {"iters": self._draw_train_iters(self)} if self.training else {}

    def forward(self, x: torch.Tensor, y: torch.Tensor, nll: bool = False, iters: int | None = None):
        """``iters`` is n from :meth:`batch_inputs`; a training call without it draws n itself."""
        p = self.cfg.ponder
        metrics: dict[str, torch.Tensor | float] = {}
        if nll and p.eval_mode == "exact":
            logits = self.exact_logits(x)
        else:
            if self.training and not nll:
                n = self._draw_train_iters(self) if iters is None else iters
            else:
                n = p.eval_iters
            logits, residual = self.jacobi_logits(x, n)
            metrics = {"jacobi_residual": residual, "jacobi_iters": float(n)}
            if nll:
                self._eval_residuals.append(residual)
        losses = token_nll(logits, y)
        if nll:
            return losses
        loss = losses.mean()
        return loss, {"ponder_loss": loss.detach(), **metrics}

    def set_eval_mode(self, mode: str) -> None:
        super().set_eval_mode(mode)
        self.cfg.ponder.eval_mode = mode

    def pop_eval_metrics(self) -> dict[str, float]:
        p = self.cfg.ponder
        out: dict[str, float] = {"eval_mode": p.eval_mode}
        if p.eval_mode == "jacobi":
            out["jacobi_iters"] = p.eval_iters
        if self._eval_residuals:
            out["jacobi_residual"] = float(torch.stack(self._eval_residuals).mean())
        self._eval_residuals = []
        return out

    def forward_flops_per_token(self, seq_len: int, n: float) -> float:
        """Forward FLOPs per token of one Jacobi forward with ``n`` iterations: init passes of
        kT slots (k = 1..K, context kT), n + 1 passes of (K+1)T slots, the head once per token."""
        k, cfg = self.k, self.model.cfg
        init = sum(j * forward_flops_per_slot(cfg, j * seq_len, head=False) for j in range(1, k + 1))
        full = (k + 1) * forward_flops_per_slot(cfg, (k + 1) * seq_len, head=False)
        head = forward_flops_per_slot(cfg, 0, n_layers=0)
        return init + (n + 1) * full + head

    def train_flops_per_token(self, seq_len: int) -> float:
        """3 x forward (gradients flow through every pass) at the mean of the drawn n."""
        p = self.cfg.ponder
        return 3.0 * self.forward_flops_per_token(seq_len, (p.train_iters_min + p.train_iters_max) / 2)

    def infer_flops_per_token(self, context: int) -> float:
        """Generation is exact and sequential: K + 1 slots per token, each through every block over a
        (K+1) x ``context`` slot cache, and the head once (on the last thought)."""
        k, cfg = self.k, self.model.cfg
        return (k + 1) * forward_flops_per_slot(cfg, (k + 1) * context, head=False) + \
            forward_flops_per_slot(cfg, 0, n_layers=0)

    def cache_slots(self, n_tokens: int) -> int:
        return n_tokens * (self.k + 1)

    def step(self, idx: torch.Tensor, position_ids: torch.Tensor, valid: torch.Tensor,
             cache: KVCache) -> torch.Tensor:
        """Advance the cache by ``idx`` [B, T]. A prompt (T > 1) with ``prefill jacobi`` gets its
        thoughts from ``eval_iters`` parallel Jacobi iterations (fewer sequential steps than
        (K+1)T single slots; exact for the first 1 + eval_iters // K positions), the final pass
        filling the cache with the same slots as the sequential path; otherwise sequential.
        Jacobi prefill needs an empty cache (its passes see only this chunk)."""
        p = self.cfg.ponder
        if idx.shape[1] > 1 and p.prefill == "jacobi" and cache.lengths[0] == 0:
            return self._jacobi(idx, p.eval_iters, position_ids, valid, cache)[0]
        return self._advance(idx, position_ids, valid, cache)
