"""CoCoMix student and its pause baseline: the equations of docs/METHODS.md §2.2-2.3 against a manual computation,
positions, the chunked concept loss, cached generation, steering, the variants, learning with the
trainer, FLOPs, C and k from the SAE, and the shared core init."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from latentlm.concepts.sae import TopKSAE, save_sae
from latentlm.config import make_config
from latentlm.errors import LatentLMError
from latentlm.generate import generate
from latentlm.loading import load_method
from latentlm.methods import build_method, methods
from latentlm.methods import cocomix as cocomix_module
from latentlm.methods.base import Method
from latentlm.methods.cocomix import Cocomix, PauseInsert
from latentlm.train.metrics import read_metrics
from latentlm.train.trainer import train

from conftest import assert_cached_matches_parallel

VOCAB, T, C, K, LAYER = 61, 8, 64, 4, 1


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(method: str = "cocomix", arch: str = "gpt2", *extra: str, seed: int = 0) -> Method:
    """3 layers (concepts enter block 1), d 32, C 64, k 4, a wide init (outputs far from uniform)."""
    torch.manual_seed(seed)
    cfg = make_config(overrides=["--train.method", method, "--model.arch", arch, "--model.n_layer", "3",
                                 "--model.n_embd", "32", "--model.n_head", "2", "--model.block_size", "32",
                                 "--model.vocab_size", str(VOCAB), "--model.init_std", "0.1",
                                 "--cocomix.insert_layer", str(LAYER), "--pause_insert.insert_layer", str(LAYER),
                                 "--cocomix.n_concepts", str(C),
                                 "--cocomix.k_concepts", str(K), *extra])
    method = build_method(cfg).eval()
    with torch.no_grad():  # non-zero method biases (b_pred, b_comp, b), so every term is exercised
        for name, p in method.named_parameters():
            if isinstance(method, Cocomix) and not name.startswith("model.") and p.dim() == 1:
                p.normal_(0.0, 0.3)
    return method


def tokens(batch: int = 2, length: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def labels_for(x: torch.Tensor, k_attr: int = 4, seed: int = 2) -> torch.Tensor:
    """Random labels [B, T, k_attr] with about a quarter masked (-1)."""
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, C, (*x.shape, k_attr), generator=g)
    return lab.masked_fill(torch.rand(lab.shape, generator=g) < 0.25, -1)


def positions(x: torch.Tensor) -> torch.Tensor:
    return torch.arange(x.shape[1])[None].expand(x.shape[0], -1)


def parallel_logits(method: Method, x: torch.Tensor) -> torch.Tensor:
    return method.logits(x, positions(x)) if isinstance(method, PauseInsert) else method.run(x, positions(x))[0]


def lower(method: Method, x: torch.Tensor) -> torch.Tensor:
    """The residual stream entering the insert layer, built by hand."""
    m = method.model
    h = m.embed(x)
    if m.wpe is not None:
        h = h + m.wpe(positions(x))
    return m.run_blocks(h, torch.arange(x.shape[1]), 0, LAYER)


def manual_concepts(method: Cocomix, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """docs/METHODS.md §2.2 step by step with a dense W_comp: ``(z, c_hat)``."""
    mu = h.mean(-1, keepdim=True)
    s = ((h - mu).pow(2).sum(-1, keepdim=True) / (h.shape[-1] - 1)).sqrt()
    x_hat = (h - mu) / (s + 1e-5)
    head = method.concept_head
    z = (x_hat - head.b) @ head.predict.weight.t() + head.predict.bias
    vals, idx = z.topk(K, dim=-1)
    z_k = torch.zeros_like(z).scatter(-1, idx, vals)
    w_comp = head.compress_weight.t()  # d x C
    return z, (z_k @ w_comp.t() + head.compress_bias + head.b) * s + mu


def interleave(h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    return torch.stack([h, c], dim=2).flatten(1, 2)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_forward_follows_the_spec_equations(arch):
    """z, TopK (raw values), gather compress = dense W_comp z_k, interleave h_1 c_1 h_2 c_2 ..,
    shared position ids, logits from the concept slots; the loss is NTP + 0.1 x masked concept CE."""
    method = tiny("cocomix", arch)
    m, x = method.model, tokens()
    lab = labels_for(x)
    with torch.no_grad():
        h = lower(method, x)
        z, c_hat = manual_concepts(method, h)
        out = m.run_blocks(interleave(h, c_hat), torch.arange(T).repeat_interleave(2), LAYER)
        manual = m.head(out[:, 1::2])
        logits, z_run = method.run(x, positions(x))
        torch.testing.assert_close(z_run, z, atol=1e-5, rtol=0)
        torch.testing.assert_close(logits, manual, atol=1e-5, rtol=0)
        # raw TopK values, negative ones included (no ReLU): the gather equals the dense product
        mu, s = h.mean(-1, keepdim=True), h.std(-1, keepdim=True)
        shifted = z - 5.0
        vals, idx = shifted.topk(K, dim=-1)
        assert (vals < 0).all()
        head = method.concept_head
        dense = torch.zeros_like(z).scatter(-1, idx, vals) @ head.compress_weight
        torch.testing.assert_close(head.compress(shifted, mu, s),
                                   (dense + head.compress_bias + head.b) * s + mu, atol=1e-5, rtol=0)

        loss, metrics = method(x[:, :-1], x[:, 1:], labels=lab[:, :-1])
        ntp = F.cross_entropy(manual[:, :-1].flatten(0, 1), x[:, 1:].flatten())
        logp = z[:, :-1].log_softmax(-1)
        keep = lab[:, :-1] >= 0
        ce = -logp.gather(-1, lab[:, :-1].clamp(min=0))[keep].mean()
        torch.testing.assert_close(metrics["ntp_loss"], ntp, atol=1e-5, rtol=0)
        torch.testing.assert_close(metrics["concept_loss"], ce, atol=1e-5, rtol=0)
        torch.testing.assert_close(loss, ntp + 0.1 * ce, atol=1e-5, rtol=0)
        top = z[:, :-1].topk(4, dim=-1).indices
        hits = (top[..., None, :] == lab[:, :-1, :, None]).any(-1)[keep]
        assert metrics["concept_acc"] == hits.float().mean()
        nll = method(x[:, :-1], x[:, 1:], nll=True)
        ce_tok = F.cross_entropy(manual[:, :-1].flatten(0, 1), x[:, 1:].flatten(), reduction="none")
        torch.testing.assert_close(nll.flatten(), ce_tok, atol=1e-5, rtol=0)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_positions_enter_at_the_input_and_concepts_share_them(arch):
    """Positions are added once, to the T token slots; the concept slots are exactly c_hat (no
    position embedding); the blocks after the insert layer see position ids 0,0,1,1,..."""
    method = tiny("cocomix", arch)
    m, x = method.model, tokens()
    added, runs = [], []
    add, run = m.add_positions, m.run_blocks
    m.add_positions = lambda h, pos: added.append(h.shape) or add(h, pos)

    def recording(h, pos, start=0, end=None, **kw):
        runs.append((h, pos, start))
        return run(h, pos, start, end, **kw)

    m.run_blocks = recording
    with torch.no_grad():
        method.run(x, positions(x))
        assert added == [(2, T, 32)]
        (_, pos_low, _), (seq, pos_high, start) = runs[0], runs[-1]
        assert start == LAYER and seq.shape == (2, 2 * T, 32)
        assert torch.equal(pos_low, positions(x))
        assert torch.equal(pos_high, torch.arange(T).repeat_interleave(2)[None].expand(2, -1))
        h = seq[:, 0::2]
        torch.testing.assert_close(seq[:, 1::2], manual_concepts(method, h)[1], atol=1e-5, rtol=0)


def test_concept_loss_chunks_and_masks():
    """Chunked CE (3 tokens a chunk) equals one chunk in value and gradient; masked labels (-1)
    do not count, whatever else they would have said."""
    head = tiny("cocomix", "gpt2").concept_head
    z = torch.randn(2, T, C, requires_grad=True)
    lab = labels_for(tokens(), k_attr=3)
    results = []
    for chunk in (3, 10_000):
        loss, acc = head.loss(z, lab, chunk)
        (grad,) = torch.autograd.grad(loss, z)
        results.append((loss, acc, grad))
    (l0, a0, g0), (l1, a1, g1) = results
    torch.testing.assert_close(l0, l1, atol=1e-6, rtol=0)
    torch.testing.assert_close(g0, g1, atol=1e-7, rtol=0)
    assert a0 == a1
    keep = lab >= 0
    manual = -z.log_softmax(-1).gather(-1, lab.clamp(min=0))[keep].mean()
    torch.testing.assert_close(l0, manual, atol=1e-6, rtol=0)
    # a token whose labels are all masked does not count, whatever its logits; nor does a masked batch
    lab[0, 0] = -1
    before = head.loss(z, lab, 3)[0]
    moved = z.detach().clone()
    moved[0, 0] += 10 * torch.randn(C)
    assert torch.equal(head.loss(moved, lab, 3)[0], before.detach())
    zero, acc = head.loss(z, torch.full_like(lab, -1), 3)
    assert zero == 0 and acc == 0


VARIANTS = [("cocomix", ()), ("cocomix", ("--cocomix.mix", "add")), ("cocomix", ("--cocomix.mix", "none")),
            ("pause_insert", ())]


@pytest.mark.parametrize("name,extra", VARIANTS)
@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_cached_generation_matches_parallel_forward(name, extra, arch):
    """Prefill of a left-padded batch of two prompts of different lengths, then per-token steps,
    give each row's parallel logits; interleaving caches T slots before the insert layer, 2T after."""
    method = tiny(name, arch, *extra)
    doubled = name == "pause_insert" or not extra
    assert method.cache_slots(5) == (10 if doubled else 5)
    prompts = [tokens(1, 3, seed=4)[0].tolist(), tokens(1, 6, seed=5)[0].tolist()]
    assert_cached_matches_parallel(method, prompts, lambda x: parallel_logits(method, x))

    cache = method.new_cache(1, 6)  # the check restored the real step
    with torch.no_grad():
        method.step(tokens(1, 4), positions(tokens(1, 4)), torch.ones(1, 4, dtype=torch.bool), cache)
        for t in (4, 5):
            method.step(tokens(1, 1, seed=t), torch.tensor([[t]]), torch.ones(1, 1, dtype=torch.bool), cache)
    upper = 12 if doubled else 6
    assert cache.lengths == [6] * LAYER + [upper] * (3 - LAYER)


