"""The concept-label cache (docs/METHODS.md §2.1) and the `sae train` / `concepts label` commands."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch

import latentlm.concepts.labels as labels_mod
from latentlm.cli import main
from latentlm.concepts.labels import (CachedLabels, OnTheFlyLabels, build_label_cache, label_source,
                                      sae_fingerprint)
from latentlm.concepts.sae import TopKSAE, load_sae, save_sae
from latentlm.concepts.teacher import load_teacher
from latentlm.config import make_config
from latentlm.data.loader import TokenSplit, WindowLoader, iter_eval_windows
from latentlm.data.prepare import prepare
from latentlm.data.tokenizers import load_tokenizer
from latentlm.errors import LatentLMError

from conftest import TINY_MODEL

MODEL = [x for k, v in TINY_MODEL.items() for x in (f"--model.{k}", str(v))]
LAYER, SEQ = 1, 32


@pytest.fixture(scope="module")
def teacher_run(byte_wiki, tmp_path_factory):
    """A tiny byte-level teacher trained for a few steps with `latentlm train`."""
    run = tmp_path_factory.mktemp("teacher") / "run"
    assert main(["train", *MODEL, "--data.path", str(byte_wiki), "--train.out_dir", str(run),
                 "--train.max_steps", "4", "--train.warmup_steps", "1", "--train.batch_size", "4", "--train.lr", "3e-3",
                 "--train.eval_batches", "1", "--train.progress", "false"]) == 0
    return run


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """A few byte-tokenized documents: small enough to cache every window."""
    out = tmp_path_factory.mktemp("small") / "data"
    prepare("wiki", load_tokenizer("byte"), out, val_fraction=0.2, limit=8, workers=1, progress=False)
    return out


@pytest.fixture(scope="module")
def sae_dir(teacher_run, tmp_path_factory):
    """A random SAE (biased so some tokens get masked labels) carrying the teacher's meta."""
    teacher = load_teacher(str(teacher_run))
    torch.manual_seed(0)
    sae = TopKSAE(teacher.d_model, 64, 4, {"teacher": teacher.describe(), "layer": LAYER,
                                            "tokenizer_fingerprint": teacher.tokenizer.fingerprint()})
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5)
    return save_sae(sae, tmp_path_factory.mktemp("sae") / "sae")


