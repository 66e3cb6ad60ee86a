"""The dashboard in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``).

Five nodes run five short jobs; the page must show five nodes alive and every job running.
Then a node is killed with SIGKILL: the page must show it gone, its run lost and the job
running on another node. Then the page's own node is killed: the page must say that the
node stopped answering instead of freezing. Screenshots are saved under the test's
tmp_path (their paths are printed).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.processes import ClusterFactory, node_args
from tests.scheduling import POLL, wait_for, write_jobs

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
        reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, "
        "/usr/bin/chromedriver): apt-get install chromium chromium-driver",
    ),
]
NAMES = ["job-1", "job-2", "job-3", "job-4", "job-5"]
LEASE_TTL = 3.0
MINUTES = 2
# What the page shows, read in one script: rows and bars by their data attributes.
PAGE_STATE = """
const rows = (selector) => [...document.querySelectorAll(selector)];
const byId = (id) => document.getElementById(id) || {dataset: {}, hidden: true};
const banner = byId('banner');
return {
  nodes: Object.fromEntries(
    rows('#nodes tr[data-node]').map(r => [r.dataset.node, r.dataset.alive])),
  jobs: Object.fromEntries(
    rows('#jobs tr[data-job]').map(r => [r.dataset.job, [r.dataset.state, r.dataset.node]])),
  bars: rows('#timeline rect.bar').map(b => [b.dataset.job, b.dataset.node, b.dataset.status]),
  live: byId('live').dataset.live || null,
  banner: banner.hidden ? null : banner.textContent,
  refreshed: byId('refreshed').textContent || null,
  polls: Number(document.body.dataset.polls || 0),
};
"""


@pytest.fixture
def browser(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Any]:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for argument in (
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        "--disable-dev-shm-usage", "--window-size=1440,1200",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
    ):  # fmt: skip
        options.add_argument(argument)
    driver = webdriver.Chrome(options=options, service=Service(executable_path=str(CHROMEDRIVER)))
    driver.set_page_load_timeout(30)
    try:
        yield driver
        failed = getattr(request.node, "rep_call", None)
        if failed is not None and failed.failed:
            screenshot(driver, tmp_path / "failed.png")
    finally:
        driver.quit()
        shutil.rmtree(tmp_path / "chromium-profile", ignore_errors=True)


def page(driver: Any) -> dict[str, Any]:
    state: dict[str, Any] = driver.execute_script(PAGE_STATE)
    return state


def screenshot(driver: Any, path: Path) -> None:
    driver.save_screenshot(str(path))
    print(f"screenshot: {path}")


def everything_running(driver: Any) -> dict[str, Any] | None:
    state = page(driver)
    alive = [node for node, flag in state["nodes"].items() if flag == "true"]
    running = [job for job, (status, _) in state["jobs"].items() if status == "running"]
    return state if len(alive) == 5 and sorted(running) == NAMES else None


def taken_over(driver: Any, victim: str, job: str) -> dict[str, Any] | None:
    state = page(driver)
    gone = state["nodes"].get(victim) == "false"
    lost = [job, victim, "lost"] in state["bars"]
    status, owner = state["jobs"][job]
    elsewhere = status == "running" and owner not in ("", victim)
    running_bar = [job, owner, "running"] in state["bars"]
    return state if gone and lost and elsewhere and running_bar else None


def test_the_page_shows_a_killed_node_gone_its_run_lost_and_the_takeover(
    cluster_factory: ClusterFactory, browser: Any, tmp_path: Path
) -> None:
    jobs = write_jobs(tmp_path / "jobs.toml", NAMES, min_duration="40s", interval="45s")
    cluster = cluster_factory(5, *node_args(jobs_file=jobs, lease_ttl=LEASE_TTL, poll=POLL))
    viewer = cluster.members[0]
    browser.get(f"{viewer.url}/ui?minutes={MINUTES}")  # a short window: the bars show wide

    state = wait_for("5 nodes alive, every job running", lambda: everything_running(browser), 60)
    screenshot(browser, tmp_path / "1-all-running.png")
    assert state["live"] == "live" and state["banner"] is None
    job, victim = next((j, n) for j, (_, n) in sorted(state["jobs"].items()) if n != "node-1")
    cluster.node(victim).process.kill()
    killed = time.monotonic()

    state = wait_for(
        f"{victim} gone, its run of {job} lost, {job} running elsewhere",
        lambda: taken_over(browser, victim, job),
        timeout=LEASE_TTL + 30,
        every=0.25,
    )
    screenshot(browser, tmp_path / "2-node-killed.png")
    print(
        f"{victim} killed: the page showed it gone, {job} lost and running on "
        f"{state['jobs'][job][1]} {time.monotonic() - killed:.1f} s later (lease TTL {LEASE_TTL} s)"
    )
    assert sum(1 for flag in state["nodes"].values() if flag == "true") == 4
    assert state["banner"] is None

    assert_polling_pauses_while_hidden(browser)

    viewer.process.kill()
    killed = time.monotonic()
    banner: str = wait_for("the banner", lambda: page(browser)["banner"], timeout=15)
    screenshot(browser, tmp_path / "3-node-not-answering.png")
    assert banner.startswith("Node not answering since "), banner
    print(f"the page's own node killed: banner after {time.monotonic() - killed:.1f} s")
    assert page(browser)["live"] == "failing"


def assert_polling_pauses_while_hidden(driver: Any) -> None:
    """A hidden tab sends no request; shown again, it polls at once.

    Headless Chromium keeps its one tab visible, so the page is told it is hidden the way
    a tab switch tells it: ``document.hidden`` and a ``visibilitychange`` event.
    """
    driver.execute_script(
        "Object.defineProperty(document, 'hidden', {value: true, configurable: true});"
        "document.dispatchEvent(new Event('visibilitychange'));"
    )
    wait_for("the paused badge", lambda: page(driver)["live"] == "paused", timeout=5)
    before = page(driver)["polls"]
    time.sleep(3)
    assert page(driver)["polls"] == before  # polling every second, it would have sent 3
    driver.execute_script(
        "Object.defineProperty(document, 'hidden', {value: false, configurable: true});"
        "document.dispatchEvent(new Event('visibilitychange'));"
    )
    wait_for("polling again", lambda: page(driver)["polls"] >= before + 2, timeout=10)
    assert page(driver)["live"] == "live"
