"""The transformer core: presets, pieces, positions, padding masks, per-layer KV cache."""

import math

import pytest
import torch

from latentlm.config import make_config
from latentlm.model.flops import matmul_params, train_flops_per_token
from latentlm.model.transformer import Transformer

V = 300


def tiny(arch="gpt2", **kw):
    over = ["--model.arch", arch, "--model.n_layer", "3", "--model.n_embd", "64", "--model.n_head", "4",
            "--model.block_size", "64", "--model.vocab_size", str(V)]
    for k, v in kw.items():
        over += [f"--model.{k}", str(v)]
    torch.manual_seed(0)
    return Transformer(make_config(overrides=over).model).eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_presets_shapes_and_structure(arch):
    m = tiny(arch)
    c = m.cfg
    logits = m(torch.randint(0, V, (2, 10)))
    assert logits.shape == (2, 10, V)  # padded rows are never returned
    assert m.wte.weight.shape[0] == 320 and c.padded_vocab_size == 320
    assert (m.lm_head.weight is m.wte.weight) == (arch == "gpt2")
    assert (m.wpe is not None) == (arch == "gpt2")
    assert (m.blocks[0].attn.q_proj.bias is not None) == (arch != "llama")
    assert type(m.norm_f).__name__ == ("RMSNorm" if arch == "llama" else "LayerNorm")
    assert (getattr(m.norm_f, "bias", None) is not None) == (arch != "llama")
    assert hasattr(m.blocks[0].mlp, "gate") == (arch == "llama")
    assert m.blocks[0].mlp.up.out_features == (192 if arch == "llama" else 256)
    assert m.blocks[0].parallel == (arch == "neox")
    assert c.mlp == {"gpt2": "gelu", "llama": "swiglu", "neox": "gelu_exact"}[arch]  # neox: erf GELU, as Pythia
    if arch != "gpt2":  # RoPE tables cover the rotary dims only: all 16 of a head, or 25% for neox
        assert m.rope_cos.shape == (64, 4 if arch == "neox" else 16)


def test_depth_scaled_init():
    m = tiny("gpt2", n_layer=8, n_embd=128)
    base = m.blocks[0].attn.q_proj.weight.std().item()
    out = m.blocks[0].attn.o_proj.weight.std().item()
    down = m.blocks[0].mlp.down.weight.std().item()
    assert base == pytest.approx(0.02, rel=0.05)
    assert out == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert down == pytest.approx(0.02 / math.sqrt(16), rel=0.05)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_pieces_compose_to_forward(arch):
    m = tiny(arch)
    idx = torch.randint(0, V, (2, 12))
    pos = torch.arange(12)
    x = m.add_positions(m.embed(idx), pos)
    h = m.run_blocks(x, pos, 0, 1)
    h = m.run_blocks(h, pos, 1, None)
    torch.testing.assert_close(m.head(h), m(idx), rtol=0, atol=1e-5)
    torch.testing.assert_close(m(inputs_embeds=m.embed(idx)), m(idx), rtol=0, atol=1e-6)


def test_embed_scale_multiplies_token_embeddings():
    m = tiny("llama", embed_scale=3.0)
    idx = torch.randint(0, V, (1, 5))
    torch.testing.assert_close(m.embed(idx), 3.0 * m.wte(idx))


@pytest.mark.parametrize("arch", ["llama", "neox"])
def test_rope_depends_on_relative_positions_only(arch):
    m = tiny(arch)
    x = m.embed(torch.randint(0, V, (1, 9)))
    a = m.run_blocks(x, torch.arange(9))
    b = m.run_blocks(x, torch.arange(9) + 17)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-4)


