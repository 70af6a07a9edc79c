"""Two CPU processes under torchrun (gloo) train exactly like one process with the same
global batch, for DDP and FSDP2, and their checkpoints load into a single process: the same
per-step losses and method metrics (all-reduced means), the same validation tokens and loss,
the same final weights. CoCoMix's concept loss is normalised by the global label count."""

import os
import shutil
import sys

import pytest
import torch

from latentlm.config import make_config, save_yaml
from latentlm.eval import perplexity
from latentlm.eval.perplexity import evaluate_tokens
from latentlm.loading import load_method
from latentlm.methods import build_method
from latentlm.train.metrics import read_metrics
from latentlm.train.trainer import train

from conftest import TINY_MODEL, random_sae_for, run_torchrun


@pytest.fixture(scope="module")
def teacher_sae(byte_wiki, tmp_path_factory):
    """A 2-step byte-level teacher and a random SAE on its block 0 carrying the teacher's identity
    (its attribution labels mask a different number of labels in every window)."""
    root = tmp_path_factory.mktemp("cocomix")
    train(make_config(base={"model": dict(TINY_MODEL), "data": {"path": str(byte_wiki)},
                            "train": {"out_dir": str(root / "teacher"), "max_steps": 2, "batch_size": 2,
                                      "eval_batches": 1, "progress": False, "device": "cpu"}}))
    return root / "teacher", random_sae_for(root / "teacher", root / "sae")


# Logged per step and equal to one process's (tok_per_s is a timing; the rest must match).
TIMINGS = ("tok_per_s",)


@pytest.mark.slow
@pytest.mark.parametrize("mode, method", [("ddp", "ntp"), ("fsdp2", "ntp"), ("ddp", "ponder"), ("fsdp2", "ponder"),
                                          ("ddp", "cocomix")])
def test_two_processes_match_one(mode, method, tiny_config, tmp_path, request):
    """ponder reuses every block in several passes per step (and draws its Jacobi n per step):
    both wrappers must still match one process. cocomix's concept loss is a mean over the valid
    labels of the whole global batch (each rank's count differs), with 2 micro-batches per step."""
    over = dict(grad_accum=2, batch_size=2) if method == "cocomix" else dict(batch_size=4)
    single = tiny_config(max_steps=6, lr=3e-3, warmup_steps=1, eval_batches=1, ckpt_every=3, eval_every=3,
                         out_dir=str(tmp_path / "single"), method=method, **over)
    if method == "cocomix":
        teacher, sae = request.getfixturevalue("teacher_sae")
        single.data.seq_len = 32
        single.teacher.path, single.concepts.sae, single.concepts.layer = str(teacher), str(sae), 0
        single.cocomix.insert_layer = 1
    train(single)
    save_yaml(single, tmp_path / "config.yaml")
    out = tmp_path / mode
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "latentlm", "train", "--config", str(tmp_path / "config.yaml"), "--train.out_dir", str(out),
           "--train.batch_size", str(single.train.batch_size // 2), "--train.dist", mode]
    proc = run_torchrun(cmd, env=env, capture_output=True, text=True, timeout=240,
                        before_retry=lambda: shutil.rmtree(out, ignore_errors=True))
    assert proc.returncode == 0, proc.stderr[-3000:]

    def losses(run):
        return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]

    a, b = losses(tmp_path / "single"), losses(out)
    assert len(a) == len(b) == 6 and a[-1] < a[0]
    assert a == pytest.approx(b, rel=1e-5, abs=1e-5)
    # every logged number (the method's metrics too: concept_loss / concept_acc, jacobi_residual, and the
    # periodic and final validation on the same tokens) is the one process's, not rank 0's share
    ra, rb = read_metrics(tmp_path / "single" / "metrics.jsonl"), read_metrics(out / "metrics.jsonl")
    assert [r.keys() for r in ra] == [r.keys() for r in rb] and sum("val_loss" in r for r in ra) == 2
    for r, q in zip(ra, rb):
        for k, v in r.items():
            if k not in TIMINGS and not isinstance(v, str):
                assert q[k] == pytest.approx(v, rel=1e-5, abs=1e-6), (r["step"], k)

    method, cfg, manifest = load_method(out)  # the distributed checkpoint in one process
    assert manifest["world_size"] == 2 and cfg.train.dist == mode
    ref, _, _ = load_method(tmp_path / "single")
    for (k, p), (k2, q) in zip(method.state_dict().items(), ref.state_dict().items()):
        assert k == k2
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)


def test_sharded_evaluation_scores_each_window_once(monkeypatch):
    """Each rank scores a disjoint share of the same windows, in the same number of forward calls
    (FSDP gathers weights in every forward), a rank with an empty share of a short last batch
    scoring nothing: with the all-reduce left out, the ranks' partial sums add up to one process's."""
    torch.manual_seed(0)
    method = build_method(make_config(overrides=[f"--model.{k}={v}" for k, v in TINY_MODEL.items()])).eval()
    tokens = torch.randint(0, 257, (16 * 5 + 5,), generator=torch.Generator().manual_seed(1)).numpy()
    lengths = torch.randint(1, 4, (257,), generator=torch.Generator().manual_seed(2)).numpy()
    kw = dict(seq_len=16, batch_size=2, byte_lengths=lengths)
    one = evaluate_tokens(method, tokens, **kw)
    monkeypatch.setattr(perplexity.dist, "all_reduce", lambda t, op=None: None)
    calls, forward = [], method.forward
    monkeypatch.setattr(method, "forward", lambda *a, **k: calls.append(a[0].shape[0]) or forward(*a, **k))
    shares = []
    for rank in range(2):
        calls.clear()
        shares.append((evaluate_tokens(method, tokens, rank=rank, world_size=2, **kw), list(calls)))
    (r0, c0), (r1, c1) = shares
    # windows: 4 full in one global batch (2 + 2), a 5th full one (rank 1 idle), the short tail (rank 1 idle)
    assert c0 == [2, 1, 1] and c1 == [2, 1, 1] and r0["tokens"] == r1["tokens"] == one["tokens"] == 84
    assert r0["loss"] + r1["loss"] == pytest.approx(one["loss"], rel=1e-6)
    assert r0["bytes"] + r1["bytes"] == one["bytes"]
