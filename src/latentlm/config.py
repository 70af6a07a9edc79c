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
import json
import shutil
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from latentlm.devices import check_device_name
from latentlm.errors import LatentLMError
from latentlm.fileio import MANIFEST_FILE, write_text_atomic
from latentlm.methods import method_class, methods, section_types
from latentlm.methods.legacy import renamed_keys, upgrade_config
from latentlm.model.config import GPT2_VOCAB, ModelConfig
from latentlm.presets import config_path
from latentlm.settings import (build, check_seed, describe_fields, load_yaml, merge, non_negative, parse_overrides,
                               positive, setting, yaml_scalar)

__all__ = ["Config", "DataConfig", "ModelConfig", "TrainConfig", "config_from_dict", "config_reference", "make_config",
           "parse_overrides", "save_yaml", "show_config"]

CORE = ("model", "data", "train")


@dataclass
class DataConfig:
    """Where the prepared token shards are (``latentlm prepare`` writes them)."""

    path: str = setting("data/wiki-gpt2", "prepared data directory (`latentlm prepare --out`)")
    seq_len: int | None = setting(None, "training window in tokens; null = model.block_size")
    verify: Literal["sha256", "size"] = setting("sha256", "shard check at start; size is instant on huge corpora")
    shift_windows: bool = setting(False, "shift every training window by a random offset in [0, seq_len] each epoch "
                                         "(the CoCoMix authors' loader); false = fixed windows (a label cache needs them)")

    def validate(self) -> None:
        if self.seq_len is not None and self.seq_len <= 0:
            raise LatentLMError(f"data.seq_len={self.seq_len} must be positive")


@dataclass
class TrainConfig:
    """The trainer: optimisation, schedule, evaluation, checkpoints, devices."""

    method: str = setting("ntp", "the training method (each method's own sections are below)")
    out_dir: str = setting("runs/default", "run directory: config.yaml, metrics.jsonl, checkpoints/, final.json")
    seed: int = setting(1337, "seed of the initial weights, the data order and dropout")
    batch_size: int = setting(8, "sequences per micro-batch per process")
    grad_accum: int = setting(1, "micro-batches per optimizer step")
    max_steps: int = setting(1000, "optimizer steps of the whole run")
    lr: float = setting(6e-4, "peak learning rate (after warm-up)")
    min_lr: float = setting(6e-5, "learning rate at max_steps (cosine decay from lr)")
    warmup_steps: int = setting(100, "linear warm-up steps")
    weight_decay: float = setting(0.1, "AdamW weight decay (matrices only)")
    weight_decay_params: Literal["matrices", "all"] = setting("matrices", "which parameters decay: matrices (dim >= 2) "
                                                              "or all (every parameter, as the CoCoMix authors' AdamW)")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2")
    eps: float = setting(1e-8, "AdamW epsilon")
    grad_clip: float = setting(1.0, "global gradient-norm clip; 0 disables clipping")
    eval_every: int = setting(200, "steps between validations; 0 = only the final one")
    eval_batches: int = setting(20, "global batches of held-out windows per validation")
    ckpt_every: int = setting(500, "steps between checkpoints; 0 = only at the end")
    keep_last: int = setting(3, "checkpoints kept (older ones are deleted)")
    log_every: int = setting(10, "steps between metrics.jsonl records")
    max_bad_steps: int = setting(5, "consecutive non-finite steps before the run stops")
    device: str = setting("auto", "auto (CUDA if available, else CPU), cpu, cuda or cuda:N")
    dtype: Literal["auto", "float32", "bfloat16"] = setting("auto", "auto = bf16 autocast on CUDA, float32 on CPU")
    compile: bool = setting(False, "wrap the method in torch.compile")
    fused_loss: bool = setting(True, "head losses (and CoCoMix's concept CE) in chunks with gradients formed in the "
                               "forward, no [N, V] logits kept (model/losses.py); false = the plain computation")
    dist: Literal["none", "ddp", "fsdp2"] = setting("none", "data parallelism under torchrun")
    peak_flops: float = setting(0.0, "device peak FLOP/s for MFU; 0 = look it up (GPUs we know)")
    tensorboard: bool = setting(False, "also log to TensorBoard (RUN/tensorboard)")
    wandb: bool = setting(False, "also log to Weights & Biases (WANDB_MODE=offline honoured)")
    wandb_project: str = setting("latentlm", "W&B project name")
    progress: bool = setting(True, "show a progress bar")
    init_from: str | None = setting(None, "start the core model from this checkpoint's weights (any method; "
                                          "fresh optimizer; ignored on resume)")

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
    # Settings filled in from the run's inputs rather than given: dotted key -> where the value came from.
    # The trainer takes them again from the inputs it trains on (see :func:`derive_vocab_size`).
    derived: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

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
    derive_vocab_size(cfg)
    return cfg.validate()


