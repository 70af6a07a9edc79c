"""Reading checkpoints without training state: find and verify them, their saved config, the
core model's weights, and what the method that wrote them can do.

Below the methods and the trainer in the import graph, so teachers, warm starts, export and
evaluation read checkpoints without depending on ``train/``. Building the full method from a
checkpoint is :func:`latentlm.loading.load_method`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import yaml

from latentlm.errors import LatentLMError
from latentlm.model.config import ModelConfig
from latentlm.model.transformer import Transformer
from latentlm.settings import build

# Manifests of format 1 (latentlm 0.2) record no capabilities; these are what their methods could do.
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
    from latentlm.train.checkpoint import load_model_state, read_manifest, resolve_checkpoint

    ckpt = resolve_checkpoint(path)
    manifest = read_manifest(ckpt)
    if not capabilities(manifest).get("plain_lm"):
        raise LatentLMError(f"{ckpt} was trained with method {manifest.get('method')!r}, which is not a plain "
                            "next-token model; use a checkpoint of one (e.g. train.method ntp)")
    cfg = build(ModelConfig, saved_config(ckpt)["model"], "model.")
    model = Transformer(cfg)
    state = load_model_state(ckpt, cfg)
    core = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    model.load_state_dict(core, strict=True)
    return model.to(device), manifest, ckpt
