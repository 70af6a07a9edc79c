"""Every shipped preset loads, validates and builds a model of the documented size."""

from pathlib import Path

import pytest

from latentlm.presets import PRESET_DIR
from latentlm.config import make_config
from latentlm.model.transformer import Transformer

CONFIGS = sorted((PRESET_DIR).rglob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=[f"{p.parent.name}/{p.stem}" for p in CONFIGS])
def test_preset_loads(path):
    cfg = make_config(path)
    assert cfg.train.method and cfg.model.n_embd % cfg.model.n_head == 0


@pytest.mark.parametrize("path", CONFIGS, ids=[f"{p.parent.name}/{p.stem}" for p in CONFIGS])
def test_preset_takes_its_vocabulary_from_the_data(path, byte_wiki):
    """No preset fixes model.vocab_size: byte data (257 ids) gets a 257-row model without an override,
    and with no data to read the vocabulary is GPT-2's."""
    import yaml

    assert yaml.safe_load(path.read_text())["model"]["vocab_size"] is None
    assert make_config(path, ["--data.path", str(byte_wiki)]).model.vocab_size == 257
    assert make_config(path, ["--data.path", "/nonexistent/data"]).model.vocab_size == 50257


def test_gpt2_124m_has_124m_parameters():
    import torch

    with torch.device("meta"):
        m = Transformer(make_config(PRESET_DIR / "gpt2-124m.yaml").model)
    # GPT-2 small: 124.4M with the 50257-row embedding; ours pads it to 50304 rows (+36k).
    assert m.num_params() == 124_475_904


OFFICIAL = {"125m": (768, 12, 12, 2064), "410m": (1024, 24, 16, 2752), "834m": (1536, 24, 24, 4128),
            "1.4b": (2048, 24, 32, 5504), "2.8b": (2048, 48, 32, 5504)}


@pytest.mark.parametrize("name", OFFICIAL)
def test_ponder_presets_match_the_official_shapes(name):
    cfg = make_config(PRESET_DIR / "ponder" / f"llama-{name}.yaml")
    m = cfg.model
    assert (m.n_embd, m.n_layer, m.n_head, m.ffn_hidden) == OFFICIAL[name]
    assert m.padded_vocab_size == 50304 and m.arch == "llama" and m.block_size == 2048
    assert m.embed_scale == pytest.approx((2.5 * m.n_embd) ** 0.5, rel=1e-6)
    t = cfg.train
    assert t.batch_size * t.grad_accum == 256 and t.max_steps == 50000 and t.lr == 2e-4 and t.min_lr == 2e-5


COCOMIX = {"69m": (8, 512, 8, 3, 624, 512), "386m": (24, 1024, 16, 5, 1072, 512),
           "1.38b": (24, 2048, 16, 5, 2096, 1024)}


def activated_params(method) -> int:
    """Parameters used per token: all of the method's (tied embeddings counted once) except the
    C - k rows of W_comp that the TopK does not gather."""
    total = sum(p.numel() for p in method.parameters())
    head = getattr(method, "concept_head", None)
    w = getattr(head, "compress_weight", None)
    return total if w is None else total - (head.n_concepts - head.k_concepts) * w.shape[1]


@pytest.mark.parametrize("size", COCOMIX)
def test_cocomix_presets_and_their_width_matched_ntp_baselines(size):
    """docs/METHODS.md §2.4 shapes and schedules; both build on the meta device without an SAE; the widened NTP
    baseline has the student's activated parameter count within 3% (measured: 69M +1.7%, 386M -0.6%,
    1.38B -0.5%; the NTP totals are 69.5M, 386.3M and 1373.5M, the paper's size names)."""
    import torch

    from latentlm.methods import build_method
    from latentlm.methods.cocomix import Cocomix

    n_layer, d, heads, insert, d_wide, batch = COCOMIX[size]
    root = PRESET_DIR / "cocomix"
    student_cfg, ntp_cfg = make_config(root / f"cocomix-{size}.yaml"), make_config(root / f"ntp-{size}-wide.yaml")
    for cfg, width in ((student_cfg, d), (ntp_cfg, d_wide)):
        m, t = cfg.model, cfg.train
        assert (m.arch, m.vocab_size, m.block_size, m.n_layer, m.n_head, m.n_embd) == (
            "gpt2", 50257, 1024, n_layer, heads, width)
        assert t.batch_size * t.grad_accum == batch and t.max_steps == 20_480_000 // batch  # 20B tokens
        assert t.min_lr == pytest.approx(t.lr / 10) and t.dtype == "bfloat16"
    assert (student_cfg.train.method, ntp_cfg.train.method) == ("cocomix", "ntp")
    assert student_cfg.cocomix.insert_layer == insert and not student_cfg.concepts.sae
    with torch.device("meta"):
        student, ntp = build_method(student_cfg), build_method(ntp_cfg)
    assert isinstance(student, Cocomix) and (student.n_concepts, student.concept_head.k_concepts) == (32768, 32)
    assert activated_params(ntp) == pytest.approx(activated_params(student), rel=0.03)


def test_cocomix_tiny_preset_builds_for_every_baseline(tmp_path):
    """The CPU preset builds as each paper baseline without an SAE, and as CoCoMix with its concept
    head sized by the SAE (C and k are not set in the preset, so without one it is refused)."""
    from latentlm.concepts.sae import TopKSAE, save_sae
    from latentlm.errors import LatentLMError
    from latentlm.methods import build_method

    path = PRESET_DIR / "cocomix" / "tiny.yaml"
    sae = save_sae(TopKSAE(128, 4096, 32), tmp_path / "sae")
    for method in ("cocomix", "ntp", "pause_insert", "kd", "kd_pause"):
        extra = ["--concepts.sae", str(sae)] if method == "cocomix" else []
        # vocab_size is left to the data; on the demo's 8k BPE data it is 8192
        built = build_method(make_config(path, overrides=["--train.method", method, "--model.vocab_size", "8192",
                                                          *extra]))
        assert built.name == method and built.model.cfg.vocab_size == 8192
        if method == "cocomix":
            assert (built.n_concepts, built.concept_head.k_concepts) == (4096, 32)
    with pytest.raises(LatentLMError, match="needs --concepts.sae"):
        build_method(make_config(path))
    cfg = make_config(path)
    assert cfg.cocomix.insert_layer == cfg.pause_insert.insert_layer == cfg.concepts.layer == 1
