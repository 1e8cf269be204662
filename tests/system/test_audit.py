"""`voteflow audit` on a live deployment: consistent, tampered with, and backed up."""

from __future__ import annotations

import asyncio
import io
import os
import sys
from dataclasses import dataclass, replace
from typing import Any

import asyncpg
import orjson
import pytest
import redis.asyncio as aioredis
from aiohttp.test_utils import TestClient

from tests.support import REPO, InProcessWorker, create_poll, drain, pause
from voteflow import audit
from voteflow.cli import main as cli_main
from voteflow.keys import GROUP, Keys
from voteflow.message import FIELD
from voteflow.servers import free_port
from voteflow.settings import Settings
from voteflow.tally import SNAPSHOT_TALLY, SNAPSHOT_VERSION, Tally, decode

Client = TestClient[Any, Any]


@dataclass
class Deployment:
    """Two polls with votes drained into PostgreSQL; ``ballots`` maps a name
    to a vote_id: ``first`` and ``second`` are one voter's two ballots for the
    same option of the single-vote poll (the second replaced the first),
    ``replaced`` a ballot replaced by one for another option."""

    single: dict[str, Any]
    multiple: dict[str, Any]
    ballots: dict[str, str]


async def cast(client: Client, poll: dict[str, Any], option: int, voter: str) -> str:
    body = {
        "poll_id": poll["id"],
        "option_ids": [poll["options"][option]["id"]],
        "voter_fingerprint": voter,
    }
    response = await client.post("/api/vote", json=body)
    assert response.status == 202, await response.text()
    vote_id: str = (await response.json())["vote_id"]
    return vote_id


async def deploy(edge: Client, redis_client: aioredis.Redis, settings: Settings) -> Deployment:
    single = await create_poll(edge)
    multiple = await create_poll(edge, allow_multiple_votes=True)
    ballots = {
        "replaced": await cast(edge, single, 0, "alice"),
        "first": await cast(edge, single, 2, "carol"),
    }
    # Each one after the one it replaces was answered: received later.
    await cast(edge, single, 1, "alice")
    ballots["second"] = await cast(edge, single, 2, "carol")
    await cast(edge, single, 1, "bob")
    for option in (0, 0, 1):
        await cast(edge, multiple, option, "alice")
    await drain(redis_client, settings)
    return Deployment(single, multiple, ballots)


async def run_audit(settings: Settings, *args: str) -> tuple[int, str, str]:
    """The audit in this process: its exit status, output and error output."""
    out, err = io.StringIO(), io.StringIO()
    poll = args[args.index("--poll") + 1] if "--poll" in args else None
    status = await audit.run(settings, poll_id=poll, as_json="--json" in args, out=out, err=err)
    return status, out.getvalue(), err.getvalue()


async def execute(database_url: str, query: str, *params: Any) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(query, *params)
    finally:
        await conn.close()


def problem_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("poll ")]


async def test_drained_deployment_is_consistent(
    edge: Client, worker: InProcessWorker, redis_client: aioredis.Redis, settings: Settings
) -> None:
    await deploy(edge, redis_client, settings)
    status, output, errors = await run_audit(settings)
    assert (status, errors) == (audit.OK, "")
    assert problem_lines(output) == []
    summary = output.splitlines()[-1]
    assert "audit: consistent: 2 polls checked, 0 mismatched, 0 stale snapshots" in summary
    assert "dead letters 0 (exit 0)" in summary
    # One line per shard.
    assert sum(line.startswith("shard ") for line in output.splitlines()) == settings.stream_shards


async def test_audit_command_exits_0_and_prints_json_on_a_consistent_deployment(
    edge: Client, worker: InProcessWorker, redis_client: aioredis.Redis, settings: Settings
) -> None:
    await deploy(edge, redis_client, settings)
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOTEFLOW_")}
    env.update(
        VOTEFLOW_DATABASE_URL=settings.database_url,
        VOTEFLOW_REDIS_URL=settings.redis_url,
        VOTEFLOW_KEY_PREFIX=settings.key_prefix,
        VOTEFLOW_STREAM_SHARDS=str(settings.stream_shards),
    )
    proc = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "voteflow", "audit", "--json"),
        env=env,
        cwd=REPO,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(60):
        stdout, stderr = await proc.communicate()
    assert proc.returncode == 0, stderr.decode()
    report = orjson.loads(stdout)
    assert report["status"] == 0
    assert report["summary"] == {
        "polls_checked": 2,
        "polls_mismatched": 0,
        "stale_snapshots": 0,
        "backlog": 0,
        "pending": 0,
        "dead_letters": 0,
    }
    assert report["problems"] == report["warnings"] == []
    assert [shard["shard"] for shard in report["shards"]] == list(range(settings.stream_shards))


