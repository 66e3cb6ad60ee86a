"""The jobs file (TOML): each job's name, function, interval, minimum and maximum duration."""

from __future__ import annotations

import importlib
import inspect
import math
import re
import tomllib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from balancectl.errors import ConfigError

if TYPE_CHECKING:
    from balancectl.scheduler.context import JobContext

JobFunction = Callable[["JobContext"], Awaitable[None]]

DEFAULT_MIN_DURATION = 120.0
DEFAULT_MAX_DURATION = 3600.0
_KEYS = {"name", "function", "interval", "min_duration", "max_duration"}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


@dataclass(frozen=True)
class JobSpec:
    """One configured job; ``function`` is its ``module:attribute`` path."""

    name: str
    function: str
    interval: float
    min_duration: float
    call: JobFunction
    # A run still going this long after its start is stopped and recorded ``timed_out``.
    max_duration: float = DEFAULT_MAX_DURATION


def parse_duration(value: object, where: str) -> float:
    """``"90s"``, ``"3m"``, ``"1h"``, ``"250ms"`` or a number of seconds."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ConfigError(f'{where}: expected a duration like "90s" or seconds, got {value!r}')
    if isinstance(value, str):
        match = _DURATION.match(value)
        if match is None:
            raise ConfigError(f'{where}: {value!r} is not a duration like "90s", "3m", "1h"')
        return float(match.group(1)) * _UNITS[match.group(2)]
    if not math.isfinite(value):
        # TOML allows inf and nan; the database cannot add them to a time.
        raise ConfigError(f"{where}: expected a finite number of seconds, got {value!r}")
    return float(value)


def import_function(path: str, where: str) -> JobFunction:
    """Import ``module:attribute`` and check that it is an async callable."""
    module_name, _, attribute = path.partition(":")
    try:
        target: Any = getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError, ValueError) as error:
        raise ConfigError(f"{where}: cannot import {path!r} ({error})") from error
    if not inspect.iscoroutinefunction(target):
        raise ConfigError(f"{where}: {path!r} is not an async function")
    return target  # type: ignore[no-any-return]


def parse_job(entry: object, index: int) -> JobSpec:
    if not isinstance(entry, dict):
        raise ConfigError(f"jobs[{index}]: expected a table")
    name = entry.get("name")
    label = f"job {name!r}" if isinstance(name, str) and name else f"jobs[{index}]"
    if unknown := sorted(set(entry) - _KEYS):
        raise ConfigError(f"{label}: unknown key {unknown[0]!r}")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{label}: field 'name' must be a non-empty string")
    function = entry.get("function")
    if not isinstance(function, str) or ":" not in function:
        raise ConfigError(f"{label}: field 'function' must be 'module:attribute'")
    interval = parse_duration(entry.get("interval"), f"{label}: field 'interval'")
    if interval <= 0:
        raise ConfigError(f"{label}: field 'interval' must be greater than 0")
    min_duration = parse_duration(
        entry.get("min_duration", DEFAULT_MIN_DURATION), f"{label}: field 'min_duration'"
    )
    if min_duration < 0:
        raise ConfigError(f"{label}: field 'min_duration' must not be negative")
    max_duration = parse_duration(
        entry.get("max_duration", default_max_duration(min_duration)),
        f"{label}: field 'max_duration'",
    )
    if max_duration <= min_duration:
        raise ConfigError(f"{label}: field 'max_duration' must be longer than 'min_duration'")
    call = import_function(function, f"{label}: field 'function'")
    return JobSpec(name, function, interval, min_duration, call, max_duration)


def default_max_duration(min_duration: float) -> float:
    """One hour, or an hour past a minimum duration that is itself that long."""
    if min_duration < DEFAULT_MAX_DURATION:
        return DEFAULT_MAX_DURATION
    return min_duration + DEFAULT_MAX_DURATION


def parse_jobs(text: str, source: str) -> list[JobSpec]:
    """Every job of a jobs file; a bad one stops with a message naming the job and field."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{source}: not valid TOML ({error})") from error
    if unknown := sorted(set(document) - {"jobs"}):
        raise ConfigError(f"{source}: unknown top-level key {unknown[0]!r}")
    entries = document.get("jobs", [])
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{source}: expected at least one [[jobs]] table")
    specs = [parse_job(entry, index) for index, entry in enumerate(entries)]
    check_unique(specs)
    return specs


def check_unique(specs: list[JobSpec]) -> None:
    seen: set[str] = set()
    for spec in specs:
        if spec.name in seen:
            raise ConfigError(f"job {spec.name!r}: field 'name' is used by two jobs")
        seen.add(spec.name)


def load_jobs(path: Path | None) -> list[JobSpec]:
    """The jobs of ``path``, or of the package's default jobs file."""
    if path is None:
        text = resources.files("balancectl.jobs").joinpath("default.toml").read_text("utf-8")
        return parse_jobs(text, "default jobs file")
    try:
        text = path.read_text("utf-8")
    except OSError as error:
        raise ConfigError(f"jobs file {path}: {error.strerror}") from error
    return parse_jobs(text, str(path))
