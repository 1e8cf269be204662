"""cast_vote_atomic and the schema functions, against a real PostgreSQL.

Each test gets a brand-new migrated database (the ``database_url`` fixture).
Every tally a test looks at goes through :func:`tallies`, which first checks
that the live tallies and counters equal a recount from the votes table.
"""

from __future__ import annotations

import asyncio
import itertools
import random
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from voteflow.timeutil import to_us

# received_us values: microseconds since the Unix epoch (2023-11-14).
T0 = 1_700_000_000_000_000
SECOND = 1_000_000

# A vote_in as asyncpg takes it: (vote_id, poll_id, voter, option_ids, received_us).
Vote = tuple[Any, Any, Any, Any, Any]


@dataclass(frozen=True)
class Poll:
    id: str
    options: list[str]  # in position order


@dataclass(frozen=True)
class TallyRow:
    version: int
    total_ballots: int
    votes: list[int]  # in position order
    option_ids: list[str]


@dataclass(frozen=True)
class Cast:
    outcomes: list[str]  # one per input vote, in input order
    tallies: dict[str, TallyRow]  # by poll id


async def create_poll(
    db: asyncpg.Connection,
    n_options: int = 4,
    *,
    multiple: bool = False,
    max_choices: int = 1,
    expires_at: datetime | None = None,
) -> Poll:
    labels = [f"option {i}" for i in range(1, n_options + 1)]
    poll_id = await db.fetchval(
        "SELECT create_poll($1, $2, $3, $4, $5)",
        "Which one?",
        labels,
        multiple,
        max_choices,
        expires_at,
    )
    rows = await db.fetch("SELECT id FROM options WHERE poll_id = $1 ORDER BY position", poll_id)
    return Poll(str(poll_id), [str(row["id"]) for row in rows])


def ballot(
    poll: Poll,
    voter: str,
    positions: Sequence[int],
    received_us: int,
    vote_id: str | None = None,
) -> Vote:
    """A vote for the options at ``positions`` (0-based) of ``poll``."""
    return (
        vote_id or str(uuid.uuid4()),
        poll.id,
        voter,
        [poll.options[p] for p in positions],
        received_us,
    )


async def cast(db: asyncpg.Connection, votes: Sequence[Vote]) -> Cast:
    rows = await db.fetch("SELECT * FROM cast_vote_atomic($1::vote_in[])", list(votes))
    vote_rows = [row for row in rows if row["outcome"] != "tally"]
    tally_rows = [row for row in rows if row["outcome"] == "tally"]
    # Vote rows first, in input order; then one tally row per poll.
    assert rows[: len(vote_rows)] == vote_rows
    assert [str(row["vote_id"]) for row in vote_rows] == [str(v[0]) for v in votes]
    assert [str(row["poll_id"]) for row in vote_rows] == [str(v[1]) for v in votes]
    for row in vote_rows:
        assert row["version"] is row["total_ballots"] is row["option_ids"] is None
    for row in tally_rows:
        assert row["vote_id"] is None
    return Cast(
        [row["outcome"] for row in vote_rows],
        {
            str(row["poll_id"]): TallyRow(
                row["version"],
                row["total_ballots"],
                list(row["votes"]),
                [str(o) for o in row["option_ids"]],
            )
            for row in tally_rows
        },
    )


async def tallies(db: asyncpg.Connection, poll: Poll) -> TallyRow:
    """The poll's live tallies, after checking them against a recount."""
    counters = await db.fetchrow(
        "SELECT version, total_ballots FROM poll_counters WHERE poll_id = $1", poll.id
    )
    live = {
        str(row["option_id"]): row["votes"]
        for row in await db.fetch(
            "SELECT option_id, votes FROM tallies WHERE poll_id = $1", poll.id
        )
    }
    recount = [
        (str(row["option_id"]), row["votes"])
        for row in await db.fetch("SELECT * FROM poll_recount($1)", poll.id)
    ]
    assert recount == [(o, live[o]) for o in poll.options]
    assert counters["total_ballots"] == await db.fetchval(
        "SELECT poll_recount_ballots($1)", poll.id
    )
    # Single-vote polls: the counted votes are exactly the voters' current ballots.
    if not await db.fetchval("SELECT allow_multiple_votes FROM polls WHERE id = $1", poll.id):
        current = await db.fetch(
            "SELECT vote_id, voter, option_ids FROM voter_ballots WHERE poll_id = $1", poll.id
        )
        counted = await db.fetch(
            "SELECT vote_id, voter, option_ids FROM votes WHERE poll_id = $1 AND counted",
            poll.id,
        )
        assert sorted(map(tuple, current)) == sorted(map(tuple, counted))
    return TallyRow(
        counters["version"],
        counters["total_ballots"],
        [live[o] for o in poll.options],
        poll.options,
    )


