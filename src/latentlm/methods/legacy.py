"""Configs saved by older latentlm (checkpoints, run directories), read by today's sections.

0.1 kept every method's settings in two shared sections: ``ponder.thoughts`` was K for ponder,
pause, loop and ponderlm alike, and ``cocomix`` held the teacher, the concept labels, the student
and KD's knobs. :func:`upgrade_config` moves each key to the section that owns it now;
:func:`renamed_keys` names them for a user's own (hand-written) config.

Keys added later whose default changed what a method computes (:data:`OLD_DEFAULTS`) get, in a
saved config that lacks them, the value that reproduces what the run computed when it was saved.
A config a user writes gets today's defaults (make_config never applies this).
"""

from __future__ import annotations

import copy
from typing import Any

# old "section.key" -> the "section.key" places that hold it now
MOVED: dict[str, tuple[str, ...]] = {
    "ponder.thoughts": ("ponder.n_thoughts", "pause.n_pauses", "loop.n_loops", "ponderlm.n_steps"),
    "cocomix.teacher": ("teacher.path",),
    "cocomix.teacher_layer": ("concepts.layer",),
    "cocomix.sae": ("concepts.sae",),
    "cocomix.labels": ("concepts.labels",),
    "cocomix.k_attr": ("concepts.k_attr",),
    "cocomix.acts": ("concepts.acts",),
    "cocomix.select": ("concepts.select",),
    "cocomix.kd_weight": ("kd.weight",),
    "cocomix.kd_temperature": ("kd.temperature",),
    "cocomix.insert_layer": ("cocomix.insert_layer", "pause_insert.insert_layer"),
}


# "section.key" -> the value a saved config without the key meant (the behaviour before the key existed),
# filled in wherever the section is present. Added 2026-12 (issue 13, fidelity to the authors' code).
OLD_DEFAULTS: dict[str, Any] = {
    "ponderlm.update": "from_e0",  # each step added its mixture to e(0), not to the previous input
    "ponderlm.mix_scale": "sqrt_d",  # mixtures were scaled by sqrt(d), not by model.embed_scale
    "pause.shared": False,  # K distinct pause vectors [K, d], not one repeated token
    "teacher.dtype": "auto",
    "train.fused_loss": False,  # the plain head losses (same math, other float rounding)  # the teacher ran in bfloat16 on CUDA and float32 elsewhere (default now float32)
}


def _present(data: dict[str, Any], dotted: str) -> bool:
    section, key = dotted.split(".")
    return isinstance(data.get(section), dict) and key in data[section]


def renamed_keys(data: dict[str, Any]) -> list[tuple[str, tuple[str, ...]]]:
    """The keys of ``data`` that latentlm 0.1 had and that moved since: ``[(old, new places)]``."""
    return [(old, new) for old, new in MOVED.items() if old not in new and _present(data, old)]


def upgrade_config(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of the saved config ``data`` with every 0.1 key in its section(s) now and the
    :data:`OLD_DEFAULTS` of keys it predates filled in (``data`` itself when nothing changes)."""
    out = copy.deepcopy(data)
    for old, new in MOVED.items() if renamed_keys(data) else ():  # a 0.1 layout
        if _present(data, old):
            section, key = old.split(".")
            value = out[section][key] if old in new else out[section].pop(key)
            for place in new:
                s, k = place.split(".")
                out.setdefault(s, {})[k] = value
    changed = bool(renamed_keys(data))
    for dotted, value in OLD_DEFAULTS.items():  # in the sections the 0.1 move created too
        section, key = dotted.split(".")
        if isinstance(out.get(section), dict) and key not in out[section]:
            out[section][key], changed = value, True
    return out if changed else data  # no deep comparison: a hostile config may refer to itself
