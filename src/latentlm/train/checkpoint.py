"""Checkpoints: weights (safetensors), optimizer, trainer state, RNG, config and a manifest.

Layout: ``RUN/checkpoints/step_00000100/`` holding ``model.safetensors``, ``optimizer.pt``,
``trainer_state.json``, ``rng.pt``, ``config.yaml`` and ``manifest.json`` (sha256 of every
file). A checkpoint is assembled in a hidden temporary directory and renamed into place, so a
kill at any moment leaves the previous checkpoints intact; directories without a manifest
are never picked up. Nothing is unpickled: tensors come from safetensors or from
``torch.load(weights_only=True)``.

Full (unsharded) state dicts are gathered through ``torch.distributed.checkpoint.state_dict``,
so the same files serve single-process, DDP and FSDP2 runs and load into any of them.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

import latentlm
from latentlm.config import Config, config_from_dict, save_yaml
from latentlm.errors import LatentLMError
from latentlm.fileio import fsync_file, publish_dir, sha256_file, write_json_atomic
from latentlm.train.distributed import DistInfo, barrier

FORMAT = 1
TOKENIZER_FILE = "tokenizer.json"
TIED_KEY = "model.lm_head.weight"  # equal to model.wte.weight when embeddings are tied
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def _tied(cfg: Config) -> bool:
    return bool(cfg.model.resolved().tie_embeddings)


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "manifest.json").is_file()]
    return sorted(found, key=lambda p: int(_STEP_DIR.match(p.name).group(1)))


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def save_checkpoint(run_dir: str | Path, step: int, module: torch.nn.Module, optimizer, cfg: Config,
                    trainer_state: dict[str, Any], info: DistInfo, extra: dict[str, Any] | None = None) -> Path:
    """Write checkpoint ``step`` (all ranks call this; rank 0 writes) and prune old ones."""
    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_sd = get_model_state_dict(module, options=opts)
    optim_sd = get_optimizer_state_dict(module, optimizer, options=opts)
    rng = {"cpu": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        rng["cuda"] = torch.cuda.get_rng_state()
    rngs = [rng]
    if info.enabled:
        rngs = [None] * info.world_size
        dist.all_gather_object(rngs, rng)
    final = Path(run_dir) / "checkpoints" / f"step_{step:08d}"
    if info.is_main:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        if _tied(cfg):
            model_sd.pop(TIED_KEY, None)
        save_file({k: v.contiguous() for k, v in model_sd.items()}, str(tmp / "model.safetensors"),
                  metadata={"format": "latentlm", "method": cfg.train.method})
        torch.save(optim_sd, tmp / "optimizer.pt")
        torch.save({f"rank{r}_{k}": v for r, s in enumerate(rngs) for k, v in s.items()}, tmp / "rng.pt")
        (tmp / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
        extra = dict(extra or {})
        if extra.get("tokenizer", {}).get("name") == "bpe":  # a trained BPE travels with the checkpoint
            shutil.copyfile(extra["tokenizer"]["path"], tmp / TOKENIZER_FILE)
            extra["tokenizer"] = {**extra["tokenizer"], "path": TOKENIZER_FILE}
        save_yaml(cfg, tmp / "config.yaml")
        files = {}
        for f in sorted(tmp.iterdir()):
            fsync_file(f)
            files[f.name] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
        manifest = {"format": FORMAT, "kind": "latentlm-checkpoint", "latentlm_version": latentlm.__version__,
                    "torch_version": torch.__version__, "method": cfg.train.method, "step": step,
                    "world_size": info.world_size, "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
                    "files": files, **extra}
        write_json_atomic(tmp / "manifest.json", manifest)
        publish_dir(tmp, final)
        for old in list_checkpoints(run_dir)[:-cfg.train.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    barrier(info)
    return final


def read_manifest(ckpt: Path, verify: bool = True) -> dict[str, Any]:
    """The checkpoint's manifest, after checking every file it lists (size and sha256)."""
    mpath = ckpt / "manifest.json"
    if not mpath.is_file():
        raise LatentLMError(f"{ckpt} is not a latentlm checkpoint (no manifest.json); "
                            "pass a run directory or one of its checkpoints/step_* directories")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError:
        raise LatentLMError(f"{mpath} is not valid JSON; the checkpoint is damaged, use an earlier one") from None
    if manifest.get("kind") != "latentlm-checkpoint" or manifest.get("format") != FORMAT:
        raise LatentLMError(f"{ckpt} has an unknown checkpoint format {manifest.get('format')!r} "
                            f"(this latentlm reads format {FORMAT})")
    for name, meta in manifest["files"].items():
        f = ckpt / name
        if not f.is_file():
            raise LatentLMError(f"checkpoint file {f} is missing; the checkpoint is incomplete, use an earlier one")
        if f.stat().st_size != meta["bytes"] or (verify and sha256_file(f) != meta["sha256"]):
            raise LatentLMError(f"checkpoint file {f} does not match its manifest (size or sha256); "
                                "it is damaged, use an earlier checkpoint")
    return manifest


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory from either itself or a run directory (its latest)."""
    p = Path(path)
    if (p / "manifest.json").is_file():
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise LatentLMError(f"no checkpoint found at {p}; pass a run directory written by "
                            "`latentlm train` or one of its checkpoints/step_* directories")
    return latest


def load_model_state(ckpt: Path, cfg: Config) -> dict[str, torch.Tensor]:
    sd = load_file(str(ckpt / "model.safetensors"))
    if _tied(cfg) and "model.wte.weight" in sd:
        sd[TIED_KEY] = sd["model.wte.weight"]
    return sd


def load_config(ckpt: Path) -> Config:
    import yaml

    return config_from_dict(yaml.safe_load((ckpt / "config.yaml").read_text()))


def restore_training(ckpt: Path, module: torch.nn.Module, optimizer, cfg: Config, info: DistInfo) -> dict[str, Any]:
    """Load weights, optimizer and this rank's RNG state into a live run; return the trainer state."""
    manifest = read_manifest(ckpt)
    if manifest["method"] != cfg.train.method:
        raise LatentLMError(f"checkpoint {ckpt} was trained with method {manifest['method']!r}, "
                            f"not {cfg.train.method!r}; resume with --train.method {manifest['method']}")
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(module, load_model_state(ckpt, cfg), options=opts)
    set_optimizer_state_dict(module, optimizer, torch.load(ckpt / "optimizer.pt", weights_only=True), options=opts)
    rng = torch.load(ckpt / "rng.pt", weights_only=True)
    key = f"rank{info.rank}_cpu"
    if key in rng:  # a different world size keeps fresh RNG streams on the new ranks
        torch.set_rng_state(rng[key])
        if torch.cuda.is_available() and f"rank{info.rank}_cuda" in rng:
            torch.cuda.set_rng_state(rng[f"rank{info.rank}_cuda"])
    return json.loads((ckpt / "trainer_state.json").read_text())


def checkpoint_tokenizer(ckpt: str | Path, manifest: dict[str, Any]):
    """The tokenizer a checkpoint was trained with (a BPE's file is stored inside it)."""
    from latentlm.data.prepare import tokenizer_for

    return tokenizer_for(manifest, resolve_checkpoint(ckpt))


def load_method(path: str | Path, device: str | torch.device = "cpu"):
    """A trained method for evaluation or generation: ``(method, config, manifest)``."""
    from latentlm.methods import build_method

    ckpt = resolve_checkpoint(path)
    manifest = read_manifest(ckpt)
    cfg = load_config(ckpt)
    method = build_method(cfg)
    method.load_state_dict(load_model_state(ckpt, cfg), strict=True)
    return method.to(device).eval(), cfg, manifest
