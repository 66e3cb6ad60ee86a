"""Real node processes for integration and end-to-end tests.

``cluster_factory(nodes, *args)`` starts ``balancectl serve`` processes (node-1..node-N)
on free loopback ports against the test's own database, waits until each answers
``/readyz``, and stops them all (SIGTERM, then SIGKILL) when the test ends. Each
node's log goes to a file under the test's tmp_path; on failure the logs are printed.

``api_node`` is one API-only node on a database of its own, shared by a module's tests;
``busy_port`` a port another program listens on. ``http_json``, ``raw_get`` and
``post_debit`` are requests with the standard library.

``Launched`` runs one ``balancectl`` command as a user would, in a session of its own:
whatever it starts (nodes, their workers, their process groups) stays in that session,
so ``leftovers()`` finds them by session id, never by name.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any, NamedTuple
from urllib.parse import urlsplit

import pytest

from balancectl.toolkit.cluster import LocalCluster, NodeProcess
from tests.conftest import RUN_PREFIX, create_database, drop_database, free_port

ClusterFactory = Callable[..., LocalCluster]


def http_json(
    url: str,
    method: str = "GET",
    body: Any = None,
    timeout: float = 10.0,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    """One request with the standard library; the status and the decoded JSON body."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method)
    request.add_header("Content-Type", "application/json")
    for name, value in (headers or {}).items():
        request.add_header(name, value)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"null")


def raw_get(url: str) -> tuple[int, str, Any]:
    """Status, Content-Type and JSON body of one GET, error statuses included."""
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return response.status, response.headers["Content-Type"], json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], json.loads(error.read())


class Answer(NamedTuple):
    """A request's answer: its status (``None`` when no answer came: the connection
    failed), Content-Type, decoded JSON body, and the seconds it took."""

    status: int | None
    content_type: str
    body: Any
    seconds: float


def post_debit(url: str, key: str, amount: int, timeout: float = 30.0) -> Answer:
    """A keyed change of user 1's balance by ``amount``, timed."""
    request = urllib.request.Request(
        f"{url}/users/1/balance",
        data=json.dumps({"amount": amount}).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Idempotency-Key": key},
    )
    began = time.monotonic()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, headers, raw = response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        status, headers, raw = error.code, error.headers, error.read()
    except OSError:
        return Answer(None, "", None, time.monotonic() - began)
    content_type = headers.get("Content-Type", "")
    return Answer(status, content_type, json.loads(raw), time.monotonic() - began)


class ApiNode(NamedTuple):
    """A node's base URL and its database's URL."""

    url: str
    database_url: str

    @property
    def host(self) -> str:
        return urlsplit(self.url).hostname or "127.0.0.1"

    @property
    def port(self) -> int:
        port = urlsplit(self.url).port
        assert port is not None, self.url
        return port


@pytest.fixture(scope="module")
def api_node(
    server_url: str,
    template_database: str,
    tmp_path_factory: pytest.TempPathFactory,
    request: pytest.FixtureRequest,
) -> Iterator[ApiNode]:
    """One node (API only) on a database of its own (a copy of the template), shared by a
    module's tests that change nothing there; at the end, its log holds no traceback.

    A module's ``NODE_ARGS`` (a sequence of ``serve`` options) are added to its node's."""
    name = f"{RUN_PREFIX}_node_{secrets.token_hex(3)}"
    database_url = create_database(server_url, name, template=template_database)
    log_path = tmp_path_factory.mktemp("api-node") / "node.log"
    with log_path.open("w") as log:
        cluster = LocalCluster(
            database_url,
            1,
            extra_args=["--no-scheduler", *getattr(request.module, "NODE_ARGS", ())],
            log=log,
            ports=[free_port()],
        )
        try:
            cluster.start()
            cluster.wait_ready(timeout=90)
            yield ApiNode(cluster.urls[0], database_url)
        finally:
            cluster.stop()
            drop_database(server_url, name)
    assert "Traceback" not in log_path.read_text()  # nothing a test sent made the node fail


