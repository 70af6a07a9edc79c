"""``train.init_from``: start a run's core model from another checkpoint's weights.

Only the core (``model.*`` tensors) is loaded, so any method can start from any checkpoint,
e.g. a CoCoMix student from an imported GPT-2. The optimizer, schedule and data order start
fresh; a resumed run ignores ``init_from`` (its own checkpoint wins).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from latentlm.config import config_from_dict
from latentlm.data.prepare import check_tokenizer
from latentlm.errors import LatentLMError
from latentlm.checkpoint_files import saved_config
from latentlm.model.config import ModelConfig
from latentlm.model.transformer import Transformer
from latentlm.settings import build
from latentlm.checkpoint_files import load_model_state, read_manifest, resolve_checkpoint

# Settings that change the function but not any tensor shape, so shape checks cannot catch them.
_SAME = ("vocab_size", "pos", "norm", "mlp", "tie_embeddings", "norm_eps", "rope_theta", "embed_scale",
         "parallel_residual", "rotary_pct")


def init_from_base(path: str | Path, with_model: bool = True) -> dict[str, Any]:
    """The config layer ``latentlm train --init-from CKPT`` starts from: CKPT's model section (its
    config.yaml, older layouts upgraded) when ``with_model``, else nothing; the caller sets
    ``train.init_from``. A path that is no checkpoint is a one-line error before anything else."""
    if not Path(path).exists():
        raise LatentLMError(f"--init-from {path} does not exist; pass a latentlm run or checkpoint directory "
                            "(`latentlm import --hf` turns a Hugging Face model or GGUF into one)")
    ckpt = resolve_checkpoint(path)
    read_manifest(ckpt, verify=False)  # a directory that is no checkpoint fails here, in one line
    return {"model": config_from_dict(saved_config(ckpt)).to_dict()["model"]} if with_model else {}


def init_core_from(model: Transformer, path: str | Path, data_manifest: dict[str, Any] | None = None) -> Path:
    """Copy the core weights of checkpoint ``path`` (run or ``step_*`` directory) into ``model``.

    Raises a one-line error when the checkpoint's tokenizer differs from the data's, when a
    setting in :data:`_SAME` differs, or naming the first tensor whose presence or shape differs.
    Returns the checkpoint directory used.
    """
    if not Path(path).exists():
        raise LatentLMError(f"train.init_from {path} does not exist; pass a latentlm run or checkpoint directory "
                            "(`latentlm import --hf` turns a Hugging Face model into one)")
    ckpt = resolve_checkpoint(path)
    manifest = read_manifest(ckpt)
    if data_manifest is not None and "tokenizer" in manifest:
        check_tokenizer(data_manifest, manifest["tokenizer"])
    saved = build(ModelConfig, saved_config(ckpt)["model"], "model.")
    theirs, ours = saved.resolved(), model.cfg
    for key in _SAME:
        if getattr(theirs, key) != getattr(ours, key):
            raise LatentLMError(f"train.init_from {ckpt} has model.{key}={getattr(theirs, key)} but this run "
                                f"{getattr(ours, key)}; set --model.{key} {getattr(theirs, key)}")
    state = {k.removeprefix("model."): v for k, v in load_model_state(ckpt, saved).items() if k.startswith("model.")}
    target = model.state_dict()
    for key in [*target, *(k for k in state if k not in target)]:  # model order: the first difference
        if key not in state or key not in target:
            where = "this run's model" if key not in target else f"{ckpt}"
            raise LatentLMError(f"train.init_from: tensor {key} is missing from {where}; the model configs differ")
        if state[key].shape != target[key].shape:
            raise LatentLMError(f"train.init_from: tensor {key} has shape {tuple(state[key].shape)} in {ckpt} but "
                                f"{tuple(target[key].shape)} in this run; match the model config to the checkpoint")
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
    return ckpt
