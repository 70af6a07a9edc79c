"""Training and evaluation batches from prepared token shards.

The shards of a split are memory-mapped and read as one token stream. The stream is cut into
windows of ``block_size + 1`` tokens; window ``i`` starts at ``i * block_size`` (consecutive
windows share one token, so every token but the first is a target exactly once) and the
incomplete tail is dropped. ``x`` is a window without its last token, ``y`` without its first.
Training windows can also be shifted (``shift=True``, the CoCoMix authors' loader): each epoch window
``i`` starts at ``i * block_size + s_i`` with ``s_i`` drawn uniformly from ``[0, block_size]``
(``[0, r]`` for the last window, where ``r`` tokens are left over), so the model sees other cuts
of the stream every epoch.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from latentlm.data.prepare import load_manifest
from latentlm.errors import LatentLMError


class TokenSplit:
    """One split (``train``/``val``) of a prepared directory as a single read-only token stream."""

    def __init__(self, data_dir: str | Path, split: str = "train", *, verify: str = "size") -> None:
        self.data_dir, self.split = Path(data_dir), split
        self.manifest = load_manifest(data_dir, verify=verify)
        splits = self.manifest["splits"]
        if split not in splits:
            raise LatentLMError(f"{data_dir} has no split {split!r} (has {', '.join(splits)})")
        info = splits[split]
        shard_tokens = sum(s["tokens"] for s in info["shards"])
        if not (all(type(info.get(k)) is int and info[k] >= 0 for k in ("tokens", "documents", "bytes"))
                and info["tokens"] == shard_tokens):
            raise LatentLMError(f"{self.data_dir / 'manifest.json'} is malformed (split {split} needs integer tokens, "
                                f"documents and bytes, tokens equal to its shards' {shard_tokens}); re-run `latentlm prepare`")
        if info["tokens"] == 0:
            raise LatentLMError(
                f"split {split} of {data_dir} is empty; re-run `latentlm prepare` with more documents or a larger val fraction"
            )
        self.documents: int = info["documents"]
        self.text_bytes: int = info["bytes"]
        self.vocab_size: int = self.manifest["tokenizer"]["vocab_size"]  # every id must be below it
        dtype = np.dtype(self.manifest["dtype"]).newbyteorder("<")
        self._files = [self.data_dir / s["file"] for s in info["shards"]]
        self._shards = [np.memmap(f, dtype=dtype, mode="r") for f in self._files]
        self._starts = np.cumsum([0] + [len(s) for s in self._shards])

    def __len__(self) -> int:
        return int(self._starts[-1])

    def get(self, start: int, length: int) -> np.ndarray:
        """Copy of tokens ``[start, start + length)`` of the stream, possibly spanning several shards.

        An id outside the data's vocabulary (a damaged or hand-edited shard the size check passes)
        is a one-line error here, on the CPU copy, before it can index an embedding: one pass over
        tokens that are about to be used anyway, so it costs nothing noticeable on huge corpora."""
        if start < 0 or length < 0 or start + length > len(self):
            raise IndexError(f"tokens [{start}, {start + length}) out of range for a split of {len(self)} tokens")
        out = np.empty(length, dtype=self._shards[0].dtype)
        k = int(np.searchsorted(self._starts, start, side="right")) - 1
        pos = 0
        while pos < length:
            shard = self._shards[k]
            offset = start + pos - int(self._starts[k])
            n = min(length - pos, len(shard) - offset)
            out[pos:pos + n] = shard[offset:offset + n]
            pos += n
            k += 1
        if length and int(out.max()) >= self.vocab_size:
            self._bad_token(start, out)
        return out

    def _bad_token(self, start: int, tokens: np.ndarray) -> None:
        at = start + int(np.argmax(tokens >= self.vocab_size))
        k = int(np.searchsorted(self._starts, at, side="right")) - 1
        raise LatentLMError(
            f"shard {self._files[k]} holds token id {int(tokens[at - start])} (at token {at - int(self._starts[k])}) but "
            f"the data's {self.manifest['tokenizer']['name']} tokenizer has {self.vocab_size} ids: the shard is damaged "
            "or was edited; re-run `latentlm prepare`")


def _batch(split: TokenSplit, windows: np.ndarray, block_size: int, pin_memory: bool,
           offsets: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) int64 tensors [len(windows), block_size] for the given window indices (each moved
    ``offsets[row]`` tokens further into the stream when given)."""
    buf = np.empty((len(windows), block_size + 1), dtype=np.int64)
    for row, w in enumerate(windows):
        start = int(w) * block_size + (0 if offsets is None else int(offsets[row]))
        buf[row] = split.get(start, block_size + 1)
    x = torch.from_numpy(buf[:, :-1].copy())
    y = torch.from_numpy(buf[:, 1:].copy())
    if pin_memory and torch.cuda.is_available():
        x, y = x.pin_memory(), y.pin_memory()
    return x, y


