"""PonderLM-2: Jacobi training vs the exact sequential model, checkpointing, the n draw,
learning and resume with the trainer, cached generation, FLOPs, config checks."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from latentlm.config import make_config
from latentlm.errors import LatentLMError
from latentlm.generate import generate
from latentlm.methods import build_method
from latentlm.methods.ponder import Ponder, draw_train_iters, paper_embed_scale
from latentlm.train.metrics import read_metrics
from latentlm.train.trainer import train

from conftest import assert_cached_matches_parallel, recorded_generate

VOCAB, T = 64, 8


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_ponder(arch: str = "gpt2", k: int = 1, *extra: str, seed: int = 0) -> Ponder:
    """2 layers, d 32, the paper's embedding scale; a wide init keeps thoughts far from trivial."""
    torch.manual_seed(seed)
    cfg = make_config(overrides=["--train.method", "ponder", "--model.arch", arch, "--model.n_layer", "2",
                                 "--model.n_embd", "32", "--model.n_head", "2", "--model.block_size", "32",
                                 "--model.vocab_size", str(VOCAB), "--model.init_std", "0.1",
                                 "--model.embed_scale", str(paper_embed_scale(32)),
                                 "--ponder.n_thoughts", str(k), *extra])
    method = build_method(cfg)
    assert isinstance(method, Ponder)
    return method


