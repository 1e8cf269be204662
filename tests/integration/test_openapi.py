"""The OpenAPI document says exactly what the edge does, and the edge keeps to it.

``ingest/openapi.json`` is hand-written from docs/api.md, but for the request
bodies' schemas, which ``ingest/openapi.py`` adds from their one declaration,
``ingest/contract.py``. Here the assembled document is checked as a document
(valid OpenAPI 3.1, every reference resolves, the same routes as the aiohttp
app), then schemathesis fuzzes a real edge on a loopback
port with it: positive and negative requests for every operation, with the
admin token and with real polls, then chains of linked calls (create a poll,
read it, vote on it, close it). No answer may be a 5xx, and every answer must
have a documented status, content type, headers and body.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import hypothesis
import jsonschema_rs
import pytest
import schemathesis
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.core.result import Ok

from ingest import contract
from ingest.app import create_app
from ingest.openapi import DOCUMENT, PATH, assemble, get_openapi
from tests.support import ADMIN, create_poll
from voteflow.settings import Settings

Client = TestClient[Any, Any]
OPENAPI_ROUTE = "/api/openapi.json"
# Requests per operation in the fuzzing run, positive and negative ones mixed.
MAX_EXAMPLES = 50

# What the fuzzing run asserts on every answer. Left out on purpose:
# - positive_data_acceptance: a request the document allows can still be
#   refused for a rule JSON Schema cannot state (max_choices above the number
#   of options, expires_at in the past, an option of another poll, a closed poll);
# - use_after_free and ensure_resource_availability: the API deletes nothing.
CHECKS = [
    "not_a_server_error",
    "status_code_conformance",
    "content_type_conformance",
    "response_headers_conformance",
    "response_schema_conformance",
    "negative_data_rejection",
    "missing_required_header",
    "ignored_auth",
    "unsupported_method",
    "allow_header_conformance",
]


def with_openapi_route(app: web.Application) -> web.Application:
    """Serve the document, unless ingest.app already does."""
    if ("GET", OPENAPI_ROUTE) not in app_routes(app):
        app.router.add_get(OPENAPI_ROUTE, get_openapi)
    return app


def app_routes(app: web.Application) -> set[tuple[str, str]]:
    """(method, path template) of every route; aiohttp's HEAD twin of each GET aside."""
    return {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }


def documented_operations() -> set[tuple[str, str]]:
    methods = {"get", "put", "post", "delete", "patch", "options", "head", "trace"}
    return {
        (method.upper(), path)
        for path, item in DOCUMENT["paths"].items()
        for method in item
        if method in methods
    }


