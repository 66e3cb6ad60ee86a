"""The load tester: fire every debit of the balance route at once, then check the ledger.

All requests leave together from one ``aiohttp`` session with no client-side connection
cap; the verdict compares what the server answered with what arithmetic says it must:
``floor(start / amount)`` successes, the rest refused as insufficient funds, nothing
else, and a final balance that matches the successes exactly.
"""

from __future__ import annotations

import asyncio
import json
import math
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace

import aiohttp
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text

from balancectl.errors import PROBLEM_TYPE_PREFIX, ConfigError
from balancectl.open_files import raise_open_files_limit

__all__ = [
    "Burst",
    "Check",
    "LatencyStats",
    "LoadtestConfig",
    "LoadtestError",
    "LoadtestReport",
    "RequestResult",
    "Verdict",
    "build_verdict_table",
    "classify",
    "fire_burst",
    "judge",
    "percentile",
    "report_json",
    "run_loadtest",
]

PROBLEM_PREFIX = PROBLEM_TYPE_PREFIX
INSUFFICIENT_FUNDS_TYPE = PROBLEM_PREFIX + "insufficient-funds"
OK = "ok"
INSUFFICIENT = "insufficient"
# Answers that mean "not applied or not seen": safe to repeat under the same key elsewhere.
RETRY_STATUSES = frozenset({502, 503, 504})
# Sockets beyond one per request: stdio, the event loop, the setup and read-back requests.
FD_MARGIN = 64
_TRANSPORT_ERRORS = (aiohttp.ClientError, TimeoutError, OSError)


class LoadtestError(RuntimeError):
    """The load test could not set up or read back the balance (not a verdict on the server)."""


@dataclass(frozen=True)
class LoadtestConfig:
    """What to fire, where, and how; validated on creation (``ConfigError`` when unusable)."""

    urls: tuple[str, ...]
    requests: int = 10000
    amount: int = 2
    user_id: int = 1
    reset: int | None = None
    idempotent: bool = False
    retries: int = 5
    timeout: float = 120.0
    api_token: str | None = None
    progress: bool = True

    def __post_init__(self) -> None:
        problems = _config_problems(self)
        if problems:
            raise ConfigError("; ".join(problems))


def _config_problems(config: LoadtestConfig) -> list[str]:
    checks = [
        (bool(config.urls), "at least one --url is needed"),
        (all(u.startswith(("http://", "https://")) for u in config.urls), "URLs must be http(s)"),
        (config.requests >= 1, "--requests must be at least 1"),
        (config.amount >= 1, "--amount must be at least 1"),
        (config.user_id >= 1, "--user-id must be positive"),
        (config.reset is None or config.reset >= 0, "--reset must not be negative"),
        (config.retries >= 0, "--retries must not be negative"),
        (config.timeout > 0, "--timeout must be positive"),
    ]
    return [message for ok, message in checks if not ok]


@dataclass(frozen=True)
class RequestResult:
    """One request of the burst as the client saw it (after any retries)."""

    outcome: str
    status: int | None
    problem: str | None
    latency_s: float
    retries: int = 0
    replayed: bool = False


@dataclass(frozen=True)
class Check:
    """One line of the verdict: what arithmetic expects, what the server did."""

    name: str
    expected: str
    actual: str
    passed: bool
    reason: str = ""


@dataclass(frozen=True)
class Verdict:
    """The ledger check of one burst; ``passed`` only when every check holds."""

    start_balance: int
    amount: int
    requests: int
    expected_successes: int
    successes: int
    insufficient: int
    other_outcomes: dict[str, int]
    final_balance: int
    expected_final: int
    checks: tuple[Check, ...]

    @property
    def passed(self) -> bool:
        """True when every check holds."""
        return all(check.passed for check in self.checks)

    @property
    def failures(self) -> list[str]:
        """One line per failed check: ``"<check>: <reason>"``."""
        return [f"{c.name}: {c.reason}" for c in self.checks if not c.passed]


