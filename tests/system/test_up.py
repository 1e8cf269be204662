"""`voteflow up` as a newcomer runs it: no URLs set, so it starts private servers.

The test reads what `up` prints, casts the vote its curl line shows, sees it
counted, then stops `up` the way a person or a supervisor would and checks
that every process it started is gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import signal
import stat
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from tests.support import REPO, voteflow
from voteflow.servers import free_port

# initdb, both servers, the migrations, then an edge and a worker.
UP_TIMEOUT = 90.0
# `up` gives its edge and worker 30 s each and its servers 15 s each; a clean
# stop takes about a second.
STOP_TIMEOUT = 45.0
COUNTED_TIMEOUT = 15.0
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=10)


def _stat(pid: int) -> tuple[str, int, int] | None:
    """(state, parent pid, start time) of a process, from /proc; None if gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rsplit(")", 1)[1].split()  # fields 3.. of proc_pid_stat(5)
    return fields[0], int(fields[1]), int(fields[19])


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode().strip()
    except OSError:
        return ""


def descendants(root: int) -> dict[int, tuple[int, str]]:
    """Every process below `root`: pid -> (start time, command line)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (stat := _stat(int(entry.name))) is not None:
            children.setdefault(stat[1], []).append(int(entry.name))
    found: dict[int, tuple[int, str]] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        stat = _stat(pid)
        if stat is not None:
            found[pid] = (stat[2], _cmdline(pid))
            todo += children.get(pid, [])
    return found


def alive(pid: int, started: int) -> bool:
    """Whether that very process (not a later one with its pid) still runs."""
    stat = _stat(pid)
    return stat is not None and stat[2] == started and stat[0] not in ("Z", "X")


def leftovers(up_pid: int, data_dir: Path, seen: dict[int, tuple[int, str]]) -> list[str]:
    """Live processes `up` left: ones seen below it, ones in its session (its
    edge and worker), ones working in its data directory (the servers)."""
    left = {pid: command for pid, (started, command) in seen.items() if alive(pid, started)}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or (stat := _stat(int(entry.name))) is None:
            continue
        pid = int(entry.name)
        try:
            session = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[3])
            cwd = Path(os.readlink(f"/proc/{pid}/cwd"))
        except (OSError, IndexError, ValueError):
            continue
        if stat[0] not in ("Z", "X") and (session == up_pid or cwd.is_relative_to(data_dir)):
            left[pid] = _cmdline(pid)
    return [f"{pid}: {command}" for pid, command in sorted(left.items())]


def _up_env(port: int) -> dict[str, str]:
    # A newcomer's shell: no VOTEFLOW_DATABASE_URL or VOTEFLOW_REDIS_URL.
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOTEFLOW_")}
    env |= {"VOTEFLOW_PORT": str(port), "VOTEFLOW_WORKER_METRICS_PORT": "0"}
    return env


class Up:
    """A running `voteflow up`, in its own process group as a shell's job."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.data_dir = tmp_path / "data"
        self.stderr_path = tmp_path / "up.stderr"
        self.lines: list[str] = []
        self.seen: dict[int, tuple[int, str]] = {}
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    async def start(self, *options: str, sigint_ignored: bool = False) -> None:
        """`sigint_ignored`: as from a script's `cmd &` or `nohup`, which start
        the command with SIGINT ignored (and exec keeps it so)."""

        def ignore_sigint() -> None:
            signal.signal(signal.SIGINT, signal.SIG_IGN)

        with self.stderr_path.open("wb") as stderr:
            self.proc = await asyncio.create_subprocess_exec(
                *(sys.executable, "-m", "voteflow", "up", "--data-dir", str(self.data_dir)),
                *options,
                env=_up_env(self.port),
                cwd=REPO,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=stderr,
                start_new_session=True,
                preexec_fn=ignore_sigint if sigint_ignored else None,
            )

    def stderr(self) -> str:
        return self.stderr_path.read_text(errors="replace")[-3000:]

    async def read_line(self) -> str:
        assert self.proc is not None and self.proc.stdout is not None
        raw = await self.proc.stdout.readline()
        if not raw:
            pytest.fail(f"voteflow up closed its output:\n{''.join(self.lines)}\n{self.stderr()}")
        line = raw.decode(errors="replace")
        self.lines.append(line)
        return line

    async def read_rest(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while raw := await self.proc.stdout.readline():
            self.lines.append(raw.decode(errors="replace"))

    def remember_processes(self) -> dict[int, tuple[int, str]]:
        self.seen |= descendants(self.pid)
        return self.seen

    async def exits(self, timeout: float = STOP_TIMEOUT) -> int:
        assert self.proc is not None
        try:
            async with asyncio.timeout(timeout):
                return await self.proc.wait()
        except TimeoutError:
            pytest.fail(f"voteflow up still runs {timeout:.0f}s after it was told to stop")

    def leftovers(self) -> list[str]:
        return leftovers(self.pid, self.data_dir, self.seen)

    async def kill(self) -> None:
        """After a failure: SIGKILL up, its group and whatever it left."""
        if self.proc is None:
            return
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(10):
                    await self.proc.wait()
        for pid, (started, _) in self.remember_processes().items():
            if alive(pid, started):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


@pytest.fixture
async def up(tmp_path: Path) -> AsyncIterator[Up]:
    running = Up(tmp_path)
    try:
        yield running
    finally:
        await running.kill()


async def _counted(session: aiohttp.ClientSession, url: str, option_id: str) -> dict[str, Any]:
    """The results, once they show one ballot for option_id."""
    async with asyncio.timeout(COUNTED_TIMEOUT):
        while True:
            async with session.get(url) as response:
                assert response.status == 200, await response.text()
                result: dict[str, Any] = await response.json()
            votes = {o["id"]: o["votes"] for o in result["options"]}
            if result["total_ballots"] == 1 and votes[option_id] == 1:
                return result
            await asyncio.sleep(0.1)


STOPS = {
    # Ctrl-C in a terminal: SIGINT to the whole foreground process group.
    "ctrl-c": lambda pid: os.killpg(pid, signal.SIGINT),
    # `kill PID`, or a supervisor stopping the main process.
    "sigterm": lambda pid: os.kill(pid, signal.SIGTERM),
}


@pytest.mark.parametrize(
    ("stop", "options"),
    [
        *((stop, ()) for stop in sorted(STOPS)),
        # Several edge processes under their supervisor, all sent SIGINT by the terminal.
        ("ctrl-c", ("--edge-processes", "2")),
    ],
)
async def test_up_serves_and_counts_a_vote_then_stops_leaving_no_process(
    up: Up, stop: str, options: tuple[str, ...]
) -> None:
    await up.start(*options)
    try:
        async with asyncio.timeout(UP_TIMEOUT):
            while not (curl := await up.read_line()).lstrip().startswith("curl -s -X POST"):
                pass
    except TimeoutError:
        pytest.fail(f"no curl line within {UP_TIMEOUT:.0f}s:\n{''.join(up.lines)}{up.stderr()}")
    output = "".join(up.lines)
    rest = asyncio.create_task(up.read_rest())
    assert f"voteflow is up at {up.base}" in output
    body_text = re.search(r"-d '(\{.*\})'", curl)
    assert body_text is not None, curl
    body = json.loads(body_text[1])
    poll_id, (option_id,) = body["poll_id"], body["option_ids"]
    results_url = f"{up.base}/api/polls/{poll_id}/results"
    assert results_url in output

    async with aiohttp.ClientSession(timeout=REQUEST_TIMEOUT) as session:
        # What the curl line does, then what a newcomer looks at next.
        async with session.post(f"{up.base}/api/vote", json=body) as response:
            assert response.status == 202, await response.text()
        result = await _counted(session, results_url, option_id)
        assert [o["label"] for o in result["options"]] == ["Blue", "Green", "Orange"]
        for url in (f"{up.base}/api/polls/{poll_id}", f"{up.base}/metrics"):
            async with session.get(url) as response:
                assert response.status == 200, url

    commands = " | ".join(command for _, command in up.remember_processes().values())
    for part in ("postgres", "valkey-server", "voteflow worker", "voteflow edge"):
        assert part in commands, f"{part!r} is not among the processes of up: {commands}"
    # As many edge processes run as up says, and a supervisor when more than one.
    said = re.search(r"\((\d+) edge process(es)?, 1 worker\)", output)
    assert said is not None, output
    edges = int(said[1])
    if options:
        assert edges == int(options[1])
    running = commands.split(" | ").count(f"{sys.executable} -m voteflow edge --processes {edges}")
    assert running == (edges + 1 if edges > 1 else 1), commands
    STOPS[stop](up.pid)
    assert await up.exits() == 0, up.stderr()
    assert not up.leftovers()
    # Nothing holds its output open any more either.
    async with asyncio.timeout(5):
        await rest
    assert "stopped" in up.stderr()


async def test_up_started_with_sigint_ignored_still_stops_on_ctrl_c(up: Up) -> None:
    await up.start(sigint_ignored=True)
    try:
        async with asyncio.timeout(UP_TIMEOUT):
            while not (await up.read_line()).lstrip().startswith("curl -s -X POST"):
                pass
    except TimeoutError:
        pytest.fail(f"no curl line within {UP_TIMEOUT:.0f}s:\n{''.join(up.lines)}{up.stderr()}")
    os.killpg(up.pid, signal.SIGINT)
    assert await up.exits() == 0, up.stderr()
    assert not up.leftovers()
    assert "stopped" in up.stderr()


async def test_ctrl_c_while_up_starts_stops_the_servers_it_started(up: Up) -> None:
    await up.start()
    # Wait until both private servers run, before the edge answers.
    async with asyncio.timeout(UP_TIMEOUT):
        while "valkey-server" not in " ".join(c for _, c in up.remember_processes().values()):
            assert up.proc is not None and up.proc.returncode is None, up.stderr()
            await asyncio.sleep(0.02)
    assert not any(line.startswith("voteflow is up") for line in up.lines)
    os.killpg(up.pid, signal.SIGINT)
    assert await up.exits() == 0, up.stderr()
    assert not up.leftovers()


async def _started(up: Up) -> tuple[str, str]:
    """(admin token, demo poll id) that `up` printed once it was up."""
    await up.start()
    try:
        async with asyncio.timeout(UP_TIMEOUT):
            while not (curl := await up.read_line()).lstrip().startswith("curl -s -X POST"):
                pass
    except TimeoutError:
        pytest.fail(f"no curl line within {UP_TIMEOUT:.0f}s:\n{''.join(up.lines)}{up.stderr()}")
    token = re.search(r"admin token: +(\S+)", "".join(up.lines))
    poll = re.search(r'"poll_id": "([0-9a-f-]+)"', curl)
    assert token is not None and poll is not None, "".join(up.lines)
    return token[1], poll[1]


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def _stop(up: Up) -> None:
    rest = asyncio.create_task(up.read_rest())
    os.kill(up.pid, signal.SIGTERM)
    assert await up.exits() == 0, up.stderr()
    async with asyncio.timeout(5):
        await rest


async def test_up_keeps_its_admin_token_and_demo_poll_and_tells_other_commands_where_it_runs(
    tmp_path: Path,
) -> None:
    runs = [Up(tmp_path), Up(tmp_path)]  # one data directory
    data_dir = runs[0].data_dir
    try:
        token, poll_id = await _started(runs[0])
        stack_file = data_dir / "stack.json"
        # Secrets: the token, and the URLs. As root the private PostgreSQL's
        # user may traverse the directory (o+x), never read or list it.
        assert _mode(stack_file) == 0o600
        assert _mode(data_dir / "admin-token") == 0o600
        assert _mode(data_dir) & 0o076 == 0
        stack = json.loads(stack_file.read_text())
        assert (stack["edge_url"], stack["admin_token"]) == (runs[0].base, token)
        # No URL and no token given: the commands use the stack's.
        where = ("--data-dir", str(data_dir))
        status, out, err = await voteflow("poll", "list", *where)
        assert status == 0, err
        assert [row.split()[0] for row in out.splitlines()[1:]] == [poll_id]
        status, out, err = await voteflow("poll", "create", "Tea?", "Yes", "No", *where)
        assert status == 0, err
        created = out.splitlines()[0]
        status, out, err = await voteflow("audit", *where)
        assert status == 0, out + err
        await _stop(runs[0])
        assert not stack_file.exists()

        # The next run: same token, same demo poll, no second copy of it.
        assert await _started(runs[1]) == (token, poll_id)
        status, out, err = await voteflow("poll", "list", *where)
        assert status == 0, err
        assert [row.split()[0] for row in out.splitlines()[1:]] == [created, poll_id]
        assert json.loads(stack_file.read_text())["edge_url"] == runs[1].base
        await _stop(runs[1])
    finally:
        for run in runs:
            await run.kill()


async def test_demo_poll_is_made_again_only_when_the_last_one_is_gone_or_closed(
    database_url: str,
) -> None:
    from voteflow.cli import _demo_poll

    poll_id, option_id = await _demo_poll(database_url, None)
    assert await _demo_poll(database_url, poll_id) == (poll_id, option_id)
    # Another database's poll, or a file that was edited: a new demo poll.
    for remembered in ("00000000-0000-4000-8000-000000000000", "not an id"):
        assert (await _demo_poll(database_url, remembered))[0] not in (poll_id, remembered)
    # A closed one takes no votes: the curl line `up` prints would be refused.
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute("UPDATE polls SET closed_at = now() WHERE id = $1", poll_id)
    finally:
        await conn.close()
    assert (await _demo_poll(database_url, poll_id))[0] != poll_id


def test_data_directory_is_closed_to_others_unless_it_holds_more_than_ups_files(
    tmp_path: Path,
) -> None:
    from voteflow.stack import private_dir

    assert _mode(private_dir(tmp_path / "new" / "data")) == 0o700
    earlier = tmp_path / "earlier"  # as an older voteflow left it
    (earlier / "postgres").mkdir(parents=True)
    (earlier / "redis").mkdir()
    earlier.chmod(0o755)
    assert _mode(private_dir(earlier)) == 0o700
    # `--data-dir ~`, say: who may use it is not up's to change.
    shared = tmp_path / "shared"
    (shared / "notes.txt").parent.mkdir()
    (shared / "notes.txt").write_text("mine")
    shared.chmod(0o755)
    assert _mode(private_dir(shared)) == 0o755
