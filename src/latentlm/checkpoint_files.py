"""Reading checkpoints without training state: find and verify them, their saved config, the
core model's weights, and what the method that wrote them can do.

Below the methods and the trainer in the import graph, so teachers, warm starts, export and
evaluation read checkpoints without depending on ``train/``. Building the full method from a
checkpoint is :func:`latentlm.loading.load_method`.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch
import yaml
from safetensors import SafetensorError
from safetensors.torch import load_file

from latentlm.errors import LatentLMError
from latentlm.fileio import ManifestFormat, sha256_file
from latentlm.model.config import ModelConfig
from latentlm.model.transformer import Transformer
from latentlm.settings import build

FORMAT_VERSION = 1
CHECKPOINT_FORMAT = ManifestFormat("latentlm-checkpoint", FORMAT_VERSION, "a latentlm checkpoint",
                                   "pass another checkpoint, or train or import this one again with this latentlm",
                                   legacy_version_key="format")  # older checkpoints: {"format": 1}
TOKENIZER_FILE = "tokenizer.json"
TIED_KEY = "model.lm_head.weight"  # equal to model.wte.weight when embeddings are tied
_STEP_DIR = re.compile(r"^step_(\d{8})$")


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if _STEP_DIR.match(p.name) and (p / "manifest.json").is_file()]
    return sorted(found, key=step_of)


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def step_of(ckpt: Path) -> int:
    """The optimizer step a ``step_*`` directory holds."""
    return int(_STEP_DIR.match(ckpt.name).group(1))


def read_manifest(ckpt: Path, verify: bool = True) -> dict[str, Any]:
    """The checkpoint's manifest, after checking every file it lists (size and sha256). Checkpoints of
    older latentlm (``"format": 1``) come back with ``format_version`` 1."""
    manifest = CHECKPOINT_FORMAT.read(ckpt)
    if not isinstance(manifest.get("files"), dict):
        raise LatentLMError(f"{ckpt / 'manifest.json'} lists no files; the checkpoint is damaged, use an earlier one")
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


def load_model_state(ckpt: Path, model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The checkpoint's weights (method keys; the core under ``model.``), tied head restored."""
    try:
        sd = load_file(str(ckpt / "model.safetensors"))
    except SafetensorError as e:
        raise LatentLMError(f"cannot read {ckpt / 'model.safetensors'} ({str(e).splitlines()[0]}); the checkpoint "
                            "is damaged, use an earlier one") from None
    if model_cfg.resolved().tie_embeddings and "model.wte.weight" in sd:
        sd[TIED_KEY] = sd["model.wte.weight"]
    return sd


DAMAGED_CONFIG = "its config.yaml does not describe these weights: the checkpoint is damaged, use an earlier one"


def check_state_fits(ckpt: Path, state: dict[str, torch.Tensor], module: torch.nn.Module,
                     hint: str = DAMAGED_CONFIG) -> None:
    """One line, instead of ``load_state_dict``'s many, unless ``state`` holds exactly ``module``'s
    tensors with their shapes (``hint`` says what to do)."""
    wanted = module.state_dict()
    missing, extra = sorted(set(wanted) - set(state)), sorted(set(state) - set(wanted))
    if missing or extra:
        first = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which the model has not"
        raise LatentLMError(f"checkpoint {ckpt} {first} ({len(missing)} missing, {len(extra)} unexpected tensors); {hint}")
    for name, t in wanted.items():
        if state[name].shape != t.shape:
            raise LatentLMError(f"checkpoint {ckpt}: {name} has shape {tuple(state[name].shape)}, the model "
                                f"{tuple(t.shape)}; {hint}")


# Checkpoints of latentlm 0.1 record no capabilities; these are what their methods could do.
FORMAT1_CAPABILITIES: dict[str, dict[str, bool]] = {
    "ntp": {"plain_lm": True}, "kd": {"plain_lm": True},
    "cocomix": {"has_concepts": True, "needs_teacher": True, "needs_concept_labels": True},
    "kd_pause": {"needs_teacher": True},
}


def capabilities(manifest: dict[str, Any]) -> dict[str, Any]:
    """The capabilities the checkpoint's method declared (:meth:`Method.capabilities`)."""
    caps = manifest.get("capabilities")
    if isinstance(caps, dict):
        return caps
    return dict(FORMAT1_CAPABILITIES.get(manifest.get("method"), {}))


def saved_config(ckpt: Path) -> dict[str, Any]:
    """The checkpoint's ``config.yaml`` as a mapping (validated when a run config is built from it)."""
    try:
        data = yaml.safe_load((ckpt / "config.yaml").read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError, UnicodeDecodeError):
        raise LatentLMError(f"{ckpt / 'config.yaml'} is missing or not valid YAML; the checkpoint is damaged, "
                            "use an earlier one") from None
    if not isinstance(data, dict) or not isinstance(data.get("model"), dict):
        raise LatentLMError(f"{ckpt / 'config.yaml'} has no model section; the checkpoint is damaged, use an earlier one")
    return data


def load_core(path: str | Path, device: str | torch.device = "cpu"
              ) -> tuple[Transformer, dict[str, Any], Path]:
    """The core transformer of a plain-LM checkpoint (a run directory or ``step_*``), its manifest and
    directory: what a teacher or a warm start needs, without building the method. A checkpoint whose
    method is not a plain next-token LM (thoughts, concepts, pauses...) is refused: its core alone is
    not the model that was trained."""
    ckpt = resolve_checkpoint(path)
    manifest = read_manifest(ckpt)
    if not capabilities(manifest).get("plain_lm"):
        raise LatentLMError(f"{ckpt} was trained with method {manifest.get('method')!r}, which is not a plain "
                            "next-token model; use a checkpoint of one (e.g. train.method ntp)")
    cfg = build(ModelConfig, saved_config(ckpt)["model"], "model.")
    model = Transformer(cfg)
    state = load_model_state(ckpt, cfg)
    core = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    check_state_fits(ckpt, core, model)
    model.load_state_dict(core, strict=True)
    return model.to(device), manifest, ckpt