def test_shared_position_ids():
    """Slots that share a position id (concept / thought / pause slots) are accepted and
    causality stays by slot order: a later slot never changes an earlier slot's output."""
    for arch in ("gpt2", "llama", "neox"):
        m = tiny(arch)
        x = m.embed(torch.randint(0, V, (1, 8)))
        pos = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
        h = m.run_blocks(m.add_positions(x, pos), pos)
        x2 = x.clone()
        x2[:, 5:] = torch.randn_like(x2[:, 5:])
        h2 = m.run_blocks(m.add_positions(x2, pos), pos)
        torch.testing.assert_close(h[:, :5], h2[:, :5], rtol=0, atol=1e-6)
        assert not torch.allclose(h[:, 5:], h2[:, 5:])


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_left_padding_mask(arch):
    """A left-padded row gives the same outputs on its real tokens as the row alone."""
    m = tiny(arch)
    real = torch.randint(0, V, (1, 6))
    pad = torch.cat([torch.zeros(1, 3, dtype=torch.long), real], 1)
    valid = torch.tensor([[False] * 3 + [True] * 6])
    pos = (valid.cumsum(1) - 1).clamp(min=0)
    out = m(pad, position_ids=pos, valid=valid)
    torch.testing.assert_close(out[:, 3:], m(real), rtol=0, atol=1e-5)


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_kv_cache_matches_full_forward_with_gqa(arch):
    m = tiny(arch, n_kv_head=2)
    idx = torch.randint(0, V, (2, 20))
    full = m(idx)
    cache = m.new_cache(2, 20)
    outs = [m(idx[:, :7], cache=cache)] + [m(idx[:, t:t + 1], cache=cache) for t in range(7, 20)]
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=0, atol=1e-5)
    assert cache.lengths == [20, 20, 20]


def test_cache_lengths_may_differ_per_layer():
    """The CoCoMix layout: block 0 sees T token slots, later blocks see 2T interleaved slots.
    Decoding one token at a time through a cache whose later layers grow by 2 per token must
    equal the uncached computation."""
    m = tiny("llama")
    T = 6
    idx = torch.randint(0, V, (1, T))
    extra = torch.randn(1, T, 64)
    pos = torch.arange(T)

    def full():
        h = m.run_blocks(m.embed(idx), pos, 0, 1)
        seq = torch.stack([h, h + extra], 2).flatten(1, 2)  # h1, c1, h2, c2, ...
        return m.run_blocks(seq, pos.repeat_interleave(2), 1, None)

    ref = full()
    cache = m.new_cache(1, 2 * T)
    outs = []
    for t in range(T):
        h = m.run_blocks(m.embed(idx[:, t:t + 1]), pos[t:t + 1], 0, 1, cache=cache)
        seq = torch.cat([h, h + extra[:, t:t + 1]], 1)
        outs.append(m.run_blocks(seq, pos[t:t + 1].repeat(2), 1, None, cache=cache))
    torch.testing.assert_close(torch.cat(outs, 1), ref, rtol=0, atol=1e-5)
    assert cache.lengths == [T, 2 * T, 2 * T]


def test_flop_count_matches_module_weights():
    for arch in ("gpt2", "llama", "neox"):
        m = tiny(arch, n_kv_head=2)
        linear = sum(mod.weight.numel() for b in m.blocks for mod in b.modules() if isinstance(mod, torch.nn.Linear))
        assert matmul_params(m.cfg) == linear + m.lm_head.weight.numel()
        assert train_flops_per_token(m.cfg, 64) == 6 * matmul_params(m.cfg) + 12 * 3 * 64 * 64


def test_cache_offset_gives_each_pass_its_own_layers():
    """A stack applied twice with shared weights (a looped transformer) decodes through one
    cache whose second half holds the second pass."""
    m = tiny("llama")
    idx = torch.randint(0, V, (1, 7))
    pos = torch.arange(7)
    ref = m.run_blocks(m.run_blocks(m.embed(idx), pos), pos)
    cache = m.new_cache(1, 7, passes=2)
    outs = []
    for t in range(7):
        h = m.run_blocks(m.embed(idx[:, t:t + 1]), pos[t:t + 1], cache=cache)
        outs.append(m.run_blocks(h, pos[t:t + 1], cache=cache, cache_offset=m.cfg.n_layer))
    torch.testing.assert_close(torch.cat(outs, 1), ref, rtol=0, atol=1e-5)
    assert cache.lengths == [7] * 6
