"""The artifact layer every writer and reader shares: checksums, crash-safe writes and manifests.

Token shards, checkpoints and other artifacts feed long runs, so a crash or Ctrl-C while
writing must never leave something that looks complete. Everything here writes to a temporary
sibling and renames it into place, which is atomic on POSIX file systems: a directory artifact
is filled inside :func:`publishing`, a single file inside :func:`atomic_file`.

Every artifact describes itself in one JSON manifest with the same header, ``kind`` (what it
is), ``format_version`` (its layout) and ``latentlm_version`` (who wrote it), declared once per
kind as a :class:`ManifestFormat` that writes it and reads it back with one-line errors.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import re
import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from safetensors import SafetensorError

import latentlm
from latentlm.errors import LatentLMError

LOCK_FILE = ".lock"
DELAY_ENV = "LATENTLM_TEST_WRITE_DELAY"
MANIFEST_FILE = "manifest.json"


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


@contextlib.contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a scratch path beside the file ``path`` to write; when the block succeeds it is flushed
    to disk and renamed over ``path`` (readers, and a crash, see the old or the new file), and on
    any exception it is deleted."""
    path = Path(path)
    tmp = temp_sibling(path, hidden=True)
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# A write refused by the storage itself: a full disk or quota, a read-only file system, a file size
# limit. Reading never fails this way, so a block that reads and writes may translate these.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")  # how safetensors (Rust) ends an I/O error's message


def write_failure(e: BaseException) -> OSError | None:
    """The OSError behind ``e`` if ``e`` reports a failed file operation, else None: ``e`` itself, or
    the ``(os error N)`` that ends the message of a safetensors ``SafetensorError`` (``save_file`` on
    a full disk). ``torch.save`` reports a failed write as a RuntimeError that does not say why, so
    its files are written through :func:`save_through`, which raises the OSError instead."""
    if isinstance(e, OSError):
        return e
    if isinstance(e, SafetensorError):
        m = _RUST_OS_ERROR.search(str(e))
        if m:
            return OSError(int(m.group(1)), os.strerror(int(m.group(1))))
    return None


def cannot_write(target: str | Path, error: OSError, hint: str) -> str:
    """The one-line message of a failed write: ``cannot write TARGET (REASON); HINT``."""
    return f"cannot write {target} ({error.strerror or error}); {hint}"


def retry_hint(path: str | Path, replacing: bool = False) -> str:
    """What to do after writing ``path`` failed (``replacing``: an existing ``path``, left as it was)."""
    parent = Path(os.path.abspath(path)).parent
    return (f"free disk space (or make {parent} writable) and run the same command again"
            + (f"; {path} still holds what it held before" if replacing else ""))


@contextlib.contextmanager
def write_errors(target: str | Path, hint: str, errnos: frozenset[int] | None = STORAGE_ERRNOS) -> Iterator[None]:
    """Turn a failed write in the block into the one-line :class:`LatentLMError` of
    :func:`cannot_write`: an OSError, bare or reported by safetensors (:func:`write_failure`), whose
    errno is in ``errnos`` (None: any errno, for a block that only writes). Anything else passes."""
    try:
        yield
    except (OSError, SafetensorError) as e:
        error = write_failure(e)
        if error is None or (errnos is not None and error.errno not in errnos):
            raise
        raise LatentLMError(cannot_write(target, error, hint)) from e


class _RecordingFile:
    """A binary file that remembers the OSError its ``write`` / ``flush`` raised."""

    def __init__(self, f: IO[bytes]) -> None:
        self.file, self.error = f, None

    def _call(self, name: str, *args: Any) -> Any:
        try:
            return getattr(self.file, name)(*args)
        except OSError as e:
            self.error = e
            raise

    def write(self, data: Any) -> int:
        return self._call("write", data)

    def flush(self) -> None:
        self._call("flush")

    def __getattr__(self, name: str) -> Any:  # seek, tell, ...
        return getattr(self.file, name)