def tokens(batch: int = 2, length: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
@pytest.mark.parametrize("k", [1, 2])
def test_jacobi_matches_sequential_within_the_exactness_bound(arch, k):
    """After the K init passes the first token's K thoughts are exact, and each Jacobi iteration
    makes the next thought (in slot order) exact, so after n iterations the first 1 + n // K
    positions are exact: n + 1 for K = 1, all T once n >= K (T - 1). The bound is tight."""
    method = tiny_ponder(arch, k).eval()
    x = tokens()
    with torch.no_grad():
        exact = method.exact_logits(x)
        for n in (1, 2, 3, 5):
            logits, residual = method.jacobi_logits(x, n)
            m = 1 + n // k
            torch.testing.assert_close(logits[:, :m], exact[:, :m], atol=1e-5, rtol=0)
            if n == 1:  # the next position is not exact yet
                assert (logits[:, m] - exact[:, m]).abs().max() > 1e-4
                assert residual > 1e-4
        logits, residual = method.jacobi_logits(x, k * (T - 1))
        torch.testing.assert_close(logits, exact, atol=1e-5, rtol=0)
        # nll=True scores with the configured evaluation mode; both agree at full exactness
        method.cfg.ponder.eval_iters = k * (T - 1)
        jacobi_nll = method(x[:, :-1], x[:, 1:], nll=True)
        method.cfg.ponder.eval_mode = "exact"
        exact_nll = method(x[:, :-1], x[:, 1:], nll=True)
    assert jacobi_nll.shape == (2, T - 1)
    torch.testing.assert_close(jacobi_nll, exact_nll, atol=1e-5, rtol=0)
    ce = torch.nn.functional.cross_entropy(exact[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="none")
    torch.testing.assert_close(exact_nll.flatten(), ce, atol=1e-5, rtol=0)


def test_checkpointing_changes_memory_not_results():
    """Same loss and gradients with per-pass activation checkpointing (dropout on, so the
    recomputation must replay the same random masks), and fewer saved activations."""
    x, y = tokens(seed=2), tokens(seed=3)
    results = {}
    for mode in ("none", "pass"):
        method = tiny_ponder("llama", 2, "--model.dropout", "0.1", "--ponder.checkpoint", mode)
        method.train()
        saved = []

        def pack(t, saved=saved):
            saved.append(t.numel() * t.element_size())
            return t

        torch.manual_seed(5)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            loss, metrics = method(x, y)
        loss.backward()
        results[mode] = loss, metrics, {n: p.grad for n, p in method.named_parameters()}, sum(saved)
    (l0, m0, g0, s0), (l1, m1, g1, s1) = results["none"], results["pass"]
    assert torch.equal(l0, l1) and m0["jacobi_iters"] == m1["jacobi_iters"]
    assert g0.keys() == g1.keys()
    for name in g0:
        torch.testing.assert_close(g0[name], g1[name], atol=1e-6, rtol=1e-5, msg=name)
    assert s1 < s0 / 3


def test_iteration_count_is_drawn_per_optimizer_step_and_resumes():
    """n is uniform over [train_iters_min, train_iters_max], a function of (train.seed, optimizer
    step) alone: shared by the grad_accum micro-batches of a step, unaffected by evaluation and
    by earlier draws, and held in no state (a resumed run draws the same n for the same step)."""
    over = ("--ponder.train_iters_min", "1", "--ponder.train_iters_max", "3", "--train.grad_accum", "2")
    method = tiny_ponder("gpt2", 1, *over).train()
    x = tokens(length=4)
    windows = np.arange(x.shape[0])

    def draws(m: Ponder, steps) -> list[float]:
        out = []
        with torch.no_grad():
            for step in steps:
                for _ in range(2):  # the grad_accum micro-batches of the step
                    inputs = m.batch_inputs(x, x, windows=windows, step=step)
                    assert inputs == {"iters": m.iters_for_step(step)}
                    out.append(m(x, x, **inputs)[1]["jacobi_iters"])
        return out

    first = draws(method, range(12))
    assert first[0::2] == first[1::2] and set(first) == {1.0, 2.0, 3.0}
    assert first[0::2] == [float(draw_train_iters(1337, step, 1, 3)) for step in range(12)]
    with torch.no_grad():
        method.eval()
        method(x[:, :-1], x[:, 1:], nll=True)
        assert method.pop_eval_metrics()["jacobi_iters"] == 3  # eval_iters
        method.train()
        assert method(x, x)[1]["jacobi_iters"] == 3.0  # no iters= given: train_iters_max, nothing drawn
    assert "calls" not in method.state_dict()
    state = {k: v.clone() for k, v in method.state_dict().items()}
    later = draws(method, range(12, 16))
    resumed = tiny_ponder("gpt2", 1, *over, seed=1).train()
    draws(resumed, range(3))  # earlier draws leave nothing behind
    resumed.load_state_dict(state)
    assert draws(resumed, range(12, 16)) == later
    other_seed = tiny_ponder("gpt2", 1, *over, "--train.seed", "7").train()
    assert draws(other_seed, range(12)) != first


def test_loss_decreases_on_real_text_and_resume_is_exact(tiny_config, tmp_path):
    """The real trainer learns bytes of Wikipedia with 1 thought; a run stopped and resumed
    (grad accumulation 2) gives the same per-step losses and n as an uninterrupted one."""
    cfg = tiny_config(method="ponder", max_steps=60, eval_every=30, eval_batches=4)
    cfg.data.seq_len = 32
    cfg.model.embed_scale = paper_embed_scale(cfg.model.n_embd)
    result = train(cfg)
    records = [r for r in read_metrics(f"{cfg.train.out_dir}/metrics.jsonl") if "loss" in r]
    first = sum(r["loss"] for r in records[:3]) / 3
    assert abs(first - math.log(257)) < 0.5  # starts near uniform
    evals = [r["val_loss"] for r in read_metrics(f"{cfg.train.out_dir}/metrics.jsonl") if "val_loss" in r]
    assert result["loss"] < 3.5 and evals[-1] < evals[0] < first - 1.5 and evals[-1] < 3.4
    assert {r["jacobi_iters"] for r in records} == {2.0, 3.0} and all(r["jacobi_residual"] > 0 for r in records)

    losses = {}
    for name, stops in (("full", [None]), ("part", [3, None])):
        run = tiny_config(method="ponder", max_steps=6, grad_accum=2, out_dir=str(tmp_path / name))
        run.data.seq_len = 16
        for i, stop in enumerate(stops):
            train(run, resume=i > 0, stop_after=stop)
        records = [r for r in read_metrics(tmp_path / name / "metrics.jsonl") if "loss" in r]
        # n of each step is the (seed, step) draw (a record's step counts the steps done after it)
        assert all(r["jacobi_iters"] == draw_train_iters(run.train.seed, r["step"] - 1, 2, 3) for r in records)
        losses[name] = [(r["loss"], r["jacobi_iters"]) for r in records]
    assert losses["full"] == losses["part"] and len(losses["full"]) == 6


def two_prompts() -> list[list[int]]:
    """Prompts of 3 and 6 tokens: generation left-pads the first."""
    return [tokens(1, 3, seed=4)[0].tolist(), tokens(1, 6, seed=5)[0].tolist()]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
@pytest.mark.parametrize("k", [1, 2])
def test_cached_generation_matches_exact_model(arch, k):
    """Generation through ``step`` (left-padded batch of two prompts) reproduces the exact
    sequential model's logits at every position of each row alone."""
    method = tiny_ponder(arch, k)
    assert method.cache_slots(5) == 5 * (k + 1)
    prompts = two_prompts()
    assert_cached_matches_parallel(method, prompts, method.exact_logits)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
@pytest.mark.parametrize("k", [1, 2])
def test_jacobi_prefill_with_enough_iterations_equals_exact_prefill(arch, k):
    """With eval_iters >= K (T - 1) the Jacobi prefill of a left-padded batch gives the exact
    prefill's logits and fills the cache with the same slots: every decode step agrees too."""
    prompts = two_prompts()
    width = max(len(p) for p in prompts)
    exact_outs, exact = recorded_generate(tiny_ponder(arch, k), prompts, max_new_tokens=3)
    method = tiny_ponder(arch, k, "--ponder.prefill", "jacobi", "--ponder.eval_iters", str(k * (width - 1)))
    outs, seen = recorded_generate(method, prompts, max_new_tokens=3)
    assert outs == exact_outs and len(seen) == len(exact) == 3
    valid = torch.tensor([[i >= width - len(p) for i in range(width)] for p in prompts])
    torch.testing.assert_close(seen[0][valid], exact[0][valid], atol=1e-4, rtol=0)  # pad rows are garbage
    for logits, reference in zip(seen[1:], exact[1:]):
        torch.testing.assert_close(logits, reference, atol=1e-4, rtol=0)


def test_jacobi_prefill_with_one_iteration_is_exact_only_within_the_bound():
    """K = 1, eval_iters 1: the first n + 1 = 2 positions of each prompt are exact, the third
    is not (the prefill is a real approximation)."""
    prompts = two_prompts()
    width = max(len(p) for p in prompts)
    _, (exact,) = recorded_generate(tiny_ponder("llama", 1), prompts, max_new_tokens=1)
    method = tiny_ponder("llama", 1, "--ponder.prefill", "jacobi", "--ponder.eval_iters", "1")
    _, (jacobi,) = recorded_generate(method, prompts, max_new_tokens=1)
    for row, prompt in enumerate(prompts):
        pad = width - len(prompt)
        torch.testing.assert_close(jacobi[row, pad:pad + 2], exact[row, pad:pad + 2], atol=1e-5, rtol=0)
        assert (jacobi[row, pad + 2] - exact[row, pad + 2]).abs().max() > 1e-4


def test_generate_end_to_end_with_jacobi_prefill():
    """Sampled generation runs with the Jacobi prefill (K = 2, gpt2): valid tokens, reproducible
    by seed, and a batched row equals the same prompt alone."""
    method = tiny_ponder("gpt2", 2, "--ponder.prefill", "jacobi", "--ponder.eval_iters", "2")
    prompts = two_prompts()
    outs = generate(method, prompts, max_new_tokens=4, temperature=1.0, seed=3)
    assert [len(o) for o in outs] == [4, 4] and all(0 <= t < VOCAB for o in outs for t in o)
    assert generate(method, prompts, max_new_tokens=4, temperature=1.0, seed=3) == outs
    assert generate(method, prompts[1:], max_new_tokens=4, temperature=0.0) == \
        generate(method, prompts, max_new_tokens=4, temperature=0.0)[1:]


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
@pytest.mark.parametrize("k", [1, 2])
def test_flops_formula_matches_counted_passes(arch, k):
    """The per-token forward formula equals a FLOP count of the real passes (math attention
    kernel: full score matrices, the convention of flops.py); training is 3x at the mean n."""
    n = 2
    method = tiny_ponder(arch, k, "--ponder.eval_iters", str(n)).eval()
    x = tokens()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        method(x, x, nll=True)
    assert counter.get_total_flops() == method.forward_flops_per_token(T, n) * x.numel()
    assert method.train_flops_per_token(T) == 3 * method.forward_flops_per_token(T, 2.5)


@pytest.mark.parametrize("override, message", [
    (["--ponder.n_thoughts", "0"], "ponder.n_thoughts=0 must be positive and finite"),
    (["--ponder.thoughts", "2"], "config key ponder.thoughts moved to ponder.n_thoughts / pause.n_pauses"),
    (["--ponder.train_iters_min", "3", "--ponder.train_iters_max", "2"], "ponder.train_iters_max=2 is below"),
    (["--ponder.eval_mode", "fast"], "ponder.eval_mode='fast' has the wrong type"),
])
def test_config_errors_name_the_key(override, message):
    with pytest.raises(LatentLMError, match=message):
        make_config(overrides=["--train.method", "ponder", *override])
