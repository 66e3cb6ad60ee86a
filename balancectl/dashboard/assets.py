"""The dashboard's HTML, CSS and JavaScript: plain files shipped inside the package."""

from __future__ import annotations

from functools import cache
from importlib import resources

# What each shipped file is served as; nothing else under static/ is served.
MEDIA_TYPES = {
    "index.html": "text/html; charset=utf-8",
    "dashboard.css": "text/css; charset=utf-8",
    "dashboard.js": "text/javascript; charset=utf-8",
}


@cache
def asset(name: str) -> bytes:
    """The bytes of one shipped file, read once per process (a ``KeyError`` for any other)."""
    if name not in MEDIA_TYPES:
        raise KeyError(name)  # only the files listed are ever read
    return resources.files("balancectl.dashboard").joinpath("static", name).read_bytes()
