"""`latentlm train --init-from`: the tiny fine-tune recipe of docs/TRAINING.md runs as written,
and the flag takes the checkpoint's model config (or --config's) and its weights."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
import yaml

from latentlm.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")
DOC = Path(__file__).resolve().parents[1] / "docs" / "TRAINING.md"


def recipe_commands() -> list[list[str]]:
    block = re.search(r"<!-- recipe: tiny fine-tune -->\n```bash\n(.*?)```\n<!-- end recipe -->", DOC.read_text(),
                      re.S)
    assert block, "docs/TRAINING.md lost its tiny fine-tune recipe"
    lines = [line for line in block.group(1).splitlines() if line.strip()]
    assert all(line.startswith("latentlm ") for line in lines)
    return [shlex.split(line)[1:] for line in lines]


def first_loss(run: Path) -> float:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["loss"]


def final_val(run: Path) -> float:
    return json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])["val_loss"]


def test_the_documented_fine_tune_recipe_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    commands = recipe_commands()
    for args in commands:
        assert main(args) == 0, args
    base, ft = tmp_path / "runs" / "base", tmp_path / "runs" / "ft"
    assert capsys.readouterr().out.splitlines()[-1].startswith("The river")
    ft_cfg = yaml.safe_load(next((ft / "checkpoints").glob("step_*/config.yaml")).read_text())
    base_cfg = yaml.safe_load(next((base / "checkpoints").glob("step_*/config.yaml")).read_text())
    assert ft_cfg["model"] == base_cfg["model"] and ft_cfg["train"]["init_from"] == "runs/base"
    assert ft_cfg["train"]["lr"] == 3e-4 and ft_cfg["train"]["max_steps"] == 10
    # The fine-tune starts where the base run ended: after its 10 steps at a tenth of the learning rate
    # its loss is far below the base run's after the same 10 steps from a fresh init (both logged at step 10).
    assert first_loss(ft) < first_loss(base) - 0.5
    assert final_val(ft) < final_val(base) + 0.05


def test_init_from_takes_the_weights_and_respects_config(tmp_path, byte_wiki, capsys):
    """The model config comes from the checkpoint (a --model override still wins over it), the weights
    are the checkpoint's; with --config the config's model is used and must fit the weights."""
    from latentlm.data.loader import TokenSplit, WindowLoader
    from latentlm.loading import load_method
    from latentlm.train.warmstart import init_from_base

    run = ["--data.path", str(byte_wiki), "--train.batch_size", "2", "--train.eval_every", "0",
           "--train.eval_batches", "1", "--train.progress", "false", "--train.log_every", "1"]
    assert main(["train", "--model.vocab_size", "257", "--model.n_layer", "2", "--model.n_embd", "32",
                 "--model.n_head", "2", "--model.block_size", "32", "--train.max_steps", "2",
                 "--train.out_dir", str(tmp_path / "base"), *run]) == 0
    base, _, _ = load_method(tmp_path / "base")
    assert main(["train", "--init-from", str(tmp_path / "base"), "--train.max_steps", "1", "--train.lr", "1e-9",
                 "--train.min_lr", "0", "--train.out_dir", str(tmp_path / "ft"), *run]) == 0
    ft_cfg = yaml.safe_load(next((tmp_path / "ft" / "checkpoints").glob("step_*/config.yaml")).read_text())
    x, y = WindowLoader(TokenSplit(str(byte_wiki), "train"), 32, 2, seed=ft_cfg["train"]["seed"]).next_batch()
    with torch.no_grad():
        expected = base(x, y)[0].item()
    assert first_loss(tmp_path / "ft") == pytest.approx(expected, rel=1e-6)  # the first step ran on base's weights
    assert ft_cfg["model"]["n_embd"] == 32 and ft_cfg["model"]["block_size"] == 32
    # --config names the model: here a different one, which the weights do not fit (one line, nothing run).
    (tmp_path / "wide.yaml").write_text(yaml.safe_dump({"model": {"vocab_size": 257, "n_layer": 2, "n_embd": 64,
                                                                   "n_head": 2, "block_size": 32}}))
    capsys.readouterr()
    assert main(["train", "--config", str(tmp_path / "wide.yaml"), "--init-from", str(tmp_path / "base"),
                 "--train.max_steps", "1", "--train.out_dir", str(tmp_path / "wide"), *run]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "train.init_from: tensor" in err and "shape" in err
    assert init_from_base(tmp_path / "base", with_model=False) == {}
    for bad, needle in ((tmp_path / "nowhere", "does not exist"), (tmp_path, "no checkpoint found")):
        assert main(["train", "--init-from", str(bad), "--train.out_dir", str(tmp_path / "x"), *run]) == 2
        assert needle in capsys.readouterr().err
