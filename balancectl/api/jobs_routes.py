"""``GET /jobs``, ``GET /jobs/history`` and ``GET /nodes``: the cluster, live, from any node;
``GET /jobs/{name}`` and the operator's verbs ``POST /jobs/{name}/run|pause|resume``
(guarded by the API token when the node has one)."""

from __future__ import annotations

from typing import Annotated

from litestar import get, post
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.params import Parameter

from balancectl.api.auth import require_token
from balancectl.api.documents import NAME_FILTER_SCHEMA, problem_spec, problem_specs
from balancectl.db import Database
from balancectl.errors import InvalidRequest, JobNotFound
from balancectl.scheduler.control import control_job
from balancectl.scheduler.listing import (
    HistoryDocument,
    JobDocument,
    JobsDocument,
    ListingStore,
    NodesDocument,
)

UNAVAILABLE = "The database could not be reached in time (slug unavailable)"
NOT_FOUND = "No job has this name (slug job-not-found)"
UNAUTHORIZED = "The node has an API token and the request did not carry it (slug unauthorized)"
VERB_PROBLEMS = {401: UNAUTHORIZED, 404: NOT_FOUND, 503: UNAVAILABLE}
NameFilter = Annotated[str | None, Parameter(schema_extra=NAME_FILTER_SCHEMA)]
JobName = Annotated[str, Parameter(description="The job's name")]
StopFlag = Annotated[
    bool,
    Parameter(
        description="Also stop the run in progress: its node stops it at its next lease "
        "renewal and records it cancelled",
    ),
]


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
    return await ListingStore(db).jobs()


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
    return await ListingStore(db).history(job, node, limit)


@get(
    "/nodes",
    summary="Nodes that have run, for display only",
    responses={503: problem_spec(UNAVAILABLE)},
)
async def list_nodes(db: NamedDependency[Database], state: State) -> NodesDocument:
    return await ListingStore(db).nodes(state.lease_ttl)


@get(
    "/jobs/{name:str}",
    summary="One job, as GET /jobs lists it",
    responses=problem_specs({404: NOT_FOUND, 503: UNAVAILABLE}),
)
async def get_job(db: NamedDependency[Database], name: JobName) -> JobDocument:
    if "\x00" in name:
        raise JobNotFound(f"no job is named {name!r}")
    return await ListingStore(db).job(name)


async def apply(db: Database, verb: str, name: JobName) -> JobDocument:
    await control_job(db, verb, name)
    return await ListingStore(db).job(name)


@post(
    "/jobs/{name:str}/run",
    summary="Make the job due now; a running job is due again as soon as its run ends",
    status_code=200,
    guards=[require_token],
    responses=problem_specs(
        {**VERB_PROBLEMS, 409: "The job is paused: resume it first (slug job-paused)"}
    ),
)
async def run_job(db: NamedDependency[Database], name: JobName) -> JobDocument:
    return await apply(db, "run", name)


@post(
    "/jobs/{name:str}/pause",
    summary="Never claim the job until resumed; a run in progress finishes, "
    "or with stop=true is stopped (recorded cancelled)",
    status_code=200,
    guards=[require_token],
    responses=problem_specs({**VERB_PROBLEMS, 422: "Invalid stop (slug invalid-request)"}),
)
async def pause_job(
    db: NamedDependency[Database], name: JobName, stop: StopFlag = False
) -> JobDocument:
    return await apply(db, "pause-stop" if stop else "pause", name)


@post(
    "/jobs/{name:str}/resume",
    summary="Let the job be claimed again; an overdue one is due at once",
    status_code=200,
    guards=[require_token],
    responses=problem_specs(VERB_PROBLEMS),
)
async def resume_job(db: NamedDependency[Database], name: JobName) -> JobDocument:
    return await apply(db, "resume", name)