def references(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "$ref" and isinstance(value, str):
                yield value
            else:
                yield from references(value)
    elif isinstance(node, list):
        for item in node:
            yield from references(item)


def resolve(pointer: str) -> Any:
    assert pointer.startswith("#/"), f"{pointer}: only references inside the document are used"
    node: Any = DOCUMENT
    for part in pointer[2:].split("/"):
        node = node[part.replace("~1", "/").replace("~0", "~")]
    return node


def component_validator(name: str) -> jsonschema_rs.Validator:
    """A validator for one of the document's schemas, its references resolved."""
    return jsonschema_rs.validator_for(
        {
            "$schema": "https://json-schema.org/draft/2020-12/schema",
            "$ref": f"#/components/schemas/{name}",
            "components": DOCUMENT["components"],
        }
    )


def unused_settings() -> Settings:
    # create_app only needs the URLs to exist; nothing connects before startup.
    return Settings(database_url="postgresql://unused/unused", redis_url="redis://unused:1")


# -- the document ----------------------------------------------------------------------------


def test_document_is_valid_openapi_3_1() -> None:
    assert DOCUMENT["openapi"].startswith("3.1.")
    schema = schemathesis.openapi.from_dict(DOCUMENT)
    # Raises jsonschema_rs.ValidationError, naming the place, if the document
    # breaks the OpenAPI 3.1 meta-schema.
    schema.validate()
    broken = [
        str(result.err()) for result in schema.get_all_operations() if not isinstance(result, Ok)
    ]
    assert not broken
    for pointer in set(references(DOCUMENT)):
        resolve(pointer)  # KeyError names a reference that leads nowhere
    for path, item in DOCUMENT["paths"].items():
        for method in ("get", "post"):
            if method in item:
                assert item[method]["responses"], f"{method.upper()} {path} documents no answer"


def test_document_and_app_have_the_same_routes() -> None:
    app = with_openapi_route(create_app(unused_settings()))
    assert app_routes(app) == documented_operations()


def test_every_error_answer_has_the_error_shape() -> None:
    # Two documented exceptions: /ready says which server is away in its own
    # shape, and a vote that could not be queued carries its vote_id as well.
    # A page's 404 is a page (NoPage), for the person who opened it.
    own_shape = {
        ("/ready", "503"): "#/components/schemas/Readiness",
        ("/api/vote", "503"): "#/components/schemas/NotQueued",
    }
    for path, item in DOCUMENT["paths"].items():
        for method, operation in item.items():
            if method == "parameters":
                continue
            for status, response in operation["responses"].items():
                if not status.startswith(("4", "5")):
                    continue
                if response.get("$ref") == "#/components/responses/NoPage":
                    assert operation["tags"] == ["pages"], f"{method.upper()} {path}"
                    continue
                if "$ref" in response:
                    response = resolve(response["$ref"])
                schema = response["content"]["application/json"]["schema"]
                expected = own_shape.get((path, status), "#/components/schemas/Error")
                assert expected in set(references(schema)), f"{method.upper()} {path} {status}"
    error, not_queued = component_validator("Error"), component_validator("NotQueued")
    for body in ({"error": "no such poll", "field": "poll_id"}, {"error": "Not Found"}):
        assert error.is_valid(body)
        assert not_queued.is_valid(body)
    assert not error.is_valid({"field": "poll_id"})
    assert not_queued.is_valid({"error": "retry later", "vote_id": str(uuid.uuid4())})


def test_admin_routes_and_only_they_need_the_bearer_token() -> None:
    security = {
        (method.upper(), path): operation["security"]
        for path, item in DOCUMENT["paths"].items()
        for method, operation in item.items()
        if method != "parameters" and operation.get("security")
    }
    admin = {route for route, needs in security.items() if {"adminToken": []} in needs}
    assert admin == {("POST", "/api/polls"), ("POST", "/api/polls/{poll_id}/close")}
    for route in admin:
        assert security[route] == [{"adminToken": []}], route
    # A ballot may carry a voter token, or none ({}: no security needed).
    assert security.pop(("POST", "/api/vote")) == [{}, {"voterToken": []}]
    assert set(security) == admin
    for name in ("adminToken", "voterToken"):
        scheme = DOCUMENT["components"]["securitySchemes"][name]
        assert (scheme["type"], scheme["scheme"]) == ("http", "bearer")


def test_every_api_post_documents_its_origin_and_content_type_refusals() -> None:
    for path, item in DOCUMENT["paths"].items():
        for method, operation in item.items():
            if method == "parameters" or not path.startswith("/api/"):
                continue
            documented = operation["responses"]
            # Any /api/ route: an Authorization header that is not ASCII is a 401.
            assert "401" in documented, f"{method.upper()} {path}"
            if method == "post":
                foreign = DOCUMENT["components"]["responses"]["ForeignOrigin"]
                # The vote route's 403 has a second cause (someone else's user_id).
                assert documented["403"] == {"$ref": "#/components/responses/ForeignOrigin"} or (
                    "VOTEFLOW_ALLOWED_ORIGINS" in documented["403"]["description"]
                    and documented["403"]["content"] == foreign["content"]
                )
                assert documented["415"] == {"$ref": "#/components/responses/NotJsonContentType"}
    for name in ("Unauthorized", "BadAuthorization"):
        assert "WWW-Authenticate" in DOCUMENT["components"]["responses"][name]["headers"]


# -- a real edge -----------------------------------------------------------------------------


@pytest.fixture
async def served(settings: Settings) -> AsyncIterator[Client]:
    """An edge on a loopback port that serves the document too."""
    async with TestClient(TestServer(with_openapi_route(create_app(settings)))) as client:
        yield client


async def test_edge_serves_the_document(served: Client) -> None:
    response = await served.get(OPENAPI_ROUTE)
    assert response.status == 200
    assert response.content_type == "application/json"
    assert await response.json() == DOCUMENT


async def test_live_stream_is_a_documented_event_stream(served: Client) -> None:
    # The fuzzing run below cannot call this route on a real poll: it never ends.
    poll = await create_poll(served)
    operation = DOCUMENT["paths"]["/api/polls/{poll_id}/live"]["get"]
    async with served.get(f"/api/polls/{poll['id']}/live") as response:
        assert response.status == 200
        assert response.content_type in operation["responses"]["200"]["content"]
        assert response.headers["Cache-Control"] == "no-cache"
        event = await asyncio.wait_for(response.content.readuntil(b"\n\n"), 10)
    lines = event.decode().splitlines()
    assert lines[0] == "event: tally"
    assert lines[1] == "id: 0"
    assert lines[2].startswith("data: ")
    component_validator("Results").validate(json.loads(lines[2].removeprefix("data: ")))

    response = await served.get(f"/api/polls/{uuid.uuid4()}/live")
    assert response.status == 404
    assert response.content_type == "application/json"
    component_validator("Error").validate(await response.json())


UUID_TEXT = re.compile(
    r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
)


def _is_uuid(value: Any) -> bool:
    return isinstance(value, str) and UUID_TEXT.fullmatch(value) is not None


def _at_poll(
    case: schemathesis.Case[Any], poll: dict[str, Any], positive: bool
) -> schemathesis.Case[Any]:
    """Aim a generated vote at a real poll, so that it is queued (202) or refused
    for the poll's own rules: 409 closed, 422 another poll's option or too many."""
    body = case.body
    if not isinstance(body, dict):
        return case
    # Only a valid value is swapped for another valid one: a negative case stays negative.
    if _is_uuid(body.get("poll_id")):
        body["poll_id"] = poll["id"]
    options = body.get("option_ids")
    if positive and isinstance(options, list) and all(map(_is_uuid, options)):
        real = [option["id"] for option in poll["options"]]
        body["option_ids"] = real[: (len(options) - 1) % len(real) + 1]
    return case


def load_schema(base_url: str) -> Any:
    """The document as the edge serves it, set up to test that edge."""
    schema = schemathesis.openapi.from_url(f"{base_url}{OPENAPI_ROUTE}")
    schema.config.update(base_url=base_url, headers=ADMIN)
    schema.config.checks.update(included_check_names=CHECKS)
    # A body over its limit is refused with 413 before it is read, as documented.
    rejection = schema.config.checks.negative_data_rejection
    rejection.expected_statuses = [*rejection.expected_statuses, "413"]
    return schema


def hypothesis_settings(**overrides: Any) -> hypothesis.settings:
    return hypothesis.settings(
        deadline=None,
        database=None,  # no .hypothesis/ directory in the work tree
        suppress_health_check=list(hypothesis.HealthCheck),
        **overrides,
    )


def fuzz(base_url: str, polls: dict[str, dict[str, Any]]) -> None:
    """Every operation, positive and negative requests (runs in a thread)."""
    schema = load_schema(base_url)
    tested: set[tuple[str, str]] = set()
    for result in schema.get_all_operations():
        operation = result.ok()
        modes = list(GenerationMode)
        if operation.path == "/api/polls/{poll_id}/live":
            # Generated ids only: they answer 404 at once, while a stream on a
            # real poll never ends (test_live_stream_is_a_documented_event_stream).
            strategies = [operation.as_strategy(mode) for mode in modes]
        elif "{poll_id}" in operation.path:
            # Closing gets a poll of its own, so that votes still find one open.
            poll = polls["closable" if operation.path.endswith("/close") else "open"]
            strategies = [
                operation.as_strategy(mode, path_parameters=path_parameters)
                for mode in modes
                for path_parameters in ({}, {"poll_id": poll["id"]})
            ]
        elif operation.path == "/api/vote":
            strategies = [operation.as_strategy(mode) for mode in modes] + [
                operation.as_strategy(mode).map(
                    lambda case, p=poll, positive=mode is GenerationMode.POSITIVE: _at_poll(
                        case, p, positive
                    )
                )
                for mode in modes
                for poll in polls.values()
            ]
        else:
            strategies = [operation.as_strategy(mode) for mode in modes]

        @hypothesis_settings(max_examples=MAX_EXAMPLES)
        @hypothesis.given(case=st.one_of(strategies))
        def run(case: schemathesis.Case[Any]) -> None:
            case.call_and_validate()

        run()
        tested.add((operation.method.upper(), operation.path))
    # schemathesis leaves out the operation that serves the document itself.
    assert tested == documented_operations() - {("GET", OPENAPI_ROUTE)}


async def test_edge_keeps_the_contract_for_generated_requests(served: Client) -> None:
    polls = {
        "open": await create_poll(
            served, options=["A", "B", "C"], allow_multiple_votes=True, max_choices=2,
            expires_at=(datetime.now(UTC) + timedelta(days=1)).isoformat(),
        ),
        "closable": await create_poll(served, options=["yes", "no"]),
    }  # fmt: skip
    await asyncio.to_thread(fuzz, base_url(served), polls)


def walk_links(base: str) -> None:
    """Chains of calls along the document's links (runs in a thread)."""
    schema = load_schema(base)
    # The live stream never ends on the real polls the links lead to. The web
    # pages and the poll list are no link's source or target; in the chains,
    # the list's answers (every poll so far) made hypothesis's replays draw
    # differently (FlakyStrategyDefinition). Both are covered by
    # test_edge_keeps_the_contract_for_generated_requests and test_pages.py.
    machine = (
        schema.exclude(
            path=["/api/polls/{poll_id}/live", "/", "/polls/{poll_id}", "/static/{name}"]
        )
        .exclude(operation_id="listPolls")
        .as_state_machine()
    )
    machine.run(settings=hypothesis_settings(max_examples=50, stateful_step_count=6))


async def test_edge_keeps_the_contract_along_links(served: Client) -> None:
    await asyncio.to_thread(walk_links, base_url(served))


def base_url(client: Client) -> str:
    return str(client.make_url("")).rstrip("/")


# -- bugs found by fuzzing, reported to the lead -----------------------------------------------


async def test_expires_at_past_the_last_representable_instant_is_refused(served: Client) -> None:
    body = {"question": "q", "options": ["A", "B"], "expires_at": "9999-12-31T23:59:59-01:00"}
    response = await served.post("/api/polls", json=body, headers=ADMIN)
    assert response.status == 422
    assert (await response.json())["field"] == "expires_at"


async def test_405_names_the_allowed_methods(served: Client) -> None:
    response = await served.put("/api/vote")
    assert response.status == 405
    component_validator("Error").validate(await response.json())
    assert response.headers.get("Allow") == "POST"


def api_text() -> str:
    """The API's manual, where the limits are stated in words."""
    return (PATH.parents[1] / "docs" / "api.md").read_text()


def test_request_bodies_are_declared_once() -> None:
    """The document's request schemas are the contract's; the written file
    declares none of them, and the manual states the contract's limits."""
    schemas = DOCUMENT["components"]["schemas"]
    assert {name: schemas[name] for name in ("Ballot", "NewPoll")} == contract.schemas()
    written = json.loads(PATH.read_text())
    assert not {"Ballot", "NewPoll"} & set(written["components"]["schemas"])
    with pytest.raises(ValueError, match="Ballot"):
        assemble(DOCUMENT)  # a document that declares a request body itself
    text = api_text()
    assert f"[{contract.MIN_OPTIONS}..{contract.MAX_OPTIONS} labels]" in text
    assert f"a string of 1 to {contract.MAX_VOTER_ID} characters" in text
    assert f"over {contract.MAX_VOTE_BODY // 1024} KiB" in text
