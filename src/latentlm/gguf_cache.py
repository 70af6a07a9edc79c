"""A GGUF model converted once into a Hugging Face directory, kept in latentlm's cache.

``transformers`` dequantizes every tensor of a GGUF file on every load and refuses to
``save_pretrained`` the result. The first teacher load or ``latentlm import`` of a GGUF writes its
dequantized weights (float32 safetensors, exactly what ``transformers`` computes), config,
generation config and tokenizer as an ordinary Hugging Face directory under :func:`cache_root`;
later loads read that directory instead.

An entry is named by the GGUF's sha256 (two copies of one file share it) and published atomically
with a manifest; the hash of a file is remembered under its path, size and modification time, so
a load does not re-read the GGUF. A process converting an entry holds a lock that others wait on,
so the ranks of a ``torchrun`` job convert once. Deleting the cache directory is always safe.

Callers check that ``transformers``/``gguf`` are installed before asking for a conversion.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from latentlm.errors import LatentLMError
from latentlm.fileio import ManifestFormat, fsync_file, publishing, sha256_file, write_json_atomic

CACHE_ENV = "LATENTLM_CACHE_DIR"
GGUF_FORMAT = ManifestFormat("latentlm-gguf-conversion", 1, "a converted GGUF model",
                             "delete {dir}; the next load converts the GGUF again")
WEIGHTS = "model.safetensors"


def cache_root() -> Path:
    """``$LATENTLM_CACHE_DIR``, else ``$XDG_CACHE_HOME/latentlm``, else ``~/.cache/latentlm``."""
    if os.environ.get(CACHE_ENV):
        return Path(os.path.abspath(os.path.expanduser(os.environ[CACHE_ENV])))
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(os.path.abspath(base)) / "latentlm"


def _stat_key(gguf: Path) -> tuple[Path, dict[str, Any]]:
    st = gguf.stat()
    ident = {"path": str(gguf.resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns}
    name = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:32]
    return cache_root() / "gguf" / "by-stat" / f"{name}.json", ident


def gguf_sha256(gguf: Path) -> str:
    """sha256 of ``gguf``, remembered under its path, size and mtime (a changed file is hashed again)."""
    pointer, ident = _stat_key(gguf)
    try:
        known = json.loads(pointer.read_text(encoding="utf-8"))
        if {k: known.get(k) for k in ident} == ident and isinstance(known.get("sha256"), str):
            return known["sha256"]
    except (OSError, ValueError):
        pass
    digest = sha256_file(gguf)
    try:
        pointer.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(pointer, {**ident, "sha256": digest})
    except OSError:
        pass  # a read-only cache only costs the next load a re-hash
    return digest


def entry_dir(gguf: Path, sha256: str) -> Path:
    return cache_root() / "gguf" / f"{gguf.stem}-{sha256[:16]}"


def _complete(entry: Path, sha256: str) -> bool:
    """Whether ``entry`` is a finished conversion of the GGUF with this sha256 (files and sizes as recorded)."""
    try:
        manifest = GGUF_FORMAT.read(entry)
    except LatentLMError:
        return False
    files = manifest.get("files")
    if manifest.get("gguf_sha256") != sha256 or not isinstance(files, dict) or WEIGHTS not in files:
        return False
    return all((entry / name).is_file() and (entry / name).stat().st_size == size for name, size in files.items())


def cached_conversion(gguf: str | Path) -> Path | None:
    """The cache entry of ``gguf`` when one is complete (no conversion), else None."""
    gguf = Path(os.path.abspath(gguf))
    sha = gguf_sha256(gguf)
    entry = entry_dir(gguf, sha)
    return entry if _complete(entry, sha) else None


@contextlib.contextmanager
def _waiting_lock(path: Path) -> Iterator[None]:
    """An exclusive ``flock`` on ``path`` that waits for the holder (another rank converting)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def convert_gguf(gguf: str | Path, progress: bool = True) -> tuple[Path, str]:
    """``(directory, sha256)``: the Hugging Face directory form of ``gguf`` in the cache, converted now
    if it is not there yet. A cache that cannot be written is a one-line :class:`LatentLMError`."""
    gguf = Path(os.path.abspath(gguf))
    if not gguf.is_file():
        raise LatentLMError(f"GGUF file {gguf} does not exist")
    sha = gguf_sha256(gguf)
    entry = entry_dir(gguf, sha)
    if _complete(entry, sha):
        return entry, sha
    hint = f"set {CACHE_ENV} to a writable directory"
    try:
        with _waiting_lock(entry.with_name(f".{entry.name}.lock")):
            if _complete(entry, sha):  # converted by the process we waited for
                return entry, sha
            if progress:
                print(f"converting {gguf.name} once into {entry} (later loads read it from there)",
                      file=sys.stderr, flush=True)
            with publishing(entry, replace=True, hint=hint) as tmp:
                files = write_conversion(gguf, tmp)
                GGUF_FORMAT.write(tmp, {"gguf": str(gguf), "gguf_sha256": sha, "gguf_bytes": gguf.stat().st_size,
                                        "files": files, "transformers_version": _transformers_version()})
    except OSError as e:
        raise LatentLMError(f"cannot write the GGUF cache {entry} ({e.strerror or e}); {hint}") from None
    return entry, sha


def _transformers_version() -> str | None:
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        return None


def dtype_kwarg() -> str:
    """``from_pretrained``'s name for the weights' dtype: ``dtype`` from transformers 4.56, ``torch_dtype`` before."""
    import transformers

    major, minor = (int(x) for x in re.findall(r"\d+", transformers.__version__)[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def write_conversion(gguf: Path, out: Path) -> dict[str, int]:
    """Write ``gguf`` dequantized by ``transformers`` as a Hugging Face directory into ``out``:
    ``config.json`` (without the GGUF quantization entry), float32 ``model.safetensors`` (a tied
    head stored once), ``generation_config.json`` and the tokenizer files. Returns ``{file: bytes}``."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": gguf.name}
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), **kw)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), **kw, **{dtype_kwarg(): torch.float32})
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the weights here are plain float32
    sd = model.state_dict()
    tied = bool(config.get("tie_word_embeddings")) and "lm_head.weight" in sd
    save_file({k: v.contiguous() for k, v in sd.items() if not (tied and k == "lm_head.weight")},
              str(out / WEIGHTS), metadata={"format": "pt"})
    write_json_atomic(out / "config.json", config)
    model.generation_config.to_json_file(str(out / "generation_config.json"))
    tok.save_pretrained(str(out))
    for f in out.iterdir():
        fsync_file(f)
    return {f.name: f.stat().st_size for f in sorted(out.iterdir()) if f.is_file()}
