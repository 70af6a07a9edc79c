"""Config loading, dotted overrides and one-line validation errors."""

import pytest

from latentlm.config import config_from_dict, make_config, parse_overrides
from latentlm.errors import LatentLMError


def test_overrides_parse_types():
    o = parse_overrides(["--model.n_layer", "4", "--train.lr=3e-4", "--model.bias", "false", "--model.n_kv_head", "null"])
    assert o == {"model": {"n_layer": 4, "bias": False, "n_kv_head": None}, "train": {"lr": 3e-4}}


def test_yaml_then_overrides(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  n_layer: 3\n  arch: llama\ntrain:\n  lr: 1e-3\n")
    cfg = make_config(p, ["--model.n_layer", "5"])
    assert cfg.model.n_layer == 5 and cfg.model.arch == "llama" and cfg.train.lr == 1e-3
    r = cfg.model.resolved()
    assert (r.pos, r.norm, r.mlp, r.tie_embeddings, r.bias) == ("rope", "rmsnorm", "swiglu", False, False)
    assert r.ffn_hidden % 64 == 0 and r.ffn_hidden >= 8 * r.n_embd / 3


def test_int_accepted_for_float_and_roundtrip():
    cfg = make_config(overrides=["--train.lr", "1"])
    assert isinstance(cfg.train.lr, float)
    assert config_from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("args, needle", [
    (["--model.n_layers", "4"], "unknown config key 'model.n_layers'; allowed keys: arch"),
    (["--bogus.x", "1"], "unknown config key 'bogus'"),
    (["--model.n_layer", "four"], "model.n_layer='four' has the wrong type: expected int"),
    (["--model.arch", "bert"], "model.arch='bert' has the wrong type: expected one of 'gpt2', 'llama'"),
    (["--train.lr", "-1e-3"], "train.lr=-0.001 must be positive and finite"),
    (["--model.n_head", "5"], "model.n_head=5 does not divide model.n_embd=768"),
    (["--data.seq_len", "2048"], "data.seq_len=2048 exceeds model.block_size=1024"),
    (["--train.method", "magic"], "unknown method 'magic'; choose from ntp,"),
    (["--train.min_lr", "1.0"], "is above train.lr"),
    (["--model.dropout", "1.5"], "model.dropout=1.5 must be in [0, 1)"),
    (["--train.dist", "mpi"], "train.dist='mpi'"),
    (["model.n_layer", "4"], "config overrides look like --section.key VALUE"),
    (["--model.n_layer"], "has no value"),
    # non-finite numbers are refused where they are read, not discovered as a nan loss
    (["--train.lr", "inf"], "train.lr=inf must be positive and finite"),
    (["--train.lr", "nan"], "train.lr=nan must be positive and finite"),
    (["--train.weight_decay", "inf"], "train.weight_decay=inf must be >= 0 and finite"),
    (["--train.grad_clip", "nan"], "train.grad_clip=nan must be >= 0 and finite"),
    (["--train.beta2", "nan"], "train.beta2=nan must be in [0, 1)"),
    (["--model.embed_scale", "inf"], "model.embed_scale=inf must be positive and finite"),
    (["--model.dropout", "nan"], "model.dropout=nan must be in [0, 1)"),
    (["--kd.temperature", "-inf"], "kd.temperature=-inf must be positive and finite"),
    (["--cocomix.concept_weight", "inf"], "cocomix.concept_weight=inf must be >= 0 and finite"),
])
def test_bad_values_fail_with_one_line(args, needle):
    with pytest.raises(LatentLMError) as e:
        make_config(overrides=args)
    msg = str(e.value)
    assert needle in msg, msg
    assert "\n" not in msg


def test_bad_yaml_file(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("model: [1, 2\n")
    with pytest.raises(LatentLMError, match="not valid YAML"):
        make_config(p)
    with pytest.raises(LatentLMError, match="does not exist"):
        make_config(tmp_path / "missing.yaml")
