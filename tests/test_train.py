"""The trainer: learning on real text, exact resume, non-finite steps, checkpoint safety, metric sinks."""

import importlib.util
import json
import math
import os
import signal
import sys
import types
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentlm.checkpoint_files import read_manifest
from latentlm.cli import main
from latentlm.config import save_yaml
from latentlm.errors import Interrupted, LatentLMError
from latentlm.loading import load_method
from latentlm.methods.ntp import NTP
from latentlm.train import checkpoint as ckpt_io
from latentlm.train.metrics import WANDB_RUN_FILE, read_metrics
from latentlm.train.optim import lr_at
from latentlm.train.trainer import NonFiniteLossError, train


def weights(run_dir):
    return load_file(str(ckpt_io.latest_checkpoint(run_dir) / "model.safetensors"))


def test_loss_decreases_on_real_text(tiny_config):
    cfg = tiny_config(max_steps=60, eval_every=30, eval_batches=4)
    result = train(cfg)
    records = read_metrics(f"{cfg.train.out_dir}/metrics.jsonl")
    first = [r["loss"] for r in records if "loss" in r and not r.get("skipped")][:3]
    evals = [r["val_loss"] for r in records if "val_loss" in r]
    assert math.log(257) - 0.3 < sum(first) / 3 < math.log(257) + 0.3  # starts near uniform
    assert result["loss"] < 3.2  # bytes of English: unigram entropy is about 3 nats
    assert evals[-1] < evals[0] < math.log(257) and result["val_bpb"] == pytest.approx(evals[-1] / math.log(2), rel=0.05)
    final = json.loads(open(f"{cfg.train.out_dir}/final.json").read())
    assert final["val_loss"] == pytest.approx(result["val_loss"])


def test_schedule_warmup_then_cosine(tiny_config):
    t = tiny_config(max_steps=100, warmup_steps=10).train
    assert lr_at(0, t) == pytest.approx(t.lr / 10)
    assert lr_at(9, t) == pytest.approx(t.lr)
    assert lr_at(55, t) == pytest.approx((t.lr + t.min_lr) / 2)
    assert lr_at(100, t) == pytest.approx(t.min_lr)


