"""``--overwrite`` replaces only what latentlm wrote: an empty directory or an artifact of the same
kind (its manifest says so). A user's directory, the current directory, a directory holding it,
or one holding the command's input is refused with one line and left exactly as it was."""

from __future__ import annotations

import json

import pytest

from latentlm.cli import main
from latentlm.errors import LatentLMError
from latentlm.fileio import ManifestFormat, check_replaceable

from conftest import TINY_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")


def user_files(directory):
    """A directory of someone's own files (and a subdirectory), and a snapshot to compare with."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "notes.txt").write_text("mine\n")
    (directory / "src").mkdir(exist_ok=True)
    (directory / "src" / "main.py").write_text("print('hi')\n")
    return snapshot(directory)


def snapshot(directory):
    return sorted((str(p.relative_to(directory)), p.read_bytes() if p.is_file() else b"")
                  for p in directory.rglob("*"))


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.fixture
def corpus(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("A small corpus. " * 200, encoding="utf-8")
    return path


def prepare(source, out, *extra):
    return main(["prepare", "--source", str(source), "--tokenizer", "byte", "--out", str(out), "--val-fraction",
                 "0.1", "--workers", "1", "--quiet", *extra])


def test_prepare_overwrite_leaves_a_users_directory_alone(tmp_path, corpus, capsys):
    out = tmp_path / "project"
    before = user_files(out)
    assert prepare(corpus, out, "--overwrite") == 2
    err = one_error_line(capsys)
    assert "not prepared data written by latentlm" in err and "notes.txt" in err
    assert snapshot(out) == before


def test_prepare_overwrite_replaces_its_own_data(tmp_path, corpus, capsys):
    out = tmp_path / "data"
    assert prepare(corpus, out) == 0
    assert prepare(corpus, out) == 2 and "pass --overwrite" in one_error_line(capsys)
    assert prepare(corpus, out, "--overwrite") == 0
    assert json.loads((out / "manifest.json").read_text())["kind"] == "latentlm-data"


@pytest.mark.parametrize("where", [".", ".."])
def test_never_the_current_directory_or_a_parent(tmp_path, corpus, capsys, monkeypatch, where):
    work = tmp_path / "work" / "here"
    user_files(work)
    before = snapshot(tmp_path / "work")
    monkeypatch.chdir(work)
    assert prepare(corpus, where, "--overwrite") == 2
    assert "current directory" in one_error_line(capsys)
    assert snapshot(tmp_path / "work") == before


def test_never_a_directory_holding_the_input(tmp_path, capsys):
    data = tmp_path / "data"
    assert prepare_corpus_into(data) == 0  # latentlm's own data, so --overwrite could replace it ...
    corpus = data / "corpus.txt"  # ... but the corpus now lives inside it
    corpus.write_text("Inside the output. " * 100, encoding="utf-8")
    before = snapshot(data)
    assert prepare(corpus, data, "--overwrite") == 2
    assert "holds the input" in one_error_line(capsys)
    assert snapshot(data) == before


def prepare_corpus_into(out):
    src = out.parent / "seed.txt"
    src.write_text("Seed text. " * 100, encoding="utf-8")
    return prepare(src, out)


@pytest.fixture(scope="module")
def ntp_run(byte_wiki, tmp_path_factory):
    run = tmp_path_factory.mktemp("export") / "ntp"
    args = [x for k, v in TINY_MODEL.items() for x in (f"--model.{k}", str(v))]
    assert main(["train", *args, "--data.path", str(byte_wiki), "--train.out_dir", str(run), "--train.max_steps", "2",
                 "--train.batch_size", "2", "--train.warmup_steps", "1", "--train.progress", "false",
                 "--train.eval_batches", "1", "--data.seq_len", "32"]) == 0
    return run


def test_export_overwrite_replaces_only_an_export(ntp_run, tmp_path, capsys):
    hf = tmp_path / "hf"
    before = user_files(hf)
    assert main(["export", str(ntp_run), "--hf", str(hf), "--overwrite"]) == 2
    assert "not a Hugging Face export latentlm wrote" in one_error_line(capsys)
    assert snapshot(hf) == before
    fresh = tmp_path / "fresh"
    assert main(["export", str(ntp_run), "--hf", str(fresh)]) == 0
    assert json.loads((fresh / "latentlm_export.json").read_text())["kind"] == "latentlm-hf-export"
    assert main(["export", str(ntp_run), "--hf", str(fresh), "--overwrite"]) == 0
    # An export made without the marker (or edited by hand to drop it) is no longer known to be ours.
    (fresh / "latentlm_export.json").unlink()
    assert main(["export", str(ntp_run), "--hf", str(fresh), "--overwrite"]) == 2
    capsys.readouterr()
    # Nor may the export replace the run it reads.
    assert main(["export", str(ntp_run / "checkpoints" / next((ntp_run / "checkpoints").iterdir()).name),
                 "--hf", str(ntp_run), "--overwrite"]) == 2
    assert "holds the input" in one_error_line(capsys)


def test_import_overwrite_replaces_only_a_checkpoint(ntp_run, tmp_path, capsys):
    hf = tmp_path / "hf"
    assert main(["export", str(ntp_run), "--hf", str(hf)]) == 0
    out = tmp_path / "imported"
    before = user_files(out)
    assert main(["import", "--hf", str(hf), "--out", str(out), "--tokenizer", "byte", "--overwrite"]) == 2
    assert "not a checkpoint latentlm wrote" in one_error_line(capsys)
    assert snapshot(out) == before
    again = tmp_path / "again"
    assert main(["import", "--hf", str(hf), "--out", str(again), "--tokenizer", "byte"]) == 0
    assert main(["import", "--hf", str(hf), "--out", str(again), "--tokenizer", "byte", "--overwrite"]) == 0


def test_the_rule_itself(tmp_path, monkeypatch):
    fmt = ManifestFormat("latentlm-thing", 1, "a thing", "make it again")
    check_replaceable(tmp_path / "absent", fmt)  # absent: fine
    (tmp_path / "empty").mkdir()
    check_replaceable(tmp_path / "empty", fmt)  # empty: fine
    mine, other = tmp_path / "mine", tmp_path / "other"
    mine.mkdir()
    other.mkdir()
    fmt.write(mine, {"x": 1})
    check_replaceable(mine, fmt)  # ours, any version
    ManifestFormat("latentlm-other", 1, "another", "").write(other, {})
    with pytest.raises(LatentLMError, match="it holds manifest.json"):
        check_replaceable(other, fmt, "is not a thing")
    monkeypatch.chdir(mine)
    with pytest.raises(LatentLMError, match="current directory"):
        check_replaceable(mine, True)  # not even internal writers replace the current directory
