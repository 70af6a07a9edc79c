"""The CoCoMix authors' run settings as options (docs/COCOMIX.md, "Differences from the authors' code"):
randomly shifted training windows, weight decay on every parameter, dropout 0.1 in the paper presets;
ours stay the defaults, the new keys are core settings that a resumed run may not change."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

from latentlm.config import make_config
from latentlm.data.loader import WindowLoader
from latentlm.errors import LatentLMError
from latentlm.presets import PRESET_DIR
from latentlm.train.optim import build_optimizer
from latentlm.train.trainer import SAFE_ON_RESUME, check_resume_config

from test_loader import position_stream

BLOCK = 8


@pytest.fixture
def stream(tmp_path: Path):
    return position_stream(tmp_path, 8 * 50 + 5, shard_tokens=37)  # 50 windows, 4 spare tokens


def test_shifted_windows_follow_the_authors_loader(stream):
    """Window i starts at i * T + s with s uniform in [0, T] (the last window: [0, spare]); x and y are
    the stream's tokens from there (a position stream: token p is p), drawn anew every epoch."""
    loader = WindowLoader(stream, BLOCK, 5, seed=3, shift=True)
    starts: dict[int, list[int]] = {0: [], 1: []}
    for _ in range(2 * loader.batches_per_epoch):
        x, y, windows = loader.next_batch_windows()
        epoch = loader.epoch  # set when the batch was drawn
        for row, w in zip(x, windows):
            start = int(row[0])
            assert row.tolist() == list(range(start, start + BLOCK))
            offset = start - int(w) * BLOCK
            assert 0 <= offset <= (BLOCK if w < 49 else 4)
            starts[epoch].append(offset)
        assert torch.equal(y, x + 1)
    offsets = np.array(starts[0] + starts[1])
    assert offsets.min() == 0 and offsets.max() == BLOCK and len(set(offsets.tolist())) == BLOCK + 1
    assert starts[0] != starts[1]
    assert not WindowLoader(stream, BLOCK, 5, seed=3).epoch_shifts(0).any()  # the default: fixed windows


def test_shifted_windows_resume_and_shard_like_one_process(stream):
    whole = WindowLoader(stream, BLOCK, 6, seed=1, shift=True)
    expected = [whole.next_batch()[0] for _ in range(20)]
    first = WindowLoader(stream, BLOCK, 6, seed=1, shift=True)
    got = [first.next_batch()[0] for _ in range(7)]
    resumed = WindowLoader(stream, BLOCK, 6, seed=1, shift=True)
    resumed.load_state_dict(first.state_dict())
    got += [resumed.next_batch()[0] for _ in range(13)]
    assert all(torch.equal(a, b) for a, b in zip(got, expected))
    ranks = [WindowLoader(stream, BLOCK, 3, seed=1, rank=r, world_size=2, shift=True) for r in range(2)]
    for batch in expected[:10]:
        assert torch.equal(torch.cat([r.next_batch()[0] for r in ranks]), batch)
    with pytest.raises(LatentLMError, match="shift=False but this run uses True"):
        state = WindowLoader(stream, BLOCK, 6, seed=1).state_dict()
        state.pop("shift")  # a state saved before the option existed: unshifted windows
        WindowLoader(stream, BLOCK, 6, seed=1, shift=True).load_state_dict(state)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(4, 3)
        self.norm = nn.LayerNorm(3)
        self.emb = nn.Embedding(5, 4)


def test_weight_decay_on_every_parameter_is_the_authors_adamw():
    """weight_decay_params=all: one step equals torch's AdamW over all parameters with the weight decay
    (the authors' optimizer); matrices (the default) leaves biases and norm gains undecayed."""
    for which in ("all", "matrices"):
        cfg = make_config(overrides=["--train.weight_decay", "0.5", "--train.lr", "0.1",
                                     "--train.weight_decay_params", which]).train
        ours, ref = Tiny(), Tiny()
        opt = build_optimizer(ours, cfg, torch.device("cpu"), fused=False)
        decay = [p for p in ref.parameters() if which == "all" or p.dim() >= 2]
        rest = [p for p in ref.parameters() if not (which == "all" or p.dim() >= 2)]
        reference = torch.optim.AdamW([{"params": decay, "weight_decay": 0.5}, {"params": rest, "weight_decay": 0.0}],
                                      lr=0.1, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)
        for model, o in ((ours, opt), (ref, reference)):
            for p in model.parameters():
                p.grad = torch.ones_like(p) * 1e-3
            o.step()
        for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
            torch.testing.assert_close(a, b, msg=name)
        assert len(opt.param_groups) == 2  # the same groups either way: optimizer states stay compatible
    assert make_config().train.weight_decay_params == "matrices" and not make_config().data.shift_windows


@pytest.mark.parametrize("key,value", [("data.shift_windows", True), ("train.weight_decay_params", "all"),
                                       ("model.dropout", 0.1)])
def test_a_resumed_run_cannot_change_the_authors_settings(key, value, tmp_path):
    assert key not in SAFE_ON_RESUME
    saved = make_config()
    wanted = make_config(overrides=[f"--{key}", str(value).lower() if isinstance(value, bool) else str(value)])
    with pytest.raises(LatentLMError, match=rf"cannot resume from .*: {key} was"):
        check_resume_config(saved, wanted, tmp_path)


@pytest.mark.parametrize("name", ["cocomix-69m", "cocomix-386m", "cocomix-1.38b", "ntp-69m-wide", "ntp-386m-wide",
                                  "ntp-1.38b-wide"])
def test_the_paper_presets_use_the_authors_settings(name):
    cfg = make_config(PRESET_DIR / "cocomix" / f"{name}.yaml")
    assert cfg.model.dropout == 0.1 and cfg.train.weight_decay_params == "all" and cfg.data.shift_windows
    assert cfg.teacher.dtype == "float32"
    if name.startswith("cocomix"):
        assert cfg.concepts.last_position == "extra_token" and cfg.cocomix.concept_norm == "position"
        assert (cfg.concepts.acts, cfg.concepts.score, cfg.concepts.select) == ("post", "official", "attribution")