def test_steering_raises_a_concept_and_changes_the_continuation():
    """alpha scales the chosen concept's logit before the TopK at generated positions only (the
    prompt's last and each new one), puts it in the TopK there, and changes the greedy tokens;
    alpha = 1 is no steering; clearing restores the unsteered output."""
    method = tiny("cocomix", "gpt2")
    head = method.concept_head
    concept = 7
    with torch.no_grad():
        head.predict.bias[concept] = 1.0  # a positive logit, which scaling raises
    raw, steered, compress = [], [], head.compress
    concept_logits = head.logits

    def record_logits(h):
        z, mu, s = concept_logits(h)
        raw.append(z.clone())
        return z, mu, s

    def record_compress(z, mu, s):
        steered.append(z.clone())
        return compress(z, mu, s)

    head.logits, head.compress = record_logits, record_compress
    prompt = [tokens(1, 5, seed=4)[0].tolist()]
    plain = generate(method, prompt, max_new_tokens=6, temperature=0.0)
    assert all(torch.equal(r, s) for r, s in zip(raw, steered))
    raw.clear(), steered.clear()
    method.set_steering([concept], [40.0])
    pushed = generate(method, prompt, max_new_tokens=6, temperature=0.0)
    assert pushed != plain
    prefill_raw, prefill_steered = raw[0][0], steered[0][0]
    torch.testing.assert_close(prefill_steered[:-1], prefill_raw[:-1])  # the prompt is not steered
    for r, s in zip(raw, steered):  # the last prompt position and every generated one
        assert r[0, -1, concept] > 0
        torch.testing.assert_close(s[0, -1, concept], 40.0 * r[0, -1, concept])
        assert concept in s[0, -1].topk(K).indices and s[0, -1, concept] > r[0, -1, concept]
    raw.clear(), steered.clear()
    method.set_steering([concept], [40.0], on_prompt=True)
    generate(method, prompt, max_new_tokens=2, temperature=0.0)
    torch.testing.assert_close(steered[0][0, :, concept], 40.0 * raw[0][0, :, concept])
    method.set_steering([concept], [1.0])
    assert generate(method, prompt, max_new_tokens=6, temperature=0.0) == plain
    method.set_steering([], [])
    assert generate(method, prompt, max_new_tokens=6, temperature=0.0) == plain
    with pytest.raises(LatentLMError, match="not in"):
        method.set_steering([C], [2.0])


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_variants(arch):
    """add: blocks from L on run on h + c_hat (T slots); none: the plain core's logits plus a concept
    loss; insertion only: no labels, no concept metrics; pause_insert: one learned vector after each
    token at layer L, read at its slot."""
    x = tokens()
    lab = labels_for(x)
    pos = torch.arange(T)
    with torch.no_grad():
        add = tiny("cocomix", arch, "--cocomix.mix", "add")
        m = add.model
        h = lower(add, x)
        manual = m.head(m.run_blocks(h + manual_concepts(add, h)[1], pos, LAYER))
        torch.testing.assert_close(add.run(x, positions(x))[0], manual, atol=1e-5, rtol=0)

        none = tiny("cocomix", arch, "--cocomix.mix", "none")
        logits, z = none.run(x, positions(x))
        torch.testing.assert_close(logits, none.model(x), atol=1e-5, rtol=0)
        assert z.shape == (2, T, C)
        assert not hasattr(none.concept_head, "compress_weight")  # nothing is inserted, so no W_comp, b_comp
        loss, metrics = none(x, x, labels=lab)
        assert set(metrics) == {"ntp_loss", "concept_loss", "concept_acc"} and loss > metrics["ntp_loss"]
        assert none(x, x, nll=True).shape == (2, T)
        with pytest.raises(LatentLMError, match="labels"):
            none(x, x)

        only = tiny("cocomix", arch, "--cocomix.concept_loss", "false")
        assert only.batch_inputs(x, x, windows=None, step=0) == {}
        loss, metrics = only(x, x)
        assert set(metrics) == {"ntp_loss"} and loss == metrics["ntp_loss"]

    for method in (add, none, only):  # every parameter is trained (DDP needs no unused-parameter search)
        loss = method.train()(x, x, labels=lab)[0] if method is not only else method.train()(x, x)[0]
        loss.backward()
        assert all(p.grad is not None for p in method.parameters())
    with torch.no_grad():
        pause = tiny("pause_insert", arch)
        m = pause.model
        assert pause.pause.shape == (32,)
        h = lower(pause, x)
        out = m.run_blocks(interleave(h, pause.pause.expand_as(h)), pos.repeat_interleave(2), LAYER)
        torch.testing.assert_close(pause.logits(x, positions(x)), m.head(out[:, 1::2]), atol=1e-5, rtol=0)
        loss, metrics = pause(x, x)
        assert set(metrics) == {"ntp_loss"} and pause(x, x, nll=True).shape == (2, T)


