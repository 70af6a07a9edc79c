"""Document sources and corpus preparation: exact tokens, deterministic splits, bounded memory, safe writes."""

from __future__ import annotations

import gzip
import importlib.util
import json
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

import latentlm
from latentlm.fileio import sha256_file
from latentlm.data.prepare import (
    MANIFEST_NAME,
    check_tokenizer,
    load_manifest,
    prepare,
    split_of,
    token_dtype,
)
from latentlm.data.sources import describe_source, iter_documents
from latentlm.data.tokenizers import ByteTokenizer, load_tokenizer
from latentlm.errors import LatentLMError

HAS_DATASETS = importlib.util.find_spec("datasets") is not None


def read_split(data_dir: Path, split: str) -> np.ndarray:
    """All tokens of a split, concatenated from its shards in manifest order."""
    manifest = json.loads((data_dir / MANIFEST_NAME).read_text())
    parts = [np.fromfile(data_dir / s["file"], dtype=manifest["dtype"]) for s in manifest["splits"][split]["shards"]]
    return np.concatenate(parts) if parts else np.empty(0, dtype=manifest["dtype"])


def expected_split(docs: list[str], tok, split: str, seed: int, val_fraction: float) -> list[int]:
    """Reference: tokenize in-process, one document at a time, EOT after each."""
    out: list[int] = []
    for i, doc in enumerate(docs):
        if split_of(i, seed, val_fraction) == split:
            out += tok.encode(doc) + [tok.eot_id]
    return out


# --- sources -----------------------------------------------------------------------------------


def test_wiki_source_is_sorted_and_limited() -> None:
    docs = list(iter_documents("wiki", limit=5))
    assert len(docs) == 5 and all(docs)
    assert docs[0].startswith("0 is a number")
    assert list(iter_documents("wiki", limit=5)) == docs
    info = describe_source("wiki", limit=5)
    assert info["kind"] == "wiki" and info["path"].endswith("summaries_en-us.json") and info["limit"] == 5


def test_file_directory_and_glob_sources(tmp_path: Path, write_jsonl: Callable[..., Path]) -> None:
    root = tmp_path / "corpus"
    (root / "b").mkdir(parents=True)
    (root / ".hidden").mkdir()
    (root / "a.txt").write_text("first\n\nstill first 🤖\r\n", encoding="utf-8")
    (root / "b" / "c.md").write_text("# markdown", encoding="utf-8")
    (root / "b" / "empty.txt").write_text("")
    (root / "b" / "skip.csv").write_text("x,y")
    (root / ".hidden" / "h.txt").write_text("hidden")
    with gzip.open(root / "b" / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps({"text": "gz one"}) + "\n\n" + json.dumps({"text": ""}) + "\n" + json.dumps({"text": "gz two"}) + "\n")
    assert list(iter_documents(str(root))) == ["first\n\nstill first 🤖\r\n", "# markdown", "gz one", "gz two"]
    assert list(iter_documents(str(root / "a.txt"))) == ["first\n\nstill first 🤖\r\n"]
    assert list(iter_documents(str(root / "**" / "*.md"))) == ["# markdown"]
    assert list(iter_documents(str(root), limit=2)) == ["first\n\nstill first 🤖\r\n", "# markdown"]
    jsonl = write_jsonl(["x", "y"], field="body")
    assert list(iter_documents(str(jsonl), text_field="body")) == ["x", "y"]
    assert describe_source(str(root))["files"] == 4  # a.txt, c.md, d.jsonl.gz, empty.txt


