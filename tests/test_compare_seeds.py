"""`latentlm compare` with seeds: one run per seed (init and data order), mean +- std and paired
differences to a baseline run (checked against numbers computed here from each run's own files),
held-out texts, resuming a study stopped between and inside seeds, error bands, and experiments
without seeds left exactly as before."""

from __future__ import annotations

import json
import math
import shutil
import statistics
from pathlib import Path

import pytest
import yaml

from latentlm import compare as compare_mod
from latentlm.compare import load_experiment, plan, run_compare
from latentlm.data.loader import TokenSplit
from latentlm.errors import Interrupted, LatentLMError
from latentlm.report_seeds import T975, paired, paired_differences, summarize
from latentlm.train.checkpoint import resolve_checkpoint
from latentlm.train.metrics import read_metrics

from conftest import TINY_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")

OOD = "Shall I compare thee to a summer's day? Thou art more lovely and more temperate. " * 30


def experiment(tmp_path: Path, data_dir: Path, **over) -> Path:
    (tmp_path / "ood.txt").write_text(OOD)
    exp = {"name": "tiny seeded comparison", "out_dir": str(tmp_path / "cmp"), "data": {"path": str(data_dir)},
           "base": {"model": dict(TINY_MODEL), "data": {"seq_len": 32},
                    "train": {"batch_size": 4, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1, "eval_batches": 2,
                              "log_every": 1}},
           "budget": {"tokens": 4 * 32 * 4},
           "eval": {"tokens": 256, "points": 2, "texts": {"ood": str(tmp_path / "ood.txt")}, "text_tokens": 300},
           "seeds": [0, 1, 2], "baseline": "ntp",
           "runs": {"ntp": {"method": "ntp"}, "pause": {"method": "pause"}}}
    exp.update(over)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


def t_quantile_975(df: int) -> float:
    """Student's t 97.5% quantile by bisection on a numerically integrated density (independent of
    the table in report_seeds)."""
    c = math.gamma((df + 1) / 2) / (math.sqrt(df * math.pi) * math.gamma(df / 2))

    def cdf(x: float, n: int = 20000) -> float:  # 0.5 + integral_0^x of the density (Simpson)
        h = x / n
        f = [c * (1 + (i * h) ** 2 / df) ** (-(df + 1) / 2) for i in range(n + 1)]
        return 0.5 + h / 3 * (f[0] + f[-1] + 4 * sum(f[1:-1:2]) + 2 * sum(f[2:-1:2]))

    lo, hi = 0.0, 20.0
    for _ in range(50):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if cdf(mid) < 0.975 else (lo, mid)
    return (lo + hi) / 2


@pytest.mark.parametrize("df", [1, 2, 3, 5, 10, 30])
def test_t_table(df):
    assert T975[df - 1] == pytest.approx(t_quantile_975(df), abs=2e-3)


