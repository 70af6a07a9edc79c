"""Frozen teacher LMs for distillation and concept extraction (CoCoMix, docs/METHODS.md §2.1).

A :class:`Teacher` exposes the residual stream after one chosen block and, for attribution,
the gradient of its own next-token loss with respect to that residual stream. Two kinds:

* :class:`LatentLMTeacher`: a checkpoint of our own core (an ``ntp`` run);
* :class:`HFTeacher`: a Hugging Face causal LM from a local directory or a GGUF file
  (dequantized by ``transformers``; needs ``pip install 'latentlm[hf]'``).

:func:`load_teacher` picks the kind from a spec string. Teachers are always frozen (no
parameter requires grad, eval mode), so gradients never accumulate in their weights, and
every returned tensor is float32 whatever the compute dtype.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import re
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

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


def default_dtype(device: str | torch.device) -> torch.dtype:
    """bf16 on CUDA (halves memory and runs on tensor cores), float32 elsewhere."""
    return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32


def _freeze(module: nn.Module) -> None:
    module.eval()
    for p in module.parameters():
        p.requires_grad_(False)


def _ntp_loss_sum(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Sum over positions t < T-1 of CE(logits_t, idx[t+1]), computed in float32."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]),
                           idx[:, 1:].reshape(-1), reduction="sum")


class Teacher:
    """A frozen LM: residual stream after block ``layer`` (0-based) and its NTP-loss gradient.

    Subclasses set ``d_model``, ``n_layer``, ``tokenizer``, ``kind``, ``path`` and implement
    :meth:`hidden`, :meth:`hidden_and_grad` and :meth:`_fingerprint`.
    """

    d_model: int
    n_layer: int
    tokenizer: Tokenizer
    kind: str
    path: str
    device: torch.device

    def hidden(self, idx: torch.Tensor, layer: int) -> torch.Tensor:
        """Residual stream [B, T, d] after block ``layer`` (float32, no grad); later blocks are not run."""
        raise NotImplementedError

    def hidden_and_grad(self, idx: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h, dL/dh)``, both [B, T, d] float32, with L the teacher's summed NTP loss on ``idx``.

        The backward pass stops at ``h`` (blocks up to ``layer`` are not differentiated).
        """
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
        self.model = model.to(device=self.device, dtype=dtype or default_dtype(self.device))
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
        return self._trunk(idx.to(self.device), layer)[0].float()

    def hidden_and_grad(self, idx: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_layer(layer)
        idx = idx.to(self.device)
        with torch.no_grad():
            h, pos = self._trunk(idx, layer)
        h = h.detach().requires_grad_()
        with torch.enable_grad():
            logits = self.model.head(self.model.run_blocks(h, pos, layer + 1, None))
            (g,) = torch.autograd.grad(_ntp_loss_sum(logits, idx), h)
        return h.detach().float(), g.float()


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
        dtype = dtype or default_dtype(self.device)
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
            self._run(idx, layer, hook)
        except _StopForward:
            pass
        return captured[0].float()

    def hidden_and_grad(self, idx: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor]:
        self._check_layer(layer)
        captured: list[torch.Tensor] = []

        def hook(module, args, output):
            h = (output[0] if isinstance(output, tuple) else output).detach().requires_grad_()
            captured.append(h)
            return (h, *output[1:]) if isinstance(output, tuple) else h

        idx = idx.to(self.device)
        with torch.enable_grad():
            logits = self._run(idx, layer, hook).logits
            (g,) = torch.autograd.grad(_ntp_loss_sum(logits, idx), captured[0])
        return captured[0].detach().float(), g.float()


def _gguf_teacher(f: Path, device: str | torch.device, dtype: torch.dtype | None) -> HFTeacher:
    """A GGUF teacher read from its cached conversion (converted on first use); with a cache that
    cannot be written, dequantized in memory as transformers does on every load."""
    require_hf(True)
    try:
        directory, sha = convert_gguf(f)
    except LatentLMError as e:
        print(f"warning: {e}; loading {f.name} without the cache (slow)", file=sys.stderr, flush=True)
        return HFTeacher(f.parent, device, dtype, gguf_file=f.name)
    return HFTeacher(directory, device, dtype, converted_from=(f, sha))


def load_teacher(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Teacher:
    """A frozen teacher from ``spec``: ``smollm2``, a ``.gguf`` file (both through latentlm's cache
    of converted GGUFs, :mod:`latentlm.gguf_cache`), a Hugging Face model directory (has
    config.json), or a latentlm run / checkpoint directory."""
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
