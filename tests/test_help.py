"""What `--help`, `--version`, `latentlm configs` and `latentlm config show` tell a new user: every
config key with its type, default and doc; every option's default; the presets, also in a built
wheel; the resolved config of a preset and overrides."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from latentlm.cli import build_parser, main
from latentlm.config import make_config, section_classes
from latentlm.presets import PRESET_DIR, preset_names, preset_summary
from latentlm.settings import describe_fields, yaml_scalar

ROOT = Path(__file__).resolve().parents[1]


def all_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """``(command path, parser)`` of the top-level parser and every subcommand under it."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from all_parsers(sub, (*path, name))


def help_of(*command: str) -> str:
    return dict(all_parsers(build_parser()))[command].format_help()


def flat(text: str) -> str:
    return " ".join(text.split())


def builtin_sections():
    return {s: (cls, title) for s, (cls, title) in section_classes().items() if cls.__module__.startswith("latentlm.")}


def test_every_builtin_setting_has_a_one_line_doc():
    sections = builtin_sections()
    assert {"model", "data", "train", "ponder", "pause", "loop", "ponderlm", "teacher", "kd", "concepts", "cocomix",
            "pause_insert"} <= set(sections)
    n = 0
    for section, (cls, _) in sections.items():
        for name, _, _, doc in describe_fields(cls):
            assert doc.strip() and "\n" not in doc, f"{section}.{name} has no doc; declare it with settings.setting()"
            n += 1
    assert n >= 75


@pytest.mark.parametrize("columns", [200, 80])  # the table, and two lines per key on a narrow terminal
@pytest.mark.parametrize("command", ["train", "flops"])
def test_train_and_flops_help_list_every_key_with_type_default_and_doc(command, columns, monkeypatch):
    monkeypatch.setenv("COLUMNS", str(columns))
    text = help_of(command)
    assert "examples:" in text and "config keys:" in text
    positions = []
    for section, (cls, title) in builtin_sections().items():
        header = f"\n{section}: ({title})\n"
        assert header in text
        positions.append(text.index(header))
        for name, tp, default, doc in describe_fields(cls):
            key = re.escape(f"--{section}.{name} {tp}")
            value = re.escape(yaml_scalar(default))
            assert re.search(rf"\n  {key}\s+(\(default: )?{value}\)?\s", text), f"{section}.{name}"
            assert flat(doc) in flat(text)
    assert positions == sorted(positions)  # grouped: core sections first, then the methods'
    assert re.search(r"\nponder: \(methods? ponder[,)]", text)  # ponder_concepts shares it
    teacher = re.search(r"\nteacher: \(methods (.*)\)\n", text).group(1).split(", ")
    assert {"kd", "cocomix", "kd_pause"} <= set(teacher)  # a shared section names every method owning it
    assert "the training method (each method's own sections are below): ntp, " in flat(text)


def test_every_option_of_every_command_shows_its_default():
    checked = 0
    for path, parser in all_parsers(build_parser()):
        text = flat(parser.format_help())
        for a in parser._actions:
            if not a.option_strings or a.default in (None, False, argparse.SUPPRESS) or \
                    isinstance(a, (argparse._HelpAction, argparse._VersionAction)):
                continue
            said = f"(default: {a.default})" in text or "default" in (a.help or "")
            assert said, f"latentlm {' '.join(path)} {a.option_strings[0]} does not show its default {a.default!r}"
            checked += 1
    assert checked > 30


def test_every_device_option_defaults_to_auto():
    devices = {path: a.default for path, parser in all_parsers(build_parser()) for a in parser._actions
               if a.dest == "device"}
    assert {("eval",), ("generate",), ("sae", "train"), ("concepts", "label"), ("concepts", "contexts"),
            ("concepts", "inspect")} <= set(devices)
    assert set(devices.values()) == {"auto"}, devices


