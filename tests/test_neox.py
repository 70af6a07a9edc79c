"""The GPT-NeoX (Pythia) core, ``model.arch: neox``: an independent plain-torch reference from the
equations, the preset switches, old configs unchanged, the Pythia presets, FLOPs by hand, KD and
Hugging Face teachers on it. Methods, caches and export/import are covered by the ``arch``
parametrisations of their own test files (test_ponder, test_baselines, test_cocomix, test_generate,
test_flops, test_model, test_hf_interop)."""

from __future__ import annotations

import dataclasses
import math
from importlib.util import find_spec

import pytest
import torch

from latentlm.config import make_config
from latentlm.data.tokenizers import load_tokenizer
from latentlm.errors import LatentLMError
from latentlm.interop import write_core_checkpoint
from latentlm.model.config import ModelConfig
from latentlm.model.flops import forward_flops_per_slot, matmul_params
from latentlm.model.transformer import Transformer, apply_rope
from latentlm.presets import PRESET_DIR

pytestmark = pytest.mark.usefixtures("one_thread")
needs_hf = pytest.mark.skipif(find_spec("transformers") is None,
                              reason="needs transformers (pip install 'latentlm[hf]')")
V = 300


def neox(seed: int = 0, **kw) -> Transformer:
    """A tiny neox core (head size 16: 4 rotary dims) with perturbed norms and biases, so that a
    wrong reading of any of them shows in the logits."""
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**dict(arch="neox", vocab_size=V, block_size=64, n_layer=3, n_head=4, n_embd=64), **kw})
    cfg.validate()
    m = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.2 * torch.randn_like(p))
    return m


def reference_logits(m: Transformer, idx: torch.Tensor, rotary_pct: float = 0.25, theta: float = 10000.0,
                     eps: float = 1e-5) -> torch.Tensor:
    """GPT-NeoX written from its equations in float64, reading the weights by name only:
    h <- h + Attn(LN1(h)) + MLP(LN2(h)); RoPE rotates the pairs (i, i + r/2), i < r/2, of each
    head's first r = head_dim * rotary_pct dims by angle p * theta^(-2i/r) at position p and
    leaves the other dims alone; MLP = W2 GELU_erf(W1 x + b1) + b2; untied head."""
    w = {k: v.double() for k, v in m.state_dict().items()}
    c = m.cfg
    B, T = idx.shape
    H, hd = c.n_head, c.n_embd // c.n_head
    r = int(hd * rotary_pct)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * theta ** (-torch.arange(0, r, 2, dtype=torch.float64) / r)
    cos, sin = angle.cos(), angle.sin()  # [T, r/2]

    def layer_norm(x, name):
        mu = x.mean(-1, keepdim=True)
        var = ((x - mu) ** 2).mean(-1, keepdim=True)
        return (x - mu) / torch.sqrt(var + eps) * w[name + ".weight"] + w[name + ".bias"]

    def linear(x, name):
        return x @ w[name + ".weight"].T + w[name + ".bias"]

    def rotate(t):  # [B, H, T, hd]
        a, b, rest = t[..., : r // 2], t[..., r // 2: r], t[..., r:]
        return torch.cat([a * cos - b * sin, b * cos + a * sin, rest], dim=-1)

    causal = torch.ones(T, T, dtype=torch.bool).tril()
    x = w["wte.weight"][idx] * c.embed_scale
    for i in range(c.n_layer):
        p = f"blocks.{i}."
        a = layer_norm(x, p + "norm1")
        q, k, v = (linear(a, p + f"attn.{n}_proj").view(B, T, H, hd).transpose(1, 2) for n in "qkv")
        scores = (rotate(q) @ rotate(k).transpose(-1, -2)) / math.sqrt(hd)
        att = torch.softmax(scores.masked_fill(~causal, float("-inf")), dim=-1) @ v
        att = linear(att.transpose(1, 2).reshape(B, T, -1), p + "attn.o_proj")
        u = linear(layer_norm(x, p + "norm2"), p + "mlp.up")
        mlp = linear(0.5 * u * (1 + torch.erf(u / math.sqrt(2))), p + "mlp.down")
        x = x + att + mlp
    return (layer_norm(x, "norm_f") @ w["lm_head.weight"].T)[..., : c.vocab_size]


def test_core_equals_the_equations():
    m = neox(embed_scale=2.0, init_std=0.1)  # wide enough that attention, hence RoPE, matters
    idx = torch.randint(0, V, (2, 20), generator=torch.Generator().manual_seed(1))
    ref = reference_logits(m, idx)
    with torch.no_grad():
        ours = m.double()(idx)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)  # the float32 RoPE table bounds the match
    # The reference tells the variants apart: full rotary or a sequential residual is another model.
    assert (reference_logits(m, idx, rotary_pct=1.0) - ref).abs().max() > 1e-2
    seq = neox(parallel_residual=False, embed_scale=2.0, init_std=0.1).double()
    with torch.no_grad():
        assert (seq(idx) - ref).abs().max() > 1e-2
    # Other settings the reference reads: theta, rotary_pct, eps.
    m2 = neox(rotary_pct=0.5, rope_theta=500.0, norm_eps=1e-3, init_std=0.1).double()
    with torch.no_grad():
        torch.testing.assert_close(m2(idx), reference_logits(m2, idx, 0.5, 500.0, 1e-3), rtol=0, atol=1e-6)


