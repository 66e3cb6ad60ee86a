"""Developer and CI sessions. ``nox`` runs lint, typecheck and tests, in that order.

Every session runs on the interpreter that runs nox (no ``python=``), so nox never looks
for or downloads another Python. ``nox -s tests -- -k balance`` passes arguments to pytest.
"""

from __future__ import annotations

import nox

nox.options.sessions = ["lint", "typecheck", "tests"]
nox.options.default_venv_backend = "venv"
nox.options.download_python = "never"
nox.options.reuse_venv = "yes"
nox.options.error_on_external_run = True

SOURCES = ("balancectl", "tests", "alembic", "benchmarks", "noxfile.py")
# The tests wait on nodes far more than they compute, so four workers share two cores well;
# tests/conftest.py groups what must not run side by side.
PARALLEL = ("-n", "4", "--dist", "loadgroup")


@nox.session
def lint(session: nox.Session) -> None:
    """ruff: the lint rules, then the formatting, over every Python file; vulture: no dead code."""
    session.install("ruff>=0.6", "vulture>=2.11")
    session.run("ruff", "check", *SOURCES)
    session.run("ruff", "format", "--check", *SOURCES)
    session.run("vulture")  # paths and allowances in pyproject.toml [tool.vulture]


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy --strict over the package, the tests and this file."""
    session.install(".[test]", "mypy>=1.10", "nox")
    session.run("mypy", "--strict", "balancectl", "tests", "noxfile.py")


@nox.session
def tests(session: nox.Session) -> None:
    """pytest against BALANCECTL_TEST_DATABASE_URL, else an embedded PostgreSQL, on four
    pytest-xdist workers (``nox -s tests -- -n 0`` runs it in one process)."""
    session.install(".[test]")
    session.run("pytest", *PARALLEL, *session.posargs)