def test_top_level_help_version_and_configs_answer_without_torch():
    code = ("import sys\nfrom latentlm.cli import main\nfor argv in (['--help'], ['--version'], ['configs']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\nprint('torch' in sys.modules)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                       env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert p.returncode == 0 and p.stdout.strip().splitlines()[-1] == "False", p.stderr


def test_version(capsys):
    version = re.search(r'^version = "(.+)"$', (ROOT / "pyproject.toml").read_text(), re.M).group(1)
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"latentlm {version}"


def test_configs_lists_every_preset_with_its_summary(capsys):
    assert main(["configs"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = preset_names()
    assert len(names) >= 16 and "ponder/tiny" in names and "cocomix/cocomix-69m" in names
    for name in names:
        summary = preset_summary(name)
        assert summary.endswith("."), f"preset {name} needs a one-sentence first header line, got {summary!r}"
        assert any(line.split()[0] == name and line.endswith(summary) for line in lines if line.strip()), name
    assert f"{len(names)} presets in {PRESET_DIR}" in lines[-1]


def test_a_built_wheel_ships_every_preset(tmp_path):
    """pyproject's package-data: the wheel pip builds (offline, from a copy of the tree) holds each preset."""
    try:
        import setuptools  # noqa: F401
        import wheel  # noqa: F401
    except ImportError as e:
        pytest.skip(f"cannot build a wheel offline without {e.name} in this environment")
    src = tmp_path / "tree"
    shutil.copytree(ROOT / "src", src / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                        "-q", "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    if p.returncode != 0 and "No module named pip" in p.stderr:
        pytest.skip("pip is not installed in this environment")
    assert p.returncode == 0, p.stderr
    (whl,) = (tmp_path / "dist").glob("latentlm-*.whl")
    shipped = set(zipfile.ZipFile(whl).namelist())
    assert {f"latentlm/configs/{name}.yaml" for name in preset_names()} <= shipped


def test_presets_are_package_resources():
    from importlib.resources import files

    root = files("latentlm") / "configs"
    for name in preset_names():
        assert (root / f"{name}.yaml").is_file()


def shown(capsys, *args) -> tuple[list[str], dict]:
    assert main(["config", "show", *args]) == 0
    out = capsys.readouterr().out
    return [line for line in out.splitlines() if line.startswith("#")], yaml.safe_load(out)


def test_config_show_prints_the_resolved_config_as_a_usable_config_file(byte_wiki, tmp_path, capsys):
    notes, cfg = shown(capsys, "--config", "ponder/tiny", "--data.path", str(byte_wiki), "--ponder.n_thoughts", "2")
    assert cfg["model"]["vocab_size"] == 257 and cfg["ponder"]["n_thoughts"] == 2 and cfg["train"]["method"] == "ponder"
    assert f"#   model.vocab_size: from {byte_wiki / 'manifest.json'}" in notes
    assert set(cfg) == {"model", "data", "train", "ponder"}  # the run's own sections only
    path = tmp_path / "shown.yaml"
    path.write_text(yaml.safe_dump(cfg))
    again = make_config(path)
    assert again.to_dict() == cfg and "model.vocab_size" not in again.derived  # concrete: nothing left to derive

    notes, cfg = shown(capsys, "--config", "ponder/tiny", "--data.path", str(tmp_path / "nothing-yet"))
    assert cfg["model"]["vocab_size"] == 50257
    assert any("model.vocab_size: GPT-2's (no " in n and "taken at train time" in n for n in notes)


def test_config_show_says_what_a_method_derives_from_its_inputs(tmp_path, capsys):
    import torch

    from latentlm.concepts.sae import TopKSAE, save_sae

    notes, cfg = shown(capsys, "--config", "cocomix/tiny")
    assert cfg["cocomix"]["n_concepts"] == 0
    assert any(n.startswith("# derived at train time, not now (train.method cocomix): ") and "--concepts.sae" in n
               for n in notes)
    torch.manual_seed(0)
    sae = save_sae(TopKSAE(128, 96, 8, {"layer": 1}), tmp_path / "sae")
    notes, cfg = shown(capsys, "--config", "cocomix/tiny", "--concepts.sae", str(sae))
    assert (cfg["cocomix"]["n_concepts"], cfg["cocomix"]["k_concepts"]) == (96, 8)
    assert "#   cocomix.n_concepts: from the inputs of train.method cocomix" in notes
    assert not any("derived at train time" in n for n in notes)


def test_config_show_refuses_a_bad_key_in_one_line(capsys):
    assert main(["config", "show", "--config", "ponder/tiny", "--ponder.n_thought", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unknown config key 'ponder.n_thought'" in err[0]