def test_source_errors(tmp_path: Path, write_jsonl: Callable[..., Path]) -> None:
    with pytest.raises(LatentLMError, match="does not exist"):
        list(iter_documents(str(tmp_path / "nope.txt")))
    with pytest.raises(LatentLMError, match="matched no files"):
        list(iter_documents(str(tmp_path / "*.txt")))
    bad = write_jsonl(["ok"], name="bad.jsonl")
    with open(bad, "a") as f:
        f.write(json.dumps({"content": "no text"}) + "\n")
    with pytest.raises(LatentLMError, match=r"bad\.jsonl line 2 has no field 'text'"):
        list(iter_documents(str(bad)))
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café".encode("latin-1"))
    with pytest.raises(LatentLMError, match=r"latin1\.txt is not valid UTF-8"):
        list(iter_documents(str(latin1)))
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(LatentLMError, match="no documents"):
        list(iter_documents(str(tmp_path / "empty.txt")))
    with pytest.raises(LatentLMError, match="positive"):
        list(iter_documents("wiki", limit=0))
    (tmp_path / "nodocs").mkdir()
    with pytest.raises(LatentLMError, match="contains no .txt"):
        list(iter_documents(str(tmp_path / "nodocs")))


@pytest.mark.skipif(HAS_DATASETS, reason="checks the message shown when `datasets` is missing")
def test_hf_source_without_datasets() -> None:
    with pytest.raises(LatentLMError, match=r"pip install 'latentlm\[hf\]'"):
        list(iter_documents("hf:some/dataset"))


@pytest.mark.skipif(not HAS_DATASETS, reason="Hugging Face `datasets` is not installed")
def test_hf_source_from_disk(tmp_path: Path) -> None:
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["a", "", "b"]})}).save_to_disk(str(tmp_path / "ds"))
    assert list(iter_documents(f"hf:{tmp_path / 'ds'}:train")) == ["a", "b"]
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "part.jsonl").write_text('{"text": "c"}\n{"text": "d"}\n')
    assert list(iter_documents(f"hf:{tmp_path / 'files'}")) == ["c", "d"]  # streaming load_dataset
    with pytest.raises(LatentLMError, match="no split 'test'"):
        list(iter_documents(f"hf:{tmp_path / 'ds'}:test"))


# --- prepare -----------------------------------------------------------------------------------


def test_split_is_deterministic_and_balanced() -> None:
    splits = [split_of(i, 0, 0.1) for i in range(20000)]
    assert splits[:2] == ["train", "val"]
    assert splits == [split_of(i, 0, 0.1) for i in range(20000)]
    assert 0.09 < splits.count("val") / len(splits) < 0.11
    assert splits != [split_of(i, 1, 0.1) for i in range(20000)]
    assert token_dtype(65536) == np.dtype("<u2") and token_dtype(65537) == np.dtype("<u4")


def test_prepare_matches_direct_tokenization_for_any_worker_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("latentlm.data.prepare._CHUNK_DOCS", 16)  # many chunks in flight, out-of-order completion
    tok = load_tokenizer("gpt2")
    docs = list(iter_documents("wiki", limit=200))
    one = prepare("wiki", tok, tmp_path / "w1", limit=200, workers=1, val_fraction=0.05, seed=3, progress=False)
    two = prepare("wiki", tok, tmp_path / "w2", limit=200, workers=2, val_fraction=0.05, seed=3, progress=False)
    for split in ("train", "val"):
        tokens = read_split(tmp_path / "w1", split)
        assert tokens.tolist() == expected_split(docs, tok, split, 3, 0.05)
        assert np.array_equal(tokens, read_split(tmp_path / "w2", split))
        assert one["splits"][split]["shards"] == two["splits"][split]["shards"]
        assert int((tokens == tok.eot_id).sum()) == one["splits"][split]["documents"]
        assert tokens[-1] == tok.eot_id
    assert one["splits"]["train"]["documents"] + one["splits"]["val"]["documents"] == 200
    assert one["splits"]["val"]["documents"] >= 1


