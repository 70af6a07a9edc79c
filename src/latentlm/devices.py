"""Which torch device a command runs on: the one place ``auto`` / ``cpu`` / ``cuda`` / ``cuda:N``
are checked and resolved, for ``train.device`` and every command's ``--device``.

``auto`` is CUDA when a GPU is usable, else the CPU. A name that is not one of these, or a GPU
this machine (or this torch build) does not have, is a one-line :class:`LatentLMError` naming the
option, so a typo never reaches torch's own multi-line device errors.
"""

from __future__ import annotations

import re

import torch

from latentlm.errors import LatentLMError

DEVICE_NAMES = "auto, cpu, cuda, cuda:N"
_NAME = re.compile(r"auto|cpu|cuda(:\d+)?")


def check_device_name(name: object, option: str) -> None:
    """Raise unless ``name`` is one of auto, cpu, cuda, cuda:N (``option`` names it in the error)."""
    if not (isinstance(name, str) and _NAME.fullmatch(name)):
        raise LatentLMError(f"{option}={name!r} is not one of {DEVICE_NAMES}")


def resolve_device(name: str, local_rank: int = 0, option: str = "train.device") -> torch.device:
    """The device ``name`` stands for on this machine; ``cuda`` means GPU ``local_rank`` (a torchrun
    worker's own GPU). ``option`` is the setting or flag the name came from, for the error line."""
    check_device_name(name, option)
    flag = option if option.startswith("-") else f"--{option}"
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda"):
        if not torch.cuda.is_available():
            why = "this torch build has no CUDA support" if torch.version.cuda is None else "no GPU is visible"
            raise LatentLMError(f"{option}={name} but no CUDA device is available ({why}); "
                                f"use {flag} cpu or {flag} auto")
        index = int(name[5:]) if ":" in name else local_rank
        count = torch.cuda.device_count()
        if index >= count:
            raise LatentLMError(f"{option}={name} but this machine has {count} CUDA device(s) "
                                f"(cuda:0..cuda:{count - 1}); use {flag} cuda:0 or {flag} auto")
        name = f"cuda:{index}"
    return torch.device(name)
