"""Frozen teacher LMs for distillation and concept extraction (CoCoMix, docs/METHODS.md §2.1).

A :class:`Teacher` exposes the residual stream after one chosen block and, for attribution,
the gradient of its own next-token loss with respect to that residual stream. Two kinds:

* :class:`LatentLMTeacher`: a checkpoint of our own core (an ``ntp`` run);
* :class:`HFTeacher`: a Hugging Face causal LM from a local directory or a GGUF file
  (dequantized by ``transformers``; needs ``pip install 'latentlm[hf]'``).

:func:`load_teacher` picks the kind from a spec string. Teachers are always frozen (no
parameter requires grad, eval mode), so gradients never accumulate in their weights, and
every returned tensor is float32 whatever the compute dtype. A teacher computes in its own dtype
(``teacher.dtype``: float32 by default, as the authors' teacher, which runs outside autocast) with
autocast switched off, so a bf16 training context never lowers its precision.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import re
import sys
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from latentlm.checkpoint_files import load_core, resolve_checkpoint, saved_config
from latentlm.data.prepare import tokenizer_for
from latentlm.data.tokenizers import HFTokenizer, Tokenizer, gguf_path, require_hf, smollm2_gguf
from latentlm.errors import LatentLMError
from latentlm.fileio import sha256_file
from latentlm.gguf_cache import convert_gguf
from latentlm.model.config import ModelConfig
from latentlm.presets import config_path
from latentlm.model.hf import hf_model_config
from latentlm.model.transformer import Transformer
from latentlm.settings import Settings, build, load_yaml, setting



@dataclasses.dataclass
class TeacherSettings(Settings):
    """The ``teacher:`` config section: a reusable block read by every method that declares it
    (KD and CoCoMix among the built-ins), so methods never borrow each other's sections."""

    section = "teacher"
    path: str = setting("", "the frozen teacher: a latentlm run/checkpoint of a plain LM, a Hugging Face dir, "
                            "a .gguf file, or smollm2")
    dtype: Literal["float32", "bfloat16", "auto"] = setting("float32", "the teacher's compute dtype: float32 = the "
                                                            "authors' (outside autocast); auto = bfloat16 on CUDA, "
                                                            "float32 elsewhere (latentlm before the setting)")


TEACHER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def teacher_dtype(name: str | torch.dtype | None, device: str | torch.device) -> torch.dtype:
    """The torch dtype of a teacher dtype setting on ``device``: ``float32`` (also for None),
    ``bfloat16``, or ``auto`` (bfloat16 on CUDA, float32 elsewhere: what latentlm used before the
    setting existed). A torch dtype passes through."""
    if isinstance(name, torch.dtype):
        return name
    if name is None or name in TEACHER_DTYPES:
        return TEACHER_DTYPES[name or "float32"]
    if name == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    raise LatentLMError(f"teacher dtype {name!r} is not one of float32, bfloat16, auto")


def dtype_name(dtype: torch.dtype) -> str:
    """``"float32"`` / ``"bfloat16"`` (what label caches record)."""
    return str(dtype).removeprefix("torch.")


def _no_autocast(device: torch.device):
    """The teacher computes in its own dtype: an enclosing autocast (a bf16 training step) is off here."""
    return torch.autocast(device.type, enabled=False)


