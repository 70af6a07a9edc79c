"""The PonderLM-2 paper's baselines (pause, loop, ponderlm): their semantics against manual
constructions, cached generation vs the parallel forward, FLOPs, learning with the trainer,
checkpoints, and the shared init."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from latentlm.config import make_config
from latentlm.loading import load_method
from latentlm.methods import build_method, methods
from latentlm.methods.base import Method
from latentlm.methods.ponder import paper_embed_scale
from latentlm.train import trainer
from latentlm.train.metrics import read_metrics
from latentlm.train.trainer import train

from conftest import assert_cached_matches_parallel, k_override

VOCAB, T = 61, 8  # a vocabulary that is not a multiple of 64, so the embedding has padded rows
BASELINES = ["pause", "loop", "ponderlm"]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(method: str, arch: str = "gpt2", k: int = 1, *extra: str, seed: int = 0) -> Method:
    """2 layers, d 32, the paper's embedding scale, a wide init (outputs far from uniform)."""
    torch.manual_seed(seed)
    cfg = make_config(overrides=["--train.method", method, "--model.arch", arch, "--model.n_layer", "2",
                                 "--model.n_embd", "32", "--model.n_head", "2", "--model.block_size", "32",
                                 "--model.vocab_size", str(VOCAB), "--model.init_std", "0.1",
                                 "--model.embed_scale", str(paper_embed_scale(32)),
                                 *k_override(method, k), *extra])
    return build_method(cfg).eval()


