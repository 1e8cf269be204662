"""The edge's web pages: the open polls at ``/``, a poll's voting page at
``/polls/{poll_id}``, its presenter view for a projector at
``/polls/{poll_id}/present``, and an HTML page for any other address that
names none.
Plain HTML, CSS and JavaScript from ``static/`` beside this module, shipped
inside the package: no build step, nothing fetched from anywhere but this
edge (the chart library, uPlot, is kept here too, its licence in licenses/).

The files are read once, at import, and served from memory with a validator
(ETag), so a page costs no disk read and a reload mostly a 304.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from aiohttp import web

STATIC: Final = Path(__file__).parent / "static"
TYPES: Final = {
    ".html": "text/html",
    ".css": "text/css",
    ".js": "text/javascript",
    ".svg": "image/svg+xml",
}
# The pages load only this edge's own scripts, styles and API: an injected
# script or a framing site gets nowhere.
HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
}


@dataclass(frozen=True, slots=True)
class Asset:
    body: bytes
    content_type: str
    etag: str


def _load() -> dict[str, Asset]:
    found = {}
    for path in sorted(STATIC.iterdir()):
        if path.suffix in TYPES:
            body = path.read_bytes()
            etag = '"' + hashlib.sha256(body).hexdigest()[:20] + '"'
            found[path.name] = Asset(body, TYPES[path.suffix], etag)
    return found


ASSETS: Final = _load()


def respond(request: web.Request, name: str, cache: str) -> web.Response:
    """One asset, or 304 when the client's copy is current."""
    asset = ASSETS[name]
    headers = {**HEADERS, "ETag": asset.etag, "Cache-Control": cache}
    if asset.etag in request.headers.get("If-None-Match", ""):
        return web.Response(status=304, headers=headers)
    return web.Response(
        body=asset.body, content_type=asset.content_type, charset="utf-8", headers=headers
    )


def has(name: str) -> bool:
    return name in ASSETS


def not_found() -> web.Response:
    """The page of an address that names no page (never cached: the poll may
    be created a moment later)."""
    asset = ASSETS["notfound.html"]
    return web.Response(
        status=404, body=asset.body, content_type=asset.content_type, charset="utf-8",
        headers={**HEADERS, "Cache-Control": "no-store"},
    )  # fmt: skip
