"""Operations: liveness, readiness, metrics."""

from __future__ import annotations

from typing import Any

from litestar import Request, Response, get
from litestar.datastructures import State
from litestar.di import NamedDependency

from balancectl.api.documents import problem_spec
from balancectl.api.metrics import Metrics
from balancectl.db import Database
from balancectl.errors import Unavailable


@get("/healthz", summary="The process runs (no database call)")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get(
    "/readyz",
    summary="The database answers and the schema is at head",
    responses={503: problem_spec("Not ready")},
)
async def readyz(db: NamedDependency[Database], state: State) -> dict[str, str]:
    node_ready = state.get("node_ready")
    if node_ready is not None and not node_ready.is_set():
        raise Unavailable("the node is starting: its scheduler has not joined the cluster yet")
    revision = await db.schema_revision()
    if revision != state.head_revision:
        raise Unavailable(
            f"the schema is at {revision}, this node needs {state.head_revision}",
            revision=revision,
        )
    return {"status": "ready", "revision": str(revision)}


@get("/metrics", summary="Prometheus text format", media_type="text/plain; version=0.0.4")
async def metrics(
    request: Request[Any, Any, Any], db: NamedDependency[Database]
) -> Response[bytes]:
    registry: Metrics = request.app.state.metrics
    return Response(registry.render(db), media_type="text/plain; version=0.0.4; charset=utf-8")
