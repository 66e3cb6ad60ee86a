"""``GET /jobs/history`` in-process: its ``limit`` is bounded, and a bad one is a problem.

The history as real nodes write it (durations, intervals, filters, order) is in
tests/integration/test_scheduler_history.py.
"""

from __future__ import annotations

from tests.inprocess.conftest import Client


async def test_history_limit_out_of_range_is_a_problem(client: Client) -> None:
    for limit in ("0", "1001", "-1", "ten"):
        reply = await client.get(f"/jobs/history?limit={limit}")
        body = reply.json()
        assert reply.status_code == 422, (limit, body)
        content_type = reply.headers["content-type"]
        assert content_type.startswith("application/problem+json"), (limit, content_type)
        assert body["type"] == "urn:balancectl:problem:invalid-request", body
        assert body["status"] == 422 and body["title"] and body["detail"], body
    for limit in ("1", "1000"):
        reply = await client.get(f"/jobs/history?limit={limit}")
        assert (reply.status_code, reply.json()) == (200, {"runs": []}), limit
