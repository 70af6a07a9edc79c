"""Two CPU processes under torchrun (gloo) train exactly like one process with the same
global batch, for DDP and FSDP2, and their checkpoints load into a single process."""

import os
import subprocess
import sys

import pytest
import torch

from latentlm.loading import load_method
from latentlm.train.metrics import read_metrics
from latentlm.train.trainer import train

from latentlm.config import save_yaml


@pytest.mark.slow
@pytest.mark.parametrize("mode, method", [("ddp", "ntp"), ("fsdp2", "ntp"), ("ddp", "ponder"), ("fsdp2", "ponder")])
def test_two_processes_match_one(mode, method, tiny_config, tmp_path):
    """ponder reuses every block in several passes per step (and draws its Jacobi n per step):
    both wrappers must still match one process."""
    single = tiny_config(max_steps=6, lr=3e-3, warmup_steps=1, batch_size=4, eval_batches=1, ckpt_every=3,
                         out_dir=str(tmp_path / "single"), method=method)
    train(single)
    save_yaml(single, tmp_path / "config.yaml")
    out = tmp_path / mode
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "latentlm", "train", "--config", str(tmp_path / "config.yaml"), "--train.out_dir", str(out),
           "--train.batch_size", "2", "--train.dist", mode]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def losses(run):
        return [r["loss"] for r in read_metrics(run / "metrics.jsonl") if "loss" in r]

    a, b = losses(tmp_path / "single"), losses(out)
    assert len(a) == len(b) == 6 and a[-1] < a[0]
    assert a == pytest.approx(b, rel=1e-5, abs=1e-5)

    method, cfg, manifest = load_method(out)  # the distributed checkpoint in one process
    assert manifest["world_size"] == 2 and cfg.train.dist == mode
    ref, _, _ = load_method(tmp_path / "single")
    for (k, p), (k2, q) in zip(method.state_dict().items(), ref.state_dict().items()):
        assert k == k2
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