def test_prepare_bpe_in_worker_processes(tmp_path: Path, bpe_path: Path, write_jsonl: Callable[..., Path]) -> None:
    tok = load_tokenizer("bpe", bpe_path)
    docs = [f"doc {i}: {'héllo wörld 🤖 ' * (i % 7)}<|endoftext|>" for i in range(300)]
    corpus = write_jsonl(docs)
    manifest = prepare(str(corpus), tok, tmp_path / "out", workers=2, val_fraction=0.2, progress=False)
    assert manifest["tokenizer"] == {**tok.describe(), "path": "tokenizer.json"}  # a copy travels with the data
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == bpe_path.read_bytes()
    for split in ("train", "val"):
        assert read_split(tmp_path / "out", split).tolist() == expected_split(docs, tok, split, 0, 0.2)


def test_dead_worker_is_reported(tmp_path: Path, bpe_path: Path) -> None:
    copy = tmp_path / "tokenizer.json"
    copy.write_bytes(bpe_path.read_bytes())
    tok = load_tokenizer("bpe", copy)
    copy.unlink()  # workers rebuild the tokenizer from this path and fail
    with pytest.raises(LatentLMError, match="worker process died"):
        prepare("wiki", tok, tmp_path / "out", limit=20, workers=2, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_manifest_contents(tmp_path: Path) -> None:
    tok = ByteTokenizer()
    docs = list(iter_documents("wiki", limit=50))
    manifest = prepare("wiki", tok, tmp_path / "out", limit=50, workers=1, progress=False)
    assert manifest == json.loads((tmp_path / "out" / MANIFEST_NAME).read_text())
    assert manifest["latentlm_version"] == latentlm.__version__ and manifest["dtype"] == "uint16"
    assert manifest["tokenizer"] == tok.describe() and manifest["source"]["kind"] == "wiki"
    assert (manifest["seed"], manifest["val_fraction"]) == (0, 0.01)
    total_bytes = 0
    for info in manifest["splits"].values():
        assert info["tokens"] == sum(s["tokens"] for s in info["shards"])
        for shard in info["shards"]:
            path = tmp_path / "out" / shard["file"]
            assert sha256_file(path) == shard["sha256"] and path.stat().st_size == shard["bytes"] == 2 * shard["tokens"]
        total_bytes += info["bytes"]
        assert info["tokens"] == info["bytes"] + info["documents"]  # byte tokenizer: one token per byte + EOT
    assert total_bytes == sum(len(d.encode()) for d in docs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_many_small_shards_and_buffer_flushes(tmp_path: Path) -> None:
    tok = ByteTokenizer()
    big = prepare("wiki", tok, tmp_path / "big", limit=200, workers=1, progress=False)
    small = prepare("wiki", tok, tmp_path / "small", limit=200, workers=1, shard_tokens=4096, buffer_tokens=512, progress=False)
    shards = small["splits"]["train"]["shards"]
    assert len(big["splits"]["train"]["shards"]) == 1 and len(shards) > 10
    assert [s["file"] for s in shards[:2]] == ["train_000.bin", "train_001.bin"]
    assert all(s["tokens"] == 4096 for s in shards[:-1]) and 0 < shards[-1]["tokens"] <= 4096
    for split in ("train", "val"):
        assert np.array_equal(read_split(tmp_path / "big", split), read_split(tmp_path / "small", split))
    load_manifest(tmp_path / "small", verify="sha256")


def test_memory_does_not_grow_with_corpus(tmp_path: Path, write_jsonl: Callable[..., Path]) -> None:
    rng = np.random.default_rng(0)
    words = np.array(["alpha", "beta", "gamma", "delta", "épsilon", "zeta", "ηta", "theta"])

    def peak_bytes(n_docs: int, name: str) -> tuple[int, int]:
        docs = [" ".join(rng.choice(words, 80)) for _ in range(n_docs)]
        corpus = write_jsonl(docs, name=f"{name}.jsonl")
        del docs
        tracemalloc.start()
        try:
            manifest = prepare(str(corpus), ByteTokenizer(), tmp_path / name, workers=1, buffer_tokens=1 << 14, progress=False)
            peak = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        return peak, sum(s["tokens"] for s in manifest["splits"].values()) * 2

    small_peak, _ = peak_bytes(2500, "small")
    big_peak, big_token_bytes = peak_bytes(10000, "big")
    assert big_token_bytes > 8_000_000
    # Holding the corpus or its tokens would add several MB; bounded chunks and buffers add ~nothing.
    assert big_peak - small_peak < big_token_bytes / 16
    assert big_peak < 0.6 * big_token_bytes


def test_load_manifest_detects_damage(tmp_path: Path) -> None:
    out = tmp_path / "out"
    prepare("wiki", ByteTokenizer(), out, limit=30, workers=1, progress=False)
    load_manifest(out, verify="sha256")
    shard = out / "train_000.bin"
    data = shard.read_bytes()
    shard.write_bytes(data[:-2])
    with pytest.raises(LatentLMError, match=r"train_000\.bin has \d+ bytes but the manifest says \d+; re-run"):
        load_manifest(out)
    shard.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    load_manifest(out)  # same size: only the checksum notices
    with pytest.raises(LatentLMError, match="sha256"):
        load_manifest(out, verify="sha256")
    shard.unlink()
    with pytest.raises(LatentLMError, match=r"train_000\.bin of split train is missing"):
        load_manifest(out)
    (out / MANIFEST_NAME).unlink()
    with pytest.raises(LatentLMError, match="no manifest.json"):
        load_manifest(out)
    with pytest.raises(LatentLMError, match="does not exist"):
        load_manifest(tmp_path / "elsewhere")


def test_existing_output_needs_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()  # an empty directory is fine to fill
    first = prepare("wiki", ByteTokenizer(), out, limit=20, workers=1, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(LatentLMError, match="--overwrite"):
        prepare("wiki", ByteTokenizer(), out, limit=40, workers=1, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    second = prepare("wiki", ByteTokenizer(), out, limit=40, workers=1, overwrite=True, progress=False)
    assert second["splits"]["train"]["documents"] > first["splits"]["train"]["documents"]
    assert load_manifest(out)["splits"] == second["splits"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_crash_leaves_no_output(tmp_path: Path) -> None:
    class Exploding(ByteTokenizer):
        calls = 0

        def encode(self, text: str) -> list[int]:
            Exploding.calls += 1
            if Exploding.calls > 150:
                raise RuntimeError("boom")
            return super().encode(text)

    with pytest.raises(RuntimeError, match="boom"):
        prepare("wiki", Exploding(), tmp_path / "out", limit=2000, workers=1, buffer_tokens=256, shard_tokens=1024,
                progress=False)
    assert list(tmp_path.iterdir()) == []


def test_invalid_arguments(tmp_path: Path) -> None:
    for kwargs in ({"val_fraction": 0.0}, {"val_fraction": 1.0}, {"shard_tokens": 0}, {"workers": -1}):
        with pytest.raises(LatentLMError):
            prepare("wiki", ByteTokenizer(), tmp_path / "out", limit=5, progress=False, **kwargs)
    with pytest.raises(LatentLMError, match="does not exist"):
        prepare(str(tmp_path / "missing"), ByteTokenizer(), tmp_path / "out", progress=False)
    assert list(tmp_path.iterdir()) == []


def test_check_tokenizer(tmp_path: Path) -> None:
    manifest = prepare("wiki", ByteTokenizer(), tmp_path / "out", limit=5, workers=1, progress=False)
    check_tokenizer(manifest, ByteTokenizer(), 257)
    check_tokenizer(manifest, "byte")
    with pytest.raises(LatentLMError, match=r"name byte vs gpt2.*re-run `latentlm prepare`"):
        check_tokenizer(manifest, load_tokenizer("gpt2"))
    with pytest.raises(LatentLMError, match="fingerprint"):
        check_tokenizer(manifest, {**ByteTokenizer().describe(), "fingerprint": "0" * 64})
    with pytest.raises(LatentLMError, match=r"vocab_size 50257 .* has 257 tokens; set --model.vocab_size 257"):
        check_tokenizer(manifest, "byte", 50257)
