"""Shared fixtures for the test suite."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def gguf_cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """latentlm's cache of converted GGUF models (latentlm.gguf_cache) in a session directory, so tests
    never write to ~/.cache; a LATENTLM_CACHE_DIR set by the caller is kept (a warm cache for reruns)."""
    import os

    from latentlm.gguf_cache import CACHE_ENV

    if not os.environ.get(CACHE_ENV):
        os.environ[CACHE_ENV] = str(tmp_path_factory.mktemp("latentlm-cache"))
    return Path(os.environ[CACHE_ENV])


@pytest.fixture(scope="session")
def bpe_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """tokenizer.json of a small byte-level BPE (512 ids) trained on 300 wiki documents."""
    from latentlm.data.sources import iter_documents
    from latentlm.data.tokenizers import train_bpe

    path = tmp_path_factory.mktemp("bpe") / "tokenizer.json"
    train_bpe(iter_documents("wiki", limit=300), 512, path)
    return path


@pytest.fixture
def write_jsonl(tmp_path: Path) -> Callable[..., Path]:
    """Factory: write documents as a JSONL file under tmp_path and return its path."""

    def write(docs: list[str], name: str = "corpus.jsonl", field: str = "text") -> Path:
        path = tmp_path / name
        with open(path, "w", encoding="utf-8") as f:
            for doc in docs:
                f.write(json.dumps({field: doc}) + "\n")
        return path

    return write


@pytest.fixture
def one_thread():
    """Run a test single-threaded: for tiny models a second intra-op thread only adds spin-waiting,
    which costs minutes when another process holds a core of a small machine. Test files opt in
    with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# The config key holding K (thoughts / pauses / extra passes / ponder steps per token) of each method.
K_KEYS = {"ponder": "ponder.n_thoughts", "pause": "pause.n_pauses", "loop": "loop.n_loops",
          "ponderlm": "ponderlm.n_steps"}


def k_override(method: str, k: int) -> list[str]:
    """``--<section>.<key> K`` setting ``method``'s K (nothing for a method without one)."""
    return ["--" + K_KEYS[method], str(k)] if method in K_KEYS else []


TINY_MODEL = {"arch": "gpt2", "vocab_size": 257, "block_size": 64, "n_layer": 2, "n_head": 2, "n_embd": 32}


