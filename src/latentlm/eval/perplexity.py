"""Perplexity and bits per byte over a token stream, with sliding windows.

Windows of up to ``seq_len + 1`` tokens (``seq_len`` inputs, ``seq_len`` targets) start every
``stride`` tokens. Each target token is scored exactly once, in the first window that holds
it, so with ``stride < seq_len`` every target after the first window sees at least
``seq_len - stride`` tokens of context (the Hugging Face perplexity recipe); ``stride ==
seq_len`` gives non-overlapping windows. The first token of the stream is never scored: it
has no context.

Bits per byte divides the summed NLL (in bits) by the UTF-8 bytes of the scored tokens, which
makes models with different tokenizers comparable.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Protocol

import numpy as np
import torch
import torch.distributed as dist
from tqdm.auto import tqdm

from latentlm.errors import LatentLMError
from latentlm.methods.base import Method, unwrap

Window = tuple[int, int, int]  # (first token, tokens in the window, targets newly scored)


class TokenSource(Protocol):
    """Random access to a token stream (the data loader's ``TokenSplit`` is one)."""

    def __len__(self) -> int: ...

    def get(self, start: int, length: int) -> np.ndarray: ...


class TextTokenizer(Protocol):
    """The part of a tokenizer that :func:`evaluate_text` uses."""

    eot_id: int

    def encode(self, text: str) -> list[int]: ...

    def token_byte_lengths(self) -> np.ndarray: ...


class _ArrayTokens:
    """A 1-D array (a memmap is fine) seen as a :class:`TokenSource`."""

    def __init__(self, array: np.ndarray):
        self.array = array

    def __len__(self) -> int:
        return len(self.array)

    def get(self, start: int, length: int) -> np.ndarray:
        return np.asarray(self.array[start:start + length])


def _windows(n_tokens: int, seq_len: int, stride: int) -> list[Window]:
    """Windows covering targets ``1 .. n_tokens-1`` once each; only the last may be short."""
    windows, scored, start = [], 0, 0  # scored: index of the last target already scored
    while scored < n_tokens - 1:
        end = min(start + seq_len, n_tokens - 1)  # index of the window's last target
        windows.append((start, end - start + 1, end - scored))
        scored, start = end, start + stride
    return windows


def _batches(windows: list[Window], batch_size: int) -> Iterator[list[Window]]:
    """Consecutive windows of equal length, at most ``batch_size`` at a time."""
    batch: list[Window] = []
    for w in windows:
        if batch and (len(batch) == batch_size or batch[0][1] != w[1]):
            yield batch
            batch = []
        batch.append(w)
    if batch:
        yield batch


@torch.inference_mode()
def evaluate_tokens(method: Method, tokens: np.ndarray | TokenSource, *, seq_len: int, batch_size: int = 8,
                    stride: int | None = None, byte_lengths: np.ndarray | None = None,
                    max_tokens: int | None = None, progress: bool = False, rank: int = 0,
                    world_size: int = 1) -> dict[str, float]:
    """Score ``tokens`` (a 1-D array or a :class:`TokenSource`) with sliding windows.

    ``stride`` defaults to ``seq_len`` (non-overlapping windows); ``max_tokens`` caps the
    number of scored targets (the stream is cut after ``max_tokens + 1`` tokens). Returns
    ``loss`` (mean nats per scored token), ``ppl``, ``tokens`` (scored count) and, given
    ``byte_lengths`` (bytes per token id), ``bytes`` of the scored tokens and ``bpb``.

    Data parallel (``world_size`` > 1, every rank of the default process group calling): the same
    windows, in global batches of ``batch_size x world_size``, each rank scoring its disjoint
    ``batch_size`` share; the NLL and byte sums are all-reduced, so every rank returns the result
    one process gets with a ``batch_size x world_size`` batch, and the method's float statistics
    (:meth:`~latentlm.methods.base.Method.pop_eval_metrics`) are means over ranks. Every rank runs
    every batch (FSDP gathers weights in its forward): a rank whose share of a short last batch is
    empty scores nothing of the batch's first window.
    """
    stride = seq_len if stride is None else stride
    cfg = unwrap(method).model.cfg
    if seq_len < 1 or batch_size < 1:
        raise LatentLMError(f"seq_len={seq_len} and batch_size={batch_size} must be positive")
    if not 1 <= stride <= seq_len:
        raise LatentLMError(f"stride={stride} must be in [1, seq_len={seq_len}]; a longer stride "
                            "would skip tokens")
    if cfg.pos == "learned" and seq_len > cfg.block_size:
        raise LatentLMError(f"seq_len={seq_len} exceeds the model's block_size={cfg.block_size} "
                            "(learned positions); lower the evaluation seq_len")
    if byte_lengths is not None and len(byte_lengths) < cfg.vocab_size:
        raise LatentLMError(f"byte_lengths covers {len(byte_lengths)} token ids but the model's "
                            f"vocabulary has {cfg.vocab_size}; use the tokenizer the model was trained with")
    source = tokens if hasattr(tokens, "get") else _ArrayTokens(tokens)
    n_tokens = len(source) if max_tokens is None else min(len(source), max_tokens + 1)
    if n_tokens < 2:
        raise LatentLMError(f"need at least 2 tokens to score one, got {n_tokens}; "
                            "evaluate a longer text or raise max_tokens")

    device = next(method.parameters()).device
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    n_bytes = 0
    was_training = method.training
    method.eval()
    unwrap(method).pop_eval_metrics()  # start this evaluation's statistics afresh
    try:
        with tqdm(total=n_tokens - 1, disable=not progress, unit="tok", desc="perplexity") as bar:
            for batch in _batches(_windows(n_tokens, seq_len, stride), batch_size * world_size):
                share = -(-len(batch) // world_size)
                mine = batch[rank * share:(rank + 1) * share]
                n_new = [new for _, _, new in mine] or [0]  # an empty share runs the first window, unscored
                rows = [source.get(start, length) for start, length, _ in mine or batch[:1]]
                chunks = np.stack(rows).astype(np.int64)
                seq = torch.from_numpy(chunks).to(device)
                nll = method(seq[:, :-1], seq[:, 1:], nll=True)
                width = nll.shape[1]
                first_new = torch.tensor([width - k for k in n_new], device=device)
                scored = torch.arange(width, device=device)[None] >= first_new[:, None]
                total_nats += torch.where(scored, nll.double(), 0.0).sum()
                if byte_lengths is not None:
                    n_bytes += sum(int(byte_lengths[row[-k:]].sum()) for row, k in zip(chunks, n_new) if k)
                bar.update(sum(new for _, _, new in batch))
    finally:
        method.train(was_training)

    statistics = unwrap(method).pop_eval_metrics()  # e.g. ponder's mode and Jacobi residual
    if world_size > 1:
        means = [k for k, v in statistics.items() if isinstance(v, float)]
        sums = torch.tensor([0.0, float(n_bytes)] + [statistics[k] for k in means], dtype=torch.float64,
                            device=device)
        sums[0] = total_nats
        dist.all_reduce(sums, op=dist.ReduceOp.SUM)
        total_nats, n_bytes = sums[0], int(sums[1].item())
        statistics.update({k: v / world_size for k, v in zip(means, sums[2:].tolist())})
    nats = total_nats.item()
    loss = nats / (n_tokens - 1)
    result = {"loss": loss, "ppl": math.exp(loss), "tokens": n_tokens - 1}
    if byte_lengths is not None:
        result["bytes"] = n_bytes
        result["bpb"] = nats / (math.log(2) * n_bytes) if n_bytes else float("nan")
    result.update(statistics)
    return result


def evaluate_text(method: Method, tokenizer: TextTokenizer, text: str, **kw) -> dict[str, float]:
    """Perplexity and bits per byte of ``text`` (keywords as for :func:`evaluate_tokens`).

    The text is scored as a document following end-of-text, exactly as documents appear in
    training shards: an EOT (0 bytes) is prepended, so every token of the text is scored and
    ``bytes`` is the text's full UTF-8 length.
    """
    ids = np.asarray([tokenizer.eot_id] + tokenizer.encode(text), dtype=np.int64)
    return evaluate_tokens(method, ids, byte_lengths=tokenizer.token_byte_lengths(), **kw)
