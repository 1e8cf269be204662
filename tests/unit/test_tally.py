"""A poll's tally as the workers publish it and the edges serve it."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from voteflow.tally import Tally, decode

tallies = st.builds(
    Tally,
    poll_id=st.uuids().map(str),
    version=st.integers(min_value=0, max_value=2**62),
    total_ballots=st.integers(min_value=0, max_value=2**62),
    votes=st.dictionaries(st.uuids().map(str), st.integers(min_value=0, max_value=2**62)),
    as_of_us=st.integers(min_value=0, max_value=2**62),
)


@given(tallies)
def test_an_edge_reads_back_the_tally_a_worker_published(tally: Tally) -> None:
    assert decode(tally.encode()) == tally
    assert decode(tally.encode().decode()) == tally


def test_results_list_every_option_in_the_poll_s_order_with_zero_for_no_votes() -> None:
    tally = Tally("p", version=7, total_ballots=3, votes={"b": 2, "a": 1}, as_of_us=1_500_000)
    results = tally.results({"a": "Pizza", "b": "Salad", "c": "Soup"})
    assert results["options"] == [
        {"id": "a", "label": "Pizza", "votes": 1},
        {"id": "b", "label": "Salad", "votes": 2},
        {"id": "c", "label": "Soup", "votes": 0},
    ]
    assert (results["poll_id"], results["version"], results["total_ballots"]) == ("p", 7, 3)
    assert results["as_of"].isoformat() == "1970-01-01T00:00:01.500000+00:00"
