"""A method from outside the package, as docs/WRITING_A_METHOD.md writes it, through the real CLI.

``ZLossKD`` is defined here, not in latentlm: knowledge distillation from the shared ``teacher:``
block plus a setting of its own (``zkd.z_weight``, a z-loss on the student's log-partition).
Registered with :func:`register_method`, it must train, evaluate, generate, count its FLOPs (its
teacher's included), get its teacher in ``compare`` and export per its declared capability. A
second method is installed the way a package would ship one (an entry point) and found by a
fresh ``latentlm`` process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from latentlm.cli import main
from latentlm.errors import LatentLMError
from latentlm.methods import Method, method_class, register_method, unregister_method
from latentlm.methods.kd import TeacherDistillation
from latentlm.settings import setting

from conftest import TINY_MODEL

pytestmark = pytest.mark.usefixtures("one_thread")
SRC = Path(__file__).resolve().parents[1] / "src"


@dataclass
class ZLossSettings:
    """The ``zkd:`` section."""

    z_weight: float = setting(1e-3, "weight of mean(logsumexp(logits)^2)")

    def validate(self) -> None:
        if not 0 <= self.z_weight < float("inf"):
            raise LatentLMError(f"zkd.z_weight={self.z_weight} must be >= 0 and finite")


class ZLossKD(TeacherDistillation, Method):
    """KD (teacher logits from ``teacher.path``) plus a z-loss; a plain LM at inference."""

    name = "zkd"
    sections = {**TeacherDistillation.sections, "zkd": ZLossSettings}
    plain_lm = True

    def eval_logits(self, x):
        return self.model(x)

    def loss(self, x, y, teacher_logits=None):
        logits = self.model(x)
        loss, metrics = self.distill(logits, y, teacher_logits)
        z = logits.float().logsumexp(-1).pow(2).mean()
        return loss + self.cfg.zkd.z_weight * z, {**metrics, "z_loss": z.detach()}

    def step(self, idx, position_ids, valid, cache):
        return self.model(idx, position_ids=position_ids, cache=cache, valid=valid)


class OpaqueZLossKD(ZLossKD):
    """The same student declared not exportable: export must refuse it."""

    name = "zkd_opaque"
    plain_lm = False


@pytest.fixture(scope="module")
def registered():
    for cls in (ZLossKD, OpaqueZLossKD):
        register_method(cls)
    yield
    for cls in (ZLossKD, OpaqueZLossKD):
        unregister_method(cls.name)


@pytest.fixture(scope="module")
def setup(registered, byte_wiki, tmp_path_factory):
    """A tiny config file and a trained NTP teacher (through the CLI)."""
    root = tmp_path_factory.mktemp("plugin")
    cfg = root / "tiny.yaml"
    cfg.write_text(yaml.safe_dump({
        "model": dict(TINY_MODEL), "data": {"path": str(byte_wiki), "seq_len": 32},
        "train": {"batch_size": 4, "max_steps": 6, "lr": 3e-3, "min_lr": 3e-4, "warmup_steps": 1, "eval_every": 0,
                  "eval_batches": 1, "ckpt_every": 0, "log_every": 1, "progress": False}}))
    teacher = root / "teacher"
    assert main(["train", "--config", str(cfg), "--train.out_dir", str(teacher)]) == 0
    return root, cfg, teacher


def test_train_help_lists_the_plugin_section_with_its_doc(registered, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "\nzkd: (methods zkd, zkd_opaque)\n" in out
    assert " ".join("--zkd.z_weight FLOAT 0.001 weight of mean(logsumexp(logits)^2)".split()) in " ".join(out.split())
    teacher = next(line for line in out.splitlines() if line.startswith("teacher: (methods "))
    assert {"kd", "cocomix", "zkd", "zkd_opaque"} <= set(teacher[len("teacher: (methods "):-1].split(", "))


def test_registration_checks_what_latentlm_relies_on(registered):
    assert method_class("zkd") is ZLossKD
    with pytest.raises(LatentLMError, match="already registered"):
        register_method(type("Other", (ZLossKD,), {}))  # same name "zkd", another class
    clash = type("Clash", (Method,), {"name": "clash", "sections": {"zkd": dict}})
    with pytest.raises(LatentLMError, match="must be a dataclass"):
        register_method(clash)
    bad = type("Bad", (Method,), {"name": "bad name", "sections": {}})
    with pytest.raises(LatentLMError, match="identifier"):
        register_method(bad)


def test_outside_method_through_the_cli(setup, capsys):
    root, cfg, teacher = setup
    run = root / "zkd"
    args = ["train", "--config", str(cfg), "--train.method", "zkd", "--teacher.path", str(teacher),
            "--train.out_dir", str(run)]
    assert main(args + ["--zkd.z_weight", "-1"]) == 2  # its own setting, validated by its own class
    assert "zkd.z_weight=-1.0 must be >= 0" in capsys.readouterr().err
    assert main(args + ["--zkd.z_weight", "0.01"]) == 0
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["zkd"] == {"z_weight": 0.01} and saved["teacher"]["path"] == str(teacher)
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [m for m in metrics if "z_loss" in m]
    assert steps and all(m["z_loss"] > 0 and "kd_loss" in m for m in steps)
    manifest = json.loads(next((run / "checkpoints").glob("step_*/manifest.json")).read_text())
    assert manifest["capabilities"]["plain_lm"] and manifest["capabilities"]["needs_teacher"]
    capsys.readouterr()

    assert main(["eval", str(run), "--max-tokens", "256", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] > 0 and 0 < result["loss"] < 10

    assert main(["generate", str(run), "--prompt", "The", "--max-new-tokens", "4", "--temperature", "0"]) == 0
    assert capsys.readouterr().out.startswith("The")

    assert main(["flops", "--config", str(cfg), "--methods", "ntp,zkd", "--teacher.path", str(teacher), "--json"]) == 0
    rows = {r["method"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["zkd"]["teacher"] > 0 and rows["ntp"]["teacher"] == 0
    assert rows["zkd"]["train_student"] == rows["ntp"]["train_student"]

    hf = root / "hf"
    assert main(["export", str(run), "--hf", str(hf)]) == 0  # declared plain_lm: exportable
    assert (hf / "config.json").is_file()


def test_export_follows_the_declared_capability(setup, capsys):
    root, cfg, teacher = setup
    run = root / "opaque"
    assert main(["train", "--config", str(cfg), "--train.method", "zkd_opaque", "--teacher.path", str(teacher),
                 "--train.max_steps", "2", "--train.out_dir", str(run)]) == 0
    capsys.readouterr()
    assert main(["export", str(run), "--hf", str(root / "hf-opaque")]) == 2
    assert "not a plain next-token model" in capsys.readouterr().err
    assert not (root / "hf-opaque").exists()


def test_compare_gives_the_outside_method_its_teacher(setup):
    root, cfg, teacher = setup
    exp = root / "exp.yaml"
    base = yaml.safe_load(cfg.read_text())
    base["data"].pop("path")
    exp.write_text(yaml.safe_dump({
        "out_dir": str(root / "cmp"), "data": {"path": yaml.safe_load(cfg.read_text())["data"]["path"]},
        "base": base, "budget": {"tokens": 4 * 32 * 3}, "teacher": {"path": str(teacher)},
        "eval": {"tokens": 256, "points": 1},
        "runs": {"ntp": {"method": "ntp"}, "zkd": {"method": "zkd", "overrides": {"zkd": {"z_weight": 0.05}}}}}))
    assert main(["compare", str(exp), "--quiet"]) == 0
    saved = yaml.safe_load((root / "cmp" / "runs" / "zkd" / "config.yaml").read_text())
    assert saved["teacher"]["path"] == str(teacher) and saved["zkd"]["z_weight"] == 0.05
    assert "teacher" not in yaml.safe_load((root / "cmp" / "runs" / "ntp" / "config.yaml").read_text())
    report = json.loads((root / "cmp" / "results.json").read_text())
    assert {r["name"] for r in report["runs"]} == {"ntp", "zkd"}


PLUGIN = '''
from dataclasses import dataclass

from latentlm.methods.ntp import NTP


@dataclass
class WidthSettings:
    extra: int = 0

    def validate(self):
        pass


class Plugged(NTP):
    """An installed package's method: NTP whose logits are shifted by plugged.extra."""

    name = "plugged"
    sections = {"plugged": WidthSettings}

    def logits(self, idx, position_ids, valid=None, cache=None):
        return super().logits(idx, position_ids, valid, cache) + self.cfg.plugged.extra
