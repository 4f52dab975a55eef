"""The layers of docs/architecture.md: which package may import which (every import statement,
at module level or inside functions), and nothing in the code cites a document outside the
repository."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "gorp_ds"
# layer -> the project layers it may import (docs/architecture.md)
ALLOWED = {
    "settings": set(), "log": set(), "naming": set(),
    "optim": {"settings", "log"},
    "data": {"settings", "log"},
    "models": {"settings", "log", "naming", "optim"},
    "zero": {"settings", "log", "naming", "optim"},
    "export": {"settings", "log", "naming", "models", "optim"},
    "cl": {"settings", "log", "naming", "optim", "data", "models", "zero", "export"},
}
ENTRY_POINTS = {"export/__main__.py"}  # may use the run layer


def _layer(path: Path) -> str:
    rel = path.relative_to(PACKAGE)
    return rel.parts[0] if len(rel.parts) > 1 else rel.stem


def _imports(path: Path) -> list[tuple[str, int]]:
    """Project layers imported by ``path`` (absolute ``gorp_ds.x`` and relative ``..x`` imports)."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and node.module.startswith("gorp_ds."):
                found.append((node.module.split(".")[1], node.lineno))
            elif node.level == 2 and node.module:
                found.append((node.module.split(".")[0], node.lineno))
            elif node.level == 2:
                found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.Import):
            found += [(a.name.split(".")[1], node.lineno) for a in node.names if a.name.startswith("gorp_ds.")]
    return found


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


@pytest.mark.parametrize("module", ["torch.distributed", "deepspeed"])
def test_the_math_has_no_distributed_imports(module: str) -> None:
    for path in (PACKAGE / "optim").glob("*.py"):
        names = {n.module for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.ImportFrom)}
        names |= {a.name for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Import) for a in n.names}
        assert not any(name and (name == module or name.startswith(module + ".")) for name in names), path


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
