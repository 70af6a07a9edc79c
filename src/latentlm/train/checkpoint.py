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
import pickle
import shutil
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from latentlm.checkpoint_files import (CHECKPOINT_FORMAT, TIED_KEY, TOKENIZER_FILE, latest_checkpoint,
                                       list_checkpoints, load_model_state, read_manifest, resolve_checkpoint, step_of)
from latentlm.config import Config, save_yaml
from latentlm.errors import LatentLMError
from latentlm.fileio import cannot_write, fsync_file, publishing, save_through, sha256_file, write_delay
from latentlm.methods.base import unwrap
from latentlm.train.distributed import DistInfo, raise_rank0_failure

# Reading checkpoints lives in latentlm.checkpoint_files; re-exported for the trainer's callers.
__all__ = ["CHECKPOINT_FORMAT", "TOKENIZER_FILE", "latest_checkpoint", "list_checkpoints", "load_model_state",
           "read_manifest", "resolve_checkpoint", "restore_training", "save_checkpoint", "step_of", "write_checkpoint"]

def _tied(cfg: Config) -> bool:
    return bool(cfg.model.resolved().tie_embeddings)


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
    failure = None
    if info.is_main:
        previous = latest_checkpoint(run_dir)
        what = f"checkpoint {final}"
        hint = (f"free disk space or make {final.parent} writable, then "
                + (f"resume: the previous checkpoint {previous} is intact" if previous is not None
                   else "start again: no checkpoint was saved yet"))
        try:  # hidden while assembled; the run lock excludes live writers, so every .step_* is a leftover
            with publishing(final, replace=True, hidden=True, stale=".step_*", name=what, hint=hint) as tmp:
                write_checkpoint(tmp, model_sd, cfg, step=step, optim_sd=optim_sd, rngs=rngs,
                                 trainer_state=trainer_state, world_size=info.world_size, extra=extra)
            for old in list_checkpoints(run_dir)[:-cfg.train.keep_last]:
                _remove_checkpoint(old)
        except LatentLMError as e:  # disk full or read-only (publishing says so): the older ones are kept
            failure = str(e)
        except OSError as e:  # any other failed write (permissions, a vanished directory)
            failure = cannot_write(what, e, hint)
    raise_rank0_failure(failure, info)  # every rank learns whether rank 0 succeeded (instead of a barrier)
    return final


