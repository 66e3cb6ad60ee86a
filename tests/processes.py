"""Real node processes for integration and end-to-end tests.

``cluster_factory(nodes, *args)`` starts ``balancectl serve`` processes (node-1..node-N)
on free loopback ports against the test's own database, waits until each answers
``/readyz``, and stops them all (SIGTERM, then SIGKILL) when the test ends. Each
node's log goes to a file under the test's tmp_path; on failure the logs are printed.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import IO, Any

import pytest

from balancectl.cluster import LocalCluster
from tests.conftest import free_port

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
