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


@pytest.mark.parametrize("batch, world, batches", [(4, 1, 3), (2, 2, 5), (3, 1, 200)])
def test_upcoming_windows_are_the_windows_the_loader_hands_out(small_data, batch, world, batches):
    """Every rank's windows of the next N batches, across epoch boundaries too (200 x 3 > the split's
    windows), from a loader's current position, without moving it."""
    split = TokenSplit(small_data, "train")
    loaders = [WindowLoader(split, SEQ, batch, seed=5, rank=r, world_size=world) for r in range(world)]
    for loader in loaders:
        loader.next_batch_windows()  # from a position that is not the start
    before = loaders[0].state_dict()
    ahead = loaders[0].upcoming_windows(batches)
    assert loaders[0].state_dict() == before  # it moved nothing
    got = [w for _ in range(batches) for loader in loaders for w in loader.next_batch_windows()[2]]
    assert ahead.tolist() == got and len(got) == batches * batch * world
    assert loaders[0].epoch >= 1 or batches < 200  # the long case crossed epochs
    assert loaders[0].upcoming_windows(0).tolist() == []


def test_a_cache_of_some_windows_holds_their_labels_and_refuses_the_others(teacher_run, sae_dir, small_data, cache,
                                                                           tmp_path):
    """``windows=``: only those windows are labelled (format version 2, ``windows.bin``), each with the
    labels the whole-split cache has; a window outside is a one-line error naming the fix."""
    full = CachedLabels(cache, run_cfg(teacher_run, sae_dir, small_data), small_data, SEQ)
    some = np.array([7, 2, 5, 2, 11])
    out = tmp_path / "some"
    m = build_label_cache(small_data, load_teacher(str(teacher_run)), load_sae(sae_dir), out, seq_len=SEQ,
                          layer=LAYER, batch_size=2, windows=some, progress=False)
    assert m["format_version"] == 2 and m["n_windows"] == 4 and m["windows"]["count"] == 4
    assert np.fromfile(out / "windows.bin", dtype="<i8").tolist() == [2, 5, 7, 11]
    sub = label_source(run_cfg(teacher_run, sae_dir, small_data, out), "cpu")
    assert sub.covers(np.array([2, 3, 11])).tolist() == [True, False, True]
    assert full.covers(np.array([0, full.n_windows])).tolist() == [True, False]
    x = torch.zeros(3, SEQ, dtype=torch.long)
    assert torch.equal(sub.labels(x, np.array([11, 2, 7])), full.labels(x, np.array([11, 2, 7])))
    for missing in (3, 0, 12, -1):
        with pytest.raises(LatentLMError, match=f"window {missing} is not in label cache") as e:
            sub.labels(x, np.array([2, missing, 7]))
        assert "\n" not in str(e.value)
    with pytest.raises(LatentLMError, match="not both"):
        build_label_cache(small_data, load_teacher(str(teacher_run)), load_sae(sae_dir), tmp_path / "x", seq_len=SEQ,
                          layer=LAYER, windows=some, limit_windows=3, progress=False)
    for bad in ([], [full.n_windows], [-1]):
        with pytest.raises(LatentLMError, match="non-empty set of ids"):
            build_label_cache(small_data, load_teacher(str(teacher_run)), load_sae(sae_dir), tmp_path / "x",
                              seq_len=SEQ, layer=LAYER, windows=np.array(bad, dtype=np.int64), progress=False)
    (out / "windows.bin").write_bytes(np.array([5, 2, 7, 11], dtype="<i8").tobytes())  # damaged: not sorted
    with pytest.raises(LatentLMError, match="not sorted"):
        CachedLabels(out, run_cfg(teacher_run, sae_dir, small_data), small_data, SEQ)
    (out / "windows.bin").unlink()
    with pytest.raises(LatentLMError, match="missing"):
        CachedLabels(out, run_cfg(teacher_run, sae_dir, small_data), small_data, SEQ)


def test_a_format_1_cache_still_loads(teacher_run, sae_dir, small_data, cache, tmp_path):
    """Caches written before windows.bin existed (format version 1) label windows 0..n-1 and still load."""
    import shutil

    old = tmp_path / "old"
    shutil.copytree(cache, old)
    m = json.loads((old / "manifest.json").read_text())
    (old / "manifest.json").write_text(json.dumps({**m, "format_version": 1}))
    cached = CachedLabels(old, run_cfg(teacher_run, sae_dir, small_data), small_data, SEQ)
    assert cached.windows is None and cached.covers(np.array([0])).all()


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