async def recorded(db: asyncpg.Connection, poll: Poll) -> dict[str, bool]:
    """vote_id -> counted, for every vote recorded for the poll."""
    rows = await db.fetch("SELECT vote_id, counted FROM votes WHERE poll_id = $1", poll.id)
    return {str(row["vote_id"]): row["counted"] for row in rows}


def predict(votes: Iterable[Vote], *, single: bool, options: list[str]) -> tuple[list[int], int]:
    """The tallies (in option order) and total ballots the vote rules of docs/guarantees.md give.

    Independent of the SQL: the first copy of each vote_id stands (rule 3); in
    a single-vote poll only each voter's greatest (received_at, vote_id)
    counts (rule 1), in a multiple-vote poll every vote counts (rule 2); a
    ballot adds one to each of its options (rule 4).
    """
    first: dict[str, Vote] = {}
    for vote in votes:
        first.setdefault(str(vote[0]), vote)
    if single:
        # PostgreSQL orders uuids by their bytes, as UUID.int does.
        latest: dict[str, Vote] = {}
        for vote in first.values():
            key = (vote[4], uuid.UUID(str(vote[0])).int)
            held = latest.get(vote[2])
            if held is None or key > (held[4], uuid.UUID(str(held[0])).int):
                latest[vote[2]] = vote
        counted = list(latest.values())
    else:
        counted = list(first.values())
    counts = dict.fromkeys(options, 0)
    for vote in counted:
        for option in vote[3]:
            counts[option] += 1
    return [counts[o] for o in options], len(counted)


# -- Rule 4 and the shape of the result ------------------------------------


async def test_ballot_adds_one_to_each_of_its_options(db: asyncpg.Connection) -> None:
    poll = await create_poll(db, 4, max_choices=3)
    result = await cast(
        db,
        [ballot(poll, "u:ann", [0, 2], T0), ballot(poll, "u:bob", [0, 1, 3], T0 + 1)],
    )
    assert result.outcomes == ["counted", "counted"]
    expected = TallyRow(1, 2, [2, 1, 1, 1], poll.options)
    assert result.tallies == {poll.id: expected}
    assert await tallies(db, poll) == expected


async def test_total_ballots_counts_ballots_not_options(db: asyncpg.Connection) -> None:
    poll = await create_poll(db, 3, max_choices=2)
    await cast(db, [ballot(poll, "u:ann", [0, 1], T0)])
    # ann's new ballot takes an option away, bob's adds it back: the option
    # counts end where they were, but there is one more ballot.
    result = await cast(
        db, [ballot(poll, "u:ann", [1], T0 + 1), ballot(poll, "u:bob", [0], T0 + 2)]
    )
    assert result.outcomes == ["counted", "counted"]
    assert result.tallies[poll.id] == TallyRow(2, 2, [1, 1, 0], poll.options)
    assert await tallies(db, poll) == result.tallies[poll.id]


async def test_empty_batch_returns_nothing(db: asyncpg.Connection) -> None:
    assert await db.fetch("SELECT * FROM cast_vote_atomic($1::vote_in[])", []) == []


async def test_received_us_is_converted_exactly(db: asyncpg.Connection) -> None:
    poll = await create_poll(db)
    received_us = 1_754_321_987_654_321
    vote = ballot(poll, "u:ann", [0], received_us)
    await cast(db, [vote])
    received_at = await db.fetchval(
        "SELECT received_at FROM votes WHERE vote_id = $1", uuid.UUID(vote[0])
    )
    assert received_at == datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=received_us)


# -- Rule 1: single-vote polls ---------------------------------------------


