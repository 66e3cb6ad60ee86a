"""The framework alone: a minimal Litestar app under uvicorn, for benchmarks/burst.py.

The same route shape as the node's (``POST /users/{userId}/balance`` with a msgspec
body), the same uvicorn settings as a node's worker, one process, no database: the
distance from the floor to this is the framework's, from this to a node is ours.

    python benchmarks/minimal_litestar.py --port 8998
"""

from __future__ import annotations

import argparse

import msgspec
import uvicorn
from litestar import Litestar, post


class Body(msgspec.Struct, forbid_unknown_fields=True):
    amount: int


@post("/users/{user_id:int}/balance", status_code=200)
async def change(user_id: int, data: Body) -> dict[str, int]:
    return {"userId": user_id, "balance": 0, "amount": data.amount}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--backlog", type=int, default=16384)
    args = parser.parse_args()
    app = Litestar([change], logging_config=None)
    uvicorn.run(
        app, host="127.0.0.1", port=args.port, backlog=args.backlog, log_config=None,
        access_log=False, proxy_headers=False, server_header=False, http="httptools",
    )  # fmt: skip


if __name__ == "__main__":
    main()
