"""Each method checks every input it will use before anything is written (``Method.validate_inputs``
and ``resolve_config``): the teacher's tokenizer against the data's on every teacher path, the SAE
against the concept head, and the label cache against the run."""

from __future__ import annotations

import json

import pytest

from latentlm.cli import main
from latentlm.data.prepare import prepare
from latentlm.data.tokenizers import load_tokenizer

from conftest import TINY_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")
MODEL = [x for k, v in TINY_MODEL.items() if k != "vocab_size" for x in (f"--model.{k}", str(v))]
COMMON = ["--train.batch_size", "2", "--train.warmup_steps", "1", "--train.progress", "false",
          "--train.eval_batches", "1", "--data.seq_len", "32"]


@pytest.fixture(scope="module")
def bpe_teacher(bpe_path, tmp_path_factory):
    """A teacher trained on BPE data (512 ids) and its SAE: the wrong teacher for byte data."""
    root = tmp_path_factory.mktemp("bpe-teacher")
    data = root / "data"
    prepare("wiki", load_tokenizer("bpe", bpe_path), data, val_fraction=0.05, limit=200, workers=1, progress=False)
    teacher, sae = root / "teacher", root / "sae"
    assert main(["train", *MODEL, "--model.vocab_size", "512", "--data.path", str(data), "--train.out_dir",
                 str(teacher), "--train.max_steps", "2", *COMMON]) == 0
    assert main(["sae", "train", "--teacher", str(teacher), "--layer", "0", "--data", str(data), "--out", str(sae),
                 "--latents", "16", "--k", "2", "--steps", "5", "--batch-tokens", "128", "--seq-len", "32",
                 "--eval-tokens", "128", "--quiet"]) == 0
    return teacher, sae, data


def student(byte_wiki, out, method, *extra):
    return ["train", *MODEL, "--model.vocab_size", "257", "--data.path", str(byte_wiki), "--train.out_dir", str(out),
            "--train.method", method, "--train.max_steps", "2", *COMMON, *extra]


@pytest.mark.parametrize("method, extra", [
    ("cocomix", ["--cocomix.insert_layer", "1"]),  # labels on the fly: the path that never checked
    ("kd", []),
    ("kd_pause", ["--pause_insert.insert_layer", "1"]),
])
def test_a_teacher_of_another_tokenizer_is_refused_up_front(bpe_teacher, byte_wiki, tmp_path, capsys, method, extra):
    teacher, sae, _ = bpe_teacher
    out = tmp_path / "run"
    args = student(byte_wiki, out, method, "--teacher.path", str(teacher), "--concepts.sae", str(sae),
                   "--concepts.layer", "0", *extra)
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert "tokenizer" in err or "vocabulary" in err
    assert not out.exists()  # nothing written


def test_an_explicit_concept_count_must_be_the_saes(bpe_teacher, tmp_path, capsys):
    teacher, sae, data = bpe_teacher
    out = tmp_path / "run"
    base = ["train", *MODEL, "--model.vocab_size", "512", "--data.path", str(data), "--train.out_dir", str(out),
            "--train.method", "cocomix", "--train.max_steps", "1", *COMMON, "--teacher.path", str(teacher),
            "--concepts.sae", str(sae), "--concepts.layer", "0", "--cocomix.insert_layer", "1"]
    assert main(base + ["--cocomix.n_concepts", "4096"]) == 2
    assert "cocomix.n_concepts=4096 but the SAE" in capsys.readouterr().err and not out.exists()
    # both sizes given (so nothing is read to build the head): the labels' SAE still decides, before any output
    assert main(base + ["--cocomix.n_concepts", "32", "--cocomix.k_concepts", "2"]) == 2
    err = capsys.readouterr().err
    assert "cocomix.n_concepts=32 but the concept labels come from an SAE with 16" in err and not out.exists()
    assert main(base) == 0  # sizes from the SAE
    assert "n_concepts: 16" in (out / "config.yaml").read_text()


def test_a_label_cache_of_another_sae_size_is_refused(bpe_teacher, tmp_path, capsys):
    teacher, sae, data = bpe_teacher
    labels = tmp_path / "labels"
    assert main(["concepts", "label", "--teacher", str(teacher), "--sae", str(sae), "--data", str(data), "--out",
                 str(labels), "--seq-len", "32", "--k-attr", "2", "--limit-windows", "4", "--quiet"]) == 0
    out = tmp_path / "run"
    assert main(["train", *MODEL, "--model.vocab_size", "512", "--data.path", str(data), "--train.out_dir", str(out),
                 "--train.method", "cocomix", "--train.max_steps", "1", *COMMON, "--concepts.labels", str(labels),
                 "--concepts.k_attr", "2", "--concepts.layer", "0", "--cocomix.insert_layer", "1",
                 "--cocomix.n_concepts", "24", "--cocomix.k_concepts", "2"]) == 2
    assert "cocomix.n_concepts=24 but the concept labels come from an SAE with 16" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize("edit, needle", [
    (lambda m: m.pop("labels"), "labels.file is None"),
    (lambda m: m["labels"].update(shape=[4, 32]), "labels.shape is"),
    (lambda m: m.update(seq_len="32"), "seq_len is '32', not a valid int"),
    (lambda m: m["sae"].update(n_latents=None), "sae.n_latents is None"),
])
def test_a_hand_edited_label_cache_manifest_is_one_line(bpe_teacher, tmp_path, capsys, edit, needle):
    teacher, sae, data = bpe_teacher
    labels = tmp_path / "labels"
    assert main(["concepts", "label", "--teacher", str(teacher), "--sae", str(sae), "--data", str(data), "--out",
                 str(labels), "--seq-len", "32", "--k-attr", "2", "--limit-windows", "2", "--quiet"]) == 0
    manifest = json.loads((labels / "manifest.json").read_text())
    edit(manifest)
    (labels / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "run"
    assert main(["train", *MODEL, "--model.vocab_size", "512", "--data.path", str(data), "--train.out_dir", str(out),
                 "--train.method", "cocomix", "--train.max_steps", "1", *COMMON, "--concepts.labels", str(labels),
                 "--concepts.k_attr", "2", "--concepts.layer", "0", "--cocomix.insert_layer", "1",
                 "--cocomix.n_concepts", "16", "--cocomix.k_concepts", "2"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is damaged" in err and needle in err, err
    assert not out.exists()