async def test_later_ballot_replaces_earlier_and_moves_tallies(db: asyncpg.Connection) -> None:
    poll = await create_poll(db, 4, max_choices=2)
    first = ballot(poll, "u:ann", [0, 1], T0)
    bob = ballot(poll, "u:bob", [1], T0 + 5)
    await cast(db, [first, bob])
    assert (await tallies(db, poll)).votes == [1, 2, 0, 0]

    later = ballot(poll, "u:ann", [2], T0 + SECOND)
    result = await cast(db, [later])
    assert result.outcomes == ["counted"]
    assert result.tallies[poll.id] == TallyRow(2, 2, [0, 1, 1, 0], poll.options)
    assert await tallies(db, poll) == result.tallies[poll.id]
    # Both of ann's ballots stay recorded; only the later one counts.
    assert await recorded(db, poll) == {first[0]: False, later[0]: True, bob[0]: True}


async def test_later_ballot_in_same_batch_replaces_earlier(db: asyncpg.Connection) -> None:
    poll = await create_poll(db)
    early, middle, late = (ballot(poll, "u:ann", [i], T0 + i) for i in range(3))
    # Input order is not time order: received_at decides.
    result = await cast(db, [late, early, middle])
    assert result.outcomes == ["counted", "replaced", "replaced"]
    assert (await tallies(db, poll)).votes == [0, 0, 1, 0]
    assert await recorded(db, poll) == {late[0]: True, early[0]: False, middle[0]: False}


async def test_earlier_ballot_committed_after_later_one_is_replaced(
    db: asyncpg.Connection,
) -> None:
    poll = await create_poll(db)
    later = ballot(poll, "u:ann", [1], T0 + SECOND)
    earlier = ballot(poll, "u:ann", [0], T0)
    await cast(db, [later])
    result = await cast(db, [earlier])
    assert result.outcomes == ["replaced"]
    assert result.tallies[poll.id] == TallyRow(1, 1, [0, 1, 0, 0], poll.options)
    assert await recorded(db, poll) == {later[0]: True, earlier[0]: False}


async def test_late_replay_of_replaced_ballot_does_not_count(db: asyncpg.Connection) -> None:
    poll = await create_poll(db)
    earlier = ballot(poll, "u:ann", [0], T0)
    later = ballot(poll, "u:ann", [1], T0 + SECOND)
    await cast(db, [earlier])
    await cast(db, [later])
    # The first batch is delivered again after ann replaced her ballot.
    result = await cast(db, [earlier])
    assert result.outcomes == ["duplicate"]
    assert result.tallies[poll.id] == TallyRow(2, 1, [0, 1, 0, 0], poll.options)
    assert await tallies(db, poll) == result.tallies[poll.id]
    assert await recorded(db, poll) == {earlier[0]: False, later[0]: True}


async def test_resent_ballot_does_not_hide_a_later_one_in_the_same_batch(
    db: asyncpg.Connection,
) -> None:
    poll = await create_poll(db)
    first = ballot(poll, "u:ann", [0], T0)
    await cast(db, [first])
    # ann votes again, then her client resends the first vote_id, which the
    # edge stamped later: both reach the workers in one batch.
    later = ballot(poll, "u:ann", [1], T0 + SECOND)
    resent = ballot(poll, "u:ann", [0], T0 + 2 * SECOND, vote_id=first[0])
    result = await cast(db, [later, resent])
    assert result.outcomes == ["counted", "duplicate"]
    assert await tallies(db, poll) == TallyRow(2, 1, [0, 1, 0, 0], poll.options)
    assert await recorded(db, poll) == {first[0]: False, later[0]: True}


async def test_equal_received_at_is_decided_by_vote_id_order(db: asyncpg.Connection) -> None:
    ids = sorted((uuid.uuid4() for _ in range(2)), key=lambda u: u.int)
    low, high = str(ids[0]), str(ids[1])
    for order in ((low, high), (high, low)):
        poll = await create_poll(db)
        votes = {
            low: ballot(poll, "u:ann", [0], T0, vote_id=low),
            high: ballot(poll, "u:ann", [1], T0, vote_id=high),
        }
        for vote_id in order:  # one batch each, in this order
            await cast(db, [votes[vote_id]])
        assert (await tallies(db, poll)).votes == [0, 1, 0, 0]
        # and both in one batch, in this order
        poll = await create_poll(db)
        result = await cast(
            db,
            [ballot(poll, "u:ann", [0 if v == low else 1], T0, vote_id=v) for v in order],
        )
        assert result.outcomes == (
            ["replaced", "counted"] if order[0] == low else ["counted", "replaced"]
        )
        assert (await tallies(db, poll)).votes == [0, 1, 0, 0]