class _PerPositionGrad(TorchFunctionMode):
    """Inside it, attention lets a position's keys and values carry gradient only to that position's own
    query, so the backward of the summed loss gives, at every position t, d(loss_t)/d(input_t) alone.

    Forward values are unchanged. Why that isolates position t: in a causal transformer only attention
    moves information between positions, and stream t reaches other positions only through its keys and
    values; with those detached for every other query, the gradient reaching position t's input is the
    one of its own loss (other positions never feed back into stream t, by causality). Intercepts
    ``F.scaled_dot_product_attention`` (our core and Hugging Face's sdpa attention); ``calls`` counts the
    differentiable calls it rewrote, so a model whose attention bypasses SDPA is detected."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention:
            return func(*args, **kwargs)
        q, k, v = args[:3]
        if not (q.requires_grad or k.requires_grad or v.requires_grad):
            return func(*args, **kwargs)
        self.calls += 1
        return _self_grad_attention(q, k, v, *args[3:], **kwargs)


def _self_grad_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                         enable_gqa=False) -> torch.Tensor:
    """Attention equal to SDPA's in value, whose keys / values get gradient only from their own query."""
    T = q.shape[-2]
    if k.shape[-2] != T or dropout_p:
        raise LatentLMError("per-position attribution needs the teacher's plain self-attention over the whole "
                            "window (no cache, no dropout)")
    if k.shape[-3] != q.shape[-3]:  # grouped-query attention: one key/value head per group of queries
        rep = q.shape[-3] // k.shape[-3]
        k, v = k.repeat_interleave(rep, dim=-3), v.repeat_interleave(rep, dim=-3)
    k0, v0 = k.detach(), v.detach()
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k0.transpose(-1, -2)) * scale
    # + diag(q_t . (k_t - k0_t)): zero in value, the gradient of position t's own key
    scores = scores + torch.diag_embed((q * (k - k0)).sum(-1) * scale)
    if is_causal:
        scores = scores.masked_fill(~torch.ones(T, T, dtype=torch.bool, device=q.device).tril(), float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    p = scores.to(torch.promote_types(scores.dtype, torch.float32)).softmax(-1).to(q.dtype)
    return p @ v0 + p.diagonal(dim1=-2, dim2=-1).unsqueeze(-1) * (v - v0)


def _freeze(module: nn.Module) -> None:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)


def _ntp_loss_sum(logits: torch.Tensor, idx: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
    """Summed next-token loss in float32: over t < T-1 of CE(logits_t, idx[t+1]), or with ``targets``
    [B, T] (the window's next tokens, e.g. the loader's ``y``) over every t of CE(logits_t, targets_t)."""
    if targets is None:
        logits, targets = logits[:, :-1], idx[:, 1:]
    if targets.shape != logits.shape[:2]:
        raise LatentLMError(f"teacher targets {tuple(targets.shape)} do not fit the window {tuple(logits.shape[:2])}")
    return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1).to(logits.device),
                           reduction="sum")


class Teacher:
    """A frozen LM: residual stream after block ``layer`` (0-based) and its NTP-loss gradient.

    Subclasses set ``d_model``, ``n_layer``, ``tokenizer``, ``kind``, ``path``, ``dtype`` and implement
    :meth:`hidden`, :meth:`_upper_grad` and :meth:`_fingerprint`.
    """

    d_model: int
    n_layer: int
    tokenizer: Tokenizer
    kind: str
    path: str
    device: torch.device
    dtype: torch.dtype  # the compute dtype of the weights (float32 unless asked otherwise)

    def hidden(self, idx: torch.Tensor, layer: int) -> torch.Tensor:
        """Residual stream [B, T, d] after block ``layer`` (float32, no grad); later blocks are not run."""
        raise NotImplementedError

    def hidden_and_grad(self, idx: torch.Tensor, layer: int, *, targets: torch.Tensor | None = None,
                        replace=None, per_position: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h, g)``, both [B, T, d] float32: ``h`` the residual stream after block ``layer`` and ``g`` the
        gradient of the teacher's summed NTP loss with respect to what the later blocks read there.

        The loss covers t < T-1 (``idx[t+1]`` is the target), or every t with ``targets`` [B, T] (the
        window's next tokens). ``replace(h) -> u`` (run without grad) substitutes ``u`` for ``h`` as the
        later blocks' input, and ``g`` is taken at ``u`` (e.g. the SAE reconstruction). With
        ``per_position`` each position's gradient is that of its own loss only (``d loss_t / d u_t``, by
        :class:`_PerPositionGrad`) instead of the summed loss's. The backward pass stops there: blocks up
        to ``layer`` are never differentiated.
        """
        self._check_layer(layer)
        idx = idx.to(self.device)
        mode = _PerPositionGrad() if per_position else None
        with _no_autocast(self.device):
            h, g = self._upper_grad(idx, layer, targets, replace, mode)
        if mode is not None and mode.calls < self.n_layer - layer - 1:
            raise LatentLMError(f"teacher {self.path}'s attention does not run through "
                                "torch's scaled_dot_product_attention, so per-position gradients (concepts.score "
                                "eq1) cannot be isolated; use concepts.score official")
        return h.detach().float(), g.float()

    def _upper_grad(self, idx, layer, targets, replace, mode) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def _fingerprint(self) -> str:
        raise NotImplementedError

    @functools.cached_property
    def fingerprint(self) -> str:
        """sha256 identifying the exact weights (hashing a large file takes a while, so once)."""
        return self._fingerprint()

    def model_config(self) -> ModelConfig:
        """The teacher's shape in our terms (for FLOP accounting)."""
        raise NotImplementedError

    @property
    def dtype_name(self) -> str:
        """The compute dtype as a label cache records it (``float32``, ``bfloat16``)."""
        return dtype_name(self.dtype)

    def describe(self) -> dict[str, Any]:
        """JSON-able identity for manifests (with the shape, so a label cache knows its FLOP cost)."""
        return {"kind": self.kind, "path": self.path, "fingerprint": self.fingerprint, "d_model": self.d_model,
                "n_layer": self.n_layer, "tokenizer": self.tokenizer.describe(),
                "model": dataclasses.asdict(self.model_config())}

    def _check_layer(self, layer: int) -> None:
        if not 0 <= layer < self.n_layer:
            raise LatentLMError(f"teacher layer {layer} is out of range; this teacher has blocks "
                                f"0..{self.n_layer - 1}")