@dataclass(frozen=True)
class LatencyStats:
    """Latency percentiles over all requests, in milliseconds."""

    p50_ms: float
    p95_ms: float
    p99_ms: float
    max_ms: float

    @classmethod
    def from_seconds(cls, latencies: Sequence[float]) -> LatencyStats:
        """Summarise latencies given in seconds."""
        ms = [1000.0 * x for x in latencies]
        return cls(percentile(ms, 50), percentile(ms, 95), percentile(ms, 99), max(ms, default=0.0))


@dataclass(frozen=True)
class LoadtestReport:
    """Everything the load test found: the verdict plus how the burst went."""

    verdict: Verdict
    latency: LatencyStats
    wall_seconds: float
    requests_per_second: float
    urls: tuple[str, ...]
    user_id: int
    idempotent: bool
    retries: int
    replayed: int
    open_files_limit: int
    open_files_needed: int
    open_files_note: str | None
    client_cpu_seconds: float = 0.0

    @property
    def passed(self) -> bool:
        """The verdict: exit status 0 when True, 1 when False."""
        return self.verdict.passed

    @property
    def url_count(self) -> int:
        """How many nodes the requests were spread over."""
        return len(self.urls)


# --- pure parts: classification, percentiles, verdict -------------------------------------


def classify(status: int, problem_type: str | None) -> str:
    """The outcome class of an HTTP answer: ``ok``, ``insufficient`` or ``http-<status>``."""
    if status == 200:
        return OK
    if status == 409 and problem_type == INSUFFICIENT_FUNDS_TYPE:
        return INSUFFICIENT
    return f"http-{status}"