async def test_result_is_independent_of_commit_order(db: asyncpg.Connection) -> None:
    rng = random.Random(20240601)
    # Ballots as (vote_id, voter, option positions, received_us), shared by all
    # the polls below so that every poll sees the same ballots.
    voters = [f"u:{n}" for n in range(6)]
    plan = [
        (
            str(uuid.uuid4()),
            rng.choice(voters),
            rng.sample(range(4), rng.randint(1, 2)),
            T0 + rng.randrange(8),
        )  # few distinct instants: ties on received_at
        for _ in range(40)
    ]
    plan += [plan[3], plan[17]]  # redelivered
    batches = [plan[i::4] for i in range(4)]
    for multiple in (False, True):
        finals = set()
        for order in itertools.permutations(range(4)):
            poll = await create_poll(db, 4, multiple=multiple, max_choices=2)
            for index in order:
                votes = [ballot(poll, v, p, t, vote_id=i) for i, v, p, t in batches[index]]
                await cast(db, votes)
            final = await tallies(db, poll)
            current = await db.fetch(
                "SELECT voter, vote_id FROM voter_ballots WHERE poll_id = $1 ORDER BY voter",
                poll.id,
            )
            finals.add((tuple(final.votes), final.total_ballots, tuple(map(tuple, current))))
            expected = predict(
                [ballot(poll, v, p, t, vote_id=i) for i, v, p, t in plan],
                single=not multiple,
                options=poll.options,
            )
            assert (final.votes, final.total_ballots) == expected
        assert len(finals) == 1


# -- Rules 2 and 3 ------------------------------------------------------------


async def test_multiple_vote_poll_counts_every_distinct_vote(db: asyncpg.Connection) -> None:
    poll = await create_poll(db, 3, multiple=True, max_choices=2)
    result = await cast(
        db,
        [
            ballot(poll, "u:ann", [0], T0 + 2),
            ballot(poll, "u:ann", [0, 1], T0 + 1),
            ballot(poll, "u:bob", [2], T0),
        ],
    )
    assert result.outcomes == ["counted"] * 3
    result = await cast(db, [ballot(poll, "u:ann", [0], T0)])  # earlier, still counts
    assert result.outcomes == ["counted"]
    assert await tallies(db, poll) == TallyRow(2, 4, [3, 1, 1], poll.options)


async def test_same_vote_id_twice_counts_once_single_and_multi(db: asyncpg.Connection) -> None:
    for multiple in (False, True):
        poll = await create_poll(db, multiple=multiple)
        vote = ballot(poll, "u:ann", [0], T0)
        other = ballot(poll, "u:bob", [1], T0)
        # Twice in one batch: the first counts.
        result = await cast(db, [vote, other, vote])
        assert result.outcomes == ["counted", "counted", "duplicate"]
        # Again in a later batch, even with other content: changes nothing.
        result = await cast(db, [vote, (vote[0], poll.id, "u:ann", [poll.options[2]], T0 + 9)])
        assert result.outcomes == ["duplicate", "duplicate"]
        assert await tallies(db, poll) == TallyRow(1, 2, [1, 1, 0, 0], poll.options)
        assert await db.fetchval("SELECT count(*) FROM votes WHERE poll_id = $1", poll.id) == 2


async def test_same_vote_id_in_another_poll_is_another_vote(db: asyncpg.Connection) -> None:
    one, two = await create_poll(db), await create_poll(db)
    vote_id = str(uuid.uuid4())
    result = await cast(
        db,
        [
            ballot(one, "u:ann", [0], T0, vote_id=vote_id),
            ballot(two, "u:ann", [1], T0, vote_id=vote_id),
        ],
    )
    assert result.outcomes == ["counted", "counted"]
    assert (await tallies(db, one)).votes == [1, 0, 0, 0]
    assert (await tallies(db, two)).votes == [0, 1, 0, 0]


# -- Closing and expiry --------------------------------------------------------


async def close_now(db: asyncpg.Connection, poll: Any) -> int:
    """Close the poll now; returns its close time in microseconds."""
    assert await db.fetchval("SELECT close_poll($1, now())", poll.id) is True
    return to_us(await db.fetchval("SELECT closed_at FROM polls WHERE id = $1", poll.id))


