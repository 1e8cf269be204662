"""``voteflow poll create|close|list|export``: polls run through an edge's HTTP API.

The edge: ``--url``, else the stack ``voteflow up`` runs from ``--data-dir``
(its ``stack.json``, see voteflow.stack), else the address the settings give
(``VOTEFLOW_HOST``, ``VOTEFLOW_PORT``). The admin token: ``VOTEFLOW_ADMIN_TOKEN``,
else the stack's, and that one only for the stack's own edge: a token is never
sent to an edge it was not made for.

Exit status: 0 done; 1 the edge answered an error, or no edge answered; 2 a
usage error (argparse's).
"""

from __future__ import annotations

import argparse
import http.client
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import orjson

from .settings import Settings
from .stack import read_stack

FAILED = 1
TIMEOUT = 30.0
# Polls asked for per page of GET /api/polls: the most the API hands out.
PAGE = 100
STATES = ("open", "closed", "all")
FORMATS = ("csv", "json")
_DURATION = re.compile(r"(?:(\d+)d)?(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?")


class Failed(Exception):
    """The command could not be done; the message says why, in one line."""


@dataclass(frozen=True, slots=True)
class Edge:
    base: str
    token: str

    def call(self, method: str, path: str, body: Any = None, admin: bool = False) -> bytes:
        """The body of the edge's 2xx answer; Failed for any other, or none."""
        data = None if method == "GET" else orjson.dumps({} if body is None else body)
        request = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if admin:
            if not self.token:
                raise Failed(
                    "no admin token: set VOTEFLOW_ADMIN_TOKEN to the edge's, or run beside "
                    "the `voteflow up` that started it"
                )
            # Unredirected: were the edge to redirect, the token would not follow.
            request.add_unredirected_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=TIMEOUT) as response:
                answer: bytes = response.read()
                return answer
        except urllib.error.HTTPError as exc:
            raise Failed(
                f"the edge answered {exc.code}: {_error(exc.read(), exc.reason)}"
            ) from None
        except urllib.error.URLError as exc:
            raise Failed(
                f"no edge answers at {self.base} ({exc.reason}): start one with `make run`, "
                "or give its address with --url"
            ) from None
        except (OSError, http.client.HTTPException) as exc:
            raise Failed(f"the edge at {self.base} did not answer: {exc}") from None

    def json(self, method: str, path: str, body: Any = None, admin: bool = False) -> Any:
        raw = self.call(method, path, body, admin)
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise Failed(f"{self.base}{path} answered something that is not JSON") from None


