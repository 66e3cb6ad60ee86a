"""The dashboard in a real headless Chromium (Debian's ``chromium`` and ``chromium-driver``).

Five nodes run five short jobs; the page must show five nodes alive and every job running.
Then a node is killed with SIGKILL: the page must show it gone, its run lost and the job
running on another node. Then the page's own node is killed: the page must say that the
node stopped answering instead of freezing. Then, with a token on the nodes: the page is
read-only until the operator enters the token; a wrong one is refused and the controls
hide again; with the right one the operator pauses a job (stopping its run), resumes it
and runs another now, and sees the balance route's requests by outcome. Screenshots are
saved under the test's tmp_path (their paths are printed).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.processes import ClusterFactory, http_json, node_args
from tests.scheduling import POLL, jobs_listing, wait_for, write_jobs

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


OPERATOR_TOKEN = "browser-operator-token"
BEARER = {"Authorization": f"Bearer {OPERATOR_TOKEN}"}
# The operator's part of the page: verb buttons by job, the message, the request counts.
OPERATOR_STATE = """
const message = document.getElementById('operator-message');
const verbs = {};
for (const b of document.querySelectorAll('#jobs button[data-verb]')) {
  (verbs[b.dataset.job] = verbs[b.dataset.job] || []).push(b.dataset.verb);
}
return {
  unlocked: document.body.dataset.operator === 'unlocked',
  token_field: !document.getElementById('unlock').hidden,
  verbs,
  message: message.hidden ? null : [message.dataset.kind, message.textContent],
  paused: Object.fromEntries([...document.querySelectorAll('#jobs tr[data-job]')]
    .map(r => [r.dataset.job, r.dataset.paused])),
  requests: Object.fromEntries([...document.querySelectorAll('#requests [data-outcome]')]
    .map(c => [c.dataset.outcome, Number(c.dataset.count)])),
  stored: sessionStorage.length + localStorage.length,
};
"""


def operator_view(driver: Any) -> dict[str, Any]:
    state: dict[str, Any] = driver.execute_script(OPERATOR_STATE)
    return state


def enter_token(driver: Any, token: str) -> None:
    from selenium.webdriver.common.by import By

    field = driver.find_element(By.ID, "token")
    field.clear()
    field.send_keys(token)
    driver.find_element(By.ID, "unlock-button").click()


def click_verb(driver: Any, verb: str, job: str) -> None:
    """Click a job's verb button; the jobs table is redrawn every second, so retry a
    button that was replaced between finding and clicking it."""
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By

    selector = f'#jobs button[data-verb="{verb}"][data-job="{job}"]'
    for _ in range(10):
        try:
            driver.find_element(By.CSS_SELECTOR, selector).click()
            return
        except StaleElementReferenceException:
            time.sleep(0.05)
    raise AssertionError(f"could not click {selector}")


def job_is(driver: Any, job: str, states: tuple[str, ...]) -> dict[str, Any] | None:
    state = page(driver)
    return state if state["jobs"].get(job, [None])[0] in states else None


def ran_once_and_waits(driver: Any, job: str) -> dict[str, Any] | None:
    """The page once ``job`` waits after a run that succeeded (before its first claim it
    waits too, with no bar)."""
    state = job_is(driver, job, ("waiting",))
    if state is None or [job, "succeeded"] not in [[b[0], b[2]] for b in state["bars"]]:
        return None
    return state


def paused_and_stopped(driver: Any, job: str) -> dict[str, Any] | None:
    state = job_is(driver, job, ("paused",))
    if state is None or [job, "cancelled"] not in [[b[0], b[2]] for b in state["bars"]]:
        return None
    return state


def test_the_operator_uses_the_verbs_behind_the_token_and_sees_the_requests_by_outcome(
    cluster_factory: ClusterFactory, browser: Any, tmp_path: Path
) -> None:
    # job-a runs long (to be paused and stopped); job-b runs once, then waits an hour.
    write_jobs(tmp_path / "a.toml", ["job-a"], min_duration="40s", interval="1h")
    write_jobs(tmp_path / "b.toml", ["job-b"], min_duration="5s", interval="1h")
    jobs = tmp_path / "jobs.toml"
    jobs.write_text((tmp_path / "a.toml").read_text() + "\n" + (tmp_path / "b.toml").read_text())
    args = node_args(jobs_file=jobs, lease_ttl=LEASE_TTL, poll=POLL)
    viewer, other = cluster_factory(2, *args, "--api-token", OPERATOR_TOKEN).members
    browser.get(f"{viewer.url}/ui?minutes={MINUTES}")

    wait_for("job-a running", lambda: job_is(browser, "job-a", ("running",)), timeout=60)
    wait_for("job-b's first run over", lambda: ran_once_and_waits(browser, "job-b"), 60)
    wait_for("job-a running", lambda: job_is(browser, "job-a", ("running",)), timeout=5)
    view = operator_view(browser)
    assert (view["unlocked"], view["token_field"], view["verbs"]) == (False, True, {})
    screenshot(browser, tmp_path / "4-read-only.png")

    enter_token(browser, "not-the-token")
    wait_for("the controls", lambda: operator_view(browser)["verbs"].get("job-a"), timeout=5)
    click_verb(browser, "pause", "job-a")
    kind, text = wait_for("the refusal", lambda: operator_view(browser)["message"], 10)
    assert kind == "bad" and "refused the token" in text and "401" in text, text
    view = operator_view(browser)
    assert (view["unlocked"], view["token_field"], view["verbs"]) == (False, True, {})
    assert jobs_listing(viewer)["job-a"]["paused"] is False
    screenshot(browser, tmp_path / "5-wrong-token-refused.png")

    enter_token(browser, OPERATOR_TOKEN)
    wait_for("the controls", lambda: operator_view(browser)["verbs"].get("job-a"), timeout=5)
    assert operator_view(browser)["verbs"]["job-a"] == ["run", "pause", "pause-stop"]
    click_verb(browser, "pause-stop", "job-a")
    state = wait_for(
        "job-a paused, its run stopped (cancelled)",
        lambda: paused_and_stopped(browser, "job-a"),
        timeout=LEASE_TTL + 10,
    )
    view = operator_view(browser)
    assert view["paused"]["job-a"] == "true" and view["verbs"]["job-a"] == ["resume"]
    assert view["message"][0] == "ok", view["message"]
    assert state["jobs"]["job-b"][0] == "waiting"
    screenshot(browser, tmp_path / "6-paused-and-stopped.png")

    click_verb(browser, "resume", "job-a")
    wait_for("job-a resumed", lambda: job_is(browser, "job-a", ("waiting", "running")), 10)
    assert operator_view(browser)["paused"]["job-a"] == "false"
    click_verb(browser, "run", "job-b")
    wait_for("job-b running again", lambda: job_is(browser, "job-b", ("running",)), 10)
    screenshot(browser, tmp_path / "7-resumed-and-run-now.png")

    fire_known_requests(other.url)
    want = {"changed": 3, "replayed": 0, "refused": 2, "not_found": 1, "invalid": 1,
            "unauthorized": 1, "unavailable": 0, "failed": 0}  # fmt: skip
    wait_for("the counts", lambda: operator_view(browser)["requests"] == want, timeout=10)
    screenshot(browser, tmp_path / "8-requests-by-outcome.png")
    assert operator_view(browser)["stored"] == 0  # the token is in no storage
    assert OPERATOR_TOKEN not in browser.page_source


def fire_known_requests(url: str) -> None:
    """At one node, known answers of the balance route (the page shows another node)."""
    target = f"{url}/users/1/balance"
    sent = [http_json(target, "POST", {"amount": -1}, headers=BEARER)[0] for _ in range(3)]
    sent += [http_json(target, "POST", {"amount": -(10**9)}, headers=BEARER)[0] for _ in range(2)]
    sent.append(http_json(f"{url}/users/77/balance", "POST", {"amount": 1}, headers=BEARER)[0])
    sent.append(http_json(target, "POST", {"amount": 0}, headers=BEARER)[0])
    sent.append(http_json(target, "POST", {"amount": 1})[0])
    assert sent == [200, 200, 200, 409, 409, 404, 422, 401], sent


def test_without_a_token_on_the_node_the_controls_show_once_the_operator_asks(
    cluster_factory: ClusterFactory, browser: Any, tmp_path: Path
) -> None:
    jobs = write_jobs(tmp_path / "jobs.toml", ["job-a"], min_duration="40s", interval="1h")
    (node,) = cluster_factory(1, *node_args(jobs_file=jobs, lease_ttl=LEASE_TTL, poll=POLL)).members
    browser.get(f"{node.url}/ui?minutes={MINUTES}")
    wait_for("job-a running", lambda: job_is(browser, "job-a", ("running",)), timeout=60)
    view = operator_view(browser)
    assert (view["unlocked"], view["verbs"]) == (False, {})  # read-only all the same
    assert not browser.find_element("id", "token-label").is_displayed()
    browser.find_element("id", "unlock-button").click()
    wait_for("the controls", lambda: operator_view(browser)["verbs"].get("job-a"), timeout=5)
    click_verb(browser, "pause", "job-a")  # the run goes on: running, and paused
    wait_for("job-a marked paused", lambda: operator_view(browser)["paused"]["job-a"] == "true", 5)
    assert page(browser)["jobs"]["job-a"][0] == "running"
    assert operator_view(browser)["verbs"]["job-a"] == ["resume", "pause-stop"]
    assert jobs_listing(node)["job-a"]["paused"] is True
    screenshot(browser, tmp_path / "9-no-token-paused-while-running.png")
