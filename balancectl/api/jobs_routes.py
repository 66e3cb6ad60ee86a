"""``GET /jobs``, ``GET /jobs/history`` and ``GET /nodes``: the cluster, live, from any node."""

from __future__ import annotations

from typing import Annotated

import msgspec
from litestar import get
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.params import Parameter

from balancectl.api.documents import (
    NAME_FILTER_SCHEMA,
    HistoryDocument,
    JobsDocument,
    NodesDocument,
    problem_spec,
    problem_specs,
)
from balancectl.db import Database
from balancectl.errors import InvalidRequest
from balancectl.scheduler import listing

UNAVAILABLE = "The database could not be reached in time (slug unavailable)"
NameFilter = Annotated[str | None, Parameter(schema_extra=NAME_FILTER_SCHEMA)]


def parse_filter(name: str, value: str | None) -> str | None:
    """A name to match; NUL cannot be in PostgreSQL text, so psycopg would fail (a 500)."""
    if value is not None and "\x00" in value:
        raise InvalidRequest(f"the {name} filter must not contain NUL characters")
    return value


@get(
    "/jobs",
    summary="Every configured job: which node runs it and for how long, or when it is due",
    responses={503: problem_spec(UNAVAILABLE)},
)
async def list_jobs(db: NamedDependency[Database]) -> JobsDocument:
    return msgspec.convert(await listing.jobs_document(db), JobsDocument)


@get(
    "/jobs/history",
    summary="Finished runs, newest first",
    responses=problem_specs({422: "Invalid filter (slug invalid-request)", 503: UNAVAILABLE}),
)
async def job_history(
    db: NamedDependency[Database],
    job: NameFilter = None,
    node: NameFilter = None,
    limit: Annotated[int, Parameter(ge=1, le=1000)] = 100,
) -> HistoryDocument:
    job, node = parse_filter("job", job), parse_filter("node", node)
    document = await listing.history_document(db, job, node, limit)
    return msgspec.convert(document, HistoryDocument)


@get(
    "/nodes",
    summary="Nodes that have run, for display only",
    responses={503: problem_spec(UNAVAILABLE)},
)
async def list_nodes(db: NamedDependency[Database], state: State) -> NodesDocument:
    document = await listing.nodes_document(db, state.lease_ttl)
    return msgspec.convert(document, NodesDocument)