async def test_vote_received_before_close_counts_after_close(db: asyncpg.Connection) -> None:
    poll = await create_poll(db)
    closed_us = await close_now(db, poll)
    # Received before the close (and exactly at it), written after it.
    result = await cast(
        db,
        [ballot(poll, "u:ann", [0], closed_us - SECOND), ballot(poll, "u:bob", [1], closed_us)],
    )
    assert result.outcomes == ["counted", "counted"]
    assert await tallies(db, poll) == TallyRow(1, 2, [1, 1, 0, 0], poll.options)


async def test_vote_received_after_close_is_recorded_not_counted(db: asyncpg.Connection) -> None:
    poll = await create_poll(db)
    before = ballot(poll, "u:ann", [0], T0)
    await cast(db, [before])
    closed_us = await close_now(db, poll)
    # ann's later ballot does not replace her counted one; carl is not counted.
    late = [
        ballot(poll, "u:ann", [1], closed_us + 1),
        ballot(poll, "u:carl", [2], closed_us + SECOND),
    ]
    result = await cast(db, late)
    assert result.outcomes == ["closed", "closed"]
    assert result.tallies[poll.id] == TallyRow(1, 1, [1, 0, 0, 0], poll.options)
    assert await tallies(db, poll) == result.tallies[poll.id]
    assert await recorded(db, poll) == {before[0]: True, late[0][0]: False, late[1][0]: False}
    assert (await cast(db, late)).outcomes == ["duplicate", "duplicate"]


async def test_close_waits_for_batches_in_flight_and_takes_effect_after_them(
    db: asyncpg.Connection, database_url: str
) -> None:
    """A batch that read the poll open commits first; the close time is then
    no earlier than that commit, so every vote it counted was received before."""
    poll = await create_poll(db)
    other = await asyncpg.connect(database_url)
    try:
        async with db.transaction():
            in_flight = await cast(db, [ballot(poll, "u:ann", [0], to_us(datetime.now(UTC)))])
            assert in_flight.outcomes == ["counted"]
            closing = asyncio.ensure_future(
                other.fetchval("SELECT close_poll($1, $2)", poll.id, datetime.now(UTC))
            )
            await asyncio.sleep(0.3)
            assert not closing.done()  # waiting for the batch to commit
            committed_before = await db.fetchval("SELECT clock_timestamp()")
        assert await asyncio.wait_for(closing, 10) is True
    finally:
        await other.close()
    closed_at = await db.fetchval("SELECT closed_at FROM polls WHERE id = $1", poll.id)
    assert closed_at >= committed_before


async def test_vote_received_at_or_after_expiry_is_not_counted(db: asyncpg.Connection) -> None:
    expires_at = datetime(1970, 1, 1, tzinfo=UTC) + timedelta(microseconds=T0 + SECOND)
    for multiple in (False, True):
        poll = await create_poll(db, multiple=multiple, expires_at=expires_at)
        result = await cast(
            db,
            [
                ballot(poll, "u:ann", [0], T0 + SECOND - 1),
                ballot(poll, "u:bob", [1], T0 + SECOND),
                ballot(poll, "u:ann", [2], T0 + 3 * SECOND),
            ],
        )
        assert result.outcomes == ["counted", "closed", "closed"]
        assert await tallies(db, poll) == TallyRow(1, 1, [1, 0, 0, 0], poll.options)
        assert len(await recorded(db, poll)) == 3


async def test_close_poll_keeps_the_first_close_time(db: asyncpg.Connection) -> None:
    poll = await create_poll(db)
    first = await close_now(db, poll)
    later = datetime.now(UTC) + timedelta(hours=1)
    assert await db.fetchval("SELECT close_poll($1, $2)", poll.id, later) is True
    closed_at = await db.fetchval("SELECT closed_at FROM polls WHERE id = $1", poll.id)
    assert to_us(closed_at) == first
    assert await db.fetchval("SELECT close_poll($1, now())", uuid.uuid4()) is False


# -- Rejected votes ------------------------------------------------------------


