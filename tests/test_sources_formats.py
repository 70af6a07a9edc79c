"""Corpus files read by extension: Parquet (pyarrow) and JSON arrays / JSON Lines under .json, with
the text field choosing the column or key, and one-line errors naming what the file has instead."""

from __future__ import annotations

import json
import sys

import pytest

from latentlm.cli import main
from latentlm.data.sources import describe_source, iter_documents
from latentlm.errors import LatentLMError

pa = pytest.importorskip("pyarrow", reason="Parquet sources need pyarrow (pip install pyarrow)")
import pyarrow.parquet as pq  # noqa: E402

DOCS = ["The river flows north.", "Ünïcode — “quotes” and 世界.", "", None, "Last one.\nTwo lines."]


def write_parquet(path, docs=DOCS, row_group_size=2, **extra) -> None:
    table = pa.table({"id": list(range(len(docs))), "body": docs, **extra})
    pq.write_table(table, path, row_group_size=row_group_size)


def test_parquet_rows_are_documents_of_the_chosen_column(tmp_path):
    write_parquet(tmp_path / "c.parquet")
    want = [d for d in DOCS if d]  # empty and null rows are skipped
    assert list(iter_documents(str(tmp_path / "c.parquet"), text_field="body")) == want
    assert list(iter_documents(str(tmp_path / "c.parquet"), text_field="body", limit=2)) == want[:2]
    info = describe_source(str(tmp_path / "c.parquet"), text_field="body")
    assert info["kind"] == "parquet" and info["text_field"] == "body"
    # In a directory (and a glob) Parquet files are read with the text files, in sorted order.
    (tmp_path / "d").mkdir()
    write_parquet(tmp_path / "d" / "b.parquet", docs=["from parquet"])
    (tmp_path / "d" / "a.txt").write_text("from text")
    pq.write_table(pa.table({"text": ["default field"]}), tmp_path / "d" / "c.parquet")
    with pytest.raises(LatentLMError, match="no column 'body'"):
        list(iter_documents(str(tmp_path / "d"), text_field="body"))
    (tmp_path / "d" / "c.parquet").unlink()
    assert list(iter_documents(str(tmp_path / "d"), text_field="body")) == ["from text", "from parquet"]
    assert list(iter_documents(str(tmp_path / "d" / "*.parquet"), text_field="body")) == ["from parquet"]


def test_parquet_errors_name_the_columns(tmp_path, capsys):
    write_parquet(tmp_path / "c.parquet")
    assert main(["prepare", "--source", str(tmp_path / "c.parquet"), "--tokenizer", "byte",
                 "--out", str(tmp_path / "out"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "has no column 'text' (columns: id, body)" in err and "--text-field" in err
    assert not (tmp_path / "out").exists()
    with pytest.raises(LatentLMError, match="column 'id' is int64, not a string column"):
        list(iter_documents(str(tmp_path / "c.parquet"), text_field="id"))
    (tmp_path / "bad.parquet").write_bytes(b"PAR1 this is not parquet")
    with pytest.raises(LatentLMError, match="is not a valid Parquet file"):
        list(iter_documents(str(tmp_path / "bad.parquet")))


def test_parquet_without_pyarrow_says_how_to_install(tmp_path, monkeypatch):
    write_parquet(tmp_path / "c.parquet")
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(LatentLMError, match="needs pyarrow; install it with `pip install pyarrow`"):
        list(iter_documents(str(tmp_path / "c.parquet"), text_field="body"))


def test_prepare_and_tokenizer_train_read_parquet(tmp_path, capsys):
    from latentlm.data.loader import TokenSplit
    from latentlm.data.tokenizers import ByteTokenizer

    docs = [f"Document number {i} talks about rivers and mountains." for i in range(40)]
    write_parquet(tmp_path / "c.parquet", docs=docs, row_group_size=7)
    assert main(["prepare", "--source", str(tmp_path / "c.parquet"), "--text-field", "body", "--tokenizer", "byte",
                 "--out", str(tmp_path / "data"), "--val-fraction", "0.1", "--workers", "1", "--quiet"]) == 0
    tokens = sum(len(TokenSplit(str(tmp_path / "data"), s)) for s in ("train", "val"))
    assert tokens == sum(len(ByteTokenizer().encode(d)) + 1 for d in docs)  # every document plus its separator
    assert main(["tokenizer", "train", "--source", str(tmp_path / "c.parquet"), "--text-field", "body",
                 "--vocab-size", "300", "--out", str(tmp_path / "tok.json")]) == 0
    assert "byte-level BPE" in capsys.readouterr().out


def test_json_arrays_and_json_lines_under_a_json_name(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"text": "one"}, {"text": ""}, {"text": "two"}]))
    assert list(iter_documents(str(tmp_path / "a.json"))) == ["one", "two"]
    (tmp_path / "l.json").write_text('{"text": "x"}\n{"text": "y"}\n')
    assert list(iter_documents(str(tmp_path / "l.json"))) == ["x", "y"]
    assert describe_source(str(tmp_path / "a.json"))["kind"] == "json"
    (tmp_path / "k.json").write_text(json.dumps([{"content": "a", "meta": 1}]))
    with pytest.raises(LatentLMError, match=r"record 0 has no field 'text' \(found \['content', 'meta'\]\)"):
        list(iter_documents(str(tmp_path / "k.json")))
    assert list(iter_documents(str(tmp_path / "k.json"), text_field="content")) == ["a"]
    (tmp_path / "broken.json").write_text('[{"text": "a"},')
    with pytest.raises(LatentLMError, match="is not valid JSON"):
        list(iter_documents(str(tmp_path / "broken.json")))
