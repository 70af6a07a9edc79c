"""PonderLM (v1, arXiv 2505.20674): pondering with probability-weighted embeddings (docs/METHODS.md §3.4).

After a pass over the tokens, each position's predicted distribution p (softmax of the logits
over the real vocabulary) is turned back into an embedding, the p-weighted mean of the scaled
token embeddings, and added to the input of the next pass:

    e(0) = embed(x)   (times K with ``multiply_start``: PonderLM's larger runs)
    h(k-1) = blocks(e(k-1) + positions);  p(k-1) = softmax(head(h(k-1)))
    e(k) = e(k-1) + p(k-1) @ (W_E[:V] * s)      k = 1..K   (``update cumulative``, the paper's rule)
    e(k) = e(0)   + p(k-1) @ (W_E[:V] * s)                 (``update from_e0``, the PonderLM-2 repo's baseline)

with s = ``model.embed_scale``, the tokens' own scale (``mix_scale embed``; ``sqrt_d``: a fixed
sqrt(d)), and the pass on e(K) gives the logits. Every pass is a plain causal pass over T slots
with shared weights; gradients flow through all of them. See docs/PONDER.md, section "Baselines".
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from latentlm.methods.base import LogitsMethod
from latentlm.model.flops import forward_flops_per_slot
from latentlm.model.transformer import KVCache
from latentlm.settings import Settings, setting


@dataclass
class PonderLMSettings(Settings):
    """The ``ponderlm:`` section. A config saved before these keys existed loads with the rule latentlm
    had then (``update from_e0``, ``mix_scale sqrt_d``; methods/legacy.py)."""

    section, positive_fields = "ponderlm", ("n_steps",)
    n_steps: int = setting(1, "K pondering steps (K + 1 passes; match ponder.n_thoughts)")
    update: Literal["cumulative", "from_e0"] = setting("cumulative", "cumulative: each step adds its pondering "
                                                       "embedding to the previous step's input (PonderLM v1); from_e0: "
                                                       "to the first input e(0) (the PonderLM-2 repo's baseline)")
    multiply_start: bool = setting(False, "start from K e(0) instead of e(0) (PonderLM v1's runs of 410M and more)")
    mix_scale: Literal["embed", "sqrt_d"] = setting("embed", "scale of the mixed embeddings: embed = model.embed_scale "
                                                    "(both official codes); sqrt_d = a fixed sqrt(d) (latentlm before 2026-12)")


class PonderLM(LogitsMethod):
    name = "ponderlm"
    sections = {"ponderlm": PonderLMSettings}

    @property
    def n_steps(self) -> int:
        return self.cfg.ponderlm.n_steps

    def mix_weight(self) -> torch.Tensor:
        """The embeddings a predicted distribution mixes, [V, d]: the real vocabulary's rows of W_E
        times the tokens' ``embed_scale`` (or sqrt(d) with ``mix_scale sqrt_d``)."""
        m = self.model
        scale = math.sqrt(m.cfg.n_embd) if self.cfg.ponderlm.mix_scale == "sqrt_d" else m.cfg.embed_scale
        return m.wte.weight[: m.cfg.vocab_size] * scale

    def hidden(self, idx: torch.Tensor, position_ids: torch.Tensor, valid: torch.Tensor | None = None,
               cache: KVCache | None = None) -> torch.Tensor:
        """K+1 passes on ``idx`` [B, T], each pondering on the previous pass's prediction; pass
        p keeps its keys and values at cache layers ``p * n_layer ...``. The last pass's output
        [B, T, d] (its head gives the logits)."""
        m, s = self.model, self.cfg.ponderlm
        e0 = m.embed(idx)
        if s.multiply_start:
            e0 = e0 * self.n_steps
        w = self.mix_weight()
        e = e0
        for p in range(self.n_steps + 1):
            h = m.run_blocks(m.add_positions(e, position_ids), position_ids, cache=cache,
                             valid=valid, cache_offset=p * m.cfg.n_layer)
            if p < self.n_steps:
                mixed = m.head(h).float().softmax(-1).to(w.dtype) @ w
                e = (e if s.update == "cumulative" else e0) + mixed
        return h

    def forward_flops_per_token(self, seq_len: int) -> float:
        """K+1 passes of the blocks over a T context and K+1 heads, plus K mixtures p @ W_E
        (2 V d each, real vocabulary); the update rule and start only add elementwise work."""
        cfg = self.model.cfg
        mix = 2.0 * cfg.vocab_size * cfg.n_embd
        return (self.n_steps + 1) * forward_flops_per_slot(cfg, seq_len) + self.n_steps * mix

    def new_cache(self, batch: int, n_tokens: int) -> KVCache:
        """One set of cache layers per pass (n_tokens slots each)."""
        return self.model.new_cache(batch, self.cache_slots(n_tokens), passes=self.n_steps + 1)
