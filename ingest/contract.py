"""The request contract: the bodies of ``POST /api/vote`` and ``POST /api/polls``, declared once.

Each body is a msgspec Struct whose fields carry their limits as ``Meta``
constraints. From this one declaration follow:

- the edge's parsing and checking (``ingest/validate.py``):
  ``msgspec.json.decode(body, type=Ballot)`` reads the JSON and checks every
  field in one pass;
- the request schemas of the OpenAPI document (:func:`schemas`, added to the
  hand-written rest of it, ``ingest/openapi.json``, by ``ingest/openapi.py``);
- the error messages: a field's ``description`` up to its first ": " is the
  rule its 422 states ("poll_id must be a UUID ...");
- the property tests of ``tests/integration/test_hostile_input.py``, which
  draw request bodies from the generated schemas.

Rules JSON Schema cannot hold (distinct ids whatever their case, labels not
blank and distinct, max_choices at most the number of options, an expires_at
that names a real instant) are code next to the declaration, in
``__post_init__``: a :class:`FieldError` raised there becomes msgspec's
ValidationError, the FieldError kept as its ``__cause__`` with the field to
name. Rules that need more than the body (the voter a token proves, the poll,
the clock) stay in ``ingest/validate.py``.

Why msgspec rather than the OpenAPI document as the source, measured with
``python -m timeit`` on a 3-option ballot (median of 5 runs of best-of-7):
``parse_ballot`` takes 2.0 µs with msgspec against 4.2 µs for orjson plus the
hand-written checks it replaced, and 2.6 µs for orjson plus a compiled JSON
Schema validator (jsonschema-rs) plus the same cross-field code, which hands
back an untyped dict and errors that must be mapped all the same. The
Structs are typed Python that mypy checks where they are used, and the
document's schemas come out of them with ``msgspec.json.schema_components``.

A UUID is a 36-character string of the pattern ``UUID_PATTERN``: msgspec's own
``uuid.UUID`` type also takes the 32 digits without hyphens, which the API has
never read as a UUID. ``expires_at`` is a string of the pattern ``RFC_3339``
for the same reason: msgspec's ``datetime`` also takes a space for "T" and an
offset without a colon, which RFC 3339 does not. msgspec checks a ``Meta``
pattern by calling Python's ``re`` once per string (0.4 µs each, 2.4 of the
2.8 µs a ballot took that way): so the ballot's ids and voter ids state their
patterns in the schema only, and ``Ballot.__post_init__`` checks all the ids
with one regex call. A poll's patterns are msgspec's to check: polls are few.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any, Final

import msgspec
from msgspec import Meta, Struct

MAX_VOTE_BODY: Final = 4096
MAX_VOTER_ID: Final = 128
MAX_QUESTION: Final = 500
MAX_LABEL: Final = 200
MIN_OPTIONS: Final = 2
MAX_OPTIONS: Final = 64
# RFC 3339 allows any number of fraction digits; nobody needs more than 64 characters.
MAX_DATE_TIME: Final = 64

# The patterns mean the same to ECMA-262 (JSON Schema) and to Python. Python's
# "$" also matches before a final newline: a UUID's fixed length rules that
# out, NO_NUL's "[^\x00]*" takes a newline anyway, and fromisoformat refuses an
# expires_at that ends in one.
_UUID: Final = "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
UUID_PATTERN: Final = f"^{_UUID}$"
# PostgreSQL text cannot hold NUL; one such vote would make the workers'
# whole batch fail, so no text field takes it.
NO_NUL: Final = r"^[^\x00]*$"
# RFC 3339 section 5.6: "T" and "Z" in either case, "Z" or a +hh:mm offset.
RFC_3339: Final = (
    r"^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt][0-9]{2}:[0-9]{2}:[0-9]{2}(\.[0-9]+)?"
    r"([Zz]|[+-][0-9]{2}:[0-9]{2})$"
)

# Checked by Ballot.__post_init__ (the pattern), and by msgspec (the length).
Uuid = Annotated[
    str, Meta(min_length=36, max_length=36, extra_json_schema={"pattern": UUID_PATTERN})
]
VoterId = Annotated[
    str, Meta(min_length=1, max_length=MAX_VOTER_ID, extra_json_schema={"pattern": NO_NUL})
]
Label = Annotated[str, Meta(min_length=1, max_length=MAX_LABEL, pattern=NO_NUL)]
DateTime = Annotated[
    str,
    Meta(max_length=MAX_DATE_TIME, pattern=RFC_3339, extra_json_schema={"format": "date-time"}),
]
_ONE_UUID: Final = re.compile(_UUID)
_UUIDS: Final = re.compile(f"(?:{_UUID})+")


class FieldError(ValueError):
    """A rule of one field that JSON Schema cannot state, broken."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field


def _voter_id(role: str) -> Any:
    return Meta(
        description=f"a string of 1 to {MAX_VOTER_ID} characters without NUL, or null: {role}"
    )