def _error(raw: bytes, reason: str) -> str:
    """The API's ``error`` field, or the HTTP reason when the body has none."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return reason
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, str) else reason


def find_edge(settings: Settings, url: str | None, data_dir: Path) -> Edge:
    stack = read_stack(data_dir)
    base = url or (stack.edge_url if stack is not None else settings.local_url)
    token = settings.admin_token
    if not token and stack is not None and stack.edge_url == base:
        token = stack.admin_token
    return Edge(base, token)


def _base_url(text: str) -> str:
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc or parts.query:
        raise argparse.ArgumentTypeError(
            f"must be an edge's base URL (http://host:port), got {text!r}"
        )
    return text.rstrip("/")


def _poll_id(text: str) -> str:
    try:
        return str(uuid.UUID(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a poll id (a UUID), got {text!r}") from None


def _duration(text: str) -> timedelta:
    """``90`` or ``90s``, ``15m``, ``2h``, ``1d``, ``1h30m``."""
    if text.isdigit():
        seconds = int(text)
    elif (match := _DURATION.fullmatch(text)) is not None and text:
        days, hours, minutes, secs = (int(part or 0) for part in match.groups())
        seconds = ((days * 24 + hours) * 60 + minutes) * 60 + secs
    else:
        seconds = 0
    if seconds < 1:
        raise argparse.ArgumentTypeError(
            f"must be a duration like 90s, 15m, 2h, 1d or 1h30m, got {text!r}"
        )
    return timedelta(seconds=seconds)


def _moment(text: str) -> datetime:
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        moment = None
    if moment is None or moment.tzinfo is None:
        raise argparse.ArgumentTypeError(
            "must be an RFC 3339 date-time with an offset (2030-01-31T18:00:00+01:00), "
            f"got {text!r}"
        )
    return moment


def _choices(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number of at least 1, got {text!r}")
    return int(text)


def add_parser(sub: Any, data_dir: argparse.ArgumentParser) -> None:
    """``voteflow poll ...`` among the subcommands ``sub``; ``data_dir`` is the
    parent parser holding ``--data-dir``."""
    where = argparse.ArgumentParser(add_help=False, parents=[data_dir])
    where.add_argument(
        "--url",
        type=_base_url,
        help="the edge's base URL (default: the one `voteflow up` runs from --data-dir, "
        "else http://VOTEFLOW_HOST:VOTEFLOW_PORT)",
    )
    poll = sub.add_parser(
        "poll",
        help="create, close, list or export polls through a running edge",
        description="The edge: --url, else the stack `voteflow up` runs from --data-dir, else "
        "http://VOTEFLOW_HOST:VOTEFLOW_PORT. The admin token: VOTEFLOW_ADMIN_TOKEN, else that "
        "stack's, for its own edge only.",
        epilog="exit status: 0 done; 1 the edge answered an error, or none answered; "
        "2 a usage error",
    )
    actions = poll.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", parents=[where], help="create a poll (admin)")
    create.add_argument("question")
    create.add_argument("options", nargs="+", metavar="OPTION", help="2 to 64 distinct labels")
    create.add_argument(
        "--multiple",
        action="store_true",
        help="every ballot counts (default: a voter's later ballot replaces the earlier)",
    )
    create.add_argument(
        "--max-choices", type=_choices, metavar="N", help="options one ballot may name (default 1)"
    )
    closes = create.add_mutually_exclusive_group()
    closes.add_argument(
        "--closes-in", type=_duration, metavar="DURATION", help="e.g. 90s, 15m, 2h, 1d, 1h30m"
    )
    closes.add_argument("--closes-at", type=_moment, metavar="RFC3339")
    create.add_argument("--json", action="store_true", help="print the API's JSON")
    close = actions.add_parser("close", parents=[where], help="close a poll now (admin)")
    close.add_argument("poll_id", type=_poll_id, metavar="ID")
    close.add_argument("--json", action="store_true", help="print the API's JSON")
    listing = actions.add_parser("list", parents=[where], help="the polls, newest first")
    listing.add_argument("--state", choices=STATES, default="open", help="(default: open)")
    listing.add_argument("--json", action="store_true", help="print the polls as a JSON list")
    export = actions.add_parser("export", parents=[where], help="a poll's results as CSV or JSON")
    export.add_argument("poll_id", type=_poll_id, metavar="ID")
    export.add_argument("--format", choices=FORMATS, default="csv", help="(default: csv)")
    export.add_argument("--output", type=Path, metavar="FILE", help="(default: standard output)")


def run(settings: Settings, args: argparse.Namespace) -> int:
    edge = find_edge(settings, args.url, args.data_dir)
    try:
        if args.action == "create":
            create(edge, args)
        elif args.action == "close":
            close(edge, args.poll_id, args.json)
        elif args.action == "list":
            list_polls(edge, args.state, args.json)
        else:
            export(edge, args.poll_id, args.format, args.output)
    except Failed as exc:
        print(f"voteflow poll {args.action}: {exc}", file=sys.stderr)
        return FAILED
    return 0


def create(edge: Edge, args: argparse.Namespace) -> None:
    body: dict[str, Any] = {
        "question": args.question,
        "options": args.options,
        "allow_multiple_votes": args.multiple,
    }
    if args.max_choices is not None:
        body["max_choices"] = args.max_choices
    if args.closes_in is not None:
        body["expires_at"] = (datetime.now(UTC) + args.closes_in).isoformat()
    elif args.closes_at is not None:
        body["expires_at"] = args.closes_at.isoformat()
    raw = edge.call("POST", "/api/polls", body, admin=True)
    if args.json:
        print(raw.decode())
        return
    poll = orjson.loads(raw)
    print(poll["id"])
    print(f"vote:    {edge.base}/polls/{poll['id']}")
    print(f"present: {edge.base}/polls/{poll['id']}/present")


def close(edge: Edge, poll_id: str, as_json: bool) -> None:
    raw = edge.call("POST", f"/api/polls/{poll_id}/close", admin=True)
    if as_json:
        print(raw.decode())
        return
    poll = orjson.loads(raw)
    print(f"closed {poll['id']} at {poll['closed_at']}")


def list_polls(edge: Edge, state: str, as_json: bool) -> None:
    polls: list[dict[str, Any]] = []
    query = {"state": state, "limit": str(PAGE)}
    while True:
        page = edge.json("GET", "/api/polls?" + urllib.parse.urlencode(query))
        polls.extend(page["polls"])
        if not page.get("next_cursor"):
            break
        query["cursor"] = page["next_cursor"]
    if as_json:
        print(orjson.dumps(polls).decode())
        return
    if not polls:
        print("no polls" if state == "all" else f"no {state} polls")
        return
    rows = [
        (
            poll["id"],
            "closed" if poll["closed"] else "open",
            str(poll["total_ballots"]) if poll.get("total_ballots") is not None else "-",
            # One line per poll, whatever the question holds.
            " ".join(poll["question"].split()),
        )
        for poll in polls
    ]
    header = ("ID", "STATE", "BALLOTS", "QUESTION")
    widths = [max(len(row[i]) for row in (header, *rows)) for i in range(3)]
    for row in (header, *rows):
        print(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]:>{widths[2]}}  {row[3]}")


def export(edge: Edge, poll_id: str, fmt: str, output: Path | None) -> None:
    raw = edge.call("GET", f"/api/polls/{poll_id}/results.{fmt}")
    if output is None:
        sys.stdout.buffer.write(raw)
        sys.stdout.flush()
        return
    try:
        output.write_bytes(raw)
    except OSError as exc:
        raise Failed(f"cannot write {output}: {exc.strerror}") from None
    print(f"wrote the results of poll {poll_id} to {output} ({len(raw)} bytes)")
