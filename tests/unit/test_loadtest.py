"""The load tester: its pure verdict, percentiles and rendering, and one run against a fake.

The fake below is an in-memory aiohttp app that stands in for the balance route in these
unit tests only; the real service is exercised by the integration and e2e suites.
"""

from __future__ import annotations

import asyncio
import io
import json
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Literal

import pytest
from aiohttp import web
from rich.console import Console

from balancectl.errors import ConfigError
from balancectl.open_files import raise_open_files_limit
from balancectl.toolkit.loadtest import (
    INSUFFICIENT_FUNDS_TYPE,
    LatencyStats,
    LoadtestConfig,
    LoadtestReport,
    Verdict,
    build_verdict_table,
    classify,
    judge,
    percentile,
    report_json,
    run_loadtest,
)

# --- pure parts ---------------------------------------------------------------------------


def test_percentile_is_nearest_rank() -> None:
    values = [float(x) for x in range(100, 0, -1)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 95) == 95.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile(values, 0) == 1.0


def test_percentile_of_nothing_and_of_one_value() -> None:
    assert percentile([], 99) == 0.0
    assert percentile([7.5], 50) == 7.5


def test_latency_stats_are_in_milliseconds() -> None:
    stats = LatencyStats.from_seconds([0.001, 0.002, 0.010])
    assert stats == LatencyStats(p50_ms=2.0, p95_ms=10.0, p99_ms=10.0, max_ms=10.0)


@pytest.mark.parametrize(
    ("status", "problem_type", "expected"),
    [
        (200, None, "ok"),
        (409, INSUFFICIENT_FUNDS_TYPE, "insufficient"),
        (409, "urn:balancectl:problem:balance-overflow", "http-409"),
        (503, "urn:balancectl:problem:unavailable", "http-503"),
        (500, None, "http-500"),
    ],
)
def test_classify(status: int, problem_type: str | None, expected: str) -> None:
    assert classify(status, problem_type) == expected


def test_exact_server_passes() -> None:
    verdict = judge(100, 2, 200, ["ok"] * 50 + ["insufficient"] * 150, final_balance=0)
    assert verdict.passed
    assert verdict.failures == []
    assert (verdict.expected_successes, verdict.successes, verdict.insufficient) == (50, 50, 150)
    assert verdict.expected_final == 0


def test_odd_start_balance_rounds_successes_down() -> None:
    verdict = judge(101, 2, 200, ["ok"] * 50 + ["insufficient"] * 150, final_balance=1)
    assert verdict.passed


def test_more_money_than_requests_expects_all_to_succeed() -> None:
    verdict = judge(10000, 2, 100, ["ok"] * 100, final_balance=9800)
    assert verdict.expected_successes == 100
    assert verdict.passed


def failed_names(verdict: Verdict) -> set[str]:
    return {check.name for check in verdict.checks if not check.passed}


def test_overdraft_fails_successes_refusals_and_sign() -> None:
    verdict = judge(100, 2, 200, ["ok"] * 200, final_balance=-300)
    assert not verdict.passed
    assert failed_names(verdict) == {"successes", "insufficient funds", "balance never negative"}
    assert any("balance went negative: -300" in line for line in verdict.failures)


def test_lost_update_fails_only_the_final_balance() -> None:
    verdict = judge(100, 2, 200, ["ok"] * 50 + ["insufficient"] * 150, final_balance=2)
    assert failed_names(verdict) == {"final balance"}
    assert verdict.failures == [
        "final balance: final balance 2 does not match 100 - 2 x 50 successes = 0"
    ]


def test_other_outcomes_fail_the_verdict() -> None:
    outcomes = ["ok"] * 49 + ["insufficient"] * 150 + ["error:ClientConnectorError"]
    verdict = judge(100, 2, 200, outcomes, final_balance=2)
    assert verdict.other_outcomes == {"error:ClientConnectorError": 1}
    assert failed_names(verdict) == {"successes", "other outcomes"}


def make_report(verdict: Verdict, *, idempotent: bool = False) -> LoadtestReport:
    return LoadtestReport(
        verdict=verdict,
        latency=LatencyStats(1.0, 2.0, 3.0, 4.0),
        wall_seconds=0.5,
        requests_per_second=400.0,
        urls=("http://127.0.0.1:8001", "http://127.0.0.1:8002"),
        user_id=1,
        idempotent=idempotent,
        retries=3,
        replayed=1,
        open_files_limit=100,
        open_files_needed=264,
        open_files_note="open-files limit 100 is below the 264 sockets this burst needs",
        client_cpu_seconds=0.25,
    )