async def test_tampered_tally_is_a_mismatch_naming_the_poll(
    edge: Client, worker: InProcessWorker, redis_client: aioredis.Redis, settings: Settings
) -> None:
    deployment = await deploy(edge, redis_client, settings)
    poll = deployment.multiple
    await execute(
        settings.database_url,
        "UPDATE tallies SET votes = votes + 1 WHERE poll_id = $1 AND option_id = $2",
        poll["id"],
        poll["options"][2]["id"],
    )
    status, output, _ = await run_audit(settings)
    assert status == audit.MISMATCH
    [line] = problem_lines(output)
    assert line.startswith(f"poll {poll['id']}: MISMATCH: tallies differ from a recount")
    assert f"option {poll['options'][2]['id']} live 1 recount 0" in line
    assert deployment.single["id"] not in output
    assert "1 mismatched" in output.splitlines()[-1]


async def test_tampered_vote_is_a_mismatch(
    edge: Client, worker: InProcessWorker, redis_client: aioredis.Redis, settings: Settings
) -> None:
    deployment = await deploy(edge, redis_client, settings)
    await execute(
        settings.database_url,
        "UPDATE votes SET counted = NOT counted WHERE vote_id = $1",
        deployment.ballots["replaced"],
    )
    status, output, _ = await run_audit(settings, "--json")
    assert status == audit.MISMATCH
    report = orjson.loads(output)
    assert {p["poll_id"] for p in report["problems"]} == {deployment.single["id"]}
    assert {p["kind"] for p in report["problems"]} == {"tallies", "total_ballots", "voter_ballots"}


async def test_counted_vote_that_is_not_its_voters_current_ballot_is_a_mismatch(
    edge: Client, worker: InProcessWorker, redis_client: aioredis.Redis, settings: Settings
) -> None:
    """Both of carol's ballots name the same option: swapping which one counts
    leaves the recount equal to the tallies; only voter_ballots tells."""
    deployment = await deploy(edge, redis_client, settings)
    await execute(
        settings.database_url,
        "UPDATE votes SET counted = NOT counted WHERE vote_id = ANY ($1::uuid[])",
        [deployment.ballots["first"], deployment.ballots["second"]],
    )
    status, output, _ = await run_audit(settings)
    assert status == audit.MISMATCH
    [line] = problem_lines(output)
    assert line == (
        f"poll {deployment.single['id']}: MISMATCH: voter_ballots disagree with the counted "
        "votes: 1 counted votes are not their voter's current ballot, 1 current ballots are "
        "not counted, 0 current ballots name other options than their vote"
    )


async def test_dead_letters_exit_3_when_otherwise_consistent(
    edge: Client, worker: InProcessWorker, redis_client: aioredis.Redis, settings: Settings
) -> None:
    await deploy(edge, redis_client, settings)
    keys = Keys(settings.key_prefix, settings.stream_shards)
    await redis_client.xadd(
        keys.dead_letters(0), {b"entry": b"1-0", FIELD: b"not a vote", b"reason": b"undecodable"}
    )
    status, output, _ = await run_audit(settings)
    assert status == audit.DEAD_LETTERS
    assert problem_lines(output) == []
    assert any(
        line.startswith("shard 0:") and line.endswith("dead letters 1")
        for line in output.splitlines()
    )
    assert output.splitlines()[-1].endswith("dead letters 1 (exit 3)")


async def _snapshot(redis_client: aioredis.Redis, settings: Settings, poll_id: str) -> Tally:
    keys = Keys(settings.key_prefix, settings.stream_shards)
    raw = await redis_client.hget(keys.tally(poll_id), SNAPSHOT_TALLY)
    assert raw is not None
    return decode(raw)


async def _publish(redis_client: aioredis.Redis, settings: Settings, tally: Tally) -> None:
    keys = Keys(settings.key_prefix, settings.stream_shards)
    await redis_client.hset(
        keys.tally(tally.poll_id),
        mapping={SNAPSHOT_VERSION: tally.version, SNAPSHOT_TALLY: tally.encode()},
    )


async def test_snapshot_newer_than_postgresql_is_a_mismatch(
    edge: Client, worker: InProcessWorker, redis_client: aioredis.Redis, settings: Settings
) -> None:
    deployment = await deploy(edge, redis_client, settings)
    poll_id = deployment.single["id"]
    tally = await _snapshot(redis_client, settings, poll_id)
    await _publish(redis_client, settings, replace(tally, version=tally.version + 1))
    status, output, _ = await run_audit(settings)
    assert status == audit.MISMATCH
    assert problem_lines(output) == [
        f"poll {poll_id}: MISMATCH: snapshot version {tally.version + 1} is ahead of "
        f"PostgreSQL's {tally.version}"
    ]


async def test_snapshot_at_postgresql_version_with_other_counts_is_a_mismatch(
    edge: Client, worker: InProcessWorker, redis_client: aioredis.Redis, settings: Settings
) -> None:
    deployment = await deploy(edge, redis_client, settings)
    poll_id = deployment.multiple["id"]
    tally = await _snapshot(redis_client, settings, poll_id)
    await _publish(redis_client, settings, replace(tally, total_ballots=tally.total_ballots + 1))
    status, output, _ = await run_audit(settings)
    assert status == audit.MISMATCH
    assert problem_lines(output) == [
        f"poll {poll_id}: MISMATCH: snapshot at version {tally.version} differs from "
        f"PostgreSQL: total_ballots {tally.total_ballots + 1} in the snapshot, "
        f"{tally.total_ballots} in PostgreSQL"
    ]


