"""The package's shape: no import cycle, no method knowledge outside ``methods/``.

Both are read from the source (``ast``), so they hold for code paths no other test runs.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "latentlm"


def _module_name(path: Path) -> str:
    rel = path.relative_to(SRC).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or \
        (isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def _imports(path: Path) -> list[tuple[str, bool, int]]:
    """``(imported module, inside a function, line)`` for every import statement of ``path``,
    skipping ``if TYPE_CHECKING:`` blocks (annotations only, never executed)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub, in_function)
                continue
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, in_function, child.lineno) for a in child.names)
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = package.split(".")[: len(package.split(".")) - child.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                for a in child.names:  # `from pkg import module` imports the submodule
                    sub = f"{base}.{a.name}"
                    found.append((sub if sub in MODULES else base, in_function, child.lineno))
            visit(child, nested)

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


def _graph() -> dict[str, set[str]]:
    return {m: {dep for dep, _, _ in _imports(p) if dep in MODULES and dep != m} for m, p in MODULES.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1 = on the stack, 2 = done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return stack[stack.index(dep):] + [dep]
            if dep not in state:
                cycle = dfs(dep)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = dfs(node)
            if cycle:
                return cycle
    return None


def test_the_import_graph_has_no_cycle():
    """Function-level imports count too: hiding an edge inside a function does not remove it."""
    cycle = _find_cycle(_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_the_cycle_finder_finds_cycles():
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set(), "c": {"a"}}) is None


# The command line imports each command's modules when the command runs, so `latentlm --help` and
# argument errors answer at once instead of after importing torch. Nothing imports the CLI, so its
# late imports cannot hide a cycle (and the graph above counts them anyway).
LATE_IMPORTS_ALLOWED = {"latentlm.cli"}


def test_no_latentlm_module_is_imported_inside_a_function():
    """Late imports are for optional or heavy third-party packages (transformers, matplotlib, ...);
    one of latentlm's own modules imported late would hide an edge of the graph above."""
    late = [f"{_module_name(p)}:{line} imports {mod}" for p in MODULES.values() for mod, inner, line in _imports(p)
            if inner and (mod == "latentlm" or mod.startswith("latentlm."))
            and _module_name(p) not in LATE_IMPORTS_ALLOWED]
    assert not late, "\n".join(late)


def _builtin_method_names() -> set[str]:
    from latentlm.methods import methods

    return {name for name, cls in methods().items() if cls.__module__.startswith("latentlm.methods")}


def _name_comparisons(source: str, where: str, names: set[str]) -> list[str]:
    """Places in ``path`` that compare something with a method's name, or test membership in a
    collection of method names (``m == "cocomix"``, ``m in ("ntp", "kd")``, ``TEACHERS = {...}``)."""

    def named(node: ast.AST) -> bool:
        if isinstance(node, ast.Constant):
            return node.value in names
        if isinstance(node, (ast.Tuple, ast.List, ast.Set)):
            return any(named(e) for e in node.elts)
        return False

    hits = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare) and any(named(o) for o in [node.left, *node.comparators]):
            hits.append(f"{where}:{node.lineno}")
        elif isinstance(node, ast.Assign) and isinstance(node.value, (ast.Tuple, ast.List, ast.Set)) \
                and sum(named(e) for e in node.value.elts) >= 2:
            hits.append(f"{where}:{node.lineno} (a collection of method names)")
    return hits


def test_no_method_name_is_compared_outside_methods():
    """Code outside methods/ asks a method's class (sections, capabilities) instead of its name."""
    names = _builtin_method_names()
    assert {"ntp", "ponder", "cocomix", "kd"} <= names
    outside = [p for p in MODULES.values() if PACKAGE / "methods" not in p.parents]
    hits = [h for p in outside for h in _name_comparisons(p.read_text(encoding="utf-8"), str(p.relative_to(SRC)), names)]
    assert not hits, "method names compared outside methods/: " + ", ".join(hits)


@pytest.mark.parametrize("code, found", [
    ('if m == "cocomix": pass', True),
    ('if m in ("ntp", "kd"): pass', True),
    ('TEACHERS = {"kd", "kd_pause"}', True),
    ('if m.needs_teacher: pass', False),
    ('RUNS = {"ntp": 1}', False),  # data keyed by run name, not a comparison
])
def test_the_name_check_finds_comparisons(code, found):
    assert bool(_name_comparisons(code, "probe", {"ntp", "kd", "kd_pause", "cocomix"})) is found
