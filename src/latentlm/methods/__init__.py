"""Training objectives. A method is one module here (or in a user's package, see
:mod:`latentlm.methods.registry`) and one :func:`register_method` line."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch

from latentlm.errors import LatentLMError
from latentlm.methods.base import Method
from latentlm.methods.cocomix import Cocomix, PauseInsert
from latentlm.methods.kd import KD, KDPause
from latentlm.methods.loop import Loop
from latentlm.methods.ntp import NTP
from latentlm.methods.pause import Pause
from latentlm.methods.ponder import Ponder
from latentlm.methods.ponder_concepts import PonderConcepts
from latentlm.methods.ponderlm import PonderLM
from latentlm.methods.registry import method_class, methods, register_method, section_types, unregister_method
from latentlm.model.transformer import Transformer

if TYPE_CHECKING:
    from latentlm.config import Config

for _cls in (NTP, Ponder, Pause, Loop, PonderLM, KD, Cocomix, PauseInsert, KDPause, PonderConcepts):
    register_method(_cls)

# The reference every comparison is read against ("x ntp" columns): plain next-token prediction.
BASELINE = NTP.name

__all__ = ["BASELINE", "Method", "build_method", "flops_report", "method_class", "methods", "register_method",
           "section_types", "unregister_method"]


def build_method(cfg: Config) -> Method:
    """The configured method around a freshly initialised core model."""
    cls = method_class(cfg.train.method)
    cls.resolve_config(cfg)
    return cls(Transformer(cfg.model), cfg)


def flops_report(cfg: Config, names: list[str], context: int | None = None) -> list[dict]:
    """Per-token FLOPs of the methods ``names`` on ``cfg``'s core (built on the meta device: no memory,
    any size): training (student forward + backward, teacher, total) at ``cfg.seq_len`` and generation
    of one token with ``context`` tokens in the KV cache (default ``cfg.seq_len``). A method that
    cannot be built or counted gets ``error`` instead of numbers."""
    rows, context = [], context or cfg.seq_len
    for name in names:
        cls = method_class(name)
        c = copy.deepcopy(cfg)
        c.train.method = name
        row: dict = {"method": name}
        try:
            cls.resolve_config(c)  # reads inputs (an SAE) on the CPU, not under the meta device
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
