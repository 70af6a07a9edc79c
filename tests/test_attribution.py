"""Attribution scores and concept labels (docs/METHODS.md §2.1) on a tiny random teacher and SAE."""

from __future__ import annotations

import pytest
import torch

import latentlm.concepts.attribution as attribution
from latentlm.concepts.attribution import active_attribution_scores, attribution_scores, concept_labels
from latentlm.concepts.sae import TopKSAE
from latentlm.concepts.teacher import LatentLMTeacher
from latentlm.config import make_config
from latentlm.data.tokenizers import ByteTokenizer
from latentlm.errors import LatentLMError
from latentlm.model.transformer import Transformer

D, C, K, LAYER = 32, 64, 6, 0


@pytest.fixture(scope="module")
def setup():
    over = ["--model.arch", "llama", "--model.n_layer", "2", "--model.n_embd", str(D), "--model.n_head", "2",
            "--model.block_size", "32", "--model.vocab_size", "257"]
    torch.manual_seed(0)
    teacher = LatentLMTeacher.from_model(Transformer(make_config(overrides=over).model), ByteTokenizer())
    sae = TopKSAE(D, C, K)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.5)  # some tokens end up with non-positive TopK activations
    idx = torch.randint(0, 257, (2, 12))
    return teacher, sae, idx


def reference_labels(scores: torch.Tensor, k_attr: int) -> torch.Tensor:
    """Per token, by hand: indices of the largest strictly positive scores, -1 fillers, last position -1."""
    B, T, _ = scores.shape
    out = torch.full((B, T, k_attr), -1, dtype=torch.long)
    for b in range(B):
        for t in range(T - 1):
            ranked = sorted(range(scores.shape[-1]), key=lambda i: -scores[b, t, i].item())
            pos = [i for i in ranked if scores[b, t, i] > 0][:k_attr]
            out[b, t, :len(pos)] = torch.tensor(pos, dtype=torch.long)
    return out


def test_attribution_scores_match_direct_computation():
    torch.manual_seed(0)
    g, acts, W_dec = torch.randn(2, 3, 4), torch.randn(2, 3, 5), torch.randn(5, 4)
    s = attribution_scores(g, acts, W_dec)
    assert s.shape == (2, 3, 5)
    for b in range(2):
        for t in range(3):
            for i in range(5):
                direct = sum(g[b, t, j] * W_dec[i, j] for j in range(4)) * acts[b, t, i]
                assert abs(s[b, t, i] - direct) < 1e-5


def test_active_scores_equal_dense_formula(setup):
    teacher, sae, idx = setup
    h, g = teacher.hidden_and_grad(idx, LAYER)
    x_hat = sae.normalize(h)[0]
    with torch.no_grad():
        vals, ids = sae.topk(sae.pre_activations(x_hat))
        dense = attribution_scores(g, sae.encode(x_hat), sae.W_dec)
        active = active_attribution_scores(g, vals, ids, sae.W_dec)
    torch.testing.assert_close(active, dense.gather(-1, ids), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(torch.zeros_like(dense).scatter_(-1, ids, active), dense, rtol=1e-5, atol=1e-7)
    for b, t, n in [(0, 0, 0), (1, 5, 3)]:  # one active concept by hand: (g . W_dec[i]) * act_i
        i = ids[b, t, n]
        assert abs(active[b, t, n] - (g[b, t] @ sae.W_dec[i]) * vals[b, t, n]) < 1e-5


@pytest.mark.parametrize("k_attr", [4, 8])  # 8 > k: the SAE's 6 active concepts cannot fill every slot
def test_labels_top_signed_post(setup, k_attr):
    teacher, sae, idx = setup
    labels = concept_labels(teacher, sae, idx, LAYER, k_attr=k_attr)
    assert labels.dtype == torch.long and labels.shape == (2, 12, k_attr)
    h, g = teacher.hidden_and_grad(idx, LAYER)
    with torch.no_grad():
        scores = attribution_scores(g, sae.encode(sae.normalize(h)[0]), sae.W_dec)
    assert torch.equal(labels, reference_labels(scores, k_attr))
    assert (labels[:, -1] == -1).all()
    masked, kept = (labels[:, :-1] == -1).sum(), (labels[:, :-1] >= 0).sum()
    assert masked > 0 and kept > 0  # negative attributions really are masked, positive ones kept
    if k_attr > K:
        assert (labels[..., K:] == -1).all()
    kept_scores = scores.gather(-1, labels.clamp(min=0))[labels >= 0]
    assert (kept_scores > 0).all()


def test_labels_pre_activations(setup):
    teacher, sae, idx = setup
    labels = concept_labels(teacher, sae, idx, LAYER, k_attr=4, acts="pre")
    h, g = teacher.hidden_and_grad(idx, LAYER)
    with torch.no_grad():
        scores = attribution_scores(g, sae.pre_activations(sae.normalize(h)[0]), sae.W_dec)
    assert torch.equal(labels, reference_labels(scores, 4))


def test_labels_activation_selection(setup):
    teacher, sae, idx = setup
    labels = concept_labels(teacher, sae, idx, LAYER, k_attr=4, select="activation")
    with torch.no_grad():
        latents = sae.encode(sae.normalize(teacher.hidden(idx, LAYER))[0])
    assert torch.equal(labels, reference_labels(latents, 4))
    assert not torch.equal(labels, concept_labels(teacher, sae, idx, LAYER, k_attr=4))


@pytest.mark.parametrize("acts", ["post", "pre"])
def test_labels_do_not_depend_on_token_chunking(setup, acts, monkeypatch):
    teacher, sae, idx = setup
    whole = concept_labels(teacher, sae, idx, LAYER, acts=acts)
    monkeypatch.setattr(attribution, "CHUNK_ELEMENTS", 5 * C)  # 5 tokens per chunk, last one partial
    assert torch.equal(concept_labels(teacher, sae, idx, LAYER, acts=acts), whole)


def test_label_option_errors(setup):
    teacher, sae, idx = setup
    with pytest.raises(LatentLMError, match="acts"):
        concept_labels(teacher, sae, idx, LAYER, acts="dense")
    with pytest.raises(LatentLMError, match="selection"):
        concept_labels(teacher, sae, idx, LAYER, select="random")
    with pytest.raises(LatentLMError, match="k_attr"):
        concept_labels(teacher, sae, idx, LAYER, k_attr=0)