VOCAB_KEY = "model.vocab_size"


def _manifest_vocab(manifest: Any) -> int | None:
    tok = manifest.get("tokenizer") if isinstance(manifest, dict) else None
    v = tok.get("vocab_size") if isinstance(tok, dict) else None
    return v if isinstance(v, int) and not isinstance(v, bool) and v > 0 else None


def derive_vocab_size(cfg: Config, manifest: dict[str, Any] | None = None) -> None:
    """Fill ``model.vocab_size`` when the config leaves it null: the vocabulary of the data's tokenizer
    (``manifest``, else ``data.path/manifest.json``), or GPT-2's 50257 while there is no data to read.
    A value filled in this way is taken again from the data the trainer loads (a config may be built
    before its data exists, or get another ``data.path``); an explicit value is left alone (the trainer
    refuses one that does not match the data). Either way the config a run saves is concrete."""
    if cfg.model.vocab_size is not None and VOCAB_KEY not in cfg.derived:
        return
    where = Path(cfg.data.path) / MANIFEST_FILE
    if manifest is None:
        try:
            manifest = json.loads(where.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError):
            manifest = None  # no data yet, or damaged: the trainer's own manifest check says which
    vocab = _manifest_vocab(manifest)
    if vocab is None:
        cfg.model.vocab_size = GPT2_VOCAB
        cfg.derived[VOCAB_KEY] = f"GPT-2's (no {where} to read yet; the data's is taken at train time)"
    else:
        cfg.model.vocab_size = vocab
        cfg.derived[VOCAB_KEY] = f"from {where}"


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
    if isinstance(data, dict):
        data = upgrade_config(data)
        if isinstance(data.get("model"), dict) and data["model"].get("vocab_size") is None:
            # A saved config is concrete; one without a vocabulary (hand-written) keeps the default of
            # the version that wrote it, GPT-2's, rather than being re-derived from its data.
            data = {**data, "model": {**data["model"], "vocab_size": GPT2_VOCAB}}
    return _from_dict(data)


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


# --- what `--help` and `latentlm config show` print -------------------------------------------------

CORE_TITLES = {"model": "the transformer core", "data": "the prepared token shards", "train": "the trainer"}


def section_classes() -> dict[str, tuple[type, str]]:
    """Every config section in help order, ``name -> (settings dataclass, title)``: the core sections,
    then each registered method's sections in registration order, titled by the methods that own them."""
    core = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
    out: dict[str, tuple[type, str]] = {k: (core[k], CORE_TITLES[k]) for k in CORE}
    owners: dict[str, list[str]] = {}
    for name, cls in methods().items():
        for section in cls.sections:
            owners.setdefault(section, []).append(name)
    types = section_types()
    for section, names in owners.items():
        if section in types:
            out[section] = (types[section], ("method " if len(names) == 1 else "methods ") + ", ".join(names))
    return out


