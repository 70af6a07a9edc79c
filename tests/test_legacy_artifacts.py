"""Artifacts written by older latentlm (tests/fixtures/legacy/, built by tests/fixtures/make_legacy.py
from commit b2a0ef8) still load: prepared data, the SAE and its contexts, the label cache and ntp,
ponder and cocomix checkpoints, whose logits must equal the ones recorded when they were written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from latentlm.concepts.inspect import load_contexts
from latentlm.concepts.labels import CachedLabels, sae_fingerprint
from latentlm.concepts.sae import load_sae
from latentlm.concepts.teacher import load_teacher
from latentlm.config import make_config
from latentlm.data.loader import TokenSplit
from latentlm.data.prepare import load_manifest
from latentlm.data.sources import iter_documents
from latentlm.errors import LatentLMError

try:
    from latentlm.loading import load_method
except ImportError:
    from latentlm.train.checkpoint import load_method

pytestmark = pytest.mark.usefixtures("one_thread")

FIXTURES = Path(__file__).parent / "fixtures" / "legacy"
SEQ, K_ATTR, LATENTS = 32, 2, 16


@pytest.fixture(scope="module")
def legacy(tmp_path_factory) -> Path:
    """A copy of the fixtures (paths recorded inside them point at tests/fixtures/legacy/; every
    test passes the copy's paths explicitly)."""
    root = tmp_path_factory.mktemp("legacy") / "legacy"
    shutil.copytree(FIXTURES, root)
    return root


def manifest_of(path: Path) -> dict:
    return json.loads((path / "manifest.json").read_text())


def label_config(legacy: Path, k_attr: int = K_ATTR):
    """A run config naming the copied teacher, SAE and label cache."""
    return make_config(overrides=["--data.path", str(legacy / "data"), "--data.seq_len", str(SEQ),
                                  "--teacher.path", str(legacy / "ntp"), "--concepts.sae", str(legacy / "sae"),
                                  "--concepts.labels", str(legacy / "labels"), "--concepts.layer", "0",
                                  "--concepts.k_attr", str(k_attr)])


@torch.no_grad()
def prefill_logits(method, ids: torch.Tensor) -> torch.Tensor:
    """Next-token logits [1, T, V] at every position of ``ids``, through the generation API (as
    make_legacy.py recorded them)."""
    cache = method.new_cache(ids.shape[0], ids.shape[1])
    positions = torch.arange(ids.shape[1])[None]
    return method.step(ids, positions, torch.ones_like(ids, dtype=torch.bool), cache).float()


def test_fixtures_are_the_old_layout_and_tiny():
    assert "format_version" not in manifest_of(FIXTURES / "ntp" / "checkpoints" / "step_00000003")
    assert manifest_of(FIXTURES / "ntp" / "checkpoints" / "step_00000003")["format"] == 1
    assert sum(p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file()) < 1024 * 1024


def test_prepared_data(legacy):
    data = legacy / "data"
    manifest = load_manifest(data, verify="sha256")
    assert manifest["tokenizer"]["name"] == "byte" and manifest["dtype"] == "uint16"
    train, val = TokenSplit(data, "train", verify="sha256"), TokenSplit(data, "val")
    assert (len(train), len(val)) == (manifest["splits"]["train"]["tokens"], manifest["splits"]["val"]["tokens"])
    first = next(iter_documents("wiki", limit=1)).encode("utf-8")  # document 0 always goes to train
    assert train.get(0, len(first) + 1).tolist() == [*first, 256]


def test_sae_and_contexts(legacy):
    sae = load_sae(legacy / "sae")
    assert (sae.d_in, sae.n_latents, sae.k) == (16, LATENTS, 2) and sae.meta["layer"] == 0
    recorded = manifest_of(legacy / "labels")["sae"]["fingerprint"]
    assert sae_fingerprint(sae) == recorded  # the weights read back bit for bit
    contexts = load_contexts(legacy / "sae")
    assert contexts["meta"]["sae"]["fingerprint"] == recorded and contexts["meta"]["sae"]["n_latents"] == LATENTS
    assert contexts["concepts"] and all(c["top"] and "[[" in c["description"] for c in contexts["concepts"].values())


def test_label_cache(legacy):
    teacher = load_teacher(str(legacy / "ntp"))
    assert teacher.fingerprint == manifest_of(legacy / "labels")["teacher"]["fingerprint"]
    cached = CachedLabels(legacy / "labels", label_config(legacy), legacy / "data", SEQ, verify="sha256")
    raw = np.fromfile(legacy / "labels" / "labels.bin", dtype="<i4").reshape(cached.n_windows, SEQ, K_ATTR)
    windows = np.array([0, cached.n_windows - 1, 1])
    got = cached.labels(torch.zeros(len(windows), SEQ, dtype=torch.long), windows)
    assert got.dtype == torch.int64 and torch.equal(got, torch.from_numpy(raw[windows]).long())
    assert int(got.min()) >= -1 and int(got.max()) < LATENTS and (got == -1).any()
    with pytest.raises(LatentLMError, match="k_attr") as e:
        CachedLabels(legacy / "labels", label_config(legacy, k_attr=3), legacy / "data", SEQ)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", ["ntp", "ponder", "cocomix"])
def test_checkpoint_logits(legacy, name):
    recorded = load_file(str(legacy / "logits.safetensors"))
    method, cfg, manifest = load_method(legacy / name)
    assert manifest["method"] == name and manifest["step"] == 3 and manifest["tokenizer"]["name"] == "byte"
    logits = prefill_logits(method, recorded["input"])
    assert logits.shape == recorded[name].shape == (1, recorded["input"].shape[1], 257)
    torch.testing.assert_close(logits, recorded[name], atol=1e-5, rtol=1e-5)