def test_partial_rope_rotates_only_the_first_dims():
    x = torch.randn(1, 2, 5, 16)
    cos, sin = (t[None, None] for t in (torch.rand(5, 4), torch.rand(5, 4)))
    y = apply_rope(x, cos, sin)
    assert torch.equal(y[..., 4:], x[..., 4:])
    torch.testing.assert_close(y[..., :4], apply_rope(x[..., :4], cos, sin))
    torch.testing.assert_close(y[..., 0], x[..., 0] * cos[..., 0] - x[..., 2] * sin[..., 0])


def test_preset_switches_and_old_configs():
    r = ModelConfig(arch="neox", n_embd=512, n_head=8).resolved()
    assert (r.pos, r.norm, r.mlp, r.tie_embeddings, r.bias, r.parallel_residual, r.rotary_pct) == (
        "rope", "layernorm", "gelu_exact", False, True, True, 0.25)
    assert r.ffn_hidden == 2048 and r.rotary_dim == 16 and r.norm_eps == 1e-5
    # Configs without the new keys resolve exactly as before: sequential blocks, RoPE on every dim.
    for arch in ("gpt2", "llama"):
        old = ModelConfig(arch=arch, n_embd=64, n_head=4).resolved()
        assert (old.parallel_residual, old.rotary_pct, old.rotary_dim) == (False, 1.0, 16)
        torch.manual_seed(0)
        a = Transformer(ModelConfig(arch=arch, vocab_size=V, block_size=32, n_layer=2, n_head=4, n_embd=64))
        torch.manual_seed(0)
        b = Transformer(ModelConfig(arch=arch, vocab_size=V, block_size=32, n_layer=2, n_head=4, n_embd=64,
                                    parallel_residual=False, rotary_pct=1.0))
        idx = torch.randint(0, V, (1, 12))
        with torch.no_grad():
            assert torch.equal(a(idx), b(idx))
    # Each switch works on its own on another preset (a Pythia-like llama, a parallel GPT-2).
    for kw in (dict(arch="llama", rotary_pct=0.25), dict(arch="gpt2", parallel_residual=True)):
        m = Transformer(ModelConfig(vocab_size=V, block_size=32, n_layer=2, n_head=4, n_embd=64, **kw))
        assert m(torch.randint(0, V, (1, 5))).shape == (1, 5, V)


@pytest.mark.parametrize("kw, msg", [(dict(rotary_pct=0.0), "must be in \\(0, 1\\]"),
                                     (dict(rotary_pct=1.5), "must be in \\(0, 1\\]"),
                                     (dict(rotary_pct=0.1), "even, positive number of rotary dims.*= 1"),
                                     (dict(n_embd=24, n_head=4, rotary_pct=0.5), "rotary dims.*= 3")])
def test_rotary_validation(kw, msg):
    with pytest.raises(LatentLMError, match=msg):
        ModelConfig(**{**dict(arch="neox", n_embd=64, n_head=4), **kw}).validate()


# Pythia's published parameter totals (with 50304 embedding rows, untied); the hand count below gives them.
PYTHIA = {"70m": (512, 6, 8, 70_426_624, 1e-3), "160m": (768, 12, 12, 162_322_944, 6e-4),
          "410m": (1024, 24, 16, 405_334_016, 3e-4), "1.4b": (2048, 24, 16, 1_414_647_808, 2e-4)}


@pytest.mark.parametrize("size", PYTHIA)
def test_pythia_presets(size):
    d, n_layer, n_head, total, lr = PYTHIA[size]
    cfg = make_config(PRESET_DIR / "ponder" / f"pythia-{size}.yaml")
    m, t, p = cfg.model, cfg.train, cfg.ponder
    assert (m.arch, m.n_embd, m.n_layer, m.n_head, m.ffn_hidden, m.block_size, m.padded_vocab_size) == (
        "neox", d, n_layer, n_head, 4 * d, 2048, 50304)
    r = m.resolved()
    assert (r.rotary_pct, r.rope_theta, r.norm_eps, r.tie_embeddings, r.parallel_residual) == (
        0.25, 1e4, 1e-5, False, True)
    assert m.embed_scale == pytest.approx(math.sqrt(2.5 * d), rel=1e-6)
    # Per layer: 2 LayerNorms (4d), q/k/v/o with biases (4d^2 + 4d), MLP 4d wide with biases (8d^2 + 5d);
    # a final LayerNorm and two untied 50304-row embeddings.
    hand = n_layer * (12 * d * d + 13 * d) + 2 * d + 2 * 50304 * d
    with torch.device("meta"):
        model = Transformer(m)
    assert model.num_params() == hand == total
    # The official recipe: lr per size (= Pythia's), cosine to 10%, Jacobi n uniform in {2, 3, 4}.
    assert (t.method, t.lr, t.min_lr, t.beta1, t.beta2) == ("ponder", lr, pytest.approx(lr / 10), 0.9, 0.95)
    assert (p.n_thoughts, p.train_iters_min, p.train_iters_max, p.eval_iters) == (1, 2, 4, 3)
    if size == "70m":  # the quickstart: 128 sequences per step, 1% warmup, wd 0.01
        assert (t.batch_size * t.grad_accum, t.weight_decay, t.warmup_steps / t.max_steps) == (128, 0.01, 0.01)
    else:  # the Table 3 scripts: 50k steps of 256 sequences, 2% warmup, wd 0.1
        assert (t.batch_size * t.grad_accum, t.max_steps, t.weight_decay, t.warmup_steps) == (256, 50000, 0.1, 1000)


