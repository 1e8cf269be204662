"""The ``voteflow`` command as an operator uses it: its version, and the poll
commands against a real edge over its HTTP API, found by ``--url`` or by the
stack file ``voteflow up`` leaves in its data directory."""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient

from tests.support import (
    ADMIN,
    ADMIN_TOKEN,
    InProcessWorker,
    ballot,
    create_poll,
    drain,
    shell_env,
    voteflow,
)
from voteflow.servers import free_port
from voteflow.settings import Settings
from voteflow.stack import Stack, write_stack

Client = TestClient[Any, Any]
NO_SUCH_POLL = "00000000-0000-4000-8000-000000000000"
ADMIN_ENV = shell_env(VOTEFLOW_ADMIN_TOKEN=ADMIN_TOKEN)


def base_url(edge: Client) -> str:
    return str(edge.make_url("")).rstrip("/")


async def get_poll(edge: Client, poll_id: str) -> dict[str, Any]:
    response = await edge.get(f"/api/polls/{poll_id}")
    assert response.status == 200, await response.text()
    poll: dict[str, Any] = await response.json()
    return poll


async def test_version_prints_the_installed_version() -> None:
    assert await voteflow("--version") == (0, f"voteflow {metadata.version('voteflow')}\n", "")


async def test_create_prints_the_poll_id_and_its_voting_and_presenter_pages(edge: Client) -> None:
    base = base_url(edge)
    status, out, err = await voteflow(
        *("poll", "create", "Lunch?", "Pizza", "Soup", "Salad", "--url", base),
        *("--multiple", "--max-choices", "2", "--closes-in", "1h30m"),
        env=ADMIN_ENV,
    )
    assert status == 0, err
    poll_id, vote, present = out.splitlines()
    assert vote == f"vote:    {base}/polls/{poll_id}"
    assert present == f"present: {base}/polls/{poll_id}/present"
    poll = await get_poll(edge, poll_id)
    assert poll["question"] == "Lunch?"
    assert [option["label"] for option in poll["options"]] == ["Pizza", "Soup", "Salad"]
    assert (poll["allow_multiple_votes"], poll["max_choices"], poll["closed"]) == (True, 2, False)
    closes = datetime.fromisoformat(poll["expires_at"]) - datetime.now(UTC)
    assert timedelta(minutes=89) < closes <= timedelta(minutes=90)


async def test_create_with_json_prints_the_apis_answer(edge: Client) -> None:
    at = "2031-01-31T18:00:00+01:00"
    status, out, err = await voteflow(
        *("poll", "create", "Yes or no?", "Yes", "No", "--closes-at", at, "--json"),
        *("--url", base_url(edge)),
        env=ADMIN_ENV,
    )
    assert status == 0, err
    created = orjson.loads(out)
    assert created == await get_poll(edge, created["id"])
    assert datetime.fromisoformat(created["expires_at"]) == datetime.fromisoformat(at)
    assert (created["allow_multiple_votes"], created["max_choices"]) == (False, 1)


async def test_close_closes_the_poll_at_once(edge: Client) -> None:
    poll = await create_poll(edge)
    status, out, err = await voteflow(
        "poll", "close", poll["id"], "--url", base_url(edge), env=ADMIN_ENV
    )
    assert status == 0, err
    closed = await get_poll(edge, poll["id"])
    assert closed["closed"] is True
    assert out == f"closed {poll['id']} at {closed['closed_at']}\n"


async def test_list_shows_every_open_poll_across_pages_newest_first(edge: Client) -> None:
    # 102 polls, one closed: two pages of the API's largest (100).
    polls = [await create_poll(edge, question=f"Question {n}?") for n in range(102)]
    response = await edge.post(f"/api/polls/{polls[5]['id']}/close", headers=ADMIN)
    assert response.status == 200, await response.text()
    status, out, err = await voteflow("poll", "list", "--url", base_url(edge))
    assert status == 0, err
    header, *rows = out.splitlines()
    assert header.split() == ["ID", "STATE", "BALLOTS", "QUESTION"]
    listed = [row.split(None, 3) for row in rows]
    open_polls = [poll for poll in reversed(polls) if poll is not polls[5]]
    assert [row[0] for row in listed] == [poll["id"] for poll in open_polls]
    assert {(row[1], row[2]) for row in listed} == {("open", "0")}
    assert [row[3] for row in listed] == [poll["question"] for poll in open_polls]
    status, out, err = await voteflow("poll", "list", "--json", "--url", base_url(edge))
    assert status == 0, err
    assert [poll["id"] for poll in orjson.loads(out)] == [poll["id"] for poll in open_polls]


