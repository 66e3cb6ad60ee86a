"""The burst client of benchmarks/burst.py: ``balancectl loadtest``'s own burst, nothing else.

Fires ``--requests`` debits of 2 at the same moment (one aiohttp session, no connection
cap: a connection per request) at the given URLs, and prints one JSON line: the wall
time, this process's CPU time, and the answers by class. The same client hits the floor
server, the minimal Litestar app and the nodes, so their figures compare.

    python benchmarks/burst_client.py --url http://127.0.0.1:8000 --requests 10000
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from balancectl.open_files import raise_open_files_limit  # noqa: E402
from balancectl.toolkit.loadtest import LoadtestConfig, fire_burst  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", action="append", required=True)
    parser.add_argument("--requests", type=int, default=10000)
    parser.add_argument("--keyed", action="store_true", help="an Idempotency-Key on each")
    args = parser.parse_args()
    raise_open_files_limit()
    config = LoadtestConfig(
        urls=tuple(args.url), requests=args.requests, idempotent=args.keyed, retries=0,
        progress=False,
    )  # fmt: skip
    burst = asyncio.run(fire_burst(config))
    outcomes = Counter(result.outcome for result in burst.results)
    print(
        json.dumps(
            {
                "wall_seconds": burst.wall_seconds,
                "client_cpu_seconds": burst.client_cpu_seconds,
                "outcomes": dict(outcomes),
            }
        )
    )


if __name__ == "__main__":
    main()