class LatentLMTeacher(Teacher):
    """A checkpoint of our own core model (a plain ``ntp`` run), driven through its pieces."""

    kind = "latentlm"

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None):
        model, manifest, ckpt = load_core(path, device)  # refuses a checkpoint that is not a plain LM
        self._setup(model, tokenizer_for(manifest, ckpt), str(ckpt), device, dtype, sha256_file(ckpt / "manifest.json"))

    @classmethod
    def from_model(cls, model: Transformer, tokenizer: Tokenizer, device: str | torch.device = "cpu",
                   dtype: torch.dtype | None = None, path: str = "<memory>") -> LatentLMTeacher:
        """A teacher around an in-memory core (tests, notebooks); it is frozen in place.

        Its fingerprint hashes the weights, so it identifies the exact model.
        """
        self = cls.__new__(cls)
        self._setup(model, tokenizer, path, device, dtype, None)
        return self

    def _setup(self, model: Transformer, tokenizer: Tokenizer, path: str, device: str | torch.device,
               dtype: torch.dtype | None, fingerprint: str | None) -> None:
        self.device = torch.device(device)
        self.dtype = teacher_dtype(dtype, self.device)
        self.model = model.to(device=self.device, dtype=self.dtype)
        _freeze(self.model)
        self.tokenizer, self.path, self._manifest_sha = tokenizer, path, fingerprint
        self.d_model, self.n_layer = model.cfg.n_embd, model.cfg.n_layer

    def model_config(self) -> ModelConfig:
        return self.model.cfg

    def _fingerprint(self) -> str:
        if self._manifest_sha is not None:
            return self._manifest_sha
        h = hashlib.sha256()
        for name, t in sorted(self.model.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().float().cpu().numpy().tobytes())
        return h.hexdigest()

    def _trunk(self, idx: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        pos = torch.arange(idx.shape[1], device=idx.device)
        m = self.model
        return m.run_blocks(m.add_positions(m.embed(idx), pos), pos, 0, layer + 1), pos

    @torch.no_grad()
    def hidden(self, idx: torch.Tensor, layer: int) -> torch.Tensor:
        self._check_layer(layer)
        with _no_autocast(self.device):
            return self._trunk(idx.to(self.device), layer)[0].float()

    def _upper_grad(self, idx, layer, targets, replace, mode):
        with torch.no_grad():
            h, pos = self._trunk(idx, layer)
            u = h if replace is None else replace(h).to(h.dtype)
        u = u.detach().requires_grad_()
        with torch.enable_grad(), (mode or contextlib.nullcontext()):
            logits = self.model.head(self.model.run_blocks(u, pos, layer + 1, None))
            (g,) = torch.autograd.grad(_ntp_loss_sum(logits, idx, targets), u)
        return h, g


class _StopForward(Exception):
    """Raised by the capture hook to end a forward pass right after the chosen layer."""


_LAYER_PATHS = (("model", "layers"), ("transformer", "h"), ("gpt_neox", "layers"), ("model", "decoder", "layers"))


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    for path in _LAYER_PATHS:
        m: Any = model
        for attr in path:
            m = getattr(m, attr, None)
        if isinstance(m, nn.ModuleList):
            return m
    tried = ", ".join(".".join(p) for p in _LAYER_PATHS)
    raise LatentLMError(f"cannot find the decoder layers of {type(model).__name__} (tried {tried}); "
                        "use a Llama-like or GPT-2-like causal LM as teacher")


class HFTeacher(Teacher):
    """A Hugging Face causal LM read from a local directory, or from a GGUF file in it.

    The residual stream is captured by a forward hook on the chosen decoder layer. ``hidden``
    aborts the forward pass inside the hook; ``hidden_and_grad`` swaps the layer's output for
    a detached leaf, so the backward pass ends there.
    """

    kind = "hf"

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 gguf_file: str | None = None, converted_from: tuple[Path, str] | None = None):
        """``converted_from``: ``(GGUF file, its sha256)`` when ``path`` is that file's cached conversion;
        the teacher then describes itself as the GGUF (same path, tokenizer and fingerprint)."""
        require_hf(gguf_file is not None)
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device(device)
        self.dtype = dtype = teacher_dtype(dtype, self.device)
        directory = Path(path)
        if not directory.is_dir():
            raise LatentLMError(f"teacher directory {path} does not exist")
        self.gguf_file = gguf_file
        self.path = str(directory / gguf_file) if gguf_file else str(directory)
        if converted_from is not None:
            self.path, self.__dict__["fingerprint"] = str(converted_from[0]), converted_from[1]
        # transformers >= 4.56 calls the argument `dtype`; older releases `torch_dtype`.
        major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
        dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
        gguf_kw = {"gguf_file": gguf_file} if gguf_file else {}
        self.model = AutoModelForCausalLM.from_pretrained(str(directory), **gguf_kw, **{dtype_kw: dtype})
        self.model.to(self.device)
        _freeze(self.model)
        self.tokenizer = HFTokenizer(AutoTokenizer.from_pretrained(str(directory), **gguf_kw), self.path)
        self._layers = _decoder_layers(self.model)
        self.n_layer = len(self._layers)
        self.d_model = int(self.model.config.hidden_size)

    def model_config(self) -> ModelConfig:
        return hf_model_config(self.model.config.to_dict())

    def _fingerprint(self) -> str:
        directory = Path(self.path).parent if self.gguf_file else Path(self.path)
        files = [Path(self.path)] if self.gguf_file else sorted(
            p for p in directory.iterdir() if p.suffix in (".safetensors", ".bin"))
        if len(files) == 1:
            return sha256_file(files[0])
        return hashlib.sha256("".join(f"{f.name}:{sha256_file(f)}\n" for f in files).encode()).hexdigest()

    def _run(self, idx: torch.Tensor, layer: int, hook) -> Any:
        handle = self._layers[layer].register_forward_hook(hook)
        try:
            return self.model(input_ids=idx.to(self.device), use_cache=False)
        finally:
            handle.remove()

    @torch.no_grad()
    def hidden(self, idx: torch.Tensor, layer: int) -> torch.Tensor:
        self._check_layer(layer)
        captured: list[torch.Tensor] = []

        def hook(module, args, output):
            captured.append(output[0] if isinstance(output, tuple) else output)
            raise _StopForward

        try:
            with _no_autocast(self.device):
                self._run(idx, layer, hook)
        except _StopForward:
            pass
        return captured[0].float()

    def _upper_grad(self, idx, layer, targets, replace, mode):
        captured: list[torch.Tensor] = []

        def hook(module, args, output):
            h = output[0] if isinstance(output, tuple) else output
            with torch.no_grad():
                u = h if replace is None else replace(h).to(h.dtype)
            u = u.detach().requires_grad_()
            captured.extend((h, u))
            return (u, *output[1:]) if isinstance(output, tuple) else u

        with torch.enable_grad(), (mode or contextlib.nullcontext()):
            logits = self._run(idx, layer, hook).logits
            (g,) = torch.autograd.grad(_ntp_loss_sum(logits, idx, targets), captured[1])
        return captured[0], g


