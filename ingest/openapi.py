"""The API's OpenAPI document (``openapi.json`` beside this module), served as is.

The document is hand-written: docs/api.md is the contract and
``tests/integration/test_openapi.py`` holds the edge to it. It is read and checked once,
when the edge imports this module, so a broken document stops the edge at
start-up instead of failing requests, and each request sends the same bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

import orjson
from aiohttp import web

PATH: Final = Path(__file__).parent / "openapi.json"


def load() -> bytes:
    """The document, compact; raises if it is not a JSON object."""
    document = orjson.loads(PATH.read_bytes())
    if not isinstance(document, dict):
        raise ValueError(f"{PATH} is not a JSON object")
    return orjson.dumps(document)


_BODY: Final = load()


async def get_openapi(request: web.Request) -> web.Response:
    return web.Response(body=_BODY, content_type="application/json")
