"""Configuration: dataclasses, YAML files, dotted command-line overrides, validation.

A run is described by one :class:`Config` (model, data, train sections). It can be written as
YAML (``configs/*.yaml``) and every field can be overridden on the command line with its
dotted name (``--model.n_layer 4``). Everything is checked before any work starts: unknown
keys, wrong types and impossible values raise :class:`LatentLMError` with one line naming the
key, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin, get_type_hints

import yaml

from latentlm.errors import LatentLMError
from latentlm.fileio import write_text_atomic


@dataclass
class ModelConfig:
    """The transformer core. ``arch`` picks the SPEC section 0 preset; the ``None`` fields
    take that preset's value (gpt2: learned positions, LayerNorm, GELU, tied, biases;
    llama: RoPE, RMSNorm, SwiGLU, untied, no biases)."""

    arch: Literal["gpt2", "llama"] = "gpt2"
    vocab_size: int = 50257
    block_size: int = 1024  # longest sequence (in slots) the positions support
    n_layer: int = 12
    n_head: int = 12
    n_kv_head: int | None = None  # grouped-query attention; None = n_head
    n_embd: int = 768
    ffn_hidden: int | None = None  # None: 4d for GELU, 8d/3 rounded up to 64 for SwiGLU
    pos: Literal["learned", "rope"] | None = None
    norm: Literal["layernorm", "rmsnorm"] | None = None
    mlp: Literal["gelu", "swiglu"] | None = None
    tie_embeddings: bool | None = None
    bias: bool | None = None
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    dropout: float = 0.0
    embed_scale: float = 1.0  # multiplies token embeddings (PonderLM-2 uses sqrt(2.5 d))
    init_std: float = 0.02
    vocab_multiple: int = 64  # pad the embedding/head rows to a multiple of this for speed

    def resolved(self) -> "ModelConfig":
        """A copy with every preset-dependent ``None`` filled in."""
        gpt2 = self.arch == "gpt2"
        c = dataclasses.replace(self)
        c.pos = c.pos or ("learned" if gpt2 else "rope")
        c.norm = c.norm or ("layernorm" if gpt2 else "rmsnorm")
        c.mlp = c.mlp or ("gelu" if gpt2 else "swiglu")
        c.tie_embeddings = gpt2 if c.tie_embeddings is None else c.tie_embeddings
        c.bias = gpt2 if c.bias is None else c.bias
        c.n_kv_head = c.n_kv_head or c.n_head
        if c.ffn_hidden is None:
            c.ffn_hidden = 4 * c.n_embd if c.mlp == "gelu" else 64 * math.ceil(8 * c.n_embd / 3 / 64)
        return c

    @property
    def padded_vocab_size(self) -> int:
        m = self.vocab_multiple
        return m * math.ceil(self.vocab_size / m)

    def validate(self) -> None:
        _positive(self, "model", "vocab_size", "block_size", "n_layer", "n_head", "n_embd",
                  "vocab_multiple", "norm_eps", "rope_theta", "embed_scale", "init_std")
        if self.n_embd % self.n_head:
            raise LatentLMError(f"model.n_head={self.n_head} does not divide model.n_embd={self.n_embd}; "
                                "choose a head count that divides the width")
        kv = self.n_kv_head or self.n_head
        if kv <= 0 or self.n_head % kv:
            raise LatentLMError(f"model.n_kv_head={self.n_kv_head} must be positive and divide "
                                f"model.n_head={self.n_head}")
        r = self.resolved()
        if r.pos == "rope" and (self.n_embd // self.n_head) % 2:
            raise LatentLMError(f"RoPE needs an even head size, got n_embd/n_head = {self.n_embd // self.n_head}")
        if self.ffn_hidden is not None and self.ffn_hidden <= 0:
            raise LatentLMError(f"model.ffn_hidden={self.ffn_hidden} must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise LatentLMError(f"model.dropout={self.dropout} must be in [0, 1)")


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
    dist: Literal["none", "ddp", "fsdp2"] = "none"
    peak_flops: float = 0.0  # device peak FLOP/s for MFU; 0 = look it up (GPUs we know)
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "latentlm"
    progress: bool = True
    # Start the core model from this checkpoint's weights (any method; fresh optimizer; ignored on resume).
    init_from: str | None = None

    def validate(self) -> None:
        _positive(self, "train", "batch_size", "grad_accum", "max_steps", "lr", "keep_last",
                  "log_every", "max_bad_steps", "eval_batches")
        _non_negative(self, "train", "min_lr", "warmup_steps", "weight_decay", "grad_clip",
                      "eval_every", "ckpt_every", "eps", "peak_flops")
        if self.min_lr > self.lr:
            raise LatentLMError(f"train.min_lr={self.min_lr} is above train.lr={self.lr}; "
                                "the schedule decays from lr to min_lr")
        for k in ("beta1", "beta2"):
            if not 0.0 <= getattr(self, k) < 1.0:
                raise LatentLMError(f"train.{k}={getattr(self, k)} must be in [0, 1)")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise LatentLMError(f"train.device={self.device!r} is not one of auto, cpu, cuda, cuda:N")


@dataclass
class PonderConfig:
    """PonderLM-2 latent thoughts (``train.method ponder``, docs/PONDER.md). The paper's
    embedding scaling is not set here: pass ``--model.embed_scale`` (sqrt(2.5 d)) to ponder
    runs and their vanilla controls alike."""

    thoughts: int = 1  # K: latent thoughts per token before it predicts the next one
    train_iters_min: int = 2  # Jacobi iterations per optimizer step: uniform in [min, max]
    train_iters_max: int = 3
    eval_iters: int = 3  # Jacobi iterations in evaluation (eval_mode jacobi)
    eval_mode: Literal["jacobi", "exact"] = "jacobi"  # exact: sequential thoughts via the KV cache
    # Activation checkpointing: pass = keep each pass's inputs, block = each block's inputs; recompute in backward.
    checkpoint: Literal["none", "pass", "block"] = "none"
    # How generation fills the cache for a prompt: exact = sequential; jacobi = eval_iters parallel
    # Jacobi iterations over the whole prompt, faster for long prompts, exact for the first
    # 1 + floor(eval_iters / K) prompt positions.
    prefill: Literal["exact", "jacobi"] = "exact"

    def validate(self) -> None:
        _positive(self, "ponder", "thoughts", "train_iters_min", "eval_iters")
        if self.train_iters_max < self.train_iters_min:
            raise LatentLMError(f"ponder.train_iters_max={self.train_iters_max} is below "
                                f"ponder.train_iters_min={self.train_iters_min}; n is drawn from [min, max]")


@dataclass
class CocomixConfig:
    """CoCoMix and the baselines of its paper (SPEC section 2; docs/COCOMIX.md)."""

    teacher: str = ""  # latentlm run dir, Hugging Face dir, .gguf file, or "smollm2"
    teacher_layer: int = 5  # the SAE reads the residual stream after this block (0-based)
    sae: str = ""  # SAE directory written by `latentlm sae train`
    labels: str = ""  # label cache from `latentlm concepts label`; empty = compute on the fly
    k_attr: int = 4  # concept labels per token
    acts: Literal["post", "pre"] = "post"  # attribution x post-TopK latents (official) or pre-activations
    select: Literal["attribution", "activation"] = "attribution"  # activation = the ablation
    insert_layer: int = 3  # the student block whose input receives the continuous concepts
    n_concepts: int = 0  # C (0 = from the SAE); stored so checkpoints load without the SAE
    k_concepts: int = 0  # TopK of the predicted concepts (0 = the SAE's k)
    concept_weight: float = 0.1  # lambda of the concept loss
    mix: Literal["interleave", "add", "none"] = "interleave"  # none = concept loss only
    concept_loss: bool = True  # false = insertion only
    concept_chunk: int = 2048  # tokens per chunk of the C-way concept cross-entropy
    kd_weight: float = 0.1  # lambda_KD of knowledge distillation
    kd_temperature: float = 1.0

    def validate(self) -> None:
        _non_negative(self, "cocomix", "teacher_layer", "insert_layer", "n_concepts", "k_concepts",
                      "concept_weight", "kd_weight")
        _positive(self, "cocomix", "k_attr", "concept_chunk", "kd_temperature")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    ponder: PonderConfig = field(default_factory=PonderConfig)
    cocomix: CocomixConfig = field(default_factory=CocomixConfig)

    @property
    def seq_len(self) -> int:
        return self.data.seq_len or self.model.block_size

    def validate(self) -> "Config":
        self.model.validate()
        self.data.validate()
        self.train.validate()
        self.ponder.validate()
        self.cocomix.validate()
        from latentlm.methods import METHODS  # late import: methods import the model

        if self.train.method not in METHODS:
            raise LatentLMError(f"train.method={self.train.method!r} is not one of {sorted(METHODS)}")
        if self.seq_len > self.model.block_size:
            raise LatentLMError(f"data.seq_len={self.seq_len} exceeds model.block_size={self.model.block_size}; "
                                "lower data.seq_len or raise model.block_size")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Loading, overrides and type checking


def _positive(obj: Any, section: str, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if not v > 0:
            raise LatentLMError(f"{section}.{n}={v} must be positive")


def _non_negative(obj: Any, section: str, *names: str) -> None:
    for n in names:
        v = getattr(obj, n)
        if not v >= 0:
            raise LatentLMError(f"{section}.{n}={v} must be >= 0")


def _type_name(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if get_origin(tp) in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    return "null" if tp is type(None) else getattr(tp, "__name__", str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Return ``value`` as type ``tp`` or raise a one-line error naming ``key``."""
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        for arm in get_args(tp):
            try:
                return _coerce(key, value, arm)
            except LatentLMError:
                pass
    elif origin is Literal:
        if value in get_args(tp):
            return value
    elif tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    raise LatentLMError(f"config key {key}={value!r} has the wrong type: expected {_type_name(tp)}")


