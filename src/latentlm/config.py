"""The run configuration: the core sections and every registered method's own sections.

A run is described by one :class:`Config`: ``model`` (:class:`~latentlm.model.config.ModelConfig`),
``data``, ``train``, and a section per settings block the registered methods declare
(``ponder:``, ``cocomix:``, ``teacher:``, ...; :attr:`Method.sections`). It can be written as YAML
(the presets in ``latentlm/configs``, listed by ``latentlm configs``) and every field can be overridden on the command line with its dotted name
(``--model.n_layer 4``). Everything is checked before any work starts: unknown keys, wrong types
and impossible values raise :class:`LatentLMError` with one line naming the key, the value and
what is allowed. The typed-settings machinery itself is :mod:`latentlm.settings`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from latentlm.devices import check_device_name
from latentlm.errors import LatentLMError
from latentlm.fileio import write_text_atomic
from latentlm.methods import method_class, section_types
from latentlm.methods.legacy import renamed_keys, saved_defaults, upgrade_config
from latentlm.model.config import ModelConfig
from latentlm.presets import config_path
from latentlm.settings import build, check_seed, load_yaml, merge, non_negative, parse_overrides, positive

__all__ = ["Config", "DataConfig", "ModelConfig", "TrainConfig", "config_from_dict", "make_config",
           "parse_overrides", "save_yaml"]

CORE = ("model", "data", "train")


@dataclass
class DataConfig:
    """Where the prepared token shards are (``latentlm prepare`` writes them)."""

    path: str = "data/wiki-gpt2"
    seq_len: int | None = None  # training window in tokens; None = model.block_size
    verify: Literal["sha256", "size"] = "sha256"  # shard check at start; size is instant on huge corpora

    def validate(self) -> None:
        if self.seq_len is not None and self.seq_len <= 0:
            raise LatentLMError(f"data.seq_len={self.seq_len} must be positive")


@dataclass
class TrainConfig:
    """The trainer: optimisation, schedule, evaluation, checkpoints, devices."""

    method: str = "ntp"
    out_dir: str = "runs/default"
    seed: int = 1337
    batch_size: int = 8  # sequences per micro-batch per process
    grad_accum: int = 1  # micro-batches per optimizer step
    max_steps: int = 1000  # optimizer steps
    lr: float = 6e-4
    min_lr: float = 6e-5
    warmup_steps: int = 100
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0  # 0 disables clipping
    eval_every: int = 200  # 0 disables periodic evaluation (the final one still runs)
    eval_batches: int = 20
    ckpt_every: int = 500  # 0 = only at the end
    keep_last: int = 3
    log_every: int = 10
    max_bad_steps: int = 5  # consecutive non-finite steps before stopping
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # auto: bf16 autocast on CUDA
    compile: bool = False
    # Head losses (and CoCoMix's concept cross-entropy) in chunks, gradients formed in the forward, no
    # [N, V] logits kept (model/losses.py); the same values as the plain computation, float rounding
    # aside. A config saved before this key existed loads with false: the old computation, bit for bit.
    fused_loss: bool = True
    dist: Literal["none", "ddp", "fsdp2"] = "none"
    peak_flops: float = 0.0  # device peak FLOP/s for MFU; 0 = look it up (GPUs we know)
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "latentlm"
    progress: bool = True
    # Start the core model from this checkpoint's weights (any method; fresh optimizer; ignored on resume).
    init_from: str | None = None

    def validate(self) -> None:
        positive(self, "train", "batch_size", "grad_accum", "max_steps", "lr", "keep_last",
                  "log_every", "max_bad_steps", "eval_batches")
        non_negative(self, "train", "min_lr", "warmup_steps", "weight_decay", "grad_clip",
                      "eval_every", "ckpt_every", "eps", "peak_flops")
        if self.min_lr > self.lr:
            raise LatentLMError(f"train.min_lr={self.min_lr} is above train.lr={self.lr}; "
                                "the schedule decays from lr to min_lr")
        for k in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, k) < 1.0:
                raise LatentLMError(f"train.{k}={getattr(self, k)} must be in [0, 1)")
        check_device_name(self.device, "train.device")
        check_seed(self.seed, "train.seed")


@dataclass
class Config:
    """``model``, ``data``, ``train`` and the method sections (``cfg.ponder``, ``cfg.teacher``, ...).

    Every registered section is present with its defaults unless set; :meth:`to_dict` (what a run
    saves) keeps the core sections and those of the run's method.
    """

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    sections: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, cls in section_types().items():
            self.sections.setdefault(name, cls())

    def __getattr__(self, name: str) -> Any:
        # Only reached for names that are not attributes: the method sections.
        sections = self.__dict__.get("sections")
        if sections is None or name.startswith("_"):
            raise AttributeError(name)
        if name not in sections:
            types = section_types()  # a method registered after this config was built
            if name not in types:
                raise AttributeError(f"config has no section {name!r}; sections: {', '.join(self.section_names())}")
            sections[name] = types[name]()
        return sections[name]

    def section_names(self) -> list[str]:
        return [*CORE, *sorted(set(self.sections) | set(section_types()))]

    @property
    def seq_len(self) -> int:
        return self.data.seq_len or self.model.block_size

    def validate(self) -> "Config":
        self.model.validate()
        self.data.validate()
        self.train.validate()
        method = method_class(self.train.method)  # a one-line error for an unknown method
        for name in method.sections:
            getattr(self, name)  # a section registered after this config was built
        for settings in self.sections.values():
            settings.validate()
        if self.seq_len > self.model.block_size:
            raise LatentLMError(f"data.seq_len={self.seq_len} exceeds model.block_size={self.model.block_size}; "
                                "lower data.seq_len or raise model.block_size")
        return self

    def to_dict(self) -> dict[str, Any]:
        """The core sections and the run method's own sections, as plain data."""
        out = {k: dataclasses.asdict(getattr(self, k)) for k in CORE}
        for name in method_class(self.train.method).sections:
            out[name] = dataclasses.asdict(getattr(self, name))
        return out