class Ballot(Struct, gc=False):
    """The voter is the voter token's sub when a token comes (on an edge that
    verifies them), else user_id if given, else voter_fingerprint; one of these
    is required. A fingerprint is never the same voter as a user id with the
    same text."""

    poll_id: Annotated[
        Uuid, Meta(description="a UUID (8-4-4-4-12 hexadecimal digits): the poll voted in")
    ]
    option_ids: Annotated[
        tuple[Uuid, ...],
        Meta(
            min_length=1,
            max_length=MAX_OPTIONS,
            description=f"a list of 1 to {MAX_OPTIONS} distinct option ids (UUIDs): "
            "options of this poll, at most the poll's max_choices",
            extra_json_schema={"uniqueItems": True},
        ),
    ]
    user_id: Annotated[VoterId | None, _voter_id("the voter, in the client's words")] = None
    voter_fingerprint: Annotated[
        VoterId | None, _voter_id("the voter, when no user_id or voter token names one")
    ] = None
    vote_id: Annotated[
        Uuid | None,
        Meta(
            description="a UUID or null: the ballot's idempotency key, counted once however "
            "often it is sent; made by the edge when absent or null"
        ),
    ] = None

    def __post_init__(self) -> None:
        options, vote_id = self.option_ids, self.vote_id
        ids = self.poll_id + "".join(options) + (vote_id or "")
        if _UUIDS.fullmatch(ids) is None:
            raise self._not_a_uuid()
        for field, voter in (
            ("user_id", self.user_id),
            ("voter_fingerprint", self.voter_fingerprint),
        ):
            if voter is not None and "\x00" in voter:
                raise FieldError(field, f"{field} must not contain NUL characters")
        # The API's one spelling of a UUID is lower case; either case is read.
        if ids.lower() != ids:
            self.poll_id = self.poll_id.lower()
            options = self.option_ids = tuple(option.lower() for option in options)
            self.vote_id = None if vote_id is None else vote_id.lower()
        if len(set(options)) != len(options):
            raise FieldError("option_ids", "option_ids has duplicates")

    def _not_a_uuid(self) -> FieldError:
        """Which id is not a UUID, the fields in order (each is 36 characters long)."""
        if _ONE_UUID.fullmatch(self.poll_id) is None:
            return FieldError("poll_id", "poll_id must be a UUID (8-4-4-4-12 hexadecimal digits)")
        if any(_ONE_UUID.fullmatch(option) is None for option in self.option_ids):
            return FieldError(
                "option_ids", "each of option_ids must be a UUID (8-4-4-4-12 hexadecimal digits)"
            )
        return FieldError("vote_id", "vote_id must be a UUID (8-4-4-4-12 hexadecimal digits)")


class NewPoll(Struct, gc=False):
    """A poll to create."""

    question: Annotated[
        str,
        Meta(
            min_length=1,
            max_length=MAX_QUESTION,
            pattern=NO_NUL,
            description=f"1 to {MAX_QUESTION} characters, not all white space, without NUL",
        ),
    ]
    options: Annotated[
        tuple[Label, ...],
        Meta(
            min_length=MIN_OPTIONS,
            max_length=MAX_OPTIONS,
            description=f"a list of {MIN_OPTIONS} to {MAX_OPTIONS} distinct labels of 1 to "
            f"{MAX_LABEL} characters, not all white space, without NUL: the options, in order",
            extra_json_schema={"uniqueItems": True},
        ),
    ]
    allow_multiple_votes: Annotated[
        bool,
        Meta(
            description="true or false: with false (the default) each voter has at most one "
            "counted ballot, a later one replaces the earlier; with true every distinct "
            "vote_id counts"
        ),
    ] = False
    max_choices: Annotated[
        int,
        Meta(
            ge=1,
            le=MAX_OPTIONS,
            description="a whole number from 1 to the number of options: the most options "
            "one ballot may name (1 by default)",
        ),
    ] = 1
    expires_at: Annotated[
        DateTime | None,
        Meta(
            description="an RFC 3339 date-time with an offset, in the future, or null: when "
            "the poll stops taking votes (null, the default: never)"
        ),
    ] = None
    require_voter_token: Annotated[
        bool,
        Meta(
            description="true or false: true (on an edge that verifies voter tokens only) "
            "takes only ballots with a voter token; false by default"
        ),
    ] = False

    def __post_init__(self) -> None:
        if not self.question.strip():
            raise FieldError("question", "question must not be blank")
        if any(not label.strip() for label in self.options):
            raise FieldError("options", "a label must not be blank")
        if len(set(self.options)) != len(self.options):
            raise FieldError("options", "labels must be distinct")
        if self.max_choices > len(self.options):
            raise FieldError("max_choices", "max_choices must be at most the number of options")
        self.expiry()  # raises for a date that is none, or past year 9999 in UTC

    def expiry(self) -> datetime | None:
        """expires_at as an instant in UTC."""
        if self.expires_at is None:
            return None
        message = "expires_at must be an RFC 3339 date-time with an offset, or null"
        try:
            # The pattern made sure of the form; fromisoformat finds a day or
            # time that does not exist (February 30th), and takes no "t" or "z".
            return datetime.fromisoformat(self.expires_at.upper()).astimezone(UTC)
        except ValueError:
            raise FieldError("expires_at", message) from None
        except OverflowError:  # after 9999-12-31T23:59:59.999999Z
            raise FieldError(
                "expires_at", "expires_at must be an instant of the years 1 to 9999 in UTC"
            ) from None


REF_TEMPLATE: Final = "#/components/schemas/{name}"


def schemas() -> dict[str, Any]:
    """The request bodies' JSON Schemas, as OpenAPI components by name."""
    _, components = msgspec.json.schema_components((Ballot, NewPoll), ref_template=REF_TEMPLATE)
    for schema in components.values():
        schema.pop("title", None)  # the component's name says it
        schema["description"] = " ".join(schema["description"].split())  # a docstring's lines
    return components


def rules(schema: dict[str, Any]) -> dict[str, str]:
    """Each field's rule, as its 422 states it: its description up to the first ": "."""
    return {
        name: prop["description"].split(": ", 1)[0] for name, prop in schema["properties"].items()
    }