def test_seeds_aggregates_paired_differences_texts_and_resume(tmp_path, byte_wiki, monkeypatch):
    path = experiment(tmp_path, byte_wiki)
    out = tmp_path / "cmp"
    assert plan(load_experiment(path)) == [("ntp", 0), ("pause", 0), ("ntp", 1), ("pause", 1), ("ntp", 2),
                                           ("pause", 2)]

    # Stopped after three runs (an orderly stop, as Ctrl-C gives): those are complete, nothing else started.
    real_train = compare_mod.train
    calls = []

    def stopping_train(cfg, resume=False):
        if len(calls) == 3:
            raise Interrupted("stopped by the test", 130)
        calls.append(cfg.train.out_dir)
        return real_train(cfg, resume=resume)

    monkeypatch.setattr(compare_mod, "train", stopping_train)
    with pytest.raises(Interrupted):
        run_compare(path, progress=False)
    assert [Path(p).relative_to(out).as_posix() for p in calls] == ["runs/ntp/seed-0", "runs/pause/seed-0",
                                                                   "runs/ntp/seed-1"]
    assert not (out / "runs" / "pause" / "seed-1").exists() and not (out / "report.md").exists()
    monkeypatch.setattr(compare_mod, "train", real_train)

    trained = []
    real = compare_mod.Comparison._train
    monkeypatch.setattr(compare_mod.Comparison, "_train", lambda self, cfg, name: trained.append(
        (name, (Path(cfg.train.out_dir) / "final.json").is_file())) or real(self, cfg, name))
    report = run_compare(path, progress=False)
    assert trained == [("ntp seed 0", True), ("pause seed 0", True), ("ntp seed 1", True), ("pause seed 1", False),
                       ("ntp seed 2", False), ("pause seed 2", False)]

    # Each seed is its own run: train.seed = the seed, its directory runs/NAME/seed-S.
    evals, first = {}, {}
    for name in ("ntp", "pause"):
        for seed in (0, 1, 2):
            run = out / "runs" / name / f"seed-{seed}"
            assert yaml.safe_load((run / "config.yaml").read_text())["train"]["seed"] == seed
            evals[name, seed] = json.loads((run / "compare_eval.json").read_text())
            first[name, seed] = read_metrics(run / "metrics.jsonl")[0]["loss"]
    # Another seed gives another init and data order: the first logged losses differ.
    assert len({first["ntp", s] for s in (0, 1, 2)}) == 3

    # The held-out text: written once, scored for every run on its first text_tokens tokens.
    text = out / "texts" / "ood.txt"
    assert text.read_text() == OOD
    assert all(e["texts"]["ood"]["tokens"] == 300 for e in evals.values())

    results = json.loads((out / "results.json").read_text())
    assert [(r["name"], r["seed"]) for r in results["runs"]] == [("ntp", 0), ("pause", 0), ("ntp", 1), ("pause", 1),
                                                                  ("ntp", 2), ("pause", 2)]
    for name in ("ntp", "pause"):
        for key, get in (("val loss", lambda e: e["val"]["loss"]), ("val bpb", lambda e: e["val"]["bpb"]),
                         ("ood loss", lambda e: e["texts"]["ood"]["loss"])):
            values = [get(evals[name, s]) for s in (0, 1, 2)]
            m = results["summary"][name]["metrics"][key]
            assert m["n"] == 3 and m["mean"] == pytest.approx(statistics.fmean(values), abs=1e-12)
            assert m["std"] == pytest.approx(statistics.stdev(values), abs=1e-12)
    for key, get in (("val loss", lambda e: e["val"]["loss"]), ("ood bpb", lambda e: e["texts"]["ood"]["bpb"])):
        diffs = [get(evals["pause", s]) - get(evals["ntp", s]) for s in (0, 1, 2)]
        d = results["paired"]["pause"][key]
        assert d["seeds"] == [0, 1, 2] and d["diffs"] == pytest.approx(diffs, abs=1e-12)
        mean, sd = statistics.fmean(diffs), statistics.stdev(diffs)
        assert d["mean"] == pytest.approx(mean) and d["std"] == pytest.approx(sd)
        half = t_quantile_975(2) * sd / math.sqrt(3)
        assert d["ci95"] == pytest.approx([mean - half, mean + half], rel=1e-3)
        assert d["better"] == sum(x < 0 for x in diffs)
    assert "ntp" not in results["paired"]

    text = report.read_text()
    m = results["summary"]["pause"]["metrics"]["val loss"]
    assert "| pause | pause | 3 |" in text and f"{m['mean']:.4f} ± {m['std']:.4f}" in text
    assert "## Paired differences to ntp" in text and "| pause | val loss | 3 |" in text
    assert f"| ntp | 1 | {evals['ntp', 1]['val']['loss']:.4f} |" in text
    assert (out / "loss_vs_tokens.png").read_bytes()[:4] == b"\x89PNG" or "matplotlib is not installed" in text

    # Killed inside a seed: pause seed 1 lost its end; rerunning resumes it bit-exactly and reuses the rest.
    before = evals["pause", 1]["val"]["loss"]
    run = out / "runs" / "pause" / "seed-1"
    (run / "final.json").unlink()
    (run / "compare_eval.json").unlink()
    shutil.rmtree(resolve_checkpoint(run))
    trained.clear()
    run_compare(path, progress=False)
    assert trained == [("ntp seed 0", True), ("pause seed 0", True), ("ntp seed 1", True), ("pause seed 1", False),
                       ("ntp seed 2", True), ("pause seed 2", True)]
    assert json.loads((run / "compare_eval.json").read_text())["val"]["loss"] == pytest.approx(before, abs=1e-6)


