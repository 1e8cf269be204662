"""The API's OpenAPI document, assembled once and served as is.

``openapi.json`` beside this module is written by hand: the paths, the
answers and their schemas, the descriptions. The schemas of the request
bodies (``Ballot``, ``NewPoll``) are not in it: they come from their one
declaration, ``ingest/contract.py``, and are put in when this module is
imported (:data:`DOCUMENT`), so the document cannot say other than what the
edge checks. ``tests/integration/test_openapi.py`` holds the edge to it. A
broken document, or one that declares a request body itself, stops the edge
at start-up instead of failing requests, and each request sends the same bytes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Final

import orjson
from aiohttp import web

from . import contract

PATH: Final = Path(__file__).parent / "openapi.json"


def assemble(skeleton: dict[str, Any]) -> dict[str, Any]:
    """The hand-written document with the contract's request schemas added."""
    written = skeleton["components"]["schemas"]
    generated = contract.schemas()
    if twice := sorted(written.keys() & generated.keys()):
        raise ValueError(f"{PATH} declares {twice}, which ingest/contract.py declares")
    components = {**skeleton["components"], "schemas": {**written, **generated}}
    return {**skeleton, "components": components}


def load() -> dict[str, Any]:
    """The document; raises if the file is not a JSON object."""
    skeleton = orjson.loads(PATH.read_bytes())
    if not isinstance(skeleton, dict):
        raise ValueError(f"{PATH} is not a JSON object")
    return assemble(skeleton)


DOCUMENT: Final = load()
_BODY: Final = orjson.dumps(DOCUMENT)


async def get_openapi(request: web.Request) -> web.Response:
    return web.Response(body=_BODY, content_type="application/json")