@pytest.fixture(scope="module")
def cache(teacher_run, sae_dir, small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cache") / "labels"
    build_label_cache(small_data, load_teacher(str(teacher_run)), load_sae(sae_dir), out, seq_len=SEQ, layer=LAYER,
                      batch_size=5, progress=False)
    return out


def run_cfg(teacher_run, sae_dir, data, cache="", **concepts):
    return make_config(base={"model": dict(TINY_MODEL), "data": {"path": str(data), "seq_len": SEQ},
                             "teacher": {"path": str(teacher_run)},
                             "concepts": {"sae": str(sae_dir), "labels": str(cache), "layer": LAYER, **concepts}})


def test_cache_equals_on_the_fly_labels_by_window_id(teacher_run, sae_dir, small_data, cache):
    m = json.loads((cache / "manifest.json").read_text())
    n = (len(TokenSplit(small_data, "train")) - 1) // SEQ
    assert m["labels"]["shape"] == [n, SEQ, 4] and m["n_windows"] == m["split_windows"] == n
    assert (cache / "labels.bin").stat().st_size == n * SEQ * 4 * 4
    cfg = run_cfg(teacher_run, sae_dir, small_data, cache)
    cached = label_source(cfg, "cpu")
    assert isinstance(cached, CachedLabels)
    fly = OnTheFlyLabels(run_cfg(teacher_run, sae_dir, small_data), "cpu")
    loader = WindowLoader(TokenSplit(small_data, "train"), SEQ, 4, seed=3)
    for _ in range(2):  # shuffled windows, looked up by the loader's ids
        x, _, windows = loader.next_batch_windows()
        got = cached.labels(x, windows)
        assert got.dtype == torch.int64 and got.shape == (4, SEQ, 4)
        assert torch.equal(got, fly.labels(x, windows))
    x, _ = next(iter_eval_windows(TokenSplit(small_data, "train"), SEQ, 8))
    want = fly.labels(x, np.arange(8))
    assert torch.equal(cached.labels(x, np.arange(8)), want)
    assert (want[:, -1] == -1).all() and (want[:, :-1] >= 0).any() and (want[:, :-1] == -1).any()


@pytest.mark.parametrize("change, message", [
    ({"data": {"seq_len": 16}}, "seq_len"),
    ({"concepts": {"k_attr": 3}}, "k_attr"),
    ({"concepts": {"select": "activation"}}, "select"),
    ({"concepts": {"layer": 0}}, "teacher layer"),
    ({"data": {"path": "BYTE_WIKI"}}, "data manifest"),
])
def test_cache_refuses_another_run(teacher_run, sae_dir, small_data, byte_wiki, cache, change, message):
    cfg = run_cfg(teacher_run, sae_dir, small_data, cache)
    for section, values in change.items():
        for key, value in values.items():
            setattr(getattr(cfg, section), key, str(byte_wiki) if value == "BYTE_WIKI" else value)
    with pytest.raises(LatentLMError, match=message) as e:
        label_source(cfg, "cpu")
    assert "latentlm concepts label" in str(e.value) and "\n" not in str(e.value)


def test_cache_refuses_another_sae_and_out_of_range_windows(teacher_run, sae_dir, small_data, cache, tmp_path):
    other = TopKSAE(32, 64, 4, load_sae(sae_dir).meta)
    assert sae_fingerprint(other) != sae_fingerprint(load_sae(sae_dir))
    with pytest.raises(LatentLMError, match="another SAE"):
        CachedLabels(cache, run_cfg(teacher_run, save_sae(other, tmp_path / "other"), small_data), small_data, SEQ)
    cached = CachedLabels(cache, run_cfg(teacher_run, sae_dir, small_data), small_data, SEQ, verify="sha256")
    with pytest.raises(LatentLMError, match="outside"):
        cached.labels(torch.zeros(1, SEQ, dtype=torch.long), np.array([cached.n_windows]))


def test_build_is_atomic(teacher_run, sae_dir, small_data, cache, monkeypatch):
    before = (cache / "labels.bin").read_bytes()
    calls = []

    def failing(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return real(*args, **kw)

    real = labels_mod.concept_labels
    monkeypatch.setattr(labels_mod, "concept_labels", failing)
    for out in (cache, cache.parent / "fresh"):  # replacing an existing cache, and a new one
        calls.clear()
        with pytest.raises(RuntimeError, match="boom"):
            build_label_cache(small_data, load_teacher(str(teacher_run)), load_sae(sae_dir), out, seq_len=SEQ,
                              layer=LAYER, batch_size=2, progress=False)
    assert sorted(p.name for p in cache.parent.iterdir()) == ["labels"]  # no partial or temporary directory
    assert (cache / "labels.bin").read_bytes() == before


def test_cli_sae_train_and_concepts_label(teacher_run, byte_wiki, tmp_path, capsys):
    sae, out = tmp_path / "sae", tmp_path / "cache"
    assert main(["sae", "train", "--teacher", str(teacher_run), "--layer", str(LAYER), "--data", str(byte_wiki),
                 "--out", str(sae), "--latents", "64", "--k", "4", "--steps", "50", "--batch-tokens", "256",
                 "--seq-len", str(SEQ), "--lr", "3e-3", "--eval-tokens", "2048", "--quiet"]) == 0
    printed = capsys.readouterr().out
    fvu = float(re.search(r"val fvu ([0-9.]+)", printed).group(1))
    assert 0 < fvu < 1
    loaded = load_sae(sae)
    teacher = load_teacher(str(teacher_run))
    assert (loaded.n_latents, loaded.k, loaded.meta["layer"]) == (64, 4, LAYER)
    assert loaded.meta["teacher"]["fingerprint"] == teacher.fingerprint
    assert json.loads((sae / "metrics.json").read_text())["val"]["fvu"] == pytest.approx(fvu, abs=1e-4)

    assert main(["concepts", "label", "--teacher", str(teacher_run), "--sae", str(sae), "--data", str(byte_wiki),
                 "--out", str(out), "--seq-len", str(SEQ), "--k-attr", "3", "--limit-windows", "6", "--quiet"]) == 0
    m = json.loads((out / "manifest.json").read_text())
    assert m["labels"]["shape"] == [6, SEQ, 3] and m["layer"] == LAYER and (m["k_attr"], m["acts"]) == (3, "post")
    assert m["teacher"]["fingerprint"] == teacher.fingerprint and m["sae"]["fingerprint"] == sae_fingerprint(loaded)
    assert m["data"]["split"] == "train" and m["seq_len"] == SEQ and m["split_windows"] > 6
    capsys.readouterr()

    base = ["concepts", "label", "--sae", str(sae), "--data", str(byte_wiki), "--out", str(tmp_path / "bad"),
            "--seq-len", str(SEQ), "--quiet"]
    for extra, message in ((["--teacher", str(teacher_run), "--layer", "0"], "layer"),
                           (["--teacher", str(tmp_path / "missing")], "cannot load teacher")):
        assert main([*base, *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1
    assert not (tmp_path / "bad").exists()


def test_cli_sae_train_needs_the_teachers_tokenizer(teacher_run, tmp_path, capsys):
    data = tmp_path / "gpt2"
    prepare("wiki", load_tokenizer("gpt2"), data, val_fraction=0.2, limit=4, workers=1, progress=False)
    assert main(["sae", "train", "--teacher", str(teacher_run), "--layer", "0", "--data", str(data),
                 "--out", str(tmp_path / "sae"), "--steps", "1", "--quiet"]) == 2
    assert "different tokenizer" in capsys.readouterr().err
