"""`make demo`'s experiment: CoCoMix's teacher is the experiment's own NTP run (`teacher: {run: ntp}` in
`latentlm compare`), trained once, first, and reused as the NTP row; and the demo is what the README says."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from latentlm.compare import load_experiment, run_compare
from latentlm.errors import LatentLMError
from latentlm.loading import load_config
from latentlm.train.checkpoint import resolve_checkpoint

from test_compare import experiment as compare_experiment

pytestmark = pytest.mark.usefixtures("one_thread")
ROOT = Path(__file__).resolve().parents[1]


def experiment(tmp_path: Path, data_dir: Path, **over) -> Path:
    """test_compare's tiny experiment with an NTP run as CoCoMix's teacher."""
    return compare_experiment(tmp_path, data_dir, **{
        "name": "teacher from a run", "budget": {"tokens": 4 * 32 * 4}, "teacher": {"run": "ntp"},
        "sae": {"layer": 1, "latents": 64, "k": 4, "steps": 10, "batch_tokens": 256, "eval_tokens": 512},
        "labels": False, "runs": {"ntp": {"method": "ntp"}, "cocomix": {"method": "cocomix"}}, **over})


def test_the_teacher_is_the_ntp_run_trained_once(tmp_path, byte_wiki, capsys):
    report = run_compare(experiment(tmp_path, byte_wiki), progress=False)
    out = tmp_path / "cmp"
    log = capsys.readouterr().out
    assert log.count("[ntp] training ntp") == 1 and "[ntp] already trained; reusing" in log
    assert log.index("[ntp] training") < log.index("training an SAE") < log.index("[cocomix] training")
    assert not (out / "teacher").exists()  # no separate teacher run
    cocomix = load_config(resolve_checkpoint(out / "runs" / "cocomix"))
    assert cocomix.teacher.path == str(out / "runs" / "ntp") and cocomix.concepts.sae == str(out / "sae")
    assert json.loads((out / "sae" / "cfg.json").read_text())["latentlm"]["teacher"]["path"].startswith(str(out / "runs" / "ntp"))
    rows = {r["name"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert rows["ntp"]["steps"] == rows["cocomix"]["steps"] == 4  # the teacher run is the budgeted NTP row
    assert rows["cocomix"]["teacher_flops_per_token"] > 0 and "| ntp | ntp |" in report.read_text()
    # A rerun reuses everything, the teacher included.
    run_compare(experiment(tmp_path, byte_wiki), progress=False)
    assert "training" not in capsys.readouterr().out


@pytest.mark.parametrize("teacher,message", [
    ({"run": "nope"}, "teacher.run='nope' is not one of the runs: cocomix, ntp"),
    ({"run": "cocomix"}, "teacher.run=cocomix must be a plain language model run"),
    ({"run": "ntp", "path": "runs/x"}, "teacher takes either run"),
])
def test_bad_teacher_runs(tmp_path, byte_wiki, teacher, message):
    with pytest.raises(LatentLMError, match=re.escape(message)):
        load_experiment(experiment(tmp_path, byte_wiki, teacher=teacher))


def test_the_demo_is_what_the_readme_and_results_say():
    from latentlm.demo import DEMO_EXPERIMENT as exp

    assert exp["teacher"] == {"run": "ntp"} and exp["runs"]["ntp"] == {"method": "ntp"}
    train = exp["base"]["train"]
    steps = exp["budget"]["tokens"] // (train["batch_size"] * exp["base"]["model"]["block_size"])
    tokens = f"{exp['budget']['tokens']:,}"
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    results = (ROOT / "docs" / "RESULTS.md").read_text(encoding="utf-8")
    results = results[results.index("## `make demo`"):]  # the demo's section
    assert steps > 0
    # The measured table in the README and RESULTS.md is this experiment's: its token budget in every row,
    # and the zero-shot example count the text states.
    for doc in (readme, results):
        rows = [line for line in doc.splitlines() if re.match(r"\| (ntp|cocomix|ponder) \|", line)]
        assert len(rows) >= 3 and all(tokens in line for line in rows[:3]), rows[:3]
    assert f"{exp['eval']['limit']} examples per task" in readme
    assert f"Examples per task: hellaswag {exp['eval']['limit']}," in results
    assert "setup included" in readme.splitlines()[3]  # the first command's comment states the measured time
