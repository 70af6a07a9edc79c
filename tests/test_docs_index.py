"""The docs can be found: README.md and docs/README.md list every page of docs/, and every relative link
in README.md and docs/*.md points at a file that exists (and at a heading that exists, for #anchors)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(p.name for p in DOCS.glob("*.md"))
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*]", "", heading.strip().lower())
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    return {slug(m) for m in re.findall(r"^#+ (.+)$", text, re.M)}


def test_readme_and_the_index_list_every_doc():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    index = (DOCS / "README.md").read_text(encoding="utf-8")
    assert len(PAGES) > 10
    for page in PAGES:
        assert f"docs/{page}" in readme, f"README.md does not link docs/{page}"
        if page != "README.md":
            assert f"]({page})" in index, f"docs/README.md does not list {page}"


@pytest.mark.parametrize("page", ["README.md", *(f"docs/{p}" for p in PAGES)])
def test_relative_links_resolve(page):
    path = ROOT / page
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.S)
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):  # http(s):, mailto:
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        assert dest.exists(), f"{page}: link to {target} (no {dest.relative_to(ROOT)})"
        if anchor and dest.suffix == ".md":
            assert anchor in anchors(dest), f"{page}: link to {target}: no heading with that anchor"


def test_the_architecture_table_lists_every_method_and_its_module():
    """docs/ARCHITECTURE.md's method table names every built-in method, its module and its sections."""
    import inspect

    from latentlm.methods.registry import methods

    text = (DOCS / "ARCHITECTURE.md").read_text(encoding="utf-8")
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    for name, cls in methods().items():
        row = next((r for r in rows if f"`{name}`" in r.split("|")[1]), None)
        assert row is not None, f"docs/ARCHITECTURE.md's method table has no row for {name}"
        assert f"`{Path(inspect.getfile(cls)).name}`" in row, (name, row)
        for section in cls.sections:
            assert f"`{section}`" in row, (name, section, row)
