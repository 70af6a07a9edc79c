"""Small file helpers every artifact writer shares: checksums and crash-safe writes.

Token shards, checkpoints and other artifacts feed long runs, so a crash or Ctrl-C while
writing must never leave something that looks complete. Everything here writes to a temporary
sibling and renames it into place, which is atomic on POSIX file systems.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any


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


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` so readers see either the old or the new file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=False)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def temp_sibling(path: str | Path, tag: str = "tmp") -> Path:
    """Return ``<path>.<tag>-<pid>``: a scratch path on the same file system, so renames are atomic."""
    path = Path(os.path.abspath(path))
    return path.with_name(f"{path.name}.{tag}-{os.getpid()}")


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
