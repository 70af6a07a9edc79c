"""Next-token prediction: the baseline every method is compared against (SPEC section 1)."""

from __future__ import annotations

from latentlm.methods.base import LogitsMethod
from latentlm.model.flops import forward_flops_per_slot


class NTP(LogitsMethod):
    name = "ntp"

    def logits(self, idx, position_ids, valid=None, cache=None):
        return self.model(idx, position_ids=position_ids, cache=cache, valid=valid)

    def forward_flops_per_token(self, seq_len: int) -> float:
        return forward_flops_per_slot(self.model.cfg, seq_len)
