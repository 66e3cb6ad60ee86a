"""One send per response: the node's protocol against uvicorn's own, under wrk keep-alive.

The same tiny ASGI app (a head, then a 20-byte body, as Litestar sends them) runs under
uvicorn with uvicorn's ``HttpToolsProtocol`` (two ``send`` calls per response) and with
the node's ``GuardedHttpToolsProtocol`` (``balancectl.api.http_writes``: one), in
alternating rounds. Reported: requests per second and server CPU microseconds per
request, each variant's median, and their ratio. No database: this is the lever alone.

    .venv/bin/python benchmarks/writes.py [--rounds 5] [--duration 8] [--connections 16]
"""

from __future__ import annotations

import argparse
import os
import re
import socket
import statistics
import subprocess
import sys
import time

SERVER = """
import sys, uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from balancectl.api.http_limits import GuardedHttpToolsProtocol

async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"), (b"content-length", b"20")]})
    await send({"type": "http.response.body", "body": b'{"balance": 1234567}'})

protocol = GuardedHttpToolsProtocol if sys.argv[2] == "node" else HttpToolsProtocol
uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), http=protocol, loop="uvloop",
            log_level="warning", lifespan="off")
"""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def cpu_ticks(pid: int) -> int:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime + stime


def one_round(variant: str, duration: int, connections: int) -> tuple[float, float]:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-c", SERVER, str(port), variant])
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
        url = f"http://127.0.0.1:{port}/"
        subprocess.run(["wrk", "-t1", f"-c{connections}", "-d1s", url], capture_output=True)
        before = cpu_ticks(server.pid)
        out = subprocess.run(
            ["wrk", "-t1", f"-c{connections}", f"-d{duration}s", url],
            capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        used = (cpu_ticks(server.pid) - before) / os.sysconf("SC_CLK_TCK")
        match = re.search(r"(\d+) requests in", out)
        assert match, out
        requests = int(match.group(1))
        return requests / duration, used / requests * 1e6
    finally:
        server.terminate()
        server.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--duration", type=int, default=8)
    parser.add_argument("--connections", type=int, default=16)
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float]]] = {"uvicorn": [], "node": []}
    for round_number in range(args.rounds):
        for variant in ("uvicorn", "node") if round_number % 2 == 0 else ("node", "uvicorn"):
            results[variant].append(one_round(variant, args.duration, args.connections))
            print(f"round {round_number + 1} {variant}: {results[variant][-1]}", file=sys.stderr)
    rps = {name: statistics.median(r for r, _ in runs) for name, runs in results.items()}
    cpu = {name: statistics.median(c for _, c in runs) for name, runs in results.items()}
    print("| protocol | requests/s (median) | server CPU µs/request (median) |")
    print("|---|---|---|")
    for name in results:
        print(f"| {name} | {rps[name]:.0f} | {cpu[name]:.1f} |")
    print(f"| node / uvicorn | {rps['node'] / rps['uvicorn']:.2f} | "
          f"{cpu['node'] / cpu['uvicorn']:.2f} |")  # fmt: skip


if __name__ == "__main__":
    main()
