"""What ``--resume`` accepts: the saved run, with only reporting / placement settings changed, and
weights restored strictly."""

from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from latentlm.data.prepare import prepare
from latentlm.data.tokenizers import load_tokenizer
from latentlm.errors import LatentLMError
from latentlm.fileio import sha256_file
from latentlm.train import checkpoint as ckpt_io
from latentlm.train.trainer import SAFE_ON_RESUME, train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def stopped(tiny_config):
    """A 6-step ntp run stopped after 3 steps (with its checkpoint)."""
    cfg = tiny_config(max_steps=6)
    train(cfg, stop_after=3)
    return cfg


@pytest.mark.parametrize("key, value", [("train.lr", 1e-2), ("train.max_steps", 9), ("model.n_layer", 3),
                                        ("train.seed", 1), ("train.batch_size", 2)])
def test_a_changed_setting_is_refused_by_name(stopped, key, value):
    section, name = key.split(".")
    old = getattr(getattr(stopped, section), name)
    setattr(getattr(stopped, section), name, value)
    with pytest.raises(LatentLMError) as e:
        train(stopped, resume=True)
    assert f"{key} was {old!r}, now {value!r}" in str(e.value) and "\n" not in str(e.value)


def test_safe_changes_are_printed_and_the_run_continues(stopped, capsys):
    assert "train.log_every" in SAFE_ON_RESUME and "train.lr" not in SAFE_ON_RESUME
    capsys.readouterr()
    stopped.train.log_every, stopped.train.keep_last = 2, 1
    result = train(stopped, resume=True)
    out = capsys.readouterr().out
    assert "resuming" in out and "changed: train.keep_last 3 -> 1, train.log_every 1 -> 2" in out
    assert result["step"] == 6


def test_a_moved_run_and_data_resume(stopped, tmp_path):
    run, data = tmp_path / "moved-run", tmp_path / "moved-data"
    shutil.copytree(stopped.train.out_dir, run)
    shutil.copytree(stopped.data.path, data)
    stopped.train.out_dir, stopped.data.path = str(run), str(data)
    assert train(stopped, resume=True)["step"] == 6


def test_other_data_is_refused(stopped, tmp_path):
    other = tmp_path / "other"
    prepare("wiki", load_tokenizer("byte"), other, val_fraction=0.05, limit=300, workers=1, progress=False)
    stopped.data.path = str(other)
    with pytest.raises(LatentLMError, match="data.path was"):
        train(stopped, resume=True)


@pytest.mark.parametrize("edit", ["drop", "add"])
def test_restore_is_strict(stopped, edit):
    """A checkpoint missing a tensor (or holding an extra one), its manifest re-sealed so that only
    the key check can catch it, is refused instead of resuming with an initial tensor."""
    ckpt = ckpt_io.latest_checkpoint(stopped.train.out_dir)
    weights = ckpt / "model.safetensors"
    state = load_file(str(weights))
    if edit == "drop":
        state.pop("model.blocks.1.mlp.up.weight")
    else:
        state["model.extra"] = state["model.norm_f.weight"].clone()
    save_file(state, str(weights))
    manifest = json.loads((ckpt / "manifest.json").read_text())
    manifest["files"]["model.safetensors"] = {"bytes": weights.stat().st_size, "sha256": sha256_file(weights)}
    (ckpt / "manifest.json").write_text(json.dumps(manifest))
    needle = "lacks model.blocks.1.mlp.up.weight" if edit == "drop" else "has model.extra"
    with pytest.raises(LatentLMError, match=needle):
        train(stopped, resume=True)


def test_an_unwritable_run_config_is_one_line_on_resume(stopped):
    """Rewriting RUN/config.yaml at the start (a full or read-only disk, here a directory in its way)
    fails with one line before any step runs; the checkpoint is untouched and the run still resumes."""
    run = ckpt_io.latest_checkpoint(stopped.train.out_dir).parents[1]
    (run / "config.yaml").unlink()
    (run / "config.yaml").mkdir()
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(LatentLMError, match=r"cannot write .*; free disk space or make it writable, then run the same "
                                            r"command \(it resumes\)") as e:
        train(stopped, resume=True)
    assert "\n" not in str(e.value)
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before
    (run / "config.yaml").rmdir()
    assert train(stopped, resume=True)["step"] == 6