def config_reference(width: int | None = None) -> str:
    """Every config key with its type, default and one-line doc, grouped by section (what ``train
    --help`` and ``flops --help`` print after their options): a table on a wide terminal, two lines a
    key on a narrow one."""
    width = width or max(70, shutil.get_terminal_size().columns - 2)  # argparse's width
    names = ", ".join(methods())
    rows = [(section, title, [(f"--{section}.{name} {tp}", yaml_scalar(default),
                               f"{doc}: {names}" if (section, name) == ("train", "method") else doc)
                              for name, tp, default, doc in describe_fields(cls)])
            for section, (cls, title) in section_classes().items()]
    key_w = min(36, max(len(k) for _, _, fields in rows for k, _, _ in fields))
    def_w = min(12, max(len(d) for _, _, fields in rows for _, d, _ in fields))
    indent = 2 + key_w + 2 + def_w + 2
    table = width - indent >= 40
    lines = ["config keys: --SECTION.KEY VALUE on the command line, or SECTION: {KEY: VALUE} in a --config YAML "
             "file; values are read as YAML (4, 3e-4, true, null). `latentlm config show` prints the resolved "
             "config, `latentlm configs` the presets."
             + (" Columns: key and type, default, meaning." if table else "")]
    for section, title, fields in rows:
        lines += ["", f"{section}: ({title})"]
        for key, default, doc in fields:
            if not table:
                lines.append(f"  {key}  (default: {default})")
                lines += textwrap.wrap(doc, width, initial_indent=" " * 6, subsequent_indent=" " * 6)
                continue
            head = f"  {key:<{key_w}}  {default:<{def_w}}  "
            if len(key) > key_w or len(default) > def_w:  # a long one gets a line of its own
                lines.append(f"  {key}  {default}")
                head = " " * indent
            wrapped = textwrap.wrap(doc, width - indent) or [""]
            lines += [head + wrapped[0], *(" " * indent + w for w in wrapped[1:])]
    return "\n".join(lines)


def _non_default(cfg: Config) -> dict[str, Any]:
    """The dotted keys of ``cfg.to_dict()`` whose value is not the settings class's default."""
    out = {}
    for section, values in cfg.to_dict().items():
        defaults = dataclasses.asdict(type(getattr(cfg, section))())
        out.update({f"{section}.{k}": v for k, v in values.items() if defaults.get(k) != v})
    return out


def config_summary(cfg: Config) -> str:
    """``key=value`` of every setting of ``cfg`` that is not its default, with where derived ones came from
    (the trainer's start line; the full config is the run's ``config.yaml``)."""
    parts = []
    for key, value in _non_default(cfg).items():
        text = f"{key}={yaml_scalar(value)}"
        if key in cfg.derived:
            text += f" ({cfg.derived[key]})"
        parts.append(text)
    return " ".join(parts) or "all defaults"


def show_config(cfg: Config) -> str:
    """The config ``cfg`` as ``latentlm train`` would run it, as YAML (usable as a ``--config`` file) after
    a header of comments saying which values were derived, from what, and what the method derives only
    at train time (e.g. from an SAE that is not there yet)."""
    notes = [f"#   {k}: {v}" for k, v in cfg.derived.items()]
    before = _flat(cfg.to_dict())
    pending = ""
    try:
        method_class(cfg.train.method).resolve_config(cfg)  # reads what the method derives from (an SAE)
    except LatentLMError as e:
        pending = f"# derived at train time, not now (train.method {cfg.train.method}): {e}"
    after = _flat(cfg.to_dict())
    notes += [f"#   {k}: from the inputs of train.method {cfg.train.method}" for k in after
              if before.get(k) != after[k] and k not in cfg.derived]
    header = ["# the config `latentlm train` runs with these arguments (a valid --config file)"]
    if notes:
        header += ["# derived, not given:", *notes]
    if pending:
        header.append(pending)
    return "\n".join(header) + "\n" + yaml.safe_dump(cfg.to_dict(), sort_keys=False)
