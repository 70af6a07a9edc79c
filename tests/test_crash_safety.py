"""Fault injection: SIGKILL at random moments and mid-write, SIGTERM / SIGINT, a second process on
the same run, a full disk. Nothing may be lost beyond the last checkpoint and a resumed run must
end bit for bit where an uninterrupted one does (docs/RELIABILITY.md)."""

from __future__ import annotations

import errno
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from latentlm.cli import main
from latentlm.concepts.sae import load_sae
from latentlm.config import make_config, save_yaml
from latentlm.data.prepare import load_manifest
from latentlm.fileio import DELAY_ENV, LOCK_FILE
from latentlm.train import checkpoint as ckpt_io
from latentlm.train.metrics import read_metrics
from latentlm.train.trainer import train

from conftest import TINY_MODEL, random_sae_for, run_torchrun

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS, CKPT_EVERY = 30, 4


@pytest.fixture(scope="module")
def teacher_sae(byte_wiki, tmp_path_factory) -> tuple[Path, Path]:
    """A 2-step byte-level teacher and a random SAE on its block 0 carrying the teacher's identity."""
    root = tmp_path_factory.mktemp("cocomix")
    cfg = make_config(base={"model": dict(TINY_MODEL), "data": {"path": str(byte_wiki)},
                            "train": {"out_dir": str(root / "teacher"), "max_steps": 2, "batch_size": 2,
                                      "eval_batches": 1, "progress": False, "device": "cpu"}})
    train(cfg)
    return root / "teacher", random_sae_for(root / "teacher", root / "sae")


def run_config(method: str, data: Path, out: Path, teacher_sae: tuple[Path, Path]):
    base = {"model": dict(TINY_MODEL), "data": {"path": str(data), "seq_len": 32},
            "train": {"method": method, "out_dir": str(out), "batch_size": 2, "max_steps": STEPS, "lr": 3e-3,
                      "warmup_steps": 2, "eval_every": 0, "eval_batches": 1, "ckpt_every": CKPT_EVERY,
                      "keep_last": 2, "log_every": 1, "progress": False, "device": "cpu"}}
    if method == "cocomix":
        base["teacher"] = {"path": str(teacher_sae[0])}
        base["concepts"] = {"sae": str(teacher_sae[1]), "layer": 0}
        base["cocomix"] = {"insert_layer": 1}
    return make_config(base=base)


def spawn(*args: str, delay: float | None = None, log: Path | None = None) -> subprocess.Popen:
    """``latentlm *args`` in a child process (stdout to ``log`` if given, so a test can poll it)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop(DELAY_ENV, None)
    if delay is not None:
        env[DELAY_ENV] = str(delay)
    out = open(log, "w") if log is not None else subprocess.PIPE
    return subprocess.Popen([sys.executable, "-m", "latentlm", *args], env=env, stdout=out,
                            stderr=subprocess.PIPE, text=True)


def wait_for(cond, proc: subprocess.Popen, timeout: float = 60.0) -> bool:
    """Poll ``cond()`` until true (True) or until ``proc`` exits (False)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if cond():
            return True
        if proc.poll() is not None:
            return cond()
        time.sleep(0.005)
    raise AssertionError("timed out waiting for the process")


def kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.communicate()


def assert_checkpoints_sound(run: Path) -> None:
    """Every visible step_* directory is a complete, verified checkpoint."""
    root = run / "checkpoints"
    visible = [p for p in root.iterdir() if not p.name.startswith(".")] if root.is_dir() else []
    assert [p.name for p in visible if not p.name.startswith("step_")] == []
    for p in visible:
        assert ckpt_io.read_manifest(p)["step"] == ckpt_io.step_of(p)


