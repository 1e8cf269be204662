"""Turning request bodies into votes and polls, or into a clear 4xx.

Every failure is a :class:`Invalid` value naming the offending field; the
edge's ``observe`` middleware turns it into a response with
:func:`ingest.app.problem`, the API's one error shape. Nothing here
touches Redis or PostgreSQL: a ballot is checked against a cached poll.
"""

from __future__ import annotations

import re
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import orjson

from voteflow.message import Vote, voter_key

from .polls import Poll

_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
# RFC 3339 date-time (section 5.6): "T" between date and time,
# "Z" or a +hh:mm offset; either letter in either case.
_RFC_3339 = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})", re.ASCII
)

MAX_VOTE_BODY = 4096
MAX_VOTER_ID = 128
MAX_QUESTION = 500
MAX_LABEL = 200
MIN_OPTIONS, MAX_OPTIONS = 2, 64


class Invalid(Exception):
    """Why a request cannot be accepted: HTTP status, field, human message."""

    def __init__(
        self,
        status: int,
        field: str | None,
        message: str,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.field = field
        self.message = message
        # Headers the answer needs besides the error shape (a 401's challenge).
        self.headers = headers or {}


@dataclass(frozen=True, slots=True)
class Ballot:
    """A vote request whose fields are well-formed, before its poll and its
    voter are checked."""

    poll_id: str
    option_ids: tuple[str, ...]
    user_id: str | None
    fingerprint: str | None
    vote_id: str | None


@dataclass(frozen=True, slots=True)
class NewPoll:
    question: str
    labels: tuple[str, ...]
    allow_multiple_votes: bool
    max_choices: int
    expires_at: datetime | None
    require_voter_token: bool = False


def parse_json(body: bytes) -> Any:
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise Invalid(400, None, f"body is not valid JSON: {exc.msg}") from None


def _object(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise Invalid(422, None, "body must be a JSON object")
    return data


def _uuid(value: Any, field: str) -> str:
    # uuid.UUID alone would also take braces, "urn:" prefixes, missing hyphens
    # and non-ASCII digits; the API speaks the 8-4-4-4-12 hexadecimal form.
    if not isinstance(value, str) or _UUID.fullmatch(value) is None:
        raise Invalid(422, field, f"{field} must be a UUID string")
    return value.lower()


def _text(value: str, field: str) -> str:
    # PostgreSQL text cannot hold NUL; one such vote would make the workers'
    # whole batch fail, so it is refused here, with the field named.
    if "\x00" in value:
        raise Invalid(422, field, f"{field} must not contain NUL characters")
    return value


def _voter_id(data: dict[str, Any], field: str) -> str | None:
    value = data.get(field)
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise Invalid(422, field, f"{field} must be a non-empty string")
    if len(value) > MAX_VOTER_ID:
        raise Invalid(422, field, f"{field} must be at most {MAX_VOTER_ID} characters")
    return _text(value, field)


def parse_ballot(body: bytes) -> Ballot:
    """Check a ``POST /api/vote`` body on its own (rule 1: who the voter is)."""
    data = _object(parse_json(body))
    poll_id = _uuid(data.get("poll_id"), "poll_id")
    raw_options = data.get("option_ids")
    if not isinstance(raw_options, list):
        raise Invalid(422, "option_ids", "option_ids must be a list of option ids")
    if not raw_options:
        raise Invalid(422, "option_ids", "option_ids must name at least one option")
    if len(raw_options) > MAX_OPTIONS:
        raise Invalid(422, "option_ids", f"option_ids has more than {MAX_OPTIONS} entries")
    option_ids = tuple(_uuid(option, "option_ids") for option in raw_options)
    if len(set(option_ids)) != len(option_ids):
        raise Invalid(422, "option_ids", "option_ids has duplicates")
    vote_id = data.get("vote_id")
    return Ballot(
        poll_id=poll_id,
        option_ids=option_ids,
        user_id=_voter_id(data, "user_id"),
        fingerprint=_voter_id(data, "voter_fingerprint"),
        vote_id=None if vote_id is None else _uuid(vote_id, "vote_id"),
    )


def voter_of(ballot: Ballot, poll: Poll, verifying: bool, token_user: str | None) -> str:
    """Rule 1, who the voter is: the voter key of a ballot.

    ``verifying``: this edge verifies voter tokens; ``token_user``: the user id
    a verified token proved (None: no token came). When tokens are verified,
    a user id is only ever a token's: a body user_id must be the token's
    (403) or left out, and one with no token is refused (401), as is a
    fingerprint ballot for a poll that requires a token. Otherwise the body's
    user_id is taken on the client's word (docs/api.md says so).
    """
    require_voter(ballot, token_user)  # the edge checked it first; never "f:None"
    if token_user is not None:
        if ballot.user_id is not None and ballot.user_id != token_user:
            raise Invalid(403, "user_id", "user_id must be the voter token's subject")
        return voter_key(token_user, None)
    if poll.require_voter_token:
        raise Invalid(401, None, "this poll takes only ballots with a voter token")
    if verifying and ballot.user_id is not None:
        raise Invalid(401, "user_id", "a user_id needs a voter token proving it")
    return voter_key(ballot.user_id, ballot.fingerprint)


def require_voter(ballot: Ballot, token_user: str | None) -> None:
    """A ballot names its voter: by a voter token, user_id or voter_fingerprint.

    A field on its own, checked before the poll is looked up (docs/api.md, "A vote
    is refused": the fields first, then the poll), so a ballot that names no
    voter is a 422 whether or not its poll exists.
    """
    if token_user is None and ballot.user_id is None and ballot.fingerprint is None:
        raise Invalid(422, "voter_fingerprint", "user_id or voter_fingerprint is required")


def admit_ballot(ballot: Ballot, poll: Poll, voter: str, received_us: int) -> Vote:
    """Check a ballot against its poll (rule 6: refused once the poll is closed)."""
    if not poll.is_open(received_us):
        raise Invalid(409, "poll_id", "the poll is closed")
    for option_id in ballot.option_ids:
        if option_id not in poll.labels:
            raise Invalid(422, "option_ids", f"option {option_id} is not an option of this poll")
    if len(ballot.option_ids) > poll.max_choices:
        raise Invalid(
            422, "option_ids", f"this poll allows at most {poll.max_choices} choice(s) per ballot"
        )
    return Vote(
        vote_id=ballot.vote_id or str(uuid.uuid4()),
        poll_id=ballot.poll_id,
        voter=voter,
        option_ids=ballot.option_ids,
        received_us=received_us,
    )


def parse_new_poll(body: bytes, now: datetime, verifying: bool = False) -> NewPoll:
    data = _object(parse_json(body))
    question = data.get("question")
    if not isinstance(question, str) or not question.strip():
        raise Invalid(422, "question", "question must be a non-empty string")
    if len(question) > MAX_QUESTION:
        raise Invalid(422, "question", f"question must be at most {MAX_QUESTION} characters")
    _text(question, "question")
    labels = data.get("options")
    if not isinstance(labels, list) or not all(isinstance(label, str) for label in labels):
        raise Invalid(422, "options", "options must be a list of labels (strings)")
    if not MIN_OPTIONS <= len(labels) <= MAX_OPTIONS:
        raise Invalid(422, "options", f"options must have {MIN_OPTIONS} to {MAX_OPTIONS} labels")
    if any(not label.strip() or len(label) > MAX_LABEL for label in labels):
        raise Invalid(422, "options", f"each label must be 1 to {MAX_LABEL} characters")
    if len(set(labels)) != len(labels):
        raise Invalid(422, "options", "labels must be distinct")
    for label in labels:
        _text(label, "options")
    allow_multiple = data.get("allow_multiple_votes", False)
    if not isinstance(allow_multiple, bool):
        raise Invalid(422, "allow_multiple_votes", "allow_multiple_votes must be true or false")
    max_choices = data.get("max_choices", 1)
    if type(max_choices) is not int or not 1 <= max_choices <= len(labels):
        raise Invalid(
            422, "max_choices", "max_choices must be an integer from 1 to the number of options"
        )
    require_token = data.get("require_voter_token", False)
    if not isinstance(require_token, bool):
        raise Invalid(422, "require_voter_token", "require_voter_token must be true or false")
    if require_token and not verifying:
        raise Invalid(
            422,
            "require_voter_token",
            "this edge verifies no voter tokens (set VOTEFLOW_VOTER_TOKEN_SECRET or "
            "VOTEFLOW_VOTER_TOKEN_PUBLIC_KEY)",
        )
    return NewPoll(
        question=question,
        labels=tuple(labels),
        allow_multiple_votes=allow_multiple,
        max_choices=max_choices,
        expires_at=_expires_at(data.get("expires_at"), now),
        require_voter_token=require_token,
    )


def _expires_at(value: Any, now: datetime) -> datetime | None:
    if value is None:
        return None
    message = "expires_at must be an RFC 3339 date-time with an offset, or null"
    if not isinstance(value, str) or len(value) > 64 or _RFC_3339.fullmatch(value) is None:
        raise Invalid(422, "expires_at", message)
    try:
        parsed = datetime.fromisoformat(value.upper())
    except ValueError:  # well-formed, but no such date or time (February 30th)
        raise Invalid(422, "expires_at", message) from None
    if parsed.tzinfo is None:
        raise Invalid(422, "expires_at", message)
    if parsed <= now:
        raise Invalid(422, "expires_at", "expires_at must be in the future")
    try:
        return parsed.astimezone(UTC)
    except OverflowError:  # after 9999-12-31T23:59:59.999999Z
        raise Invalid(422, "expires_at", message) from None
