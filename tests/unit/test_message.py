"""The vote message a stream entry holds: what the edge writes, a worker reads
back unchanged, and anything else is refused per message, never per batch."""

from __future__ import annotations

import uuid
from dataclasses import replace
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from voteflow.message import FORMAT, MessageError, Vote, decode, voter_key

ids = st.uuids().map(str)
voters = st.one_of(
    st.text(min_size=1, max_size=128).filter(lambda t: "\x00" not in t).map(lambda t: f"u:{t}"),
    st.text(min_size=1, max_size=128).filter(lambda t: "\x00" not in t).map(lambda t: f"f:{t}"),
)
votes = st.builds(
    Vote,
    vote_id=ids,
    poll_id=ids,
    voter=voters,
    option_ids=st.lists(ids, min_size=1, max_size=64, unique=True).map(tuple),
    received_us=st.integers(min_value=0, max_value=2**62),
)


def _vote(**changes: Any) -> Vote:
    vote = Vote(
        vote_id=str(uuid.uuid4()),
        poll_id=str(uuid.uuid4()),
        voter="f:phone-1",
        option_ids=(str(uuid.uuid4()), str(uuid.uuid4())),
        received_us=1_700_000_000_000_000,
    )
    return replace(vote, **changes)


@given(votes)
def test_a_worker_reads_back_exactly_the_vote_the_edge_wrote(vote: Vote) -> None:
    assert decode(vote.encode()) == vote


@given(votes, st.data())
def test_a_retry_has_the_same_digest_whatever_the_order_of_its_options(
    vote: Vote, data: st.DataObject
) -> None:
    shuffled = data.draw(st.permutations(vote.option_ids))
    assert replace(vote, option_ids=tuple(shuffled)).digest() == vote.digest()


def test_another_ballot_under_the_same_vote_id_has_another_digest() -> None:
    vote = _vote()
    assert replace(vote, poll_id=str(uuid.uuid4())).digest() != vote.digest()
    assert replace(vote, voter="f:phone-2").digest() != vote.digest()
    assert replace(vote, option_ids=vote.option_ids[:1]).digest() != vote.digest()
    # Not the vote_id or the time: a retry repeats the ballot, not the moment.
    assert replace(vote, received_us=1).digest() == vote.digest()


@given(voters, st.integers(min_value=1, max_value=1024))
def test_one_voter_s_ballots_always_go_to_one_shard(voter: str, shards: int) -> None:
    shard = _vote(voter=voter).shard(shards)
    assert 0 <= shard < shards
    assert _vote(voter=voter).shard(shards) == shard


def test_the_voters_of_one_hot_poll_spread_over_every_shard() -> None:
    poll = str(uuid.uuid4())
    counts = [0] * 8
    for n in range(8000):
        counts[_vote(poll_id=poll, voter=f"f:phone-{n}").shard(8)] += 1
    assert min(counts) > 800, counts  # 1,000 each on average


def test_a_user_id_never_poses_as_a_fingerprint_of_the_same_text() -> None:
    assert voter_key("alice", None) == "u:alice"
    assert voter_key(None, "alice") == "f:alice"
    assert voter_key("alice", "bob") == "u:alice"  # a user id names the voter


def _raw(**changes: object) -> bytes:
    message = orjson.loads(_vote().encode()) | changes
    return orjson.dumps({k: v for k, v in message.items() if v is not ...})


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"{not json", "not JSON"),
        (b"[1, 2]", "not a JSON object"),
        (_raw(f=FORMAT + 1), "unknown message format 2"),
        (_raw(f=...), "unknown message format None"),
        (_raw(u=...), "missing member 'u'"),
        (_raw(t="soon"), "wrong type"),
        (_raw(o="one-option"), "wrong type"),
        (_raw(o=[1]), "wrong type"),
        (_raw(p=str(uuid.uuid4()).upper()), "not a canonical UUID"),
        (_raw(id="{" + str(uuid.uuid4()) + "}"), "not a canonical UUID"),
        (_raw(u="f:a\x00b"), "NUL"),
    ],
)
def test_an_entry_that_is_not_a_vote_message_is_refused_saying_why(raw: bytes, why: str) -> None:
    with pytest.raises(MessageError, match=why):
        decode(raw)
