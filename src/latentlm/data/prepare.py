"""Tokenize a corpus once into flat binary shards plus a ``manifest.json``.

Layout of a prepared directory::

    manifest.json
    train_000.bin, train_001.bin, ...   little-endian uint16 (vocab <= 65536) or uint32 tokens
    val_000.bin, ...

Every document is followed by the tokenizer's end-of-text id. Documents go to ``train`` or
``val`` by a hash of (seed, document index), so the split does not depend on the number of
worker processes. Memory stays bounded by the worker chunks and the write buffer, whatever the
corpus size, and the output appears atomically (built in ``<out_dir>.tmp-<pid>``, then renamed).

Manifest keys: ``kind`` (``latentlm-data``; older manifests have none), ``format_version``,
``latentlm_version``, ``created`` (UTC ISO time),
``tokenizer`` (:meth:`Tokenizer.describe`), ``dtype``, ``byte_order``, ``source``, ``seed``,
``val_fraction``, and ``splits.<name>`` with ``tokens``, ``documents``, ``bytes`` (UTF-8 bytes
of the split's documents, for bits-per-byte) and ``shards``: a list of ``{file, tokens, bytes,
sha256}`` where ``bytes`` is the shard's file size.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime
import hashlib
import multiprocessing
import os
import shutil
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
from tqdm import tqdm

from latentlm.fileio import MANIFEST_FILE, ManifestFormat, publishing, sha256_file, write_delay
from latentlm.data.sources import describe_source, iter_documents
from latentlm.data.tokenizers import Tokenizer, load_tokenizer
from latentlm.errors import Interrupted, LatentLMError

FORMAT_VERSION = 1
TOKENIZER_FILE = "tokenizer.json"
MANIFEST_NAME = MANIFEST_FILE
DATA_FORMAT = ManifestFormat("latentlm-data", FORMAT_VERSION, "prepared data", "re-run `latentlm prepare`",
                             legacy_kindless=True)
SPLITS = ("train", "val")
VERIFY_MODES = ("size", "sha256")

# Work unit sent to a tokenizer process: documents until this many characters (or documents).
_CHUNK_CHARS = 1 << 18
_CHUNK_DOCS = 1024


def token_dtype(vocab_size: int) -> np.dtype:
    """Smallest little-endian unsigned dtype holding every id of a ``vocab_size`` vocabulary."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def split_of(index: int, seed: int, val_fraction: float) -> str:
    """``"train"`` or ``"val"`` for document ``index``, from a hash of (seed, index).

    Document 0 always goes to train and document 1 always to val, so any corpus of two or more
    documents has both splits; later documents are val with probability ``val_fraction``.
    """
    if index < 2:
        return SPLITS[index]
    h = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return "val" if int.from_bytes(h, "little") < val_fraction * 2.0**64 else "train"


