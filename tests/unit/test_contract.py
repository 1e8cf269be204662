"""The request contract on its own (ingest/contract.py, read by
ingest/validate.py): a body its JSON Schema accepts is read as it was sent, a
body it refuses is a 400 or a 422 naming a field of the schema, and nothing
raises anything else. The same bodies at a live edge:
tests/integration/test_hostile_input.py."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
from hypothesis import assume, given
from hypothesis import strategies as st

from ingest.validate import Invalid, parse_ballot, parse_new_poll
from tests.contract import SCHEMAS, ballots, new_polls

NOW = datetime(2026, 12, 4, tzinfo=UTC)
json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=8,
)


def _near(schema: dict[str, Any]) -> st.SearchStrategy[dict[str, Any]]:
    """Objects with the schema's member names (and one it lacks), any values."""
    names = st.sampled_from([*schema["properties"], "extra"])
    return st.dictionaries(names, json_values, max_size=6)


@given(ballots)
def test_every_ballot_the_schema_accepts_is_read_as_it_was_sent(body: dict[str, Any]) -> None:
    options = body["option_ids"]
    assume(len({option.lower() for option in options}) == len(options))  # beyond the schema
    ballot = parse_ballot(orjson.dumps(body))
    assert ballot.poll_id == body["poll_id"].lower()
    assert ballot.option_ids == tuple(option.lower() for option in options)
    assert ballot.user_id == body.get("user_id")
    assert ballot.voter_fingerprint == body.get("voter_fingerprint")
    vote_id = body.get("vote_id")
    assert ballot.vote_id == (None if vote_id is None else vote_id.lower())


def _refusal_or_value(parse: Any, body: bytes, schema: str) -> Invalid | None:
    try:
        parse(body)
    except Invalid as refused:
        assert refused.status in (400, 422), refused.message
        assert refused.field is None or refused.field in SCHEMAS[schema]["properties"]
        assert refused.message
        return refused
    return None


@given(st.one_of(_near(SCHEMAS["Ballot"]), json_values))
def test_any_other_ballot_is_refused_naming_a_field_or_read(body: Any) -> None:
    _refusal_or_value(parse_ballot, orjson.dumps(body), "Ballot")


@given(st.binary(max_size=200))
def test_bytes_that_are_not_json_are_a_400(body: bytes) -> None:
    try:
        orjson.loads(body)
    except orjson.JSONDecodeError:
        refused = _refusal_or_value(parse_ballot, body, "Ballot")
        assert refused is not None and refused.status == 400


@given(new_polls)
def test_every_poll_the_schema_accepts_is_read_or_breaks_a_rule_beyond_it(
    body: dict[str, Any],
) -> None:
    refused = _refusal_or_value(
        lambda raw: parse_new_poll(raw, NOW, verifying=True), orjson.dumps(body), "NewPoll"
    )
    # What JSON Schema cannot say: a question and labels not blank, distinct
    # labels, max_choices at most the number of options, an expires_at that
    # is a future instant.
    beyond = {"question", "options", "max_choices", "expires_at"}
    assert refused is None or refused.field in beyond


@given(st.one_of(_near(SCHEMAS["NewPoll"]), json_values))
def test_any_other_poll_is_refused_naming_a_field_or_read(body: Any) -> None:
    _refusal_or_value(lambda raw: parse_new_poll(raw, NOW), orjson.dumps(body), "NewPoll")
