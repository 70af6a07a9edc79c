"""Concept inspection (docs/METHODS.md §2.7): top activating contexts of SAE latents and the concepts a
CoCoMix student predicts per token, on tiny artifacts built through the CLI."""

import json

import pytest
import torch

from latentlm.cli import main
from latentlm.concepts.inspect import (CONTEXTS_FILE, collect_top_contexts, inspect_text, load_contexts,
                                       save_contexts)
from latentlm.concepts.sae import load_sae
from latentlm.concepts.teacher import load_teacher
from latentlm.data.loader import TokenSplit, iter_eval_windows
from latentlm.errors import LatentLMError
from latentlm.loading import checkpoint_tokenizer, load_method

from conftest import TINY_MODEL

MODEL = [x for k, v in TINY_MODEL.items() for x in (f"--model.{k}", str(v))]
COMMON = ["--train.batch_size", "2", "--train.warmup_steps", "1", "--train.progress", "false",
          "--train.eval_batches", "1"]


@pytest.fixture(scope="module")
def artifacts(byte_wiki, tmp_path_factory):
    """A tiny NTP teacher, an SAE (16 latents, k 2, layer 0) and a CoCoMix student (labels on the fly)."""
    root = tmp_path_factory.mktemp("inspect")
    teacher, sae, student = root / "teacher", root / "sae", root / "student"
    assert main(["train", *MODEL, "--data.path", str(byte_wiki), "--train.out_dir", str(teacher),
                 "--train.max_steps", "3", *COMMON]) == 0
    assert main(["sae", "train", "--teacher", str(teacher), "--layer", "0", "--data", str(byte_wiki),
                 "--out", str(sae), "--latents", "16", "--k", "2", "--steps", "20", "--batch-tokens", "256",
                 "--seq-len", "32", "--eval-tokens", "256", "--quiet"]) == 0
    assert main(["train", *MODEL, "--data.path", str(byte_wiki), "--train.out_dir", str(student),
                 "--train.method", "cocomix", "--teacher.path", str(teacher), "--concepts.sae", str(sae),
                 "--concepts.layer", "0", "--cocomix.insert_layer", "1", "--train.max_steps", "2",
                 *COMMON]) == 0
    return {"teacher": teacher, "sae": sae, "student": student, "data": byte_wiki}


def test_top_contexts_match_brute_force(artifacts):
    teacher, sae = load_teacher(str(artifacts["teacher"])), load_sae(artifacts["sae"])
    seq_len, top_n = 32, 3
    # 5 windows in batches of 2: the running top-n is merged across batches, one of them partial
    got = collect_top_contexts(teacher, sae, 0, artifacts["data"], seq_len=seq_len, batch_size=2,
                               max_tokens=5 * seq_len, top_n=top_n, left=3, right=2, progress=False)
    assert got["meta"]["tokens_scanned"] == 5 * seq_len
    split = TokenSplit(artifacts["data"], "val")
    with torch.no_grad():
        dense = torch.cat([sae.encode(sae.normalize(teacher.hidden(x, 0))[0]).flatten(0, 1)
                           for x, _ in iter_eval_windows(split, seq_len, 5, max_batches=1)])  # [160, C]
    active = torch.nonzero(dense.max(0).values > 0).flatten().tolist()
    assert active and sorted(map(int, got["concepts"])) == active
    tokens = split.get(0, 5 * seq_len)
    for c in active:
        top = got["concepts"][str(c)]["top"]
        want = dense[:, c].topk(top_n).values
        want = want[want > 0]
        assert torch.allclose(torch.tensor([t["activation"] for t in top]), want, atol=1e-5)
        for t in top:  # each location really has that activation
            i = t["window"] * seq_len + t["position"]
            assert dense[i, c].item() == pytest.approx(t["activation"], abs=1e-5)
            marked = teacher.tokenizer.decode([int(tokens[i])]).replace("\n", "\\n")
            assert f"[[{marked}]]" in t["snippet"]
        best = dense[:, c]
        if (best == best.max()).sum() == 1:  # a unique maximum sits where the dense argmax is
            assert top[0]["window"] * seq_len + top[0]["position"] == int(best.argmax())
        assert got["concepts"][str(c)]["description"] == top[0]["snippet"]