def save_through(path: str | Path, save: Callable[[Any], None]) -> None:
    """Call ``save(f)`` with ``f`` the file ``path`` opened for binary writing (e.g.
    ``lambda f: torch.save(obj, f)``) and flush it. A write that fails raises its OSError (a full disk:
    ENOSPC), even when ``save`` turns it into an exception of its own, as ``torch.save`` does (a
    RuntimeError that does not say why); other exceptions of ``save`` pass unchanged."""
    with open(path, "wb") as f:
        recording = _RecordingFile(f)
        try:
            save(recording)
            recording.flush()
        except Exception as e:
            with contextlib.suppress(OSError):
                f.close()  # drop what the full disk refused, so leaving the block does not retry it
            if recording.error is None:
                raise
            raise OSError(recording.error.errno, recording.error.strerror, str(path)) from e


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` so readers (and a crash) see either the old or the new file."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON to ``path`` so readers see either the old or the new file."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json_object(path: str | Path, hint: str) -> dict[str, Any]:
    """The JSON object in the file ``path``; a one-line :class:`LatentLMError` ending in ``hint`` (what
    to do about it) if it is not valid UTF-8 JSON or not an object."""
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise LatentLMError(f"{path} is not valid JSON ({e}); {hint}") from None
    if not isinstance(obj, dict):
        raise LatentLMError(f"{path} holds a JSON {type(obj).__name__}, not an object; {hint}")
    return obj


_HEADER = ("kind", "format_version", "latentlm_version")


@dataclass(frozen=True)
class ManifestFormat:
    """One kind of artifact's manifest: its ``kind``, the ``format_version`` this latentlm writes and
    reads, and the words of its one-line errors.

    ``what`` names the artifact in messages ("prepared data"); ``rebuild`` says how to make one this
    latentlm reads ("re-run `latentlm prepare`"; ``{dir}`` in it, its only braces, stands for the
    artifact's directory).
    ``name`` is the manifest's file in that directory: ``manifest.json``, or a single-file artifact's
    own file (``contexts.json``). Manifests of older writers are read through
    ``legacy_version_key`` (their name for ``format_version``) and ``legacy_kindless`` (they wrote
    no ``kind``); ``also_reads`` lists older format versions still read (the reader tells them apart)."""

    kind: str
    version: int
    what: str
    rebuild: str
    name: str = MANIFEST_FILE
    legacy_version_key: str | None = None
    legacy_kindless: bool = False
    also_reads: tuple[int, ...] = ()  # older format versions this latentlm still reads

    def stamp(self, body: dict[str, Any]) -> dict[str, Any]:
        """``body`` under this format's header (``kind``, ``format_version``, ``latentlm_version``),
        which replaces any header keys ``body`` carries."""
        return {"kind": self.kind, "format_version": self.version, "latentlm_version": latentlm.__version__,
                **{k: v for k, v in body.items() if k not in _HEADER}}

    def rebuild_hint(self, directory: str | Path) -> str:
        """How to make the artifact at ``directory`` again, for messages."""
        return self.rebuild.format(dir=directory)

    def write(self, directory: str | Path, body: dict[str, Any]) -> dict[str, Any]:
        """Write ``stamp(body)`` atomically as ``directory/name``; return it."""
        manifest = self.stamp(body)
        write_json_atomic(Path(directory) / self.name, manifest)
        return manifest

    def owns(self, directory: str | Path) -> bool:
        """Whether ``directory`` holds an artifact of this kind (any format version): what
        ``--overwrite`` may replace."""
        path = Path(directory) / self.name
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return False
        if not isinstance(manifest, dict):
            return False
        kind = manifest.get("kind", self.kind if self.legacy_kindless else None)
        return kind == self.kind

    def read(self, directory: str | Path) -> dict[str, Any]:
        """The manifest of the artifact in ``directory``, after checking its kind and format version
        (a legacy manifest comes back with ``kind`` and ``format_version`` filled in)."""
        directory = Path(directory)
        path, rebuild = directory / self.name, self.rebuild_hint(directory)
        if not path.is_file():
            raise LatentLMError(f"{directory} is not {self.what} (no {self.name}); {rebuild}")
        manifest = read_json_object(path, rebuild)
        old = self.legacy_version_key
        if old is not None and old in manifest and "format_version" not in manifest:
            manifest["format_version"] = manifest.pop(old)
        if self.legacy_kindless:
            manifest.setdefault("kind", self.kind)
        if manifest.get("kind") != self.kind:
            raise LatentLMError(f"{path} is not {self.what}: its kind is {manifest.get('kind')!r}, not "
                                f"{self.kind!r}; {rebuild}")
        version = manifest.get("format_version")
        if type(version) is not int or (version != self.version and version not in self.also_reads):
            writer = manifest.get("latentlm_version")
            by = f" (written by latentlm {writer})" if isinstance(writer, str) else ""
            raise LatentLMError(f"{path} has format version {version}{by}, but this latentlm reads {self.what} "
                                f"of format version {self.version}; {rebuild}")
        return manifest


def write_delay() -> None:
    """Test seam: sleep ``$LATENTLM_TEST_WRITE_DELAY`` seconds in the middle of an artifact write,
    so the fault-injection tests can kill a process while its output is half-written."""
    delay = os.environ.get(DELAY_ENV)
    if delay:
        time.sleep(float(delay))


def temp_sibling(path: str | Path, tag: str = "tmp", hidden: bool = False) -> Path:
    """Return ``<path>.<tag>-<pid>`` (``.<name>.<tag>-<pid>`` if ``hidden``): a scratch path on the
    same file system, so renames are atomic."""
    path = Path(os.path.abspath(path))
    return path.with_name(f"{'.' if hidden else ''}{path.name}.{tag}-{os.getpid()}")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _listing(directory: Path, most: int = 3) -> str:
    names = sorted(p.name for p in directory.iterdir())
    return ", ".join(names[:most]) + (f" and {len(names) - most} more" if len(names) > most else "")


def check_replaceable(out: str | Path, replace: bool | ManifestFormat = False, refusal: str = "",
                      inputs: tuple[str | Path, ...] = ()) -> None:
    """Raise a one-line :class:`LatentLMError` unless the directory artifact ``out`` may be written:
    it is absent or empty, or ``replace`` allows what is there (True: anything, for latentlm's own
    internal directories; a :class:`ManifestFormat`: an artifact of that kind, i.e. one latentlm
    wrote). Never the current directory or one holding it, nor a directory holding an input."""
    given, out = out, Path(os.path.abspath(out))
    real, cwd = out.resolve(), Path.cwd().resolve()
    if real == cwd or real in cwd.parents:
        raise LatentLMError(f"refusing to write {given}: it is the current directory or holds it; choose another path")
    for source in inputs:
        src = Path(os.path.abspath(source)).resolve()
        if src == real or real in src.parents:
            raise LatentLMError(f"refusing to replace {given}: it holds the input {source}; choose another path")
    if not (out.is_symlink() or (out.exists() and (not out.is_dir() or any(out.iterdir())))):
        return
    if replace is True or (isinstance(replace, ManifestFormat) and out.is_dir() and replace.owns(out)):
        return
    what = _listing(out) if out.is_dir() and not out.is_symlink() else "a file or link"
    raise LatentLMError(f"{given} {refusal} (it holds {what})")


@contextlib.contextmanager
def publishing(out: str | Path, *, replace: bool | ManifestFormat = False,
               refusal: str = "already exists and is not empty; remove it or choose another path",
               hidden: bool = False, stale: str | None = None, inputs: tuple[str | Path, ...] = (),
               name: str | None = None, hint: str | None = None) -> Iterator[Path]:
    """Yield an empty scratch directory beside the directory artifact ``out`` to fill; when the block
    succeeds it is published as ``out`` (:func:`publish_dir`), and on any exception (Ctrl-C
    included) it is removed, so ``out`` is either the old artifact or the complete new one.

    What may be there already is :func:`check_replaceable`'s rule (``replace``, ``inputs``); otherwise
    a one-line :class:`LatentLMError` ("``<out> <refusal>``" for a plain refusal) is raised before
    anything is written. The scratch directory is ``<out>.tmp-<pid>`` (``.<name>.tmp-<pid>`` if
    ``hidden``). Leftovers of killed writers are cleared first: the siblings matching the glob
    ``stale`` when the caller knows no live writer owns them (e.g. under a run lock), else those
    :func:`remove_stale_temps` finds.

    A write the storage refuses inside the block (a full disk, a read-only file system, a file size
    limit: :func:`write_errors`), and any OSError while the scratch directory is made or published,
    becomes the one line ``cannot write NAME (REASON); HINT`` once the scratch directory is gone;
    ``name`` defaults to ``out``, ``hint`` to :func:`retry_hint`."""
    check_replaceable(out, replace, refusal, inputs)
    given, out = out, Path(os.path.abspath(out))
    name = str(given) if name is None else name
    hint = retry_hint(given, out.exists() or out.is_symlink()) if hint is None else hint
    with write_errors(name, hint, errnos=None):
        out.parent.mkdir(parents=True, exist_ok=True)
        if stale is None:
            remove_stale_temps(out)
        else:
            for leftover in out.parent.glob(stale):
                _remove(leftover)
        tmp = temp_sibling(out, hidden=hidden)
        _remove(tmp)
        tmp.mkdir()
    try:
        with write_errors(name, hint):
            yield tmp
        with write_errors(name, hint, errnos=None):
            publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def remove_stale_temps(path: str | Path) -> None:
    """Delete the ``<path>.tmp-<pid>`` / ``.old-<pid>`` leftovers (hidden ones too) of writers that were killed.

    Only siblings whose process no longer exists on this machine are removed, so a live writer's
    scratch directory is never touched (a writer on another host of a shared file system with an
    unused pid here would be; two hosts writing one output is unsupported anyway)."""
    path = Path(os.path.abspath(path))
    pattern = re.compile(rf"^\.?{re.escape(path.name)}\.(?:tmp|old)-(\d+)$")
    if not path.parent.is_dir():
        return
    for p in path.parent.iterdir():
        m = pattern.match(p.name)
        if m and int(m.group(1)) != os.getpid() and not _pid_alive(int(m.group(1))):
            _remove(p)


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
    _remove(old)