def percentile(values: Sequence[float], pct: float) -> float:
    """The nearest-rank percentile ``pct`` (0..100) of ``values``; 0.0 when empty."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = math.ceil(pct / 100 * len(ordered))
    return ordered[min(max(rank - 1, 0), len(ordered) - 1)]


def judge(
    start_balance: int, amount: int, requests: int, outcomes: Iterable[str], final_balance: int
) -> Verdict:
    """Check a burst of ``requests`` debits of ``amount`` from ``start_balance``."""
    counts = Counter(outcomes)
    successes = counts.pop(OK, 0)
    insufficient = counts.pop(INSUFFICIENT, 0)
    expected_successes = min(max(start_balance // amount, 0), requests)
    verdict = Verdict(
        start_balance=start_balance,
        amount=amount,
        requests=requests,
        expected_successes=expected_successes,
        successes=successes,
        insufficient=insufficient,
        other_outcomes=dict(sorted(counts.items())),
        final_balance=final_balance,
        expected_final=start_balance - amount * successes,
        checks=(),
    )
    return _with_checks(verdict)


def _with_checks(v: Verdict) -> Verdict:
    checks = (
        _check_successes(v),
        _check_insufficient(v),
        _check_others(v),
        _check_final(v),
        _check_non_negative(v),
    )
    return replace(v, checks=checks)


def _check(name: str, expected: object, actual: object, reason: str) -> Check:
    passed = expected == actual
    return Check(name, str(expected), str(actual), passed, "" if passed else reason)


def _check_successes(v: Verdict) -> Check:
    reason = (
        f"expected {v.expected_successes} debits to succeed "
        f"(min(floor({v.start_balance} / {v.amount}), {v.requests})), got {v.successes}"
    )
    return _check("successes", v.expected_successes, v.successes, reason)


def _check_insufficient(v: Verdict) -> Check:
    expected = v.requests - v.expected_successes
    reason = f"expected {expected} insufficient-funds refusals, got {v.insufficient}"
    return _check("insufficient funds", expected, v.insufficient, reason)


def _check_others(v: Verdict) -> Check:
    actual = _format_counts(v.other_outcomes)
    total = sum(v.other_outcomes.values())
    reason = f"{total} requests ended neither ok nor insufficient: {actual}"
    return _check("other outcomes", "none", actual, reason)


def _check_final(v: Verdict) -> Check:
    reason = (
        f"final balance {v.final_balance} does not match "
        f"{v.start_balance} - {v.amount} x {v.successes} successes = {v.expected_final}"
    )
    return _check("final balance", v.expected_final, v.final_balance, reason)


def _check_non_negative(v: Verdict) -> Check:
    passed = v.final_balance >= 0
    reason = "" if passed else f"balance went negative: {v.final_balance}"
    return Check("balance never negative", ">= 0", str(v.final_balance), passed, reason)


def _format_counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{name} x{n}" for name, n in counts.items()) or "none"


# --- rendering ----------------------------------------------------------------------------


def build_verdict_table(report: LoadtestReport) -> Table:
    """The verdict as a rich table: each check with expected, actual and PASS/FAIL, then stats."""
    verdict = report.verdict
    table = Table(title=f"Load test verdict: {_pass_text(verdict.passed)}", title_justify="left")
    for column in ("Check", "Expected", "Actual", "Result"):
        table.add_column(column)
    for check in verdict.checks:
        table.add_row(check.name, check.expected, check.actual, _result_cell(check.passed))
    table.add_section()
    for name, value in _stat_rows(report):
        table.add_row(name, "", value, "")
    table.add_row(*_open_files_row(report))
    if verdict.failures:
        table.caption = "\n".join(verdict.failures)
    return table


def _open_files_row(report: LoadtestReport) -> tuple[str, str, str, Text]:
    warn = Text("WARN", style="bold yellow") if report.open_files_note else Text("")
    needed = f">= {report.open_files_needed}"
    return "open files limit", needed, str(report.open_files_limit), warn


def _pass_text(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def _result_cell(passed: bool) -> Text:
    return Text(_pass_text(passed), style="bold green" if passed else "bold red")


def _stat_rows(report: LoadtestReport) -> list[tuple[str, str]]:
    lat = report.latency
    rows = [
        ("latency p50", f"{lat.p50_ms:.1f} ms"),
        ("latency p95", f"{lat.p95_ms:.1f} ms"),
        ("latency p99", f"{lat.p99_ms:.1f} ms"),
        ("latency max", f"{lat.max_ms:.1f} ms"),
        ("wall time", f"{report.wall_seconds:.2f} s"),
        ("throughput", f"{report.requests_per_second:.0f} req/s"),
        ("client CPU", _client_cpu_text(report)),
        ("urls", str(report.url_count)),
    ]
    if report.idempotent:
        rows += [("retries", str(report.retries)), ("replayed", str(report.replayed))]
    return rows


def _client_cpu_text(report: LoadtestReport) -> str:
    """This process's CPU time over the burst: near the wall time, the client is the limit."""
    share = report.client_cpu_seconds / report.wall_seconds if report.wall_seconds else 0.0
    return f"{report.client_cpu_seconds:.2f} s ({share:.0%} of a core)"


def report_json(report: LoadtestReport) -> dict[str, object]:
    """The same facts as ``build_verdict_table``, ready for ``json.dumps``."""
    v = report.verdict
    return {
        "passed": v.passed,
        "failures": v.failures,
        "checks": [asdict(c) for c in v.checks],
        "requests": v.requests,
        "amount": v.amount,
        "user_id": report.user_id,
        "start_balance": v.start_balance,
        "expected_successes": v.expected_successes,
        "successes": v.successes,
        "insufficient": v.insufficient,
        "other_outcomes": dict(v.other_outcomes),
        "final_balance": v.final_balance,
        "expected_final": v.expected_final,
        "latency_ms": _latency_json(report.latency),
        "wall_seconds": report.wall_seconds,
        "requests_per_second": report.requests_per_second,
        "client_cpu_seconds": report.client_cpu_seconds,
        "urls": list(report.urls),
        "url_count": report.url_count,
        "idempotent": report.idempotent,
        "retries": report.retries,
        "replayed": report.replayed,
        "open_files": _open_files_json(report),
    }


def _latency_json(latency: LatencyStats) -> dict[str, float]:
    return {
        "p50": latency.p50_ms,
        "p95": latency.p95_ms,
        "p99": latency.p99_ms,
        "max": latency.max_ms,
    }


def _open_files_json(report: LoadtestReport) -> dict[str, object]:
    return {
        "limit": report.open_files_limit,
        "needed": report.open_files_needed,
        "note": report.open_files_note,
    }


