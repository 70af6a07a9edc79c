"""Next-token prediction: the baseline every method is compared against (SPEC section 1)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from latentlm.methods.base import Method


class NTP(Method):
    name = "ntp"

    def forward(self, x: torch.Tensor, y: torch.Tensor, nll: bool = False):
        logits = self.model(x)
        losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none").view_as(y)
        if nll:
            return losses
        loss = losses.mean()
        return loss, {"ntp_loss": loss.detach()}

    def step(self, idx, position_ids, valid, cache):
        return self.model(idx, position_ids=position_ids, cache=cache, valid=valid)
