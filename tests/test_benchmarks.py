"""Benchmark scripts run in CI-sized settings (numbers are not asserted as speeds)."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

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


def _table(stdout: str) -> list[list[str]]:
    """Body rows of the one markdown table a benchmark prints (cells stripped)."""
    lines = [line for line in stdout.splitlines() if line.startswith("| ")]
    return [[c.strip() for c in line.split("|")[1:-1]] for line in lines[1:]]


def _positive(cell: str) -> bool:
    value = float(cell.replace(",", "").rstrip("%"))
    return math.isfinite(value) and value > 0


ONE_THREAD = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny ops: threads only add contention on a shared CPU
TINY_PRESET = """model: {arch: gpt2, vocab_size: 300, block_size: 16, n_layer: 2, n_head: 2, n_embd: 32}
train: {batch_size: 2}
concepts: {layer: 0}
cocomix: {insert_layer: 1, n_concepts: 64, k_concepts: 4}
"""


def test_train_throughput_smoke(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY_PRESET)
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "train_throughput.py"), "--config",
                        str(tmp_path / "tiny.yaml"), "--steps", "1", "--warmup", "0", "--json", str(tmp_path / "t.json")],
                       capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert p.returncode == 0, p.stderr
    rows = _table(p.stdout)
    assert [r[0] for r in rows] == ["ntp", "cocomix, cached labels", "cocomix, labels on the fly", "kd", "pause (K=1)",
                                    "ponder (K=1)", "ponder (K=1), checkpoint=pass", "ponder (K=1), checkpoint=block",
                                    "ponder (K=2)", "loop (K=1)", "ponderlm (K=1)"]
    for r in rows:
        assert r[4] == "-"  # no datasheet peak on a CPU: MFU only against the measured matmul ceiling
        assert all(_positive(c) for c in r[1:4] + r[5:]), r
    assert rows[0][8:11] == ["1.00", "1.00", "1.00"]
    doc = json.loads((tmp_path / "t.json").read_text())
    by = {r["key"]: r for r in doc["rows"]}
    # the teacher's FLOPs count where the step runs it, and checkpointing saves activations
    assert by["cocomix-fly"]["flops_per_token"] > by["cocomix-cached"]["flops_per_token"]
    assert by["kd"]["teacher_flops_per_token"] > 0 == by["ntp"]["teacher_flops_per_token"]
    assert by["ponder1-pass"]["saved_mib"] < by["ponder1-block"]["saved_mib"] < by["ponder1"]["saved_mib"]


def test_generate_throughput_smoke(tmp_path):
    (tmp_path / "tiny.yaml").write_text(TINY_PRESET)
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "generate_throughput.py"), "--config",
                        str(tmp_path / "tiny.yaml"), "--contexts", "4,8", "--batch-sizes", "1", "--new-tokens", "2"],
                       capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert p.returncode == 0, p.stderr
    rows = _table(p.stdout)
    assert [(r[0], r[1]) for r in rows[::2]] == [(m, "4") for m in ["ntp", "cocomix", "kd", "pause (K=1)", "ponder (K=1)",
                                                                    "ponder (K=2)", "loop (K=1)", "ponderlm (K=1)"]]
    for r in rows:
        assert all(_positive(c) for c in r[1:]), r
    assert {r[7] for r in rows[:2]} == {"1.00"}


def test_cocomix_fidelity_smoke(tmp_path):
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "cocomix_fidelity.py"), "--steps", "2",
                        "--teacher-steps", "2", "--docs", "60", "--windows", "4", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=600, env=ONE_THREAD)
    assert p.returncode == 0, p.stderr
    tables = [line for line in p.stdout.splitlines() if line.startswith("| ")]
    labels = [r for r in tables if "%" in r]
    assert len(labels) == 5 and all(float(r.split("|")[3]) <= 1 for r in labels)
    runs = {r.split("|")[1].strip(): r.split("|")[3].strip() for r in tables if r.count("|") == 4 and "%" not in r
            and not r.startswith("| student") and not r.startswith("| labels")}
    assert runs["ours (defaults)"] == "+0.0000" and len(runs) == 14


def test_peer_train_smoke(tmp_path):
    """One row per arch x vocab x threads with latentlm's time; a peer is timed, or its column says why not."""
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peer_train.py"), "--n-layer", "1", "--n-embd", "32",
                        "--n-head", "2", "--seq-len", "16", "--batch-size", "2", "--vocabs", "300,64", "--threads", "1",
                        "--rounds", "1", "--warmup", "0", "--ab", "--json", str(tmp_path / "p.json")],
                       capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert p.returncode == 0, p.stderr
    rows = _table(p.stdout)
    assert [(r[0], r[1]) for r in rows] == [("gpt2", "300"), ("gpt2", "64"), ("llama", "300"), ("llama", "64")]
    for r in rows:
        assert _positive(r[4]) and _positive(r[5])  # latentlm, and latentlm with the plain head loss
        assert all(c.startswith("- (") or _positive(c) for c in r[6:8]), r
    doc = json.loads((tmp_path / "p.json").read_text())
    assert {row["vocab"] for row in doc["rows"]} == {300, 64}


