"""The layers of docs/architecture.md: which package may import which (every import statement,
at module level or inside functions), no import cycle between packages, and nothing in the code
cites a document outside the repository."""

from __future__ import annotations

import ast
import importlib.util
import re
from pathlib import Path

import pytest

from tests.support import REPO

PACKAGE = REPO / "gorp_ds"
# layer -> the project layers it may import (docs/architecture.md)
ALLOWED = {
    "settings": set(), "log": set(), "naming": set(), "resources": set(), "faults": set(),
    "safe_write": {"faults"},
    "planning": {"resources"},
    "optim": {"settings", "log"},
    "data": {"settings", "log"},
    "models": {"settings", "log", "naming", "optim"},
    "zero": {"settings", "log", "naming", "optim", "faults", "safe_write"},
    "export": {"settings", "log", "naming", "models", "optim", "safe_write"},
    "cl": {"settings", "log", "naming", "optim", "data", "models", "zero", "export", "resources", "faults",
           "safe_write"},
    "integrations": {"settings", "log", "naming", "optim", "data", "models", "zero", "export", "cl"},
}
ENTRY_POINTS = {"export/__main__.py", "cli.py", "__main__.py"}  # may use the run layer


def _layer(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imported_names(path: Path) -> list[tuple[str, int]]:
    """Every module an import statement of ``path`` names, fully qualified (relative imports
    resolved; ``from a import b`` gives ``a`` and ``a.b``, since ``b`` may be a module)."""
    rel = path.relative_to(REPO).with_suffix("")
    package = ".".join(rel.parts[:-1])  # a module's package, also for a package's __init__
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = importlib.util.resolve_name("." * node.level + (node.module or ""), package) if node.level \
                else node.module
            found.append((base, node.lineno))
            found += [(f"{base}.{alias.name}", node.lineno) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
    return found


def _imports(path: Path) -> list[tuple[str, int]]:
    """Project layers imported by ``path``."""
    return [(name.split(".")[1], line) for name, line in _imported_names(path)
            if name.startswith("gorp_ds.")]


def test_layers_import_only_downwards() -> None:
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        layer = _layer(path)
        if layer == "__init__" or str(path.relative_to(PACKAGE)) in ENTRY_POINTS:
            continue
        for target, line in _imports(path):
            if target != layer and target not in ALLOWED[layer]:
                wrong.append(f"{path.relative_to(REPO)}:{line}: {layer} imports {target}")
    assert not wrong, "\n".join(wrong)


def _package_graph() -> dict[str, dict[str, set[str]]]:
    """``{package: {package it imports: {"path:line", …}}}`` over every module of gorp_ds (a
    package is a sub-package or a top-level module, as in :func:`_layer`).

    An entry point that no module of gorp_ds imports is left out: it is a leaf, so it cannot close
    a cycle, and it may sit in a lower package's folder (``python -m gorp_ds.export`` is
    ``gorp_ds/export/__main__.py``) while calling the run layer. An entry point that something
    imports counts as part of its package like any other module."""
    modules = {path: _imported_names(path) for path in sorted(PACKAGE.rglob("*.py"))}
    imported = {name for names in modules.values() for name, _ in names}

    def leaf(path: Path) -> bool:
        dotted = ".".join(path.relative_to(REPO).with_suffix("").parts)
        return str(path.relative_to(PACKAGE)) in ENTRY_POINTS and dotted not in imported

    graph: dict[str, dict[str, set[str]]] = {}
    for path, names in modules.items():
        if leaf(path):
            continue
        edges = graph.setdefault(_layer(path), {})
        for name, line in names:
            parts = name.split(".")
            if parts[0] == "gorp_ds" and len(parts) > 1 and parts[1] != _layer(path):
                edges.setdefault(parts[1], set()).add(f"{path.relative_to(REPO)}:{line}")
    return graph


def _cycle(graph: dict[str, dict[str, set[str]]]) -> list[str]:
    """One cycle of ``graph`` as ``[a, b, …, a]``, or ``[]`` (depth-first search)."""
    state: dict[str, str] = {}  # "open" while on the search path, "done" once all it reaches is searched
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = "open"
        path.append(node)
        for target in sorted(graph.get(node, {})):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (found := visit(target)):
                return found
        path.pop()
        state[node] = "done"
        return []

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return []


def test_no_import_cycle_between_packages() -> None:
    graph = _package_graph()
    cycle = _cycle(graph)
    where = [f"{a} -> {b}: {', '.join(sorted(graph[a][b]))}" for a, b in zip(cycle, cycle[1:])]
    assert not cycle, "import cycle " + " -> ".join(cycle) + "\n" + "\n".join(where)


def test_the_cycle_check_sees_a_cycle() -> None:
    assert _cycle({"a": {"b": set()}, "b": {"c": set()}, "c": {"a": set()}, "d": {"a": set()}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b": set()}, "b": {"c": set()}, "d": {"a": set(), "c": set()}}) == []
    graph = _package_graph()  # and the graph holds the real edges (an empty one would pass anything)
    assert "export" in graph["cl"] and "planning" in graph["cli"]


@pytest.mark.parametrize("module", ["torch.distributed", "deepspeed"])
def test_the_math_has_no_distributed_imports(module: str) -> None:
    for path in (PACKAGE / "optim").glob("*.py"):
        names = {name for name, _ in _imported_names(path)}
        assert not any(name == module or name.startswith(module + ".") for name in names), path


def test_only_the_distributors_and_the_patches_reach_into_deepspeed() -> None:
    """docs/architecture.md: DeepSpeed's internals are known to ``gorp_ds/zero/distributor/`` and
    ``gorp_ds/zero/deepspeed_patches.py`` only; elsewhere ``import deepspeed`` (its public
    ``initialize``/``init_distributed``) and nothing below it."""
    allowed = ("zero/distributor/", "zero/deepspeed_patches.py", "zero/ds_schema.py")
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE).as_posix()
        if rel.startswith(allowed):
            continue
        for name, line in _imported_names(path):
            if name.startswith("deepspeed."):
                wrong.append(f"{path.relative_to(REPO)}:{line}: imports {name}")
    assert not wrong, "\n".join(wrong)


def test_nothing_cites_documents_outside_the_repository() -> None:
    # Assembled from pieces, so that this file does not match the pattern itself.
    docs = ("GORP", "MEASURE", "SYSTEM")
    outside = re.compile("|".join(name + r"\.md" for name in docs) + "|" + "shared" + "/docs")
    hits = []
    for root in ("gorp_ds", "launch", "bench", "tests", "README.md", "docs"):
        paths = [REPO / root] if (REPO / root).is_file() else sorted((REPO / root).rglob("*"))
        for path in paths:
            if not path.is_file() or path.suffix not in (".py", ".md", ".sh", ".sbatch", ".yaml", ".json", ""):
                continue
            for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
                if outside.search(line) or (root in ("gorp_ds", "launch") and "../shared" in line):
                    hits.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not hits, "\n".join(hits)