def tokens(batch: int = 2, length: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def positions(x: torch.Tensor) -> torch.Tensor:
    return torch.arange(x.shape[1])[None].expand(x.shape[0], -1)


def assert_nll_matches(method: Method, x: torch.Tensor, logits: torch.Tensor) -> None:
    """``forward(nll=True)`` is the cross-entropy of ``logits`` [B, T, V] against next tokens."""
    nll = method(x[:, :-1], x[:, 1:], nll=True)
    ce = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="none")
    torch.testing.assert_close(nll.flatten(), ce, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("shared", [True, False])
def test_pause_is_an_interleaved_sequence_with_shared_positions(arch, k, shared):
    """Built by hand: each token followed by K scaled pause embeddings (one token repeated K times,
    or K distinct vectors with ``pause.shared false``), position ids 0,0,..,1,1,.. ((K+1)T slots),
    logits read at each token's last pause slot."""
    method = tiny("pause", arch, k, "--pause.shared", str(shared).lower())
    m, x = method.model, tokens()
    assert method.pause.shape == (1 if shared else k, 32)
    slots, pos = [], []
    for t in range(T):
        slots += [m.embed(x[:, t])] + [method.pause[0 if shared else j].expand(2, -1) * m.cfg.embed_scale
                                       for j in range(k)]
        pos += [t] * (k + 1)
    inputs, pos = torch.stack(slots, dim=1), torch.tensor(pos)
    assert inputs.shape[1] == (k + 1) * T
    if m.wpe is not None:
        inputs = inputs + m.wpe(pos)
    with torch.no_grad():
        h = m.run_blocks(inputs, pos)
        manual = m.head(h[:, k::k + 1])
        logits = method.logits(x, positions(x))
        torch.testing.assert_close(logits, manual, atol=1e-5, rtol=0)
        assert_nll_matches(method, x, logits)
        # the pauses are used: other pause embeddings give other predictions
        method.pause.mul_(2.0)
        assert (method.logits(x, positions(x)) - logits).abs().max() > 1e-3


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
@pytest.mark.parametrize("k", [1, 2])
def test_loop_applies_the_stack_k_plus_one_times(arch, k):
    """Positions once at the input, K+1 runs of all blocks with the same position ids, one head."""
    method = tiny("loop", arch, k)
    m, x = method.model, tokens()
    pos = positions(x)
    with torch.no_grad():
        h = m.add_positions(m.embed(x), pos)
        for _ in range(k + 1):
            h = m.run_blocks(h, pos)
        logits = method.logits(x, pos)
        torch.testing.assert_close(logits, m.head(h), atol=1e-5, rtol=0)
        assert_nll_matches(method, x, logits)
        assert (logits - m(x)).abs().max() > 1e-3  # not the single pass


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("update, multiply, mix_scale", [("cumulative", False, "embed"), ("cumulative", True, "embed"),
                                                         ("from_e0", False, "sqrt_d")])
def test_ponderlm_follows_the_recursion(arch, k, update, multiply, mix_scale):
    """e(0) = embed(x) (times K with multiply_start); e(k) = e(k-1) (cumulative) or e(0) (from_e0)
    + softmax(logits of the pass on e(k-1)) @ W_E[:V] s, s = embed_scale (or sqrt(d)); logits from
    the pass on e(K) (each pass is the plain model on input embeddings)."""
    method = tiny("ponderlm", arch, k, "--ponderlm.update", update, "--ponderlm.multiply_start", str(multiply).lower(),
                  "--ponderlm.mix_scale", mix_scale)
    m, x = method.model, tokens()
    assert m.wte.weight.shape[0] > VOCAB
    s = math.sqrt(32) if mix_scale == "sqrt_d" else paper_embed_scale(32)
    with torch.no_grad():
        e0 = m.wte(x) * m.cfg.embed_scale * (k if multiply else 1)
        e = e0
        for _ in range(k):
            probs = torch.softmax(m(inputs_embeds=e).float(), dim=-1)
            assert probs.shape[-1] == VOCAB
            e = (e if update == "cumulative" else e0) + probs @ m.wte.weight[:VOCAB] * s
        manual = m(inputs_embeds=e)
        logits = method.logits(x, positions(x))
        torch.testing.assert_close(logits, manual, atol=1e-5, rtol=0)
        assert_nll_matches(method, x, logits)
        assert (logits - m(x)).abs().max() > 1e-3  # pondering changes the prediction


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
@pytest.mark.parametrize("k", [1, 2])
def test_cached_generation_matches_parallel_forward(name, arch, k):
    """Prefill of a left-padded batch of two prompts and per-token ``step`` calls give the
    parallel forward's logits at every position of each row alone; greedy generate works."""
    method = tiny(name, arch, k)
    assert method.cache_slots(5) == 5 * (k + 1 if name == "pause" else 1)
    if name != "pause":
        assert len(method.new_cache(1, 5).k) == 2 * (k + 1)  # each pass has its own layers
    prompts = [tokens(1, 3, seed=4)[0].tolist(), tokens(1, 6, seed=5)[0].tolist()]
    assert_cached_matches_parallel(method, prompts, lambda x: method.logits(x, positions(x)))


@pytest.mark.parametrize("name", BASELINES)
@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
@pytest.mark.parametrize("k", [1, 2])
def test_flops_formula_matches_counted_forward(name, arch, k):
    """The per-token forward formula equals a FLOP count of one forward (math attention kernel:
    full score matrices, the convention of flops.py); training is 3x forward."""
    method = tiny(name, arch, k)
    x = tokens()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        method(x, x, nll=True)
    assert counter.get_total_flops() == method.forward_flops_per_token(T) * x.numel()
    assert method.train_flops_per_token(T) == 3 * method.forward_flops_per_token(T)


def test_baselines_keep_the_core_init():
    """Fairness: with the same seed every baseline's core starts from NTP's exact weights."""
    reference = tiny("ntp").model.state_dict()
    for name in BASELINES:
        core = tiny(name).model.state_dict()
        assert core.keys() == reference.keys()
        assert all(torch.equal(core[key], reference[key]) for key in core), name
    assert set(BASELINES) <= set(methods())


@pytest.mark.parametrize("name", BASELINES)
def test_learns_real_text_and_checkpoint_round_trips(name, tiny_config, monkeypatch):
    """The real trainer learns bytes of Wikipedia; the saved checkpoint loads into a method
    with the trained model's exact NLL (its own parameters included, e.g. the pauses)."""
    built, build = [], trainer.build_method

    def capture(cfg):
        built.append(build(cfg))
        return built[-1]

    monkeypatch.setattr(trainer, "build_method", capture)
    cfg = tiny_config(method=name, max_steps=60)
    cfg.data.seq_len = 32
    result = train(cfg)
    first = next(r["loss"] for r in read_metrics(f"{cfg.train.out_dir}/metrics.jsonl") if "loss" in r)
    assert abs(first - math.log(257)) < 0.5  # starts near uniform
    assert result["val_loss"] < 3.25  # log(257) = 5.55
    loaded, _, _ = load_method(cfg.train.out_dir)
    trained = built[0].eval()
    x = tokens(2, 16, seed=6)
    with torch.no_grad():
        assert torch.equal(loaded(x[:, :-1], x[:, 1:], nll=True), trained(x[:, :-1], x[:, 1:], nll=True))