def test_contexts_round_trip(artifacts, tmp_path):
    teacher, sae = load_teacher(str(artifacts["teacher"])), load_sae(artifacts["sae"])
    got = collect_top_contexts(teacher, sae, 0, artifacts["data"], seq_len=32, max_tokens=64, top_n=2,
                               progress=False)
    sae_dir = tmp_path / "sae"
    sae_dir.mkdir()
    for f in artifacts["sae"].iterdir():
        (sae_dir / f.name).write_bytes(f.read_bytes())
    assert load_contexts(sae_dir) is None
    save_contexts(got, sae_dir)
    assert load_contexts(sae_dir) == json.loads(json.dumps(got))
    assert got["meta"]["manifest_sha256"] and got["meta"]["sae"]["n_latents"] == 16
    (sae_dir / CONTEXTS_FILE).write_text("{")
    with pytest.raises(LatentLMError, match="not valid JSON"):
        load_contexts(sae_dir)


def test_inspect_text_is_topk_of_z(artifacts):
    method, _, manifest = load_method(artifacts["student"])
    tok = checkpoint_tokenizer(artifacts["student"], manifest)
    text = "The cat sat."
    fake = {"meta": {"sae": {"n_latents": 16}}, "concepts": {"3": {"description": "three"}}}
    records = inspect_text(method, tok, text, top=4, contexts=fake)
    ids = tok.encode(text)
    with torch.no_grad():
        _, z = method.run(torch.tensor([ids]), torch.arange(len(ids))[None])
    want_vals, want_ids = z[0].topk(4, dim=-1)
    assert [r["token_id"] for r in records] == ids and "".join(r["token"] for r in records) == text
    for r, wv, wi in zip(records, want_vals, want_ids):
        assert [c["id"] for c in r["concepts"]] == wi.tolist()
        assert [c["z"] for c in r["concepts"]] == pytest.approx(wv.tolist())
        for c in r["concepts"]:
            assert c["description"] == ("three" if c["id"] == 3 else "(never active in the scanned corpus)")
    teacher, _, _ = load_method(artifacts["teacher"])
    with pytest.raises(LatentLMError, match="needs a checkpoint of a method with concepts"):
        inspect_text(teacher, tok, text)


def test_cli_contexts_and_inspect(artifacts, capsys):
    text = "Hello"
    capsys.readouterr()
    assert main(["concepts", "inspect", str(artifacts["student"]), "--text", text, "--top", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("(no description")
    assert len(lines) == 1 + len(text)  # one line per token
    for t, line in enumerate(lines[1:]):
        fields = line.split()
        assert int(fields[0]) == t and len([f for f in fields if "(" in f and f.endswith(")")]) == 3
    assert main(["concepts", "contexts", "--teacher", str(artifacts["teacher"]), "--sae", str(artifacts["sae"]),
                 "--data", str(artifacts["data"]), "--max-tokens", "128", "--seq-len", "32", "--top-n", "2",
                 "--quiet"]) == 0
    assert "contexts.json" in capsys.readouterr().out
    assert main(["concepts", "inspect", str(artifacts["student"]), "--text", text, "--top", "2", "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert len(records) == len(text) and all(len(r["concepts"]) == 2 for r in records)
    assert all(c["description"] for r in records for c in r["concepts"])
    assert main(["concepts", "inspect", str(artifacts["student"]), "--text", text, "--top", "2"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 3 * len(text)  # a token line, then one description line per concept
    assert main(["concepts", "inspect", str(artifacts["teacher"]), "--text", text]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "needs a checkpoint of a method with concepts" in err[0] and "'ntp'" in err[0]
