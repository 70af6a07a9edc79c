"""The chunked head losses (model/losses.py) and the concept cross-entropy give the values and
gradients of the plain computations, written here in plain torch (full logits, F.cross_entropy,
F.kl_div), for every chunk size, both presets, float32 and bf16 autocast, and every method that
trains on the LM head."""

import pytest
import torch
import torch.nn.functional as F

from latentlm.config import make_config
from latentlm.methods import build_method
from latentlm.methods.concept_head import ConceptHead
from latentlm.model import losses
from latentlm.model.transformer import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")

V, T, B, D = 300, 16, 2, 32  # V pads to 320 head rows: the padded ones must get no gradient


def core(arch: str) -> Transformer:
    cfg = make_config(base={"model": {"arch": arch, "n_layer": 1, "n_embd": D, "n_head": 2, "vocab_size": V,
                                      "block_size": T}})
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    with torch.no_grad():  # non-trivial norm gains, so their gradient is checked too
        model.norm_f.weight.uniform_(0.5, 1.5)
    return model


def grads(model, h, loss):
    model.zero_grad()
    h.grad = None
    loss.backward()
    g = {"h": h.grad.clone(), "head": model.lm_head.weight.grad.clone(), "norm": model.norm_f.weight.grad.clone()}
    model.zero_grad()
    h.grad = None
    return g


def reference_ce(model, h, y):
    logits = model.norm_f(h) @ model.lm_head.weight[:V].t()
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())


def reference_kd(model, h, y, teacher, weight, tau):
    logits = (model.norm_f(h) @ model.lm_head.weight[:V].t()).float()
    ce = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    p_t = F.softmax(teacher.float() / tau, -1)
    kl = (p_t * (p_t.log() - F.log_softmax(logits / tau, -1))).sum(-1).mean() * tau ** 2
    return ce + weight * kl, ce, kl


def close(a, b, tol=1e-5):
    torch.testing.assert_close(a, b, atol=tol, rtol=tol)


def inputs(seed=1):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, D, generator=g).requires_grad_()
    y = torch.randint(0, V, (B, T), generator=g)
    teacher = 3 * torch.randn(B, T, V, generator=g)
    return h, y, teacher


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("chunk", [1, 5, None])
def test_head_cross_entropy_equals_full_logits(arch, chunk):
    model, (h, y, _) = core(arch), inputs()
    ref = reference_ce(model, h, y)
    want = grads(model, h, 3.0 * ref)  # a scaled loss: backward multiplies the gradients formed in forward
    got_loss = losses.head_cross_entropy(model, h, y, chunk=chunk)
    got = grads(model, h, 3.0 * got_loss)
    close(got_loss, ref)
    for k in want:
        close(got[k], want[k], 1e-6)
    assert got["head"][V:].abs().max() == 0  # padded rows are never multiplied


@pytest.mark.parametrize("weight,tau", [(0.1, 1.0), (0.5, 2.0), (0.0, 1.0)])
@pytest.mark.parametrize("chunk", [3, None])
def test_head_distill_equals_two_term_loss(weight, tau, chunk):
    model, (h, y, teacher) = core("llama"), inputs()
    ref, ref_ce, ref_kl = reference_kd(model, h, y, teacher, weight, tau)
    want = grads(model, h, ref)
    total, ce, kl = losses.head_distill(model, h, y, teacher, weight, tau, chunk=chunk)
    got = grads(model, h, total)
    close(total, ref)
    close(ce, ref_ce.detach())
    close(kl, ref_kl.detach())
    for k in want:
        close(got[k], want[k], 1e-6)


def test_no_grad_and_frozen_head():
    model, (h, y, teacher) = core("gpt2"), inputs()
    with torch.no_grad():
        close(losses.head_cross_entropy(model, h, y, chunk=7), reference_ce(model, h, y))
        close(losses.head_distill(model, h, y, teacher, 0.1, chunk=7)[0], reference_kd(model, h, y, teacher, 0.1, 1)[0])
    model.requires_grad_(False)  # e.g. a frozen teacher: only the input gets a gradient
    want = torch.autograd.grad(reference_ce(model, h, y), h)[0]
    close(torch.autograd.grad(losses.head_cross_entropy(model, h, y, chunk=4), h)[0], want, 1e-6)


def test_bf16_autocast_matches_plain_autocast():
    model, (h, y, teacher) = core("llama"), inputs()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ref = reference_ce(model, h, y)
        got_loss = losses.head_cross_entropy(model, h, y, chunk=6)
    want, got = grads(model, h, ref), grads(model, h, got_loss)
    close(got_loss, ref, 2e-3)
    for k in want:  # both multiply in bf16; only the order of roundings differs
        assert got[k].dtype == want[k].dtype
        close(got[k], want[k], 2e-3)


def test_shape_errors_are_one_line():
    from latentlm.errors import LatentLMError

    model, (h, y, teacher) = core("gpt2"), inputs()
    with pytest.raises(LatentLMError, match="targets"):
        losses.head_cross_entropy(model, h, y[:, :-1])
    with pytest.raises(LatentLMError, match="shared vocabulary"):
        losses.head_distill(model, h, y, teacher[..., :-1], 0.1)


# --- every method that trains on the head: fused == plain --------------------------------------------

METHODS = ["ntp", "ponder", "pause", "loop", "ponderlm", "cocomix", "pause_insert", "kd", "kd_pause"]


