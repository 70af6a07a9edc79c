"""Checks that need a CUDA device (``pytest -m cuda``; skipped without one). ``benchmarks/gpu_check.sh``
runs them first. Each compares the GPU fast path (bf16 autocast, flash attention, torch.compile,
CUDA graphs) with the plain computation of the same thing."""

import pytest
import torch

from latentlm.config import make_config
from latentlm.methods import build_method

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

V, T, B = 1000, 64, 4
METHODS = ["ntp", "ponder", "pause", "loop", "ponderlm", "cocomix", "pause_insert", "kd", "kd_pause"]


def build(name: str, arch: str = "llama", **model):
    cfg = make_config(base={"train": {"method": name, "device": "cuda"},
                            "model": {"arch": arch, "n_layer": 2, "n_embd": 128, "n_head": 2, "vocab_size": V,
                                      "block_size": 128, **model},
                            "cocomix": {"insert_layer": 1, "n_concepts": 512, "k_concepts": 8, "concept_chunk": 64},
                            "pause_insert": {"insert_layer": 1}})
    torch.manual_seed(0)
    return build_method(cfg).cuda().train()


def batch(name: str):
    g = torch.Generator().manual_seed(1)
    x, y = (torch.randint(0, V, (B, T), generator=g).cuda() for _ in range(2))
    kw = {}
    if name == "cocomix":
        kw["labels"] = torch.randint(0, 512, (B, T, 4), generator=g).cuda()
    if name.startswith("kd"):
        kw["teacher_logits"] = torch.randn(B, T, V, generator=g).cuda()
    if name == "ponder":
        kw["iters"] = 2
    return x, y, kw


def grads(method, x, y, kw):
    method.zero_grad()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _ = method(x, y, **kw)
    loss.backward()
    g = {n: p.grad.float().clone() for n, p in method.named_parameters() if p.grad is not None}
    method.zero_grad()
    return loss.detach().float(), g


@pytest.mark.parametrize("name", METHODS)
def test_bf16_fused_head_loss_matches_plain(name):
    from latentlm.model import losses

    method = build(name)
    x, y, kw = batch(name)
    loss, g = grads(method, x, y, kw)
    with losses.fused_head(False):
        ref_loss, ref_g = grads(method, x, y, kw)
    torch.testing.assert_close(loss, ref_loss, atol=2e-2, rtol=2e-2)
    for k in g:  # bf16 matmuls on both sides; only rounding order differs
        torch.testing.assert_close(g[k], ref_g[k], atol=5e-3, rtol=5e-2)


@pytest.mark.parametrize("name", METHODS)
def test_training_attention_runs_on_flash(name):
    from latentlm.perf import record_attention_calls

    method = build(name)
    x, y, kw = batch(name)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, calls = record_attention_calls(lambda: method(x, y, **kw))
    assert calls and all(c.flash_ok for c in calls), calls


@pytest.mark.parametrize("name", ["ntp", "ponder"])  # compiling takes most of the check's test budget
def test_compiled_bf16_step_matches_eager(name):
    method = build(name)
    x, y, kw = batch(name)
    eager, _ = grads(method, x, y, kw)
    compiled = torch.compile(method, fullgraph=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss, _ = compiled(x, y, **kw)
    loss.backward()
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss.detach().float(), eager, atol=5e-2, rtol=5e-2)


@pytest.mark.parametrize("name", ["ntp", "pause"])  # pause: decode steps of 2 slots
def test_compiled_static_decode_gives_eager_tokens(name):
    """The compiled decode step (CUDA graphs) over the static cache generates the eager tokens, from a
    left-padded batch, with grouped-query attention."""
    from latentlm.generate import generate

    method = build(name, n_head=4, n_kv_head=2).eval()
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8], [9, 10, 11]]
    eager = generate(method, prompts, max_new_tokens=12, temperature=0.0)
    assert generate(method, prompts, max_new_tokens=12, temperature=0.0, compile=True) == eager
    assert generate(method, prompts, max_new_tokens=12, temperature=0.0, compile=True) == eager  # graph reused


def test_shared_context_scoring_matches_whole_sequences():
    from latentlm.eval.zeroshot import score_tokens

    method = build("ntp").eval()
    g = torch.Generator().manual_seed(0)
    seqs, n = [], []
    for item in range(12):
        ctx = torch.randint(0, V, (int(torch.randint(2, 40, (1,), generator=g)),), generator=g).tolist()
        for _ in range(4):
            k = int(torch.randint(1, 20, (1,), generator=g))
            seqs.append(ctx + torch.randint(0, V, (k,), generator=g).tolist())
            n.append(k)
    shared = score_tokens(method, seqs, n, batch_size=16, greedy=True)
    whole = score_tokens(method, seqs, n, batch_size=16, greedy=True, shared_context=False)
    assert max(abs(a - b) for (a, _), (b, _) in zip(shared, whole)) < 1e-3