async def test_list_by_state_shows_closed_polls_with_their_ballots(
    edge: Client, worker: InProcessWorker, settings: Settings, redis_client: Any
) -> None:
    kept = await create_poll(edge, question="Kept open?")
    ended = await create_poll(edge, question="Ended?", options=["Yes", "No"])
    assert (await edge.post("/api/vote", json=ballot(ended, "ann", 1))).status == 202
    await drain(redis_client, settings)
    assert (await edge.post(f"/api/polls/{ended['id']}/close", headers=ADMIN)).status == 200
    base = base_url(edge)
    rows = {}
    for state in ("open", "closed", "all"):
        status, out, err = await voteflow("poll", "list", "--state", state, "--url", base)
        assert status == 0, err
        rows[state] = [row.split(None, 3) for row in out.splitlines()[1:]]
    assert rows["open"] == [[kept["id"], "open", "0", "Kept open?"]]
    assert rows["closed"] == [[ended["id"], "closed", "1", "Ended?"]]
    assert rows["all"] == rows["closed"] + rows["open"]


async def test_export_writes_the_results_as_csv_or_json(
    edge: Client, worker: InProcessWorker, settings: Settings, redis_client: Any, tmp_path: Path
) -> None:
    poll = await create_poll(edge, question="Lunch?", options=["Soup", "Salad"])
    assert (await edge.post("/api/vote", json=ballot(poll, "ann", 1))).status == 202
    await drain(redis_client, settings)
    base = base_url(edge)
    status, out, err = await voteflow("poll", "export", poll["id"], "--url", base)
    assert status == 0, err
    soup, salad = (option["id"] for option in poll["options"])
    assert out.splitlines() == [
        "option_id,label,votes,share_of_ballots",
        f"{soup},Soup,0,0.0000",
        f"{salad},Salad,1,1.0000",
    ]
    target = tmp_path / "lunch.json"
    status, out, err = await voteflow(
        "poll", "export", poll["id"], "--format", "json", "--output", str(target), "--url", base
    )
    assert status == 0, err
    exported = orjson.loads(target.read_bytes())
    assert exported["question"] == "Lunch?" and exported["total_ballots"] == 1
    assert [(o["label"], o["votes"]) for o in exported["options"]] == [("Soup", 0), ("Salad", 1)]


async def test_list_of_an_edge_without_open_polls_says_so(edge: Client) -> None:
    assert await voteflow("poll", "list", "--url", base_url(edge)) == (0, "no open polls\n", "")


async def test_an_http_error_exits_1_with_the_apis_error_on_one_line(edge: Client) -> None:
    base = base_url(edge)
    assert await voteflow("poll", "close", NO_SUCH_POLL, "--url", base, env=ADMIN_ENV) == (
        1,
        "",
        "voteflow poll close: the edge answered 404: no such poll\n",
    )
    assert await voteflow("poll", "create", "Q?", "A", "A", "--url", base, env=ADMIN_ENV) == (
        1,
        "",
        "voteflow poll create: the edge answered 422: labels must be distinct\n",
    )
    wrong = shell_env(VOTEFLOW_ADMIN_TOKEN="another-token-of-thirty-characters")
    assert await voteflow("poll", "create", "Q?", "A", "B", "--url", base, env=wrong) == (
        1,
        "",
        "voteflow poll create: the edge answered 401: an admin bearer token is required\n",
    )


async def test_no_edge_to_reach_exits_1_saying_so() -> None:
    base = f"http://127.0.0.1:{free_port()}"
    status, out, err = await voteflow("poll", "list", "--url", base)
    assert (status, out) == (1, "")
    assert err.startswith(f"voteflow poll list: no edge answers at {base} (")
    assert err.endswith("start one with `make run`, or give its address with --url\n")
    assert len(err.splitlines()) == 1