async def test_invalid_ballots_are_rejected_and_record_nothing(db: asyncpg.Connection) -> None:
    poll = await create_poll(db, 3, max_choices=2)
    other = await create_poll(db, 3, max_choices=2)
    a, b, c = poll.options

    def vote(voter: Any, option_ids: Any, received_us: Any = T0) -> Vote:
        return (str(uuid.uuid4()), poll.id, voter, option_ids, received_us)

    invalid = {
        "no options": vote("u:ann", []),
        "null options": vote("u:ann", None),
        "null option": vote("u:ann", [a, None]),
        "repeated option": vote("u:ann", [a, a]),
        "another poll's option": vote("u:ann", [a, other.options[1]]),
        "unknown option": vote("u:ann", [str(uuid.uuid4())]),
        "more than max_choices": vote("u:ann", [a, b, c]),
        "null voter": vote(None, [a]),
        "empty voter": vote("", [a]),
        "voter of 131 characters": vote("u:" + "x" * 129, [a]),
        "null received_us": vote("u:ann", [a], None),
        "negative received_us": vote("u:ann", [a], -1),
        "received_us past year 9999": vote("u:ann", [a], 10**18),
        "null vote_id": (None, poll.id, "u:ann", [a], T0),
    }
    valid = vote("u:" + "x" * 128, [b, a])  # "u:" and a 128-character id, 2 options: fine
    result = await cast(db, [*invalid.values(), valid])
    assert dict(zip(invalid, result.outcomes, strict=False)) == dict.fromkeys(invalid, "invalid")
    assert result.outcomes[-1] == "counted"
    assert await recorded(db, poll) == {valid[0]: True}
    assert await db.fetchval("SELECT count(*) FROM voter_ballots") == 1
    assert await tallies(db, poll) == TallyRow(1, 1, [1, 1, 0], poll.options)

    # A batch of invalid votes only: nothing changes, the tallies still come back.
    result = await cast(db, list(invalid.values())[:3])
    assert result.outcomes == ["invalid"] * 3
    assert result.tallies == {poll.id: TallyRow(1, 1, [1, 1, 0], poll.options)}


async def test_unknown_poll(db: asyncpg.Connection) -> None:
    poll = await create_poll(db)
    missing = str(uuid.uuid4())
    stray = (str(uuid.uuid4()), missing, "u:ann", [poll.options[0]], T0)
    result = await cast(db, [stray, ballot(poll, "u:ann", [0], T0)])
    assert result.outcomes == ["unknown_poll", "counted"]
    assert set(result.tallies) == {poll.id}  # no tally row for a poll that does not exist
    assert await db.fetchval("SELECT count(*) FROM votes WHERE poll_id = $1", missing) == 0
    assert (await cast(db, [stray])).tallies == {}
    assert await tallies(db, poll) == TallyRow(1, 1, [1, 0, 0, 0], poll.options)


# -- Rule 5: version -----------------------------------------------------------


async def test_version_increases_only_when_tallies_change(db: asyncpg.Connection) -> None:
    poll = await create_poll(db)
    assert (await tallies(db, poll)).version == 0

    async def version_after(votes: list[Vote]) -> int:
        result = await cast(db, votes)
        assert result.tallies[poll.id] == await tallies(db, poll)
        return result.tallies[poll.id].version

    first = [ballot(poll, "u:ann", [0], T0), ballot(poll, "u:bob", [0], T0)]
    assert await version_after(first) == 1  # one batch, one version
    assert await version_after(first) == 1  # redelivered: nothing changes
    assert await version_after([ballot(poll, "u:ann", [0], T0 - 1)]) == 1  # replaced on arrival
    assert await version_after([ballot(poll, "u:ann", [0], T0 + 1)]) == 1  # same option again
    assert await version_after([(str(uuid.uuid4()), poll.id, "", [poll.options[0]], T0)]) == 1
    assert await version_after([ballot(poll, "u:ann", [1], T0 + 2)]) == 2  # moved
    assert await version_after([ballot(poll, "u:carl", [3], T0)]) == 3  # new ballot
    assert (await tallies(db, poll)).votes == [1, 1, 0, 1]


async def test_tally_rows_cover_every_named_poll(db: asyncpg.Connection) -> None:
    one, two = await create_poll(db), await create_poll(db, 2, multiple=True)
    await cast(db, [ballot(one, "u:ann", [0], T0)])
    # two is named only by an invalid vote: its (unchanged) tallies come back too.
    result = await cast(
        db, [ballot(one, "u:bob", [1], T0), (str(uuid.uuid4()), two.id, "u:x", [], T0)]
    )
    assert result.tallies == {
        one.id: TallyRow(2, 2, [1, 1, 0, 0], one.options),
        two.id: TallyRow(0, 0, [0, 0], two.options),
    }