def test_resume_reproduces_uninterrupted_run_exactly(tiny_config, tmp_path):
    """Stop after 5 of 10 steps (dropout on, grad accumulation 2), resume, and compare every
    weight bit for bit with a run that was never interrupted."""
    over = dict(max_steps=10, grad_accum=2, ckpt_every=3, keep_last=2)
    full = tiny_config(**over, out_dir=str(tmp_path / "full"))
    full.model.dropout = 0.1
    train(full)
    part = tiny_config(**over, out_dir=str(tmp_path / "part"))
    part.model.dropout = 0.1
    stopped = train(part, stop_after=5)
    assert stopped["step"] == 5 and ckpt_io.latest_checkpoint(part.train.out_dir).name == "step_00000005"
    resumed = train(part, resume=True)
    assert resumed["step"] == 10
    a, b = weights(full.train.out_dir), weights(part.train.out_dir)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # keep_last=2 pruned the older checkpoints
    assert [p.name for p in ckpt_io.list_checkpoints(part.train.out_dir)] == ["step_00000009", "step_00000010"]
    # the per-step losses after the resume equal the uninterrupted ones
    la = [r["loss"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl") if "loss" in r]
    lb = [r["loss"] for r in read_metrics(tmp_path / "part" / "metrics.jsonl") if "loss" in r]
    assert la == lb


def test_existing_run_needs_resume_and_resume_needs_checkpoint(tiny_config):
    cfg = tiny_config(max_steps=2)
    with pytest.raises(LatentLMError, match="holds no checkpoint"):
        train(cfg, resume=True)
    train(cfg)
    with pytest.raises(LatentLMError, match="already holds checkpoints; pass --resume"):
        train(cfg)


def _nan_on_calls(monkeypatch, bad_calls):
    calls = {"n": 0}
    orig = NTP.forward

    def forward(self, x, y, nll=False):
        out = orig(self, x, y, nll)
        if not nll and self.training:
            calls["n"] += 1
            if calls["n"] in bad_calls:
                return out[0] * float("nan"), out[1]
        return out

    monkeypatch.setattr(NTP, "forward", forward)


def test_non_finite_step_is_skipped_not_applied(tiny_config, monkeypatch):
    cfg = tiny_config(max_steps=6, ckpt_every=1, keep_last=10)
    _nan_on_calls(monkeypatch, {4})
    train(cfg)
    records = read_metrics(f"{cfg.train.out_dir}/metrics.jsonl")
    assert [r["step"] for r in records if r.get("skipped")] == [4]
    names = [p.name[-2:] for p in ckpt_io.list_checkpoints(cfg.train.out_dir)]
    assert names == ["01", "02", "03", "05", "06"]  # none written inside the bad step
    optim = torch.load(ckpt_io.latest_checkpoint(cfg.train.out_dir) / "optimizer.pt", weights_only=True)
    assert {float(s["step"]) for s in optim["state"].values()} == {5.0}  # 6 steps, 5 updates applied
    state = json.loads((ckpt_io.latest_checkpoint(cfg.train.out_dir) / "trainer_state.json").read_text())
    assert state["skipped_steps"] == 1


def test_divergence_stops_with_clear_error(tiny_config, monkeypatch):
    cfg = tiny_config(max_steps=20, ckpt_every=2, max_bad_steps=3)
    _nan_on_calls(monkeypatch, set(range(5, 100)))
    with pytest.raises(NonFiniteLossError, match=r"3 optimizer steps in a row .*checkpoints/step_00000004$"):
        train(cfg)


def test_non_finite_last_step_ends_the_run_with_an_error_and_no_summary(tiny_config, tmp_path, monkeypatch, capsys):
    """Policy: a run that ends inside a non-finite streak (here its very last step) stops with one line
    (exit 2 through the CLI) instead of finishing: the streak's weights are never checkpointed, so no
    final checkpoint and no final.json describing weights that exist nowhere. The last good checkpoint
    verifies, and --resume redoes the steps after it, ending exactly where a clean run ends."""
    cfg = tiny_config(max_steps=6, ckpt_every=4, keep_last=5)
    run = Path(cfg.train.out_dir)
    save_yaml(cfg, tmp_path / "run.yaml")
    _nan_on_calls(monkeypatch, {6})
    assert main(["train", "--config", str(tmp_path / "run.yaml")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: the run ended inside a streak of 1 optimizer step(s) with a "
                                               "non-finite loss or gradient (step 6)"), err
    assert f"no final.json were written. The last good checkpoint is {run}/checkpoints/step_00000004: run the " \
           "same command with --resume" in err[0]
    assert not (run / "final.json").exists()
    assert [p.name for p in ckpt_io.list_checkpoints(run)] == ["step_00000004"]
    assert read_manifest(run / "checkpoints" / "step_00000004")["step"] == 4  # verifies every file's sha256
    assert [r["step"] for r in read_metrics(run / "metrics.jsonl") if r.get("skipped")] == [6]

    monkeypatch.undo()  # the fault is gone (e.g. a bad node): resuming finishes like a clean run
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--resume"]) == 0
    clean = tiny_config(max_steps=6, ckpt_every=4, out_dir=str(tmp_path / "clean"))
    train(clean)
    a, b = weights(run), weights(clean.train.out_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)
    records = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r] == [1, 2, 3, 4, 5, 6] and not any(r.get("skipped") for r in records)
    assert json.loads((run / "final.json").read_text())["val_loss"] == pytest.approx(
        json.loads((tmp_path / "clean" / "final.json").read_text())["val_loss"])

    # a streak reaching the end with no checkpoint before it: nothing to resume, start over
    _nan_on_calls(monkeypatch, {2, 3})
    bare = tiny_config(max_steps=3, out_dir=str(tmp_path / "bare"))
    with pytest.raises(NonFiniteLossError, match=r"streak of 2 optimizer step\(s\) .*\(steps 2-3\).*No checkpoint was "
                                                 "saved before it: run the same command again without --resume"):
        train(bare)
    assert not (tmp_path / "bare" / "final.json").exists() and not ckpt_io.list_checkpoints(tmp_path / "bare")


def test_stop_request_inside_a_non_finite_streak_names_the_checkpoint_before_it(tiny_config, monkeypatch):
    """SIGINT during a streak: no checkpoint of the streak is written, and the message says which one
    the resume continues from (not "saved" the step it stopped at)."""
    cfg = tiny_config(max_steps=8, ckpt_every=2)
    calls, orig = {"n": 0}, NTP.forward

    def forward(self, x, y, nll=False):
        out = orig(self, x, y, nll)
        if nll or not self.training:
            return out
        calls["n"] += 1
        if calls["n"] == 4:
            os.kill(os.getpid(), signal.SIGINT)  # the trainer's handler: stop after this step
        return (out[0] * float("nan"), out[1]) if calls["n"] in (3, 4) else out

    monkeypatch.setattr(NTP, "forward", forward)
    with pytest.raises(Interrupted, match=r"^SIGINT at step 4, inside a streak of 2 non-finite step\(s\), which are "
                                          r"never saved\. The last good checkpoint is .*step_00000002: run the same "
                                          r"command with --resume to continue from it$"):
        train(cfg)
    assert [p.name for p in ckpt_io.list_checkpoints(cfg.train.out_dir)] == ["step_00000002"]


def test_checkpoint_integrity_checks(tiny_config, tmp_path):
    cfg = tiny_config(max_steps=2, ckpt_every=1)
    train(cfg)
    ck = ckpt_io.latest_checkpoint(cfg.train.out_dir)
    method, loaded_cfg, manifest = load_method(cfg.train.out_dir)
    assert manifest["step"] == 2 and loaded_cfg == cfg and manifest["tokenizer"]["name"] == "byte"
    # a half-written checkpoint (no manifest) is never picked up
    (ck.parent / ".step_00000003.tmp-1").mkdir()
    (ck.parent / "step_00000004").mkdir()
    assert ckpt_io.latest_checkpoint(cfg.train.out_dir) == ck
    # a damaged weight file is detected
    data = bytearray((ck / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (ck / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(LatentLMError, match="does not match its manifest"):
        load_method(ck)
    data[-1] ^= 0xFF
    (ck / "model.safetensors").write_bytes(bytes(data))
    (ck / "optimizer.pt").unlink()
    with pytest.raises(LatentLMError, match="optimizer.pt is missing"):
        load_method(ck)
    with pytest.raises(LatentLMError, match="no checkpoint found"):
        load_method(tmp_path / "nowhere")


def test_data_vocab_mismatch_fails_before_training(tiny_config):
    cfg = tiny_config()
    cfg.model.vocab_size = 300
    with pytest.raises(LatentLMError, match="vocab_size 300 .* byte tokenizer has 257"):
        train(cfg)
    assert not (cfg.train.out_dir and __import__("pathlib").Path(cfg.train.out_dir).exists())


def test_corrupt_shard_detected_before_training(tiny_config, tmp_path):
    import shutil

    cfg = tiny_config()
    data = tmp_path / "data"
    shutil.copytree(cfg.data.path, data)
    shard = data / "train_000.bin"
    raw = bytearray(shard.read_bytes())
    raw[100] ^= 0xFF  # same size, different content: only the checksum can tell
    shard.write_bytes(bytes(raw))
    cfg.data.path = str(data)
    with pytest.raises(LatentLMError, match="train_000.bin"):
        train(cfg)
    assert not (tmp_path / "run").exists()


def test_mfu_logged_when_peak_known(tiny_config):
    cfg = tiny_config(max_steps=3, peak_flops=1e12)
    train(cfg)
    rec = [r for r in read_metrics(f"{cfg.train.out_dir}/metrics.jsonl") if "tok_per_s" in r][-1]
    assert rec["flops_per_token"] == NTP.train_flops_per_token(load_method(cfg.train.out_dir)[0], 64)
    assert rec["mfu"] == pytest.approx(rec["flops_per_token"] * rec["tok_per_s"] / 1e12)
    cfg2 = tiny_config(max_steps=1, out_dir=cfg.train.out_dir + "2")
    train(cfg2)  # on CPU the peak is unknown: no MFU rather than a made-up one
    assert all("mfu" not in r for r in read_metrics(f"{cfg2.train.out_dir}/metrics.jsonl"))


@pytest.mark.slow
def test_compile_matches_eager(tiny_config, tmp_path):
    eager = tiny_config(max_steps=3, out_dir=str(tmp_path / "eager"))
    comp = tiny_config(max_steps=3, out_dir=str(tmp_path / "compiled"), compile=True)
    train(eager)
    train(comp)
    la = [r["loss"] for r in read_metrics(tmp_path / "eager" / "metrics.jsonl") if "loss" in r]
    lb = [r["loss"] for r in read_metrics(tmp_path / "compiled" / "metrics.jsonl") if "loss" in r]
    assert la == pytest.approx(lb, rel=1e-4)


@pytest.mark.parametrize("sink", ["tensorboard", "wandb"])
def test_optional_metric_sinks(sink, tiny_config, tmp_path, monkeypatch):
    pytest.importorskip(sink, reason=f"{sink} is an optional extra (pip install 'latentlm[{sink}]')")
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = tiny_config(max_steps=2, **{sink: True})
    train(cfg)
    assert (tmp_path / "run" / sink).exists() and len(list((tmp_path / "run" / sink).rglob("*"))) > 0


def test_missing_wandb_fails_before_anything_is_written(tiny_config, tmp_path, monkeypatch, capsys):
    """--train.wandb true without the wandb package: one line, exit 2, no run directory; on --resume the
    run directory is left exactly as it was (config.yaml, metrics.jsonl untouched)."""
    if importlib.util.find_spec("wandb") is not None:  # installed: make it missing (here it is not installed)
        monkeypatch.setitem(sys.modules, "wandb", None)
    cfg = tiny_config(max_steps=2, ckpt_every=1)
    run = Path(cfg.train.out_dir)
    save_yaml(cfg, tmp_path / "run.yaml")
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--train.wandb", "true"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: train.wandb=true needs wandb: pip install 'latentlm[wandb]' (set WANDB_MODE=offline to "
                   "run without network)"]
    assert not run.exists()
    assert main(["train", "--config", str(tmp_path / "run.yaml")]) == 0
    before = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.rglob("*") if p.is_file()}
    assert main(["train", "--config", str(tmp_path / "run.yaml"), "--resume", "--train.wandb", "true"]) == 2
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in run.rglob("*") if p.is_file()} == before


class FakeWandb(types.ModuleType):
    """Stands in for the ``wandb`` package: records every ``init``'s keywords and the steps logged."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.steps = [], []

    def init(self, **kwargs):
        self.inits.append(kwargs)
        return types.SimpleNamespace(id=kwargs.get("id") or f"run-{len(self.inits)}",
                                     log=lambda nums, step: self.steps.append(step), finish=lambda: None)


def test_resumed_run_continues_its_wandb_run(tiny_config, tmp_path, monkeypatch):
    """The W&B run id is kept in RUN/wandb_run.json; --resume passes it back (id=..., resume="allow"),
    a fresh start (even in a directory holding a stale id) begins a new W&B run."""
    fake = FakeWandb()
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = tiny_config(max_steps=4, ckpt_every=2, wandb=True)
    run = Path(cfg.train.out_dir)
    train(cfg, stop_after=2)
    assert "id" not in fake.inits[0] and "resume" not in fake.inits[0]
    assert fake.inits[0]["project"] == "latentlm" and fake.inits[0]["dir"] == str(run)
    assert json.loads((run / WANDB_RUN_FILE).read_text())["id"] == "run-1"
    train(cfg, resume=True)
    assert fake.inits[1]["id"] == "run-1" and fake.inits[1]["resume"] == "allow"
    assert json.loads((run / WANDB_RUN_FILE).read_text())["id"] == "run-1"
    assert sorted(set(fake.steps)) == [1, 2, 3, 4]
    fresh = tiny_config(max_steps=1, wandb=True, out_dir=str(tmp_path / "fresh"))
    (tmp_path / "fresh").mkdir()
    (tmp_path / "fresh" / WANDB_RUN_FILE).write_text('{"id": "stale"}')
    train(fresh)
    assert "id" not in fake.inits[2] and json.loads((tmp_path / "fresh" / WANDB_RUN_FILE).read_text())["id"] == "run-3"