def _num_windows(split: TokenSplit, block_size: int) -> int:
    return (len(split) - 1) // block_size


class WindowLoader:
    """Shuffled training batches, resumable and identical under data-parallel sharding.

    Each epoch visits the windows in a permutation drawn from (seed, epoch). A global batch is
    the next ``batch_size * world_size`` windows of that order and rank ``r`` takes slice
    ``[r * batch_size, (r + 1) * batch_size)``, so N ranks with batch B see exactly the windows
    of one rank with batch N*B. When fewer windows than a global batch remain in the epoch they
    are skipped and the next epoch starts (its permutation is independent, so skipped windows
    are not systematically lost). With ``shift`` the windows' offsets (module docstring) are drawn
    per epoch from (seed, epoch) too, from a stream of their own: resumable and rank-independent.
    """

    def __init__(
        self,
        split: TokenSplit,
        block_size: int,
        batch_size: int,
        *,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        pin_memory: bool = False,
        shift: bool = False,
    ) -> None:
        if block_size < 1 or batch_size < 1:
            raise LatentLMError(f"block_size and batch_size must be positive, got {block_size} and {batch_size}")
        if seed < 0:
            raise LatentLMError(f"data seed must be >= 0, got {seed}")
        if not 0 <= rank < world_size:
            raise LatentLMError(f"rank {rank} is outside world size {world_size}")
        self.split, self.block_size, self.batch_size = split, block_size, batch_size
        self.seed, self.rank, self.world_size, self.pin_memory = seed, rank, world_size, pin_memory
        self.shift = shift
        self.global_batch = batch_size * world_size
        self.num_windows = _num_windows(split, block_size)
        if self.num_windows < self.global_batch:
            need = self.global_batch * block_size + 1
            raise LatentLMError(
                f"split {split.split} of {split.data_dir} has {len(split)} tokens but one global batch of "
                f"{self.global_batch} x {block_size} needs {need}; prepare more data or lower batch_size/block_size"
            )
        self.epoch, self.cursor = 0, 0
        self._order_epoch, self._order = -1, np.empty(0, dtype=np.int64)
        self._shift_epoch, self._shifts = -1, np.empty(0, dtype=np.int64)

    @property
    def batches_per_epoch(self) -> int:
        """Global batches per epoch (the tail that does not fill one is skipped)."""
        return self.num_windows // self.global_batch

    def _epoch_order(self, epoch: int) -> np.ndarray:
        if epoch != self._order_epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch]))
            self._order, self._order_epoch = rng.permutation(self.num_windows), epoch
        return self._order

    def epoch_shifts(self, epoch: int) -> np.ndarray:
        """Every window's offset in ``epoch`` (int64 [num_windows]; zeros without ``shift``)."""
        if not self.shift:
            return np.zeros(self.num_windows, dtype=np.int64)
        if epoch != self._shift_epoch:
            rng = np.random.Generator(np.random.PCG64([self.seed, epoch, 1]))  # not the permutation's stream
            shifts = rng.integers(0, self.block_size + 1, size=self.num_windows)
            spare = len(self.split) - 1 - self.num_windows * self.block_size  # tokens after the last window
            shifts[-1] = rng.integers(0, spare + 1)
            self._shifts, self._shift_epoch = shifts, epoch
        return self._shifts

    def next_batch_windows(self) -> tuple[torch.Tensor, torch.Tensor, np.ndarray]:
        """This rank's next (x, y, windows): x and y int64 tensors [batch_size, block_size], and the
        batch's window ids (int64 [batch_size]; window i starts at token i * block_size, plus its
        epoch's offset with ``shift``), which key per-window data such as a concept-label cache."""
        if self.cursor + self.global_batch > self.num_windows:
            self.epoch, self.cursor = self.epoch + 1, 0
        lo = self.cursor + self.rank * self.batch_size
        windows = self._epoch_order(self.epoch)[lo:lo + self.batch_size]
        self.cursor += self.global_batch
        offsets = self.epoch_shifts(self.epoch)[windows] if self.shift else None
        return (*_batch(self.split, windows, self.block_size, self.pin_memory, offsets), windows)

    def upcoming_windows(self, n_batches: int) -> np.ndarray:
        """The window ids of the next ``n_batches`` global batches, every rank's (int64, in the order
        they come), from the current position; reads no tokens and moves nothing: what a label cache
        must hold for a run that takes that many batches (``concepts label`` over only those windows)."""
        if n_batches < 0:
            raise LatentLMError(f"n_batches={n_batches} must be >= 0")
        epoch, cursor, parts = self.epoch, self.cursor, []
        left = n_batches
        while left:
            if cursor + self.global_batch > self.num_windows:
                epoch, cursor = epoch + 1, 0
            take = min(left, (self.num_windows - cursor) // self.global_batch)
            end = cursor + take * self.global_batch
            parts.append(self._epoch_order(epoch)[cursor:end].copy())  # the order's cache only: no state
            cursor, left = end, left - take
        return np.concatenate(parts) if parts else np.empty(0, dtype=np.int64)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's next (x, y), each an int64 tensor [batch_size, block_size]."""
        return self.next_batch_windows()[:2]

    def state_dict(self) -> dict[str, int | bool]:
        """Position in the data stream; the same on every rank."""
        return {
            "epoch": self.epoch,
            "cursor": self.cursor,
            "seed": self.seed,
            "block_size": self.block_size,
            "batch_size_global": self.global_batch,
            "shift": self.shift,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue exactly where ``state`` left off (the saved seed replaces this loader's seed)."""
        for key, mine in (("block_size", self.block_size), ("batch_size_global", self.global_batch),
                          ("shift", self.shift)):
            if state.get(key, False) != mine:  # a state saved before "shift" existed had unshifted windows
                raise LatentLMError(
                    f"cannot resume the data loader: checkpoint has {key}={state.get(key, False)} but this run uses {mine}; "
                    "use the checkpoint's value or start a new run"
                )
        if not 0 <= state["cursor"] <= self.num_windows:
            raise LatentLMError(
                f"cannot resume the data loader: checkpoint cursor {state['cursor']} exceeds the {self.num_windows} windows "
                "of this data; resume with the data the run was started with"
            )
        self.seed, self.epoch, self.cursor = int(state["seed"]), int(state["epoch"]), int(state["cursor"])
        self._order_epoch = self._shift_epoch = -1


def iter_eval_windows(
    split: TokenSplit, block_size: int, batch_size: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Windows 0, 1, 2, ... in order, batched: deterministic validation batches.

    Without ``max_batches`` the whole split is covered and the last batch may be smaller.
    """
    n = _num_windows(split, block_size)
    if n == 0:
        raise LatentLMError(
            f"split {split.split} of {split.data_dir} has {len(split)} tokens, fewer than one window of {block_size + 1}; "
            "prepare more data or lower block_size"
        )
    if max_batches is not None:
        n = min(n, max_batches * batch_size)
    yield from iter_windows(split, block_size, batch_size, np.arange(n))


def iter_windows(split: TokenSplit, block_size: int, batch_size: int,
                 windows: np.ndarray) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) of the windows ``windows`` (ids as :class:`WindowLoader` numbers them), in that order,
    ``batch_size`` at a time (the last batch may be smaller)."""
    for lo in range(0, len(windows), batch_size):
        yield _batch(split, windows[lo:lo + batch_size], block_size, pin_memory=False)
