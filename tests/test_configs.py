"""Every shipped preset loads, validates and builds a model of the documented size."""

from pathlib import Path

import pytest

from latentlm.config import make_config
from latentlm.model.transformer import Transformer

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_preset_loads(path):
    cfg = make_config(path)
    assert cfg.train.method and cfg.model.n_embd % cfg.model.n_head == 0


def test_gpt2_124m_has_124m_parameters():
    import torch

    with torch.device("meta"):
        m = Transformer(make_config(Path(__file__).parent.parent / "configs" / "gpt2-124m.yaml").model)
    # GPT-2 small: 124.4M with the 50257-row embedding; ours pads it to 50304 rows (+36k).
    assert m.num_params() == 124_475_904