# -- create_poll ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("question", "labels", "max_choices"),
    [
        ("", ["a", "b"], 1),
        ("q" * 501, ["a", "b"], 1),
        ("Which?", ["a"], 1),
        ("Which?", [f"o{i}" for i in range(65)], 1),
        ("Which?", ["a", ""], 1),
        ("Which?", ["a", "b" * 201], 1),
        ("Which?", ["a", None], 1),
        ("Which?", ["a", "b"], 0),
        ("Which?", ["a", "b"], 3),
    ],
)
async def test_create_poll_rejects_bad_input(
    db: asyncpg.Connection, question: str, labels: list[str | None], max_choices: int
) -> None:
    with pytest.raises(asyncpg.InvalidParameterValueError):
        await db.fetchval(
            "SELECT create_poll($1, $2, false, $3, NULL)", question, labels, max_choices
        )
    assert await db.fetchval("SELECT count(*) FROM polls") == 0


async def test_create_poll_creates_options_tallies_and_counters(db: asyncpg.Connection) -> None:
    poll = await create_poll(db, 64, multiple=True, max_choices=64)
    labels = [
        row["label"]
        for row in await db.fetch(
            "SELECT label FROM options WHERE poll_id = $1 ORDER BY position", poll.id
        )
    ]
    assert labels == [f"option {i}" for i in range(1, 65)]
    assert await tallies(db, poll) == TallyRow(0, 0, [0] * 64, poll.options)


# -- Concurrency -----------------------------------------------------------------


async def test_concurrent_batches_on_same_voters_never_deadlock_or_double_count(
    database_url: str, db: asyncpg.Connection
) -> None:
    rng = random.Random(7)
    hot = await create_poll(db, 4, max_choices=2)
    single = await create_poll(db, 3)
    multi = await create_poll(db, 4, multiple=True, max_choices=2)
    polls = [hot, hot, hot, single, multi]
    voters = [f"u:{n}" for n in range(40)]
    pool: list[Vote] = []
    rounds = 40
    for _ in range(100 * rounds):
        poll = rng.choice(polls)
        positions = rng.sample(range(len(poll.options)), rng.randint(1, min(2, len(poll.options))))
        if poll is single:
            positions = positions[:1]
        # Few distinct instants, so that ties on received_at happen.
        pool.append(ballot(poll, rng.choice(voters), positions, T0 + rng.randrange(300)))

    workers = [await asyncpg.connect(database_url) for _ in range(6)]
    sent: list[Vote] = []
    outcomes: dict[str, list[str]] = {}
    published: dict[tuple[str, int], TallyRow] = {}
    try:
        for round_ in range(rounds):
            # Each round draws from a growing window of the pool, so batches
            # overlap in voters and in vote_ids (redeliveries) across workers.
            window = pool[: 100 * (round_ + 1)]
            batches = []
            for _ in workers:
                batch = rng.sample(window, min(len(window), 120))
                batch += rng.sample(batch, 5)  # repeats within the batch
                rng.shuffle(batch)
                batches.append(batch)
            # A message redelivered while its first delivery is in flight.
            batches[1] = rng.sample(batches[0], len(batches[0]))
            results = await asyncio.gather(
                *(cast(worker, batch) for worker, batch in zip(workers, batches, strict=True))
            )
            for batch, result in zip(batches, results, strict=True):
                sent += batch
                for vote, outcome in zip(batch, result.outcomes, strict=True):
                    outcomes.setdefault(vote[0], []).append(outcome)
                for poll_id, row in result.tallies.items():
                    # One version is one state of the tallies.
                    assert published.setdefault((poll_id, row.version), row) == row
    finally:
        for worker in workers:
            await worker.close()

    # Each vote was recorded exactly once, by one of its deliveries.
    for vote_id, seen in outcomes.items():
        assert len(seen) - seen.count("duplicate") == 1, (vote_id, seen)
        assert set(seen) <= {"counted", "replaced", "duplicate"}
    assert await db.fetchval("SELECT count(*) FROM votes") == len(outcomes)
    for poll in (hot, single, multi):
        final = await tallies(db, poll)
        assert (final.votes, final.total_ballots) == predict(
            [v for v in sent if v[1] == poll.id],
            single=poll is not multi,
            options=poll.options,
        )
        assert final.version == max(version for p, version in published if p == poll.id)
