"""ponder_concepts (docs/METHODS.md §5): PonderLM-2 thoughts that also predict the teacher's concepts.

Checked: the training loss, its gradients, the exact model and its concept logits against a
plain-torch reference written from the equations (gpt2 core, 1 and 2 blocks); Jacobi iteration
converging to the sequential model; cached generation of a left-padded batch against the method's own
full forward; FLOPs against FlopCounterMode; steering moving the output towards the steered
concept's direction; capabilities, settings and errors; the GPU fast path; and the command line
end to end (teacher, random SAE, label cache, train, eval, generate --steer, inspect, flops).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from latentlm.cli import main
from latentlm.concepts.attribution import label_flops_per_token
from latentlm.concepts.sae import TopKSAE, save_sae
from latentlm.config import make_config
from latentlm.errors import LatentLMError
from latentlm.loading import load_method
from latentlm.methods import build_method, flops_report, method_class
from latentlm.methods.ponder_concepts import PonderConcepts
from latentlm.perf import flash_blockers, record_attention_calls
from latentlm.train.metrics import read_metrics

from conftest import TINY_MODEL, assert_cached_matches_parallel, random_sae_for, recorded_generate

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, T, C, KC, D = 61, 5, 24, 4, 32  # vocabulary, tokens, concepts, concept TopK, width
SCALE = math.sqrt(2.5 * D)


def build(arch: str = "gpt2", k: int = 1, *extra: str, n_layer: int = 2, insert: int = 1, mix: bool = True,
          seed: int = 0) -> PonderConcepts:
    """A tiny student (d 32, 2 heads, the paper's embedding scale, a wide init) with non-zero
    concept-head biases, so every term of the equations is exercised."""
    torch.manual_seed(seed)
    cfg = make_config(overrides=["--train.method", "ponder_concepts", "--model.arch", arch,
                                 "--model.n_layer", str(n_layer), "--model.n_embd", str(D), "--model.n_head", "2",
                                 "--model.block_size", "32", "--model.vocab_size", str(VOCAB),
                                 "--model.init_std", "0.1", "--model.embed_scale", str(SCALE),
                                 "--ponder.n_thoughts", str(k), "--ponder_concepts.insert_layer", str(insert),
                                 "--ponder_concepts.n_concepts", str(C), "--ponder_concepts.k_concepts", str(KC),
                                 "--ponder_concepts.mix", str(mix).lower(), "--ponder_concepts.concept_weight",
                                 "0.5", "--ponder_concepts.concept_chunk", "7", *extra])
    method = build_method(cfg).eval()
    with torch.no_grad():
        for name, p in method.concept_head.named_parameters():
            if p.dim() == 1:
                p.normal_(0.0, 0.3)
    return method


def tokens(batch: int = 2, length: int = T, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def labels_for(x: torch.Tensor, k_attr: int = 3, seed: int = 2) -> torch.Tensor:
    """Random labels [B, T, k_attr], about a quarter masked (-1), the last position masked as the
    teacher's labels are."""
    g = torch.Generator().manual_seed(seed)
    lab = torch.randint(0, C, (*x.shape, k_attr), generator=g)
    lab = lab.masked_fill(torch.rand(lab.shape, generator=g) < 0.25, -1)
    lab[:, -1] = -1
    return lab


# --- an independent reference: docs/METHODS.md §3 and §5 in plain torch (gpt2 core) ------------------


def ref_layer_norm(x, norm):
    mu = x.mean(-1, keepdim=True)
    var = (x - mu).pow(2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + 1e-5) * norm.weight + norm.bias


def ref_block(x, blk, n_head=2):
    """Pre-norm block: causal multi-head attention over the slots in order, then a GELU (tanh) MLP."""
    b, n, d = x.shape
    hd = d // n_head
    a = ref_layer_norm(x, blk.norm1)
    q, k, v = ((a @ lin.weight.t() + lin.bias).view(b, n, n_head, hd).transpose(1, 2)
               for lin in (blk.attn.q_proj, blk.attn.k_proj, blk.attn.v_proj))
    scores = q @ k.transpose(-1, -2) / math.sqrt(hd)
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    att = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
    x = x + att @ blk.attn.o_proj.weight.t() + blk.attn.o_proj.bias
    m = ref_layer_norm(x, blk.norm2)
    up = m @ blk.mlp.up.weight.t() + blk.mlp.up.bias
    gelu = 0.5 * up * (1 + torch.tanh(math.sqrt(2 / math.pi) * (up + 0.044715 * up ** 3)))
    return x + gelu @ blk.mlp.down.weight.t() + blk.mlp.down.bias


def ref_concepts(u, head, mix):
    """§2.2's head on the thought streams u [B, n, d]: z, and u + c_hat when mixing (dense W_comp z_k)."""
    mu = u.mean(-1, keepdim=True)
    s = ((u - mu).pow(2).sum(-1, keepdim=True) / (u.shape[-1] - 1)).sqrt()
    z = ((u - mu) / (s + 1e-5) - head.b) @ head.predict.weight.t() + head.predict.bias
    if not mix:
        return z, u
    vals, idx = z.topk(KC, dim=-1)
    z_k = torch.zeros_like(z).scatter(-1, idx, vals)
    return z, u + (z_k @ head.compress_weight + head.compress_bias + head.b) * s + mu


def ref_stack(method, slots, pos, thought):
    """Slots [B, N, d] with position ids [N] and thought flags [N]: positions added to every slot,
    blocks, the concept head at the thought slots entering block l. Hidden [B, N, d], z [B, n_thought, C]."""
    m, mix = method.model, method.cfg.ponder_concepts.mix
    x = slots + m.wpe.weight[pos]
    z = None
    for i, blk in enumerate(m.blocks):
        if i == method.insert_layer and thought.any():
            z, mixed = ref_concepts(x[:, thought], method.concept_head, mix)
            x = x.clone()
            x[:, thought] = mixed
        x = ref_block(x, blk)
    return x, z


def ref_head(method, h):
    m = method.model
    return ref_layer_norm(h, m.norm_f) @ m.wte.weight[:VOCAB].t()


def ref_jacobi(method, x, n):
    """§3.2 with §5.1's passes: K growing init passes, n Jacobi iterations, the scored pass."""
    m, k = method.model, method.n_thoughts
    b, t = x.shape
    e = m.wte.weight[x] * SCALE
    thoughts: list[torch.Tensor] = []

    def run(thoughts):
        s = 1 + len(thoughts)
        slots = torch.stack([e, *thoughts], dim=2).reshape(b, t * s, D)
        pos = torch.arange(t).repeat_interleave(s)
        h, z = ref_stack(method, slots, pos, torch.arange(t * s) % s != 0)
        return h.view(b, t, s, D), None if z is None else z.view(b, t, s - 1, C)

    for j in range(1, k + 1):
        h, _ = run(thoughts)
        thoughts = [ref_layer_norm(h[:, :, i], m.norm_f) for i in range(j)]
    for _ in range(n):
        h, _ = run(thoughts)
        thoughts = [ref_layer_norm(h[:, :, i], m.norm_f) for i in range(k)]
    h, z = run(thoughts)
    return ref_head(method, h[:, :, k]), z


def ref_loss(method, x, y, labels, n):
    """CE of the last thoughts + lambda x the CE of every thought (t, j) against labels[:, t, i],
    averaged over the unmasked (t, j, i): written out as loops."""
    logits, z = ref_jacobi(method, x, n)
    ntp = F.cross_entropy(logits.flatten(0, 1), y.flatten())
    total, count = 0.0, 0
    for b in range(x.shape[0]):
        for t in range(x.shape[1]):
            for j in range(method.n_thoughts):
                for label in labels[b, t].tolist():
                    if label >= 0:
                        total = total + torch.logsumexp(z[b, t, j], -1) - z[b, t, j, label]
                        count += 1
    return ntp + method.cfg.ponder_concepts.concept_weight * total / count


def ref_exact(method, x):
    """§3.1 / §5.1 literally: every new slot recomputes the whole sequence so far (no cache).
    Next-token logits [B, T, V] and the concept logits of each token's last thought [B, T, C]."""
    m, k = method.model, method.n_thoughts
    e = m.wte.weight[x] * SCALE
    seq, pos, thought, logits, zs = [], [], [], [], []
    for t in range(x.shape[1]):
        seq.append(e[:, t]), pos.append(t), thought.append(False)
        for j in range(k + 1):
            h, z = ref_stack(method, torch.stack(seq, 1), torch.tensor(pos), torch.tensor(thought))
            if j < k:
                seq.append(ref_layer_norm(h[:, -1], m.norm_f)), pos.append(t), thought.append(True)
        logits.append(ref_head(method, h[:, -1]))
        zs.append(z[:, -1])
    return torch.stack(logits, 1), torch.stack(zs, 1)


@pytest.mark.parametrize("n_layer, insert", [(1, 0), (2, 1)])
@pytest.mark.parametrize("k", [1, 2])
@pytest.mark.parametrize("mix", [True, False])
def test_loss_gradients_and_exact_model_equal_a_plain_torch_reference(n_layer, insert, k, mix):
    method = build("gpt2", k, n_layer=n_layer, insert=insert, mix=mix).train()
    x, y = tokens(), tokens(seed=3)
    lab = labels_for(x)
    loss, metrics = method(x, y, iters=2, labels=lab)
    reference = ref_loss(method, x, y, lab, 2)
    torch.testing.assert_close(loss, reference, atol=1e-5, rtol=1e-5)
    assert set(metrics) == {"ntp_loss", "concept_loss", "concept_acc", "jacobi_residual", "jacobi_iters"}
    ours = torch.autograd.grad(loss, list(method.parameters()), allow_unused=True)
    theirs = torch.autograd.grad(reference, list(method.parameters()), allow_unused=True)
    for (name, _), a, b in zip(method.named_parameters(), ours, theirs):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4, msg=name)
    assert ours[[n for n, _ in method.named_parameters()].index("concept_head.predict.weight")].abs().sum() > 0
    with torch.no_grad():
        logits, z = ref_exact(method.eval(), x)
        torch.testing.assert_close(method.exact_logits(x), logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(method.concept_logits(x), z, atol=1e-5, rtol=0)
        assert not torch.allclose(method.jacobi_logits(x, 1)[0], logits, atol=1e-4)  # a real approximation


def test_labels_belong_to_the_thoughts_of_the_same_token():
    """Labels only at position t train only the thoughts of token t: the concept loss equals the CE of
    z at those thought slots, and moving the labels to t + 1 changes it."""
    method = build("gpt2", 2)
    x = tokens()
    with torch.no_grad():
        captured: list = []
        method.jacobi_logits(x, 2, captured)
        z = captured[-1][1]  # [B, T, K, C] of the scored pass
        for t in (0, 2):
            lab = torch.full((2, T, 1), -1)
            lab[:, t, 0] = 3
            _, metrics = method(x, x, iters=2, labels=lab)
            expected = (torch.logsumexp(z[:, t], -1) - z[:, t, :, 3]).mean()
            torch.testing.assert_close(metrics["concept_loss"], expected, atol=1e-5, rtol=0)
            shifted = torch.roll(lab, 1, dims=1)
            assert not torch.allclose(method(x, x, iters=2, labels=shifted)[1]["concept_loss"], expected, atol=1e-3)


# --- exactness and cached generation -----------------------------------------------------------------


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("k", [1, 2])
def test_jacobi_converges_to_the_sequential_forward(arch, k):
    """After n iterations the first 1 + n // K positions are exact (the concept head reads a slot's own
    stream, so the passes stay causal per slot); with K (T - 1) iterations all are, and both
    evaluation modes score the same NLL."""
    method = build(arch, k)
    x = tokens(length=6)
    with torch.no_grad():
        exact = method.exact_logits(x)
        for n in (1, 2, 3):
            logits, residual = method.jacobi_logits(x, n)
            m = 1 + n // k
            torch.testing.assert_close(logits[:, :m], exact[:, :m], atol=1e-5, rtol=0)
            if n == 1:  # the next position is not exact yet (later ones converge fast in this tiny model)
                assert (logits[:, m] - exact[:, m]).abs().max() > 1e-4 and residual > 1e-4
        full = k * (x.shape[1] - 1)
        torch.testing.assert_close(method.jacobi_logits(x, full)[0], exact, atol=1e-5, rtol=0)
        method.cfg.ponder.eval_iters = full
        jacobi_nll = method(x[:, :-1], x[:, 1:], nll=True)
        assert method.pop_eval_metrics()["jacobi_iters"] == full
        method.set_eval_mode("exact")
        torch.testing.assert_close(method(x[:, :-1], x[:, 1:], nll=True), jacobi_nll, atol=1e-5, rtol=0)
        assert method.pop_eval_metrics() == {"eval_mode": "exact"}
    with pytest.raises(LatentLMError, match="no evaluation mode 'fast'"):
        method.set_eval_mode("fast")


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("k, mix", [(1, True), (2, True), (1, False)])
def test_cached_generation_equals_the_full_forward_on_a_padded_batch(arch, k, mix):
    method = build(arch, k, mix=mix)
    assert method.cache_slots(5) == 5 * (k + 1)
    prompts = [tokens(1, 3, seed=4)[0].tolist(), tokens(1, 6, seed=5)[0].tolist(), [7]]
    assert_cached_matches_parallel(method, prompts, method.exact_logits, max_new_tokens=4)


@pytest.mark.parametrize("k", [1, 2])
def test_jacobi_prefill_with_enough_iterations_equals_the_exact_prefill(k):
    prompts = [tokens(1, 3, seed=4)[0].tolist(), tokens(1, 6, seed=5)[0].tolist()]
    width = 6
    exact_outs, exact = recorded_generate(build("llama", k), prompts, max_new_tokens=3)
    method = build("llama", k, "--ponder.prefill", "jacobi", "--ponder.eval_iters", str(k * (width - 1)))
    outs, seen = recorded_generate(method, prompts, max_new_tokens=3)
    assert outs == exact_outs
    valid = torch.tensor([[i >= width - len(p) for i in range(width)] for p in prompts])
    torch.testing.assert_close(seen[0][valid], exact[0][valid], atol=1e-4, rtol=0)
    for logits, reference in zip(seen[1:], exact[1:]):
        torch.testing.assert_close(logits, reference, atol=1e-4, rtol=0)


def test_checkpointing_changes_memory_not_results():
    """Per-pass and per-block recomputation (dropout on) give the loss and gradients of no checkpointing."""
    x, y = tokens(seed=2), tokens(seed=3)
    lab = labels_for(x)
    results = {}
    for mode in ("none", "pass", "block"):
        method = build("llama", 2, "--model.dropout", "0.1", "--ponder.checkpoint", mode).train()
        torch.manual_seed(5)
        loss, _ = method(x, y, iters=2, labels=lab)
        loss.backward()
        results[mode] = loss, {n: p.grad for n, p in method.named_parameters()}
    for mode in ("pass", "block"):
        assert torch.equal(results[mode][0], results["none"][0])
        for name, grad in results["none"][1].items():
            torch.testing.assert_close(results[mode][1][name], grad, atol=1e-6, rtol=1e-5, msg=f"{mode} {name}")


# --- FLOPs -----------------------------------------------------------------------------------------------


def counted(fn) -> int:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("k, mix", [(1, True), (2, True), (2, False)])
def test_flops_formulas_match_counted_passes(arch, k, mix):
    """One training forward at n = 2 is the formula (the concept gather is an embedding_bag the counter
    does not see: 2 k d per mixed thought slot); training is 3 x forward at the mean n; a cached decode
    step is the generation formula (up to ponder's known K (K+1) / 2 slots of shorter context)."""
    method = build(arch, k, mix=mix)
    x = tokens()
    n = 2
    heads = k * (k - 1) // 2 + (n + 1) * k if mix else k
    gather = 2 * KC * D * heads if mix else 0
    got = counted(lambda: method(x, x, iters=n, labels=labels_for(x)))
    assert got + gather * x.numel() == method.forward_flops_per_token(T, n) * x.numel()
    assert method.train_flops_per_token(T) == 3 * method.forward_flops_per_token(T, 2.5)
    s = 6
    y = tokens(1, s + 1)
    cache = method.new_cache(1, s + 1)
    ok = torch.ones(1, s + 1, dtype=torch.bool)
    with torch.no_grad():
        method.step(y[:, :s], torch.arange(s)[None], ok[:, :s], cache)
    step = counted(lambda: method.step(y[:, s:], torch.tensor([[s]]), ok[:, s:], cache))
    slack = 4 * 2 * D * k * (k + 1) // 2 + (2 * KC * D * k if mix else 0)
    assert step + slack == method.infer_flops_per_token(s + 1)


def test_flops_report_counts_the_teacher():
    cfg = make_config("ponder_concepts/tiny", ["--teacher.path", "configs/gpt2-124m.yaml",
                                               "--ponder_concepts.n_concepts", "4096",
                                               "--ponder_concepts.k_concepts", "32"])
    rows = {r["method"]: r for r in flops_report(cfg, ["ponder", "ponder_concepts"])}
    pc, ponder = rows["ponder_concepts"], rows["ponder"]
    teacher = make_config("gpt2-124m").model
    assert pc["teacher"] == label_flops_per_token(teacher, 1, 128, 4096) and ponder["teacher"] == 0
    assert pc["train_total"] == pc["train_student"] + pc["teacher"]
    d, heads = 128, 0 + 3.5 * 1  # K = 1, mean n 2.5: (n + 1) K mixed thought slots per token
    assert pc["train_student"] - ponder["train_student"] == pytest.approx(3 * heads * (2 * d * 4096 + 2 * 32 * d))
    assert pc["infer"] - ponder["infer"] == 2 * d * 4096 + 2 * 32 * d


# --- steering --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("k", [1, 2])
def test_steering_moves_the_output_towards_the_concept(k):
    """Concept c's W_comp row is made token v's (centred) embedding and its logit a constant 1. Scaling
    z_c by alpha at the thoughts of each sampled position raises p(v) there monotonically, makes greedy
    decoding emit v, leaves the earlier prompt positions alone (all of them move with on_prompt), and
    alpha = 1 / clearing give the unsteered output."""
    method = build("gpt2", k)
    head, wte = method.concept_head, method.model.wte.weight
    targets = {5: 7, 11: 40}  # concept -> token
    with torch.no_grad():
        for c, v in targets.items():
            head.predict.weight[c] = 0.0
            head.predict.bias[c] = 1.0
            head.compress_weight[c] = wte[v] - wte[v].mean()
    prompt = [tokens(1, 4, seed=6)[0].tolist()]
    plain, (plain_prefill, *_) = recorded_generate(method, prompt, max_new_tokens=5)
    for c, v in targets.items():
        assert plain != [[v] * 5]
        probs = []
        for alpha in (1.0, 10.0, 100.0, 1000.0):
            method.set_steering([c], [alpha])
            out, (prefill, *_) = recorded_generate(method, prompt, max_new_tokens=5)
            probs.append(prefill[0, -1].softmax(-1)[v].item())
            torch.testing.assert_close(prefill[0, :-1], plain_prefill[0, :-1], atol=0, rtol=0)
        assert probs[0] == pytest.approx(plain_prefill[0, -1].softmax(-1)[v].item())
        # p(v) saturates where c_hat dominates the final-normed stream (its logit is then |W_E[v]| sqrt(d))
        assert all(a < b for a, b in zip(probs, probs[1:])) and probs[-1] > 3 * probs[0], probs
        assert prefill[0, -1].argmax() == v
        assert out == [[v] * 5]
        method.set_steering([c], [1000.0], on_prompt=True)
        _, (prefill, *_) = recorded_generate(method, prompt, max_new_tokens=1)
        assert (prefill[0, :-1].argmax(-1) == v).all()
    method.set_steering([], [])
    assert recorded_generate(method, prompt, max_new_tokens=5)[0] == plain
    with pytest.raises(LatentLMError, match="not in"):
        method.set_steering([C], [2.0])
    with pytest.raises(LatentLMError, match="mix=false"):
        build("gpt2", k, mix=False).set_steering([1], [2.0])


# --- capabilities, settings, the fast path ----------------------------------------------------------------


def test_capabilities_sections_and_core_init(tmp_path):
    cls = method_class("ponder_concepts")
    assert cls is PonderConcepts
    assert cls.capabilities() == {"needs_teacher": True, "needs_concept_labels": True, "plain_lm": False,
                                  "has_concepts": True, "eval_modes": ["jacobi", "exact"]}
    assert set(cls.sections) == {"teacher", "concepts", "ponder", "ponder_concepts"}
    assert cls.sections["ponder"] is method_class("ponder").sections["ponder"]
    assert cls.sections["concepts"] is method_class("cocomix").sections["concepts"]
    torch.manual_seed(0)
    ntp = build_method(make_config(overrides=["--model.n_layer", "2", "--model.n_embd", "32", "--model.n_head", "2",
                                              "--model.block_size", "32", "--model.vocab_size", str(VOCAB),
                                              "--model.init_std", "0.1", "--model.embed_scale", str(SCALE)]))
    core = build("gpt2").model.state_dict()
    assert all(torch.equal(core[key], value) for key, value in ntp.model.state_dict().items())
    sae = save_sae(TopKSAE(D, 48, 6), tmp_path / "sae")
    method = build("gpt2", 1, "--concepts.sae", str(sae), "--ponder_concepts.n_concepts", "0",
                   "--ponder_concepts.k_concepts", "0")
    assert (method.n_concepts, method.concept_head.k_concepts) == (48, 6)
    assert method.concept_head.compress_weight.shape == (48, D)
    assert not hasattr(build("gpt2", mix=False).concept_head, "compress_weight")  # nothing mixed, no W_comp
    with pytest.raises(LatentLMError, match="SAE .* has 48"):
        build("gpt2", 1, "--concepts.sae", str(sae), "--ponder_concepts.k_concepts", "0")
    with pytest.raises(LatentLMError, match="needs --concepts.sae"):
        build("gpt2", 1, "--ponder_concepts.n_concepts", "0")
    with pytest.raises(LatentLMError, match="insert_layer=2 must name a block"):
        build("gpt2", 1, insert=2)
    with pytest.raises(LatentLMError, match="plain PonderLM-2"):
        build("gpt2", 1, "--ponder_concepts.concept_weight", "0", mix=False)
    with pytest.raises(LatentLMError, match="needs concept labels"):
        build("gpt2")(tokens(), tokens())


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_training_attention_qualifies_for_flash_and_reads_no_device_values(arch):
    """bf16 training attention is is_causal without a mask (T and 2T slots for K = 1); on the meta
    device (no values) a whole training forward and backward runs, so it makes no host sync."""
    method = build(arch).train()
    x = tokens(length=16)
    lab = labels_for(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, calls = record_attention_calls(lambda: method(x, x, iters=2, labels=lab))
    assert calls and all(c.is_causal and flash_blockers(c) == [] for c in calls)
    assert {c.query_shape[2] for c in calls} == {16, 32}
    meta = method.to("meta")
    loss, _ = meta(x.to("meta"), x.to("meta"), iters=2, labels=lab.to("meta"))
    loss.backward()
    assert loss.device.type == "meta"


# --- end to end ------------------------------------------------------------------------------------------

MODEL = [x for k, v in {**TINY_MODEL, "arch": "llama", "embed_scale": SCALE}.items() for x in (f"--model.{k}", str(v))]


@pytest.mark.slow
def test_cli_train_eval_generate_inspect_flops(byte_wiki, tmp_path, capsys):
    """A 2-step teacher, a random SAE on its block 0, a label cache; then the tiny preset trained for
    40 steps: the next-token and concept losses fall, both evaluation modes score, steering changes the
    sampled text, inspection prints concepts, and `latentlm flops` counts the teacher."""
    teacher, labels, student = tmp_path / "teacher", tmp_path / "labels", tmp_path / "student"
    common = ["--train.batch_size", "4", "--train.lr", "3e-3", "--train.warmup_steps", "2",
              "--train.progress", "false", "--train.eval_batches", "2", "--data.seq_len", "32"]
    assert main(["train", *[a for k, v in TINY_MODEL.items() for a in (f"--model.{k}", str(v))],
                 "--data.path", str(byte_wiki), "--train.out_dir", str(teacher), "--train.max_steps", "2",
                 *common]) == 0
    sae = random_sae_for(teacher, tmp_path / "sae", latents=64, k=4, layer=0)
    assert main(["concepts", "label", "--teacher", str(teacher), "--sae", str(sae), "--data", str(byte_wiki),
                 "--out", str(labels), "--seq-len", "32", "--layer", "0", "--quiet"]) == 0
    assert main(["train", "--config", "ponder_concepts/tiny", *MODEL, "--data.path", str(byte_wiki),
                 "--train.out_dir", str(student), "--teacher.path", str(teacher), "--concepts.sae", str(sae),
                 "--concepts.labels", str(labels), "--concepts.layer", "0", "--ponder_concepts.insert_layer", "1",
                 "--train.max_steps", "40", "--train.eval_every", "0", "--train.ckpt_every", "0",
                 "--data.verify", "size", "--train.log_every", "1", *common]) == 0
    rec = [r for r in read_metrics(student / "metrics.jsonl") if "concept_loss" in r]
    first, last = rec[:5], rec[-5:]
    mean = lambda rs, key: sum(r[key] for r in rs) / len(rs)  # noqa: E731
    assert mean(last, "ntp_loss") < mean(first, "ntp_loss") - 1.0
    assert mean(last, "concept_loss") < mean(first, "concept_loss") - 0.3
    assert abs(mean(first, "concept_loss") - math.log(64)) < 0.5  # starts near chance over 64 concepts
    loaded, cfg, _ = load_method(student)  # C and k come from the saved config
    assert loaded.n_concepts == 64 and cfg.ponder_concepts.insert_layer == 1
    capsys.readouterr()
    assert main(["eval", str(student), "--mode", "all", "--json", "--max-tokens", "256", "--quiet"]) == 0
    jacobi, exact = json.loads(capsys.readouterr().out)
    assert (jacobi["eval_mode"], exact["eval_mode"]) == ("jacobi", "exact")
    assert 0 < exact["loss"] < math.log(257) and abs(jacobi["loss"] - exact["loss"]) < 0.1
    args = ["generate", str(student), "--prompt", "The", "--max-new-tokens", "30", "--temperature", "1", "--seed", "0"]
    assert main(args) == 0
    plain = capsys.readouterr().out
    assert main(args) == 0 and capsys.readouterr().out == plain
    flip = [a for i in range(64) for a in ("--steer", f"{i}=-1000")]
    assert main(args + flip) == 0
    steered = capsys.readouterr().out
    assert plain.startswith("The") and steered.startswith("The") and steered != plain
    assert main(["concepts", "inspect", str(student), "--text", "The cat", "--top", "3", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert len(records) == 7 and all(len(r["concepts"]) == 3 for r in records)
    assert main(["flops", "--config", str(student / "config.yaml"), "--methods", "ponder,ponder_concepts",
                 "--json"]) == 0
    ponder, pc = json.loads(capsys.readouterr().out)
    assert pc["teacher"] > 0 == ponder["teacher"] and pc["train_student"] > ponder["train_student"]
    assert main(["flops", "--config", str(student / "config.yaml"), "--methods", "ntp,ponder_concepts"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[-1].startswith("ponder_concepts ") and len(table[-1]) == len(table[-2])  # aligned columns


def test_compiled_training_step_has_no_graph_break():
    """fullgraph=True fails on any graph break (bf16 autocast, as on the GPU path): the slot runner's
    captured concept logits and the thought layout are plain Python around the traced tensors."""
    torch._dynamo.reset()
    method = build("llama").train()
    x = tokens(length=16)
    lab = labels_for(x)
    inputs = {"iters": 2, "labels": lab, "label_norm": (lab >= 0).sum().float()}
    compiled = torch.compile(method, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, _ = compiled(x, x, **inputs)
        eager, _ = method(x, x, **inputs)
    loss.backward()
    torch.testing.assert_close(loss, eager, atol=1e-2, rtol=1e-2)
