"""A bad jobs file stops ``balancectl serve`` at start: exit status 2, one message naming
the job and the field, no traceback."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port

IDLE = "balancectl.jobs.builtin:idle"
GOOD = f'[[jobs]]\nname = "fine"\nfunction = "{IDLE}"\ninterval = "1m"\n\n'


@pytest.mark.parametrize(
    ("body", "job", "field"),
    [
        (f'[[jobs]]\nname = "audit"\nfunction = "{IDLE}"\ninterval = "1m"\nevery = "2m"\n',
         "audit", "every"),
        (f'[[jobs]]\nname = "fine"\nfunction = "{IDLE}"\ninterval = "2m"\n', "fine", "name"),
        ('[[jobs]]\nname = "audit"\nfunction = "balancectl.nope:run"\ninterval = "1m"\n',
         "audit", "function"),
        ('[[jobs]]\nname = "audit"\nfunction = "os.path:join"\ninterval = "1m"\n',
         "audit", "function"),
        (f'[[jobs]]\nname = "audit"\nfunction = "{IDLE}"\ninterval = "0s"\n',
         "audit", "interval"),
    ],
)  # fmt: skip
def test_a_bad_jobs_file_stops_the_node_with_status_2(
    tmp_path: Path, body: str, job: str, field: str
) -> None:
    path = tmp_path / "jobs.toml"
    path.write_text(GOOD + body)

    result = serve("--jobs-file", str(path))

    assert result.returncode == 2, result.stderr
    assert f"'{job}'" in result.stderr, result.stderr
    assert f"'{field}'" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_a_jobs_file_that_is_not_toml_stops_the_node(tmp_path: Path) -> None:
    path = tmp_path / "jobs.toml"
    path.write_text('[[jobs]\nname = "audit"\n')

    result = serve(env={"BALANCECTL_JOBS_FILE": str(path)})

    assert result.returncode == 2, result.stderr
    assert str(path) in result.stderr and "TOML" in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def serve(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``balancectl serve`` against a database that is never reached (the file is read first)."""
    command = [sys.executable, "-m", "balancectl", "serve", "--port", str(free_port()), *args]
    return subprocess.run(
        command,
        capture_output=True,
        text=True,
        timeout=60,
        env={
            **os.environ,
            **(env or {}),
            "BALANCECTL_DATABASE_URL": "postgresql://nobody@127.0.0.1:1/none",
            "BALANCECTL_DB_WAIT": "0",
        },
    )
