"""Next-token prediction: the baseline every method is compared against (docs/METHODS.md §1)."""

from __future__ import annotations

from latentlm.methods.base import LogitsMethod


class NTP(LogitsMethod):
    name = "ntp"  # FLOPs: the base class's plain-transformer formulas
    plain_lm = True  # exportable to Hugging Face, usable as a teacher

    def hidden(self, idx, position_ids, valid=None, cache=None):
        return self.model.hidden(idx, position_ids=position_ids, cache=cache, valid=valid)