def test_flops_by_hand():
    """Pythia-70m at context S: per layer q, k, v, o (4 d^2) and the 4d-wide MLP (8 d^2), the untied
    head (d x 50304); 2 FLOPs per multiply-accumulate plus 4 L d S for scores and values. Partial
    rotary, biases and the parallel residual add no matrix."""
    cfg = make_config(PRESET_DIR / "ponder" / "pythia-70m.yaml").model
    d, L, S = 512, 6, 2048
    assert matmul_params(cfg) == L * 12 * d * d + d * 50304
    assert forward_flops_per_slot(cfg, S) == 2 * (L * 12 * d * d + d * 50304) + 4 * L * d * S
    seq = dataclasses.replace(cfg, parallel_residual=False, rotary_pct=1.0)
    assert forward_flops_per_slot(seq, S) == forward_flops_per_slot(cfg, S)


def test_kd_with_neox_teacher_and_student(tiny_config, tmp_path):
    """KD loads a neox checkpoint as its teacher and trains a neox student towards it."""
    from latentlm.train.metrics import read_metrics
    from latentlm.train.trainer import train

    teacher = neox(vocab_size=257, n_layer=2, n_head=2, n_embd=32)
    (tmp_path / "teacher").mkdir()
    write_core_checkpoint(tmp_path / "teacher", teacher.cfg, dict(teacher.state_dict()),
                          load_tokenizer("byte").describe(), {})
    cfg = tiny_config(method="kd", max_steps=3)
    cfg.model.arch, cfg.teacher.path, cfg.kd.weight = "neox", str(tmp_path / "teacher"), 1.0
    train(cfg)
    rows = [r for r in read_metrics(f"{cfg.train.out_dir}/metrics.jsonl") if "loss" in r]
    assert rows and all(math.isfinite(r["loss"]) for r in rows)
    assert any(k.startswith("kd") for k in rows[-1])


# --- Hugging Face GPTNeoX teachers ----------------------------------------------------------------


def save_tiny_neox(directory, bpe_path) -> None:
    from transformers import AutoModelForCausalLM, GPTNeoXConfig, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(bpe_path), eos_token="<|endoftext|>")
    config = GPTNeoXConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=96, num_hidden_layers=3,
                           num_attention_heads=4, max_position_embeddings=32, rotary_pct=0.5, rotary_emb_base=1000)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    tok.save_pretrained(directory)


@needs_hf
def test_hf_neox_teacher_and_its_imported_checkpoint_agree(tmp_path, bpe_path):
    """A Hugging Face GPTNeoX directory as teacher: its shape reads as our neox core (FLOPs), and
    the same directory imported into a latentlm checkpoint gives a teacher with the same residual
    stream and gradients."""
    from latentlm.concepts.teacher import HFTeacher, LatentLMTeacher, load_teacher, teacher_model_config
    from latentlm.interop import import_hf

    save_tiny_neox(tmp_path / "hf", bpe_path)
    hf = load_teacher(str(tmp_path / "hf"))
    assert isinstance(hf, HFTeacher) and (hf.d_model, hf.n_layer) == (32, 3)
    shape = teacher_model_config(str(tmp_path / "hf")).resolved()
    assert hf.model_config().resolved() == shape
    assert (shape.arch, shape.n_layer, shape.n_embd, shape.ffn_hidden, shape.rotary_dim, shape.parallel_residual,
            shape.mlp, shape.rope_theta, shape.tie_embeddings) == (
        "neox", 3, 32, 96, 4, True, "gelu_exact", 1000.0, False)
    assert matmul_params(shape) == 3 * (4 * 32 * 32 + 2 * 32 * 96) + 32 * 512
    import_hf(tmp_path / "hf", tmp_path / "ck")
    ours = load_teacher(str(tmp_path / "ck"))
    assert isinstance(ours, LatentLMTeacher) and ours.model.cfg.arch == "neox"
    idx = torch.randint(0, 512, (2, 10), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(ours.hidden(idx, 1), hf.hidden(idx, 1), rtol=1e-4, atol=1e-5)
    (h1, g1), (h2, g2) = ours.hidden_and_grad(idx, 1), hf.hidden_and_grad(idx, 1)
    torch.testing.assert_close(h1, h2, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g1, g2, rtol=1e-3, atol=1e-5)
