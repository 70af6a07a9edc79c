"""More malformed input (issue 12): devices, undecodable text, sampling settings, seeds, tokenizer and
prepare destinations and sources (FIFOs, broken links), generation past the positions, token ids
beyond the vocabulary, unreachable Hugging Face datasets, and hand-edited artifacts of every kind.

Each case: exit 2, exactly one ``error:`` line on stderr, no traceback, nothing written or changed
(both the case's directory and the shared artifacts are snapshotted). docs/RELIABILITY.md lists them.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import sys
import threading
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

from latentlm.cli import build_parser, main
from latentlm.concepts.labels import build_label_cache
from latentlm.concepts.sae import load_sae
from latentlm.concepts.teacher import load_teacher
from latentlm.data.prepare import prepare
from latentlm.data.tokenizers import load_tokenizer
from latentlm.fileio import sha256_file

from conftest import random_sae_for
from test_bad_inputs import FAST, MODEL, QUIET, copy_run, reseal, snapshot, write

pytestmark = pytest.mark.usefixtures("one_thread")

LLAMA = [v if v != "gpt2" else "llama" for v in MODEL]
BIG = str(2**70)  # 1180591620717411303424


class World:
    """Shared artifacts (never written by a case; cases corrupt copies): byte and gpt2 data, a gpt2-
    and a llama-style NTP run, an SAE of the first, its label cache and a CoCoMix run using them."""

    def __init__(self, root: Path):
        self.root = root
        self.data, self.gpt2 = root / "data", root / "gpt2-data"
        prepare("wiki", load_tokenizer("byte"), self.data, val_fraction=0.1, limit=40, workers=1, progress=False)
        prepare("wiki", load_tokenizer("gpt2"), self.gpt2, val_fraction=0.2, limit=10, workers=1, progress=False)
        self.run, self.llama, self.cocomix = root / "ntp", root / "llama", root / "cocomix"
        for run, model in ((self.run, MODEL), (self.llama, LLAMA)):
            assert main(["train", *model, *FAST, "--data.path", str(self.data), "--train.out_dir", str(run)]) == 0
        teacher = load_teacher(str(self.run))
        self.sae = random_sae_for(self.run, root / "sae")
        self.labels = root / "labels"
        build_label_cache(self.data, teacher, load_sae(self.sae), self.labels, seq_len=32, layer=0, progress=False)
        assert main(["train", *MODEL, *FAST, "--data.path", str(self.data), "--train.out_dir", str(self.cocomix),
                     "--train.method", "cocomix", "--teacher.path", str(self.run), "--concepts.sae", str(self.sae),
                     "--concepts.layer", "0", "--cocomix.insert_layer", "1", "--concepts.labels", str(self.labels)]) == 0


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return World(tmp_path_factory.mktemp("world-more"))
    finally:
        torch.set_num_threads(threads)


class Env:
    """What a case may set up besides files: monkeypatches, and cleanups run after the command."""

    def __init__(self, mp: pytest.MonkeyPatch):
        self.mp, self.cleanups = mp, []

    def no_cuda(self) -> None:
        self.mp.setattr(torch.cuda, "is_available", lambda: False)

    def one_gpu(self) -> None:
        self.mp.setattr(torch.cuda, "is_available", lambda: True)
        self.mp.setattr(torch.cuda, "device_count", lambda: 1)

    def datasets(self, module: types.ModuleType | None) -> None:
        self.mp.setitem(sys.modules, "datasets", module)  # None: `import datasets` raises ImportError

    def fifo(self, path: Path) -> Path:
        """A FIFO at ``path``. Code that wrongly opens it to read gets EOF at once instead of blocking
        forever (a thread opens the write end as soon as a reader waits), so it fails, not hangs."""
        os.mkfifo(path)
        stop = threading.Event()

        def unblock() -> None:
            while not stop.is_set():
                try:
                    fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
                except OSError:  # ENXIO: no reader, as it should be
                    stop.wait(0.05)
                    continue
                os.close(fd)
                return

        thread = threading.Thread(target=unblock, daemon=True)
        thread.start()
        self.cleanups.append(lambda: (stop.set(), thread.join()))
        return path


Build = Callable[[World, Path, Env], list[str]]


def fake_datasets(load: Callable[..., object]) -> types.ModuleType:
    """A stand-in ``datasets`` whose ``load_dataset`` is ``load`` (there is no network in the tests)."""
    mod = types.ModuleType("datasets")
    mod.load_dataset, mod.load_from_disk, mod.DatasetDict = load, load, dict
    return mod


OFFLINE = ConnectionError("Couldn't reach 'nonexistent' on the Hub (LocalEntryNotFoundError)\n"
                          + "\n".join(f"  frame {i}" for i in range(40)))


def hub_offline(name, split, streaming):
    raise OFFLINE


def dies_midway(name, split, streaming):
    yield {"text": "first document"}
    raise OFFLINE


def with_env(setup: Callable[[Env], object], build: Build) -> Build:
    def case(w: World, t: Path, env: Env) -> list[str]:
        setup(env)
        return build(w, t, env)
    return case


def source_dir(t: Path, extra: Callable[[Path], object]) -> Path:
    (t / "src").mkdir()
    write(t / "src" / "a.txt", "a perfectly good document")
    extra(t / "src")
    return t / "src"


def pre(src: str | Path, t: Path, *more: str) -> list[str]:
    return ["prepare", "--source", str(src), "--tokenizer", "byte", "--workers", "1", "--out", str(t / "out"), *more]


def tok_train(t: Path, out: Path | str, *more: str) -> list[str]:
    return ["tokenizer", "train", "--limit", "20", "--vocab-size", "300", "--out", str(out), *more]


def gen(w: World, *more: str, run: Path | None = None) -> list[str]:
    return ["generate", str(run or w.run), "--max-new-tokens", "2", *more]


def ck_edit(name: str, edit: bytes | Callable[[bytes], bytes], src: str = "run", do_reseal: bool = True,
            cmd: str = "eval") -> Build:
    """``cmd`` on a copy of a run whose checkpoint file ``name`` is replaced or edited (manifest resealed
    unless ``do_reseal`` is false: a hand edit that also fixed the sha256s)."""
    def case(w: World, t: Path, env: Env) -> list[str]:
        ck = copy_run(getattr(w, src), t / "run")
        old = (ck / name).read_bytes()
        (ck / name).write_bytes(edit if isinstance(edit, bytes) else edit(old))
        if do_reseal:
            reseal(ck)
        return [cmd, str(ck)] if cmd == "eval" else [cmd, str(ck), "--max-new-tokens", "2"]
    return case


def json_edit(edit: Callable[[dict], object]) -> Callable[[bytes], bytes]:
    def apply(raw: bytes) -> bytes:
        d = json.loads(raw)
        edit(d)
        return json.dumps(d).encode()
    return apply


def manifest_edit(edit: Callable[[dict], object]) -> Build:
    """eval on a copy of the data whose manifest is edited by hand."""
    def case(w: World, t: Path, env: Env) -> list[str]:
        d = t / "data"
        shutil.copytree(w.data, d)
        (d / "manifest.json").write_bytes(json_edit(edit)((d / "manifest.json").read_bytes()))
        return ["eval", str(w.run), "--data", str(d)]
    return case


def out_of_vocab_val(w: World, t: Path, env: Env) -> list[str]:
    d = t / "data"
    shutil.copytree(w.data, d)
    tokens = np.fromfile(d / "val_000.bin", dtype="<u2")
    tokens[5] = 300  # beyond the byte tokenizer's 257 ids; the sha256 is fixed so only the id is wrong
    tokens.tofile(d / "val_000.bin")
    m = json.loads((d / "manifest.json").read_text())
    m["splits"]["val"]["shards"][0]["sha256"] = sha256_file(d / "val_000.bin")
    (d / "manifest.json").write_text(json.dumps(m))
    return ["eval", str(w.run), "--data", str(d)]


def resume_with_state(edit: Callable[[bytes], bytes]) -> Build:
    """train --resume from a copy of the run whose trainer_state.json is edited (manifest resealed)."""
    def case(w: World, t: Path, env: Env) -> list[str]:
        ck = copy_run(w.run, t / "out")
        (t / "out" / "final.json").unlink()  # unfinished (a complete run's --resume loads nothing): it loads all
        (ck / "trainer_state.json").write_bytes(edit((ck / "trainer_state.json").read_bytes()))
        reseal(ck)
        return ["train", "--config", str(ck / "config.yaml"), "--train.out_dir", str(t / "out"), "--resume"]
    return case


def sae_meta_edit(edit: Callable[[dict], object]) -> Build:
    def case(w: World, t: Path, env: Env) -> list[str]:
        shutil.copytree(w.sae, t / "sae")
        (t / "sae" / "cfg.json").write_bytes(json_edit(edit)((t / "sae" / "cfg.json").read_bytes()))
        m = json.loads((t / "sae" / "manifest.json").read_text())  # resealed, as a careful hand edit would be
        m["files"]["cfg.json"]["sha256"] = sha256_file(t / "sae" / "cfg.json")
        m["files"]["cfg.json"]["bytes"] = (t / "sae" / "cfg.json").stat().st_size
        (t / "sae" / "manifest.json").write_text(json.dumps(m))
        return ["concepts", "label", "--teacher", str(w.run), "--sae", str(t / "sae"), "--data", str(w.data),
                "--out", str(t / "out"), "--seq-len", "32"]
    return case


def yaml_bomb(levels: int = 18) -> str:
    """A config whose aliases expand to 2**levels values inside a valid key (a "billion laughs")."""
    lines = ["a0: &a0 {x: 1}"] + [f"a{i}: &a{i} {{p: *a{i - 1}, q: *a{i - 1}}}" for i in range(1, levels)]
    return "defs:\n" + "".join(f"  {ln}\n" for ln in lines) + f"train:\n  out_dir: *a{levels - 1}\n"


def experiment(w: World, t: Path, **over: str) -> str:
    fields = {"out_dir": str(t / "cmp"), "data": f"{{path: {w.data}}}", "budget": "{tokens: 128}",
              "runs": "{a: {method: ntp}}", **over}
    return "".join(f"{k}: {v}\n" for k, v in fields.items())


def compare(text: str | bytes) -> Build:
    return lambda w, t, env: ["compare", str(write(t / "exp.yaml", text))]


def compare_with(**over: str) -> Build:
    return lambda w, t, env: ["compare", str(write(t / "exp.yaml", experiment(w, t, **over)))]


def damaged_gzip(t: Path) -> Path:
    raw = bytearray(gzip.compress(b"".join(b'{"text": "document %d"}\n' % i for i in range(2000)), mtime=0))
    raw[40:60] = bytes(20)  # inside the deflate stream
    return write(t / "c.jsonl.gz", bytes(raw))


def llama_weights(w: World) -> bytes:
    return (next((w.llama / "checkpoints").iterdir()) / "model.safetensors").read_bytes()


def hf_dir(t: Path, config_json: str) -> Path:
    (t / "hf").mkdir()
    return write(t / "hf" / "config.json", config_json).parent


NOT_UTF8 = b"\xff".decode("utf-8", "surrogateescape")  # how Python hands undecodable argv bytes over
LABEL = ["concepts", "label", "--seq-len", "32"]


def label(w: World, t: Path, *more: str) -> list[str]:
    return [*LABEL, "--teacher", str(w.run), "--sae", str(w.sae), "--data", str(w.data), "--out", str(t / "out"), *more]


def contexts(w: World, t: Path, *more: str) -> list[str]:
    shutil.copytree(w.sae, t / "sae")  # contexts.json would be written into the SAE directory
    return ["concepts", "contexts", "--teacher", str(w.run), "--sae", str(t / "sae"), "--data", str(w.data),
            "--seq-len", "32", *more]


def sae_train(w: World, t: Path, *more: str) -> list[str]:
    return ["sae", "train", "--teacher", str(w.run), "--layer", "0", "--data", str(w.data), "--out", str(t / "out"),
            "--latents", "8", "--k", "2", "--steps", "1", "--seq-len", "32", "--batch-tokens", "64", *more]


def train(w: World, t: Path, *more: str) -> list[str]:
    return ["train", *MODEL, *FAST, "--data.path", str(w.data), "--train.out_dir", str(t / "out"), *more]


def config(text: str | bytes) -> Build:
    return lambda w, t, env: ["train", "--config", str(write(t / "c.yaml", text)), "--train.out_dir", str(t / "out")]


def state_json(edit: Callable[[dict], object]) -> Callable[[bytes], bytes]:
    return json_edit(edit)


AS_ROOT = pytest.mark.skipif(os.geteuid() == 0, reason="root ignores permissions")

# (id, argv builder(world, tmp, env) -> argv, text the one error line must contain)
CASES: list = [
    # 1. devices: CUDA absent, bogus names, a GPU index this machine lacks; --device auto is below
    ("eval-device-cuda-without-cuda", with_env(Env.no_cuda, lambda w, t, e: ["eval", str(w.run), "--device", "cuda"]),
     "--device=cuda but no CUDA device is available"),
    ("generate-device-cuda-without-cuda", with_env(Env.no_cuda, lambda w, t, e: gen(w, "--device", "cuda")),
     "no CUDA device is available"),
    ("generate-device-banana", lambda w, t, e: gen(w, "--device", "banana"),
     "--device='banana' is not one of auto, cpu, cuda, cuda:N"),
    ("generate-device-cuda-x", lambda w, t, e: gen(w, "--device", "cuda:x"), "--device='cuda:x' is not one of"),
    ("generate-device-cuda-3-of-1", with_env(Env.one_gpu, lambda w, t, e: gen(w, "--device", "cuda:3")),
     "--device=cuda:3 but this machine has 1 CUDA device(s)"),
    ("eval-device-banana", lambda w, t, e: ["eval", str(w.run), "--device", "banana"], "'banana' is not one of"),
    ("sae-device-banana", lambda w, t, e: sae_train(w, t, "--device", "banana"), "'banana' is not one of"),
    ("label-device-cuda-x", lambda w, t, e: label(w, t, "--device", "cuda:x"), "'cuda:x' is not one of"),
    ("contexts-device-cuda-without-cuda", with_env(Env.no_cuda, lambda w, t, e: contexts(w, t, "--device", "cuda")),
     "no CUDA device is available"),
    ("inspect-device-mps", lambda w, t, e: ["concepts", "inspect", str(w.cocomix), "--text", "hi", "--device", "mps"],
     "'mps' is not one of"),
    ("train-device-cuda-x", lambda w, t, e: train(w, t, "--train.device", "cuda:x"),
     "train.device='cuda:x' is not one of auto, cpu, cuda, cuda:N"),
    ("train-device-cuda-without-cuda", with_env(Env.no_cuda, lambda w, t, e: train(w, t, "--train.device", "cuda")),
     "train.device=cuda but no CUDA device is available"),
    # 2. text that is not UTF-8
    ("generate-prompt-not-utf8", lambda w, t, e: gen(w, "--prompt", NOT_UTF8), "--prompt is not valid UTF-8 text"),
    ("inspect-text-not-utf8", lambda w, t, e: ["concepts", "inspect", str(w.cocomix), "--text", "a" + NOT_UTF8],
     "--text is not valid UTF-8 text (at character 1)"),
    ("config-not-utf8", config(b"train:\n  lr: 0.1 \xff\n"), "c.yaml is not UTF-8 text (byte 17)"),
    ("experiment-not-utf8", compare(b"name: caf\xe9\n"), "exp.yaml is not UTF-8 text (byte 9)"),
    # 3. sampling settings and seeds
    ("generate-temperature-nan", lambda w, t, e: gen(w, "--temperature", "nan"),
     "temperature=nan must be a finite number >= 0"),
    ("generate-temperature-negative", lambda w, t, e: gen(w, "--temperature", "-1"), "temperature=-1.0 must be"),
    ("generate-temperature-inf", lambda w, t, e: gen(w, "--temperature", "inf"), "temperature=inf must be a finite"),
    ("generate-top-p-2", lambda w, t, e: gen(w, "--top-p", "2"), "top_p=2.0 must be in (0, 1]"),
    ("generate-top-p-nan", lambda w, t, e: gen(w, "--top-p", "nan"), "top_p=nan must be in (0, 1]"),
    ("generate-top-k-0", lambda w, t, e: gen(w, "--top-k", "0"), "top_k=0 must be at least 1"),
    ("generate-max-new-tokens-0", lambda w, t, e: gen(w, "--max-new-tokens", "0"), "--max-new-tokens=0 must be at least 1"),
    ("generate-max-new-tokens-negative", lambda w, t, e: gen(w, "--max-new-tokens", "-1"), "--max-new-tokens=-1 must be"),
    ("generate-seed-2**70", lambda w, t, e: gen(w, "--seed", BIG), f"seed={BIG} must be an integer from 0 to 2**63 - 1"),
    ("generate-seed-negative", lambda w, t, e: gen(w, "--seed", "-1"), "seed=-1 must be an integer from 0"),
    ("generate-seed-2**63", lambda w, t, e: gen(w, "--seed", str(2**63)), "must be an integer from 0 to 2**63 - 1"),
    ("train-seed-2**70", lambda w, t, e: train(w, t, "--train.seed", BIG), f"train.seed={BIG} must be an integer"),
    ("train-seed-negative", lambda w, t, e: train(w, t, "--train.seed", "-1"), "train.seed=-1 must be an integer"),
    ("sae-seed-2**70", lambda w, t, e: sae_train(w, t, "--seed", BIG), f"--seed={BIG} must be an integer"),
    # 4. tokenizer train destinations (an existing directory, a file in the way, a file that is not a tokenizer)
    ("tokenizer-out-is-directory", lambda w, t, e: tok_train(t, t), "is a directory; give the tokenizer file to write"),
    ("tokenizer-out-under-a-file", lambda w, t, e: tok_train(t, write(t / "f", "x") / "tok.json"),
     "f is not a directory; choose another --out"),
    ("tokenizer-out-is-the-corpus", lambda w, t, e: tok_train(t, write(t / "c.txt", "my corpus " * 40), "--source",
                                                             str(t / "c.txt")),
     "exists and is not a tokenizer.json; refusing to replace it"),
    pytest.param("tokenizer-out-read-only-parent", lambda w, t, e: (os.chmod(t, 0o555), tok_train(t, t / "tok.json"))[1],
                 "is not writable", marks=AS_ROOT),
    ("tokenizer-vocab-2**70", lambda w, t, e: tok_train(t, t / "tok.json", "--vocab-size", BIG), "at most 2**32"),
    ("tokenizer-source-fifo", lambda w, t, e: tok_train(t, t / "tok.json", "--source",
                                                       str(source_dir(t, lambda d: e.fifo(d / "x.txt")))),
     "x.txt is a FIFO, not a regular file"),
    ("tokenizer-hf-without-datasets", with_env(lambda e: e.datasets(None),
                                               lambda w, t, e: tok_train(t, t / "tok.json", "--source", "hf:/x")),
     "hf: sources need the Hugging Face `datasets` package"),
    # 5. prepare sources that are not regular files, and the empty source
    ("prepare-dangling-symlink", lambda w, t, e: pre(source_dir(t, lambda d: os.symlink(t / "gone.txt", d / "b.txt")), t),
     "b.txt is a broken symbolic link"),
    ("prepare-symlink-loop", lambda w, t, e: pre(source_dir(t, lambda d: (os.symlink(d / "c.txt", d / "b.txt"),
                                                                          os.symlink(d / "b.txt", d / "c.txt"))), t),
     "b.txt is a symbolic link loop"),
    ("prepare-fifo-in-directory", lambda w, t, e: pre(source_dir(t, lambda d: e.fifo(d / "x.txt")), t),
     "x.txt is a FIFO, not a regular file"),
    ("prepare-fifo-matched-by-glob", lambda w, t, e: pre(str(source_dir(t, lambda d: e.fifo(d / "x.txt")) / "*.txt"), t),
     "x.txt is a FIFO, not a regular file"),
    ("prepare-empty-source", lambda w, t, e: pre("", t), "the data source is empty"),
    ("prepare-damaged-gzip-stream", lambda w, t, e: pre(damaged_gzip(t), t), "is not a valid gzip file"),
    ("prepare-truncated-gzip", lambda w, t, e: pre(write(t / "c.jsonl.gz", gzip.compress(b'{"text": "a"}\n' * 99)[:30]), t),
     "is not a valid gzip file (Compressed file ended"),
    # 6. generation past the positions (RoPE runs past block_size: see test_rope_generates_past_block_size)
    ("generate-gpt2-past-block-size", lambda w, t, e: gen(w, "--max-new-tokens", "200"),
     "exceeds the model's block_size=64 (learned positions)"),
    ("generate-llama-10**12-tokens", lambda w, t, e: gen(w, "--max-new-tokens", str(10**12), run=w.llama),
     "is more than a KV cache can hold"),
    # 7. token ids beyond the vocabulary (the train case, which fails at its first batch, is below)
    ("eval-shard-id-beyond-vocab", out_of_vocab_val, "holds token id 300 (at token 5) but the data's byte tokenizer has 257"),
    ("train-gpt2-data-vocab-257", lambda w, t, e: ["train", *MODEL, *FAST, "--data.path", str(w.gpt2),
                                                   "--train.out_dir", str(t / "out")],
     "the model has vocab_size 257 but the data's gpt2 tokenizer has 50257 tokens"),
    ("eval-gpt2-data-on-byte-model", lambda w, t, e: ["eval", str(w.run), "--data", str(w.gpt2)],
     "data was prepared with a different tokenizer"),
    # 8. Hugging Face sources that fail
    ("prepare-hf-without-datasets", with_env(lambda e: e.datasets(None), lambda w, t, e: pre("hf:/nonexistent", t)),
     "hf: sources need the Hugging Face `datasets` package"),
    ("prepare-hf-offline", with_env(lambda e: e.datasets(fake_datasets(hub_offline)),
                                    lambda w, t, e: pre("hf:/nonexistent", t)),
     "cannot load Hugging Face dataset '/nonexistent' split 'train': ConnectionError: Couldn't reach"),
    ("prepare-hf-fails-while-streaming", with_env(lambda e: e.datasets(fake_datasets(dies_midway)),
                                                  lambda w, t, e: pre("hf:some/corpus:val", t)),
     "cannot load Hugging Face dataset 'some/corpus' split 'val'"),
    # eval arguments
    ("eval-seq-len-0", lambda w, t, e: ["eval", str(w.run), "--seq-len", "0"], "seq_len=0"),
    ("eval-batch-size-0", lambda w, t, e: ["eval", str(w.run), "--batch-size", "0"], "batch_size=0 must be positive"),
    ("eval-stride-0", lambda w, t, e: ["eval", str(w.run), "--stride", "0"], "stride=0 must be in [1, seq_len=32]"),
    ("eval-stride-above-window", lambda w, t, e: ["eval", str(w.run), "--stride", "33"], "stride=33 must be in"),
    ("eval-split-test", lambda w, t, e: ["eval", str(w.run), "--split", "test"], "invalid choice: 'test'"),
    ("eval-unknown-task", lambda w, t, e: ["eval", str(w.run), "--tasks", "mmlu"], "unknown task 'mmlu'"),
    ("eval-limit-without-tasks", lambda w, t, e: ["eval", str(w.run), "--limit", "5"], "--limit applies to zero-shot"),
    ("eval-tasks-with-text", lambda w, t, e: ["eval", str(w.run), "--tasks", "piqa", "--text", "x.txt"],
     "--text apply to perplexity, not to --tasks"),
    ("eval-text-is-directory", lambda w, t, e: ["eval", str(w.run), "--text", str(t)], "is not a regular file"),
    ("eval-data-missing", lambda w, t, e: ["eval", str(w.run), "--data", str(t / "none")], "does not exist"),
    ("eval-text-missing", lambda w, t, e: ["eval", str(w.run), "--text", str(t / "none.txt")], "none.txt does not exist"),
    ("generate-checkpoint-missing", lambda w, t, e: ["generate", str(t / "none")], "no checkpoint found"),
    ("eval-checkpoint-is-a-file", lambda w, t, e: ["eval", str(write(t / "f", "x"))], "no checkpoint found"),
    # hand-edited data manifests
    ("data-split-tokens-not-int", manifest_edit(lambda m: m["splits"]["val"].update(tokens="many")),
     "split val needs integer tokens, documents and bytes"),
    ("data-split-without-documents", manifest_edit(lambda m: m["splits"]["val"].pop("documents")),
     "split val needs integer tokens, documents and bytes"),
    ("data-split-tokens-not-its-shards", manifest_edit(lambda m: m["splits"]["val"].update(tokens=10**9)),
     "tokens equal to its shards'"),
    ("data-tokenizer-vocab-text", manifest_edit(lambda m: m["tokenizer"].update(vocab_size="257")),
     "no tokenizer name and vocab_size"),
    # hand-edited checkpoints (manifest resealed, so only the edit is wrong)
    ("ckpt-config-wider-model", ck_edit("config.yaml", lambda b: b.replace(b"n_embd: 32", b"n_embd: 64")),
     "model.wte.weight has shape (320, 32), the model (320, 64)"),
    ("ckpt-config-deeper-model", ck_edit("config.yaml", lambda b: b.replace(b"n_layer: 2", b"n_layer: 3")),
     "lacks model.blocks.2"),
    ("ckpt-config-other-method", ck_edit("config.yaml", lambda b: b.replace(b"method: ntp", b"method: ponder")),
     "its manifest says method 'ntp' but its config.yaml says 'ponder'"),
    ("ckpt-config-recursive-alias", ck_edit("config.yaml", b"model: &m\n  arch: gpt2\n  again: *m\n"),
     "unknown config key 'model.again'"),
    ("ckpt-weights-of-a-llama", lambda w, t, e: ck_edit("model.safetensors", llama_weights(w), cmd="generate")(w, t, e),
     "unexpected tensors); its config.yaml does not describe these weights"),
    ("ckpt-manifest-without-tokenizer", ck_edit("manifest.json", json_edit(lambda m: m.pop("tokenizer")),
                                                do_reseal=False), "records no tokenizer"),
    ("ckpt-manifest-data-not-a-path", ck_edit("manifest.json", json_edit(lambda m: m.update(data=3)), do_reseal=False),
     "records data=3, not a path"),
    # generate / steering
    ("generate-steer-alpha-nan", lambda w, t, e: gen(w, "--steer", "1=nan", run=w.cocomix), "ALPHA must be a finite"),
    ("generate-steer-twice", lambda w, t, e: gen(w, "--steer", "1=2", "--steer", "1=3", run=w.cocomix),
     "--steer names concept 1 twice"),
    ("generate-steer-unknown-concept", lambda w, t, e: gen(w, "--steer", "99999=2", run=w.cocomix),
     "steering concepts [99999] are not in [0, 64)"),
    ("generate-steer-not-pair", lambda w, t, e: gen(w, "--steer", "7", run=w.cocomix), "is not CONCEPT=ALPHA"),
    ("generate-steer-prompt-alone", lambda w, t, e: gen(w, "--steer-prompt", run=w.cocomix),
     "--steer-prompt only changes how --steer applies"),
    # train --resume from a hand-edited trainer_state.json
    ("resume-state-truncated", resume_with_state(lambda b: b[:10]), "trainer_state.json is damaged"),
    ("resume-state-not-utf8", resume_with_state(lambda b: b"\xff" + b), "trainer_state.json is damaged"),
    ("resume-state-no-loader", resume_with_state(state_json(lambda s: s.pop("loader"))), "trainer_state.json is damaged"),
    ("resume-state-step-text", resume_with_state(state_json(lambda s: s.update(step="two"))),
     "trainer_state.json is damaged"),
    ("resume-state-other-step", resume_with_state(state_json(lambda s: s.update(step=7))),
     "records step 7 but the checkpoint is step_00000002"),
    ("resume-state-cursor-past-data", resume_with_state(state_json(lambda s: s["loader"].update(cursor=10**9))),
     "checkpoint cursor 1000000000 exceeds"),
    # config YAML
    ("config-recursive-alias", config("train: &t\n  again: *t\n"), "holds an alias that contains itself"),
    ("config-alias-bomb", config(yaml_bomb()), "values once its aliases are expanded"),
    ("config-duplicate-key", config("train:\n  lr: 0.1\n  lr: 0.2\n"), "key 'lr' is given twice in one mapping; keep one (line 3)"),
    ("config-tab-indent", config("model:\n\tn_layer: 2\n"), "found character '\\t' that cannot start any token (line 2)"),
    ("config-python-tag", config("train: !!python/object/apply:os.system ['touch pwned']\n"),
     "could not determine a constructor"),
    ("config-is-a-directory", lambda w, t, e: ["train", "--config", str(t)], "is a directory; pass a YAML file or a preset name"),
    ("config-nested-3000-deep", config("train: " + "[" * 3000 + "]" * 3000 + "\n"), "nests too deeply to be a config"),
    ("config-override-without-value", lambda w, t, e: train(w, t, "--train.lr"), "override --train.lr has no value"),
    ("config-device-mps", lambda w, t, e: train(w, t, "--train.device", "mps"), "train.device='mps' is not one of"),
    # sae train / concepts
    ("sae-seq-len-0", lambda w, t, e: sae_train(w, t, "--seq-len", "0"), "--seq-len 0 must be from 1 to the teacher"),
    ("sae-seq-len-past-teacher", lambda w, t, e: sae_train(w, t, "--seq-len", "100"),
     "--seq-len 100 must be from 1 to the teacher's block_size 64"),
    ("sae-k-0", lambda w, t, e: sae_train(w, t, "--k", "0"), "1 <= k <= n_latents"),
    ("sae-latents-0", lambda w, t, e: sae_train(w, t, "--latents", "0"), "--latents 0 must satisfy 1 <= k <= n_latents"),
    ("sae-latents-10**13", lambda w, t, e: sae_train(w, t, "--latents", str(10**13)),  # 1.3 PB: beyond any address space
     "error: out of memory ("),
    ("label-k-attr-0", lambda w, t, e: label(w, t, "--k-attr", "0"), "k_attr must be at least 1"),
    ("label-seq-len-past-teacher", lambda w, t, e: label(w, t, "--seq-len", "100"),  # the last --seq-len counts
     "--seq-len 100 must be from 1 to the teacher's block_size 64"),
    ("contexts-seq-len-past-teacher", lambda w, t, e: contexts(w, t, "--seq-len", "100"),
     "--seq-len 100 must be from 1 to the teacher's block_size 64"),
    ("label-sae-layer-text", sae_meta_edit(lambda c: c["latentlm"].update(layer="zero")),
     "records teacher layer 'zero', not a block number"),
    ("inspect-sae-missing", lambda w, t, e: ["concepts", "inspect", str(w.cocomix), "--text", "hi", "--sae",
                                             str(t / "nosae")], "is not a directory"),
    ("inspect-empty-text", lambda w, t, e: ["concepts", "inspect", str(w.cocomix), "--text", ""], "must be 1..64 tokens"),
    ("inspect-top-0", lambda w, t, e: ["concepts", "inspect", str(w.cocomix), "--text", "hi", "--top", "0"],
     "top must be in [1, 64]"),
    # flops, export, import
    ("flops-context-0", lambda w, t, e: ["flops", *MODEL, "--context", "0"], "--context 0 must be at least 1"),
    ("flops-unknown-method", lambda w, t, e: ["flops", *MODEL, "--methods", "ntp,magic"], "unknown method 'magic'"),
    ("export-cocomix", lambda w, t, e: ["export", str(w.cocomix), "--hf", str(t / "hf")], "not a plain next-token model"),
    ("import-config-list", lambda w, t, e: ["import", "--hf", str(hf_dir(t, "[]")), "--out", str(t / "out")],
     "holds a JSON list, not an object"),
    # compare experiment files
    ("compare-budget-inf", compare_with(budget="{tokens: .inf}"), "budget needs exactly one positive number"),
    ("compare-budget-nan", compare_with(budget="{tokens: .nan}"), "budget needs exactly one positive number"),
    ("compare-budget-bool", compare_with(budget="{tokens: true}"), "budget needs exactly one positive number"),
    ("compare-out-dir-number", compare_with(out_dir="3"), "out_dir=3 in"),
    ("compare-duplicate-key", lambda w, t, e: ["compare", str(write(t / "exp.yaml", experiment(w, t) + "runs: {}\n"))],
     "key 'runs' is given twice"),
    ("compare-recursive-alias", compare_with(data="&d {path: x, again: *d}"), "holds an alias that contains itself"),
    ("compare-alias-bomb", compare(yaml_bomb()), "values once its aliases are expanded"),
    # demo
    ("demo-out-is-a-file", lambda w, t, e: ["demo", "--out", str(write(t / "f", "x"))],
     "cannot create the demo directory"),
    ("demo-out-under-a-file", lambda w, t, e: ["demo", "--out", str(write(t / "f", "x") / "d")],
     "cannot create the demo directory"),
]


def _ids(cases: list) -> list[str]:
    return [c.values[0] if hasattr(c, "values") else c[0] for c in cases]


@pytest.mark.parametrize("name, build, needle", CASES, ids=_ids(CASES))
def test_bad_input_is_one_line_and_writes_nothing(name, build, needle, world, tmp_path, capsys, monkeypatch):
    env = Env(monkeypatch)
    argv = build(world, tmp_path, env)
    if argv[0] in QUIET or tuple(argv[:2]) in QUIET or argv[0] == "compare":
        argv.append("--quiet")  # progress bars are not error output
    before, shared = snapshot(tmp_path), snapshot(world.root)
    capsys.readouterr()
    try:
        try:
            code = main(argv)
        except SystemExit as e:  # argparse's own errors
            code = e.code
    finally:
        for cleanup in env.cleanups:
            cleanup()
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert snapshot(tmp_path) == before and snapshot(world.root) == shared  # nothing written, not even a lock
    assert not (tmp_path / "pwned").exists()


def test_train_stops_at_a_token_beyond_the_vocabulary(world, tmp_path, capsys):
    """A shard edited by hand (sha256 resealed, so the manifest check passes) with ids past the vocabulary:
    the first batch holding one stops the run with one line, before the embedding sees it."""
    d = tmp_path / "data"
    shutil.copytree(world.data, d)
    tokens = np.fromfile(d / "train_000.bin", dtype="<u2")
    tokens[::20] = 65535  # every window holds one
    tokens.tofile(d / "train_000.bin")
    m = json.loads((d / "manifest.json").read_text())
    m["splits"]["train"]["shards"][0]["sha256"] = sha256_file(d / "train_000.bin")
    (d / "manifest.json").write_text(json.dumps(m))
    capsys.readouterr()
    assert main(["train", *MODEL, *FAST, "--data.path", str(d), "--train.out_dir", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "train_000.bin holds token id 65535" in lines[0] and "257 ids" in lines[0], lines
    assert not (tmp_path / "out" / "checkpoints").exists()  # stopped at step 0: nothing to resume from


@pytest.mark.parametrize("cmd", [["eval"], ["generate", "--max-new-tokens", "2"]])
def test_device_auto_runs_on_the_cpu_without_cuda(cmd, world, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([cmd[0], str(world.run), "--device", "auto", *cmd[1:]] + (["--quiet"] if cmd[0] == "eval" else [])) == 0
    assert capsys.readouterr().err.count("error") == 0


@pytest.mark.parametrize("argv", [["eval", "R"], ["generate", "R"], ["sae", "train", "--teacher", "T", "--layer", "0",
                                  "--data", "D", "--out", "O"],
                                  ["concepts", "label", "--teacher", "T", "--sae", "S", "--data", "D", "--out", "O",
                                   "--seq-len", "8"],
                                  ["concepts", "contexts", "--teacher", "T", "--sae", "S", "--data", "D"],
                                  ["concepts", "inspect", "R", "--text", "x"]])
def test_device_defaults_to_auto(argv):
    assert build_parser().parse_args(argv).device == "auto"  # like train.device: CUDA if available, else CPU


def test_rope_generates_past_block_size(world, capsys):
    """RoPE has no position table: generation may run past block_size (only learned positions refuse)."""
    capsys.readouterr()
    assert main(["generate", str(world.llama), "--max-new-tokens", "100", "--temperature", "0", "--no-stop",
                 "--quiet"]) == 0
    assert capsys.readouterr().err == ""


def test_tokenizer_train_creates_missing_parents_and_replaces_a_tokenizer(tmp_path):
    out = tmp_path / "a" / "b" / "tok.json"
    for _ in range(2):  # the second run replaces the tokenizer.json the first wrote
        assert main(["tokenizer", "train", "--limit", "20", "--vocab-size", "300", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["tok.json"]


def test_a_fifo_given_directly_is_read(tmp_path):
    """Only a directory or glob refuses FIFOs: one named as the source (``<(zcat corpus.gz)``) is read."""
    fifo = tmp_path / "pipe.jsonl"
    os.mkfifo(fifo)

    def feed() -> None:
        with open(fifo, "w") as f:
            f.writelines(json.dumps({"text": f"document {i} arrives through a pipe"}) + "\n" for i in range(20))

    thread = threading.Thread(target=feed, daemon=True)
    thread.start()
    assert main(pre(fifo, tmp_path, "--val-fraction", "0.3", "--quiet")) == 0
    thread.join()
    assert (tmp_path / "out" / "manifest.json").is_file()