def write_checkpoint(directory: Path, model_sd: dict[str, torch.Tensor], cfg: Config, *, step: int,
                     optim_sd: dict[str, Any] | None = None, rngs: list[dict[str, torch.Tensor]] | None = None,
                     trainer_state: dict[str, Any] | None = None, world_size: int = 1,
                     extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fill ``directory`` (a scratch directory from :func:`~latentlm.fileio.publishing`) with checkpoint
    ``step`` of ``cfg``'s method and return its manifest.

    It always holds the weights ``model_sd`` (full state-dict keys; a tied head is left out) and the
    config. A resumable checkpoint adds the optimizer state, every rank's RNG state and the trainer
    state; without them it is weights-only (an imported model at step 0), which evaluates and
    initialises runs but does not resume. ``extra`` adds manifest keys; the file of a trained BPE
    that ``extra["tokenizer"]`` names by an absolute path is copied in (a relative path is one
    already in ``directory``), and every file already in ``directory`` (an imported tokenizer) is
    listed in the manifest too."""
    save_file({k: v.contiguous() for k, v in model_sd.items() if not (k == TIED_KEY and _tied(cfg))},
              str(directory / "model.safetensors"), metadata={"format": "latentlm", "method": cfg.train.method})
    if optim_sd is not None:  # through a Python file: a full disk is then an OSError, not torch's RuntimeError
        save_through(directory / "optimizer.pt", lambda f: torch.save(optim_sd, f))
    write_delay()
    if rngs is not None:
        rng = {f"rank{r}_{k}": v for r, s in enumerate(rngs) for k, v in s.items()}
        save_through(directory / "rng.pt", lambda f: torch.save(rng, f))
    if trainer_state is not None:
        (directory / "trainer_state.json").write_text(json.dumps(trainer_state, indent=2))
    extra = dict(extra or {})
    tokenizer = extra.get("tokenizer", {})
    if tokenizer.get("name") == "bpe" and Path(tokenizer["path"]).is_absolute():  # a trained BPE travels along
        shutil.copyfile(tokenizer["path"], directory / TOKENIZER_FILE)
        extra["tokenizer"] = {**tokenizer, "path": TOKENIZER_FILE}
    save_yaml(cfg, directory / "config.yaml")
    files = {}
    for f in sorted(p for p in directory.rglob("*") if p.is_file()):
        fsync_file(f)
        files[f.relative_to(directory).as_posix()] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    return CHECKPOINT_FORMAT.write(directory, {
        "torch_version": torch.__version__, "method": cfg.train.method, "step": step, "world_size": world_size,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "files": files, **extra})


def _remove_checkpoint(ckpt: Path) -> None:
    """Hide a checkpoint by renaming it before deleting it, so a kill mid-delete never leaves a
    ``step_*`` directory with a manifest but missing files."""
    hidden = ckpt.with_name(f".{ckpt.name}.old-{os.getpid()}")
    os.replace(ckpt, hidden)
    shutil.rmtree(hidden, ignore_errors=True)


def restore_training(ckpt: Path, module: torch.nn.Module, optimizer, cfg: Config, info: DistInfo) -> dict[str, Any]:
    """Load weights, optimizer and this rank's RNG state into a live run; return the trainer state."""
    manifest = read_manifest(ckpt)
    if manifest["method"] != cfg.train.method:
        raise LatentLMError(f"checkpoint {ckpt} was trained with method {manifest['method']!r}, "
                            f"not {cfg.train.method!r}; resume with --train.method {manifest['method']}")
    method = unwrap(module)
    state = method.upgrade_state_dict(load_model_state(ckpt, cfg.model))
    expected = set(method.state_dict())
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        what = f"lacks {missing[0]}" if missing else f"has {unexpected[0]}, which this model has not"
        raise LatentLMError(f"checkpoint {ckpt} {what} ({len(missing)} missing, {len(unexpected)} unexpected tensors); "
                            "it does not belong to this run's model: resume from another checkpoint or start a new run")
    opts = StateDictOptions(full_state_dict=True)
    set_model_state_dict(module, state, options=opts)
    set_optimizer_state_dict(module, optimizer, _load_tensors(ckpt / "optimizer.pt"), options=opts)
    rng = _load_tensors(ckpt / "rng.pt")
    key = f"rank{info.rank}_cpu"
    if key in rng:  # a different world size keeps fresh RNG streams on the new ranks
        torch.set_rng_state(rng[key])
        if torch.cuda.is_available() and f"rank{info.rank}_cuda" in rng:
            torch.cuda.set_rng_state(rng[f"rank{info.rank}_cuda"])
    return read_trainer_state(ckpt)


STATE_COUNTS = ("step", "tokens_seen", "skipped_steps")
LOADER_COUNTS = ("epoch", "cursor", "seed", "block_size", "batch_size_global")


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    """``trainer_state.json``, checked: its counters and data position are non-negative integers and its
    step is the one the directory is named after (a damaged or hand-edited file is one line, not a
    KeyError or a resumed run that logs the wrong steps)."""
    path = ckpt / "trainer_state.json"
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        state = None

    def counts(d: Any, keys: tuple[str, ...]) -> bool:
        return isinstance(d, dict) and all(type(d.get(k)) is int and d[k] >= 0 for k in keys)

    if not (counts(state, STATE_COUNTS) and counts(state.get("loader"), LOADER_COUNTS)):
        raise LatentLMError(f"{path} is damaged (it needs non-negative integers {', '.join(STATE_COUNTS)} and a "
                            "loader position); resume from an earlier checkpoint")
    if state["step"] != step_of(ckpt):
        raise LatentLMError(f"{path} records step {state['step']} but the checkpoint is {ckpt.name}; it is damaged, "
                            "resume from an earlier checkpoint")
    return state


def _load_tensors(path: Path) -> Any:
    """A ``torch.save`` file of tensors and plain containers; anything else (a pickle that would
    run code, a damaged file) is refused with one line."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError):
        raise LatentLMError(f"refusing to load {path}: it is damaged or holds objects other than tensors (loading "
                            "it could run code); resume from another checkpoint") from None