def _build(cls: type, data: dict[str, Any], prefix: str) -> Any:
    if not isinstance(data, dict):
        raise LatentLMError(f"config section {prefix.rstrip('.') or 'root'} must be a mapping, got {data!r}")
    hints = get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for k, v in data.items():
        if k not in names:
            raise LatentLMError(f"unknown config key '{prefix}{k}'; allowed keys: {', '.join(names)}")
        tp = hints[k]
        if dataclasses.is_dataclass(tp):
            kwargs[k] = _build(tp, v, f"{prefix}{k}.")
        else:
            kwargs[k] = _coerce(f"{prefix}{k}", v, tp)
    return cls(**kwargs)


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_overrides(args: list[str]) -> dict[str, Any]:
    """Turn ``["--model.n_layer", "4", "--train.lr=3e-4"]`` into a nested dict.

    Values are parsed as YAML scalars, so ``4`` is an int, ``3e-4`` a float, ``true`` a bool
    and ``null`` None.
    """
    out: dict[str, Any] = {}
    i = 0
    while i < len(args):
        a = args[i]
        if not a.startswith("--") or "." not in a:
            raise LatentLMError(f"unexpected argument {a!r}; config overrides look like --section.key VALUE")
        if "=" in a:
            key, raw = a[2:].split("=", 1)
            i += 1
        else:
            if i + 1 >= len(args):
                raise LatentLMError(f"override {a} has no value; write {a} VALUE")
            key, raw = a[2:], args[i + 1]
            i += 2
        value = _parse_scalar(raw)
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise LatentLMError(f"override --{key} conflicts with another override of {p}")
        node[parts[-1]] = value
    return out


