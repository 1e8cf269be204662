"""What a web browser may do with the API from a page of another site.

A browser sends a ballot or an admin call from any page, with the visitor's
own address, unless the API makes it ask first. Three rules, for every POST
under ``/api/``:

- the body must be ``application/json`` (415 otherwise). A page elsewhere can
  send ``text/plain``, form data or multipart without a CORS preflight; JSON
  it can send only after a preflight this module answers;
- a request whose ``Origin`` is neither the edge's own nor one of
  ``VOTEFLOW_ALLOWED_ORIGINS`` is refused (403), preflight or not. Clients that
  send no ``Origin`` (apps, servers, curl) are not browsers' pages and pass;
- an ``Authorization`` header that is not ASCII (RFC 9110 allows no other
  bytes in a credential) answers 401, on every ``/api/`` route.

CORS preflights (``OPTIONS`` with ``Access-Control-Request-Method``) for an
allowed origin are answered here with what the API accepts; answers to an
allowed origin carry ``Access-Control-Allow-Origin``; every ``/api/`` answer
carries ``Vary: Origin`` so that no cache hands one origin's answer to another.

The edge's own origin is the scheme and ``Host`` of the request, or the
``X-Forwarded-Proto`` and ``X-Forwarded-Host`` a trusted proxy
(``VOTEFLOW_TRUSTED_PROXIES``, see ingest.clientip) set.

aio-libs' aiohttp-cors was not used: it answers preflights but lets an actual
request from any origin through (it only leaves the CORS headers out), so the
403 would be ours anyway; it knows no "own origin" that follows the Host and
a trusted proxy; and it adds an OPTIONS route to each resource, which the
router, the OpenAPI document and its test would all have to know about.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Final

from aiohttp import hdrs, web

from voteflow.settings import normal_origin, parse_origins

from .clientip import Network, trusted_peer
from .validate import Invalid

API: Final = "/api/"
# What a preflight may ask for: the API's methods and the headers its clients send.
ALLOW_METHODS: Final = "GET, POST"
ALLOW_HEADERS: Final = "Content-Type, Authorization"
# Headers a page may read from an answer, besides the CORS-safelisted ones.
EXPOSE_HEADERS: Final = "Retry-After"
# Seconds a browser may reuse a preflight's answer (Chromium caps it at 7200).
MAX_AGE: Final = "600"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Origins:
    """The origins a browser's page may call the API from, read once at start-up."""

    def __init__(self, allowed: str, proxies: Sequence[Network]) -> None:
        self.allowed = parse_origins(allowed)  # checked in Settings.check already
        self.proxies = tuple(proxies)

    def own(self, request: web.Request) -> str:
        # The Host header itself: aiohttp's request.host falls back to
        # socket.getfqdn(), a blocking lookup a client could ask for at will.
        scheme, host = request.scheme, request.headers.get(hdrs.HOST, "")
        if self.proxies and trusted_peer(request, self.proxies):
            # The nearest proxy's view: the last value if several were appended.
            forwarded_proto = request.headers.get("X-Forwarded-Proto", "")
            forwarded_host = request.headers.get("X-Forwarded-Host", "")
            scheme = forwarded_proto.rsplit(",", 1)[-1].strip() or scheme
            host = forwarded_host.rsplit(",", 1)[-1].strip() or host
        return normal_origin(f"{scheme}://{host}")

    def cross_allowed(self, origin: str) -> bool:
        """An origin other than the edge's own that may call the API."""
        return normal_origin(origin) in self.allowed

    def permits(self, request: web.Request, origin: str) -> bool:
        return self.cross_allowed(origin) or normal_origin(origin) == self.own(request)

    @web.middleware
    async def guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        # Unknown routes and methods keep their 404 and 405 (from the handler);
        # a preflight, having no route of its own, is a 405 until answered here.
        if not request.path.startswith(API):
            return await handler(request)
        authorization = request.headers.get(hdrs.AUTHORIZATION)
        if authorization is not None and not authorization.isascii():
            raise Invalid(401, None, "the Authorization header is not ASCII")
        origin = request.headers.get(hdrs.ORIGIN)
        if request.method == hdrs.METH_OPTIONS and hdrs.ACCESS_CONTROL_REQUEST_METHOD in (
            request.headers
        ):
            if request.match_info.http_exception is not None and (
                request.match_info.http_exception.status == 404
            ):
                return await handler(request)
            return self._preflight(request, origin)
        if request.method != hdrs.METH_POST or request.match_info.http_exception is not None:
            return await handler(request)
        if origin is not None and not self.permits(request, origin):
            raise Invalid(403, None, f"requests from the origin {origin!r} are not allowed")
        if not _is_json(request):
            raise Invalid(415, None, "the body must be sent as Content-Type: application/json")
        return await handler(request)

    def _preflight(self, request: web.Request, origin: str | None) -> web.StreamResponse:
        if origin is None or not self.permits(request, origin):
            raise Invalid(403, None, f"requests from the origin {origin!r} are not allowed")
        return web.Response(
            status=204,
            headers={
                hdrs.ACCESS_CONTROL_ALLOW_ORIGIN: origin,
                hdrs.ACCESS_CONTROL_ALLOW_METHODS: ALLOW_METHODS,
                hdrs.ACCESS_CONTROL_ALLOW_HEADERS: ALLOW_HEADERS,
                hdrs.ACCESS_CONTROL_MAX_AGE: MAX_AGE,
            },
        )

    async def mark(self, request: web.Request, response: web.StreamResponse) -> None:
        """``on_response_prepare``: the CORS headers of an answer, streams included."""
        if not request.path.startswith(API):
            return
        response.headers.add(hdrs.VARY, hdrs.ORIGIN)
        origin = request.headers.get(hdrs.ORIGIN)
        if origin is not None and self.cross_allowed(origin):
            response.headers[hdrs.ACCESS_CONTROL_ALLOW_ORIGIN] = origin
            response.headers[hdrs.ACCESS_CONTROL_EXPOSE_HEADERS] = EXPOSE_HEADERS


def _is_json(request: web.Request) -> bool:
    # aiohttp parses the header once and lower-cases the type; a missing one
    # reads as application/octet-stream. JSON is UTF-8 (RFC 8259): a charset
    # parameter may say so, and nothing else.
    if request.content_type != "application/json":
        return False
    charset = request.charset
    return charset is None or charset.lower() in {"utf-8", "utf8"}
