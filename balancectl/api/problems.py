"""Every error leaves the API as RFC 9457 problem details; this is the one place they are made."""

from __future__ import annotations

import logging
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException
from litestar.types import ExceptionHandlersMap

from balancectl.errors import BalancectlError, InvalidRequest, problem_document, problem_type

PROBLEM_JSON = "application/problem+json"
log = logging.getLogger("balancectl.api")

_SLUGS = {
    400: ("bad-request", "Bad request"),
    401: ("unauthorized", "Unauthorized"),
    404: ("not-found", "Not found"),
    405: ("method-not-allowed", "Method not allowed"),
    413: ("payload-too-large", "Payload too large"),
    415: ("unsupported-media-type", "Unsupported media type"),
    422: ("invalid-request", "Invalid request"),
    503: ("unavailable", "Service unavailable"),
}


def problem_response(
    document: dict[str, Any], headers: dict[str, str] | None = None
) -> Response[dict[str, Any]]:
    return Response(
        content=document,
        status_code=int(document["status"]),
        media_type=PROBLEM_JSON,
        headers=headers,
    )


def domain_problem(error: BalancectlError) -> tuple[dict[str, Any], dict[str, str] | None]:
    """A domain error's document and the headers it goes with."""
    # RFC 9110 (15.5.2): a 401 must name the authentication scheme it wants.
    headers = {"WWW-Authenticate": 'Bearer realm="balancectl"'} if error.status == 401 else None
    return problem_document(error), headers


def on_domain_error(_: Request[Any, Any, Any], error: BalancectlError) -> Response[dict[str, Any]]:
    return problem_response(*domain_problem(error))


def on_validation_error(
    _: Request[Any, Any, Any], error: ValidationException
) -> Response[dict[str, Any]]:
    return problem_response(problem_document(InvalidRequest(str(error.detail))))


def http_problem(status: int, detail: str) -> dict[str, Any]:
    """The problem document of an HTTP-level error (no domain error behind it)."""
    slug, title = _SLUGS.get(status, ("http-error", "HTTP error"))
    return {
        "type": problem_type(slug),
        "title": title,
        "status": status,
        "detail": detail,
    }


def on_http_error(_: Request[Any, Any, Any], error: HTTPException) -> Response[dict[str, Any]]:
    return problem_response(http_problem(error.status_code, str(error.detail)), error.headers)


INTERNAL_ERROR = {
    "type": problem_type("internal"),
    "title": "Internal error",
    "status": 500,
    "detail": "the node failed to handle this request; its log has the details",
}


def unexpected_problem(method: str, path: str, error: Exception) -> dict[str, Any]:
    """Log a bug with its traceback; the caller gets a document that says nothing of it."""
    log.exception("unexpected error on %s %s", method, path, exc_info=error)
    return dict(INTERNAL_ERROR)


def on_unexpected_error(
    request: Request[Any, Any, Any], error: Exception
) -> Response[dict[str, Any]]:
    return problem_response(unexpected_problem(request.method, request.url.path, error))


def problem_of(
    error: Exception, method: str, path: str
) -> tuple[dict[str, Any], dict[str, str] | None]:
    """What the handlers above answer ``error`` with, for an entry outside Litestar's
    exception handling (the balance route's fast lane): its document and headers."""
    if isinstance(error, BalancectlError):
        return domain_problem(error)
    if isinstance(error, ValidationException):
        return problem_document(InvalidRequest(str(error.detail))), None
    if isinstance(error, HTTPException):
        return http_problem(error.status_code, str(error.detail)), error.headers
    return unexpected_problem(method, path, error), None


def exception_handlers() -> ExceptionHandlersMap:
    return {
        BalancectlError: on_domain_error,
        ValidationException: on_validation_error,
        HTTPException: on_http_error,
        Exception: on_unexpected_error,
    }


__all__ = [
    "PROBLEM_JSON",
    "exception_handlers",
    "http_problem",
    "problem_of",
    "problem_response",
]
