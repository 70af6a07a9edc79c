"""TopK SAE: normalisation, encode/decode, training (FVU, unit-norm decoder, AuxK), disk formats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import latentlm.concepts.sae as sae_mod
from latentlm.concepts.sae import (
    TopKSAE,
    check_sae_matches,
    evaluate_sae,
    load_sae,
    sae_from_openai_state_dict,
    save_sae,
    train_sae,
)
from latentlm.errors import LatentLMError
from latentlm.fileio import sha256_file


pytestmark = pytest.mark.usefixtures("one_thread")


def sparse_data(n: int, seed: int, d: int = 32, atoms: int = 48, active: int = 3,
                scale_offset: bool = True) -> torch.Tensor:
    """Tokens that are exactly ``active``-sparse (positive coefficients) in a fixed random dictionary,
    optionally with a random per-token scale and constant offset that normalisation removes."""
    g = torch.Generator().manual_seed(1234)
    dictionary = torch.randn(atoms, d, generator=g)
    dictionary /= dictionary.norm(dim=1, keepdim=True)
    g = torch.Generator().manual_seed(seed)
    idx = torch.rand(n, atoms, generator=g).argsort(1)[:, :active]
    coef = torch.zeros(n, atoms).scatter(1, idx, torch.rand(n, active, generator=g) + 0.5)
    x = coef @ dictionary
    if scale_offset:
        x = x * (torch.rand(n, 1, generator=g) * 3 + 0.5) + torch.randn(n, 1, generator=g)
    return x


def random_sae(d_in: int = 16, n_latents: int = 40, k: int = 5, seed: int = 0, **meta) -> TopKSAE:
    torch.manual_seed(seed)
    sae = TopKSAE(d_in, n_latents, k, meta)
    with torch.no_grad():
        for p in sae.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return sae.eval()


def test_normalize_matches_formula() -> None:
    x = torch.randn(7, 16) * 3 + 2
    x_hat, mu, s = TopKSAE.normalize(x)
    want_mu = x.sum(-1, keepdim=True) / 16
    want_s = ((x - want_mu).pow(2).sum(-1, keepdim=True) / 15).sqrt()  # unbiased
    torch.testing.assert_close(mu, want_mu)
    torch.testing.assert_close(s, want_s)
    torch.testing.assert_close(x_hat, (x - want_mu) / (want_s + 1e-5))


def test_encode_keeps_k_nonnegative_and_forward_formula() -> None:
    sae = random_sae()
    x = torch.randn(50, 16) * 2 + 1
    x_hat, mu, s = sae.normalize(x)
    latents = sae.encode(x_hat)
    pre = (x_hat - sae.b_dec) @ sae.W_enc + sae.b_enc
    assert latents.shape == (50, 40)
    assert ((latents != 0).sum(-1) <= 5).all() and (latents >= 0).all()
    kth = pre.topk(5, dim=-1).values[:, -1:]
    torch.testing.assert_close(latents, torch.where(pre >= kth, pre.relu(), torch.zeros_like(pre)))
    # with a bias making every pre-activation positive, exactly k entries are non-zero
    with torch.no_grad():
        sae.b_enc.fill_(100.0)
    assert ((sae.encode(x_hat) > 0).sum(-1) == 5).all()
    rec, lat = sae(x)
    torch.testing.assert_close(rec, (lat @ sae.W_dec + sae.b_dec) * s + mu)


def test_training_recovers_sparse_dictionary_with_unit_norm_decoder() -> None:
    chunks = list(sparse_data(256 * 400, seed=1).split(1000))  # uneven chunk sizes on purpose
    sae, metrics = train_sae(chunks, 32, 64, 4, steps=400, lr=3e-3, batch_tokens=256, dead_tokens=4096,
                             progress=False, meta={"layer": 3})
    held_out = [sparse_data(4096, seed=7)]
    untrained = evaluate_sae(TopKSAE(32, 64, 4), held_out)
    trained = evaluate_sae(sae, held_out)
    assert trained["fvu"] < 0.1 and trained["fvu"] < untrained["fvu"] / 4
    assert metrics["fvu"] < 0.1 and metrics["steps"] == 400 and metrics["tokens"] == 400 * 256
    assert 0 < metrics["mean_active"] <= 4 and 0 <= metrics["dead_fraction"] < 1
    assert metrics["history"][-1]["step"] == 400 and len(metrics["history"]) == 100
    torch.testing.assert_close(sae.W_dec.norm(dim=1), torch.ones(64))
    assert not sae.training and sae.W_enc.device.type == "cpu" and sae.meta == {"layer": 3}


def test_training_stops_when_stream_ends_and_rejects_bad_input() -> None:
    sae, metrics = train_sae([sparse_data(300, seed=2)], 32, 16, 2, steps=50, batch_tokens=128, progress=False)
    assert metrics["steps"] == 3 and metrics["tokens"] == 300
    with pytest.raises(LatentLMError, match="no tokens"):
        train_sae([], 32, 16, 2, steps=5, progress=False)
    with pytest.raises(LatentLMError, match=r"\[N, 32\]"):
        train_sae([torch.randn(10, 31)], 32, 16, 2, steps=5, progress=False)
    with pytest.raises(LatentLMError, match="NaN"):
        train_sae([torch.full((10, 32), float("nan"))], 32, 16, 2, steps=5, progress=False)


def test_auxk_revives_latents_initialised_away_from_the_data(monkeypatch: pytest.MonkeyPatch) -> None:
    reset = TopKSAE.reset_parameters

    def crippled_init(self: TopKSAE) -> None:
        reset(self)  # then shrink half the encoder so those latents can never win the top-k
        with torch.no_grad():
            self.W_enc[:, self.n_latents // 2:] *= 1e-3

    monkeypatch.setattr(sae_mod.TopKSAE, "reset_parameters", crippled_init)
    chunks = list(sparse_data(128 * 300, seed=3, atoms=64, active=2, scale_offset=False).split(512))
    held_out = [sparse_data(4096, seed=8, atoms=64, active=2, scale_offset=False)]
    dead = {}
    for coef in (0.0, 1 / 32):
        sae, _ = train_sae(chunks, 32, 64, 2, steps=300, lr=3e-3, batch_tokens=128, dead_tokens=512,
                           aux_coef=coef, progress=False)
        dead[coef] = evaluate_sae(sae, held_out)["dead_fraction"]
    assert dead[0.0] >= 0.45  # without AuxK the shrunk half never fires
    assert dead[1 / 32] < dead[0.0] / 2


def test_save_load_round_trip(tmp_path: Path) -> None:
    meta = {"teacher": {"name": "t", "fingerprint": "abc"}, "layer": 2, "tokenizer_fingerprint": "tok"}
    sae = random_sae(**meta)
    out = save_sae(sae, tmp_path / "sae")
    assert sorted(p.name for p in out.iterdir()) == ["cfg.json", "manifest.json", "sae_weights.safetensors"]
    cfg = json.loads((out / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["activation_fn_str"] == "topk"
    assert (cfg["d_in"], cfg["d_sae"], cfg["k"]) == (16, 40, 5)
    assert cfg["latentlm"] == meta and cfg["latentlm_normalization"] == "per-token mean/std (docs/METHODS.md §2.1)"
    weights = load_file(str(out / "sae_weights.safetensors"))
    assert {k: tuple(v.shape) for k, v in weights.items()} == {
        "W_enc": (16, 40), "b_enc": (40,), "W_dec": (40, 16), "b_dec": (16,)}
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["format_version"] == 1
    assert manifest["files"]["sae_weights.safetensors"]["sha256"] == sha256_file(out / "sae_weights.safetensors")
    loaded = load_sae(out)
    for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
        assert torch.equal(getattr(loaded, name), getattr(sae, name))
    assert loaded.k == 5 and loaded.meta == meta
    save_sae(random_sae(seed=1), out)  # replacing a saved SAE is allowed
    assert not torch.equal(load_sae(out).W_enc, sae.W_enc)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep")
    with pytest.raises(LatentLMError, match="not a saved SAE"):
        save_sae(sae, tmp_path / "other")


def _rewrite_cfg(out: Path, **changes) -> None:
    """Edit cfg.json and refresh its manifest checksum, so only the semantic checks can object."""
    cfg = json.loads((out / "cfg.json").read_text())
    (out / "cfg.json").write_text(json.dumps({**cfg, **changes}))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"]["cfg.json"]["sha256"] = sha256_file(out / "cfg.json")
    (out / "manifest.json").write_text(json.dumps(manifest))


def test_load_rejects_bad_directories(tmp_path: Path) -> None:
    sae = random_sae()
    with pytest.raises(LatentLMError, match="does not exist"):
        load_sae(tmp_path / "nothing")

    out = save_sae(sae, tmp_path / "corrupt")
    data = bytearray((out / "sae_weights.safetensors").read_bytes())
    data[-3] ^= 0xFF
    (out / "sae_weights.safetensors").write_bytes(bytes(data))
    with pytest.raises(LatentLMError, match="sha256"):
        load_sae(out)

    out = save_sae(sae, tmp_path / "missing")
    (out / "cfg.json").unlink()
    with pytest.raises(LatentLMError, match="no cfg.json"):
        load_sae(out)

    out = save_sae(sae, tmp_path / "arch")
    _rewrite_cfg(out, architecture="standard")
    with pytest.raises(LatentLMError, match="architecture 'standard'"):
        load_sae(out)

    out = save_sae(sae, tmp_path / "shape")
    _rewrite_cfg(out, d_sae=41)
    with pytest.raises(LatentLMError, match="shape"):
        load_sae(out)

    out = save_sae(sae, tmp_path / "k")
    with pytest.raises(LatentLMError, match="k=5"):
        load_sae(out, k=3)


def test_openai_state_dict_matches_direct_sae(tmp_path: Path) -> None:
    sae = random_sae(d_in=16, n_latents=40, k=5)
    state = {"pre_bias": sae.b_dec.detach().clone(), "encoder.weight": sae.W_enc.detach().t().contiguous(),
             "latent_bias": sae.b_enc.detach().clone(), "decoder.weight": sae.W_dec.detach().t().contiguous(),
             "stats_last_nonzero": torch.zeros(40, dtype=torch.long)}
    save_file(state, str(tmp_path / "ae.safetensors"))
    torch.save(state, tmp_path / "ae.pt")
    x = torch.randn(30, 16) * 4 - 1
    x_hat = sae.normalize(x)[0]
    for loaded in (sae_from_openai_state_dict(state, 5), load_sae(tmp_path / "ae.safetensors", k=5),
                   load_sae(tmp_path / "ae.pt", k=5)):
        assert loaded.meta == {} and loaded.k == 5
        assert torch.equal(loaded.encode(x_hat), sae.encode(x_hat))
        lat = sae.encode(x_hat)
        assert torch.equal(loaded.decode(lat), sae.decode(lat))
        torch.testing.assert_close(loaded(x)[0], sae(x)[0])
    with pytest.raises(LatentLMError, match="pass k"):
        load_sae(tmp_path / "ae.pt")
    with pytest.raises(LatentLMError, match="latent_bias"):
        sae_from_openai_state_dict({k: v for k, v in state.items() if k != "latent_bias"}, 5)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(LatentLMError, match="cannot read"):
        load_sae(tmp_path / "bad.pt", k=5)


def test_check_sae_matches() -> None:
    teacher = {"name": "gpt2-small", "path": "/runs/teacher", "fingerprint": "f00d"}
    sae = random_sae(teacher=teacher, layer=4, tokenizer_fingerprint="tok1")
    check_sae_matches(sae, dict(teacher), 4, "tok1")
    check_sae_matches(sae, dict(teacher), 4, None)
    with pytest.raises(LatentLMError, match="teacher fingerprint"):
        check_sae_matches(sae, {**teacher, "fingerprint": "beef"}, 4, "tok1")
    with pytest.raises(LatentLMError, match="layer 4, not 5"):
        check_sae_matches(sae, teacher, 5, "tok1")
    with pytest.raises(LatentLMError, match="tokenizer tok1"):
        check_sae_matches(sae, teacher, 4, "tok2")
    by_path = random_sae(teacher={"path": "/runs/teacher"})
    with pytest.raises(LatentLMError, match="teacher path"):
        check_sae_matches(by_path, {"path": "/runs/other"}, 0, None)
    with pytest.raises(LatentLMError, match="cannot tell"):
        check_sae_matches(by_path, {"name": "x"}, 0, None)
    check_sae_matches(random_sae(), {"name": "anything"}, 9, "tok9")  # no meta: nothing to check


def test_loading_an_sae_leaves_the_seeded_stream_alone(tmp_path):
    """A student built after reading its SAE (CoCoMix sizes its head from it) must start from the same
    weights as one built without: loading never draws from the global RNG."""
    torch.manual_seed(0)
    save_sae(TopKSAE(8, 16, 2), tmp_path / "sae")
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    load_sae(tmp_path / "sae")
    assert torch.equal(torch.rand(3), expected)
