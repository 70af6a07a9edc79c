"""Every shipped preset loads, validates and builds a model of the documented size."""

from pathlib import Path

import pytest

from latentlm.config import make_config
from latentlm.model.transformer import Transformer

CONFIGS = sorted((Path(__file__).parent.parent / "configs").rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[f"{p.parent.name}/{p.stem}" for p in CONFIGS])
def test_preset_loads(path):
    cfg = make_config(path)
    assert cfg.train.method and cfg.model.n_embd % cfg.model.n_head == 0


def test_gpt2_124m_has_124m_parameters():
    import torch

    with torch.device("meta"):
        m = Transformer(make_config(Path(__file__).parent.parent / "configs" / "gpt2-124m.yaml").model)
    # GPT-2 small: 124.4M with the 50257-row embedding; ours pads it to 50304 rows (+36k).
    assert m.num_params() == 124_475_904


OFFICIAL = {"125m": (768, 12, 12, 2064), "410m": (1024, 24, 16, 2752), "834m": (1536, 24, 24, 4128),
            "1.4b": (2048, 24, 32, 5504), "2.8b": (2048, 48, 32, 5504)}


@pytest.mark.parametrize("name", OFFICIAL)
def test_ponder_presets_match_the_official_shapes(name):
    cfg = make_config(Path(__file__).parent.parent / "configs" / "ponder" / f"llama-{name}.yaml")
    m = cfg.model
    assert (m.n_embd, m.n_layer, m.n_head, m.ffn_hidden) == OFFICIAL[name]
    assert m.padded_vocab_size == 50304 and m.arch == "llama" and m.block_size == 2048
    assert m.embed_scale == pytest.approx((2.5 * m.n_embd) ** 0.5, rel=1e-6)
    t = cfg.train
    assert t.batch_size * t.grad_accum == 256 and t.max_steps == 50000 and t.lr == 2e-4 and t.min_lr == 2e-5