def render(report: LoadtestReport) -> list[str]:
    console = Console(file=io.StringIO(), width=200, color_system=None)
    console.print(build_verdict_table(report))
    output = console.file.getvalue()  # type: ignore[attr-defined]
    assert isinstance(output, str)
    return output.splitlines()


def row(lines: list[str], name: str) -> str:
    return next(line for line in lines if f" {name} " in line)


def test_table_marks_each_check_pass_or_fail() -> None:
    lines = render(make_report(judge(100, 2, 200, ["ok"] * 200, final_balance=-300)))
    assert "FAIL" in lines[0]
    assert row(lines, "successes").rstrip(" │").endswith("FAIL")
    assert row(lines, "final balance").rstrip(" │").endswith("PASS")
    assert "-300" in row(lines, "balance never negative")
    assert "4.0 ms" in row(lines, "latency max")
    assert "0.50 s" in row(lines, "wall time")
    assert "WARN" in row(lines, "open files limit")


def test_table_of_a_passing_run_has_no_fail() -> None:
    verdict = judge(100, 2, 200, ["ok"] * 50 + ["insufficient"] * 150, final_balance=0)
    text = "\n".join(render(make_report(verdict, idempotent=True)))
    assert "FAIL" not in text
    assert text.count("PASS") == len(verdict.checks) + 1  # each check plus the title
    assert "replayed" in text


def test_report_json_carries_the_same_facts() -> None:
    data = report_json(make_report(judge(100, 2, 200, ["ok"] * 200, final_balance=-300)))
    assert set(data) == {
        "passed", "failures", "checks", "requests", "amount", "user_id", "start_balance",
        "expected_successes", "successes", "insufficient", "other_outcomes", "final_balance",
        "expected_final", "latency_ms", "wall_seconds", "requests_per_second", "urls",
        "url_count", "idempotent", "retries", "replayed", "open_files", "client_cpu_seconds",
    }  # fmt: skip
    assert data["passed"] is False
    assert data["latency_ms"] == {"p50": 1.0, "p95": 2.0, "p99": 3.0, "max": 4.0}
    assert data["url_count"] == 2
    assert data["client_cpu_seconds"] == 0.25
    assert json.loads(json.dumps(data)) == data


@pytest.mark.parametrize(
    "bad",
    [
        {"urls": ()},
        {"urls": ("127.0.0.1:8001",)},
        {"requests": 0},
        {"amount": 0},
        {"reset": -1},
        {"timeout": 0},
    ],
)
def test_unusable_config_is_refused(bad: dict[str, object]) -> None:
    arguments: dict[str, object] = {"urls": ("http://127.0.0.1:8001",), **bad}
    with pytest.raises(ConfigError):
        LoadtestConfig(**arguments)  # type: ignore[arg-type]


def test_open_files_limit_is_raised_not_lowered() -> None:
    soft, hard = raise_open_files_limit()
    assert 0 < soft <= hard
    assert raise_open_files_limit()[0] >= soft


# --- against an in-memory fake of the balance route ---------------------------------------

REPLAYED = {"Idempotent-Replayed": "true"}
Mode = Literal["exact", "overdraft", "unavailable", "drop-after-apply"]


@dataclass
class FakeLedger:
    """One user's balance plus stored idempotent replies, shared by every fake node."""

    balance: int
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    replies: dict[str, tuple[int, dict[str, object]]] = field(default_factory=dict)
    dropped: set[str] = field(default_factory=set)

    def apply(self, amount: int, *, overdraft: bool) -> tuple[int, dict[str, object]]:
        if self.balance + amount < 0 and not overdraft:
            return 409, {"type": INSUFFICIENT_FUNDS_TYPE, "balance": self.balance, "amount": amount}
        self.balance += amount
        return 200, {"userId": 1, "balance": self.balance, "amount": amount}


