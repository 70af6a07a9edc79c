"""The steerability measurement (latentlm.concepts.steer_eval, benchmarks/steering.py) on tiny
artifacts: alpha = 1 is exactly no shift, the measured mass is the model's own next-token
probability (checked against a parallel forward), target selection and the control's draw."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from latentlm.cli import main
from latentlm.concepts.inspect import load_contexts
from latentlm.concepts.steer_eval import (concept_targets, measure_steering, select_concepts, steered_mass,
                                          token_frequencies)
from latentlm.data.loader import TokenSplit
from latentlm.errors import LatentLMError
from latentlm.loading import checkpoint_tokenizer, load_method

from conftest import TINY_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]
MODEL = [x for k, v in TINY_MODEL.items() for x in (f"--model.{k}", str(v))]
COMMON = ["--train.batch_size", "2", "--train.warmup_steps", "1", "--train.progress", "false", "--train.eval_batches", "1"]


@pytest.fixture(scope="module")
def artifacts(byte_wiki, tmp_path_factory):
    """A tiny teacher, its SAE (32 latents, k 4) with top contexts, a CoCoMix student and an NTP run."""
    root = tmp_path_factory.mktemp("steer")
    teacher, sae, student, ntp = root / "teacher", root / "sae", root / "student", root / "ntp"
    assert main(["train", *MODEL, "--data.path", str(byte_wiki), "--train.out_dir", str(teacher),
                 "--train.max_steps", "3", *COMMON]) == 0
    assert main(["sae", "train", "--teacher", str(teacher), "--layer", "0", "--data", str(byte_wiki), "--out", str(sae),
                 "--latents", "32", "--k", "4", "--steps", "20", "--batch-tokens", "256", "--seq-len", "32",
                 "--eval-tokens", "256", "--quiet"]) == 0
    assert main(["concepts", "contexts", "--teacher", str(teacher), "--sae", str(sae), "--data", str(byte_wiki),
                 "--seq-len", "32", "--max-tokens", "2048", "--top-n", "6"]) == 0
    assert main(["train", *MODEL, "--data.path", str(byte_wiki), "--train.out_dir", str(student),
                 "--train.method", "cocomix", "--teacher.path", str(teacher), "--concepts.sae", str(sae),
                 "--concepts.layer", "0", "--cocomix.insert_layer", "1", "--train.max_steps", "3", *COMMON]) == 0
    assert main(["train", *MODEL, "--data.path", str(byte_wiki), "--train.out_dir", str(ntp),
                 "--train.max_steps", "1", *COMMON]) == 0
    return {"sae": sae, "student": student, "ntp": ntp, "data": byte_wiki}


def _measure(artifacts, **kw):
    method, cfg, manifest = load_method(artifacts["student"])
    contexts = load_contexts(artifacts["sae"])
    split = TokenSplit(artifacts["data"], "val")
    args = dict(val=split, scanned=split, alphas=[1.0, 8.0], n_concepts=2, n_prompts=3, prompt_len=8, new_tokens=3,
                stop=20, batch_size=2, samples=1)
    args.update(kw)
    return method, measure_steering(method, checkpoint_tokenizer(artifacts["student"], manifest), contexts, **args)


def test_alpha_one_is_no_shift_and_the_control_is_another_concept(artifacts):
    method, r = _measure(artifacts)
    assert r["n_prompts"] == 3 and len(r["concepts"]) == 2
    for c in r["concepts"]:
        one = next(a for a in c["alphas"] if a["alpha"] == 1.0)
        assert one["shifts"] == [0.0] * 3 and one["control_shifts"] == [0.0] * 3  # multiplying by 1 changes nothing
        assert c["control"] != c["concept"] and str(c["control"]) in load_contexts(artifacts["sae"])["concepts"]
        assert 0.0 < c["base_mass"]["mean"] < 1.0
    again = _measure(artifacts)[1]
    assert [c["control"] for c in again["concepts"]] == [c["control"] for c in r["concepts"]]  # seeded draw
    assert again["concepts"][0]["alphas"][1]["shifts"] == r["concepts"][0]["alphas"][1]["shifts"]
    assert r["generations"] and set(r["generations"][0]) >= {"unsteered", "steered", "prompt"}
    assert method.concept_head.steer_ids == []  # steering is cleared after the measurement


def test_mass_is_the_models_next_token_probability(artifacts):
    method, _, _ = load_method(artifacts["student"])
    split = TokenSplit(artifacts["data"], "val")
    prompts = torch.as_tensor(np.stack([split.get(0, 8), split.get(9, 8)]).astype(np.int64))
    targets = [101, 32, 116]
    got = steered_mass(method, prompts, targets, None, new_tokens=1)
    with torch.no_grad():
        want = method.eval_logits(prompts)[:, -1].float().softmax(-1)[:, targets].sum(-1).double()
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    # Steering the concept the student predicts most at the last prompt token (so it is in the TopK) moves the mass.
    with torch.no_grad():
        top = int(method.concept_logits(prompts)[0, -1].argmax())
    moved = steered_mass(method, prompts, targets, (top, 25.0), new_tokens=1)
    assert not torch.equal(moved, got)
    assert torch.equal(steered_mass(method, prompts, targets, (top, 1.0), new_tokens=1), got)


def test_targets_and_selection():
    class Split:
        tokens = np.arange(100) % 10

        def __len__(self):
            return 100

        def get(self, start, length):
            return self.tokens[start:start + length]

    contexts = {"meta": {"seq_len": 10}, "concepts": {
        "3": {"top": [{"window": 2, "position": 5}, {"window": 4, "position": 5}]},
        "7": {"top": [{"window": 0, "position": 0}]}}}
    t = concept_targets(contexts, Split(), stop={0}, left=2, right=1)
    assert t[3] == [{3, 4, 5, 6}, {3, 4, 5, 6}] and t[7] == [{1}]  # position 25 -> ids 23..26 = 3,4,5,6
    chosen = select_concepts({1: [{5, 6}, {5}, {6, 7}, {5, 8}], 2: [{9}, {9}, {9}, {9}], 3: [{1}]}, 5)
    assert [c["concept"] for c in chosen] == [2, 1]  # 3 has too few contexts; 2 is pure
    assert chosen[0]["purity"] == 1.0 and chosen[1]["purity"] == 0.75 and chosen[1]["word"] == 5
    assert chosen[1]["targets"] == [5, 6, 7, 8]
    assert token_frequencies(Split(), 20, 12).tolist() == [2] * 10 + [0, 0]


def test_a_method_without_concepts_is_refused(artifacts):
    method, _, manifest = load_method(artifacts["ntp"])
    split = TokenSplit(artifacts["data"], "val")
    with pytest.raises(LatentLMError, match=r"needs a method with concepts \(cocomix, .*ponder_concepts\), not 'ntp'"):
        measure_steering(method, checkpoint_tokenizer(artifacts["ntp"], manifest), load_contexts(artifacts["sae"]),
                         val=split, scanned=split, alphas=[1.0])


def test_the_script_runs(artifacts, tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("steering", ROOT / "benchmarks" / "steering.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    out = tmp_path / "steer.json"
    assert mod.main([str(artifacts["student"]), "--alphas", "1,4", "--n-concepts", "1", "--n-prompts", "2",
                     "--prompt-len", "8", "--new-tokens", "2", "--stop", "10", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "| concept | shared word |" in text and "| 1 | +0.0000 ± 0.0000 |" in text
    saved = json.loads(out.read_text())
    assert saved["alphas"] == [1.0, 4.0] and len(saved["concepts"]) == 1
    assert mod.main([str(artifacts["ntp"]), "--sae", str(artifacts["sae"])]) == 2
    assert "needs a method with concepts" in capsys.readouterr().err
