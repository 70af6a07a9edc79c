"""What `latentlm train` says: one block at the start (run directory, resume point, the settings that
differ from the defaults), nothing of it with --quiet, and on a complete run `--resume` says so and
touches no file. Also the vocabulary a config leaves to the data."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import yaml

from latentlm.cli import main
from latentlm.config import config_from_dict, make_config
from latentlm.train.trainer import train

from conftest import TINY_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")

SMALL = ["--model.n_layer", "1", "--model.n_head", "2", "--model.n_embd", "32", "--model.block_size", "32",
         "--train.batch_size", "2", "--train.warmup_steps", "1", "--train.eval_batches", "1", "--train.progress",
         "false", "--train.log_every", "1"]


def args(data: Path, run: Path, steps: int = 3, *extra: str) -> list[str]:
    return ["train", "--config", "llama-tiny", "--data.path", str(data), "--train.out_dir", str(run),
            "--train.max_steps", str(steps), *SMALL, *extra]


def snapshot(run: Path) -> dict[str, tuple[int, str]]:
    """Every file under ``run``: its mtime and sha256."""
    return {str(p.relative_to(run)): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(run.rglob("*")) if p.is_file()}


def test_start_block_resume_point_and_a_complete_run(byte_wiki, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(args(byte_wiki, run, 3, "--train.ckpt_every", "2")) == 0
    out = capsys.readouterr().out
    first = out.splitlines()[:3]
    assert first[0] == (f"latentlm train: run {run} (new; config in {run / 'config.yaml'}, "
                        f"metrics in {run / 'metrics.jsonl'})")
    assert first[1].startswith("  method=ntp params=") and "steps=0->3" in first[1]
    settings = first[2]
    assert settings.startswith("  settings: model.arch=llama ")
    assert f"model.vocab_size=257 (from {byte_wiki / 'manifest.json'})" in settings  # llama-tiny leaves it to the data
    assert "train.max_steps=3" in settings and "train.seed=" not in settings  # only what differs from the defaults
    assert "done: val_loss" in out

    # A complete run: --resume says so, exits 0 and leaves every file as it was (no evaluation, no rewrite).
    before = snapshot(run)
    assert main(args(byte_wiki, run, 3, "--train.ckpt_every", "2", "--resume")) == 0
    assert capsys.readouterr().out == f"run {run} is complete (step 3 of 3); nothing to do\n"
    assert snapshot(run) == before
    assert sorted(p.name for p in run.iterdir()) == sorted({Path(k).parts[0] for k in before})  # no lock left

    # A complete run is still the run that was started: a changed setting is refused, not ignored.
    assert main(args(byte_wiki, run, 3, "--train.ckpt_every", "2", "--resume", "--train.lr", "5e-4")) == 2
    assert "train.lr was" in capsys.readouterr().err
    assert snapshot(run) == before

    # Killed between its final checkpoint and final.json: a resume finishes it (evaluates, writes final.json).
    final = json.loads((run / "final.json").read_text())
    (run / "final.json").unlink()
    assert main(args(byte_wiki, run, 3, "--train.ckpt_every", "2", "--resume")) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"latentlm train: resuming {run} from {run / 'checkpoints' / 'step_00000003'} (step 3 of 3)")
    assert json.loads((run / "final.json").read_text())["val_loss"] == pytest.approx(final["val_loss"], abs=1e-6)


def test_resume_says_where_from_and_quiet_says_only_the_result(byte_wiki, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = make_config("llama-tiny", [*SMALL, "--data.path", str(byte_wiki), "--train.out_dir", str(run),
                                     "--train.max_steps", "4"])
    train(cfg, stop_after=2)
    capsys.readouterr()
    assert main(args(byte_wiki, run, 4, "--resume", "--train.log_every", "2")) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == (f"latentlm train: resuming {run} from {run / 'checkpoints' / 'step_00000002'} (step 2 of 4); "
                      "changed: train.log_every 1 -> 2")
    assert "steps=2->4" in out[1]

    quiet = tmp_path / "quiet"
    assert main(args(byte_wiki, quiet, 2, "--quiet", "--train.progress", "true", "--train.eval_every", "1")) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("done: val_loss") and len(captured.out.splitlines()) == 1
    assert "step 1: val_loss" not in captured.out and captured.err == ""  # no bar, no periodic lines


def test_vocab_size_comes_from_the_data_unless_given(byte_wiki, tmp_path, capsys):
    run = tmp_path / "run"
    # A preset that leaves vocab_size to the data trains on byte data without --model.vocab_size ...
    assert main(args(byte_wiki, run, 1)) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["vocab_size"] == 257  # ... and the run saves the concrete value
    capsys.readouterr()
    # An explicit value that does not match the data is refused as before.
    assert main(args(byte_wiki, tmp_path / "other", 1, "--model.vocab_size", "300")) == 2
    err = capsys.readouterr().err
    assert "the model has vocab_size 300 but the data's byte tokenizer has 257 tokens" in err
    assert not (tmp_path / "other").exists()
    # An explicit matching value is kept as given (not marked as derived).
    cfg = make_config(base={"model": dict(TINY_MODEL), "data": {"path": str(byte_wiki)}})
    assert cfg.model.vocab_size == 257 and "model.vocab_size" not in cfg.derived


def test_a_derived_vocab_size_is_taken_again_from_the_data_the_run_trains_on(byte_wiki, tmp_path):
    cfg = make_config("llama-tiny", [*SMALL, "--data.path", str(tmp_path / "not-yet"), "--train.out_dir",
                                     str(tmp_path / "run"), "--train.max_steps", "1"])
    assert cfg.model.vocab_size == 50257 and "GPT-2's" in cfg.derived["model.vocab_size"]
    cfg.data.path = str(byte_wiki)  # e.g. the data was prepared after the config was built
    train(cfg)
    assert cfg.model.vocab_size == 257
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["model"]["vocab_size"] == 257


def test_a_saved_config_without_vocab_size_keeps_the_old_default(byte_wiki):
    """Saved configs are concrete; one lacking the key (hand-edited) loads with the default of the
    versions that wrote it, 50257, not with the vocabulary of whatever its data path holds now."""
    saved = make_config(base={"model": dict(TINY_MODEL), "data": {"path": str(byte_wiki)}}).to_dict()
    del saved["model"]["vocab_size"]
    cfg = config_from_dict(saved)
    assert cfg.model.vocab_size == 50257 and not cfg.derived
    saved["model"]["vocab_size"] = 257
    assert config_from_dict(saved).model.vocab_size == 257