def fake_app(ledger: FakeLedger, mode: Mode) -> web.Application:
    async def get_user(request: web.Request) -> web.Response:
        return web.json_response({"userId": 1, "balance": ledger.balance})

    async def post_balance(request: web.Request) -> web.Response:
        if mode == "unavailable":
            return web.json_response({"type": "urn:balancectl:problem:unavailable"}, status=503)
        amount = (await request.json())["amount"]
        key = request.headers.get("Idempotency-Key")
        async with ledger.lock:
            if key in ledger.replies:
                status, body = ledger.replies[key]
                return web.json_response(body, status=status, headers=REPLAYED)
            status, body = ledger.apply(amount, overdraft=mode == "overdraft")
            if key:
                ledger.replies[key] = (status, body)
        if mode == "drop-after-apply" and (key is None or key not in ledger.dropped):
            ledger.dropped.add(key or "")  # applied, but the answer is lost on the way
            assert request.transport is not None
            request.transport.close()
        return web.json_response(body, status=status)

    app = web.Application()
    app.router.add_get("/users/1", get_user)
    app.router.add_post("/users/1/balance", post_balance)
    return app


@asynccontextmanager
async def fake_node(ledger: FakeLedger, mode: Mode = "exact") -> AsyncIterator[str]:
    runner = web.AppRunner(fake_app(ledger, mode))
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0, backlog=1024).start()
        host, port = runner.addresses[0][:2]
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def fake_cluster(ledger: FakeLedger, *modes: Mode) -> AsyncIterator[tuple[str, ...]]:
    async with AsyncExitStack() as stack:
        yield tuple([await stack.enter_async_context(fake_node(ledger, m)) for m in modes])


async def test_exact_fake_passes_after_reset() -> None:
    ledger = FakeLedger(balance=10000)
    async with fake_cluster(ledger, "exact", "exact") as urls:
        config = LoadtestConfig(urls=urls, requests=200, amount=2, reset=100, progress=False)
        report = await run_loadtest(config)
    verdict = report.verdict
    assert (verdict.start_balance, verdict.successes, verdict.insufficient) == (100, 50, 150)
    assert verdict.final_balance == ledger.balance == 0
    assert report.passed, verdict.failures
    assert report.url_count == 2


async def test_overdrafting_fake_fails_and_names_the_checks() -> None:
    ledger = FakeLedger(balance=100)
    async with fake_cluster(ledger, "overdraft") as urls:
        config = LoadtestConfig(urls=urls, requests=200, amount=2, progress=False)
        report = await run_loadtest(config)
    assert not report.passed
    assert report.verdict.final_balance == -300
    assert {"successes", "insufficient funds", "balance never negative"} == {
        line.split(":")[0] for line in report.verdict.failures
    }


async def test_idempotent_retries_go_to_the_next_node() -> None:
    ledger = FakeLedger(balance=30)
    async with fake_cluster(ledger, "unavailable", "exact") as urls:
        config = LoadtestConfig(urls=urls, requests=20, idempotent=True, progress=False)
        report = await run_loadtest(config)
    assert report.passed, report.verdict.failures
    assert report.retries == 10  # the 10 requests that started on the unavailable node
    assert ledger.balance == 0


async def test_idempotent_retry_of_a_lost_answer_is_replayed_not_reapplied() -> None:
    ledger = FakeLedger(balance=30)
    async with fake_cluster(ledger, "drop-after-apply") as urls:
        config = LoadtestConfig(urls=urls, requests=20, idempotent=True, progress=False)
        report = await run_loadtest(config)
    assert report.passed, report.verdict.failures
    assert (report.retries, report.replayed) == (20, 20)
    assert (report.verdict.successes, ledger.balance) == (15, 0)


async def test_without_keys_a_lost_answer_is_an_error_and_fails() -> None:
    ledger = FakeLedger(balance=30)
    async with fake_cluster(ledger, "drop-after-apply") as urls:
        config = LoadtestConfig(urls=urls, requests=20, progress=False)
        report = await run_loadtest(config)
    assert not report.passed
    assert report.retries == 0
    assert report.verdict.other_outcomes == {"error:ServerDisconnectedError": 20}


def test_table_shows_the_clients_own_cpu_time_against_the_wall_time() -> None:
    lines = render(make_report(judge(100, 2, 200, ["ok"] * 50 + ["insufficient"] * 150, 0)))
    row = next(line for line in lines if "client CPU" in line)
    assert "0.25 s (50% of a core)" in row
