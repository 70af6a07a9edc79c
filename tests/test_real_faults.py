"""Faults on real file systems and real processes, not faked in one helper: a size-limited tmpfs that
fills up in the middle of the real writers (safetensors, torch.save, numpy shards, JSON), a file
size limit (RLIMIT_FSIZE: the kernel refuses the write with EFBIG; needs no mount), a read-only
mount, and the worker processes of ``prepare --workers 2`` when their parent is stopped or killed
(docs/RELIABILITY.md, "Faults on a real file system").

Mounting needs root with CAP_SYS_ADMIN; without it the tmpfs tests skip and say so, and the
RLIMIT_FSIZE tests still run."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from latentlm.cli import main
from latentlm.concepts.sae import TopKSAE, load_sae, save_sae
from latentlm.config import save_yaml
from latentlm.data.prepare import load_manifest
from latentlm.errors import LatentLMError
from latentlm.train import checkpoint as ckpt_io
from latentlm.train.trainer import train

from test_crash_safety import (CKPT_EVERY, assert_checkpoints_sound, assert_same_run, run_config, spawn,  # noqa: F401
                               teacher_sae, wait_for)

pytestmark = pytest.mark.usefixtures("one_thread")

NO_SPACE = "No space left on device"
FIRST = f"step_{CKPT_EVERY:08d}"
SECOND = f"step_{2 * CKPT_EVERY:08d}"


# --- a real small file system ------------------------------------------------------------------

def _mount(target: Path, options: str) -> str | None:
    """Mount a tmpfs with ``options`` at ``target``; None, or why it could not be mounted."""
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(target)], capture_output=True,
                           text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    return None if r.returncode == 0 else (" ".join(r.stderr.split()) or f"mount exited with {r.returncode}")


@pytest.fixture
def small_disk(tmp_path):
    """Factory: a fresh tmpfs of ``size`` (e.g. "256k") mounted under tmp_path, unmounted afterwards.
    Skips (with the reason) where mounting is not permitted."""
    mounted: list[Path] = []

    def make(size: str, name: str = "disk") -> Path:
        if os.geteuid() != 0:
            pytest.skip("mounting a size-limited tmpfs needs root (CAP_SYS_ADMIN); the RLIMIT_FSIZE tests cover "
                        "real write failures without it")
        target = tmp_path / name
        target.mkdir()
        why = _mount(target, f"size={size},mode=0755")
        if why is not None:
            pytest.skip(f"cannot mount a size-limited tmpfs here ({why}); the RLIMIT_FSIZE tests still run")
        mounted.append(target)
        return target

    yield make
    for target in reversed(mounted):
        subprocess.run(["umount", "-l", str(target)], capture_output=True, timeout=30)


def remount_read_only(disk: Path) -> None:
    r = subprocess.run(["mount", "-o", "remount,ro", str(disk)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def fill(disk: Path, leave: int = 0) -> Path:
    """Fill ``disk`` with a file until ``leave`` bytes (rounded up to whole pages) are free; return the file."""
    st = os.statvfs(disk)
    page = st.f_frsize
    leave = -(-leave // page) * page
    filler = disk / "filler"
    with open(filler, "ab") as f:
        f.write(b"\xff" * max(st.f_bavail * page - leave, 0))
    assert os.statvfs(disk).f_bavail * page == leave
    return filler


def spy(monkeypatch, owner, name: str, seen: list[str]) -> None:
    """Wrap ``owner.name`` (a real writer) to record the type of any exception it raises."""
    real = getattr(owner, name)

    def recording(*args, **kwargs):
        try:
            return real(*args, **kwargs)
        except Exception as e:
            seen.append(type(e).__name__)
            raise

    monkeypatch.setattr(owner, name, recording)


def checkpoint_line(run: Path, reason: str) -> str:
    return (f"error: cannot write checkpoint {run / 'checkpoints' / SECOND} ({reason}); free disk space or make "
            f"{run / 'checkpoints'} writable, then resume: the previous checkpoint {run / 'checkpoints' / FIRST} "
            "is intact\n")


def redo_line(out: Path, reason: str = NO_SPACE, replacing: bool = True) -> str:
    return (f"error: cannot write {out} ({reason}); free disk space (or make {out.parent} writable) and run the "
            "same command again" + (f"; {out} still holds what it held before" if replacing else "") + "\n")


def only_first_checkpoint(run: Path) -> None:
    """The step-4 checkpoint is the only entry of checkpoints/ (no scratch directory) and verifies."""
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [FIRST]
    assert_checkpoints_sound(run)


def test_train_on_a_filling_disk(byte_wiki, teacher_sae, small_disk, tmp_path, monkeypatch, capsys):
    """The disk runs out inside model.safetensors (a SafetensorError), then inside optimizer.pt
    (torch.save's RuntimeError), then while metrics.jsonl is appended: each time one line and exit 2,
    the step-4 checkpoint verifies and no scratch directory is left; once space is freed the resume
    ends bit for bit where an uninterrupted run ends."""
    steps, disk = 60, small_disk("4m")
    configs = {}
    for name, out in (("ref", tmp_path / "ref"), ("run", disk / "run")):
        configs[name] = run_config("ntp", byte_wiki, out, teacher_sae)
        configs[name].train.max_steps, configs[name].train.ckpt_every = steps, 0
    train(configs["ref"])
    run = Path(configs["run"].train.out_dir)
    save_yaml(configs["run"], tmp_path / "config.yaml")
    train(configs["run"], stop_after=CKPT_EVERY)
    size = {p.name: p.stat().st_size for p in (run / "checkpoints" / FIRST).iterdir()}
    resume = ["train", "--config", str(tmp_path / "config.yaml"), "--resume"]
    margin = 32 << 10  # the run lock, config.yaml, metrics.jsonl and their rewrites on resume
    for writer, owner, name, leave in (
            ("SafetensorError", ckpt_io, "save_file", margin + size["model.safetensors"] // 2),
            ("RuntimeError", torch, "save", margin + size["model.safetensors"] + size["optimizer.pt"] // 2)):
        filler, seen = fill(run.parent, leave), []
        with monkeypatch.context() as m:
            spy(m, owner, name, seen)
            assert main(resume + ["--train.ckpt_every", str(CKPT_EVERY)]) == 2  # the step-8 checkpoint
        assert seen == [writer]  # the real writer hit the full disk
        assert capsys.readouterr().err == checkpoint_line(run, NO_SPACE)
        only_first_checkpoint(run)
        filler.unlink()
    # Two pages: the run lock's and one for the atomic rewrites; the log fills it long before step 60.
    filler = fill(run.parent, 8192)
    assert main(resume) == 2
    assert capsys.readouterr().err == (f"error: cannot append to {run / 'metrics.jsonl'} ({NO_SPACE}); free disk "
                                       "space, then run the same command with --resume\n")
    only_first_checkpoint(run)
    filler.unlink()
    assert main(resume) == 0
    assert_same_run(tmp_path / "ref", run, steps)


def test_prepare_overwrite_on_a_full_disk_keeps_the_old_data(small_disk, capsys):
    """`prepare --overwrite --workers 2` of a corpus the disk cannot hold: one line, exit 2, the old
    data intact, no scratch directory and no lock left; the pool shuts down."""
    out = small_disk("256k") / "data"
    base = ["prepare", "--source", "wiki", "--tokenizer", "byte", "--out", str(out), "--quiet"]
    assert main(base + ["--limit", "60", "--workers", "1"]) == 0
    before = load_manifest(out, verify="sha256")
    capsys.readouterr()
    assert main(base + ["--limit", "400", "--workers", "2", "--overwrite"]) == 2
    assert capsys.readouterr().err == redo_line(out)
    assert load_manifest(out, verify="sha256") == before
    assert sorted(p.name for p in out.parent.iterdir()) == ["data"]


def test_sae_label_cache_and_contexts_on_a_full_disk(byte_wiki, teacher_sae, small_disk, tmp_path, capsys):
    """`sae train`, `concepts label` and `concepts contexts` replacing their output on a disk too
    small for the new one: one line each, exit 2, the previous SAE / cache / contexts intact."""
    teacher, _ = teacher_sae
    disk = small_disk("384k")
    sae_dir, cache = disk / "sae", disk / "labels"
    common = ["--teacher", str(teacher), "--data", str(byte_wiki), "--quiet"]
    sae_args = ["sae", "train", *common, "--layer", "0", "--out", str(sae_dir), "--k", "4", "--steps", "3",
                "--batch-tokens", "64", "--seq-len", "32", "--eval-tokens", "64"]
    assert main(sae_args + ["--latents", "32"]) == 0
    old_sae = load_sae(sae_dir)
    label_args = ["concepts", "label", *common, "--sae", str(sae_dir), "--out", str(cache), "--seq-len", "32"]
    assert main(label_args + ["--limit-windows", "6"]) == 0
    old_labels = (cache / "labels.bin").read_bytes()
    contexts_args = ["concepts", "contexts", *common, "--sae", str(sae_dir), "--seq-len", "32", "--max-tokens", "256"]
    assert main(contexts_args) == 0
    old_contexts = (sae_dir / "contexts.json").read_text()
    capsys.readouterr()

    assert main(sae_args + ["--latents", "2048"]) == 2  # 1 MB of weights: safetensors runs out
    assert capsys.readouterr().err == redo_line(sae_dir)
    assert torch.equal(load_sae(sae_dir).W_enc, old_sae.W_enc) and (sae_dir / "contexts.json").is_file()
    assert main(label_args + ["--limit-windows", "1000"]) == 2  # 512 KB of labels
    assert capsys.readouterr().err == redo_line(cache)
    assert (cache / "labels.bin").read_bytes() == old_labels
    assert sorted(p.name for p in disk.iterdir()) == ["labels", "sae"]
    fill(disk)
    assert main(contexts_args) == 2
    path = sae_dir / "contexts.json"
    assert capsys.readouterr().err == (f"error: cannot write {path} ({NO_SPACE}); free disk space (or make "
                                       f"{sae_dir} writable) and run the same command again; {path} still holds "
                                       "what it held before\n")
    assert path.read_text() == old_contexts and not [p for p in sae_dir.iterdir() if p.name.startswith(".")]


def test_export_and_import_on_a_full_disk(teacher_sae, small_disk, tmp_path, capsys):
    """`export --hf` and `import` onto a disk smaller than the weights: one line, exit 2, nothing left."""
    disk, (teacher, _) = small_disk("64k"), teacher_sae
    assert main(["export", str(teacher), "--hf", str(tmp_path / "hf")]) == 0
    capsys.readouterr()
    assert main(["export", str(teacher), "--hf", str(disk / "hf")]) == 2
    assert capsys.readouterr().err == redo_line(disk / "hf", replacing=False)
    assert main(["import", "--hf", str(tmp_path / "hf"), "--tokenizer", "byte", "--out", str(disk / "ckpt")]) == 2
    assert capsys.readouterr().err == redo_line(disk / "ckpt", replacing=False)
    assert list(disk.iterdir()) == []


def test_read_only_file_system(teacher_sae, small_disk, capsys):
    """A read-only mount: the CLI and the library say so in one line and leave the SAE as it was."""
    disk = small_disk("256k")
    torch.manual_seed(0)
    sae = save_sae(TopKSAE(32, 16, 4), disk / "sae")
    remount_read_only(disk)
    with pytest.raises(LatentLMError) as e:
        save_sae(TopKSAE(32, 16, 4), sae)
    assert str(e.value) == (f"cannot write {sae} (Read-only file system); free disk space (or make {disk} "
                            f"writable) and run the same command again; {sae} still holds what it held before")
    out = disk / "data"
    assert main(["prepare", "--source", "wiki", "--tokenizer", "byte", "--limit", "20", "--out", str(out)]) == 2
    assert capsys.readouterr().err == (f"error: cannot write to {out} (Read-only file system); choose another "
                                       "--out\n")
    assert load_sae(sae).n_latents == 16 and sorted(p.name for p in disk.iterdir()) == ["sae"]


# --- a real file size limit (RLIMIT_FSIZE), no mount needed -------------------------------------

def run_limited(args: list[str], max_file_bytes: int) -> subprocess.CompletedProcess:
    """``latentlm *args`` in a process whose files the kernel keeps below ``max_file_bytes``
    (a longer write fails with EFBIG: Python ignores SIGXFSZ)."""
    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_file_bytes, max_file_bytes))

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-m", "latentlm", *args], env=env, capture_output=True, text=True,
                          timeout=180, preexec_fn=limit)


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="needs RLIMIT_FSIZE")
def test_file_size_limit_in_checkpoint_writers_then_exact_resume(byte_wiki, teacher_sae, tmp_path):
    """Under a file size limit first model.safetensors, then optimizer.pt cannot be written: exactly
    one line on stderr, exit 2, the step-4 checkpoint intact; without the limit the resume is exact."""
    train(run_config("ntp", byte_wiki, tmp_path / "ref", teacher_sae))
    run = tmp_path / "run"
    cfg = run_config("ntp", byte_wiki, run, teacher_sae)
    save_yaml(cfg, tmp_path / "config.yaml")
    train(cfg, stop_after=CKPT_EVERY)
    size = {p.name: p.stat().st_size for p in (run / "checkpoints" / FIRST).iterdir()}
    resume = ["train", "--config", str(tmp_path / "config.yaml"), "--resume"]
    for limit in (size["model.safetensors"] // 2, (size["model.safetensors"] + size["optimizer.pt"]) // 2):
        done = run_limited(resume, limit)
        assert (done.returncode, done.stderr) == (2, checkpoint_line(run, "File too large"))
        only_first_checkpoint(run)
    assert main(resume) == 0
    assert_same_run(tmp_path / "ref", run)


@pytest.mark.skipif(not hasattr(resource, "RLIMIT_FSIZE"), reason="needs RLIMIT_FSIZE")
def test_file_size_limit_in_prepare_keeps_the_old_data(tmp_path):
    out = tmp_path / "data"
    base = ["prepare", "--source", "wiki", "--tokenizer", "byte", "--out", str(out), "--quiet", "--workers", "1"]
    assert main(base + ["--limit", "60"]) == 0
    before = load_manifest(out, verify="sha256")
    done = run_limited(base + ["--limit", "400", "--overwrite"], 128 << 10)  # the train shard is ~350 KB
    assert (done.returncode, done.stderr) == (2, redo_line(out, "File too large"))
    assert load_manifest(out, verify="sha256") == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


# --- prepare's worker processes end with it ----------------------------------------------------

def _live_children(parent: int) -> dict[int, str]:
    """pid -> command line of the live (not zombie) processes whose parent is ``parent``."""
    found = {}
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit():
                state, ppid = (d / "stat").read_text().rsplit(")", 1)[1].split()[:2]
                if int(ppid) == parent and state != "Z":
                    found[int(d.name)] = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, ValueError):
            continue
    return found


def _alive(pid: int) -> bool:
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="finds the worker processes through /proc")
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_prepare_workers_end_with_their_parent(sig, tmp_path):
    """SIGTERM or SIGKILL to `prepare --workers 2` mid-tokenization (the seam parks it after the first
    chunk): within seconds no worker is left, so a caller reading its stdout / stderr is not kept
    waiting; SIGTERM shuts the pool down in order and exits 143 without leaving its scratch directory;
    a rerun succeeds (and removes a SIGKILLed run's scratch directory)."""
    out = tmp_path / "out"
    args = ["prepare", "--source", "wiki", "--tokenizer", "byte", "--workers", "2", "--quiet", "--out", str(out)]
    proc = spawn(*args, delay=30)
    assert wait_for(lambda: bool(list(tmp_path.glob("out.tmp-*/train_000.bin"))), proc)
    children = _live_children(proc.pid)
    try:
        assert sum("spawn_main" in cmd for cmd in children.values()) == 2, children
        proc.send_signal(sig)
        _, err = proc.communicate(timeout=30)  # returns once no process holds its stdout and stderr
        deadline = time.monotonic() + 10
        while any(_alive(pid) for pid in children) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert [cmd for pid, cmd in children.items() if _alive(pid)] == []
    finally:  # a failure must not leave the orphans behind either
        for pid in children:
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
        proc.wait()
    if sig == signal.SIGTERM:
        assert proc.returncode == 143
        assert err.strip().splitlines()[-1] == (f"stopped: SIGTERM while preparing {out}, which is left as it was; "
                                                "run the same command again to prepare it")
        assert sorted(p.name for p in tmp_path.iterdir()) == []
    else:
        assert proc.returncode == -signal.SIGKILL and len(list(tmp_path.glob("out.tmp-*"))) == 1
    assert main(args) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert json.loads((out / "manifest.json").read_text())["splits"]["train"]["documents"] > 0