def test_per_run_seeds_and_unseeded_runs_pair_by_seed(tmp_path, byte_wiki):
    """A run's own seeds replace the experiment's; a run without seeds is one run at its train.seed, in
    runs/NAME, and pairs with the seeded runs at that seed."""
    path = experiment(tmp_path, byte_wiki, seeds=[0, 1],
                      runs={"ntp": {"method": "ntp", "seeds": [5]},
                            "pause": {"method": "pause", "overrides": {"train": {"seed": 1}}, "seeds": [1, 2]}})
    with pytest.raises(LatentLMError, match="runs.pause sets train.seed and is trained with seeds"):
        load_experiment(path)
    path = experiment(tmp_path, byte_wiki, runs={"ntp": {"method": "ntp", "seeds": [5]},
                                                 "pause": {"method": "pause", "seeds": [1, 2]},
                                                 "single": {"method": "ntp", "overrides": {"train": {"seed": 1}}}})
    exp = yaml.safe_load(path.read_text())
    del exp["seeds"]
    path.write_text(yaml.safe_dump(exp))
    exp = load_experiment(path)
    assert plan(exp) == [("single", None), ("ntp", 5), ("pause", 1), ("pause", 2)]
    c = compare_mod.Comparison(exp, progress=False)
    assert c.run_config("single", exp["runs"]["single"], byte_wiki, {}).train.out_dir == str(tmp_path / "cmp/runs/single")
    cfg = c.run_config("pause", exp["runs"]["pause"], byte_wiki, {}, 2)
    assert cfg.train.out_dir == str(tmp_path / "cmp/runs/pause/seed-2") and cfg.train.seed == 2

    def row(name, seed, loss):
        return {"name": name, "method": "ntp", "seed": seed, "params": 1, "tokens": 1, "flops_per_token": 1.0,
                "train_flops": 1.0, "infer_flops_per_token": 1.0, "tok_per_s": 10.0, "val": {"loss": loss},
                "zeroshot": {}, "curve": []}

    rows = [row("single", 1, 3.0), row("pause", 1, 2.5), row("pause", 2, 2.0)]
    d = paired_differences(rows, "single")["pause"]["val loss"]
    assert d["seeds"] == [1] and d["n"] == 1 and d["mean"] == pytest.approx(-0.5)
    assert d["std"] is None and d["ci95"] is None and d["better"] == 1
    s = summarize(rows)
    assert s["pause"]["seeds"] == [1, 2] and s["pause"]["metrics"]["val loss"] == {"mean": 2.25, "std": pytest.approx(
        math.sqrt(0.125)), "n": 2}
    assert s["single"]["metrics"]["val loss"]["std"] is None


def test_paired_summary_and_zero_shot_direction():
    assert paired([0.1, 0.3])["ci95"] == pytest.approx([0.2 - 12.706 * math.sqrt(0.02) / math.sqrt(2),
                                                        0.2 + 12.706 * math.sqrt(0.02) / math.sqrt(2)])

    def row(name, seed, acc):
        return {"name": name, "method": "ntp", "seed": seed, "tok_per_s": 1.0, "val": {"loss": 1.0},
                "zeroshot": {"piqa": {"acc": acc, "acc_norm": acc}, "sciq": {"acc": acc}}}

    d = paired_differences([row("a", 0, 0.5), row("b", 0, 0.6), row("a", 1, 0.5), row("b", 1, 0.4)], "a")["b"]
    assert d["zero-shot mean acc"]["better"] == 1 and d["zero-shot mean acc"]["mean"] == pytest.approx(0.0)
    assert "piqa acc" not in d  # per-task accuracies are in the tables, the paired table keeps the mean


@pytest.mark.parametrize("change,message", [
    ({"seeds": []}, "must be a non-empty list"),
    ({"seeds": 3}, "must be a non-empty list"),
    ({"seeds": [0, 0]}, "names a seed twice"),
    ({"seeds": [-1]}, "must be an integer from 0"),
    ({"seeds": [True]}, "must be an integer from 0"),
    ({"runs": {"ntp": {"method": "ntp", "seeds": ["a"]}}}, r"runs.ntp.seeds='a' must be an integer"),
    ({"baseline": "nope"}, "baseline='nope' is not a run"),
    ({"labels": 3}, "labels=3 must be true"),
    ({"eval": {"texts": ["x"]}}, "eval.texts must map a name to a data source"),
    ({"report": "a/b"}, "must be a plain directory name"),
    ({"report": "runs"}, "must be a plain directory name"),
])
def test_bad_seed_settings(tmp_path, byte_wiki, change, message):
    with pytest.raises(LatentLMError, match=message):
        load_experiment(experiment(tmp_path, byte_wiki, **change))