@pytest.mark.parametrize("name,extra", VARIANTS + [("cocomix", ("--cocomix.concept_loss", "false"))])
@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_flops_formula_matches_counted_forward(name, extra, arch):
    """The per-token formula equals a FLOP count of one training forward (math attention kernel:
    full score matrices) plus the concept gather's 2 k d, which is an embedding_bag the counter
    does not see; training is 3x forward."""
    method = tiny(name, arch, *extra)
    x = tokens()
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        method(x, x, labels=labels_for(x)) if name == "cocomix" else method(x, x)
    gather = 0 if name == "pause_insert" or "none" in extra else 2 * K * 32
    assert counter.get_total_flops() + gather * x.numel() == method.forward_flops_per_token(T) * x.numel()
    assert method.train_flops_per_token(T) == 3 * method.forward_flops_per_token(T)


def test_core_init_and_concept_sizes_from_the_sae(tmp_path):
    """Same seed, same core as NTP; C and k default to the SAE's and are written into the config
    (so a saved run needs no SAE); an impossible insert layer or an empty variant is refused."""
    reference = tiny("ntp").model.state_dict()
    for name in ("cocomix", "pause_insert"):
        core = tiny(name).model.state_dict()
        assert core.keys() == reference.keys()
        assert all(torch.equal(core[key], reference[key]) for key in core), name
    assert {"cocomix", "pause_insert"} <= set(methods())
    sae = save_sae(TopKSAE(32, 48, 6), tmp_path / "sae")
    method = tiny("cocomix", "gpt2", "--concepts.sae", str(sae), "--cocomix.n_concepts", "0",
                  "--cocomix.k_concepts", "0")
    assert (method.cfg.cocomix.n_concepts, method.cfg.cocomix.k_concepts) == (48, 6)
    head = method.concept_head
    assert head.predict.weight.shape == (48, 32) and head.compress_weight.shape == (48, 32)
    with pytest.raises(LatentLMError, match="sae"):
        tiny("cocomix", "gpt2", "--cocomix.n_concepts", "0")
    with pytest.raises(LatentLMError, match="plain next-token"):
        tiny("cocomix", "gpt2", "--cocomix.mix", "none", "--cocomix.concept_loss", "false")
    with pytest.raises(LatentLMError, match="insert_layer"):
        tiny("cocomix", "gpt2", "--cocomix.insert_layer", "3")


