"""latentlm's cache of converted GGUF models (latentlm.gguf_cache): where it lives, how entries are
keyed, reused, redone and written, without transformers (the conversion itself is replaced by a
stand-in that writes files); the real conversion of SmolLM2 is tested in test_hf_interop.py."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

import latentlm.gguf_cache as cache
from latentlm.cli import main
from latentlm.errors import LatentLMError


@pytest.fixture
def fake_convert(tmp_path, monkeypatch):
    """A fresh cache under tmp_path and a stand-in conversion that counts its calls."""
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "cache"))
    calls: list[Path] = []

    def write(gguf: Path, out: Path) -> dict[str, int]:
        calls.append(gguf)
        time.sleep(0.2)  # long enough for a second converter to arrive while this one works
        (out / cache.WEIGHTS).write_bytes(b"w" * 100)
        (out / "config.json").write_text(json.dumps({"model_type": "llama", "from": gguf.read_text()}))
        return {f.name: f.stat().st_size for f in out.iterdir()}

    monkeypatch.setattr(cache, "write_conversion", write)
    return calls


def gguf(path: Path, content: str = "GGUF v3 tiny") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    return path


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "mine"))
    assert cache.cache_root() == tmp_path / "mine"
    monkeypatch.delenv(cache.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache.cache_root() == tmp_path / "xdg" / "latentlm"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache.cache_root() == tmp_path / "home" / ".cache" / "latentlm"


def test_converted_once_keyed_by_content_and_hashed_once(tmp_path, fake_convert, monkeypatch):
    f = gguf(tmp_path / "models" / "tiny.gguf")
    hashed: list[Path] = []
    real_hash = cache.sha256_file
    monkeypatch.setattr(cache, "sha256_file", lambda p: hashed.append(Path(p)) or real_hash(p))
    entry, sha = cache.convert_gguf(f)
    assert sha == real_hash(f) and entry == tmp_path / "cache" / "gguf" / f"tiny-{sha[:16]}"
    manifest = json.loads((entry / "manifest.json").read_text())
    assert manifest["kind"] == "latentlm-gguf-conversion" and manifest["gguf_sha256"] == sha
    assert manifest["files"] == {cache.WEIGHTS: 100, "config.json": (entry / "config.json").stat().st_size}
    assert cache.convert_gguf(f) == (entry, sha) and cache.cached_conversion(f) == entry
    assert len(fake_convert) == 1 and len(hashed) == 1  # the hash is remembered under path, size, mtime
    copy = gguf(tmp_path / "elsewhere" / "tiny.gguf")  # the same bytes elsewhere: the same entry
    assert cache.convert_gguf(copy) == (entry, sha) and len(fake_convert) == 1 and len(hashed) == 2
    gguf(f, "GGUF v3 changed!")  # a changed file (new mtime) is hashed again and converted again
    entry2, sha2 = cache.convert_gguf(f)
    assert sha2 != sha and entry2 != entry and len(fake_convert) == 2
    assert json.loads((entry2 / "config.json").read_text())["from"] == "GGUF v3 changed!"


def test_damaged_entries_are_redone_and_failures_leave_nothing(tmp_path, fake_convert, monkeypatch):
    f = gguf(tmp_path / "tiny.gguf")
    entry, _ = cache.convert_gguf(f)
    (entry / cache.WEIGHTS).write_bytes(b"short")  # e.g. a file cut by a full disk
    assert cache.cached_conversion(f) is None
    assert cache.convert_gguf(f)[0] == entry and (entry / cache.WEIGHTS).stat().st_size == 100
    assert len(fake_convert) == 2
    (entry / "manifest.json").write_text("{")
    assert cache.cached_conversion(f) is None

    def broken(gguf_file, out):
        (out / cache.WEIGHTS).write_bytes(b"half")
        raise RuntimeError("dequantization failed")

    monkeypatch.setattr(cache, "write_conversion", broken)
    g = gguf(tmp_path / "other.gguf", "another model")
    with pytest.raises(RuntimeError, match="dequantization failed"):
        cache.convert_gguf(g)
    root = tmp_path / "cache" / "gguf"
    assert sorted(p.name for p in root.iterdir() if not p.name.startswith(".")) == ["by-stat", entry.name]
    assert not [p for p in root.iterdir() if ".tmp-" in p.name]


def test_concurrent_loads_convert_once(tmp_path, fake_convert):
    """The ranks of a torchrun job asking at once: one converts, the others wait and reuse it."""
    f = gguf(tmp_path / "tiny.gguf")
    results: list[tuple[Path, str]] = []
    threads = [threading.Thread(target=lambda: results.append(cache.convert_gguf(f, progress=False)))
               for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(fake_convert) == 1 and len(results) == 3 and len(set(results)) == 1


def test_unwritable_cache_and_missing_files_are_one_line(tmp_path, fake_convert, monkeypatch):
    f = gguf(tmp_path / "tiny.gguf")
    (tmp_path / "a-file").write_text("x")
    monkeypatch.setenv(cache.CACHE_ENV, str(tmp_path / "a-file" / "cache"))
    with pytest.raises(LatentLMError, match=f"cannot write .*set {cache.CACHE_ENV} to a writable directory"):
        cache.convert_gguf(f)
    with pytest.raises(LatentLMError, match="does not exist"):
        cache.convert_gguf(tmp_path / "missing.gguf")
    assert fake_convert == []


def test_import_of_a_gguf_needs_transformers_and_writes_nothing(tmp_path, monkeypatch, capsys, fake_convert):
    import importlib.util

    from latentlm.data.tokenizers import gguf_path

    f = gguf(tmp_path / "tiny.gguf")
    (tmp_path / "occupied").mkdir()
    (tmp_path / "occupied" / "keep").write_text("x")
    assert main(["import", "--hf", str(f), "--out", str(tmp_path / "occupied")]) == 2
    assert "--overwrite" in capsys.readouterr().err and fake_convert == []  # refused before any conversion
    assert gguf_path(str(f)) == f and gguf_path(str(tmp_path)) is None
    with pytest.raises(LatentLMError, match="does not exist"):
        gguf_path(str(tmp_path / "missing.gguf"))
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a))
    assert main(["import", "--hf", str(f), "--out", str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'latentlm[hf]'" in err
    assert not (tmp_path / "ck").exists()