def test_without_seeds_the_layout_and_report_are_unchanged(tmp_path, byte_wiki):
    """No seeds, baseline or texts: runs/NAME with the config's train.seed, today's report and results."""
    path = experiment(tmp_path, byte_wiki, eval={"tokens": 256, "points": 1}, budget={"tokens": 4 * 32 * 2},
                      runs={"ntp": {"method": "ntp"}})
    exp = yaml.safe_load(path.read_text())
    del exp["seeds"], exp["baseline"]
    path.write_text(yaml.safe_dump(exp))
    exp = load_experiment(path)
    assert plan(exp) == [("ntp", None)]
    report = run_compare(path, progress=False)
    out = tmp_path / "cmp"
    assert yaml.safe_load((out / "runs" / "ntp" / "config.yaml").read_text())["train"]["seed"] == 1337
    results = json.loads((out / "results.json").read_text())
    assert set(results) == {"experiment", "runs"} and "seed" not in results["runs"][0]
    assert "| ntp | ntp |" in report.read_text() and "Paired" not in report.read_text()

    # Adding seeds later does not nest seeded runs inside the unseeded run's directory.
    exp["seeds"] = [0]
    path.write_text(yaml.safe_dump(exp))
    with pytest.raises(LatentLMError, match="holds a run trained without seeds"):
        run_compare(path, progress=False)


def test_shared_out_dir_reuses_identical_runs_and_keeps_reports_apart(tmp_path, byte_wiki, monkeypatch):
    """Two experiments with one out_dir and `report:` names: a run both name identically trains once."""
    a = experiment(tmp_path, byte_wiki, budget={"tokens": 4 * 32 * 2}, seeds=[0], report="first",
                   eval={"tokens": 256, "points": 1}, runs={"ntp": {"method": "ntp"}})
    run_compare(a, progress=False)
    b = tmp_path / "b.yaml"
    exp = yaml.safe_load(a.read_text())
    exp.update(report="second", runs={"ntp": {"method": "ntp"}, "pause": {"method": "pause"}})
    b.write_text(yaml.safe_dump(exp))
    trained = []
    real = compare_mod.Comparison._train
    monkeypatch.setattr(compare_mod.Comparison, "_train", lambda self, cfg, name: trained.append(
        (name, (Path(cfg.train.out_dir) / "final.json").is_file())) or real(self, cfg, name))
    run_compare(b, progress=False)
    assert trained == [("ntp seed 0", True), ("pause seed 0", False)]
    out = tmp_path / "cmp"
    assert (out / "first" / "report.md").is_file() and (out / "second" / "report.md").is_file()
    assert not (out / "report.md").exists()
    assert len(json.loads((out / "first" / "results.json").read_text())["runs"]) == 1


def test_band_is_mean_and_std_over_seeds():
    from latentlm.report import seed_band

    curves = [[(10, 1e3, 4.0), (20, 2e3, 3.0)], [(10, 1e3, 5.0), (20, 2e3, 3.5)], [(10, 1e3, 6.0)]]
    band = seed_band(curves)
    assert len(band) == 1 and band[0] == pytest.approx((5.0, 1.0))
    assert seed_band(curves[:2])[1] == pytest.approx((3.25, statistics.stdev([3.0, 3.5])))
    assert seed_band(curves[:1]) == [(4.0, 0.0), (3.0, 0.0)]


@pytest.mark.parametrize("labels", [True, {"windows": "read"}])
def test_cost_estimate_times_every_stage_and_counts_shared_ones_once(tmp_path, byte_wiki, labels):
    from latentlm.compare_cost import estimate_cost, format_estimate, total_seconds

    path = experiment(tmp_path, byte_wiki, budget={"tokens": 4 * 32 * 6}, seeds=[0, 1],
                      teacher={"overrides": {"train": {"max_steps": 7}}}, labels=labels,
                      sae={"layer": 0, "latents": 32, "k": 4, "steps": 9, "batch_tokens": 128, "eval_tokens": 256},
                      runs={"ntp": {"method": "ntp"}, "cocomix": {"method": "cocomix", "seeds": [3]}})
    exp = yaml.safe_load(path.read_text())
    exp["base"]["cocomix"] = {"insert_layer": 1}
    path.write_text(yaml.safe_dump(exp))
    cal = {"ntp_cpu_tok_per_s": 1000.0, "factor": 0.5}
    e = estimate_cost(path, tmp_path / "scratch", steps=1, calibration=cal)
    stages = {s["stage"]: s for s in e["stages"]}
    assert list(stages) == ["data", "teacher", "sae", "labels", "run cocomix", "run ntp"]  # runs in plan order
    assert stages["teacher"]["what"] == "7 steps, 896 tokens"  # 7 x 4 x 32
    assert stages["sae"]["what"].startswith("9 steps x 128 tokens")
    train_windows = (len(TokenSplit(byte_wiki, "train")) - 1) // 32
    if labels is True:
        assert stages["labels"]["what"].startswith(f"{train_windows:,} windows")
    else:  # the cocomix run's one seed reads 6 batches of 4 distinct windows
        assert stages["labels"]["what"].startswith("24 windows (768 tokens: the windows the runs read)")
    assert stages["run ntp"]["seeds"] == 2 and stages["run cocomix"]["seeds"] == 1
    assert stages["run ntp"]["what"].startswith("2 x (6 steps, 768 tokens")
    for s in e["stages"][1:]:
        assert s["cpu_seconds"] > 0 and s["wall_seconds"] > 0 and s["quiet_seconds"] == s["cpu_seconds"] * 0.5
    assert e["quiet_seconds"] == pytest.approx(sum(s["quiet_seconds"] for s in e["stages"]))
    assert not (tmp_path / "cmp" / "teacher").exists() and not (tmp_path / "cmp" / "runs").exists()
    assert "| run ntp |" in format_estimate(e)
    twice = total_seconds([e, e])
    assert twice == pytest.approx(e["quiet_seconds"])  # the same stages (same output paths) count once