async def test_stale_snapshot_is_a_warning_not_a_mismatch(
    edge: Client, worker: InProcessWorker, redis_client: aioredis.Redis, settings: Settings
) -> None:
    deployment = await deploy(edge, redis_client, settings)
    poll_id = deployment.single["id"]
    tally = await _snapshot(redis_client, settings, poll_id)
    assert tally.version >= 1
    await _publish(redis_client, settings, replace(tally, version=tally.version - 1))
    status, output, _ = await run_audit(settings)
    assert status == audit.OK
    assert problem_lines(output) == [
        f"poll {poll_id}: warning: stale snapshot: version {tally.version - 1}, "
        f"PostgreSQL at {tally.version} (a worker may be publishing)"
    ]
    assert "0 mismatched, 1 stale snapshots" in output.splitlines()[-1]


async def test_audit_of_one_poll_checks_that_poll_only(
    edge: Client, worker: InProcessWorker, redis_client: aioredis.Redis, settings: Settings
) -> None:
    deployment = await deploy(edge, redis_client, settings)
    tampered, intact = deployment.single, deployment.multiple
    await execute(
        settings.database_url,
        "UPDATE poll_counters SET total_ballots = total_ballots - 1 WHERE poll_id = $1",
        tampered["id"],
    )
    version = (await _snapshot(redis_client, settings, tampered["id"])).version
    status, output, _ = await run_audit(settings, "--poll", intact["id"])
    assert status == audit.OK
    assert "1 polls checked" in output.splitlines()[-1]
    status, output, _ = await run_audit(settings, "--poll", tampered["id"])
    assert status == audit.MISMATCH
    [line] = problem_lines(output)
    # The published snapshot, at the same version, now differs from it too.
    assert line == (
        f"poll {tampered['id']}: MISMATCH: total_ballots live 2 recount 3; snapshot at "
        f"version {version} differs from PostgreSQL: total_ballots 3 in the snapshot, "
        "2 in PostgreSQL"
    )


async def test_audit_that_cannot_run_exits_2(
    settings: Settings, capsys: pytest.CaptureFixture[str]
) -> None:
    """No such poll, not a poll id, a server unreachable, migrations not applied."""
    missing = "00000000-0000-4000-8000-000000000000"
    assert await run_audit(settings, "--poll", missing) == (
        audit.CANNOT_AUDIT,
        "",
        f"voteflow audit: no poll {missing}\n",
    )
    with pytest.raises(SystemExit) as exited:
        cli_main(["audit", "--poll", "nope"])
    assert exited.value.code == audit.CANNOT_AUDIT
    assert "argument --poll: must be a poll id (a UUID), got 'nope'" in capsys.readouterr().err
    unreachable = replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0")
    status, output, errors = await run_audit(unreachable)
    assert (status, output) == (audit.CANNOT_AUDIT, "")
    assert errors.startswith("voteflow audit: ")
    await execute(settings.database_url, "DROP FUNCTION audit_polls")
    assert await run_audit(settings) == (
        audit.CANNOT_AUDIT,
        "",
        "voteflow audit: audit_polls() is missing from the database: run `voteflow migrate`\n",
    )


async def test_backlog_and_oldest_pending_entry_are_reported_without_draining(
    edge: Client, worker: InProcessWorker, redis_client: aioredis.Redis, settings: Settings
) -> None:
    """Votes queued and half-read, none written: PostgreSQL is still consistent
    with itself, and the audit says what is waiting."""
    await pause(worker)
    poll = await create_poll(edge)
    for n in range(20):
        await cast(edge, poll, n % 3, f"voter-{n}")
    keys = Keys(settings.key_prefix, settings.stream_shards)
    # A consumer that reads two entries per shard and dies.
    read = await redis_client.xreadgroup(
        GROUP, "gone", {stream: ">" for stream in keys.streams()}, count=2
    )
    pending = sum(len(entries) for _, entries in read)
    await asyncio.sleep(0.05)
    status, output, _ = await run_audit(settings, "--json")
    assert status == audit.OK
    report = orjson.loads(output)
    assert report["summary"]["backlog"] == 20
    assert report["summary"]["pending"] == pending > 0
    for shard in report["shards"]:
        assert shard["backlog"] == shard["undelivered"] + shard["pending"]
        if shard["pending"]:
            assert shard["oldest_pending_idle_ms"] >= 50
        else:
            assert shard["oldest_pending_idle_ms"] is None


async def test_deployment_before_any_vote_or_worker_is_consistent(settings: Settings) -> None:
    """No poll, no stream, no consumer group yet: nothing to fault."""
    status, output, _ = await run_audit(settings, "--json")
    assert status == audit.OK
    report = orjson.loads(output)
    assert report["summary"]["polls_checked"] == 0
    assert [(s["length"], s["backlog"], s["group"]) for s in report["shards"]] == [
        (0, 0, False)
    ] * settings.stream_shards
