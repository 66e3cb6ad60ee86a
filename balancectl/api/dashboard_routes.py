"""``GET /ui`` (the live dashboard page), its static files, and ``GET /dashboard`` (its data).

The page is the same static file on every node; everything it shows comes from
``GET /dashboard``, read from the database alone, so any node's page shows the whole
cluster. Nothing here writes, and nothing secret is in the page: the page's controls call
the verbs of ``jobs_routes`` with the token its operator types in.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from litestar import Response, get
from litestar.datastructures import CacheControlHeader, State
from litestar.di import NamedDependency
from litestar.params import Parameter
from litestar.response import Redirect

from balancectl.api.documents import DashboardDocument, problem_specs
from balancectl.api.jobs_routes import UNAVAILABLE
from balancectl.dashboard import asset, dashboard_document
from balancectl.dashboard.assets import MEDIA_TYPES
from balancectl.db import Database

# The page loads only its own files and talks only to its own node: no CDN, no inline code.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)
PAGE_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
NO_STORE = CacheControlHeader(no_store=True)
Minutes = Annotated[
    int, Parameter(ge=1, le=180, description="How many minutes the timeline covers")
]


def static_response(name: str) -> Response[bytes]:
    return Response(asset(name), media_type=MEDIA_TYPES[name], headers=PAGE_HEADERS)


@get("/", include_in_schema=False)
async def root() -> Redirect:
    return Redirect(path="/ui")


@get(
    "/ui",
    summary="The live dashboard (HTML; its data comes from GET /dashboard)",
    media_type="text/html",
    cache_control=NO_STORE,
)
async def dashboard_page() -> Response[bytes]:
    return static_response("index.html")


@get("/ui/dashboard.js", include_in_schema=False, cache_control=NO_STORE)
async def dashboard_script() -> Response[bytes]:
    return static_response("dashboard.js")


@get("/ui/dashboard.css", include_in_schema=False, cache_control=NO_STORE)
async def dashboard_style() -> Response[bytes]:
    return static_response("dashboard.css")


@get(
    "/dashboard",
    summary="What the dashboard shows: jobs, nodes, a timeline of runs and the money",
    responses=problem_specs({422: "Invalid minutes (slug invalid-request)", 503: UNAVAILABLE}),
    cache_control=NO_STORE,
)
async def dashboard_state(
    db: NamedDependency[Database], state: State, minutes: Minutes = 15
) -> DashboardDocument:
    document = await dashboard_document(db, state.node_id, state.lease_ttl, minutes)
    document["token_required"] = state.api_token is not None
    return msgspec.convert(document, DashboardDocument)
