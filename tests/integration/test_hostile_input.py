"""Hostile input at the HTTP edge: property tests of the request contract, against a real edge.

The request bodies are declared once, in ``ingest/contract.py``. The bodies
here are drawn from the JSON Schemas generated from it (the OpenAPI
document's) with hypothesis-jsonschema, then aimed at real polls, mutated,
damaged, compressed or padded, and sent to one live edge (its own database and
key prefix). Every answer: never a 5xx; a refusal in the one error shape
(``error``, and ``field`` naming a field of the body), with nothing appended
to any stream; a queued ballot appended once (not again for a repeated
``vote_id``); and ``GET /health`` still 200 after it. And what the contract
promises: every ballot the schema accepts, aimed at an open poll and naming a
voter, is queued (202); every poll it accepts is created (201) unless it
breaks a rule JSON Schema cannot state, and then it is a 422 naming that field.

Bugs the oracle this file used to be found were fixed, and each stays here as
an example: NUL in a voter id, question or label (029b5f4), an expires_at
past year 9999 in UTC (f1582b6), ids in spellings that are not UUIDs, an
expires_at in forms that are ISO 8601 but not RFC 3339, and a body that does
not decode from its Content-Encoding (a 500 until then).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import uuid
import zlib
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import hypothesis
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient
from hypothesis import HealthCheck, given, note
from hypothesis import strategies as st

from ingest.app import MAX_BODY as MAX_POLL_BODY
from ingest.contract import MAX_VOTE_BODY
from tests.contract import SCHEMAS, ballots, new_polls, voter_ids
from tests.support import ADMIN, create_poll
from voteflow.keys import Keys
from voteflow.settings import Settings

try:
    import brotli
except ImportError:
    brotli = None

Client = TestClient[Any, Any]
# What input alone can make each route answer (the test settings turn the
# rate limits off; 503 needs Redis or PostgreSQL away, and both are up).
VOTE_STATUSES = frozenset({202, 400, 404, 409, 413, 415, 422})
POLL_STATUSES = frozenset({201, 400, 413, 415, 422})
REQUEST_TIMEOUT = 15.0  # longer is a hang, and a bug
JSON = {"Content-Type": "application/json"}

LIVE_EDGE = hypothesis.settings(
    max_examples=100,
    deadline=None,
    # All examples of a test share its edge, database and key prefix on
    # purpose (a database clone per example would cost seconds); none can
    # fool the next: each measures the streams before and after its request.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
FEW = hypothesis.settings(LIVE_EDGE, max_examples=30)


# --- the edge under test ----------------------------------------------------


@dataclass(frozen=True, slots=True)
class KnownPoll:
    id: str
    option_ids: tuple[str, ...]
    max_choices: int


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    content_type: str
    raw: bytes
    appended: int  # entries added to the vote streams while the request ran

    def json(self) -> Any:
        return json.loads(self.raw)


@dataclass
class Target:
    client: Client
    redis: aioredis.Redis
    streams: list[str]
    open_polls: list[KnownPoll]
    closed_poll: KnownPoll
    # The ballot each queued vote_id was queued with: a repeat is 202 again,
    # appended once in all; the vote_id with another ballot is 409.
    ballots: dict[str, tuple[str, str, frozenset[str]]] = field(default_factory=dict)

    async def queued(self) -> int:
        pipe = self.redis.pipeline(transaction=False)
        for stream in self.streams:
            pipe.xlen(stream)
        return sum(await pipe.execute())

    async def post(self, path: str, data: Any, headers: Mapping[str, str], body: str) -> Answer:
        """One request, and what every answer must be; body: the schema it is checked against."""
        before = await self.queued()
        async with asyncio.timeout(REQUEST_TIMEOUT):
            response = await self.client.post(path, data=data, headers=dict(headers))
            raw = await response.read()
        answer = Answer(response.status, response.content_type, raw, await self.queued() - before)
        if hypothesis.currently_in_test_context():
            note(f"POST {path} -> {answer.status} {raw[:300]!r}, {answer.appended} appended")
            hypothesis.event(str(answer.status))
        assert answer.status < 500, "a server error"
        if answer.status >= 300:
            assert answer.appended == 0, "a refused request was appended to a stream"
            # aiohttp answers a body that fails to decode while it parses the
            # request (before any handler runs) in plain text, with a 400.
            if (answer.status, answer.content_type) != (400, "text/plain"):
                assert_error_shape(answer, body)
        async with asyncio.timeout(REQUEST_TIMEOUT):
            health = await self.client.get("/health")
        assert health.status == 200, "the edge stopped serving"
        return answer

    async def vote(self, data: Any, headers: Mapping[str, str] = JSON) -> Answer:
        answer = await self.post("/api/vote", data, headers, "Ballot")
        assert answer.status in VOTE_STATUSES
        if answer.status == 202:
            reply = answer.json()
            assert reply["status"] == "queued"
            assert reply["vote_id"] == str(uuid.UUID(reply["vote_id"]))
            assert answer.appended == (0 if reply["vote_id"] in self.ballots else 1)
        return answer

    async def new_poll(self, data: Any, headers: Mapping[str, str] = ADMIN) -> Answer:
        answer = await self.post("/api/polls", data, headers, "NewPoll")
        assert answer.status in POLL_STATUSES
        assert answer.appended == 0
        if answer.status == 201:
            created = answer.json()
            assert created["id"] == str(uuid.UUID(created["id"]))
        return answer


def assert_error_shape(answer: Answer, body: str) -> None:
    assert answer.content_type == "application/json", answer
    reply = answer.json()
    assert set(reply) <= {"error", "field"}, reply
    assert isinstance(reply["error"], str)
    assert reply["error"].strip()
    assert "field" not in reply or reply["field"] in SCHEMAS[body]["properties"], reply


@pytest.fixture
async def target(edge: Client, redis_client: aioredis.Redis, settings: Settings) -> Target:
    polls = [
        await create_poll(edge, options=["A", "B", "C"]),
        await create_poll(edge, options=list("ABCD"), allow_multiple_votes=True, max_choices=3),
        await create_poll(edge, options=["A", "B"]),
    ]
    assert (await edge.post(f"/api/polls/{polls[2]['id']}/close", headers=ADMIN)).status == 200
    *open_polls, closed = [
        KnownPoll(p["id"], tuple(o["id"] for o in p["options"]), p["max_choices"]) for p in polls
    ]
    streams = Keys(settings.key_prefix, settings.stream_shards).streams()
    return Target(edge, redis_client, streams, open_polls, closed)


def encode(value: Any, ensure_ascii: bool = False) -> bytes:
    """JSON as a careless client writes it: NaN and Infinity as bare words, and
    (without ensure_ascii) lone surrogates as the bytes UTF-8 forbids."""
    text = json.dumps(value, ensure_ascii=ensure_ascii, allow_nan=True)
    return text.encode("utf-8", "surrogatepass")


def voter_named(ballot: dict[str, Any]) -> bool:
    return ballot.get("user_id") is not None or ballot.get("voter_fingerprint") is not None


def respell(canonical: str, like: str) -> str:
    """canonical in the letter case of like, another UUID as the schema spelled it."""
    return "".join(c.upper() if k.isupper() else c for c, k in zip(canonical, like, strict=True))


@st.composite
def aimed_ballots(
    draw: st.DrawFn, polls: list[KnownPoll], queueable: bool = False
) -> dict[str, Any]:
    """A ballot the schema accepts, aimed at one of polls and at as many of its
    options as it names (at most the poll's max_choices). queueable: with a
    voter, and without a vote_id that an earlier example may have used."""
    ballot, poll = draw(ballots), draw(st.sampled_from(polls))
    if queueable:
        ballot.pop("vote_id", None)
        if not voter_named(ballot):
            ballot["voter_fingerprint"] = "f"
    named = ballot["option_ids"][: poll.max_choices]
    chosen = draw(st.permutations(poll.option_ids))[: len(named)]
    ballot["poll_id"] = respell(poll.id, ballot["poll_id"])
    ballot["option_ids"] = [respell(o, like) for o, like in zip(chosen, named, strict=True)]
    return ballot


# --- what the schema accepts is accepted ---------------------------------------


@LIVE_EDGE
@given(data=st.data())
async def test_every_ballot_the_schema_accepts_is_queued_once(
    target: Target, data: st.DataObject
) -> None:
    ballot = data.draw(aimed_ballots(target.open_polls), label="ballot")
    if data.draw(st.integers(0, 3), label="name a voter") and not voter_named(ballot):
        ballot["voter_fingerprint"] = data.draw(voter_ids, label="voter_fingerprint")
    user_id, fingerprint = ballot.get("user_id"), ballot.get("voter_fingerprint")
    voter = f"u:{user_id}" if user_id is not None else f"f:{fingerprint}"
    key = (ballot["poll_id"].lower(), voter, frozenset(o.lower() for o in ballot["option_ids"]))
    vote_id = (ballot.get("vote_id") or "").lower()
    answer = await target.vote(encode(ballot))
    if not voter_named(ballot):  # a rule of the edge: the voter may come in a token
        assert (answer.status, answer.json()["field"]) == (422, "voter_fingerprint")
    elif target.ballots.get(vote_id, key) != key:
        assert (answer.status, answer.json()["field"]) == (409, "vote_id")
    else:
        assert answer.status == 202, answer
        target.ballots[answer.json()["vote_id"]] = key


def in_the_future(expires_at: str | None, now: datetime) -> bool:
    try:  # no such day (ValueError), or past year 9999 in UTC (OverflowError)
        return (
            expires_at is None or datetime.fromisoformat(expires_at.upper()).astimezone(UTC) > now
        )
    except (ValueError, OverflowError):
        return False


def broken_rules(poll: dict[str, Any], now: datetime) -> set[str]:
    """The fields of a poll the schema accepts that break a rule JSON Schema
    cannot state (docs/api.md), or ask what this edge cannot: it verifies no
    voter tokens."""
    labels = poll["options"]
    rules = {
        "question": poll["question"].strip() != "",
        "options": all(label.strip() for label in labels),
        "max_choices": poll.get("max_choices", 1) <= len(labels),
        "require_voter_token": not poll.get("require_voter_token"),
        "expires_at": in_the_future(poll.get("expires_at"), now),
    }
    return {name for name, kept in rules.items() if not kept}


@LIVE_EDGE
@given(poll=new_polls)
async def test_every_poll_the_schema_accepts_is_created_unless_it_breaks_a_rule_beyond_it(
    target: Target, poll: dict[str, Any]
) -> None:
    broken = broken_rules(poll, datetime.now(UTC))
    body = encode(poll)
    answer = await target.new_poll(body)
    if len(body) > MAX_POLL_BODY:
        assert answer.status == 413
    elif broken:
        assert answer.status == 422
        assert answer.json()["field"] in broken
    else:
        assert answer.status == 201, answer
        created = answer.json()
        assert created["question"] == poll["question"]
        assert [option["label"] for option in created["options"]] == poll["options"]


# --- anything else: never a 5xx, one error shape, nothing appended --------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20)
    | st.sampled_from([10**400, 2**64, "", " ", "\x00", "\ud800", "null"]),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner),
    max_leaves=12,
)  # fmt: skip


@st.composite
def mutated(draw: st.DrawFn, bodies: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    """A body with up to three members replaced by any JSON value, dropped, or joined by junk."""
    body = draw(bodies)
    names = st.sampled_from(sorted(body) or ["junk"])
    for _ in range(draw(st.integers(0, 3))):
        how = draw(st.sampled_from(["replace", "drop", "junk", "item"]))
        if how == "replace":
            body[draw(names)] = draw(json_values)
        elif how == "drop":
            body.pop(draw(names), None)
        elif how == "junk":
            body[draw(st.text(max_size=10))] = draw(json_values)
        elif isinstance(items := body.get(draw(names)), list):
            items.append(draw(json_values | st.sampled_from(items or [None])))
    return body


@st.composite
def damaged(draw: st.DrawFn, body: bytes) -> bytes:
    """body with a few bytes flipped, inserted or deleted, or cut short."""
    data = bytearray(body)
    if draw(st.booleans()):
        return bytes(data[: draw(st.integers(0, len(data)))])
    for _ in range(draw(st.integers(1, 3))):
        at = draw(st.integers(0, len(data)))
        if at == len(data) or draw(st.booleans()):
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        else:
            data[at] = draw(st.integers(0, 255))
    return bytes(data)


OTHER_TYPES = ["text/plain; charset=latin-1", "application/x-www-form-urlencoded", "\u00e9/\u00e9"]
content_types = st.sampled_from(["application/json", "application/json; charset=UTF-8"]) | (
    st.sampled_from(OTHER_TYPES).map(lambda text: text.encode().decode("latin-1"))
)


def any_bodies(valid: st.SearchStrategy[dict[str, Any]]) -> st.SearchStrategy[bytes]:
    return st.one_of(
        st.binary(max_size=2000),
        st.builds(encode, json_values | mutated(valid), st.booleans()),
        valid.map(encode).flatmap(damaged),
    )


@hypothesis.settings(LIVE_EDGE, max_examples=200)
@given(data=st.data(), content_type=content_types, vote=st.booleans())
async def test_any_request_gets_a_documented_answer_and_a_refused_one_appends_nothing(
    target: Target, data: st.DataObject, content_type: str, vote: bool
) -> None:
    if vote:
        polls = [*target.open_polls, target.closed_poll]
        body = data.draw(any_bodies(aimed_ballots(polls, queueable=True) | ballots), label="body")
        answer = await target.vote(body, {"Content-Type": content_type})
    else:
        body = data.draw(any_bodies(new_polls), label="body")
        answer = await target.new_poll(body, {**ADMIN, "Content-Type": content_type})
    if not content_type.startswith("application/json"):
        assert answer.status == 415


async def chunks(body: bytes, size: int) -> AsyncIterator[bytes]:
    """body sent chunked: no Content-Length for the edge to check first."""
    for start in range(0, len(body), size):
        yield body[start : start + size]


def padded(value: dict[str, Any], size: int) -> bytes:
    """value with a junk member that brings it to size bytes (or its smallest size)."""
    base = len(encode({**value, "pad": ""}))
    return encode({**value, "pad": "x" * max(0, size - base)})


@FEW
@given(
    data=st.data(),
    route=st.sampled_from([("/api/vote", MAX_VOTE_BODY), ("/api/polls", MAX_POLL_BODY)]),
    over=st.integers(-200, 2 * MAX_POLL_BODY) | st.sampled_from([0, 1]),
    chunked=st.booleans(),
)
async def test_body_over_its_limit_is_413_with_or_without_content_length(
    target: Target, data: st.DataObject, route: tuple[str, int], over: int, chunked: bool
) -> None:
    path, limit = route
    valid = (
        aimed_ballots(target.open_polls, queueable=True)
        if path == "/api/vote"
        else st.just({"question": "Q", "options": ["a", "b"]})
    )
    body = padded(data.draw(valid), limit + over)
    sent = chunks(body, max(1000, len(body) // 20)) if chunked else body
    answer = await (target.vote(sent) if path == "/api/vote" else target.new_poll(sent))
    assert answer.status == (413 if len(body) > limit else 202 if path == "/api/vote" else 201)


COMPRESS: dict[str, Callable[[bytes], bytes]] = {"gzip": gzip.compress, "deflate": zlib.compress}
if brotli is not None:  # aiohttp decodes "br" only when it is installed
    COMPRESS["br"] = brotli.compress
ENCODINGS = list(COMPRESS)


@FEW
@given(
    data=st.data(),
    encoding=st.sampled_from(ENCODINGS),
    size=st.integers(0, 300_000) | st.sampled_from([MAX_VOTE_BODY, MAX_VOTE_BODY + 1]),
)
async def test_compressed_vote_is_read_like_a_plain_one_and_bounded_after_decoding(
    target: Target, data: st.DataObject, encoding: str, size: int
) -> None:
    # A small compressed body may decode to a large one (a "zip bomb"): the
    # 4 KiB limit applies to the body as decoded, and decoding stops at 64 KiB.
    body = padded(data.draw(aimed_ballots(target.open_polls, queueable=True)), size)
    sent = COMPRESS[encoding](body)
    answer = await target.vote(sent, {**JSON, "Content-Encoding": encoding})
    assert answer.status == (202 if max(len(body), len(sent)) <= MAX_VOTE_BODY else 413)


# --- examples: each rule of a field, and the bugs found so far -----------------


@pytest.fixture
async def poll(target: Target) -> KnownPoll:
    return target.open_polls[0]


def ballot_for(poll: KnownPoll, **fields: Any) -> dict[str, Any]:
    """A valid ballot for poll, but for fields (... drops one)."""
    body = {"poll_id": poll.id, "option_ids": [poll.option_ids[0]], "voter_fingerprint": "f"}
    return {k: v for k, v in {**body, **fields}.items() if v is not ...}


U = "0c7b9d3e-1a2b-4c3d-8e9f-a0b1c2d3e4f5"
# Spellings that uuid.UUID or a careless regex would take, but not the API: ids
# are 8-4-4-4-12 ASCII hexadecimal digits.
NOT_UUIDS = [
    "{" + U + "}", "urn:uuid:" + U, U.replace("-", ""), U.replace("-", "", 1) + "0",
    "-".join(U.replace("-", "")[i : i + 4] for i in range(0, 32, 4)), U[:-1] + "\n", " " + U[1:],
    U.translate({ord(d): 0xFF10 + int(d) for d in "0123456789"}),  # fullwidth digits
    U.translate({ord(d): 0x0660 + int(d) for d in "0123456789"}),  # Arabic-Indic digits
]  # fmt: skip

# Each value is refused with a 422 naming its field, alone in an otherwise valid body.
BAD_BALLOTS: dict[str, list[Any]] = {
    "poll_id": [..., 42, "g" + U[1:], *NOT_UUIDS],
    "option_ids": [
        ..., "x", [], [1], [str(uuid.UUID(int=i)) for i in range(65)],
        *[[spelling] for spelling in NOT_UUIDS],
    ],
    "voter_fingerprint": [7, "", "x" * 129, "\x00"],
    "user_id": ["x" * 129, ["u"], "a\x00b"],  # with a voter_fingerprint, which it outranks
    "vote_id": [5, *NOT_UUIDS],
}  # fmt: skip


@pytest.mark.parametrize(
    ("field_name", "value"), [(name, v) for name, values in BAD_BALLOTS.items() for v in values]
)
async def test_malformed_ballot_is_422_naming_the_field(
    target: Target, poll: KnownPoll, field_name: str, value: Any
) -> None:
    answer = await target.vote(encode(ballot_for(poll, **{field_name: value}), ensure_ascii=True))
    assert (answer.status, answer.json()["field"]) == (422, field_name)


def iso_8601_not_rfc_3339(date: str = "2100-03-04", clock: str = "05:06:07") -> list[str]:
    return [
        f"{date}T05Z", f"{date}T05:06Z", "21000304T050607Z", f"2100-W09-4T{clock}Z",
        f"{date}X{clock}Z", f"{date} {clock}Z", f"{date}T{clock}+05", f"{date}T{clock}+0530",
        f"{date}T{clock}+05:30:15", f"{date}T{clock},5Z", f"{date}T{clock}", "2100-02-30T00:00:00Z",
    ]  # fmt: skip


BAD_POLLS: dict[str, list[Any]] = {
    "question": ["", " \u3000\u2028", 5, "q" * 501, "why\x00"],
    "options": [
        ["only one"], [f"o{i}" for i in range(65)], ["a", "a"], ["a", ""], ["a", "\t"],
        ["a", 2], ["a", "L" * 201], ["a", "b\x00"], "a,b",
    ],
    "allow_multiple_votes": ["yes", None],
    "max_choices": [0, 4, True, 1.5, 2.0, 2**64, None],
    "require_voter_token": [True],  # this edge verifies no voter tokens
    "expires_at": [
        "tomorrow", "2001-01-01T00:00:00Z", "0001-01-01T00:00:00+23:59",
        # After 9999-12-31T23:59:59.999999 in UTC, which no datetime holds (a 500 until f1582b6).
        "9999-12-31T23:59:59-01:00", "9999-12-31T23:30:00.5-23:59",
        *iso_8601_not_rfc_3339(),
    ],
}  # fmt: skip


@pytest.mark.parametrize(
    ("field_name", "value"), [(name, v) for name, values in BAD_POLLS.items() for v in values]
)
async def test_bad_poll_is_422_naming_the_field(
    target: Target, field_name: str, value: Any
) -> None:
    body = {"question": "Q?", "options": ["a", "b", "c"], field_name: value}
    answer = await target.new_poll(encode(body, ensure_ascii=True))
    assert (answer.status, answer.json()["field"]) == (422, field_name)


@pytest.mark.parametrize(
    "expires_at", ["2100-03-04t05:06:07z", "2100-03-04T05:06:07.123456789-00:00"]
)
async def test_expires_at_is_read_as_rfc_3339(target: Target, expires_at: str) -> None:
    body = {"question": "Q", "options": ["a", "b"], "expires_at": expires_at}
    assert (await target.new_poll(encode(body))).status == 201


def nested(depth: int, open_: bytes = b"[", close: bytes = b"]") -> bytes:
    return open_ * depth + close * depth


@pytest.mark.parametrize(
    ("body", "statuses"),
    [
        (b"{", {400}), (b"not json", {400}), (b"", {400}), (b"\xff\xfe", {400}),
        (b'{"poll_id": }', {400}), (b'{"poll_id": NaN}', {400}), (b'"x" junk', {400}),
        (b'{"user_id": "\\ud800"}', {400}), (b'{"junk": "\xff", "poll_id": 1}', {400}),
        (b"[]", {422}), (b"1", {422}), (b'"x"', {422}), (b"null", {422}),
        (nested(2048), {400, 422}), (b'{"junk":' + nested(1900) + b"}", {400, 422}),
        (b'{"a":' * 650 + b"1" + b"}" * 650, {400, 422}), (nested(10_000), {413}),
    ],
)  # fmt: skip
async def test_body_that_is_not_a_json_object_is_refused_cleanly(
    target: Target, body: bytes, statuses: set[int]
) -> None:
    answer = await target.vote(body)
    assert answer.status in statuses
    assert answer.status != 400 or "not valid JSON" in answer.json()["error"]


@FEW
@given(
    body=st.binary(min_size=1, max_size=2000),
    encoding=st.sampled_from(ENCODINGS),
    path=st.sampled_from(["/api/vote", "/api/polls"]),
)
async def test_body_that_does_not_decode_is_400_not_500(
    target: Target, body: bytes, encoding: str, path: str
) -> None:
    headers = {**ADMIN, "Content-Encoding": encoding}
    answer = await target.post(path, body, headers, "Ballot" if path == "/api/vote" else "NewPoll")
    # 400; or, should the random bytes happen to decode (a few are brotli
    # streams), whatever the decoded garbage earns.
    assert answer.status in {400, 413, 422}