def _parse_scalar(raw: str) -> Any:
    try:
        v = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    # YAML 1.1 reads "1e-4" as a string; accept the usual float spellings.
    if isinstance(v, str):
        try:
            return float(v)
        except ValueError:
            return v
    return v


def load_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise LatentLMError(f"config file {p} does not exist")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise LatentLMError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(data, dict):
        raise LatentLMError(f"config file {p} must hold a mapping of sections (model:, data:, train:)")
    return _fix_yaml_floats(data)


def _fix_yaml_floats(d: Any) -> Any:
    if isinstance(d, dict):
        return {k: _fix_yaml_floats(v) for k, v in d.items()}
    if isinstance(d, str):
        return _parse_scalar(d) if _looks_like_float(d) else d
    return d


def _looks_like_float(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return s.strip().lower() not in ("nan", "inf", "-inf", "infinity", "-infinity")


def make_config(path: str | Path | None = None, overrides: list[str] | dict | None = None,
                base: dict | None = None) -> Config:
    """Build and validate a :class:`Config` from defaults <- ``base`` <- YAML file <- overrides."""
    data: dict[str, Any] = base or {}
    if path is not None:
        data = _merge(data, load_yaml(path))
    if overrides:
        data = _merge(data, parse_overrides(overrides) if isinstance(overrides, list) else overrides)
    return _build(Config, data, "").validate()


def config_from_dict(data: dict[str, Any]) -> Config:
    """Rebuild a config saved with :meth:`Config.to_dict` (e.g. from a checkpoint)."""
    return _build(Config, data, "").validate()


def save_yaml(cfg: Config, path: str | Path) -> None:
    write_text_atomic(path, yaml.safe_dump(cfg.to_dict(), sort_keys=False))