@pytest.fixture(scope="session")
def byte_wiki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Byte-level token shards of 400 real Wikipedia lead sections (the embedded corpus)."""
    from latentlm.data.prepare import prepare
    from latentlm.data.tokenizers import load_tokenizer

    out = tmp_path_factory.mktemp("data") / "wiki-byte"
    prepare("wiki", load_tokenizer("byte"), out, val_fraction=0.05, limit=400, workers=1, progress=False)
    return out


@pytest.fixture
def tiny_config(byte_wiki: Path, tmp_path: Path):
    """Factory: a validated tiny NTP config on ``byte_wiki`` writing to tmp_path/run."""
    from latentlm.config import make_config

    def make(**train) -> "latentlm.config.Config":  # noqa: F821
        base = {"model": dict(TINY_MODEL), "data": {"path": str(byte_wiki)},
                "train": {"out_dir": str(tmp_path / "run"), "batch_size": 4, "max_steps": 12, "lr": 3e-3,
                          "min_lr": 3e-4, "warmup_steps": 2, "eval_every": 0, "eval_batches": 2,
                          "ckpt_every": 0, "log_every": 1, "progress": False, **train}}
        return make_config(base=base)

    return make


def recorded_generate(method, prompts: list[list[int]], max_new_tokens: int):
    """Greedy ``generate`` that also returns the logits of every ``method.step`` call (prefill
    first), for checking cached decoding against a parallel forward."""
    from latentlm.generate import generate

    seen, step = [], method.step

    def recording(idx, position_ids, valid, cache):
        logits = step(idx, position_ids, valid, cache)
        seen.append(logits.clone())
        return logits

    method.step = recording
    try:
        outs = generate(method, prompts, max_new_tokens=max_new_tokens, temperature=0.0)
    finally:
        del method.step
    return outs, seen


def assert_cached_matches_parallel(method, prompts: list[list[int]], parallel_logits,
                                   max_new_tokens: int = 5) -> None:
    """Greedy cached generation from the left-padded batch ``prompts`` gives, at every prefill and
    decode position of each row, the logits ``parallel_logits(x)`` [1, T, V] of the row's whole
    sequence run in parallel, and the tokens greedy decoding of those logits picks."""
    import torch

    outs, seen = recorded_generate(method, prompts, max_new_tokens)
    assert [len(o) for o in outs] == [max_new_tokens] * len(prompts) and len(seen) == max_new_tokens
    width = max(len(p) for p in prompts)
    for row, (prompt, out) in enumerate(zip(prompts, outs)):
        with torch.no_grad():
            parallel = parallel_logits(torch.tensor([prompt + out]))[0]
        torch.testing.assert_close(seen[0][row, width - len(prompt):], parallel[:len(prompt)], atol=1e-4, rtol=0)
        for i, logits in enumerate(seen[1:], start=1):
            torch.testing.assert_close(logits[row, -1], parallel[len(prompt) - 1 + i], atol=1e-4, rtol=0)
        assert out == parallel[len(prompt) - 1:-1].argmax(-1).tolist()


# gloo on CPU occasionally aborts one torchrun worker in C++ ("terminate called without an active
# exception", exit -6) although the run itself is sound; seen in about 1 of 3 full-suite runs on a
# 2-core machine, never reproduced alone. Only that exact signature is retried, once.
GLOO_ABORT = "terminate called without an active exception"


def run_torchrun(cmd: list[str], *, before_retry=None, **kw):
    """``subprocess.run(cmd, **kw)`` of a torchrun launch, retried once after a gloo worker abort
    (``before_retry()`` first, e.g. to clear a partial run directory)."""
    import subprocess

    proc = subprocess.run(cmd, **kw)
    if proc.returncode != 0 and GLOO_ABORT in (proc.stderr or "") and "exitcode  : -6" in (proc.stderr or ""):
        if before_retry is not None:
            before_retry()
        proc = subprocess.run(cmd, **kw)
    return proc


def random_sae_for(teacher_run, out, latents: int = 64, k: int = 4, layer: int = 0):
    """A seeded random TopK SAE saved to ``out`` whose meta names the teacher run ``teacher_run``
    (so teacher / layer / tokenizer checks accept the pair); returns its directory."""
    import torch

    from latentlm.concepts.sae import TopKSAE, save_sae
    from latentlm.concepts.teacher import load_teacher

    teacher = load_teacher(str(teacher_run))
    torch.manual_seed(0)
    meta = {"teacher": teacher.describe(), "layer": layer, "tokenizer_fingerprint": teacher.tokenizer.fingerprint()}
    return save_sae(TopKSAE(teacher.d_model, latents, k, meta), out)


# A ChatML template in the style of SmolLM2-Instruct's (a default system turn; bos_token used as
# a variable, so rendering must pass the special tokens as transformers does).
CHATML_TEMPLATE = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
                   "{{ bos_token + 'system\\nYou are a tiny test model.<|im_end|>\\n' }}{% endif %}"
                   "{{ bos_token + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
                   "{% endfor %}{% if add_generation_prompt %}{{ bos_token + 'assistant\\n' }}{% endif %}")
HF_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")  # ids 0, 1, 2 as in SmolLM2; bytes are 3..258


def tiny_hf_tokenizer(directory: Path, chat_template: str | None = CHATML_TEMPLATE) -> Path:
    """A Hugging Face tokenizer directory built with ``tokenizers`` only (no transformers): byte-level
    BPE without merges (byte b is id 3 + b) and SmolLM2's special-token layout, <|endoftext|> 0 (the
    document separator), bos <|im_start|> 1, eos and pad <|im_end|> 2."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from latentlm.data.tokenizers import _gpt2_byte_to_unicode

    vocab = {t: i for i, t in enumerate(HF_SPECIALS)}
    vocab.update({ch: 3 + b for b, ch in _gpt2_byte_to_unicode().items()})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(HF_SPECIALS))
    directory.mkdir(parents=True, exist_ok=True)
    tok.save(str(directory / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|im_start|>",
              "eos_token": {"__type": "AddedToken", "content": "<|im_end|>", "lstrip": False, "normalized": False,
                            "rstrip": False, "single_word": False, "special": True}, "pad_token": "<|im_end|>",
              "unk_token": "<|endoftext|>", "model_max_length": 64, "clean_up_tokenization_spaces": False}
    if chat_template is not None:
        config["chat_template"] = chat_template
    (directory / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return directory
