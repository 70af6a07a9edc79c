"""The artifact layer of latentlm.fileio: publishing a scratch directory, atomic files and the
manifest format every artifact shares (one-line errors, legacy keys)."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest

import latentlm
from latentlm.data.prepare import DATA_FORMAT
from latentlm.errors import LatentLMError
from latentlm.fileio import ManifestFormat, atomic_file, publishing, write_json_atomic
from latentlm.train.checkpoint import CHECKPOINT_FORMAT

FMT = ManifestFormat("latentlm-thing", 2, "a thing", "rebuild it with `latentlm thing --out {dir}`")


def entries(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir())


def test_publishing_publishes_only_a_finished_directory(tmp_path):
    out = tmp_path / "out"
    with publishing(out) as tmp:
        assert tmp.parent == tmp_path and tmp.name == f"out.tmp-{os.getpid()}" and entries(tmp) == []
        (tmp / "a").write_text("1")
        assert not out.exists()  # nothing is visible before the block ends
    assert entries(tmp_path) == ["out"] and (out / "a").read_text() == "1"
    with publishing(out, replace=True) as tmp:  # an existing artifact is replaced as a whole
        (tmp / "b").write_text("2")
    assert entries(out) == ["b"] and entries(tmp_path) == ["out"]


@pytest.mark.parametrize("error", [RuntimeError("boom"), KeyboardInterrupt()])
def test_publishing_leaves_nothing_on_failure(tmp_path, error):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old").write_text("kept")
    with pytest.raises(type(error)):
        with publishing(out, replace=True) as tmp:
            (tmp / "new").write_text("half")
            raise error
    assert entries(tmp_path) == ["out"] and entries(out) == ["old"]


def test_publishing_refuses_to_replace_other_things(tmp_path):
    out = tmp_path / "out"
    (out / "sub").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    thing = ManifestFormat("latentlm-thing", 1, "a thing", "make it again")
    with pytest.raises(LatentLMError) as e:
        with publishing(out, replace=thing, refusal="exists and is not a thing; choose another --out"):
            raise AssertionError("the block must not run")
    assert str(e.value) == f"{out} exists and is not a thing; choose another --out (it holds notes.txt, sub)"
    assert entries(tmp_path) == ["out"]  # nothing written, not even a scratch directory
    ManifestFormat("latentlm-other", 1, "another", "").write(out, {})  # a manifest of another kind: still not ours
    with pytest.raises(LatentLMError, match="is not a thing"):
        with publishing(out, replace=thing, refusal="is not a thing"):
            pass
    thing.write(out, {})  # an earlier artifact of the same kind may be replaced
    with publishing(out, replace=thing) as tmp:
        (tmp / "manifest.json").write_text("{}")
    assert entries(out) == ["manifest.json"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with publishing(empty):  # an empty directory is always fine to fill
        pass
    assert empty.is_dir()


def test_publishing_clears_leftovers_of_dead_writers_only(tmp_path):
    out = tmp_path / "out"
    dead, alive = tmp_path / "out.tmp-999999999", tmp_path / f".out.old-{os.getppid()}"
    dead.mkdir()
    alive.mkdir()
    with publishing(out):
        pass
    assert not dead.exists() and alive.exists()
    (tmp_path / ".step_1.tmp-1").mkdir()  # a glob clears everything it matches (the caller holds a lock)
    with publishing(tmp_path / "step_2", hidden=True, stale=".step_*") as tmp:
        assert tmp.name == f".step_2.tmp-{os.getpid()}"
    assert not (tmp_path / ".step_1.tmp-1").exists() and (tmp_path / "step_2").is_dir()


def test_atomic_file(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_file(path) as tmp:
            tmp.write_text("new")
            raise RuntimeError
    assert entries(tmp_path) == ["f.txt"] and path.read_text() == "old"
    with atomic_file(path) as tmp:
        tmp.write_text("new")
        assert path.read_text() == "old"
    assert entries(tmp_path) == ["f.txt"] and path.read_text() == "new"


def test_manifest_round_trip_and_header(tmp_path):
    written = FMT.write(tmp_path, {"files": {}, "kind": "spoofed", "format_version": 9})
    assert written == {"kind": "latentlm-thing", "format_version": 2, "latentlm_version": latentlm.__version__,
                       "files": {}}
    assert json.loads((tmp_path / "manifest.json").read_text()) == written == FMT.read(tmp_path)
    single = ManifestFormat("latentlm-one-file", 1, "a one-file thing", "redo it", name="one.json")
    single.write(tmp_path, {"x": 1})
    assert single.read(tmp_path)["x"] == 1 and (tmp_path / "one.json").is_file()


def _error(directory: Path, fmt: ManifestFormat = FMT) -> str:
    with pytest.raises(LatentLMError) as e:
        fmt.read(directory)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_manifest_read_errors_are_one_line(tmp_path):
    hint = f"rebuild it with `latentlm thing --out {tmp_path}`"
    assert _error(tmp_path) == f"{tmp_path} is not a thing (no manifest.json); {hint}"
    path = tmp_path / "manifest.json"
    path.write_text('{"kind": ')
    assert _error(tmp_path).startswith(f"{path} is not valid JSON (") and _error(tmp_path).endswith(hint)
    path.write_bytes(b"\xff\xfe")
    assert "is not valid JSON" in _error(tmp_path)
    path.write_text("[1, 2]")
    assert _error(tmp_path) == f"{path} holds a JSON list, not an object; {hint}"
    write_json_atomic(path, {"kind": "latentlm-sae", "format_version": 2})
    assert _error(tmp_path) == f"{path} is not a thing: its kind is 'latentlm-sae', not 'latentlm-thing'; {hint}"
    write_json_atomic(path, {"format_version": 2})
    assert "its kind is None" in _error(tmp_path)
    write_json_atomic(path, {"kind": "latentlm-thing", "format_version": 3, "latentlm_version": "9.0"})
    assert _error(tmp_path) == (f"{path} has format version 3 (written by latentlm 9.0), but this latentlm reads "
                                f"a thing of format version 2; {hint}")
    for version in (None, True, "2"):
        write_json_atomic(path, {"kind": "latentlm-thing", "format_version": version})
        assert f"has format version {version}," in _error(tmp_path)


def test_legacy_manifests(tmp_path):
    old = {"format": 1, "kind": "latentlm-checkpoint", "step": 3}  # checkpoints before format_version
    write_json_atomic(tmp_path / "manifest.json", old)
    read = CHECKPOINT_FORMAT.read(tmp_path)
    assert read["format_version"] == 1 and "format" not in read and read["step"] == 3
    write_json_atomic(tmp_path / "manifest.json", {**old, "format": 2})
    assert "has format version 2" in _error(tmp_path, CHECKPOINT_FORMAT)
    write_json_atomic(tmp_path / "manifest.json", old)  # the legacy key is only read where it existed
    assert "has format version None" in _error(tmp_path, dataclasses.replace(FMT, kind="latentlm-checkpoint"))
    write_json_atomic(tmp_path / "manifest.json", {"format_version": 1})  # prepared data wrote no kind
    assert DATA_FORMAT.read(tmp_path)["kind"] == "latentlm-data"
    assert "its kind is None" in _error(tmp_path, CHECKPOINT_FORMAT)
    write_json_atomic(tmp_path / "manifest.json", {"kind": "latentlm-sae", "format_version": 1})
    assert "its kind is 'latentlm-sae'" in _error(tmp_path, DATA_FORMAT)