# --- open files ---------------------------------------------------------------------------


def _open_files_note(soft: int, needed: int) -> str | None:
    if soft >= needed:
        return None
    return (
        f"open-files limit {soft} is below the {needed} sockets this burst needs; "
        "expect connection errors (raise it with `ulimit -n`)"
    )


# --- HTTP ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Attempt:
    outcome: str
    status: int | None
    problem_type: str | None
    replayed: bool


def _balance_url(base: str, user_id: int) -> str:
    return f"{base.rstrip('/')}/users/{user_id}/balance"


def _user_url(base: str, user_id: int) -> str:
    return f"{base.rstrip('/')}/users/{user_id}"


async def _read_json(response: aiohttp.ClientResponse) -> object:
    raw = await response.read()
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def _problem_type(body: object) -> str | None:
    if isinstance(body, dict) and isinstance(body.get("type"), str):
        return str(body["type"])
    return None


async def _attempt(
    session: aiohttp.ClientSession, url: str, amount: int, headers: dict[str, str]
) -> _Attempt:
    """One POST of ``amount``; transport failures become ``error:<ExceptionClass>``."""
    try:
        async with session.post(url, json={"amount": amount}, headers=headers) as response:
            problem = _problem_type(await _read_json(response))
            replayed = response.headers.get("Idempotent-Replayed", "").lower() == "true"
            return _Attempt(classify(response.status, problem), response.status, problem, replayed)
    except _TRANSPORT_ERRORS as exc:
        return _Attempt(f"error:{type(exc).__name__}", None, None, False)


def _retryable(attempt: _Attempt) -> bool:
    return attempt.status is None or attempt.status in RETRY_STATUSES


def _key_headers(idempotent: bool) -> dict[str, str]:
    return {"Idempotency-Key": str(uuid.uuid4())} if idempotent else {}


async def _post_with_retries(
    session: aiohttp.ClientSession, config: LoadtestConfig, index: int, amount: int
) -> tuple[_Attempt, int]:
    """POST, and with ``idempotent`` repeat the same key on the next URLs while unseen."""
    headers = _key_headers(config.idempotent)
    # Without a key a repeat could apply twice, so only keyed requests are retried.
    max_retries = config.retries if config.idempotent else 0
    retries = 0
    attempt = await _attempt(session, _pick_url(config, index), amount, headers)
    while _retryable(attempt) and retries < max_retries:
        retries += 1
        attempt = await _attempt(session, _pick_url(config, index + retries), amount, headers)
    return attempt, retries


def _pick_url(config: LoadtestConfig, index: int) -> str:
    return _balance_url(config.urls[index % len(config.urls)], config.user_id)


async def _fire_one(
    session: aiohttp.ClientSession,
    config: LoadtestConfig,
    index: int,
    start: asyncio.Event,
    done: Callable[[], None],
) -> RequestResult:
    await start.wait()
    began = time.perf_counter()
    attempt, retries = await _post_with_retries(session, config, index, -config.amount)
    latency = time.perf_counter() - began
    done()
    slug = attempt.problem_type.removeprefix(PROBLEM_PREFIX) if attempt.problem_type else None
    return RequestResult(attempt.outcome, attempt.status, slug, latency, retries, attempt.replayed)


def _progress_bar(enabled: bool) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=Console(stderr=True),
        disable=not enabled,
        transient=True,
    )


@dataclass(frozen=True)
class Burst:
    """What the client saw of one burst: each request, the wall time, its own CPU time."""

    results: list[RequestResult]
    wall_seconds: float
    client_cpu_seconds: float


async def fire_burst(config: LoadtestConfig) -> Burst:
    """Fire every request at the same moment from a fresh session; no reset, no verdict."""
    async with _open_session(config) as session:
        cpu = time.process_time()
        results, wall = await _burst(session, config)
        return Burst(results, wall, time.process_time() - cpu)


