"""PonderLM (v1, arXiv 2505.20674): pondering with probability-weighted embeddings (docs/METHODS.md §3.4).

After a pass over the tokens, each position's predicted distribution p (softmax of the
logits over the real vocabulary) is turned back into an embedding, the p-weighted mean of the
token embeddings, and added to the token's own embedding for the next pass:

    e(0) = embed(x);  h(k-1) = blocks(e(k-1) + positions);  p(k-1) = softmax(head(h(k-1)))
    e(k) = e(0) + p(k-1) @ (W_E[:V] * sqrt(d))      for k = 1..K

and the pass on e(K) gives the logits. Every pass is a plain causal pass over T slots with
shared weights; gradients flow through all of them. See docs/PONDER.md, section "Baselines".
"""

from __future__ import annotations

import math

from dataclasses import dataclass

import torch

from latentlm.methods.base import LogitsMethod
from latentlm.model.flops import forward_flops_per_slot
from latentlm.model.transformer import KVCache
from latentlm.settings import Settings


@dataclass
class PonderLMSettings(Settings):
    """The ``ponderlm:`` section."""

    section, positive_fields = "ponderlm", ("n_steps",)
    n_steps: int = 1  # K pondering steps (K + 1 passes; match ponder.n_thoughts)


class PonderLM(LogitsMethod):
    name = "ponderlm"
    sections = {"ponderlm": PonderLMSettings}

    @property
    def n_steps(self) -> int:
        return self.cfg.ponderlm.n_steps

    def hidden(self, idx: torch.Tensor, position_ids: torch.Tensor, valid: torch.Tensor | None = None,
               cache: KVCache | None = None) -> torch.Tensor:
        """K+1 passes on ``idx`` [B, T], each pondering on the previous pass's prediction; pass
        p keeps its keys and values at cache layers ``p * n_layer ...``. The last pass's output
        [B, T, d] (its head gives the logits)."""
        m = self.model
        e0 = m.embed(idx)
        # Mixed embeddings are scaled by sqrt(d), independent of model.embed_scale (docs/METHODS.md §3.4).
        w = m.wte.weight[: m.cfg.vocab_size] * math.sqrt(m.cfg.n_embd)
        e = e0
        for p in range(self.n_steps + 1):
            h = m.run_blocks(m.add_positions(e, position_ids), position_ids, cache=cache,
                             valid=valid, cache_offset=p * m.cfg.n_layer)
            if p < self.n_steps:
                probs = m.head(h).float().softmax(-1)
                e = e0 + probs.to(w.dtype) @ w
        return h

    def forward_flops_per_token(self, seq_len: int) -> float:
        """K+1 passes of the blocks over a T context and K+1 heads, plus K mixtures p @ W_E
        (2 V d each, real vocabulary)."""
        cfg = self.model.cfg
        mix = 2.0 * cfg.vocab_size * cfg.n_embd
        return (self.n_steps + 1) * forward_flops_per_slot(cfg, seq_len) + self.n_steps * mix

    def new_cache(self, batch: int, n_tokens: int) -> KVCache:
        """One set of cache layers per pass (n_tokens slots each)."""
        return self.model.new_cache(batch, self.cache_slots(n_tokens), passes=self.n_steps + 1)
