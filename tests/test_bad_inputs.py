"""Malformed input to every command: a non-zero exit, exactly one clear ``error:`` line on stderr
(no traceback), nothing written, and no code run from a file (docs/RELIABILITY.md lists them all)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from latentlm.cli import main
from latentlm.concepts.labels import build_label_cache
from latentlm.concepts.sae import TopKSAE, load_sae, save_sae
from latentlm.concepts.teacher import load_teacher
from latentlm.data.prepare import prepare
from latentlm.data.tokenizers import load_tokenizer
from latentlm.fileio import sha256_file

from conftest import TINY_MODEL, random_sae_for

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = [x for k, v in TINY_MODEL.items() for x in (f"--model.{k}", str(v))]
FAST = ["--train.max_steps", "2", "--train.batch_size", "2", "--train.eval_batches", "1", "--train.progress", "false",
        "--train.device", "cpu", "--data.seq_len", "32"]


class Evil:
    """Unpickling this creates a file: proof that a loader executed code from its input."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


# World.cocomix keyword -> the config key it sets
COCOMIX_KEYS = {"teacher": "teacher.path", "sae": "concepts.sae", "layer": "concepts.layer", "labels": "concepts.labels"}


class World:
    """Artifacts the cases corrupt copies of: data, two NTP runs and a ponder run, an SAE of the first
    NTP run, a label cache."""

    def __init__(self, root: Path, data: Path, bpe: Path):
        self.root, self.data, self.bpe = root, data, bpe
        self.small = root / "small"
        prepare("wiki", load_tokenizer("byte"), self.small, val_fraction=0.2, limit=8, workers=1, progress=False)
        self.run, self.other, self.ponder = root / "ntp", root / "ntp2", root / "ponder"
        for run, method, seed in ((self.run, "ntp", 1), (self.other, "ntp", 2), (self.ponder, "ponder", 1)):
            assert main(["train", *MODEL, *FAST, "--data.path", str(data), "--train.out_dir", str(run),
                         "--train.method", method, "--train.seed", str(seed)]) == 0
        teacher = load_teacher(str(self.run))
        self.sae = random_sae_for(self.run, root / "sae")
        self.labels = root / "labels"
        build_label_cache(self.small, teacher, load_sae(self.sae), self.labels, seq_len=32, layer=0, progress=False)

    def cocomix(self, **over: str) -> list[str]:
        c = {"teacher.path": str(self.run), "concepts.sae": str(self.sae), "concepts.layer": "0",
             "cocomix.insert_layer": "1", **{COCOMIX_KEYS[k]: v for k, v in over.items()}}
        return ["train", *MODEL, *FAST, "--train.method", "cocomix", *[x for k, v in c.items() for x in (f"--{k}", v)]]

    def ckpt(self, run: Path) -> Path:
        return next((run / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def world(byte_wiki, bpe_path, tmp_path_factory) -> World:
    return World(tmp_path_factory.mktemp("world"), byte_wiki, bpe_path)


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return next((dst / "checkpoints").iterdir())


def reseal(ckpt: Path) -> None:
    """Rewrite a checkpoint's manifest to match its (tampered) files, as an attacker could."""
    m = json.loads((ckpt / "manifest.json").read_text())
    for name in m["files"]:
        m["files"][name] = {"bytes": (ckpt / name).stat().st_size, "sha256": sha256_file(ckpt / name)}
    (ckpt / "manifest.json").write_text(json.dumps(m))


def write(path: Path, data: bytes | str) -> Path:
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def flip_byte(path: Path, at: int = 100) -> None:
    raw = bytearray(path.read_bytes())
    raw[at] ^= 0xFF
    path.write_bytes(bytes(raw))


def data_copy(w: World, t: Path) -> Path:
    shutil.copytree(w.data, t / "data")
    return t / "data"


def truncated_shard(w: World, t: Path) -> list[str]:
    d = data_copy(w, t)
    raw = (d / "train_000.bin").read_bytes()
    (d / "train_000.bin").write_bytes(raw[: len(raw) // 2])
    return ["train", *MODEL, *FAST, "--data.path", str(d), "--train.out_dir", str(t / "out")]


def corrupt_shard(w: World, t: Path) -> list[str]:
    d = data_copy(w, t)
    flip_byte(d / "val_000.bin")
    return ["train", *MODEL, *FAST, "--data.path", str(d), "--train.out_dir", str(t / "out")]


def manifest_edit(edit: Callable[[dict], object]) -> Callable[[World, Path], list[str]]:
    def case(w: World, t: Path) -> list[str]:
        d = data_copy(w, t)
        m = json.loads((d / "manifest.json").read_text())
        edit(m)
        (d / "manifest.json").write_text(json.dumps(m))
        return ["train", *MODEL, *FAST, "--data.path", str(d), "--train.out_dir", str(t / "out")]
    return case


def truncated_manifest(w: World, t: Path) -> list[str]:
    d = data_copy(w, t)
    raw = (d / "manifest.json").read_bytes()
    (d / "manifest.json").write_bytes(raw[: len(raw) // 2])
    return ["eval", str(w.run), "--data", str(d)]


def bad_yaml(text: str) -> Callable[[World, Path], list[str]]:
    return lambda w, t: ["train", "--config", str(write(t / "c.yaml", text)), "--train.out_dir", str(t / "out")]


def pickle_in_checkpoint(name: str) -> Callable[[World, Path], list[str]]:
    """A resume whose optimizer or RNG file unpickles into code execution (manifest resealed)."""
    def case(w: World, t: Path) -> list[str]:
        ck = copy_run(w.run, t / "out")
        (t / "out" / "final.json").unlink()  # unfinished (a complete run's --resume loads nothing): it loads all
        torch.save({"state": Evil(t / "pwned")}, ck / name)
        reseal(ck)
        # the saved config as it is: a resume refuses changed settings (train.max_steps too) before loading
        return ["train", "--config", str(ck / "config.yaml"), "--train.out_dir", str(t / "out"), "--resume"]
    return case


def pickle_as_sae(w: World, t: Path) -> list[str]:
    torch.save({"encoder.weight": Evil(t / "pwned")}, t / "sae.pt")
    return ["concepts", "label", "--teacher", str(w.run), "--sae", str(t / "sae.pt"), "--data", str(w.small),
            "--out", str(t / "out"), "--seq-len", "32"]


def truncated_weights(w: World, t: Path) -> list[str]:
    ck = copy_run(w.run, t / "run")
    raw = (ck / "model.safetensors").read_bytes()
    (ck / "model.safetensors").write_bytes(raw[:200])
    reseal(ck)
    return ["eval", str(ck)]


def damaged_weights(w: World, t: Path) -> list[str]:
    ck = copy_run(w.run, t / "run")
    flip_byte(ck / "model.safetensors", -1)
    return ["generate", str(ck), "--max-new-tokens", "2"]


def checkpoint_config(text: str) -> Callable[[World, Path], list[str]]:
    def case(w: World, t: Path) -> list[str]:
        ck = copy_run(w.run, t / "run")
        (ck / "config.yaml").write_text(text)
        reseal(ck)
        return ["eval", str(ck)]
    return case


def sae_edit(edit: Callable[[TopKSAE], None], cmd: str = "label") -> Callable[[World, Path], list[str]]:
    def case(w: World, t: Path) -> list[str]:
        sae = load_sae(w.sae)
        edit(sae)
        save_sae(sae, t / "sae")
        if cmd == "train":
            return [*w.cocomix(sae=str(t / "sae")), "--data.path", str(w.data), "--train.out_dir", str(t / "out")]
        return ["concepts", "label", "--teacher", str(w.run), "--sae", str(t / "sae"), "--data", str(w.small),
                "--out", str(t / "out"), "--seq-len", "32"]
    return case


def bpe_data(w: World, t: Path) -> Path:
    prepare("wiki", load_tokenizer("bpe", w.bpe), t / "bpe", val_fraction=0.2, limit=8, workers=1, progress=False)
    return t / "bpe"


# (id, argv builder(world, tmp) -> argv, text the one error line must contain): 63 cases, every command
CASES: list[tuple[str, Callable[[World, Path], list[str]], str]] = [
    # prepare / tokenizer
    ("prepare-missing-source", lambda w, t: ["prepare", "--source", str(t / "none.txt"), "--out", str(t / "out")],
     "none.txt"),
    ("prepare-empty-corpus", lambda w, t: ["prepare", "--source", str(write(t / "e.txt", "")), "--tokenizer", "byte",
                                           "--workers", "1", "--out", str(t / "out")], "contains no documents"),
    ("prepare-non-utf8", lambda w, t: ["prepare", "--source", str(write(t / "l1.txt", b"caf\xe9 au lait\n")),
                                       "--tokenizer", "byte", "--workers", "1", "--out", str(t / "out")],
     "is not valid UTF-8"),
    ("prepare-bad-jsonl-line", lambda w, t: ["prepare", "--source", str(write(t / "c.jsonl", '{"text": "a"}\n{"text"\n')),
                                             "--tokenizer", "byte", "--workers", "1", "--out", str(t / "out")],
     "line 2 is not valid JSON"),
    ("prepare-jsonl-wrong-field", lambda w, t: ["prepare", "--source", str(write(t / "c.jsonl", '{"body": "a"}\n')),
                                                "--tokenizer", "byte", "--workers", "1", "--out", str(t / "out")],
     "'text'"),
    ("prepare-val-fraction", lambda w, t: ["prepare", "--tokenizer", "byte", "--val-fraction", "1.5",
                                           "--out", str(t / "out")], "val_fraction must be between 0 and 1"),
    ("prepare-corrupt-tokenizer", lambda w, t: ["prepare", "--tokenizer", "bpe", "--tokenizer-path",
                                                str(write(t / "tok.json", '{"model": ')), "--out", str(t / "out")],
     "cannot read tokenizer"),
    ("prepare-out-not-empty", lambda w, t: ["prepare", "--tokenizer", "byte", "--out",
                                            str(write(t / "out", "x").parent)], "exists and is not empty"),
    ("tokenizer-vocab-too-small", lambda w, t: ["tokenizer", "train", "--vocab-size", "100",
                                                "--out", str(t / "out")], "at least 257"),
    ("tokenizer-empty-corpus", lambda w, t: ["tokenizer", "train", "--source", str(write(t / "e.txt", "")),
                                             "--vocab-size", "300", "--out", str(t / "out")], "contains no documents"),
    ("cli-unknown-argument", lambda w, t: ["demo", "--out", str(t / "out"), "--fast"],
     "unrecognized arguments: --fast"),
    # train: config
    ("config-unknown-key", lambda w, t: ["train", "--model.n_layers", "2", "--train.out_dir", str(t / "out")],
     "unknown config key 'model.n_layers'"),
    ("config-wrong-type", lambda w, t: ["train", "--train.max_steps", "many", "--train.out_dir", str(t / "out")],
     "train.max_steps='many' has the wrong type: expected int"),
    ("config-bad-literal", lambda w, t: ["train", "--train.dtype", "fp8", "--train.out_dir", str(t / "out")],
     "train.dtype='fp8' has the wrong type"),
    ("config-heads-do-not-divide", lambda w, t: ["train", *MODEL, "--model.n_head", "3",
                                                 "--train.out_dir", str(t / "out")], "does not divide model.n_embd=32"),
    ("config-min-lr-above-lr", lambda w, t: ["train", "--train.min_lr", "0.1", "--train.out_dir", str(t / "out")],
     "train.min_lr=0.1 is above train.lr"),
    ("config-seq-len-over-block", lambda w, t: ["train", *MODEL, "--data.seq_len", "65",
                                                "--train.out_dir", str(t / "out")], "exceeds model.block_size=64"),
    ("config-zero-batch", lambda w, t: ["train", "--train.batch_size", "0", "--train.out_dir", str(t / "out")],
     "train.batch_size=0 must be positive and finite"),
    ("config-unknown-method", lambda w, t: ["train", "--train.method", "magic", "--train.out_dir", str(t / "out")],
     "unknown method 'magic'; choose from"),
    ("config-yaml-invalid", bad_yaml("model: [unclosed\n"), "is not valid YAML"),
    ("config-yaml-not-mapping", bad_yaml("- a\n- b\n"), "must hold a mapping of sections"),
    ("config-yaml-unknown-section", bad_yaml("optim:\n  lr: 0.1\n"), "unknown config key 'optim'"),
    ("config-yaml-section-not-mapping", bad_yaml("data: 3\n"), "config section data must be a mapping"),
    # train: data and checkpoints
    ("data-missing", lambda w, t: ["train", *MODEL, "--data.path", str(t / "nodata"), "--train.out_dir", str(t / "out")],
     "does not exist; create it with `latentlm prepare`"),
    ("data-truncated-shard", truncated_shard, "train_000.bin has"),
    ("data-corrupt-shard", corrupt_shard, "does not match its sha256"),
    ("data-manifest-truncated", truncated_manifest, "is not valid JSON"),
    ("data-manifest-no-splits", manifest_edit(lambda m: m.pop("splits")), "manifest.json"),
    ("data-manifest-bad-dtype", manifest_edit(lambda m: m.update(dtype="complex64")), "manifest.json"),
    ("data-manifest-format", manifest_edit(lambda m: m.update(format_version=99)), "format version 99"),
    ("data-vocab-mismatch", lambda w, t: ["train", *MODEL, *FAST, "--model.vocab_size", "300", "--data.path",
                                          str(w.data), "--train.out_dir", str(t / "out")],
     "the model has vocab_size 300 but the data's byte tokenizer has 257"),
    ("resume-another-method", lambda w, t: ["train", "--config", str(copy_run(w.ponder, t / "out") / "config.yaml"),
                                            "--train.method", "ntp", "--train.out_dir", str(t / "out"), "--resume"],
     "was trained with method 'ponder', not 'ntp'"),
    ("resume-pickle-optimizer", pickle_in_checkpoint("optimizer.pt"), "optimizer.pt"),
    ("resume-pickle-rng", pickle_in_checkpoint("rng.pt"), "rng.pt"),
    ("train-existing-run", lambda w, t: ["train", "--config", str(copy_run(w.run, t / "out") / "config.yaml"),
                                         "--train.out_dir", str(t / "out")], "pass --resume"),
    # cocomix inputs
    ("cocomix-sae-other-layer", lambda w, t: [*w.cocomix(layer="1"), "--data.path", str(w.data),
                                              "--train.out_dir", str(t / "out")],
     "SAE was trained on teacher layer 0, not 1"),
    ("cocomix-sae-other-teacher", lambda w, t: [*w.cocomix(teacher=str(w.other)), "--data.path", str(w.data),
                                                "--train.out_dir", str(t / "out")],
     "SAE was trained on teacher fingerprint"),
    ("cocomix-teacher-not-ntp", lambda w, t: [*w.cocomix(teacher=str(w.ponder)), "--data.path", str(w.data),
                                              "--train.out_dir", str(t / "out")],
     "was trained with method 'ponder', which is not a plain next-token model"),
    ("cocomix-sae-unknown-teacher", sae_edit(lambda s: s.meta["teacher"].update(fingerprint="0" * 64), "train"),
     "SAE was trained on teacher fingerprint '000000"),
    ("cocomix-labels-other-corpus", lambda w, t: [*w.cocomix(labels=str(w.labels)), "--data.path", str(w.data),
                                                  "--train.out_dir", str(t / "out")],
     "was built with data manifest sha256"),
    ("cocomix-labels-other-window", lambda w, t: [*w.cocomix(labels=str(w.labels)), "--data.path", str(w.small),
                                                  "--data.seq_len", "16", "--train.out_dir", str(t / "out")],
     "was built with seq_len 32, this run uses 16"),
    # eval / generate
    ("eval-no-checkpoint", lambda w, t: ["eval", str(t / "nowhere")], "no checkpoint found"),
    ("eval-truncated-weights", truncated_weights, "model.safetensors"),
    ("eval-config-unknown-key", checkpoint_config("model:\n  n_layers: 2\n"), "unknown config key 'model.n_layers'"),
    ("eval-config-not-yaml", checkpoint_config("model: [\n"), "config.yaml"),
    ("eval-text-non-utf8", lambda w, t: ["eval", str(w.run), "--text", str(write(t / "t.txt", b"\xff\xfe"))],
     "is not UTF-8 text"),
    ("eval-data-other-tokenizer", lambda w, t: ["eval", str(w.run), "--data", str(bpe_data(w, t))],
     "data was prepared with a different tokenizer"),
    ("eval-seq-len-over-block", lambda w, t: ["eval", str(w.run), "--seq-len", "100"], "block_size"),
    ("eval-bad-mode", lambda w, t: ["eval", str(w.run), "--mode", "exact"], "has no evaluation mode 'exact'"),
    ("generate-damaged-weights", damaged_weights, "does not match its manifest"),
    ("generate-steer-ntp", lambda w, t: ["generate", str(w.run), "--steer", "1=2"],
     "--steer needs a checkpoint of a method with concepts"),
    ("generate-top-p", lambda w, t: ["generate", str(w.run), "--top-p", "1.5", "--max-new-tokens", "2"],
     "top_p=1.5 must be in (0, 1]"),
    # sae / concepts
    ("sae-k-above-latents", lambda w, t: ["sae", "train", "--teacher", str(w.run), "--layer", "0", "--data",
                                          str(w.data), "--out", str(t / "out"), "--latents", "8", "--k", "9"],
     "1 <= k <= n_latents"),
    ("sae-layer-out-of-range", lambda w, t: ["sae", "train", "--teacher", str(w.run), "--layer", "7", "--data",
                                             str(w.data), "--out", str(t / "out"), "--latents", "8", "--k", "2",
                                             "--steps", "1", "--seq-len", "32"], "teacher layer 7 is out of range"),
    ("sae-data-other-tokenizer", lambda w, t: ["sae", "train", "--teacher", str(w.run), "--layer", "0", "--data",
                                               str(bpe_data(w, t)), "--out", str(t / "out")],
     "data was prepared with a different tokenizer"),
    ("sae-missing-teacher", lambda w, t: ["sae", "train", "--teacher", str(t / "nobody"), "--layer", "0",
                                          "--data", str(w.data), "--out", str(t / "out")], "cannot load teacher"),
    ("label-sae-pickle", pickle_as_sae, "cannot read SAE file"),
    ("label-sae-other-layer", lambda w, t: ["concepts", "label", "--teacher", str(w.run), "--sae", str(w.sae),
                                            "--layer", "1", "--data", str(w.small), "--out", str(t / "out"),
                                            "--seq-len", "32"], "SAE was trained on teacher layer 0, not 1"),
    ("label-sae-other-teacher", lambda w, t: ["concepts", "label", "--teacher", str(w.other), "--sae", str(w.sae),
                                              "--data", str(w.small), "--out", str(t / "out"), "--seq-len", "32"],
     "SAE was trained on teacher fingerprint"),
    ("label-window-too-long", lambda w, t: ["concepts", "label", "--teacher", str(w.run), "--sae", str(w.sae),
                                            "--data", str(w.small), "--out", str(t / "out"), "--seq-len", "100000"],
     "fewer than one window"),
    ("label-sae-damaged", lambda w, t: ["concepts", "label", "--teacher", str(w.run), "--sae",
                                        str(_damaged_sae(w, t)), "--data", str(w.small), "--out", str(t / "out"),
                                        "--seq-len", "32"], "does not match its manifest sha256"),
    ("contexts-top-n-zero", lambda w, t: ["concepts", "contexts", "--teacher", str(w.run), "--sae",
                                          str(_sae_copy(w, t)), "--data", str(w.small), "--top-n", "0",
                                          "--seq-len", "32"], "top"),
    ("inspect-ntp-checkpoint", lambda w, t: ["concepts", "inspect", str(w.run), "--text", "hi"],
     "concepts inspect needs a checkpoint of a method with concepts"),
]


def _sae_copy(w: World, t: Path) -> Path:
    shutil.copytree(w.sae, t / "sae")
    return t / "sae"


def _damaged_sae(w: World, t: Path) -> Path:
    flip_byte(_sae_copy(w, t) / "sae_weights.safetensors", -1)
    return t / "sae"


QUIET = {"prepare", "eval", ("sae", "train"), ("concepts", "label"), ("concepts", "contexts")}


def snapshot(root: Path) -> dict[str, tuple[int, int] | None]:
    """Every path under ``root`` (hidden ones too): files with their size and modification time."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) if p.is_file() else None
            for p in sorted(root.rglob("*"))}


@pytest.mark.parametrize("name, build, needle", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(name, build, needle, world, tmp_path, capsys):
    argv = build(world, tmp_path)
    if argv[0] in QUIET or tuple(argv[:2]) in QUIET:
        argv.append("--quiet")  # progress bars are not error output
    before = snapshot(tmp_path)
    capsys.readouterr()
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert snapshot(tmp_path) == before  # no partial output, not even a lock file or an emptied run
    assert not (tmp_path / "pwned").exists()  # nothing was unpickled into code

