"""Configs saved by latentlm 0.1 (checkpoints, run directories), read by today's sections.

0.1 kept every method's settings in two shared sections: ``ponder.thoughts`` was K for ponder,
pause, loop and ponderlm alike, and ``cocomix`` held the teacher, the concept labels, the student
and KD's knobs. :func:`upgrade_config` moves each key to the section that owns it now;
:func:`renamed_keys` names them for a user's own (hand-written) config. It also gives a saved
config the old value of every setting whose default changed since (:data:`CHANGED_DEFAULTS`), so a
run saved before the change loads and behaves as it did.
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


# "section.key" -> the behaviour a saved config without the key had. Applied only when the saved config
# has the section (its method read it), and only on load (config_from_dict): a user's YAML gets today's
# default. teacher.dtype: the teacher ran in bfloat16 on CUDA and float32 elsewhere until the setting
# came (its default is float32 now).
CHANGED_DEFAULTS: dict[str, Any] = {"teacher.dtype": "auto"}


def _present(data: dict[str, Any], dotted: str) -> bool:
    section, key = dotted.split(".")
    return isinstance(data.get(section), dict) and key in data[section]


def renamed_keys(data: dict[str, Any]) -> list[tuple[str, tuple[str, ...]]]:
    """The keys of ``data`` that latentlm 0.1 had and that moved since: ``[(old, new places)]``."""
    return [(old, new) for old, new in MOVED.items() if old not in new and _present(data, old)]


def upgrade_config(data: dict[str, Any]) -> dict[str, Any]:
    """A copy of the saved config ``data`` with every 0.1 key in its section(s) now and the old value
    of every changed default it lacks (``data`` itself when neither applies)."""
    from_01 = bool(renamed_keys(data))
    stale = [d for d in CHANGED_DEFAULTS if isinstance(data.get(d.split(".")[0]), dict) and not _present(data, d)]
    if not from_01 and not stale:
        return data
    out = copy.deepcopy(data)
    for old, new in MOVED.items():
        if from_01 and _present(data, old):
            section, key = old.split(".")
            value = out[section][key] if old in new else out[section].pop(key)
            for place in new:
                s, k = place.split(".")
                out.setdefault(s, {})[k] = value
    for dotted, value in CHANGED_DEFAULTS.items():
        section, key = dotted.split(".")
        if isinstance(out.get(section), dict) and key not in out[section]:
            out[section][key] = value
    return out
