"""Small file helpers every artifact writer shares: checksums and crash-safe writes.

Token shards, checkpoints and other artifacts feed long runs, so a crash or Ctrl-C while
writing must never leave something that looks complete. Everything here writes to a temporary
sibling and renames it into place, which is atomic on POSIX file systems.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from latentlm.errors import LatentLMError

LOCK_FILE = ".lock"
DELAY_ENV = "LATENTLM_TEST_WRITE_DELAY"


def sha256_file(path: str | Path, chunk_bytes: int = 1 << 20) -> str:
    """Return the sha256 hex digest of a file, read in chunks so large shards fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk_bytes), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_file(path: str | Path) -> None:
    """Flush a written file to disk before it is published by a rename."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: str | Path) -> None:
    """Make a rename inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so readers (and a crash) see either the old or the new file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` so readers see either the old or the new file."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def write_delay() -> None:
    """Test seam: sleep ``$LATENTLM_TEST_WRITE_DELAY`` seconds in the middle of an artifact write,
    so the fault-injection tests can kill a process while its output is half-written."""
    delay = os.environ.get(DELAY_ENV)
    if delay:
        time.sleep(float(delay))


def temp_sibling(path: str | Path, tag: str = "tmp") -> Path:
    """Return ``<path>.<tag>-<pid>``: a scratch path on the same file system, so renames are atomic."""
    path = Path(os.path.abspath(path))
    return path.with_name(f"{path.name}.{tag}-{os.getpid()}")


def scratch_dir(out: str | Path) -> Path:
    """An empty scratch directory beside ``out`` (its final place), after clearing the leftovers
    of killed writers: fill it, then :func:`publish_dir` it."""
    out = Path(os.path.abspath(out))
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    tmp = temp_sibling(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_temps(path: str | Path) -> None:
    """Delete the ``<path>.tmp-<pid>`` / ``.old-<pid>`` leftovers of writers that were killed.

    Only siblings whose process no longer exists on this machine are removed, so a live writer's
    scratch directory is never touched (a writer on another host of a shared file system with an
    unused pid here would be; two hosts writing one output is unsupported anyway)."""
    path = Path(os.path.abspath(path))
    pattern = re.compile(rf"^{re.escape(path.name)}\.(?:tmp|old)-(\d+)$")
    if not path.parent.is_dir():
        return
    for p in path.parent.iterdir():
        m = pattern.match(p.name)
        if not m or int(m.group(1)) == os.getpid() or _pid_alive(int(m.group(1))):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)


@contextlib.contextmanager
def _flock(path: Path, target: Path, hint: str) -> Iterator[None]:
    """Hold an exclusive ``flock`` on the file ``path`` (guarding ``target``) for the block, with our
    pid in it; the file is removed when the block ends. A second process gets a one-line
    :class:`LatentLMError` naming the holder's pid. The kernel releases the lock when its holder
    dies, so a killed process never blocks the next one."""
    fd = -1
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
                raise LatentLMError(f"{target} is in use by another latentlm process (pid {holder}); wait for it "
                                    f"to finish or stop it, or {hint}") from None
            try:  # the previous holder removed the file while we opened it: lock the current one
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
            fd = -1
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    except BaseException as e:
        if fd >= 0:
            os.close(fd)
        if isinstance(e, OSError):
            raise LatentLMError(f"cannot write to {target} ({e.strerror}); {hint}") from None
        raise
    try:
        yield
    finally:
        path.unlink(missing_ok=True)
        os.close(fd)


@contextlib.contextmanager
def dir_lock(directory: str | Path, hint: str) -> Iterator[None]:
    """Lock the run directory ``directory`` (creating it) through ``directory/.lock`` for the block;
    ``hint`` says what else to do (e.g. "choose another --train.out_dir"). A directory this call
    created is removed again if nothing else was written into it (e.g. bad input)."""
    directory = Path(directory)
    created = not directory.exists()
    with _flock(directory / LOCK_FILE, directory, hint):
        try:
            yield
        finally:
            if created and [p.name for p in directory.iterdir()] == [LOCK_FILE]:
                (directory / LOCK_FILE).unlink()
                directory.rmdir()


@contextlib.contextmanager
def output_lock(out: str | Path, hint: str) -> Iterator[None]:
    """Lock an output that is published by a rename (prepare, sae train, concepts label) through
    the hidden sibling ``.<name>.lock``, so two processes never build the same output at once."""
    out = Path(os.path.abspath(out))
    with _flock(out.with_name(f".{out.name}.lock"), out, hint):
        yield


def publish_dir(tmp_dir: str | Path, out_dir: str | Path) -> None:
    """Move the finished directory ``tmp_dir`` to ``out_dir``, replacing whatever is there.

    A fresh destination is a single atomic rename. An existing one is first renamed aside and
    deleted only after the new directory is in place (restored if that rename fails), because
    POSIX cannot atomically swap two non-empty directories. Callers decide whether replacing an
    existing ``out_dir`` is allowed.
    """
    tmp_dir, out_dir = Path(tmp_dir), Path(out_dir)
    if not (out_dir.exists() or out_dir.is_symlink()):
        os.replace(tmp_dir, out_dir)
        fsync_dir(out_dir.parent)
        return
    old = temp_sibling(out_dir, "old")
    os.replace(out_dir, old)
    try:
        os.replace(tmp_dir, out_dir)
    except BaseException:
        os.replace(old, out_dir)
        raise
    fsync_dir(out_dir.parent)
    if old.is_dir() and not old.is_symlink():
        shutil.rmtree(old, ignore_errors=True)
    else:
        old.unlink(missing_ok=True)
