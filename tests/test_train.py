"""The trainer: learning on real text, exact resume, non-finite steps, checkpoint safety."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from latentlm.errors import LatentLMError
from latentlm.loading import load_method
from latentlm.methods.ntp import NTP
from latentlm.train import checkpoint as ckpt_io
from latentlm.train.metrics import read_metrics
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
