"""Time the README tour and the docs/RECIPES.md recipes as written, command by command.

    PYTHONPATH=src python benchmarks/doc_timings.py [--only tour|recipes] [--threads 1]

Runs every block the tests run (tests/test_tour.py, tests/test_docs_recipes.py: the tour's blocks in
order in one directory, each recipe in its own), with torch limited to ``--threads`` threads, and
prints one markdown table per page: each command's wall time (from a bash DEBUG trap, so a
multi-line command or a here-document counts as one) and each block's CPU seconds (its children's
user + system time). Blocks whose needs this machine lacks (a GPU, optional packages) are listed as
skipped. Nothing is written outside a temporary directory.
"""

from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
from test_tour import README, marked_blocks, missing, tour_env  # noqa: E402

RECIPES = ROOT / "docs" / "RECIPES.md"
# Before each top-level simple command: the time and the command (newlines folded) appended to $LATENTLM_TRACE.
TRAP = """__t() { local c=${1//$'\\n'/ }; printf '%s\\t%s\\n' "$(date +%s.%N)" "$c" >> "$LATENTLM_TRACE"; }
trap '__t "$BASH_COMMAND"' DEBUG
"""


def time_block(body: str, cwd: Path, env: dict[str, str]) -> tuple[list[tuple[str, float]], float, float]:
    """Run one block as the tests do; ``([(command, wall s)], block wall s, block CPU s)``."""
    log = cwd.parent / f".trace-{time.monotonic_ns()}"
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.time()
    log.write_text("")
    r = subprocess.run(["bash", "-euo", "pipefail", "-c", TRAP + body], cwd=cwd, env=dict(env, LATENTLM_TRACE=str(log)),
                       capture_output=True, text=True)
    end = time.time()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    if r.returncode != 0:
        raise SystemExit(f"block failed (exit {r.returncode}):\n{body}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    marks = []
    for line in log.read_text().splitlines():
        stamp, _, cmd = line.partition("\t")
        if cmd.startswith("trap "):
            continue
        marks.append((float(stamp), cmd))
    log.unlink()
    commands = []
    for i, (stamp, cmd) in enumerate(marks):
        nxt = marks[i + 1][0] if i + 1 < len(marks) else end
        commands.append((cmd, nxt - stamp))
    return commands, end - t0, cpu


def short(cmd: str, width: int = 90) -> str:
    cmd = " ".join(cmd.split())
    return (cmd if len(cmd) <= width else cmd[: width - 3] + "...").replace("|", "\\|")


def table(page: str, blocks, shared_dir: bool, env_base: Path, threads: int) -> str:
    rows = ["| block | command | wall s |", "|---|---|---:|"]
    totals = []
    work = env_base / page
    work.mkdir()
    env = tour_env(env_base)
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    for i, (label, needs, body) in enumerate(blocks):
        name = label or f"{page} {i + 1}"
        if missing(needs):
            rows.append(f"| {name} | skipped: needs {', '.join(missing(needs))} | |")
            continue
        cwd = work if shared_dir else work / f"block-{i}"
        cwd.mkdir(exist_ok=True)
        print(f"[{page}] {name}", file=sys.stderr, flush=True)
        commands, wall, cpu = time_block(body, cwd, env)
        for cmd, s in commands:
            rows.append(f"| {name} | `{short(cmd)}` | {s:.1f} |")
        rows.append(f"| {name} | **block: wall {wall:.0f} s, CPU {cpu:.0f} s** | |")
        totals.append((name, wall, cpu, max(s for _, s in commands)))
    worst = max((t[3] for t in totals), default=0.0)
    rows.append(f"\nSlowest single command: {worst:.0f} s wall. Total: wall {sum(t[1] for t in totals):.0f} s, "
                f"CPU {sum(t[2] for t in totals):.0f} s.")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=["tour", "recipes"])
    ap.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS for the commands (default 1)")
    a = ap.parse_args(argv)
    load = os.getloadavg()[0]
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} CPUs, load average {load:.1f} "
          f"at the start, torch threads {a.threads}\n")
    with tempfile.TemporaryDirectory(prefix="latentlm-doc-timings-") as tmp:
        if a.only in (None, "tour"):
            blocks = [("tour " + str(i + 1), needs, body) for i, (_, needs, body) in
                      enumerate(marked_blocks(README, "tour"))]
            print("README tour (one directory, in order):\n\n" + table("tour", blocks, True, Path(tmp), a.threads)
                  + "\n", flush=True)
        if a.only in (None, "recipes"):
            print("docs/RECIPES.md (each recipe in its own directory):\n\n"
                  + table("recipes", marked_blocks(RECIPES, "recipe"), False, Path(tmp), a.threads), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
