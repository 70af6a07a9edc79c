"""Looped transformer: PonderLM-2's "loop" baseline (arXiv 2509.23184).

The whole block stack is applied K+1 times with shared weights on the T token slots: the
input (scaled embeddings + positions, added once) goes through the blocks, the output is fed
back to the blocks K more times, then the final norm and head run once. RoPE uses the same
position ids in every pass. K extra passes cost about as much block compute as K pause or
thought slots per token, without lengthening attention's context. See docs/PONDER.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from latentlm.methods.base import LogitsMethod
from latentlm.model.flops import forward_flops_per_slot
from latentlm.model.transformer import KVCache
from latentlm.settings import Settings, setting


@dataclass
class LoopSettings(Settings):
    """The ``loop:`` section."""

    section, positive_fields = "loop", ("n_loops",)
    n_loops: int = setting(1, "K extra passes of the block stack (K + 1 in all; match ponder.n_thoughts)")


class Loop(LogitsMethod):
    name = "loop"
    sections = {"loop": LoopSettings}

    @property
    def n_loops(self) -> int:
        return self.cfg.loop.n_loops

    def hidden(self, idx: torch.Tensor, position_ids: torch.Tensor, valid: torch.Tensor | None = None,
               cache: KVCache | None = None) -> torch.Tensor:
        """K+1 passes of the block stack on ``idx`` [B, T]; pass p keeps its keys and values at
        cache layers ``p * n_layer ...``. Returns the last pass's output [B, T, d] (the head reads it)."""
        h = self.model.add_positions(self.model.embed(idx), position_ids)
        for p in range(self.n_loops + 1):
            h = self.model.run_blocks(h, position_ids, cache=cache, valid=valid,
                                      cache_offset=p * self.model.cfg.n_layer)
        return h

    def forward_flops_per_token(self, seq_len: int) -> float:
        """K+1 passes of the blocks over a T context, the head once."""
        cfg = self.model.cfg
        blocks = (self.n_loops + 1) * forward_flops_per_slot(cfg, seq_len, head=False)
        return blocks + forward_flops_per_slot(cfg, 0, n_layers=0)

    def new_cache(self, batch: int, n_tokens: int) -> KVCache:
        """One set of cache layers per pass (n_tokens slots each)."""
        return self.model.new_cache(batch, self.cache_slots(n_tokens), passes=self.n_loops + 1)