def build(name: str, arch: str):
    cfg = make_config(base={"train": {"method": name},
                            "model": {"arch": arch, "n_layer": 2, "n_embd": 32, "n_head": 2, "vocab_size": V,
                                      "block_size": T},
                            "kd": {"temperature": 2.0} if name == "kd_pause" else {},
                            "cocomix": {"insert_layer": 1, "n_concepts": 64, "k_concepts": 4, "concept_chunk": 5},
                            "pause_insert": {"insert_layer": 1}})
    torch.manual_seed(0)
    return build_method(cfg).train()


def batch(name: str):
    g = torch.Generator().manual_seed(2)
    x, y = (torch.randint(0, V, (B, T), generator=g) for _ in range(2))
    kw = {}
    if name == "cocomix":
        labels = torch.randint(0, 64, (B, T, 4), generator=g)
        labels[0, :3, 2:] = -1  # masked labels
        kw["labels"] = labels
    if name.startswith("kd"):
        kw["teacher_logits"] = torch.randn(B, T, V, generator=g)
    if name == "ponder":
        kw["iters"] = 2
    return x, y, kw


def loss_and_grads(method, x, y, kw):
    method.zero_grad()
    loss, metrics = method(x, y, **kw)
    loss.backward()
    g = {n: p.grad.clone() for n, p in method.named_parameters() if p.grad is not None}
    method.zero_grad()
    return loss.detach(), {k: v for k, v in metrics.items() if torch.is_tensor(v)}, g


@pytest.mark.parametrize("name", METHODS)
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_every_method_fused_loss_equals_plain(name, arch, monkeypatch):
    monkeypatch.setattr(losses, "CPU_CHUNK_ELEMENTS", 7 * V)  # several chunks, the last one partial
    method = build(name, arch)
    x, y, kw = batch(name)
    loss, metrics, g = loss_and_grads(method, x, y, kw)
    with losses.fused_head(False):
        ref_loss, ref_metrics, ref_g = loss_and_grads(method, x, y, kw)
    close(loss, ref_loss)
    assert metrics.keys() == ref_metrics.keys()
    for k in metrics:
        close(metrics[k].float(), ref_metrics[k].float())
    assert g.keys() == ref_g.keys()
    for k in g:
        close(g[k], ref_g[k], 1e-5)


def test_ntp_loss_is_the_mean_nll_of_its_logits():
    from latentlm.methods.base import token_nll

    method = build("ntp", "gpt2")
    x, y, _ = batch("ntp")
    loss, _ = method(x, y)
    close(loss, token_nll(method.eval_logits(x), y).mean())


# --- the concept cross-entropy -----------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_concept_loss_equals_per_label_cross_entropy(dtype):
    torch.manual_seed(0)
    head = ConceptHead(16, 50, 4, 0.02)
    z = (3 * torch.randn(3, 7, 50)).to(dtype).requires_grad_()
    labels = torch.randint(0, 50, (3, 7, 4))
    labels[0, :2, 1:] = -1  # masked
    labels[1, 3] = -1  # a row with nothing to score
    labels[2, 1, 2] = labels[2, 1, 0]  # a repeated label counts twice
    loss, _ = head.loss(z, labels, chunk=5)
    (2 * loss).backward()
    got = z.grad.clone()
    z.grad = None
    flat, lab = z.float().flatten(0, 1), labels.flatten(0, 1)
    keep = lab >= 0
    ce = torch.stack([F.cross_entropy(flat, lab[:, k].clamp(min=0), reduction="none") for k in range(4)], 1)
    ref = (ce * keep).sum() / keep.sum()
    (2 * ref).backward()
    close(loss, ref, 1e-5)
    assert got.dtype == dtype
    close(got.float(), z.grad.float(), 1e-6 if dtype == torch.float32 else 1e-2)
    with torch.no_grad():
        close(head.loss(z, labels, chunk=4)[0], ref.detach(), 1e-5)


# --- train.fused_loss: saved configs without it keep the old computation, bit for bit ----------------------


def test_saved_config_without_the_key_gets_the_old_computation():
    from latentlm.config import config_from_dict

    cfg = make_config(base={"model": {"vocab_size": V}})
    assert cfg.train.fused_loss is True
    saved = cfg.to_dict()
    del saved["train"]["fused_loss"]
    assert config_from_dict(saved).train.fused_loss is False
    saved["train"]["fused_loss"] = True
    assert config_from_dict(saved).train.fused_loss is True


@pytest.mark.parametrize("name", ["ntp", "pause", "ponder", "cocomix", "kd"])
def test_unfused_runs_are_the_old_ops_exactly(name):
    """fused_loss false: the loss and every gradient equal, to the bit, the formulas training used before
    (CE of the method's logits; KD through distill on them; CoCoMix's checkpointed concept CE)."""
    from latentlm.methods.base import token_nll, token_positions

    method = build(name, "llama")
    method.cfg.train.fused_loss = False
    x, y, kw = batch(name)
    loss, _, g = loss_and_grads(method, x, y, kw)

    def old(x, y, **kw):
        if name == "ponder":
            return token_nll(method.jacobi_logits(x, kw["iters"])[0], y).mean()
        if name == "kd":
            return method.distill(method.model(x), y, kw["teacher_logits"])[0]
        if name == "cocomix":
            logits, z = method.run(x, token_positions(x), need_concepts=True)
            concept, _ = method.concept_head.loss(z, kw["labels"], method.cfg.cocomix.concept_chunk, fused=False)
            return token_nll(logits, y).mean() + method.cfg.cocomix.concept_weight * concept
        return token_nll(method.eval_logits(x), y).mean()

    method.zero_grad()
    ref = old(x, y, **kw)
    ref.backward()
    assert torch.equal(loss, ref.detach())
    for n, p in method.named_parameters():
        if p.grad is not None:
            assert torch.equal(g[n], p.grad), n
