"""Where a CoCoMix student's concept labels come from during training.

A label source maps a batch (tokens ``x`` [B, T] and the loader's window ids) to labels
[B, T, k_attr] (int64, -1 = masked). On the fly: the frozen teacher and its SAE compute
attribution labels for the batch (SPEC 2.1). Labels depend only on the token window, so they
can also be precomputed once into a cache (``latentlm concepts label``) and looked up by window.
"""

from __future__ import annotations

from typing import Protocol

import numpy as np
import torch

from latentlm.config import Config
from latentlm.errors import LatentLMError


class LabelSource(Protocol):
    def labels(self, x: torch.Tensor, windows: np.ndarray) -> torch.Tensor: ...


class OnTheFlyLabels:
    """Attribution labels computed by the teacher + SAE for every batch."""

    def __init__(self, cfg: Config, device: torch.device | str):
        from latentlm.concepts.attribution import concept_labels
        from latentlm.concepts.sae import check_sae_matches, load_sae
        from latentlm.concepts.teacher import load_teacher

        c = cfg.cocomix
        if not c.teacher or not c.sae:
            raise LatentLMError("cocomix needs --cocomix.teacher and --cocomix.sae (or a --cocomix.labels cache)")
        self.teacher = load_teacher(c.teacher, device=device)
        self.sae = load_sae(c.sae).to(device)
        check_sae_matches(self.sae, self.teacher.describe(), c.teacher_layer, self.teacher.tokenizer.fingerprint())
        self._fn = concept_labels
        self.cfg = c

    def labels(self, x: torch.Tensor, windows: np.ndarray) -> torch.Tensor:
        c = self.cfg
        return self._fn(self.teacher, self.sae, x, c.teacher_layer, k_attr=c.k_attr, acts=c.acts, select=c.select)