def test_peer_decode_smoke(tmp_path):
    """latentlm eager and compiled (static cache, CPU backend) on a random core: the same tokens."""
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peer_decode.py"), "--model", "random",
                        "--n-layer", "1", "--n-embd", "32", "--n-head", "2", "--vocab", "300", "--no-peer",
                        "--compile", "--compile-backend", "aot_eager", "--batch-sizes", "1,2", "--prompt", "4",
                        "--new-tokens", "3", "--reps", "1", "--json", str(tmp_path / "d.json")],
                       capture_output=True, text=True, timeout=300, env=ONE_THREAD)
    assert p.returncode == 0, p.stderr
    rows = _table(p.stdout)
    assert [r[0] for r in rows] == ["1", "2"] and all(_positive(c) for r in rows for c in r[1:])
    doc = json.loads((tmp_path / "d.json").read_text())
    assert all(r["compiled_same_tokens"] for r in doc["rows"])


def test_peer_zeroshot_smoke(tmp_path):
    """Needs lm-eval and transformers (the hf / lm-eval extras): identical results, exit code 0."""
    from importlib.util import find_spec

    if find_spec("lm_eval") is None or find_spec("transformers") is None:
        pytest.skip("needs lm-eval and transformers (pip install 'latentlm[hf,lm-eval]')")
    p = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "peer_zeroshot.py"), "--model", "random",
                        "--tasks", "piqa,winogrande", "--limit", "3", "--batch-size", "4"],
                       capture_output=True, text=True, timeout=600, env=ONE_THREAD)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "results identical (log-likelihoods within 0.001, greedy flags, acc, acc_norm): True" in p.stdout
    assert [r[0] for r in _table(p.stdout)] == ["piqa", "winogrande", "all"]


@pytest.mark.slow
def test_gpu_check_dry_run(tmp_path):
    """benchmarks/gpu_check.sh at tiny shapes on the CPU: every stage runs and the table has its rows."""
    env = {**os.environ, "GPU_CHECK_DRY": "1", "GPU_CHECK_OUT": str(tmp_path), "PYTHON": sys.executable}
    p = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh")], capture_output=True, text=True,
                       timeout=900, env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    table = (tmp_path / "gpu_check.md").read_text()
    assert table.startswith("# GPU check: CPU dry run")
    rows = _table(table)
    checks = [r[0] for r in rows]
    assert checks[:2] == ["environment", "CUDA tests (pytest -m cuda)"]
    assert {"train: ntp", "train: kd", "train: ponder (K=1)", "decode, batch 1", "FSDP2 train, 1 rank (torchrun)"} \
        <= set(checks)
    assert any(c.startswith("KV cache: ") for c in checks)
    assert all(r[1] == "ok" for r in rows if r[0] != "environment"), [r for r in rows if r[1] != "ok"]


def test_doc_timings_times_each_command_of_a_block(tmp_path):
    """benchmarks/doc_timings.py's per-command clock: a multi-line command and a here-document count as
    one command each, the times add up to the block's, and a failing block stops with its output."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("doc_timings", ROOT / "benchmarks" / "doc_timings.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    body = "echo one\nsleep 0.3\npython3 - <<'END'\nprint(2)\nEND\nls \\\n  . > /dev/null\n"
    commands, wall, cpu = mod.time_block(body, tmp_path, {"PATH": "/usr/bin:/bin"})
    assert [c.split()[0] for c, _ in commands] == ["echo", "sleep", "python3", "ls"]
    assert dict((c.split()[0], s) for c, s in commands)["sleep"] >= 0.3
    assert sum(s for _, s in commands) <= wall + 0.05 and cpu >= 0
    with pytest.raises(SystemExit, match="block failed"):
        mod.time_block("echo before\nfalse\necho after\n", tmp_path, {"PATH": "/usr/bin:/bin"})