def _from_dict(data: dict[str, Any]) -> Config:
    if not isinstance(data, dict):
        raise LatentLMError(f"a config must be a mapping of sections, got {type(data).__name__}")
    types = section_types()
    core, sections = {}, {}
    for key, value in data.items():
        if key in CORE:
            core[key] = value
        elif key in types:
            sections[key] = build(types[key], value, f"{key}.")
        else:
            raise LatentLMError(f"unknown config key '{key}'; allowed sections: {', '.join([*CORE, *sorted(types)])}")
    cfg = build(Config, core, "")
    cfg.sections.update(sections)
    return cfg.validate()


def make_config(path: str | Path | None = None, overrides: list[str] | dict | None = None,
                base: dict | None = None) -> Config:
    """Build and validate a :class:`Config` from defaults <- ``base`` <- YAML file <- overrides."""
    data: dict[str, Any] = base or {}
    if path is not None:
        data = merge(data, load_yaml(config_path(path)))
    if overrides:
        data = merge(data, parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    moved = renamed_keys(data)
    if moved:
        old, new = moved[0]
        raise LatentLMError(f"config key {old} moved to {' / '.join(new)} (each method owns its section now); "
                            "rename it in your config")
    return _from_dict(data)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a config saved with :meth:`Config.to_dict` (e.g. from a checkpoint; 0.1 layouts are
    upgraded to today's sections)."""
    return _from_dict(saved_defaults(upgrade_config(data)) if isinstance(data, dict) else data)


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else {f"{prefix}{k}": v})
    return out


def config_differences(saved: Config, wanted: Config) -> list[tuple[str, Any, Any]]:
    """``[(dotted key, saved value, wanted value)]`` for every setting where two run configs differ
    (the core sections and both methods' sections), sorted by key."""
    a, b = _flat(saved.to_dict()), _flat(wanted.to_dict())
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]


def save_yaml(cfg: Config, path: str | Path) -> None:
    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