@pytest.fixture
def cluster_factory(
    database_url: str, tmp_path: Path, request: pytest.FixtureRequest
) -> Iterator[ClusterFactory]:
    clusters: list[LocalCluster] = []
    logs: list[IO[str]] = []

    def start(
        nodes: int = 1,
        *extra: str,
        url: str | None = None,
        env: dict[str, str] | None = None,
        ready_timeout: float = 90.0,
    ) -> LocalCluster:
        log = (tmp_path / f"cluster-{len(clusters) + 1}.log").open("w")
        logs.append(log)
        cluster = LocalCluster(
            url or database_url,
            nodes,
            extra_args=list(extra),
            env=env or {},
            log=log,
            ports=[free_port() for _ in range(nodes)],
        )
        clusters.append(cluster)
        cluster.start()
        cluster.wait_ready(timeout=ready_timeout)
        return cluster

    yield start
    for cluster in clusters:
        cluster.stop()
    for log in logs:
        log.close()
    failed = getattr(request.node, "rep_call", None)
    if failed is not None and failed.failed:
        for path in sorted(tmp_path.glob("cluster-*.log")):
            print(f"===== {path.name} (last 80 lines)")
            print("\n".join(path.read_text().splitlines()[-80:]))


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A free port that another program now listens on (and never accepts: a connection
    there hangs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", free_port()))
        listener.listen()
        yield int(listener.getsockname()[1])


def node_args(
    jobs_file: Path | None = None,
    lease_ttl: float | None = None,
    poll: float | None = None,
    settle: float | None = None,
    no_scheduler: bool = False,
) -> Sequence[str]:
    """Command-line options for ``balancectl serve`` in tests."""
    args: list[str] = []
    if jobs_file is not None:
        args += ["--jobs-file", str(jobs_file)]
    if lease_ttl is not None:
        args += ["--lease-ttl", str(lease_ttl)]
    if poll is not None:
        args += ["--poll-interval", str(poll)]
    if settle is not None:
        args += ["--settle", str(settle)]
    if no_scheduler:
        args.append("--no-scheduler")
    return args


def wait_or_kill(process: subprocess.Popen[Any], grace: float) -> None:
    """Wait up to ``grace`` s for ``process`` (already asked to stop) to end; else SIGKILL."""
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def descendants(pid: int) -> set[int]:
    """Every process below ``pid`` (Linux /proc), not ``pid`` itself."""
    found: set[int] = set()
    queue = [pid]
    while queue:
        current = queue.pop()
        try:
            tasks = list(Path(f"/proc/{current}/task").iterdir())
        except OSError:
            continue
        for task in tasks:
            try:
                children = {int(c) for c in (task / "children").read_text().split()}
            except OSError:
                continue
            queue.extend(children - found)
            found |= children
    return found


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def workers_of(node: NodeProcess) -> set[int]:
    """The node's worker processes: its children running the balancectl worker."""
    return {
        pid
        for pid in descendants(node.process.pid)
        if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
        and alive(pid)
        and not Path(f"/proc/{pid}/cmdline").read_bytes().count(b"resource_tracker")
    }


def session_processes(session: int) -> list[int]:
    """The live (not zombie) processes whose session id is ``session``."""
    found = []
    for entry in os.listdir("/proc"):
        try:
            stat = (Path("/proc") / entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        fields = stat.rsplit(")", 1)[1].split()  # after "pid (command)"
        if fields[0] != "Z" and int(fields[3]) == session:
            found.append(int(entry))
    return found


class Launched:
    """``balancectl <args>`` in a session of its own; stdout and stderr read as one text."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "balancectl", *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            text=True, start_new_session=True, env={**os.environ, **(env or {})},
        )  # fmt: skip
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, text: str, timeout: float = 90.0) -> None:
        """Until ``text`` appears in the output; fail if the command ends or time runs out."""
        deadline = time.monotonic() + timeout
        while text not in self.output:
            assert self.process.poll() is None, f"ended before {text!r}:\n{self.output}"
            assert time.monotonic() < deadline, f"no {text!r} in {timeout} s:\n{self.output}"
            time.sleep(0.05)

    def finish(self, timeout: float = 120.0) -> int:
        """Its exit status, once it has ended and its output is read."""
        status = self.process.wait(timeout=timeout)
        self._reader.join(timeout=10)
        return status

    def leftovers(self, grace: float = 2.0) -> list[int]:
        """Processes still in its session ``grace`` seconds after it ended (there should be
        none: the grace only lets a process that is exiting finish)."""
        deadline = time.monotonic() + grace
        while (left := session_processes(self.process.pid)) and time.monotonic() < deadline:
            time.sleep(0.1)
        return left

    def kill_all(self) -> None:
        """SIGKILL whatever is left in its session (a failed test's cleanup)."""
        for pid in session_processes(self.process.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if self.process.poll() is None:
            self.process.wait(timeout=10)

    def close(self) -> None:
        """Kill what is left, finish reading, close the pipe (``with`` does this)."""
        self.__exit__()

    def __enter__(self) -> Launched:
        return self

    def __exit__(self, *_: object) -> None:
        self.kill_all()
        self._reader.join(timeout=10)
        if self.process.stdout is not None:
            self.process.stdout.close()
