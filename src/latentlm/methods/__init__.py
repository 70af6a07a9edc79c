"""Training objectives. Adding one = a module here and a line in :data:`METHODS`."""

from __future__ import annotations

import copy

import torch

from latentlm.config import Config
from latentlm.errors import LatentLMError
from latentlm.methods.base import Method
from latentlm.methods.cocomix import Cocomix, PauseInsert, resolve_concept_sizes
from latentlm.methods.kd import KD, KDPause
from latentlm.methods.loop import Loop
from latentlm.methods.ntp import NTP
from latentlm.methods.pause import Pause
from latentlm.methods.ponder import Ponder
from latentlm.methods.ponderlm import PonderLM
from latentlm.model.transformer import Transformer

METHODS: dict[str, type[Method]] = {
    "ntp": NTP,
    "ponder": Ponder,
    "pause": Pause,
    "loop": Loop,
    "ponderlm": PonderLM,
    "kd": KD,
    "cocomix": Cocomix,
    "pause_insert": PauseInsert,
    "kd_pause": KDPause,
}


def build_method(cfg: Config) -> Method:
    """The configured method around a freshly initialised core model."""
    return METHODS[cfg.train.method](Transformer(cfg.model), cfg)


def flops_report(cfg: Config, methods: list[str], context: int | None = None) -> list[dict]:
    """Per-token FLOPs of ``methods`` on ``cfg``'s core (built on the meta device: no memory, any
    size): training (student forward + backward, teacher, total) at ``cfg.seq_len`` and generation
    of one token with ``context`` tokens in the KV cache (default ``cfg.seq_len``). A method that
    cannot be built or counted gets ``error`` instead of numbers."""
    rows, context = [], context or cfg.seq_len
    for name in methods:
        if name not in METHODS:
            raise LatentLMError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
        c = copy.deepcopy(cfg)
        c.train.method = name
        row: dict = {"method": name}
        try:
            if name == "cocomix":
                resolve_concept_sizes(c.cocomix)  # reads the SAE on the CPU, not under the meta device
            with torch.device("meta"):
                m = build_method(c)
            row["params"] = sum(p.numel() for p in m.parameters())
            row["train_student"] = m.train_flops_per_token(c.seq_len)
            row["infer"] = m.infer_flops_per_token(context)
            row["teacher"] = m.teacher_flops_per_token(c.seq_len)
            row["train_total"] = row["train_student"] + row["teacher"]
        except LatentLMError as e:
            row["error"] = str(e)
        rows.append(row)
    return rows