@pytest.mark.parametrize(
    "args",
    [
        ("poll", "create", "Q?", "A", "B", "--closes-in", "soon"),
        ("poll", "create", "Q?", "A", "B", "--closes-at", "2031-01-31T18:00:00"),
        ("poll", "create", "Q?", "A", "B", "--closes-in", "1h", "--closes-at", "2031-01-31Z"),
        ("poll", "create", "Q?", "A", "B", "--max-choices", "0"),
        ("poll", "close", "not-a-poll-id"),
        ("poll", "list", "--state", "pending"),
        ("poll", "list", "--url", "127.0.0.1:8080"),
        ("poll", "export", NO_SUCH_POLL, "--format", "xml"),
    ],
)
async def test_usage_errors_exit_2_before_any_request(args: tuple[str, ...]) -> None:
    status, out, err = await voteflow(*args)
    assert (status, out) == (2, "")
    assert "error: argument" in err


def _stack(settings: Settings, edge_url: str, pid: int | None = None) -> Stack:
    return Stack(
        edge_url=edge_url,
        database_url=settings.database_url,
        redis_url=settings.redis_url,
        admin_token=settings.admin_token,
        redis_cluster=settings.redis_cluster,
        key_prefix=settings.key_prefix,
        stream_shards=settings.stream_shards,
        pid=os.getpid() if pid is None else pid,
    )


async def test_poll_commands_and_audit_find_the_stack_from_its_file(
    edge: Client, settings: Settings, tmp_path: Path
) -> None:
    """No URL and no token in the shell: both come from the stack file."""
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    write_stack(data_dir, _stack(settings, base_url(edge)))
    status, out, err = await voteflow("poll", "create", "Q?", "A", "B", "--data-dir", str(data_dir))
    assert status == 0, err
    poll_id = out.splitlines()[0]
    status, out, err = await voteflow("poll", "list", "--data-dir", str(data_dir))
    assert status == 0, err
    assert out.splitlines()[1].split() in ([poll_id, "open", b, "Q?"] for b in ("-", "0"))
    status, out, err = await voteflow("poll", "close", poll_id, "--data-dir", str(data_dir))
    assert status == 0, err
    assert (await get_poll(edge, poll_id))["closed"] is True
    # The stack's database and Redis keys: one closed poll, consistent.
    status, out, err = await voteflow("audit", "--json", "--data-dir", str(data_dir))
    assert status == 0, err
    assert orjson.loads(out)["summary"]["polls_checked"] == 1


async def test_the_stacks_token_goes_to_the_stacks_edge_only(
    edge: Client, settings: Settings, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    write_stack(data_dir, _stack(settings, base_url(edge)))
    # The same edge by another name: for all the command knows, another edge.
    elsewhere = base_url(edge).replace("127.0.0.1", "localhost")
    args = ("poll", "create", "Q?", "A", "B", "--data-dir", str(data_dir), "--url", elsewhere)
    status, out, err = await voteflow(*args)
    assert (status, out) == (1, "")
    assert err.startswith("voteflow poll create: no admin token: set VOTEFLOW_ADMIN_TOKEN")


async def test_a_stack_whose_up_no_longer_runs_is_ignored(
    edge: Client, settings: Settings, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    gone = await asyncio.create_subprocess_exec(sys.executable, "-c", "")
    await gone.wait()
    write_stack(data_dir, _stack(settings, base_url(edge), pid=gone.pid))
    # Nothing listens at VOTEFLOW_PORT: the command does not fall back on the file.
    env = shell_env(VOTEFLOW_PORT=str(free_port()))
    status, _, err = await voteflow("poll", "list", "--data-dir", str(data_dir), env=env)
    assert status == 1
    assert "no edge answers at http://127.0.0.1:" in err
    status, _, err = await voteflow("audit", "--data-dir", str(data_dir), env=env)
    assert status == 2
    assert "VOTEFLOW_DATABASE_URL is not set" in err


async def test_audit_urls_set_in_the_shell_win_over_the_stack_file(
    edge: Client, settings: Settings, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    data_dir.mkdir(mode=0o700)
    unreachable = f"redis://127.0.0.1:{free_port()}/0"
    write_stack(data_dir, replace(_stack(settings, base_url(edge)), redis_url=unreachable))
    env = shell_env(
        VOTEFLOW_REDIS_URL=settings.redis_url,
        VOTEFLOW_KEY_PREFIX=settings.key_prefix,
        VOTEFLOW_STREAM_SHARDS=str(settings.stream_shards),
    )
    status, _, err = await voteflow("audit", "--data-dir", str(data_dir), env=env)
    assert status == 0, err
