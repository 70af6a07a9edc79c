"""Pause tokens at the input: PonderLM-2's "pause" baseline (arXiv 2509.23184, after Goyal et al.).

One learnable pause token is repeated K times after every token (as in the authors' code and
Goyal et al.; ``pause.shared false``: K distinct pause vectors instead), so the sequence is
``x_1, p^1..p^K, x_2, p^1..p^K, ...`` ((K+1)T slots, plain causal attention), every pause slot
sharing its token's position id. The last pause slot of token t predicts x_{t+1}; the other
slots carry no loss. Unlike PonderLM-2's thoughts, pause inputs do not depend on the sequence,
so training, evaluation and generation are all one exact parallel pass.

This is the input-level pause of PonderLM-2, not CoCoMix's pause inserted at a middle layer.
See docs/PONDER.md, section "Baselines".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn as nn

from latentlm.methods.base import LogitsMethod
from latentlm.model.flops import forward_flops_per_slot
from latentlm.model.transformer import KVCache, Transformer
from latentlm.settings import Settings, setting

if TYPE_CHECKING:
    from latentlm.config import Config


@dataclass
class PauseSettings(Settings):
    """The ``pause:`` section."""

    section, positive_fields = "pause", ("n_pauses",)
    n_pauses: int = setting(1, "K pause slots after every token (match ponder.n_thoughts for equal slots)")
    shared: bool = setting(True, "one pause token repeated K times (the authors', Goyal et al.); false: K distinct "
                                 "learned vectors (latentlm before 2026-12; a saved config without the key loads false)")


class Pause(LogitsMethod):
    name = "pause"
    sections = {"pause": PauseSettings}

    def __init__(self, model: Transformer, cfg: Config):
        super().__init__(model, cfg)
        self.n_pauses = cfg.pause.n_pauses
        # Drawn after the core is built, so the core's init is the same as every other method's.
        # Initialised (``model.init``) and scaled (``embed_scale``) like a token embedding: [1, d]
        # for one shared pause token, [K, d] for K distinct ones.
        rows = 1 if cfg.pause.shared else self.n_pauses
        self.pause = nn.Parameter(model.init_embedding_(torch.empty(rows, model.cfg.n_embd)))

    def hidden(self, idx: torch.Tensor, position_ids: torch.Tensor, valid: torch.Tensor | None = None,
               cache: KVCache | None = None) -> torch.Tensor:
        """Run tokens ``idx`` [B, T] each followed by the K pauses; the output [B, T, d] of the last
        pause slot of each token (the head reads it). Positions and validity are repeated per slot."""
        b, t = idx.shape
        emb = self.model.embed(idx)
        pauses = (self.pause * self.model.cfg.embed_scale).to(emb.dtype)  # [1 or K, d]
        pauses = pauses.expand(b, t, self.n_pauses, -1)  # one shared token is repeated K times
        slots = torch.cat([emb[:, :, None], pauses], dim=2).flatten(1, 2)
        pos = position_ids.repeat_interleave(self.n_pauses + 1, dim=1)
        ok = None if valid is None else valid.repeat_interleave(self.n_pauses + 1, dim=1)
        h = self.model.run_blocks(self.model.add_positions(slots, pos), pos, cache=cache, valid=ok)
        return h.view(b, t, self.n_pauses + 1, -1)[:, :, self.n_pauses]

    def forward_flops_per_token(self, seq_len: int) -> float:
        """K+1 slots per token through the blocks over a (K+1)T context, the head once."""
        cfg = self.model.cfg
        blocks = (self.n_pauses + 1) * forward_flops_per_slot(cfg, (self.n_pauses + 1) * seq_len, head=False)
        return blocks + forward_flops_per_slot(cfg, 0, n_layers=0)

    def cache_slots(self, n_tokens: int) -> int:
        return n_tokens * (self.n_pauses + 1)