def _gguf_teacher(f: Path, device: str | torch.device, dtype: torch.dtype | str | None) -> HFTeacher:
    """A GGUF teacher read from its cached conversion (converted on first use); with a cache that
    cannot be written, dequantized in memory as transformers does on every load."""
    require_hf(True)
    try:
        directory, sha = convert_gguf(f)
    except LatentLMError as e:
        print(f"warning: {e}; loading {f.name} without the cache (slow)", file=sys.stderr, flush=True)
        return HFTeacher(f.parent, device, dtype, gguf_file=f.name)
    return HFTeacher(directory, device, dtype, converted_from=(f, sha))


def load_teacher(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype | str | None = None) -> Teacher:
    """A frozen teacher from ``spec``: ``smollm2``, a ``.gguf`` file (both through latentlm's cache
    of converted GGUFs, :mod:`latentlm.gguf_cache`), a Hugging Face model directory (has
    config.json), or a latentlm run / checkpoint directory. ``dtype``: a torch dtype or a
    ``teacher.dtype`` setting (float32 when None; see :func:`teacher_dtype`)."""
    f = gguf_path(spec)
    if f is not None:
        return _gguf_teacher(f, device, dtype)
    p = Path(spec)
    if (p / "manifest.json").is_file() or (p / "checkpoints").is_dir():
        return LatentLMTeacher(p, device, dtype)
    if (p / "config.json").is_file():
        return HFTeacher(p, device, dtype)
    raise LatentLMError(f"cannot load teacher {spec!r}: expected 'smollm2', a .gguf file, a Hugging Face model "
                        "directory (with config.json) or a latentlm run/checkpoint directory")


