"""Configs saved by earlier versions (checkpoints, run directories), read by today's sections.

0.1 kept every method's settings in two shared sections: ``ponder.thoughts`` was K for ponder,
pause, loop and ponderlm alike, and ``cocomix`` held the teacher, the concept labels, the student
and KD's knobs. :func:`upgrade_config` moves each key to the section that owns it now;
:func:`renamed_keys` names them for a user's own (hand-written) config. :func:`saved_defaults` gives a
saved config that predates a key (:data:`ADDED`) the value that keeps its old behaviour.
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


def _present(data: dict[str, Any], dotted: str) -> bool:
    section, key = dotted.split(".")
    return isinstance(data.get(section), dict) and key in data[section]


def renamed_keys(data: dict[str, Any]) -> list[tuple[str, tuple[str, ...]]]:
    """The keys of ``data`` that latentlm 0.1 had and that moved since: ``[(old, new places)]``."""
    return [(old, new) for old, new in MOVED.items() if old not in new and _present(data, old)]


def upgrade_config(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of the saved config ``data`` with every 0.1 key in its section(s) now (unchanged if
    ``data`` is not from 0.1)."""
    if not renamed_keys(data):
        return data
    out = copy.deepcopy(data)
    for old, new in MOVED.items():
        if _present(data, old):
            section, key = old.split(".")
            value = out[section][key] if old in new else out[section].pop(key)
            for place in new:
                s, k = place.split(".")
                out.setdefault(s, {})[k] = value
    return out


# Keys added after configs were already being saved, whose new default changes what is computed: a
# saved config without the key gets the value that reproduces the old behaviour ("section.key" -> value).
ADDED: dict[str, Any] = {
    "train.fused_loss": False,  # chunked head losses: same math, different float rounding
}


def saved_defaults(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of the saved config ``data`` with every :data:`ADDED` key it lacks set to its old value
    (``data`` itself when it lacks none)."""
    missing = [k for k in ADDED if not _present(data, k)]
    if not missing:
        return data
    out = copy.deepcopy(data)
    for dotted in missing:
        section, key = dotted.split(".")
        if not isinstance(out.get(section), dict):
            out[section] = {}
        out[section][key] = ADDED[dotted]
    return out