async def _burst(
    session: aiohttp.ClientSession, config: LoadtestConfig
) -> tuple[list[RequestResult], float]:
    """Fire every request at the same moment; return their results and the wall time."""
    start = asyncio.Event()
    with _progress_bar(config.progress) as bar:
        task_id = bar.add_task("debits", total=config.requests)

        def done() -> None:
            bar.advance(task_id)

        async with asyncio.TaskGroup() as group:
            tasks = [
                group.create_task(_fire_one(session, config, i, start, done))
                for i in range(config.requests)
            ]
            await asyncio.sleep(0)  # every task now waits on ``start``: they leave together
            began = time.perf_counter()
            start.set()
        wall = time.perf_counter() - began
    return [task.result() for task in tasks], wall


async def _get_balance(session: aiohttp.ClientSession, config: LoadtestConfig) -> int:
    """The user's balance, from the first URL that answers it."""
    errors: list[str] = []
    for base in config.urls:
        try:
            async with session.get(_user_url(base, config.user_id)) as response:
                body = await _read_json(response)
                status = response.status
        except _TRANSPORT_ERRORS as exc:
            errors.append(f"{base}: {type(exc).__name__}")
            continue
        balance = body.get("balance") if isinstance(body, dict) else None
        if status == 200 and isinstance(balance, int) and not isinstance(balance, bool):
            return balance
        errors.append(f"{base}: HTTP {status}")
    raise LoadtestError(f"could not read the balance of user {config.user_id}: {'; '.join(errors)}")


async def _reset_balance(session: aiohttp.ClientSession, config: LoadtestConfig, to: int) -> None:
    """Bring the balance to ``to`` with one keyed credit or debit, so the ledger stays whole."""
    delta = to - await _get_balance(session, config)
    if delta == 0:
        return
    headers = _key_headers(True)
    attempt = await _attempt(session, _pick_url(config, 0), delta, headers)
    for retry in range(1, len(config.urls)):
        if not _retryable(attempt):
            break
        attempt = await _attempt(session, _pick_url(config, retry), delta, headers)
    if attempt.outcome != OK:
        raise LoadtestError(f"could not reset the balance to {to}: {attempt.outcome}")


def _open_session(config: LoadtestConfig) -> aiohttp.ClientSession:
    headers = {"Authorization": f"Bearer {config.api_token}"} if config.api_token else {}
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0, limit_per_host=0),
        timeout=aiohttp.ClientTimeout(total=config.timeout),
        headers=headers,
    )


async def run_loadtest(config: LoadtestConfig) -> LoadtestReport:
    """Reset (optionally), read the start balance, fire the burst, read back, and judge.

    Raises ``LoadtestError`` when the balance cannot be reset or read; a server that
    answers wrongly is not an error but a failed verdict.
    """
    soft, _hard = raise_open_files_limit()
    async with _open_session(config) as session:
        if config.reset is not None:
            await _reset_balance(session, config, config.reset)
        start_balance = await _get_balance(session, config)
    # A session of its own: no burst request rides on a kept-alive connection that
    # the server may be closing at that very moment.
    burst = await fire_burst(config)
    async with _open_session(config) as session:
        final_balance = await _get_balance(session, config)
    return _build_report(config, start_balance, burst, final_balance, soft)


def _build_report(
    config: LoadtestConfig, start_balance: int, burst: Burst, final_balance: int, open_files: int
) -> LoadtestReport:
    results, wall = burst.results, burst.wall_seconds
    outcomes = (r.outcome for r in results)
    needed = config.requests + FD_MARGIN
    return LoadtestReport(
        verdict=judge(start_balance, config.amount, config.requests, outcomes, final_balance),
        latency=LatencyStats.from_seconds([r.latency_s for r in results]),
        wall_seconds=wall,
        requests_per_second=config.requests / wall if wall > 0 else 0.0,
        urls=config.urls,
        user_id=config.user_id,
        idempotent=config.idempotent,
        retries=sum(r.retries for r in results),
        replayed=sum(r.replayed for r in results),
        open_files_limit=open_files,
        open_files_needed=needed,
        open_files_note=_open_files_note(open_files, needed),
        client_cpu_seconds=burst.client_cpu_seconds,
    )