'''


def test_a_method_installed_through_the_entry_point_group(tmp_path):
    """A fresh ``latentlm`` process finds a method that an installed distribution declares in the
    ``latentlm.methods`` entry-point group, with its own config section."""
    (tmp_path / "latentlm_plugged.py").write_text(textwrap.dedent(PLUGIN))
    dist = tmp_path / "latentlm_plugged-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: latentlm-plugged\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[latentlm.methods]\nplugged = latentlm_plugged:Plugged\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(SRC)])}
    cmd = [sys.executable, "-m", "latentlm", "flops", "--methods", "ntp,plugged", "--json", "--plugged.extra", "2",
           "--model.n_layer", "2", "--model.n_embd", "64", "--model.n_head", "2", "--model.block_size", "32"]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = {r["method"]: r for r in json.loads(out.stdout)}
    assert rows["plugged"]["train_student"] == rows["ntp"]["train_student"] > 0
    bad = subprocess.run(cmd[:-8] + ["--plugged.nope", "1"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "unknown config key 'plugged.nope'" in bad.stderr


def test_a_broken_plugin_is_named_in_one_line(tmp_path):
    dist = tmp_path / "latentlm_broken-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: latentlm-broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[latentlm.methods]\nbroken = no_such_module:Thing\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(SRC)])}
    out = subprocess.run([sys.executable, "-m", "latentlm", "flops", "--methods", "ntp"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert out.stderr.strip().count("\n") == 0 and "method plugin 'broken'" in out.stderr


def test_an_unknown_method_lists_the_registered_ones(registered):
    with pytest.raises(LatentLMError, match="unknown method 'nope'; choose from ntp, .*zkd"):
        method_class("nope")
