"""The package's import graph: no cycles, and no arrow from a lower layer back up to a higher one.

The graph is read from the source (every `import fedforge.x` and `from .x import y`, at the top of a
module or inside a function: a deferred import is still an arrow), with the arrow that importing
`fedforge.p.m` adds to the subpackage `fedforge.p` (its __init__ runs first). Imports under
`if TYPE_CHECKING:` only name types for annotations and never run: they are not arrows."""

from __future__ import annotations

import ast
from pathlib import Path

import fedforge

SRC = Path(fedforge.__file__).parent

# Arrows other parts of issue 23 remove; the merger deletes each line when its part is in.
KNOWN_BACK_ARROWS: set[tuple[str, str]] = set()  # none left: config no longer imports engines.ray


def modules() -> dict[str, Path]:
    """Every module of the package by its dotted name (a package by its own name, for __init__.py)."""
    found = {}
    for path in SRC.rglob("*.py"):
        parts = list(path.relative_to(SRC.parent).with_suffix("").parts)
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def imports(name: str, path: Path, known: dict[str, Path]) -> set[str]:
    """The package's modules that module `name` imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text())
    typing_only = {
        id(inner)
        for node in ast.walk(tree)
        if isinstance(node, ast.If) and isinstance(node.test, ast.Name) and node.test.id == "TYPE_CHECKING"
        for statement in node.body
        for inner in ast.walk(statement)
    }
    for node in ast.walk(tree):
        if id(node) in typing_only:
            continue
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join([*parts[: len(parts) - node.level + 1], *([node.module] if node.module else [])])
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        elif isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        else:
            continue
        for target in targets:
            # Importing fedforge.p.m runs fedforge.p first (not fedforge itself: the root of everything).
            while target.count(".") >= 1:
                if target in known and target != name and not name.startswith(target + "."):
                    found.add(target)
                target = target.rpartition(".")[0]
    return found


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(name, path, known) for name, path in known.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while (w := stack.pop()) != v:
                component.append(w)
            if component:
                found.append(sorted([v, *component]))

    for v in edges:
        if v not in index:
            visit(v)
    return found


def test_the_graph_is_read_as_python_imports_it():
    edges = graph()
    assert "fedforge.data.datasets" in edges["fedforge.data.tabular"]  # from .datasets import ...
    assert "fedforge.errors" in edges["fedforge.data.tabular"]  # from ..errors import ...
    assert "fedforge.data" in edges["fedforge.tasks"]  # from .data.datasets: runs data/__init__ first
    assert "fedforge.data.sources" in edges["fedforge.data"]
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_package_has_no_import_cycle():
    assert cycles(graph()) == []


def test_no_arrow_goes_back_up():
    """network/client loads data through data/, not the run's glue (experiment); the engines and
    config sit below the round loop (simulation) and the engines' own modules."""
    edges = graph()
    back = {
        (low, high)
        for low, high in [
            ("fedforge.network.client", "fedforge.experiment"),
            ("fedforge.engines.ray", "fedforge.simulation"),
            ("fedforge.config", "fedforge.engines.ray"),
            ("fedforge.data.tabular", "fedforge.data.huggingface"),
        ]
        if high in edges[low]
    }
    assert back <= KNOWN_BACK_ARROWS
