"""Hugging Face interop: our ``ntp`` core <-> ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` /
``GPTNeoXForCausalLM`` directories.

Export writes ``config.json`` and ``model.safetensors`` (plus the tokenizer files when the
checkpoint's tokenizer has a Hugging Face form) without importing ``transformers``: the key
names and layouts are fixed here. Import reads a local Hugging Face directory (safetensors, or
``pytorch_model.bin`` through ``torch.load(weights_only=True)``) into a regular latentlm
checkpoint that ``eval``, ``generate``, teachers and ``train.init_from`` load.

The tensor mapping itself is :mod:`latentlm.model.hf`.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from latentlm.checkpoint_files import CHECKPOINT_FORMAT, load_core
from latentlm.config import Config
from latentlm.data.sources import find_package_file
from latentlm.data.tokenizers import (EOT_TEXT, TOKENIZER_NAMES, Tokenizer, _GPT2_PACKAGE, _GPT2_PIP,
                                      _gpt2_byte_to_unicode, load_tokenizer)
from latentlm.errors import LatentLMError
from latentlm.fileio import ManifestFormat, fsync_file, publishing, read_json_object, write_json_atomic
from latentlm.methods import BASELINE, method_class
from latentlm.model.config import ModelConfig
from latentlm.model.hf import HF_CLASSES, from_hf, to_hf
from latentlm.train.checkpoint import write_checkpoint

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                      "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")
TOKENIZER_DIR = "tokenizer"  # where an imported checkpoint keeps a Hugging Face tokenizer


# --- export -----------------------------------------------------------------------------------

OCCUPIED = "already exists and is not empty; pass --overwrite or choose another path"  # export / import refusal
NOT_OURS = "is not a {what} latentlm wrote, so --overwrite leaves it alone; remove it yourself or choose another path"
# The marker an export leaves, so a later `export --overwrite` knows the directory is latentlm's to replace.
EXPORT_FORMAT = ManifestFormat("latentlm-hf-export", 1, "a Hugging Face export", "run `latentlm export` again",
                               name="latentlm_export.json")


def _byte_tokenizer_json() -> str:
    """Our ``byte`` tokenizer as a Hugging Face tokenizer.json: byte-level BPE without merges whose
    ids are the byte values, end-of-text 256."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import decoders, models, pre_tokenizers

    vocab = {ch: b for b, ch in _gpt2_byte_to_unicode().items()}
    tok = RawTokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([EOT_TEXT])
    return tok.to_str()


def _write_hf_tokenizer(desc: dict[str, Any], ckpt: Path, out: Path, block_size: int) -> str:
    """Write the checkpoint's tokenizer in Hugging Face form into ``out``; return what was done."""
    name = desc["name"]
    fast = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": EOT_TEXT, "eos_token": EOT_TEXT,
            "model_max_length": block_size, "clean_up_tokenization_spaces": False}
    if name == "gpt2":
        shutil.copyfile(find_package_file(_GPT2_PACKAGE, "data/encoder.json", _GPT2_PIP), out / "vocab.json")
        shutil.copyfile(find_package_file(_GPT2_PACKAGE, "data/vocab.bpe", _GPT2_PIP), out / "merges.txt")
        write_json_atomic(out / "tokenizer_config.json", {**fast, "tokenizer_class": "GPT2Tokenizer",
                                                          "unk_token": EOT_TEXT, "add_prefix_space": False})
        return "GPT-2 BPE (vocab.json, merges.txt)"
    if name == "bpe":
        shutil.copyfile(ckpt / desc["path"], out / "tokenizer.json")
        write_json_atomic(out / "tokenizer_config.json", fast)
        return "trained byte-level BPE (tokenizer.json)"
    if name == "byte":
        (out / "tokenizer.json").write_text(_byte_tokenizer_json(), encoding="utf-8")
        write_json_atomic(out / "tokenizer_config.json", fast)
        return "UTF-8 bytes as a merge-free byte-level BPE (tokenizer.json)"
    src = Path(desc.get("path", ""))
    src = src if src.is_absolute() else ckpt / src
    if name == "hf" and src.is_dir():
        copied = [f for f in HF_TOKENIZER_FILES if (src / f).is_file()]
        for f in copied:
            shutil.copyfile(src / f, out / f)
        return f"Hugging Face tokenizer of {src} ({', '.join(copied)})"
    return f"none: the {name} tokenizer at {src} has no Hugging Face directory form; add tokenizer files yourself"


def export_hf(checkpoint: str | Path, out_dir: str | Path, overwrite: bool = False) -> dict[str, Any]:
    """Write checkpoint ``checkpoint`` (run or ``step_*`` directory) as a Hugging Face model
    directory ``out_dir``; nothing is left behind on error. Returns a summary."""
    # Only a method that declares itself a plain next-token LM has a Hugging Face counterpart.
    model, manifest, ckpt = load_core(checkpoint)
    core = model.state_dict()
    desc = manifest.get("tokenizer", {})
    hf_config, tensors = to_hf(model.cfg, core, desc.get("eot_id"))
    out_dir = Path(os.path.abspath(out_dir))
    with publishing(out_dir, replace=EXPORT_FORMAT if overwrite else False, inputs=(ckpt,),
                    refusal=NOT_OURS.format(what="Hugging Face export") if overwrite else OCCUPIED) as tmp:
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json_atomic(tmp / "config.json", hf_config)
        tokenizer = _write_hf_tokenizer(desc, ckpt, tmp, model.cfg.block_size) if desc else "none recorded"
        EXPORT_FORMAT.write(tmp, {"checkpoint": str(ckpt), "method": manifest.get("method"), "step": manifest.get("step")})
        for f in tmp.iterdir():
            fsync_file(f)
    return {"checkpoint": str(ckpt), "out": str(out_dir), "architecture": hf_config["architectures"][0],
            "vocab_size": hf_config["vocab_size"], "tensors": len(tensors), "tokenizer": tokenizer}