def assert_same_run(ref: Path, run: Path, steps: int = STEPS) -> None:
    a = load_file(str(ckpt_io.latest_checkpoint(ref) / "model.safetensors"))
    b = load_file(str(ckpt_io.latest_checkpoint(run) / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[r["loss"] for r in read_metrics(d / "metrics.jsonl") if "loss" in r] for d in (ref, run)]
    assert len(losses[0]) == steps and losses[0] == losses[1]  # the log holds each step once


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ntp", "cocomix", "ponder"])
def test_sigkill_anywhere_then_resume_is_bit_exact(method, byte_wiki, teacher_sae, tmp_path):
    """Kill once inside a checkpoint write (the test seam sleeps there) and twice at seeded random
    moments of training; after each kill the visible checkpoints are sound, and the resumed run ends
    with exactly the weights and per-step losses of one that was never interrupted."""
    ref = run_config(method, byte_wiki, tmp_path / "ref", teacher_sae)
    train(ref)
    cfg = run_config(method, byte_wiki, tmp_path / "run", teacher_sae)
    save_yaml(cfg, tmp_path / "config.yaml")
    run, rng = tmp_path / "run", random.Random(f"kill-{method}")
    ckpts = run / "checkpoints"
    for round_ in range(4):
        args = ["train", "--config", str(tmp_path / "config.yaml")]
        if ckpt_io.latest_checkpoint(run) is not None:
            args.append("--resume")
        if round_ == 0:  # mid-write: wait until a checkpoint is being assembled, then kill
            proc = spawn(*args, delay=30)
            assert wait_for(lambda: ckpts.is_dir() and any(p.name.startswith(".step_") for p in ckpts.iterdir()),
                            proc)
            kill(proc)
            assert ckpt_io.latest_checkpoint(run) is None  # the half-written first checkpoint is invisible
        elif round_ < 3:  # a seeded random moment: a random step past the last checkpoint, then a bit more
            log, done = tmp_path / f"stdout-{round_}", ckpt_io.latest_checkpoint(run)
            target = rng.randint((ckpt_io.step_of(done) if done else 0) + 1, STEPS - 2)
            proc = spawn(*args, log=log)
            assert wait_for(lambda: "latentlm train:" in log.read_text()  # printed after the log is trimmed
                            and (run / "metrics.jsonl").read_text().count("\n") >= target, proc)
            time.sleep(rng.uniform(0.0, 0.02))
            kill(proc)
        else:
            proc = spawn(*args)
            _, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
        assert_checkpoints_sound(run)
    assert ckpt_io.step_of(ckpt_io.latest_checkpoint(run)) == STEPS
    assert_same_run(tmp_path / "ref", run)


@pytest.mark.slow
def test_sigint_and_sigterm_checkpoint_and_exit_then_resume_exactly(byte_wiki, teacher_sae, tmp_path):
    """SIGINT exits 130 and SIGTERM 143, each after saving a checkpoint at the step it stopped
    (a run long enough that the signal always lands mid-run); the resumed run is bit-exact."""
    steps = 100
    ref = run_config("ntp", byte_wiki, tmp_path / "ref", teacher_sae)
    ref.train.max_steps = steps
    train(ref)
    cfg = run_config("ntp", byte_wiki, tmp_path / "run", teacher_sae)
    cfg.train.ckpt_every, cfg.train.max_steps = 0, steps  # only the stops and the end write checkpoints
    save_yaml(cfg, tmp_path / "config.yaml")
    run = tmp_path / "run"
    stops = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        args = ["train", "--config", str(tmp_path / "config.yaml")] + (["--resume"] if stops else [])
        proc = spawn(*args)
        logged = stops[-1] if stops else 0
        assert wait_for(lambda: (run / "metrics.jsonl").is_file()
                        and (run / "metrics.jsonl").read_text().count("\n") > logged + 2, proc)
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 128 + sig, err
        last = err.strip().splitlines()[-1]
        step = ckpt_io.step_of(ckpt_io.latest_checkpoint(run))
        assert last == (f"stopped: {sig.name} at step {step}: saved {run / 'checkpoints' / f'step_{step:08d}'}; "
                        "run the same command with --resume to continue")
        assert step < steps and (not stops or step > stops[-1])
        stops.append(step)
        assert_checkpoints_sound(run)
    assert main(["train", "--config", str(tmp_path / "config.yaml"), "--resume"]) == 0
    assert_same_run(tmp_path / "ref", run, steps)


@pytest.mark.slow
def test_second_writer_is_refused_and_a_killed_holder_does_not_block_resume(byte_wiki, teacher_sae, tmp_path,
                                                                             capsys):
    """While a run is parked inside its first checkpoint, `train` on its directory (fresh or
    --resume) is refused with the holder's pid; once the holder is SIGKILLed, the next start works."""
    cfg = run_config("ntp", byte_wiki, tmp_path / "run", teacher_sae)
    save_yaml(cfg, tmp_path / "config.yaml")
    run = tmp_path / "run"
    proc = spawn("train", "--config", str(tmp_path / "config.yaml"), delay=30)  # parks in its first checkpoint
    assert wait_for(lambda: (run / "checkpoints").is_dir(), proc)
    assert (run / LOCK_FILE).read_text().strip() == str(proc.pid)
    for extra in ([], ["--resume"]):
        assert main(["train", "--config", str(tmp_path / "config.yaml"), *extra]) == 2
        err = capsys.readouterr().err
        assert err == (f"error: {run} is in use by another latentlm process (pid {proc.pid}); wait for it to finish "
                       "or stop it, or choose another --train.out_dir\n")
    kill(proc)
    assert main(["train", "--config", str(tmp_path / "config.yaml")]) == 0  # no checkpoint yet: a fresh start
    assert ckpt_io.step_of(ckpt_io.latest_checkpoint(run)) == STEPS


def test_disk_full_mid_checkpoint_keeps_the_previous_one(byte_wiki, teacher_sae, tmp_path, monkeypatch, capsys):
    """ENOSPC while the second checkpoint is written: one clear line, exit 2, the first checkpoint
    verified intact and no scratch directory left; after freeing space the resume is bit-exact."""
    train(run_config("ntp", byte_wiki, tmp_path / "ref", teacher_sae))
    cfg = run_config("ntp", byte_wiki, tmp_path / "run", teacher_sae)
    save_yaml(cfg, tmp_path / "config.yaml")
    run = tmp_path / "run"
    calls = {"n": 0}
    real = ckpt_io.save_yaml

    def full_disk(c, path):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real(c, path)

    monkeypatch.setattr(ckpt_io, "save_yaml", full_disk)
    assert main(["train", "--config", str(tmp_path / "config.yaml")]) == 2
    first = run / "checkpoints" / f"step_{CKPT_EVERY:08d}"
    assert capsys.readouterr().err == (
        f"error: cannot write checkpoint {run / 'checkpoints' / f'step_{2 * CKPT_EVERY:08d}'} (No space left on "
        f"device); free disk space or make {run / 'checkpoints'} writable, then resume: the previous checkpoint "
        f"{first} is intact\n")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [first.name]
    assert_checkpoints_sound(run)
    monkeypatch.undo()
    assert main(["train", "--config", str(tmp_path / "config.yaml"), "--resume"]) == 0
    assert_same_run(tmp_path / "ref", run)


class _FullAfter:
    """A file whose writes fail with ENOSPC after ``n`` of them, like a disk filling up."""

    def __init__(self, f, n: int):
        self.f, self.n = f, n

    def write(self, text: str) -> int:
        self.n -= 1
        if self.n < 0:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return self.f.write(text)

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        self.f.close()


def test_disk_full_while_logging_metrics(byte_wiki, teacher_sae, tmp_path, monkeypatch, capsys):
    """The metrics log hits a full disk at step 7: one line saying to free space and resume; the
    checkpoint of step 4 verifies and the resumed run is bit-exact (its log without duplicates)."""
    from latentlm.train.metrics import MetricLogger

    train(run_config("ntp", byte_wiki, tmp_path / "ref", teacher_sae))
    save_yaml(run_config("ntp", byte_wiki, tmp_path / "run", teacher_sae), tmp_path / "config.yaml")
    real_init = MetricLogger.__init__

    def filling(self, *args, **kw):
        real_init(self, *args, **kw)
        self.file = _FullAfter(self.file, 6)

    monkeypatch.setattr(MetricLogger, "__init__", filling)
    assert main(["train", "--config", str(tmp_path / "config.yaml")]) == 2
    run = tmp_path / "run"
    assert capsys.readouterr().err == (f"error: cannot append to {run / 'metrics.jsonl'} (No space left on device); "
                                       "free disk space, then run the same command with --resume\n")
    assert [p.name for p in ckpt_io.list_checkpoints(run)] == [f"step_{CKPT_EVERY:08d}"]
    assert_checkpoints_sound(run)
    monkeypatch.undo()
    assert main(["train", "--config", str(tmp_path / "config.yaml"), "--resume"]) == 0
    assert_same_run(tmp_path / "ref", run)


def test_unwritable_output_directory_is_one_clear_line(byte_wiki, teacher_sae, tmp_path, capsys):
    """An out_dir that cannot be created (its parent is a file) fails before any work."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cfg = run_config("ntp", byte_wiki, blocker / "run", teacher_sae)
    save_yaml(cfg, tmp_path / "config.yaml")
    assert main(["train", "--config", str(tmp_path / "config.yaml")]) == 2
    assert capsys.readouterr().err == (f"error: cannot write to {blocker / 'run'} (Not a directory); choose another "
                                       "--train.out_dir\n")


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions")
def test_read_only_checkpoint_directory(byte_wiki, teacher_sae, tmp_path, capsys):
    cfg = run_config("ntp", byte_wiki, tmp_path / "run", teacher_sae)
    cfg.train.max_steps = CKPT_EVERY * 2
    save_yaml(cfg, tmp_path / "config.yaml")
    assert main(["train", "--config", str(tmp_path / "config.yaml"), "--train.max_steps", str(CKPT_EVERY)]) == 0
    (tmp_path / "run" / "checkpoints").chmod(0o555)
    try:
        assert main(["train", "--config", str(tmp_path / "config.yaml"), "--resume"]) == 2
        assert "Permission denied" in capsys.readouterr().err
        assert_checkpoints_sound(tmp_path / "run")
    finally:
        (tmp_path / "run" / "checkpoints").chmod(0o755)


@pytest.mark.slow
@pytest.mark.parametrize("command", ["prepare", "sae", "label"])
def test_killed_artifact_writers_leave_nothing_half_written(command, byte_wiki, teacher_sae, tmp_path, capsys):
    """Kill `prepare`, `sae train` and `concepts label` while their output is written (the test seam
    sleeps after the data and before the manifest): meanwhile a second writer of the same output is
    refused; after the kill the output path is absent, never half-written, and a rerun succeeds,
    clears the killed writer's scratch directory and its lock file, and writes a valid output."""
    teacher, sae = teacher_sae
    out = tmp_path / "out"
    args = {"prepare": ["prepare", "--tokenizer", "byte", "--limit", "60", "--workers", "1", "--out", str(out)],
            "sae": ["sae", "train", "--teacher", str(teacher), "--layer", "0", "--data", str(byte_wiki),
                    "--out", str(out), "--latents", "32", "--k", "4", "--steps", "5", "--batch-tokens", "64",
                    "--seq-len", "32", "--eval-tokens", "64"],
            "label": ["concepts", "label", "--teacher", str(teacher), "--sae", str(sae), "--data", str(byte_wiki),
                      "--out", str(out), "--seq-len", "32", "--limit-windows", "6"]}[command] + ["--quiet"]
    proc = spawn(*args, delay=30)

    def scratch() -> list[Path]:
        return [p for p in tmp_path.iterdir() if p.name.startswith("out.tmp-")]

    assert wait_for(lambda: bool(scratch()), proc)
    time.sleep(0.3)  # well inside the 30 s pause before the manifest
    assert main(args) == 2
    assert capsys.readouterr().err == (f"error: {out} is in use by another latentlm process (pid {proc.pid}); "
                                       "wait for it to finish or stop it, or choose another --out\n")
    kill(proc)
    assert not out.exists() and len(scratch()) == 1
    assert main(args) == 0
    assert scratch() == [] and not (tmp_path / ".out.lock").exists()
    if command == "prepare":
        assert load_manifest(out, verify="sha256")["splits"]["train"]["documents"] > 0
    elif command == "sae":
        assert load_sae(out).n_latents == 32 and (out / "metrics.json").is_file()
    else:
        assert (out / "labels.bin").stat().st_size == 6 * 32 * 4 * 4


def _children_by_rank(parent: int) -> dict[int, int]:
    """pid of each torchrun worker (a child of ``parent``) by its RANK."""
    ranks = {}
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent:
                env = dict(kv.split("=", 1) for kv in (d / "environ").read_text().split("\0") if "=" in kv)
                ranks[int(env["RANK"])] = int(d.name)
        except (OSError, KeyError, ValueError):
            continue
    return ranks


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the torchrun workers through /proc")
def test_sigterm_to_one_ddp_rank_stops_both_at_the_same_step(byte_wiki, teacher_sae, tmp_path):
    """The stop flag rides the per-step all-reduce: SIGTERM to rank 1 alone makes both ranks
    checkpoint the same step and exit 143; resuming under torchrun finishes with one loss per step."""
    single = run_config("ntp", byte_wiki, tmp_path / "single", teacher_sae)
    single.train.batch_size = 4
    train(single)
    cfg = run_config("ntp", byte_wiki, tmp_path / "ddp", teacher_sae)
    cfg.train.dist, cfg.train.ckpt_every = "ddp", 0
    save_yaml(cfg, tmp_path / "config.yaml")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "latentlm", "train", "--config", str(tmp_path / "config.yaml")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log = tmp_path / "ddp" / "metrics.jsonl"
    assert wait_for(lambda: log.is_file() and log.read_text().count("\n") >= 3, proc)
    os.kill(_children_by_rank(proc.pid)[1], signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    step = ckpt_io.step_of(ckpt_io.latest_checkpoint(tmp_path / "ddp"))
    assert proc.returncode != 0 and 3 <= step < STEPS
    assert f"stopped: SIGTERM at step {step}: saved " in err and "exitcode  : 143" in err, err[-2000:]
    assert_checkpoints_sound(tmp_path / "ddp")
    done = run_torchrun(cmd + ["--resume"], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    a, b = ([r["loss"] for r in read_metrics(d / "metrics.jsonl") if "loss" in r]
            for d in (tmp_path / "single", tmp_path / "ddp"))
    assert len(a) == len(b) == STEPS and a == pytest.approx(b, rel=1e-5, abs=1e-5)


def test_divergence_stops_with_one_line_and_a_sound_checkpoint_from_before(byte_wiki, teacher_sae, tmp_path,
                                                                            monkeypatch, capsys):
    """From step 6 on every loss is NaN: three skipped steps in a row stop the run (exit 2, one line
    naming the last good checkpoint, step 4: nothing is saved inside the streak); that checkpoint
    verifies, and once the fault is gone the resumed run finishes."""
    from latentlm.methods.ntp import NTP

    cfg = run_config("ntp", byte_wiki, tmp_path / "run", teacher_sae)
    cfg.train.ckpt_every, cfg.train.max_bad_steps, cfg.train.max_steps = 2, 3, 10
    save_yaml(cfg, tmp_path / "config.yaml")
    real, calls = NTP.forward, {"n": 0}

    def diverging(self, x, y, nll=False):
        out = real(self, x, y, nll)
        if nll or not self.training:
            return out
        calls["n"] += 1
        return (out[0] * float("nan"), out[1]) if calls["n"] >= 6 else out

    monkeypatch.setattr(NTP, "forward", diverging)
    assert main(["train", "--config", str(tmp_path / "config.yaml")]) == 2
    good = tmp_path / "run" / "checkpoints" / "step_00000004"
    assert capsys.readouterr().err == (
        "error: 3 optimizer steps in a row had a non-finite loss or gradient (step 8); lower --train.lr or check "
        f"the data. The last good checkpoint is {good}\n")
    assert [p.name for p in ckpt_io.list_checkpoints(tmp_path / "run")] == ["step_00000002", good.name]
    assert_checkpoints_sound(tmp_path / "run")
    skipped = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if r.get("skipped")]
    assert skipped == [6, 7, 8]
    monkeypatch.undo()
    assert main(["train", "--config", str(tmp_path / "config.yaml"), "--resume"]) == 0
    records = read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in records if "loss" in r and not r.get("skipped")] == list(range(1, 11))
