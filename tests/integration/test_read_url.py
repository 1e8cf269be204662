"""VOTEFLOW_DATABASE_READ_URL: reads that need not be fresh go elsewhere."""

from __future__ import annotations

import dataclasses

from tests.support import create_poll, edge_client
from voteflow.settings import Settings


async def test_the_poll_list_is_read_from_the_read_url_and_the_rest_from_the_primary(
    settings: Settings, other_database_url: str
) -> None:
    # Two databases stand for a primary and a replica that differ (the
    # replica lags): which one a route read shows in what it answers.
    on_replica = dataclasses.replace(settings, database_url=other_database_url)
    async with edge_client(on_replica) as replica_edge:
        seen_on_replica = await create_poll(replica_edge, question="Only on the replica?")
    split = dataclasses.replace(settings, database_read_url=other_database_url)
    async with edge_client(split) as edge:
        written = await create_poll(edge, question="Written to the primary?")
        listed = await (await edge.get("/api/polls")).json()
        assert [p["id"] for p in listed["polls"]] == [seen_on_replica["id"]]
        # A poll itself, and votes, go to the primary: it has the new poll.
        response = await edge.get(f"/api/polls/{written['id']}")
        assert response.status == 200
        vote = {
            "poll_id": written["id"],
            "option_ids": [written["options"][0]["id"]],
            "voter_fingerprint": "reader",
        }
        assert (await edge.post("/api/vote", json=vote)).status == 202