def teacher_model_config(spec: str) -> ModelConfig:
    """The shape of teacher ``spec`` (as :func:`load_teacher` reads it) without loading its weights
    where possible: a latentlm checkpoint's config, a Hugging Face config.json, a GGUF header. For
    counting only, ``spec`` may also be a latentlm YAML config naming the shape (e.g. a paper teacher
    not on disk: the preset ``gpt2-124m``)."""
    if spec.endswith((".yaml", ".yml")):
        return build(ModelConfig, load_yaml(config_path(spec)).get("model") or {}, "model.")
    if spec == "smollm2" or spec.endswith(".gguf"):
        require_hf(True)
        from transformers import AutoConfig

        f = smollm2_gguf() if spec == "smollm2" else Path(spec)
        if not f.is_file():
            raise LatentLMError(f"GGUF file {spec} does not exist")
        return hf_model_config(AutoConfig.from_pretrained(str(f.parent), gguf_file=f.name).to_dict())
    p = Path(spec)
    if (p / "manifest.json").is_file() or (p / "checkpoints").is_dir():
        return build(ModelConfig, saved_config(resolve_checkpoint(p))["model"], "model.")
    if (p / "config.json").is_file():
        try:
            return hf_model_config(json.loads((p / "config.json").read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
            raise LatentLMError(f"{p / 'config.json'} is not a valid Hugging Face model config") from None
    raise LatentLMError(f"cannot find teacher {spec!r}: expected 'smollm2', a .gguf file, a Hugging Face model "
                        "directory (with config.json) or a latentlm run/checkpoint directory")


def run_teacher_config(cfg) -> ModelConfig:
    """The teacher shape of a run: recorded in its label cache when it has one (the teacher may live
    elsewhere by now), else read from ``teacher.path``."""
    labels = cfg.concepts.labels
    if labels:
        try:
            recorded = json.loads((Path(labels) / "manifest.json").read_text(encoding="utf-8"))["teacher"]
            return ModelConfig(**recorded["model"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # an older or unreadable cache: fall back to the teacher spec
    if not cfg.teacher.path:
        raise LatentLMError("cannot count the teacher's FLOPs: set --teacher.path (a teacher, or for "
                            "counting a YAML config of its shape, e.g. the preset gpt2-124m)")
    return teacher_model_config(cfg.teacher.path)
