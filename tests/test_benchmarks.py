"""Benchmark scripts run in CI-sized settings (numbers are not asserted as speeds)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_method_costs_smoke():
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "method_costs.py"), "--n-layer", "1", "--n-embd", "32",
                        "--n-head", "2", "--vocab", "300", "--seq-len", "16", "--batch", "2", "--steps", "1"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]]
            for line in p.stdout.splitlines() if line.startswith("| ") and not line.startswith("| method")}
    assert rows["ntp"][:3] == ["1.00", "1.00", "1.00"]
    # activation checkpointing trades memory, not FLOPs: fewer saved bytes than without it
    assert rows["ponder (K=1), checkpoint=pass"][0] == rows["ponder (K=1)"][0]
    assert float(rows["ponder (K=1), checkpoint=pass"][2]) < float(rows["ponder (K=1)"][2]) / 2
    assert float(rows["ponder (K=2)"][0]) > float(rows["ponder (K=1)"][0]) > 1


def test_label_cost_smoke(tiny_config):
    from latentlm.train.trainer import train

    cfg = tiny_config(max_steps=1)
    train(cfg)
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "label_cost.py"), "--teacher", cfg.train.out_dir,
                        "--layer", "0", "--latents", "64", "--k", "4", "--batch", "2", "--seq-len", "16",
                        "--steps", "1"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    rows = [line for line in p.stdout.splitlines() if line.startswith("| ") and "ms" not in line]
    assert len(rows) == 4 and rows[0].endswith("| 1.00 |")
