"""``GET /jobs``, ``GET /jobs/history`` and ``GET /nodes``: the cluster, live, from any node."""

from __future__ import annotations

from typing import Annotated

import msgspec
from litestar import get
from litestar.datastructures import State
from litestar.params import Parameter

from balancectl.api.documents import HistoryDocument, JobsDocument, NodesDocument, problem_spec
from balancectl.db import Database
from balancectl.scheduler import listing


@get(
    "/jobs", summary="Every configured job: which node runs it and for how long, or when it is due"
)
async def list_jobs(db: Database) -> JobsDocument:
    return msgspec.convert(await listing.jobs_document(db), JobsDocument)


@get(
    "/jobs/history",
    summary="Finished runs, newest first",
    responses={422: problem_spec("Invalid filter (slug invalid-request)")},
)
async def job_history(
    db: Database,
    job: str | None = None,
    node: str | None = None,
    limit: Annotated[int, Parameter(ge=1, le=1000)] = 100,
) -> HistoryDocument:
    document = await listing.history_document(db, job, node, limit)
    return msgspec.convert(document, HistoryDocument)


@get("/nodes", summary="Nodes that have run, for display only")
async def list_nodes(db: Database, state: State) -> NodesDocument:
    document = await listing.nodes_document(db, state.lease_ttl)
    return msgspec.convert(document, NodesDocument)
