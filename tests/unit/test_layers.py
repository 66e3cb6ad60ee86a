"""The import directions of docs/architecture.md's layer picture, checked on the source.

Every ``import`` in the package counts, including those inside functions (the command
line imports lazily), so a node can never pull in the operator toolkit by accident.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "balancectl"

# Modules that a layer must never import, by the importing module's prefix.
FORBIDDEN: dict[str, tuple[str, ...]] = {
    # The node runtime: everything but the command line and the toolkit.
    "balancectl.node": ("balancectl.toolkit", "balancectl.cli"),
    "balancectl.worker": ("balancectl.toolkit", "balancectl.cli"),
    # The API reads the schema head from revision.py: a worker never loads Alembic.
    "balancectl.api": (
        "balancectl.toolkit",
        "balancectl.cli",
        "balancectl.node",
        "balancectl.migrations",
    ),
    "balancectl.scheduler": ("balancectl.toolkit", "balancectl.cli", "balancectl.api"),
    "balancectl.jobs": ("balancectl.toolkit", "balancectl.cli", "balancectl.api"),
    "balancectl.balance": (
        "balancectl.toolkit",
        "balancectl.cli",
        "balancectl.api",
        "balancectl.scheduler",
    ),
    "balancectl.config": ("balancectl.api", "balancectl.scheduler", "balancectl.db"),
    "balancectl.errors": ("balancectl.api", "balancectl.scheduler", "balancectl.db"),
    "balancectl.open_files": ("balancectl.api", "balancectl.scheduler", "balancectl.db"),
    "balancectl.orphans": ("balancectl.api", "balancectl.scheduler", "balancectl.db"),
    "balancectl.migrations": ("balancectl.api", "balancectl.scheduler", "balancectl.toolkit"),
    "balancectl.db": ("balancectl.toolkit", "balancectl.api", "balancectl.scheduler"),
    "balancectl.sql": ("balancectl.toolkit", "balancectl.api", "balancectl.scheduler"),
    # The toolkit reaches nodes over HTTP (or reads the database), never their insides.
    "balancectl.toolkit": ("balancectl.node", "balancectl.worker", "balancectl.api"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path) -> set[str]:
    """Every module ``path`` imports, absolute names; ``from x import y`` counts x and x.y."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text("utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return found


def under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def all_imports() -> dict[str, set[str]]:
    return {module_name(path): imports_of(path) for path in PACKAGE.rglob("*.py")}


def test_the_scan_sees_the_package() -> None:
    graph = all_imports()
    assert "balancectl.node" in graph and "balancectl.toolkit.loadtest" in graph
    assert any(under(name, "balancectl.toolkit") for name in graph["balancectl.cli"])


@pytest.mark.parametrize("layer", sorted(FORBIDDEN))
def test_no_layer_imports_what_it_must_not(layer: str) -> None:
    offenders = [
        f"{module} imports {name}"
        for module, names in all_imports().items()
        if under(module, layer)
        for name in names
        for banned in FORBIDDEN[layer]
        if under(name, banned)
    ]
    assert offenders == []


def test_a_wrong_import_would_be_caught(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text("def f() -> None:\n    from balancectl.toolkit import loadtest\n")
    assert "balancectl.toolkit.loadtest" in imports_of(sample)


def test_a_worker_loads_neither_alembic_nor_sqlalchemy() -> None:
    """Each HTTP worker is a fresh interpreter; these two were two fifths of its start."""
    probe = (
        "import sys, balancectl.worker; print(sorted({'alembic', 'sqlalchemy'} & set(sys.modules)))"
    )
    loaded = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True
    ).stdout
    assert loaded.strip() == "[]"
