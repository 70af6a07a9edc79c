"""Decoding fast paths that must change nothing but speed: the static-shape KV cache of the compiled
decode step (checked without compile, and compiled with a CPU backend: one graph for every step),
grouped-query decode steps that read the cache without repeating it, and cache row selection."""

import pytest
import torch

from conftest import assert_cached_matches_parallel
from latentlm.config import make_config
from latentlm.generate import generate
from latentlm.methods import build_method
from latentlm.methods.base import token_positions

pytestmark = pytest.mark.usefixtures("one_thread")

V = 300
METHODS = ["ntp", "cocomix", "pause", "loop", "ponderlm", "ponder", "pause_insert", "kd"]
PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11]]  # left-padded into one batch


def build(name: str, arch: str = "llama", n_kv_head: int | None = None):
    cfg = make_config(base={"train": {"method": name},
                            "model": {"arch": arch, "n_layer": 2, "n_embd": 32, "n_head": 4, "n_kv_head": n_kv_head,
                                      "vocab_size": V, "block_size": 64},
                            "cocomix": {"insert_layer": 1, "n_concepts": 64, "k_concepts": 4},
                            "pause_insert": {"insert_layer": 1}})
    torch.manual_seed(0)
    return build_method(cfg).eval()


def step_logits(method, static: bool, steps: int = 5):
    """Logits of a prefill of PROMPTS and ``steps`` greedy decode steps, through a dynamic or static cache."""
    width = max(len(p) for p in PROMPTS)
    lengths = torch.tensor([len(p) for p in PROMPTS])
    idx = torch.tensor([[0] * (width - len(p)) + p for p in PROMPTS])
    slot = torch.arange(width)[None] - (width - lengths)[:, None]
    cache = method.new_cache(len(PROMPTS), width + steps)
    cache.padded = True
    if static:
        cache.make_static()
    out = []
    with torch.no_grad():
        logits = method.step(idx, slot.clamp(min=0), slot >= 0, cache)
        out.append(logits)
        for i in range(steps):
            tok = logits[:, -1].argmax(-1, keepdim=True)
            logits = method.step(tok, (lengths + i)[:, None], torch.ones(len(PROMPTS), 1, dtype=torch.bool), cache)
            out.append(logits)
    return out


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_static_cache_gives_dynamic_cache_logits(name, arch):
    method = build(name, arch, n_kv_head=2 if arch == "llama" else None)
    dynamic, static = step_logits(method, False), step_logits(method, True)
    width = max(len(p) for p in PROMPTS)
    for row, p in enumerate(PROMPTS):  # prefill: the real (non-padding) positions
        torch.testing.assert_close(static[0][row, width - len(p):], dynamic[0][row, width - len(p):],
                                   atol=1e-5, rtol=0)
    for a, b in zip(static[1:], dynamic[1:]):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["ntp", "pause", "cocomix"])
def test_compiled_decode_is_one_graph_with_eager_tokens(name):
    """The decode step over the static cache compiles once (fullgraph, no recompilation as the cache
    fills) and generates the eager tokens; a second generate call reuses the graph."""
    from torch._dynamo.utils import counters

    method = build(name, n_kv_head=2)
    eager = generate(method, PROMPTS, max_new_tokens=6, temperature=0.0)
    torch._dynamo.reset()
    counters.clear()
    options = {"backend": "aot_eager", "fullgraph": True}
    assert generate(method, PROMPTS, max_new_tokens=6, temperature=0.0, compile=options) == eager
    assert generate(method, PROMPTS, max_new_tokens=6, temperature=0.0, compile=options) == eager
    assert counters["stats"]["unique_graphs"] == 1
    torch._dynamo.reset()


def test_grouped_query_decode_matches_parallel_forward():
    """n_kv_head < n_head: one-slot decode steps read the cache per key/value head (no repeat);
    cached generation from a padded batch still equals the parallel forward."""
    method = build("ntp", n_kv_head=1)
    assert_cached_matches_parallel(method, PROMPTS, lambda x: method.eval_logits(x))
    method = build("pause", n_kv_head=2)  # decode steps of 2 slots take the repeat path
    assert_cached_matches_parallel(method, PROMPTS, lambda x: method.logits(x, token_positions(x)))


def test_select_rows_copies_each_layer():
    method = build("cocomix")  # later layers hold 2 slots per token
    x = torch.randint(0, V, (2, 5))
    cache = method.new_cache(2, 8)
    with torch.no_grad():
        method.step(x, token_positions(x), torch.ones(2, 5, dtype=torch.bool), cache)
    rows = torch.tensor([1, 1, 0])
    copy = cache.select_rows(rows, 20)
    assert copy.lengths == cache.lengths and copy.capacity == 20 and copy.k[0].shape[0] == 3
    for layer, n in enumerate(cache.lengths):
        torch.testing.assert_close(copy.k[layer][:, :, :n], cache.k[layer][rows, :, :n], atol=0, rtol=0)
        torch.testing.assert_close(copy.v[layer][:, :, :n], cache.v[layer][rows, :, :n], atol=0, rtol=0)
        assert torch.equal(copy.valid[layer][:, :n], cache.valid[layer][rows, :n])
        assert not copy.valid[layer][:, n:].any()


def test_make_static_needs_an_empty_cache():
    method = build("ntp")
    cache = method.new_cache(1, 4)
    with torch.no_grad():
        method.step(torch.tensor([[1]]), torch.tensor([[0]]), torch.ones(1, 1, dtype=torch.bool), cache)
    with pytest.raises(RuntimeError, match="empty cache"):
        cache.make_static()
