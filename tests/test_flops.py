"""Compute accounting: generation FLOPs per token against counted decode steps, the label cost of
CoCoMix's teacher against counted teacher passes, teacher shapes, `latentlm flops`, and the
trainer logging student + teacher FLOPs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from latentlm.cli import main
from latentlm.concepts.attribution import label_flops_per_token
from latentlm.concepts.sae import TopKSAE
from latentlm.concepts.teacher import LatentLMTeacher, teacher_model_config
from latentlm.config import make_config
from latentlm.data.tokenizers import ByteTokenizer
from latentlm.methods import build_method, flops_report
from latentlm.model.flops import forward_flops_per_slot
from latentlm.model.hf import hf_model_config
from latentlm.model.transformer import Transformer
from latentlm.train.metrics import read_metrics
from latentlm.train.trainer import train

from conftest import k_override

pytestmark = pytest.mark.usefixtures("one_thread")
VOCAB, S = 61, 6
SMALL = ["--model.n_layer", "3", "--model.n_embd", "32", "--model.n_head", "2", "--model.block_size", "64",
         "--model.vocab_size", str(VOCAB), "--cocomix.insert_layer", "1", "--cocomix.n_concepts", "64",
         "--cocomix.k_concepts", "4", "--pause_insert.insert_layer", "1"]


def counted(fn) -> int:
    """FLOPs of ``fn()`` with the math attention kernel (full score matrices, flops.py's convention)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
@pytest.mark.parametrize("name,k", [("ntp", 1), ("pause", 1), ("loop", 2), ("ponderlm", 1), ("ponder", 1),
                                    ("ponder", 2), ("cocomix", 1), ("pause_insert", 1)])
def test_generation_flops_equal_a_counted_decode_step(arch, name, k):
    """One cached decode step after a prompt of S tokens costs ``infer_flops_per_token(S + 1)``
    (the new token attends to itself too). Two exceptions, both known: ponder's thoughts see a
    cache that grows by one slot per thought, K(K+1)/2 slots fewer than the convention's full
    context; CoCoMix's k-row gather is an embedding_bag the counter does not see (2 k d)."""
    torch.manual_seed(0)
    m = build_method(make_config(overrides=["--train.method", name, "--model.arch", arch, *SMALL,
                                            *k_override(name, k)])).eval()
    x = torch.randint(0, VOCAB, (1, S + 1))
    cache = m.new_cache(1, S + 1)
    valid = torch.ones(1, S + 1, dtype=torch.bool)
    with torch.no_grad():
        m.step(x[:, :S], torch.arange(S)[None], valid[:, :S], cache)
    got = counted(lambda: m.step(x[:, S:], torch.tensor([[S]]), valid[:, S:], cache))
    d, layers = 32, 3
    slack = 4 * layers * d * k * (k + 1) // 2 if name == "ponder" else 2 * 4 * d if name == "cocomix" else 0
    assert got + slack == m.infer_flops_per_token(S + 1)
    # Without attention the cost does not depend on the context; with it, it grows linearly.
    assert m.infer_flops_per_token(100) - m.infer_flops_per_token(0) == \
        pytest.approx(100 * (m.infer_flops_per_token(1) - m.infer_flops_per_token(0)))


@pytest.mark.parametrize("arch", ["gpt2", "llama", "neox"])
@pytest.mark.parametrize("layer", [0, 1])
def test_label_flops_equal_counted_teacher_passes(arch, layer):
    """The teacher's forward (no grad) up to the SAE layer, its forward and input-gradient backward
    above it, and the SAE encoder: the passes of ``hidden_and_grad`` + labelling, counted exactly.
    (FlopCounterMode cannot wrap ``autograd.grad`` on a leaf, so the passes are spelled out with
    ``backward``; the teacher is frozen, so no weight gradient is computed either way.)"""
    cfg = make_config(overrides=["--model.arch", arch, *SMALL[:8], "--model.vocab_size", "256"])
    teacher = LatentLMTeacher.from_model(Transformer(cfg.model), ByteTokenizer())
    m, sae = teacher.model, TopKSAE(32, 64, 4)
    x, pos = torch.randint(0, 256, (2, 8)), torch.arange(8)

    def passes():
        h = m.run_blocks(m.add_positions(m.embed(x), pos), pos, 0, layer + 1).requires_grad_()
        with torch.enable_grad():
            logits = m.head(m.run_blocks(h, pos, layer + 1, None))
            F.cross_entropy(logits.flatten(0, 1), x.flatten()).backward()
        sae.pre_activations(sae.normalize(h.detach())[0])

    assert counted(passes) == label_flops_per_token(teacher.model_config(), layer, 8, 64) * x.numel()
    h_only = counted(lambda: sae.pre_activations(sae.normalize(teacher.hidden(x, layer))[0]))
    assert h_only == label_flops_per_token(teacher.model_config(), layer, 8, 64, "activation") * x.numel()


def test_teacher_shapes_from_specs(tmp_path):
    """A Hugging Face config.json (GPT-2 and Llama style) and a YAML config map to our shape."""
    gpt2 = {"model_type": "gpt2", "n_embd": 768, "n_layer": 12, "n_head": 12, "vocab_size": 50257, "n_positions": 1024}
    c = hf_model_config(gpt2)
    assert (c.arch, c.n_layer, c.n_embd, c.ffn_hidden, c.padded_vocab_size) == ("gpt2", 12, 768, 3072, 50257)
    yaml_cfg = teacher_model_config("gpt2-124m.yaml")
    assert forward_flops_per_slot(yaml_cfg, 1024) == pytest.approx(forward_flops_per_slot(c, 1024), rel=2e-3)
    llama = {"model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
             "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True}
    (tmp_path / "config.json").write_text(json.dumps(llama))
    c = teacher_model_config(str(tmp_path))
    assert (c.arch, c.n_layer, c.n_kv_head, c.ffn_hidden, c.resolved().mlp) == ("llama", 30, 3, 1536, "swiglu")
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    with pytest.raises(Exception, match="unsupported Hugging Face model_type 'bert'"):
        teacher_model_config(str(tmp_path))


def test_flops_report_counts_the_teacher_and_every_method():
    cfg = make_config("cocomix/cocomix-69m", ["--teacher.path", "configs/gpt2-124m.yaml"])
    rows = {r["method"]: r for r in flops_report(cfg, ["ntp", "kd", "cocomix", "ponder"])}
    teacher = make_config("gpt2-124m").model
    assert rows["ntp"]["teacher"] == 0 and rows["ponder"]["teacher"] == 0
    assert rows["kd"]["teacher"] == forward_flops_per_slot(teacher, cfg.seq_len)
    assert rows["kd"]["train_total"] == rows["ntp"]["train_total"] + rows["kd"]["teacher"]
    assert rows["cocomix"]["teacher"] == label_flops_per_token(teacher, cfg.concepts.layer, cfg.seq_len,
                                                               cfg.cocomix.n_concepts)
    assert rows["ntp"]["params"] == sum(p.numel() for p in Transformer(cfg.model).parameters())
    two_slots = 2 * forward_flops_per_slot(cfg.model, 2 * cfg.seq_len, head=False)  # K=1: the head once
    assert rows["ponder"]["infer"] == two_slots + forward_flops_per_slot(cfg.model, 0, n_layers=0)
    no_teacher = flops_report(make_config("cocomix/cocomix-69m", []), ["kd"])[0]
    assert "set --teacher.path" in no_teacher["error"]


def test_flops_cli(capsys):
    assert main(["flops", "--config", "ponder/pythia-70m", "--methods", "ntp,ponder,pause"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[1].split()[:3] == ["method", "params", "train"]
    ponder = next(line for line in out if line.startswith("ponder")).split()
    assert 1.9 < float(ponder[-1]) < 2.0  # K=1 generation: 2 slots per token through the blocks, 1 head
    assert main(["flops", "--config", "ponder/pythia-70m", "--json", "--context", "16"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["method"] for r in rows] == ["ntp", "ponder"] and rows[0]["infer"] < rows[0]["train_student"] / 3
    assert main(["flops", "--config", "ponder/pythia-70m", "--methods", "nope"]) == 2
    assert "unknown method 'nope'" in capsys.readouterr().err


def test_trainer_logs_student_plus_teacher_flops(tiny_config, tmp_path):
    teacher_cfg = tiny_config(max_steps=2, out_dir=str(tmp_path / "teacher"))
    train(teacher_cfg)
    cfg = tiny_config(max_steps=2, out_dir=str(tmp_path / "kd"))
    cfg.train.method, cfg.teacher.path = "kd", str(tmp_path / "teacher")
    train(cfg)
    rec = next(r for r in read_metrics(Path(cfg.train.out_dir) / "metrics.jsonl") if "flops_per_token" in r)
    student = build_method(cfg)
    expected = student.train_flops_per_token(cfg.seq_len) + forward_flops_per_slot(teacher_cfg.model, cfg.seq_len)
    assert rec["flops_per_token"] == expected
