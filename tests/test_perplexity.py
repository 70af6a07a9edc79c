"""Sliding-window perplexity and bits per byte against hand computations."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from latentlm.config import make_config
from latentlm.errors import LatentLMError
from latentlm.eval.perplexity import evaluate_text, evaluate_tokens
from latentlm.methods import build_method

VOCAB = 300


def tiny_method(arch: str = "llama", seed: int = 0):
    torch.manual_seed(seed)
    cfg = make_config(overrides=["--model.arch", arch, "--model.n_layer", "2", "--model.n_embd", "64",
                                 "--model.n_head", "4", "--model.block_size", "64",
                                 "--model.vocab_size", str(VOCAB), "--model.init_std", "0.1"])
    return build_method(cfg)


def random_tokens(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, VOCAB, n).astype(np.uint16)


def target_nll(method, tokens: np.ndarray, start: int, target: int) -> float:
    """NLL of ``tokens[target]`` given ``tokens[start:target]``, by a plain forward pass."""
    with torch.no_grad():
        logits = method.model(torch.from_numpy(tokens[start:target].astype(np.int64))[None])[0, -1]
    return F.cross_entropy(logits.double(), torch.tensor(int(tokens[target]))).item()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_non_overlapping_windows_match_hand_computation(arch):
    method, seq_len = tiny_method(arch), 16
    tokens = random_tokens(3 * seq_len + 6)  # 3 full windows and a short tail of 5 targets
    total = 0.0
    for start in range(0, len(tokens) - 1, seq_len):
        chunk = torch.from_numpy(tokens[start:start + seq_len + 1].astype(np.int64))
        with torch.no_grad():
            logits = method.model(chunk[None, :-1])[0]
        total += F.cross_entropy(logits.double(), chunk[1:], reduction="sum").item()
    res = evaluate_tokens(method, tokens, seq_len=seq_len, batch_size=2)
    assert res["tokens"] == len(tokens) - 1
    assert res["loss"] == pytest.approx(total / (len(tokens) - 1), abs=1e-5)
    assert res["ppl"] == pytest.approx(math.exp(res["loss"]))
    assert "bpb" not in res


@pytest.mark.parametrize("stride", [1, 5, 12])
def test_strided_windows_score_each_target_once_with_its_window_context(stride):
    method, seq_len = tiny_method(), 12
    tokens = random_tokens(41)
    # Target t is scored in the first window (starting at a multiple of stride) that reaches it.
    nats = [target_nll(method, tokens, stride * max(0, math.ceil((t - seq_len) / stride)), t)
            for t in range(1, len(tokens))]
    res = evaluate_tokens(method, tokens, seq_len=seq_len, stride=stride, batch_size=3)
    assert res["tokens"] == len(tokens) - 1
    assert res["loss"] == pytest.approx(sum(nats) / len(nats), abs=1e-5)


def test_bits_per_byte_uses_scored_token_bytes():
    method = tiny_method()
    tokens = random_tokens(50)
    byte_lengths = np.random.default_rng(2).integers(1, 5, VOCAB)
    res = evaluate_tokens(method, tokens, seq_len=16, stride=8, byte_lengths=byte_lengths)
    assert res["bytes"] == int(byte_lengths[tokens[1:]].sum())
    total_nats = res["loss"] * res["tokens"]
    assert res["bpb"] == pytest.approx(total_nats / (math.log(2) * res["bytes"]), rel=1e-9)
    with pytest.raises(LatentLMError, match="byte_lengths"):
        evaluate_tokens(method, tokens, seq_len=16, byte_lengths=byte_lengths[:100])


def test_batching_tail_window_sources_and_max_tokens_agree():
    method = tiny_method()
    tokens = random_tokens(70)  # seq_len 16: 4 full windows, tail of 5 targets
    ref = evaluate_tokens(method, tokens, seq_len=16, batch_size=1)
    for batch_size in (3, 8):
        assert evaluate_tokens(method, tokens, seq_len=16, batch_size=batch_size)["loss"] == \
            pytest.approx(ref["loss"], abs=1e-6)

    class Split:  # the data loader's TokenSplit interface
        def __len__(self):
            return len(tokens)

        def get(self, start, length):
            return tokens[start:start + length].copy()

    assert evaluate_tokens(method, Split(), seq_len=16)["loss"] == pytest.approx(ref["loss"], abs=1e-6)
    capped = evaluate_tokens(method, tokens, seq_len=16, stride=4, max_tokens=30)
    assert capped["tokens"] == 30
    assert capped["loss"] == pytest.approx(
        evaluate_tokens(method, tokens[:31], seq_len=16, stride=4)["loss"], abs=1e-6)
    tail_only = evaluate_tokens(method, tokens[:4], seq_len=16)  # one short window
    assert tail_only["tokens"] == 3


def test_bad_arguments_raise():
    method = tiny_method("gpt2")
    tokens = random_tokens(40)
    for kw in (dict(seq_len=8, stride=9), dict(seq_len=8, stride=0), dict(seq_len=65), dict(seq_len=0)):
        with pytest.raises(LatentLMError):
            evaluate_tokens(method, tokens, **kw)
    with pytest.raises(LatentLMError, match="at least 2 tokens"):
        evaluate_tokens(method, tokens[:1], seq_len=8)


def test_trained_model_has_lower_perplexity():
    tokens = np.tile(np.array([5, 81, 17, 240, 33, 9, 150]), 20)
    untrained, trained = tiny_method(seed=0), tiny_method(seed=0)
    opt = torch.optim.AdamW(trained.parameters(), lr=3e-3)
    batch = torch.from_numpy(np.stack([tokens[i:i + 33] for i in range(0, 64, 8)]).astype(np.int64))
    for _ in range(30):
        loss, _ = trained(batch[:, :-1], batch[:, 1:])
        opt.zero_grad()
        loss.backward()
        opt.step()
    before = evaluate_tokens(untrained, tokens, seq_len=32)
    after = evaluate_tokens(trained, tokens, seq_len=32)
    assert before["ppl"] > 100  # about uniform over 300 tokens
    assert after["ppl"] < 3 and after["loss"] < before["loss"] / 4


def test_evaluate_text_bits_per_byte_with_byte_tokenizer():
    class ByteTokenizer:
        eot_id = 256

        def encode(self, text):
            return list(text.encode())

        def token_byte_lengths(self):
            return np.array([1] * 256 + [0] + [1] * (VOCAB - 257))

    method, text = tiny_method(), "héllo, wörld! " * 5
    res = evaluate_text(method, ByteTokenizer(), text, seq_len=16, stride=8)
    assert res["tokens"] == len(text.encode()) == res["bytes"]  # every byte scored, after an EOT
    assert res["bpb"] == pytest.approx(res["loss"] / math.log(2), rel=1e-9)
    ids = np.array([256] + list(text.encode()))
    assert res["loss"] == pytest.approx(evaluate_tokens(method, ids, seq_len=16, stride=8)["loss"])


def test_restores_training_mode():
    method = tiny_method()
    method.train()
    evaluate_tokens(method, random_tokens(20), seq_len=8)
    assert method.training
