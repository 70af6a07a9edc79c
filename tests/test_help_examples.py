"""Every example command line that any `latentlm ... --help` prints runs as written.

The examples are read from the epilogs of the real parser tree (a command someone adds later is
covered without touching this file) and run in order, in a scratch working directory, so the paths
they name (data/wiki-byte, runs/ponder-tiny) are the ones the earlier examples wrote. To keep the
test fast, sizes are appended to the commands that tokenize, train or score (the same sizes to every
example of a command, so a `--resume` example meets the config its run saved); a distinct example
runs once (the quickstart's train line is also `train --help`'s first).
"""

from __future__ import annotations

import shlex
from pathlib import Path

import pytest
import yaml

from latentlm.cli import build_parser, main

from test_help import all_parsers

pytestmark = pytest.mark.usefixtures("one_thread")

TINY_TRAIN = ["--model.n_layer", "2", "--model.n_head", "2", "--model.n_embd", "32", "--model.block_size", "32",
              "--model.embed_scale", "8.94427191", "--train.batch_size", "2", "--train.max_steps", "2",
              "--train.warmup_steps", "1", "--train.eval_batches", "1", "--train.progress", "false"]
SIZES = {  # appended to the examples of these commands
    ("prepare",): ["--limit", "80", "--quiet"],
    ("train",): TINY_TRAIN,
    ("eval",): ["--max-tokens", "128", "--quiet"],
    ("generate",): ["--max-new-tokens", "3"],
    ("compare",): ["--quiet"],
}
# What an example names that no earlier example writes, and what stands in for it here.
EXPERIMENT = {  # stands in for the runs/demo/experiment.yaml that `latentlm demo` writes (minutes to build)
    "name": "help example", "out_dir": "runs/compare-example", "data": {"path": "data/wiki-byte"},
    "base": {"model": {"arch": "gpt2", "block_size": 32, "n_layer": 1, "n_head": 2, "n_embd": 32},
             "train": {"batch_size": 2, "warmup_steps": 1, "eval_batches": 1}},
    "budget": {"tokens": 2 * 32 * 2}, "eval": {"tokens": 128, "points": 1}, "runs": {"ntp": {"method": "ntp"}}}
STAND_INS = {"runs/demo/experiment.yaml": lambda p: p.write_text(yaml.safe_dump(EXPERIMENT))}


def help_examples() -> list[tuple[tuple[str, ...], list[str]]]:
    """``(command path, argv)`` of every example line (``latentlm ...`` in an epilog), in parser order."""
    found = []
    for _, parser in all_parsers(build_parser()):
        parser.format_help()  # builds the epilogs made on demand
        for line in (parser.epilog or "").splitlines():
            if line.strip().startswith("latentlm "):
                argv = shlex.split(line.strip())[1:]
                found.append((_command(argv), argv))
    return found


def _command(argv: list[str]) -> tuple[str, ...]:
    names = []
    tree = dict(all_parsers(build_parser()))
    for a in argv:
        if (*names, a) not in tree:
            break
        names.append(a)
    return tuple(names)


def test_help_examples_name_presets_and_commands_that_exist():
    from latentlm.presets import config_path

    examples = help_examples()
    assert len(examples) >= 10
    for command, argv in examples:
        assert command, f"example {argv} names no command"
        if "--config" in argv:
            config_path(argv[argv.index("--config") + 1])  # a preset or a file; raises if neither


def test_every_help_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    done, outputs = set(), {}
    for command, argv in help_examples():
        if tuple(argv) in done:
            continue
        done.add(tuple(argv))
        for name, make in STAND_INS.items():
            if name in argv and not Path(name).exists():
                Path(name).parent.mkdir(parents=True, exist_ok=True)
                make(Path(name))
        full = argv + SIZES.get(command, [])
        code = main(full)
        out = capsys.readouterr()
        assert code == 0, f"`latentlm {shlex.join(full)}` exited {code}: {out.err}"
        outputs[shlex.join(argv)] = out.out
    resumed = next(o for a, o in outputs.items() if a.startswith("train") and a.endswith("--resume"))
    assert "run runs/ponder-tiny is complete (step 2 of 2); nothing to do" in resumed
    assert outputs["generate runs/ponder-tiny --prompt 'The capital of France'"].startswith("The capital of France")
    assert (tmp_path / "runs" / "compare-example" / "report.md").is_file()
    assert yaml.safe_load((tmp_path / "runs" / "ponder-tiny" / "config.yaml").read_text())["model"]["vocab_size"] == 257
