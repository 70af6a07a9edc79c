"""Token streams and batch loaders: exact windows, shuffling, resumption and data-parallel sharding."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from latentlm.data.loader import TokenSplit, WindowLoader, iter_eval_windows
from latentlm.fileio import write_json_atomic
from latentlm.data.prepare import FORMAT_VERSION, MANIFEST_NAME, ShardWriter, prepare
from latentlm.data.tokenizers import ByteTokenizer
from latentlm.errors import LatentLMError

BLOCK = 8


def position_stream(tmp_path: Path, n_tokens: int, shard_tokens: int) -> TokenSplit:
    """A split whose token at position p is p, so every window is identified by its first token."""
    out = tmp_path / "data"
    out.mkdir()
    writer = ShardWriter(out, "train", np.dtype("<u2"), shard_tokens, buffer_tokens=50)
    writer.write(np.arange(n_tokens))
    shards = writer.finish()
    manifest = {
        "format_version": FORMAT_VERSION,
        "dtype": "uint16",
        "tokenizer": {"name": "positions", "vocab_size": 65536, "eot_id": 0, "fingerprint": ""},
        "splits": {"train": {"tokens": n_tokens, "documents": 1, "bytes": n_tokens, "shards": shards},
                   "val": {"tokens": 0, "documents": 0, "bytes": 0, "shards": []}},
    }
    write_json_atomic(out / MANIFEST_NAME, manifest)
    return TokenSplit(out, "train")


@pytest.fixture
def stream(tmp_path: Path) -> TokenSplit:
    return position_stream(tmp_path, 8 * 50 + 5, shard_tokens=37)  # 50 windows, 11 shards


def windows_of(x: torch.Tensor) -> list[int]:
    return (x[:, 0] // BLOCK).tolist()


def take(loader: WindowLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(n)]


def test_token_split_reads_across_shards(stream: TokenSplit) -> None:
    assert len(stream) == 405 and len(stream.manifest["splits"]["train"]["shards"]) == 11
    assert stream.get(30, 60).tolist() == list(range(30, 90))
    assert stream.get(0, 405).tolist() == list(range(405))
    assert stream.get(37, 37).tolist() == list(range(37, 74))
    assert stream.get(404, 0).size == 0
    with pytest.raises(IndexError):
        stream.get(400, 6)


def test_windows_are_exact_slices(stream: TokenSplit) -> None:
    loader = WindowLoader(stream, BLOCK, 4, seed=0)
    for x, y in take(loader, 20):
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (4, BLOCK)
        assert torch.equal(y[:, :-1], x[:, 1:])
        for row, w in zip(x, windows_of(x)):
            assert row.tolist() == stream.get(w * BLOCK, BLOCK).tolist()
        assert torch.equal(y, x + 1)  # position stream: the target is the next position


def test_epoch_is_a_permutation_then_reshuffles(stream: TokenSplit) -> None:
    loader = WindowLoader(stream, BLOCK, 4, seed=0)
    assert (loader.num_windows, loader.batches_per_epoch) == (50, 12)
    epoch0 = [w for x, _ in take(loader, 12) for w in windows_of(x)]
    assert len(set(epoch0)) == 48 and set(epoch0) <= set(range(50))
    epoch1 = [w for x, _ in take(loader, 12) for w in windows_of(x)]
    assert loader.epoch == 1 and len(set(epoch1)) == 48 and epoch1 != epoch0


def test_seed_determinism(stream: TokenSplit) -> None:
    a = [x for x, _ in take(WindowLoader(stream, BLOCK, 4, seed=7), 5)]
    b = [x for x, _ in take(WindowLoader(stream, BLOCK, 4, seed=7), 5)]
    c = [x for x, _ in take(WindowLoader(stream, BLOCK, 4, seed=8), 5)]
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert not all(torch.equal(p, q) for p, q in zip(a, c))


@pytest.mark.parametrize("steps_before", [0, 5, 12, 23])
def test_resume_continues_identically(stream: TokenSplit, steps_before: int) -> None:
    first = WindowLoader(stream, BLOCK, 4, seed=3)
    take(first, steps_before)
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint round trip
    expected = take(first, 15)  # crosses at least one epoch boundary
    resumed = WindowLoader(stream, BLOCK, 4, seed=999)
    resumed.load_state_dict(state)
    for (x, y), (rx, ry) in zip(expected, take(resumed, 15)):
        assert torch.equal(x, rx) and torch.equal(y, ry)
    assert resumed.state_dict() == first.state_dict()


def test_ranks_split_the_global_batch(stream: TokenSplit) -> None:
    single = WindowLoader(stream, BLOCK, 6, seed=1)
    ranks = [WindowLoader(stream, BLOCK, 3, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(20):  # 8 global batches per epoch: crosses two epoch boundaries
        x, y = single.next_batch()
        (x0, y0), (x1, y1) = ranks[0].next_batch(), ranks[1].next_batch()
        assert not set(windows_of(x0)) & set(windows_of(x1))
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)
    assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()


def test_loader_errors(stream: TokenSplit) -> None:
    with pytest.raises(LatentLMError, match=r"needs 521"):
        WindowLoader(stream, BLOCK, 65, seed=0)
    with pytest.raises(LatentLMError, match="rank"):
        WindowLoader(stream, BLOCK, 2, seed=0, rank=2, world_size=2)
    state = WindowLoader(stream, BLOCK, 4, seed=0).state_dict()
    with pytest.raises(LatentLMError, match="block_size=8 but this run uses 4"):
        WindowLoader(stream, 4, 4, seed=0).load_state_dict(state)
    with pytest.raises(LatentLMError, match="batch_size_global=4 but this run uses 8"):
        WindowLoader(stream, BLOCK, 4, seed=0, world_size=2).load_state_dict(state)


def test_eval_windows_are_sequential(stream: TokenSplit) -> None:
    batches = list(iter_eval_windows(stream, BLOCK, 16))
    assert [len(x) for x, _ in batches] == [16, 16, 16, 2]
    assert [w for x, _ in batches for w in windows_of(x)] == list(range(50))
    assert all(torch.equal(y, x + 1) for x, y in batches)
    limited = list(iter_eval_windows(stream, BLOCK, 16, max_batches=2))
    assert len(limited) == 2 and all(torch.equal(a[0], b[0]) for a, b in zip(limited, batches))
    with pytest.raises(LatentLMError, match="fewer than one window"):
        list(iter_eval_windows(stream, 500, 1))


def test_pin_memory_flag_is_safe_without_cuda(stream: TokenSplit) -> None:
    x, y = WindowLoader(stream, BLOCK, 2, seed=0, pin_memory=True).next_batch()
    assert x.is_pinned() == torch.cuda.is_available() and x.shape == (2, BLOCK)


def test_loader_on_prepared_corpus(tmp_path: Path) -> None:
    manifest = prepare("wiki", ByteTokenizer(), tmp_path / "wiki", limit=60, shard_tokens=3000, workers=1, progress=False)
    train = TokenSplit(tmp_path / "wiki", "train", verify="sha256")
    shards = manifest["splits"]["train"]["shards"]
    concatenated = np.concatenate([np.fromfile(tmp_path / "wiki" / s["file"], dtype="<u2") for s in shards])
    assert len(shards) > 3 and len(train) == len(concatenated) == manifest["splits"]["train"]["tokens"]
    assert np.array_equal(train.get(2990, 20), concatenated[2990:3010])
    loader = WindowLoader(train, 64, 4, seed=0)
    for x, y in take(loader, 10):
        assert int(x.max()) < 257 and torch.equal(y[:, :-1], x[:, 1:])
    val = TokenSplit(tmp_path / "wiki", "val")
    assert val.documents >= 1 and val.text_bytes > 0


def test_token_split_errors(stream: TokenSplit, tmp_path: Path) -> None:
    with pytest.raises(LatentLMError, match="has no split 'test'"):
        TokenSplit(stream.data_dir, "test")
    prepare("wiki", ByteTokenizer(), tmp_path / "one", limit=1, workers=1, progress=False)
    with pytest.raises(LatentLMError, match="split val of .* is empty"):
        TokenSplit(tmp_path / "one", "val")
