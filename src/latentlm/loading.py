"""Loading a trained method from its checkpoint, for evaluation, generation and export.

Above the methods and the run config in the import graph (it builds both); the low-level
checkpoint reading it relies on is :mod:`latentlm.checkpoint_files`, and resuming training is
:mod:`latentlm.train.checkpoint`'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from latentlm.checkpoint_files import saved_config
from latentlm.config import Config, config_from_dict
from latentlm.data.prepare import tokenizer_for
from latentlm.data.tokenizers import Tokenizer
from latentlm.methods import Method, build_method
from latentlm.checkpoint_files import check_state_fits, load_model_state, read_manifest, resolve_checkpoint
from latentlm.errors import LatentLMError


def load_config(ckpt: Path) -> Config:
    """The run config a checkpoint was trained with (0.1 layouts upgraded)."""
    return config_from_dict(saved_config(ckpt))


def checkpoint_tokenizer(ckpt: str | Path, manifest: dict[str, Any]) -> Tokenizer:
    """The tokenizer a checkpoint was trained with (a BPE's file is stored inside it)."""
    desc = manifest.get("tokenizer")
    if not (isinstance(desc, dict) and isinstance(desc.get("name"), str)):
        raise LatentLMError(f"{resolve_checkpoint(ckpt) / 'manifest.json'} records no tokenizer; the checkpoint is "
                            "damaged, use an earlier one")
    return tokenizer_for(manifest, resolve_checkpoint(ckpt))


def load_method(path: str | Path, device: str | torch.device = "cpu") -> tuple[Method, Config, dict[str, Any]]:
    """A trained method for evaluation or generation: ``(method, config, manifest)``."""
    ckpt = resolve_checkpoint(path)
    manifest = read_manifest(ckpt)
    cfg = load_config(ckpt)
    if manifest.get("method", cfg.train.method) != cfg.train.method:
        raise LatentLMError(f"{ckpt}: its manifest says method {manifest['method']!r} but its config.yaml says "
                            f"{cfg.train.method!r}; the checkpoint is damaged, use an earlier one")
    method = build_method(cfg)
    state = method.upgrade_state_dict(load_model_state(ckpt, cfg.model))
    check_state_fits(ckpt, state, method)
    method.load_state_dict(state, strict=True)
    return method.to(device).eval(), cfg, manifest