# --- import -----------------------------------------------------------------------------------


def read_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    """All tensors of a Hugging Face directory: (sharded) safetensors, else (sharded) pytorch_model.bin
    read with ``torch.load(weights_only=True)`` (nothing is unpickled beyond tensors)."""
    for single, index, load in (("model.safetensors", "model.safetensors.index.json", lambda p: load_file(str(p))),
                                ("pytorch_model.bin", "pytorch_model.bin.index.json",
                                 lambda p: torch.load(p, map_location="cpu", weights_only=True))):
        if (directory / single).is_file():
            return load(directory / single)
        if (directory / index).is_file():
            shards = sorted(set(json.loads((directory / index).read_text())["weight_map"].values()))
            return {k: v for s in shards for k, v in load(directory / s).items()}
    raise LatentLMError(f"{directory} has no model.safetensors or pytorch_model.bin (nor a sharded index)")


def import_hf(hf_dir: str | Path, out_dir: str | Path, tokenizer: str = "hf", tokenizer_path: str | None = None,
              overwrite: bool = False) -> dict[str, Any]:
    """Write the Hugging Face GPT-2 / Llama / GPT-NeoX directory ``hf_dir`` as a latentlm ``ntp`` checkpoint
    directory ``out_dir`` (weights, config, manifest, tokenizer); nothing is left behind on error.

    ``tokenizer``: ``hf`` copies the directory's own tokenizer into the checkpoint (needs
    ``transformers``); ``gpt2``, ``byte`` or ``bpe`` (with ``tokenizer_path``) use one of ours instead.
    """
    src = Path(os.path.abspath(hf_dir))
    if not (src / "config.json").is_file():
        raise LatentLMError(f"{hf_dir} is not a Hugging Face model directory (no config.json)")
    if tokenizer not in TOKENIZER_NAMES:
        raise LatentLMError(f"unknown tokenizer {tokenizer!r}; choose one of {', '.join(TOKENIZER_NAMES)}")
    hf_config = read_json_object(src / "config.json", "pass a Hugging Face model directory")
    if hf_config.get("model_type") not in HF_CLASSES:
        raise LatentLMError(f"{src}/config.json has model_type {hf_config.get('model_type')!r}; latentlm imports "
                            f"{', '.join(f'{k} ({v})' for k, v in HF_CLASSES.items())}")
    if tokenizer == "hf" and not any((src / f).is_file() for f in HF_TOKENIZER_FILES):
        raise LatentLMError(f"{src} has no tokenizer files; pass --tokenizer gpt2, byte or bpe (with --tokenizer-path)")
    tensors = read_hf_weights(src)
    out_dir = Path(os.path.abspath(out_dir))
    with publishing(out_dir, replace=CHECKPOINT_FORMAT if overwrite else False, inputs=(src,),
                    refusal=NOT_OURS.format(what="checkpoint") if overwrite else OCCUPIED) as tmp:
        if tokenizer == "hf":
            (tmp / TOKENIZER_DIR).mkdir()
            for f in (*HF_TOKENIZER_FILES, "config.json"):  # config.json: AutoTokenizer may need model_type
                if (src / f).is_file():
                    shutil.copyfile(src / f, tmp / TOKENIZER_DIR / f)
            tok: Tokenizer = load_tokenizer("hf", tmp / TOKENIZER_DIR)
            desc = {**tok.describe(), "path": TOKENIZER_DIR}
        else:
            tok = load_tokenizer(tokenizer, tokenizer_path)
            desc = tok.describe()  # a BPE's file is copied into the checkpoint by its writer
        mc, core = from_hf(hf_config, tensors, tok.vocab_size, src)
        manifest = write_core_checkpoint(tmp, mc, core, desc, {"imported_from": {
            "path": str(src), "architecture": HF_CLASSES[hf_config["model_type"]]}})
    return {"hf": str(src), "out": str(out_dir), "arch": mc.arch, "vocab_size": mc.vocab_size,
            "params": manifest["params"], "tokenizer": desc["name"]}


def write_core_checkpoint(directory: Path, model_cfg: ModelConfig, core: dict[str, torch.Tensor],
                          tokenizer: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Fill ``directory`` with a weights-only step-0 baseline (``ntp``) checkpoint of the core weights ``core``
    (keys of :class:`~latentlm.model.transformer.Transformer`) and ``tokenizer`` (its describe()),
    written by :func:`latentlm.train.checkpoint.write_checkpoint`; it initialises or evaluates, it
    does not resume. Returns the manifest."""
    cfg = Config(model=model_cfg)
    cfg.train.method = BASELINE
    cfg.validate()
    tied = model_cfg.resolved().tie_embeddings
    params = sum(v.numel() for k, v in core.items() if not (tied and k == "lm_head.weight"))
    return write_checkpoint(directory, {f"model.{k}": v for k, v in core.items()}, cfg, step=0,
                            extra={"tokenizer": tokenizer, "params": params,
                                   "capabilities": method_class(BASELINE).capabilities(), **extra})
