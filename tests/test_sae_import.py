"""Third-party TopK SAEs load directly (docs/COCOMIX.md, "Sparse autoencoder"): SAE-Lens directories
without our manifest (the layout of the public copies of OpenAI's GPT-2 SAEs, cfg.json +
sae_weights.safetensors) and OpenAI ``sparse_autoencoder`` .pt state dicts, with k and the activation
read from the files; what is not a TopK SAE is refused in one line. Files are built by hand here, and
every loaded SAE is checked against the formulas of its own format written out in plain torch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from latentlm.concepts.sae import load_sae, save_sae
from latentlm.config import make_config
from latentlm.errors import LatentLMError
from latentlm.methods import build_method

D, C, K = 16, 48, 5


def weights(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"W_enc": torch.randn(D, C, generator=g), "b_enc": torch.randn(C, generator=g) * 0.3,
            "W_dec": torch.randn(C, D, generator=g) / 4, "b_dec": torch.randn(D, generator=g) * 0.2}


def sae_lens_dir(root: Path, name: str, cfg: dict, state: dict[str, torch.Tensor] | None = None) -> Path:
    """A SAE-Lens directory as the library writes it: cfg.json and sae_weights.safetensors, no manifest."""
    out = root / name
    out.mkdir()
    (out / "cfg.json").write_text(json.dumps(cfg))
    save_file(state if state is not None else weights(), str(out / "sae_weights.safetensors"))
    return out


# cfg.json of the public SAE-Lens copies of OpenAI's v5 32k GPT-2 SAEs (pre-6.0 keys) and of SAE-Lens >= 6.
OLD_CFG = {"architecture": "standard", "d_in": D, "d_sae": C, "activation_fn_str": "topk",
           "activation_fn_kwargs": {"k": K}, "apply_b_dec_to_input": True, "normalize_activations": "layer_norm",
           "hook_point": "blocks.5.hook_resid_post", "model_name": "gpt2-small", "dtype": "float32"}
NEW_CFG = {"architecture": "topk", "d_in": D, "d_sae": C, "k": K, "apply_b_dec_to_input": True,
           "normalize_activations": "layer_norm", "dtype": "float32",
           "metadata": {"hook_name": "blocks.6.hook_resid_pre", "model_name": "gpt2-small"}}


def reference_encode(x: torch.Tensor, w: dict[str, torch.Tensor], k: int, b_dec_in: bool = True) -> torch.Tensor:
    """SAE-Lens' TopK SAE with layer_norm inputs, by its equations: x' = (x - mean) / (std + 1e-5) (std
    unbiased), pre = (x' - b_dec) W_enc + b_enc (no b_dec when apply_b_dec_to_input is false), ReLU of the
    k largest."""
    mu = x.mean(-1, keepdim=True)
    std = ((x - mu).pow(2).sum(-1, keepdim=True) / (x.shape[-1] - 1)).sqrt()
    xn = (x - mu) / (std + 1e-5)
    pre = ((xn - w["b_dec"]) if b_dec_in else xn) @ w["W_enc"] + w["b_enc"]
    v, i = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, i, v.relu())


def test_sae_lens_directories_load_with_k_from_cfg(tmp_path):
    x = torch.randn(20, D) * 3 + 1
    for name, cfg, layer in (("old", OLD_CFG, 5), ("new", NEW_CFG, 5)):  # resid_pre of block 6 = after block 5
        sae = load_sae(sae_lens_dir(tmp_path, name, cfg))
        assert (sae.d_in, sae.n_latents, sae.k) == (D, C, K) and sae.meta["layer"] == layer
        assert sae.meta["imported"]["format"] == "sae-lens"
        x_hat = sae.normalize(x)[0]
        torch.testing.assert_close(sae.encode(x_hat), reference_encode(x, weights(), K))
    with pytest.raises(LatentLMError, match=r"has k=5 in its cfg.json, not k=3"):
        load_sae(tmp_path / "old", k=3)
    assert load_sae(tmp_path / "old", k=K).k == K


def test_sae_lens_without_b_dec_on_the_input_is_folded_exactly(tmp_path):
    w = weights(1)
    sae = load_sae(sae_lens_dir(tmp_path, "nob", {**NEW_CFG, "apply_b_dec_to_input": False}, w))
    x = torch.randn(20, D, dtype=torch.float64)
    got = sae.double().encode(sae.normalize(x)[0])
    ref = reference_encode(x, {n: t.double() for n, t in w.items()}, K, b_dec_in=False)
    torch.testing.assert_close(got, ref)


def test_a_scaling_factor_of_ones_is_ignored_and_other_extras_are_refused(tmp_path):
    ones = {**weights(), "scaling_factor": torch.ones(C)}
    assert load_sae(sae_lens_dir(tmp_path, "ones", NEW_CFG, ones)).k == K
    with pytest.raises(LatentLMError, match=r"holds .*threshold.*exactly W_enc, b_enc, W_dec, b_dec"):
        load_sae(sae_lens_dir(tmp_path, "extra", NEW_CFG, {**weights(), "threshold": torch.ones(C)}))


@pytest.mark.parametrize("change,message", [
    ({"architecture": "standard", "activation_fn_str": "relu"}, r"is not a TopK SAE \(architecture 'standard', "
                                                                 r"activation 'relu'"),
    ({"architecture": "jumprelu"}, r"is not a TopK SAE \(architecture 'jumprelu'"),
    ({"activation_fn_kwargs": {}}, r"gives no valid k"),
    ({"normalize_activations": "none"}, r"normalizes its inputs with 'none'"),
    ({"hook_point": "blocks.5.hook_mlp_out"}, r"reads 'blocks.5.hook_mlp_out'"),
    ({"rescale_acts_by_decoder_norm": True}, r"rescale_acts_by_decoder_norm"),
    ({"d_sae": C + 1}, r"do not belong together"),
])
def test_sae_lens_refusals_are_one_line(tmp_path, change, message):
    with pytest.raises(LatentLMError, match=message) as e:
        load_sae(sae_lens_dir(tmp_path, "bad", {**OLD_CFG, **change}))
    assert "\n" not in str(e.value)


def test_a_directory_with_neither_layout_says_so(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(LatentLMError, match="neither latentlm's manifest.json nor SAE-Lens' cfg.json"):
        load_sae(tmp_path / "empty")


def openai_state(activation: str | None = "TopK", k: int | None = K, post: str = "ReLU") -> dict:
    """``Autoencoder.state_dict()`` of openai/sparse_autoencoder: tensors plus the activation's class name
    and state (TopK records k and its post-activation)."""
    w = weights(2)
    state = {"pre_bias": w["b_dec"], "encoder.weight": w["W_enc"].t().contiguous(), "latent_bias": w["b_enc"],
             "decoder.weight": w["W_dec"].t().contiguous(), "stats_last_nonzero": torch.zeros(C, dtype=torch.long)}
    if activation is not None:
        state["activation"] = activation
        state["activation_state_dict"] = {} if k is None else {"k": k, "postact_fn": post}
    return state


def openai_reference(x: torch.Tensor, state: dict, k: int) -> torch.Tensor:
    """OpenAI's TopK autoencoder: LN(x), encoder(x - pre_bias) + latent_bias, ReLU of the top k."""
    mu = x.mean(-1, keepdim=True)
    std = (x - mu).std(-1, keepdim=True)
    pre = ((x - mu) / (std + 1e-5) - state["pre_bias"]) @ state["encoder.weight"].t() + state["latent_bias"]
    v, i = pre.topk(k, dim=-1)
    return torch.zeros_like(pre).scatter(-1, i, v.relu())


def test_openai_pt_files_record_k_and_their_activation(tmp_path):
    torch.save(openai_state(), tmp_path / "topk.pt")
    sae = load_sae(tmp_path / "topk.pt")  # no k argument: the file records it
    x = torch.randn(20, D) * 2
    assert sae.k == K
    torch.testing.assert_close(sae.encode(sae.normalize(x)[0]), openai_reference(x, openai_state(), K))
    with pytest.raises(LatentLMError, match=r"records k=5, not k=7"):
        load_sae(tmp_path / "topk.pt", k=7)
    for name, state, message in (("relu", openai_state("ReLU", None), r"activation 'ReLU', not 'TopK'"),
                                 ("identity", openai_state(post="Identity"), r"applies 'Identity' after its TopK"),
                                 ("nok", openai_state(k=None), r"records no k"),
                                 ("bare", openai_state(None), r"records no activation \(only tensors\); pass k")):
        torch.save(state, tmp_path / f"{name}.pt")
        with pytest.raises(LatentLMError, match=message) as e:
            load_sae(tmp_path / f"{name}.pt")
        assert "\n" not in str(e.value)
    assert load_sae(tmp_path / "bare.pt", k=K).k == K  # tensors alone: the caller vouches for TopK, as before


def test_a_student_sizes_its_head_from_an_imported_sae(tmp_path):
    """`--concepts.sae` may name a SAE-Lens directory or an OpenAI .pt file: C and k come from it."""
    torch.save(openai_state(), tmp_path / "topk.pt")
    for path in (sae_lens_dir(tmp_path, "lens", NEW_CFG), tmp_path / "topk.pt"):
        cfg = make_config(overrides=["--train.method", "cocomix", "--model.n_layer", "2", "--model.n_embd", "16",
                                     "--model.n_head", "2", "--model.vocab_size", "61", "--cocomix.insert_layer", "1",
                                     "--concepts.sae", str(path)])
        method = build_method(cfg)
        assert (cfg.cocomix.n_concepts, cfg.cocomix.k_concepts) == (C, K) == (method.n_concepts,
                                                                               method.concept_head.k_concepts)


def test_our_saved_sae_still_loads_through_its_manifest(tmp_path):
    """A latentlm SAE keeps the strict path (sha256s), also when it is read after an import."""
    imported = load_sae(sae_lens_dir(tmp_path, "lens", NEW_CFG))
    out = save_sae(imported, tmp_path / "ours")
    again = load_sae(out)
    assert again.meta == imported.meta and torch.equal(again.W_enc, imported.W_enc)
    (out / "sae_weights.safetensors").write_bytes((out / "sae_weights.safetensors").read_bytes()[:-1] + b"\0")
    with pytest.raises(LatentLMError, match="sha256"):
        load_sae(out)
