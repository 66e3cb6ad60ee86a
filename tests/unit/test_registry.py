"""The jobs file: durations, defaults, and errors that name the job and the field."""

from __future__ import annotations

from pathlib import Path

import pytest

from balancectl.errors import ConfigError
from balancectl.jobs import builtin
from balancectl.scheduler.registry import (
    DEFAULT_MIN_DURATION,
    load_jobs,
    parse_duration,
    parse_jobs,
)

IDLE = "balancectl.jobs.builtin:idle"


def job(name: str = "tick", **fields: str) -> str:
    """One ``[[jobs]]`` table; each field's value is written as given (TOML source)."""
    return table({"name": f'"{name}"', "function": f'"{IDLE}"', "interval": '"30s"', **fields})


def table(values: dict[str, str]) -> str:
    body = "".join(f"{key} = {value}\n" for key, value in values.items())
    return f"[[jobs]]\n{body}\n"


def error_of(text: str) -> str:
    with pytest.raises(ConfigError) as caught:
        parse_jobs(text, "jobs.toml")
    return str(caught.value)


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        ("90s", 90.0),
        ("3m", 180.0),
        ("1h", 3600.0),
        ("250ms", 0.25),
        ("1.5m", 90.0),
        ("45", 45.0),
        (" 2m ", 120.0),
        (45, 45.0),
        (2.5, 2.5),
    ],
)
def test_durations(value: object, seconds: float) -> None:
    assert parse_duration(value, "where") == seconds


@pytest.mark.parametrize("value", ["3 minutes", "", "m", "-5s", "5d", True, None, [1]])
def test_bad_durations_are_refused_naming_the_place(value: object) -> None:
    with pytest.raises(ConfigError, match="job 'x': field 'interval'"):
        parse_duration(value, "job 'x': field 'interval'")


def test_a_job_with_every_field() -> None:
    [spec] = parse_jobs(job("audit", interval='"3m"', min_duration='"90s"'), "jobs.toml")

    assert (spec.name, spec.function, spec.interval, spec.min_duration) == (
        "audit",
        IDLE,
        180.0,
        90.0,
    )
    assert spec.call is builtin.idle


def test_numbers_are_seconds() -> None:
    [spec] = parse_jobs(job(interval="90", min_duration="1.5"), "jobs.toml")

    assert (spec.interval, spec.min_duration) == (90.0, 1.5)


def test_min_duration_defaults_to_two_minutes() -> None:
    [spec] = parse_jobs(job(), "jobs.toml")

    assert spec.min_duration == DEFAULT_MIN_DURATION == 120.0


def test_jobs_keep_the_file_order() -> None:
    specs = parse_jobs(job("b") + job("a") + job("c"), "jobs.toml")

    assert [spec.name for spec in specs] == ["b", "a", "c"]


def test_unknown_key_names_the_job_and_the_key() -> None:
    message = error_of(job("audit", intreval='"3m"'))

    assert "'audit'" in message
    assert "'intreval'" in message


def test_duplicate_name_names_the_job_and_the_field() -> None:
    message = error_of(job("audit") + job("other") + job("audit"))

    assert "'audit'" in message
    assert "'name'" in message


@pytest.mark.parametrize(
    "function",
    [
        "balancectl.jobs.no_such_module:idle",
        "balancectl.jobs.builtin:no_such_function",
        "no_colon_here",
        ":idle",
    ],
)
def test_function_that_does_not_import(function: str) -> None:
    message = error_of(job("audit", function=f'"{function}"'))

    assert "'audit'" in message
    assert "'function'" in message


@pytest.mark.parametrize(
    "function",
    ["os.path:join", "balancectl.jobs.builtin:AuditMismatch", "balancectl.jobs.builtin:log"],
)
def test_function_that_is_not_async(function: str) -> None:
    message = error_of(job("audit", function=f'"{function}"'))

    assert "'audit'" in message
    assert "'function'" in message
    assert "async" in message


@pytest.mark.parametrize("interval", ['"0s"', "0", "-5", "0.0", '"0m"'])
def test_interval_must_be_positive(interval: str) -> None:
    message = error_of(job("audit", interval=interval))

    assert "'audit'" in message
    assert "'interval'" in message


def test_interval_is_required() -> None:
    text = f'[[jobs]]\nname = "audit"\nfunction = "{IDLE}"\n'

    message = error_of(text)

    assert "'audit'" in message
    assert "'interval'" in message


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
def test_interval_and_min_duration_must_be_finite(value: str) -> None:
    # TOML has inf and nan; neither can be added to a time in the database.
    assert "'interval'" in error_of(job("audit", interval=value))
    assert "'min_duration'" in error_of(job("audit", min_duration=value))


def test_min_duration_must_not_be_negative() -> None:
    message = error_of(job("audit", min_duration="-1"))

    assert "'audit'" in message
    assert "'min_duration'" in message


@pytest.mark.parametrize(
    ("field", "value"),
    [("name", '""'), ("name", "3"), ("function", "3"), ("interval", "true")],
)
def test_wrong_types_name_the_field(field: str, value: str) -> None:
    values = {"name": '"audit"', "function": f'"{IDLE}"', "interval": '"30s"', field: value}

    assert f"'{field}'" in error_of(table(values))


def test_a_job_without_a_name_is_named_by_its_position() -> None:
    text = job("first") + f'[[jobs]]\nfunction = "{IDLE}"\ninterval = "1m"\n'

    message = error_of(text)

    assert "jobs[1]" in message
    assert "'name'" in message


def test_bad_toml_names_the_file() -> None:
    message = error_of('[[jobs]]\nname = "audit\n')

    assert "jobs.toml" in message
    assert "TOML" in message


@pytest.mark.parametrize("text", ["", "jobs = 3\n", 'title = "x"\n' + job()])
def test_a_file_without_jobs_or_with_other_top_level_keys_is_refused(text: str) -> None:
    assert "jobs.toml" in error_of(text)


def test_load_jobs_reads_a_file(tmp_path: Path) -> None:
    path = tmp_path / "jobs.toml"
    path.write_text(job("a") + job("b", interval='"1h"'))

    assert [(spec.name, spec.interval) for spec in load_jobs(path)] == [("a", 30.0), ("b", 3600.0)]


def test_load_jobs_names_a_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "missing.toml"

    with pytest.raises(ConfigError, match=r"missing\.toml"):
        load_jobs(path)


def test_the_default_file_ships_at_least_five_jobs_of_two_minutes() -> None:
    specs = load_jobs(None)

    assert len(specs) >= 5
    assert len({spec.name for spec in specs}) == len(specs)
    for spec in specs:
        assert spec.min_duration >= 120.0, spec.name
        assert spec.interval > 0, spec.name
        assert spec.function.startswith("balancectl.jobs.builtin:"), spec.name


def test_max_duration_defaults_to_an_hour_and_is_read() -> None:
    [default] = parse_jobs(job(), "jobs.toml")
    [given] = parse_jobs(job(max_duration='"10m"'), "jobs.toml")
    [long] = parse_jobs(job(min_duration='"2h"'), "jobs.toml")
    assert (default.max_duration, given.max_duration) == (3600.0, 600.0)
    assert long.max_duration == 3 * 3600.0  # an hour past a minimum that is itself longer


@pytest.mark.parametrize("value", ['"2m"', '"90s"', "0"])
def test_max_duration_must_be_longer_than_min_duration(value: str) -> None:
    message = error_of(job("audit", min_duration='"2m"', max_duration=value))
    assert "job 'audit'" in message and "'max_duration'" in message