def test_an_sae_with_too_many_dead_latents_stops_before_labels_and_students(tmp_path, byte_wiki):
    sae = {"layer": 0, "latents": 512, "k": 1, "steps": 2, "batch_tokens": 64, "eval_tokens": 64}
    path = experiment(tmp_path, byte_wiki, seeds=[0], teacher={"overrides": {"train": {"max_steps": 2}}}, sae=sae,
                      baseline="cocomix", runs={"cocomix": {"method": "cocomix"}})
    exp = yaml.safe_load(path.read_text())
    exp["base"]["cocomix"] = {"insert_layer": 1}
    exp["sae"]["max_dead"] = 0.05  # at most 64 of 512 latents can fire on 64 tokens with k 1
    path.write_text(yaml.safe_dump(exp))
    with pytest.raises(LatentLMError, match=r"dead latents .* more than sae.max_dead 5%"):
        run_compare(path, progress=False)
    out = tmp_path / "cmp"
    assert (out / "sae").is_dir() and not (out / "labels").exists() and not (out / "runs").exists()
    with pytest.raises(LatentLMError, match="more than sae.max_dead"):  # a reused SAE is checked too
        run_compare(path, progress=False)
    exp["sae"]["max_dead"] = 2
    path.write_text(yaml.safe_dump(exp))
    with pytest.raises(LatentLMError, match="sae.max_dead=2 must be a fraction"):
        load_experiment(path)


def test_cost_estimate_calibrates_before_and_after(tmp_path, byte_wiki):
    from latentlm.compare_cost import QUIET_NTP, estimate_cost

    path = experiment(tmp_path, byte_wiki, budget={"tokens": 4 * 32 * 2}, seeds=[0], runs={"ntp": {"method": "ntp"}})
    e = estimate_cost(path, tmp_path / "scratch", steps=1)
    cal = e["calibration"]
    assert cal["before"] > 0 and cal["after"] > 0
    assert cal["ntp_cpu_tok_per_s"] == pytest.approx((cal["before"] + cal["after"]) / 2)
    assert cal["factor"] == pytest.approx(cal["ntp_cpu_tok_per_s"] / QUIET_NTP["tok_per_s"])
    run = e["stages"][-1]
    assert run["quiet_seconds"] == pytest.approx(run["cpu_seconds"] * cal["factor"])


def test_text_prefix_keeps_the_scored_tokens(bpe_path):
    from latentlm.compare import text_prefix
    from latentlm.data.sources import iter_documents
    from latentlm.data.tokenizers import load_tokenizer

    tok = load_tokenizer("bpe", bpe_path)
    text = "\n\n".join(iter_documents("wiki", limit=60))
    full = tok.encode(text)
    for cap in (10, 300, 1000):
        cut = text_prefix(tok, text, cap)
        assert len(cut) < len(text) and tok.encode(cut)[:cap + 1] == full[:cap + 1]
    assert text_prefix(tok, text, None) == text and text_prefix(tok, "short", 100) == "short"


def test_the_curves_note_names_each_run_once_whatever_its_seeds():
    from latentlm.report import curves_note

    rows = [{"name": n, "seed": s, "curve_tokens": 51_200, "val": {"tokens": 50_000}}
            for s in (0, 1, 2) for n in ("ntp", "ponder")]
    note = curves_note(rows)
    assert "(ntp 51,200, ponder 51,200) differ from the table's" in note
    same = [dict(r, curve_tokens=50_000) for r in rows]
    assert "each curve ends at its run's val loss" in curves_note(same)