class ShardWriter:
    """Appends tokens of one split to ``<split>_NNN.bin`` files of at most ``shard_tokens`` tokens.

    Tokens go through a fixed ``buffer_tokens`` buffer that is written out when full, so memory
    does not depend on the corpus size; each shard's sha256 is computed while writing.
    """

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int, buffer_tokens: int) -> None:
        self.directory, self.split, self.dtype = Path(directory), split, np.dtype(dtype)
        self.shard_tokens = shard_tokens
        self.shards: list[dict[str, Any]] = []
        self._buf = np.empty(min(buffer_tokens, shard_tokens), dtype=self.dtype)
        self._fill = 0
        self._in_shard = 0
        self._file: Any = None
        self._hash: Any = None

    def write(self, tokens: np.ndarray) -> None:
        """Append ``tokens`` (any integer array) to the split."""
        pos = 0
        while pos < len(tokens):
            if self._file is None:
                self._open_shard()
            room = min(self._buf.size - self._fill, self.shard_tokens - self._in_shard)
            n = min(room, len(tokens) - pos)
            self._buf[self._fill:self._fill + n] = tokens[pos:pos + n]
            self._fill += n
            self._in_shard += n
            pos += n
            if self._fill == self._buf.size:
                self._flush()
            if self._in_shard == self.shard_tokens:
                self._finish_shard()

    def finish(self) -> list[dict[str, Any]]:
        """Write out the last partial shard and return the shard records for the manifest."""
        if self._file is not None:
            self._finish_shard()
        return self.shards

    def close(self) -> None:
        """Release the open file without recording it (used when preparation fails)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open_shard(self) -> None:
        name = f"{self.split}_{len(self.shards):03d}.bin"
        self._file = open(self.directory / name, "wb")
        self._hash = hashlib.sha256()
        self._in_shard = 0
        self.shards.append({"file": name, "tokens": 0, "bytes": 0, "sha256": ""})

    def _flush(self) -> None:
        data = self._buf[:self._fill].data
        self._file.write(data)
        self._hash.update(data)
        self._fill = 0

    def _finish_shard(self) -> None:
        self._flush()
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        self._file = None
        self.shards[-1].update(tokens=self._in_shard, bytes=self._in_shard * self.dtype.itemsize, sha256=self._hash.hexdigest())


class _SplitChunk(NamedTuple):
    tokens: np.ndarray
    documents: int
    text_bytes: int


def _tokenize_chunk(
    tokenizer: Tokenizer, start: int, docs: list[str], seed: int, val_fraction: float
) -> dict[str, _SplitChunk]:
    """Tokenize documents ``start..`` and group them by split, each followed by end-of-text."""
    encoded = tokenizer.encode_batch(docs)
    members: dict[str, list[int]] = {s: [] for s in SPLITS}
    for j in range(len(docs)):
        members[split_of(start + j, seed, val_fraction)].append(j)
    dtype = token_dtype(tokenizer.vocab_size)
    out = {}
    for split, idx in members.items():
        tokens = np.empty(sum(len(encoded[j]) + 1 for j in idx), dtype=dtype)
        pos = 0
        for j in idx:
            n = len(encoded[j])
            tokens[pos:pos + n] = encoded[j]
            tokens[pos + n] = tokenizer.eot_id
            pos += n + 1
        out[split] = _SplitChunk(tokens, len(idx), sum(len(docs[j].encode("utf-8")) for j in idx))
    return out


_worker_tokenizer: Tokenizer | None = None
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _end_with_parent(parent: int) -> None:
    """End this worker process as soon as ``parent`` (the process running :func:`prepare`) ends,
    however it ends (SIGKILL included), so no worker outlives it holding its caller's stdout and
    stderr: the kernel's parent-death signal on Linux, else a thread polling the parent's pid."""
    armed = False
    if sys.platform.startswith("linux"):
        try:
            armed = ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL) == 0
        except (OSError, AttributeError):
            armed = False
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent,), name="parent-watch", daemon=True).start()
    if os.getppid() != parent:  # it ended before the signal was armed
        os._exit(1)


def _worker_init(name: str, path: str | None, parent: int) -> None:
    global _worker_tokenizer
    _end_with_parent(parent)
    # Ctrl-C in a terminal reaches the whole process group: the parent alone stops, and shuts the pool down.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Parallelism comes from the processes; HF's own thread pool would only oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = load_tokenizer(name, path)


def _worker_tokenize(start: int, docs: list[str], seed: int, val_fraction: float) -> dict[str, _SplitChunk]:
    assert _worker_tokenizer is not None, "worker started without _worker_init"
    return _tokenize_chunk(_worker_tokenizer, start, docs, seed, val_fraction)


def _chunks(docs: Iterator[str]) -> Iterator[tuple[int, list[str]]]:
    """Group the document stream into (first index, documents) work units of bounded size."""
    start, batch, chars = 0, [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if chars >= _CHUNK_CHARS or len(batch) >= _CHUNK_DOCS:
            yield start, batch
            start, batch, chars = start + len(batch), [], 0
    if batch:
        yield start, batch


def _tokenized_chunks(
    docs: Iterator[str], tokenizer: Tokenizer, pool: ProcessPoolExecutor | None, workers: int, seed: int, val_fraction: float
) -> Iterator[dict[str, _SplitChunk]]:
    """Tokenized chunks in document order, in this process (``pool`` is None) or in ``pool``.

    At most ``2 * workers`` chunks are in flight, so a slow consumer never makes the corpus pile
    up in memory (``Pool.imap`` reads its input ahead without limit). A process pool, unlike
    ``multiprocessing.Pool``, reports a dead worker instead of hanging.
    """
    if pool is None:
        for start, batch in _chunks(docs):
            yield _tokenize_chunk(tokenizer, start, batch, seed, val_fraction)
        return
    pending: deque[Future[dict[str, _SplitChunk]]] = deque()
    try:
        for start, batch in _chunks(docs):
            pending.append(pool.submit(_worker_tokenize, start, batch, seed, val_fraction))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    except BrokenProcessPool:
        raise LatentLMError(
            "a tokenizer worker process died (see the error above: out of memory, or a script calling prepare() "
            "without an `if __name__ == '__main__':` guard); fix that or use workers=1"
        ) from None


@contextlib.contextmanager
def _stop_on_signals(out_dir: Path) -> Iterator[None]:
    """While tokenizing, SIGINT / SIGTERM raise :class:`Interrupted` (exit 130 / 143), so the worker
    pool shuts down in order and the scratch directory is removed; a second signal acts as it would
    without this handler. Signal handlers live in the main thread only: elsewhere this does nothing."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[int, Any] = {}

    def restore() -> None:
        for s, handler in previous.items():
            signal.signal(s, signal.SIG_DFL if handler is None else handler)
        previous.clear()

    def stop(signum: int, frame: Any) -> None:
        restore()
        raise Interrupted(f"{signal.Signals(signum).name} while preparing {out_dir}, which is left as it was; run the "
                          "same command again to prepare it", signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        previous[s] = signal.signal(s, stop)
    try:
        yield
    finally:
        restore()


def _check_destination(out_dir: Path, overwrite: bool) -> None:
    if overwrite or not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise LatentLMError(f"output path {out_dir} exists and is not a directory; choose another --out")
    if (out_dir / MANIFEST_NAME).exists():
        raise LatentLMError(f"{out_dir} already holds prepared data; pass --overwrite to replace it or choose another --out")
    if any(out_dir.iterdir()):
        raise LatentLMError(f"{out_dir} exists and is not empty; pass --overwrite to replace it or choose another --out")


def _own_tokenizer_copy(tokenizer: Tokenizer, directory: Path) -> dict[str, Any]:
    """The tokenizer's manifest entry; a trained BPE's tokenizer.json is copied next to the
    shards and recorded relative to them, so a prepared directory is self-contained. An ``hf``
    tokenizer keeps the absolute path of its teacher (a GGUF file can be 100s of MB)."""
    desc = tokenizer.describe()
    if desc["name"] == "bpe":
        shutil.copyfile(desc["path"], directory / TOKENIZER_FILE)
        desc["path"] = TOKENIZER_FILE
    return desc


def tokenizer_for(manifest: Mapping[str, Any], data_dir: str | Path) -> Tokenizer:
    """Load the tokenizer a prepared directory was made with (a BPE's file resolves in it, and so does
    the relative ``hf`` tokenizer directory of an imported checkpoint)."""
    desc = manifest["tokenizer"]
    path = desc.get("path")
    if desc["name"] == "bpe" or (desc["name"] == "hf" and path and not Path(path).is_absolute()
                                 and (Path(data_dir) / path).is_dir()):
        path = Path(data_dir) / path
    return load_tokenizer(desc["name"], path)


def prepare(
    source: str,
    tokenizer: Tokenizer,
    out_dir: str | Path,
    *,
    val_fraction: float = 0.01,
    seed: int = 0,
    workers: int = 0,
    shard_tokens: int = 2**27,
    buffer_tokens: int = 2**20,
    text_field: str = "text",
    limit: int | None = None,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Tokenize ``source`` into shards under ``out_dir`` and return the manifest written there.

    ``workers``: tokenizer processes (0 = min(2, CPU count), 1 = in this process). Workers are
    spawned, so a script calling this with ``workers > 1`` needs the usual
    ``if __name__ == "__main__":`` guard. An existing prepared ``out_dir`` is only replaced
    with ``overwrite=True``.
    """
    if not 0.0 < val_fraction < 1.0:
        raise LatentLMError(f"val_fraction must be between 0 and 1 (exclusive), got {val_fraction}")
    if shard_tokens < 1 or buffer_tokens < 1:
        raise LatentLMError(f"shard_tokens and buffer_tokens must be positive, got {shard_tokens} and {buffer_tokens}")
    if workers < 0:
        raise LatentLMError(f"workers must be >= 0 (0 = automatic), got {workers}")
    workers = workers or min(2, os.cpu_count() or 1)
    out_dir = Path(os.path.abspath(out_dir))
    _check_destination(out_dir, overwrite)
    source_info = describe_source(source, text_field=text_field, limit=limit)
    dtype = token_dtype(tokenizer.vocab_size)

    local = Path(str(source))
    inputs = (local,) if local.exists() else ()  # the corpus must not live inside what --overwrite replaces
    with publishing(out_dir, replace=DATA_FORMAT if overwrite else False, inputs=inputs,
                    refusal="is not prepared data written by latentlm, so --overwrite leaves it alone; remove it "
                            "yourself or choose another --out") as tmp, contextlib.ExitStack() as open_shards:
        writers = {s: ShardWriter(tmp, s, dtype, shard_tokens, buffer_tokens) for s in SPLITS}
        for writer in writers.values():
            open_shards.callback(writer.close)  # on failure, before the scratch directory goes; no-op once finished
        counts = {s: {"documents": 0, "bytes": 0} for s in SPLITS}
        with contextlib.ExitStack() as stack:
            stack.enter_context(_stop_on_signals(out_dir))  # left last: after the pool has shut down
            pool = None
            if workers > 1:
                # Spawned (not forked) workers: the parent may run threads (tqdm, torch, pyarrow)
                # that make fork unsafe. Workers rebuild the tokenizer from its name and path, and
                # end with this process whatever ends it.
                spec = tokenizer.describe()
                pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                           initializer=_worker_init,
                                           initargs=(spec["name"], spec.get("path"), os.getpid()))
                stack.callback(pool.shutdown, wait=True, cancel_futures=True)  # on a failure: no queued work
            bar = stack.enter_context(tqdm(unit="doc", desc="prepare", disable=not progress, mininterval=0.5))
            t0, total_tokens = time.perf_counter(), 0
            docs = iter_documents(source, text_field=text_field, limit=limit)
            for n_chunk, chunk in enumerate(_tokenized_chunks(docs, tokenizer, pool, workers, seed, val_fraction)):
                for split, part in chunk.items():
                    writers[split].write(part.tokens)
                    counts[split]["documents"] += part.documents
                    counts[split]["bytes"] += part.text_bytes
                    total_tokens += len(part.tokens)
                bar.update(sum(part.documents for part in chunk.values()))
                bar.set_postfix_str(f"{total_tokens / max(time.perf_counter() - t0, 1e-9):,.0f} tok/s", refresh=False)
                if n_chunk == 0:
                    write_delay()  # test seam: the output half-written, the workers running
        splits = {}
        for split, writer in writers.items():
            shards = writer.finish()
            splits[split] = {"tokens": sum(s["tokens"] for s in shards), **counts[split], "shards": shards}
        manifest = DATA_FORMAT.write(tmp, {
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "tokenizer": _own_tokenizer_copy(tokenizer, tmp),
            "dtype": dtype.name,
            "byte_order": "little",
            "source": source_info,
            "seed": seed,
            "val_fraction": val_fraction,
            "splits": splits,
        })
    return manifest


def load_manifest(data_dir: str | Path, *, verify: str = "size") -> dict[str, Any]:
    """Load ``data_dir/manifest.json`` and check every shard exists with the recorded size.

    ``verify="sha256"`` also checksums every shard (slow for large corpora, catches bit rot).
    """
    if verify not in VERIFY_MODES:
        raise LatentLMError(f"unknown verify mode {verify!r}; choose one of {', '.join(VERIFY_MODES)}")
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise LatentLMError(f"data directory {data_dir} does not exist; create it with `latentlm prepare`")
    manifest = DATA_FORMAT.read(data_dir)
    _check_structure(manifest, data_dir / MANIFEST_NAME)
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for split, info in manifest["splits"].items():
        for shard in info["shards"]:
            file = data_dir / shard["file"]
            if not file.is_file():
                raise LatentLMError(f"shard {file} of split {split} is missing; re-run `latentlm prepare`")
            size, expected = file.stat().st_size, shard["tokens"] * itemsize
            if size != expected:
                raise LatentLMError(f"shard {file} has {size} bytes but the manifest says {expected}; re-run `latentlm prepare`")
            if verify == "sha256" and sha256_file(file) != shard["sha256"]:
                raise LatentLMError(
                    f"shard {file} does not match its sha256 in the manifest (corrupted); re-run `latentlm prepare`"
                )
    return manifest


def _check_structure(manifest: dict[str, Any], path: Path) -> None:
    """One-line error for a manifest with missing or wrongly typed fields (damaged or hand-edited),
    instead of a KeyError deep inside training."""

    def bad(what: str) -> None:
        raise LatentLMError(f"{path} is malformed ({what}); re-run `latentlm prepare`")

    if manifest.get("dtype") not in ("uint16", "uint32"):
        bad(f"dtype {manifest.get('dtype')!r} is not uint16 or uint32")
    tok = manifest.get("tokenizer")
    if not (isinstance(tok, dict) and isinstance(tok.get("name"), str) and isinstance(tok.get("vocab_size"), int)):
        bad("no tokenizer name and vocab_size")
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or not set(SPLITS) <= set(splits):
        bad(f"it needs splits {' and '.join(SPLITS)}")
    for name, info in splits.items():
        shards = info.get("shards") if isinstance(info, dict) else None
        if not isinstance(shards, list) or not all(
                isinstance(s, dict) and isinstance(s.get("file"), str) and Path(s["file"]).name == s["file"]
                and isinstance(s.get("tokens"), int) and s["tokens"] >= 0 and isinstance(s.get("sha256"), str)
                for s in shards):
            bad(f"split {name} has no valid list of shards")


def check_tokenizer(
    manifest: Mapping[str, Any], tokenizer: Tokenizer | Mapping[str, Any] | str, vocab_size: int | None = None
) -> None:
    """Raise if data prepared per ``manifest`` does not fit the run's tokenizer or model vocabulary.

    ``tokenizer`` may be a :class:`Tokenizer`, its ``describe()`` dict, or just a name (then only
    the name is compared). ``vocab_size`` is the model's embedding size; it must equal the
    tokenizer's vocabulary size recorded in the manifest.
    """
    data = manifest["tokenizer"]
    if isinstance(tokenizer, Tokenizer):
        want: Mapping[str, Any] = tokenizer.describe()
    elif isinstance(tokenizer, str):
        want = {"name": tokenizer}
    else:
        want = tokenizer
    diffs = [
        f"{key} {str(data.get(key))[:12]} vs {str(want[key])[:12]}"  # 12 hex digits identify a fingerprint
        for key in ("name", "vocab_size", "fingerprint")
        if key in want and want[key] != data.get(key)
    ]
    if diffs:
        raise LatentLMError(
            f"data was prepared with a different tokenizer (data vs run: {'; '.join(diffs)}); "
            "re-run `latentlm prepare` with this tokenizer or use the tokenizer the data was prepared with"
        )
    if vocab_size is not None and vocab_size != data["vocab_size"]:
        raise LatentLMError(
            f"the model has vocab_size {vocab_size} but the data's {data['name']} tokenizer has {data['vocab_size']} tokens; "
            f"set --model.vocab_size {data['vocab_size']} or re-run `latentlm prepare` with a matching tokenizer"
        )
