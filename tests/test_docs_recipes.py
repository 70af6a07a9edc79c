"""docs/RECIPES.md runs as written: every ```bash block after a ``<!-- recipe: ... -->`` marker, each in
its own empty directory, with the repository's venv first on PATH (as tests/test_tour.py runs the
README's tour). Blocks that need a GPU or optional packages run where those exist."""

from __future__ import annotations

from pathlib import Path

import pytest

from test_tour import ROOT, marked_blocks, missing, run_block, tour_env

RECIPES = ROOT / "docs" / "RECIPES.md"
BLOCKS = marked_blocks(RECIPES, "recipe")


def test_the_recipes_cover_what_the_page_promises():
    labels = [label for label, _, _ in BLOCKS]
    assert {"own data", "distributed cpu"} <= set(labels)
    needs = [n for _, n, _ in BLOCKS]
    assert sum("cuda" in n for n in needs) == 2 and sum("smollm2" in n for n in needs) == 2
    assert RECIPES.read_text(encoding="utf-8").count("<!-- recipe") == len(BLOCKS)
    assert all("..." not in body for _, _, body in BLOCKS)


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(BLOCKS)), ids=[f"{i}-{label.replace(' ', '-')}"
                                                           for i, (label, _, _) in enumerate(BLOCKS)])
def test_recipe_runs_as_written(index, tmp_path: Path):
    label, needs, body = BLOCKS[index]
    if missing(needs):
        pytest.skip(f"needs {', '.join(missing(needs))}")
    work = tmp_path / "recipe"
    work.mkdir()
    run_block(body, work, tour_env(tmp_path))
    if label == "own data":
        for d in ("my-jsonl", "my-parquet", "my-notes", "mine"):
            assert (work / "data" / d / "manifest.json").is_file(), d
        assert (work / "runs" / "mine" / "final.json").is_file()
    if label == "distributed cpu":
        for run in ("ddp", "fsdp2"):
            assert (work / "runs" / run / "checkpoints" / "step_00000040").is_dir(), run
