"""Turning request bodies into votes and polls, or into a clear 4xx.

The bodies are declared once, in ``ingest/contract.py``; here they are
decoded with it, and checked against what the body alone cannot tell: the
voter a token proves, the poll, the clock. Every failure is an
:class:`Invalid` value naming the offending field; the edge's ``observe``
middleware turns it into a response with :func:`ingest.app.problem`, the
API's one error shape. Nothing here
touches Redis or PostgreSQL: a ballot is checked against a cached poll.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from typing import Final, TypeVar

import msgspec

from voteflow.message import Vote, voter_key

from .contract import MAX_VOTE_BODY, Ballot, FieldError, NewPoll, rules, schemas
from .polls import Poll

T = TypeVar("T")

__all__ = ["MAX_VOTE_BODY", "Ballot", "Invalid", "NewPoll", "parse_ballot", "parse_new_poll"]


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


# Made once: msgspec compiles a decoder per type, and the messages per field.
_BALLOT: Final = msgspec.json.Decoder(Ballot)
_NEW_POLL: Final = msgspec.json.Decoder(NewPoll)
_SCHEMAS: Final = schemas()
_BALLOT_RULES: Final = rules(_SCHEMAS["Ballot"])
_NEW_POLL_RULES: Final = rules(_SCHEMAS["NewPoll"])
# msgspec's ValidationError names where it failed: "... - at `$.option_ids[3]`",
# or, for a required field that is absent, "Object missing required field `poll_id`".
_AT: Final = re.compile(r" - at `\$\.(\w+)")
_MISSING: Final = re.compile(r"^Object missing required field `(\w+)`$")


def _invalid(exc: msgspec.ValidationError, field_rules: dict[str, str]) -> Invalid:
    """The 422 for a body that is JSON but breaks the contract, naming the field."""
    if isinstance(exc.__cause__, FieldError):  # a rule of __post_init__
        return Invalid(422, exc.__cause__.field, str(exc.__cause__))
    text = str(exc)
    missing = _MISSING.match(text)
    if missing is not None:
        field = missing.group(1)
        return Invalid(422, field, f"{field} is required: {field_rules[field]}")
    at = _AT.search(text)
    if at is None:  # the body itself: "Expected `object`, got `array`"
        return Invalid(422, None, "body must be a JSON object")
    field = at.group(1)
    return Invalid(422, field, f"{field} must be {field_rules[field]}")


def _not_json(exc: Exception) -> Invalid:
    # RecursionError: nested deeper than the parser goes (a thousand levels or so).
    reason = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
    return Invalid(400, None, f"body is not valid JSON: {reason}")


def _decode(decoder: msgspec.json.Decoder[T], body: bytes, field_rules: dict[str, str]) -> T:
    """body as the contract's type T, or the 400 or 422 that says why not."""
    try:
        value = decoder.decode(body)
    except msgspec.ValidationError as exc:
        # msgspec stops at the first value it refuses: the rest may not be
        # JSON at all, and a body that is not JSON is a 400 (a refusal only:
        # an accepted body was read to its end).
        try:
            msgspec.json.decode(body)
        except msgspec.ValidationError:  # a number no float holds: JSON still
            pass
        except (msgspec.DecodeError, RecursionError) as not_json:
            raise _not_json(not_json) from None
        raise _invalid(exc, field_rules) from None
    except (msgspec.DecodeError, RecursionError) as exc:
        raise _not_json(exc) from None
    # A member the contract does not name is skipped, its UTF-8 unchecked;
    # JSON is UTF-8 all the same (RFC 8259, section 8.1).
    if not body.isascii():
        try:
            body.decode()
        except UnicodeDecodeError:
            raise Invalid(400, None, "body is not valid JSON: it is not UTF-8") from None
    return value


def parse_ballot(body: bytes) -> Ballot:
    """Check a ``POST /api/vote`` body on its own: the contract's Ballot."""
    return _decode(_BALLOT, body, _BALLOT_RULES)


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
    return voter_key(ballot.user_id, ballot.voter_fingerprint)


def require_voter(ballot: Ballot, token_user: str | None) -> None:
    """A ballot names its voter: by a voter token, user_id or voter_fingerprint.

    A field on its own, checked before the poll is looked up (docs/api.md, "A vote
    is refused": the fields first, then the poll), so a ballot that names no
    voter is a 422 whether or not its poll exists.
    """
    if token_user is None and ballot.user_id is None and ballot.voter_fingerprint is None:
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
    """Check a ``POST /api/polls`` body: the contract's NewPoll, with an
    expires_at in the future, and a voter token required only by an edge
    that verifies them."""
    new = _decode(_NEW_POLL, body, _NEW_POLL_RULES)
    expires_at = new.expiry()
    if expires_at is not None and expires_at <= now:
        raise Invalid(422, "expires_at", "expires_at must be in the future")
    if new.require_voter_token and not verifying:
        raise Invalid(
            422,
            "require_voter_token",
            "this edge verifies no voter tokens (set VOTEFLOW_VOTER_TOKEN_SECRET or "
            "VOTEFLOW_VOTER_TOKEN_PUBLIC_KEY)",
        )
    return new