class TokenLabels:
    """Learnable synthetic labels: concepts (x mod C) and (3x + 1 mod C) of each token, every
    fifth position masked. Indexes the C concepts of an SAE with TopK K (the student's sizes)."""

    n_latents, k = C, K

    def __init__(self):
        self.calls = 0

    def labels(self, x: torch.Tensor, windows) -> torch.Tensor:
        self.calls += 1
        lab = torch.stack([x % C, (3 * x + 1) % C], dim=-1)
        masked = (torch.arange(x.shape[1], device=x.device) % 5 == 0)[None, :, None]
        return lab.masked_fill(masked, -1)


def test_learns_text_and_concepts_with_the_trainer(tiny_config, monkeypatch):
    """The real trainer, its labels from the label source factory: the NTP loss falls well below
    log(257) and the concept accuracy far above chance (2 / 64); the checkpoint loads without an SAE."""
    source = TokenLabels()
    monkeypatch.setattr(cocomix_module, "label_source", lambda cfg, device: source)
    cfg = tiny_config(method="cocomix", max_steps=60)
    cfg.data.seq_len = 32
    cfg.cocomix.n_concepts, cfg.cocomix.k_concepts, cfg.concepts.k_attr, cfg.cocomix.insert_layer = C, K, 2, 1
    result = train(cfg)
    records = [r for r in read_metrics(f"{cfg.train.out_dir}/metrics.jsonl") if "ntp_loss" in r]
    assert source.calls == 60 and len(records) == 60
    assert abs(records[0]["ntp_loss"] - math.log(257)) < 0.5
    assert records[0]["concept_acc"] < 0.15
    late = records[-5:]
    assert sum(r["ntp_loss"] for r in late) / 5 < 3.4 and result["val_loss"] < 3.4
    assert sum(r["concept_acc"] for r in late) / 5 > 0.5
    loaded, _, _ = load_method(cfg.train.out_dir)  # C and k come from the saved config
    x = torch.randint(0, 257, (2, 16), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        nll = loaded(x[:, :-1], x[:, 1:], nll=True)
    assert nll.shape == (2, 15) and loaded.n_concepts == C and loaded.concept_head.k_concepts == K
