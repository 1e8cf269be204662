"""Locust profile of issue 5: voters and dashboard watchers against voteflow.

    locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:8080 \\
        --admin-token TOKEN --scale 0.01

(``python -m loadtest.run`` starts a private stack and runs this for you.)

- At test start the master (or the only process) creates the polls through
  the admin API: one hot single-vote poll and ``--small-polls`` small ones,
  every third allowing multiple votes. Locust workers get them by message.
- :class:`Voter` (FastHttpUser): mostly new ballots (most on the hot poll), some
  re-votes by the same voter, a few retries of the same ``vote_id``, a few
  invalid ballots that must be refused with their 4xx, now and then a look at
  the results. A 503 counts under ``POST /api/vote (503 shed)`` and is retried
  once with its ``vote_id`` after ``Retry-After``.
- :class:`Watcher`: holds ``/api/polls/{id}/live`` open for a while, reading
  tally events, then reconnects.
- :class:`VoteflowShape`: the reference stages of :mod:`loadtest.profile`,
  scaled by ``--scale`` / ``--time-scale`` and ended by ``--run-time``.
- Every vote answered 202 goes into this process's ledger file
  (``VOTEFLOW_LOADTEST_LEDGER``) for ``python -m loadtest.verdict``.
- When the run ends, the thresholds (p95, failures, 503 share) set the exit code.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from http.client import HTTPException
from pathlib import Path
from typing import Any, TypeVar

import gevent
from gevent.event import Event
from locust import LoadTestShape, between, events, task
from locust.contrib.fasthttp import FastHttpUser
from locust.env import Environment
from locust.runners import MasterRunner, WorkerRunner

from loadtest.profile import (
    DEFAULT_LEDGER,
    ENV_LEDGER,
    ENV_MAX_FAILURES,
    ENV_MAX_P95_MS,
    ENV_MAX_SHED,
    ENV_SCALE,
    ENV_TIME_SCALE,
    INVALID,
    SHED,
    VOTE,
    Ledger,
    Profile,
    Thresholds,
)

log = logging.getLogger("voteflow.loadtest")

POLLS_MESSAGE = "voteflow_polls"
NEED_POLLS_MESSAGE = "voteflow_need_polls"
# How long a user waits at start for the polls of the run before giving up.
PLAN_TIMEOUT = 60.0
# A watcher keeps a stream open this long (seconds, before --time-scale), then reconnects.
WATCH_SECONDS = (5.0, 20.0)
# The first tally event is sent at once; a stream without one this long is a failure.
FIRST_EVENT_TIMEOUT = 10.0
# A voter remembers this many of its (poll, voter) ballots for re-votes.
REMEMBERED_BALLOTS = 20
MAX_RETRY_AFTER = 5.0

# locust.contrib.fasthttp.ResponseContextManager, whose methods are untyped.
Response = Any


@dataclass(frozen=True, slots=True)
class Poll:
    id: str
    options: tuple[str, ...]
    allow_multiple_votes: bool
    max_choices: int

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Poll:
        """A poll as the admin API answers it, or as a master sends it (asdict)."""
        options = tuple(o if isinstance(o, str) else o["id"] for o in body["options"])
        return cls(
            body["id"], options, bool(body["allow_multiple_votes"]), int(body["max_choices"])
        )


@dataclass
class Run:
    """What this Locust process knows of the current test: the polls, its
    ledger, and whether setting up failed. One per process (Locust runs one
    test at a time); each test start renews the ledger, and the master's or
    local runner's test start creates new polls."""

    hot: Poll | None = None
    small: list[Poll] = field(default_factory=list)
    ready: Event = field(default_factory=Event)
    ledger: Ledger | None = None
    setup_error: str = ""

    def plan(self) -> dict[str, Any]:
        assert self.hot is not None
        return {"hot": asdict(self.hot), "small": [asdict(p) for p in self.small]}

    def adopt(self, plan: dict[str, Any]) -> None:
        self.hot = Poll.from_json(plan["hot"])
        self.small = [Poll.from_json(p) for p in plan["small"]]
        self.ready.set()


RUN = Run()

Handler = TypeVar("Handler", bound=Callable[..., None])


def listen(hook: Any) -> Callable[[Handler], Handler]:
    """``@hook.add_listener`` for a typed handler (Locust's EventHook is untyped)."""

    def register(handler: Handler) -> Handler:
        hook.add_listener(handler)
        return handler

    return register


# -- options and set-up --------------------------------------------------------


@listen(events.init_command_line_parser)
def _options(parser: Any) -> None:
    parser.add_argument(
        "--admin-token",
        env_var="VOTEFLOW_ADMIN_TOKEN",
        default="",
        is_secret=True,
        help="bearer token of voteflow's admin API, to create the polls (VOTEFLOW_ADMIN_TOKEN)",
    )
    parser.add_argument(
        "--small-polls", type=int, default=50, help="small polls beside the hot one (default 50)"
    )
    defaults = Thresholds.from_env()
    for flag, env, default, what in (
        ("--scale", ENV_SCALE, 1.0, "users as a share of the reference profile's 50,000"),
        ("--time-scale", ENV_TIME_SCALE, 1.0, "stage durations as a share of the 3.5 minutes"),
        ("--max-p95-ms", ENV_MAX_P95_MS, defaults.max_p95_ms, "p95 response time limit in ms"),
        ("--max-failures", ENV_MAX_FAILURES, defaults.max_failures, "failure share, 0.05 = 5%%"),
        ("--max-shed", ENV_MAX_SHED, defaults.max_shed, "share of votes answered 503 allowed"),
    ):  # fmt: skip
        help = f"{what} ({env}; default {default:g})"
        parser.add_argument(flag, type=float, env_var=env, default=default, help=help)


@listen(events.init)
def _register_messages(environment: Environment, **_: Any) -> None:
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        runner.register_message(POLLS_MESSAGE, lambda msg, **_: RUN.adopt(msg.data))
    elif isinstance(runner, MasterRunner):

        def send_plan(msg: Any, **_: Any) -> None:
            if RUN.ready.is_set():
                runner.send_message(POLLS_MESSAGE, RUN.plan(), client_id=msg.node_id)

        runner.register_message(NEED_POLLS_MESSAGE, send_plan)


@listen(events.test_start)
def _test_start(environment: Environment, **_: Any) -> None:
    RUN.ledger = Ledger(Path(os.environ.get(ENV_LEDGER) or DEFAULT_LEDGER))
    runner = environment.runner
    if isinstance(runner, WorkerRunner):
        # The master sends the polls before it sends users: they are usually
        # here already. A worker that joined later asks.
        if not RUN.ready.is_set():
            runner.send_message(NEED_POLLS_MESSAGE)
        return
    RUN.ready.clear()
    RUN.setup_error = ""
    try:
        _create_polls(environment)
    except (OSError, ValueError, KeyError) as exc:
        RUN.setup_error = f"could not create the polls: {exc}"
        log.error(RUN.setup_error)
        if runner is not None:
            gevent.spawn(runner.quit)
        return
    log.info("created the hot poll %s and %d small polls", RUN.hot and RUN.hot.id, len(RUN.small))
    if isinstance(runner, MasterRunner):
        runner.send_message(POLLS_MESSAGE, RUN.plan())


def _create_polls(environment: Environment) -> None:
    options = environment.parsed_options
    token = getattr(options, "admin_token", "") if options else ""
    if not token:
        raise ValueError("no admin token: pass --admin-token or set VOTEFLOW_ADMIN_TOKEN")
    host = (environment.host or "").rstrip("/")
    count = getattr(options, "small_polls", 50) if options else 50
    rng = random.Random()

    def create(body: dict[str, Any]) -> Poll:
        request = urllib.request.Request(
            f"{host}/api/polls",
            data=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return Poll.from_json(json.loads(response.read()))
        except urllib.error.HTTPError as exc:
            raise ValueError(f"POST /api/polls answered {exc.code}: {exc.read()[:200]!r}") from exc

    hot = create(
        {
            "question": "Load test: the hot poll",
            "options": ["Blue", "Green", "Orange", "Purple"],
            "allow_multiple_votes": False,
            "max_choices": 1,
        }
    )
    small = []
    for n in range(count):
        labels = [f"option {k}" for k in range(1, rng.randint(2, 6) + 1)]
        multiple = n % 3 == 0
        small.append(
            create(
                {
                    "question": f"Load test: small poll {n}",
                    "options": labels,
                    "allow_multiple_votes": multiple,
                    "max_choices": min(len(labels), 2 if multiple else 1 + n % 2),
                }
            )
        )
    RUN.hot, RUN.small = hot, small
    RUN.ready.set()


@listen(events.test_stop)
def _test_stop(environment: Environment, **_: Any) -> None:
    if RUN.ledger is not None:
        RUN.ledger.close()


@listen(events.quitting)
def _quitting(environment: Environment, **_: Any) -> None:
    if RUN.ledger is not None:
        RUN.ledger.close()
    if isinstance(environment.runner, WorkerRunner):
        return  # the master judges the whole run
    environment.process_exit_code = judge(environment)


def judge(environment: Environment) -> int:
    """Print the thresholds' verdicts; 0 if all pass."""
    stats = environment.stats
    total = stats.total
    votes = sum(
        e.num_requests
        for e in stats.entries.values()
        if e.name.startswith(VOTE) and not e.name.startswith(INVALID)
    )
    shed = sum(e.num_requests for e in stats.entries.values() if e.name == SHED)
    options = environment.parsed_options
    default = Thresholds.from_env()
    thresholds = Thresholds(
        max_p95_ms=float(getattr(options, "max_p95_ms", default.max_p95_ms)),
        max_failures=float(getattr(options, "max_failures", default.max_failures)),
        max_shed=float(getattr(options, "max_shed", default.max_shed)),
    )
    lines = thresholds.check(
        requests=total.num_requests,
        failures=total.num_failures,
        p95_ms=float(total.get_response_time_percentile(0.95) or 0.0),
        votes=votes,
        shed=shed,
    )
    runner = environment.runner
    exceptions = len(runner.exceptions) if runner is not None else 0
    if exceptions:
        lines.append(f"FAIL {exceptions} exception(s) in the locustfile's tasks")
    if RUN.setup_error:
        lines.append(f"FAIL {RUN.setup_error}")
    for line in lines:
        print(f"THRESHOLD: {line}", flush=True)
    failed = any(line.startswith("FAIL") for line in lines)
    print(f"THRESHOLDS: {'FAIL' if failed else 'PASS'}", flush=True)
    return 1 if failed else 0


def _wait_for_plan() -> None:
    if not RUN.ready.wait(timeout=PLAN_TIMEOUT):
        raise RuntimeError(f"no polls {PLAN_TIMEOUT:.0f}s after the test started")


def _time_scale(environment: Environment) -> float:
    options = environment.parsed_options
    return float(getattr(options, "time_scale", 1.0)) if options else 1.0


# -- voters -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Ballot:
    poll: Poll
    body: dict[str, Any]


class Voter(FastHttpUser):
    """One slot of the crowd: each new ballot is a new person, most on the hot poll."""

    weight = 19
    wait_time = between(0.5, 3.0)
    network_timeout = 30.0
    connection_timeout = 10.0

    def on_start(self) -> None:
        _wait_for_plan()
        self.rng = random.Random()
        self.tag = uuid.uuid4().hex[:12]
        self.people = 0
        self.ballots: list[Ballot] = []  # recent accepted ones, for re-votes and retries

    # The mix: weights are per task pick.
    @task(55)
    def vote_on_hot_poll(self) -> None:
        assert RUN.hot is not None
        self._new_ballot(RUN.hot)

    @task(20)
    def vote_on_small_poll(self) -> None:
        self._new_ballot(self.rng.choice(RUN.small))

    @task(8)
    def re_vote(self) -> None:
        """The same voter changes their mind: a new vote_id, other options."""
        if not self.ballots:
            return self.vote_on_hot_poll()
        earlier = self.rng.choice(self.ballots)
        body = dict(earlier.body)
        body["option_ids"] = self._choose(earlier.poll)
        body["vote_id"] = str(uuid.uuid4())
        self._send(Ballot(earlier.poll, body), f"{VOTE} (re-vote)")

    @task(5)
    def retry_same_vote_id(self) -> None:
        """A client that did not see its 202 sends the very same ballot again."""
        if not self.ballots:
            return self.vote_on_small_poll()
        self._send(self.rng.choice(self.ballots), f"{VOTE} (retry same vote_id)")

    @task(5)
    def invalid_ballot(self) -> None:
        """A broken client: refused with its 4xx, nothing queued."""
        assert RUN.hot is not None
        kind = self.rng.choice(INVALID_KINDS)
        if kind == "not json":
            self._expect_refusal(kind, 400, data='{"poll_id": ', body=None)
            return
        body = self._body(self.rng.choice(RUN.small))
        expected = 422
        if kind == "option of another poll":
            body["option_ids"] = [RUN.hot.options[0]]
        elif kind == "no options":
            body["option_ids"] = []
        elif kind == "too many options":  # the hot poll takes one option per ballot
            body = self._body(RUN.hot)
            body["option_ids"] = list(RUN.hot.options[:2])
        elif kind == "no voter":
            body.pop("voter_fingerprint", None)
            body.pop("user_id", None)
        elif kind == "unknown poll":
            body["poll_id"] = str(uuid.uuid4())
            expected = 404
        self._expect_refusal(kind, expected, data=None, body=body)

    @task(7)
    def look_at_results(self) -> None:
        poll = RUN.hot if self.rng.random() < 0.6 else self.rng.choice(RUN.small)
        assert poll is not None
        name = "GET /api/polls/[id]/results"
        with self.client.get(
            f"/api/polls/{poll.id}/results", name=name, catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {(response.text or '')[:200]}")
                return
            if response.json().get("poll_id") != poll.id:
                response.failure("the results name another poll")

    # -- helpers --

    def _new_ballot(self, poll: Poll) -> None:
        self._send(Ballot(poll, self._body(poll)), VOTE)

    def _body(self, poll: Poll) -> dict[str, Any]:
        self.people += 1
        person = f"lt-{self.tag}-{self.people}"
        body: dict[str, Any] = {"poll_id": poll.id, "option_ids": self._choose(poll)}
        if self.rng.random() < 0.2:
            body["user_id"] = person
        else:
            body["voter_fingerprint"] = person
        # Most clients choose their vote_id (the idempotency key); some let the edge do it.
        if self.rng.random() < 0.9:
            body["vote_id"] = str(uuid.uuid4())
        return body

    def _choose(self, poll: Poll) -> list[str]:
        k = self.rng.randint(1, poll.max_choices)
        return self.rng.sample(poll.options, k)

    def _send(self, ballot: Ballot, name: str, retry: bool = True) -> None:
        body = ballot.body
        with self.client.post("/api/vote", json=body, name=name, catch_response=True) as response:
            status = response.status_code
            if status == 202:
                vote_id = _accepted_vote_id(response, body)
                if vote_id is None:
                    return
                if "vote_id" not in body:  # retries and re-votes reuse the edge's
                    body = {**body, "vote_id": vote_id}
                if RUN.ledger is not None:
                    RUN.ledger.record(vote_id, ballot.poll.id, body)
                self._remember(Ballot(ballot.poll, body))
                return
            if status != 503:
                response.failure(f"{status}: {(response.text or '')[:200]}")
                return
            # Shed (the backlog is full) or Redis away: not a failure up to
            # --max-shed of the votes; counted apart, under SHED.
            response.request_meta["name"] = SHED
            response.success()
            retry_after = _retry_after(response)
            edge_vote_id = _json(response).get("vote_id")
        if not retry:
            return
        if "vote_id" not in body and isinstance(edge_vote_id, str):
            body = {**body, "vote_id": edge_vote_id}
        gevent.sleep(min(retry_after, MAX_RETRY_AFTER) * _time_scale(self.environment))
        self._send(Ballot(ballot.poll, body), f"{VOTE} (retry after 503)", retry=False)

    def _remember(self, ballot: Ballot) -> None:
        if ballot not in self.ballots:
            self.ballots.append(ballot)
            del self.ballots[:-REMEMBERED_BALLOTS]

    def _expect_refusal(
        self, kind: str, expected: int, *, data: str | None, body: dict[str, Any] | None
    ) -> None:
        name = f"{INVALID}: {kind}, expect {expected})"
        with self.client.post(
            "/api/vote",
            data=data,
            json=body,
            headers={"Content-Type": "application/json"},
            name=name,
            catch_response=True,
        ) as response:
            if response.status_code == expected:
                response.success()
            else:
                response.failure(f"expected {expected}, got {response.status_code}")


INVALID_KINDS = (
    "not json",
    "option of another poll",
    "no options",
    "too many options",
    "no voter",
    "unknown poll",
)


def _json(response: Response) -> dict[str, Any]:
    try:
        body = response.json()
    except (ValueError, TypeError):
        return {}
    return body if isinstance(body, dict) else {}


def _accepted_vote_id(response: Response, sent: dict[str, Any]) -> str | None:
    """The vote_id of a 202, checked against the one sent; None (and a failure) if wrong."""
    answer = _json(response)
    vote_id = answer.get("vote_id")
    if answer.get("status") != "queued" or not isinstance(vote_id, str):
        response.failure(f"202 with an unexpected body: {(response.text or '')[:200]}")
        return None
    if "vote_id" in sent and vote_id != sent["vote_id"]:
        response.failure(f"202 for vote_id {vote_id}, sent {sent['vote_id']}")
        return None
    return vote_id


def _retry_after(response: Response) -> float:
    raw = (response.headers or {}).get("Retry-After")
    try:
        return float(raw) if isinstance(raw, str) else 1.0
    except ValueError:
        return 1.0


# -- dashboard watchers -------------------------------------------------------


class Watcher(FastHttpUser):
    """A dashboard: the live tallies of one poll, for a while, then again."""

    weight = 1
    wait_time = between(1.0, 3.0)
    network_timeout = 30.0  # longer than the edge's 15 s heartbeat
    connection_timeout = 10.0

    def on_start(self) -> None:
        _wait_for_plan()
        self.rng = random.Random()

    @task
    def watch(self) -> None:
        poll = RUN.hot if self.rng.random() < 0.7 else self.rng.choice(RUN.small)
        assert poll is not None
        seconds = self.rng.uniform(*WATCH_SECONDS) * _time_scale(self.environment)
        started = time.perf_counter()
        with self.client.get(
            f"/api/polls/{poll.id}/live",
            name="GET /api/polls/[id]/live",
            headers={"Accept": "text/event-stream", "Accept-Encoding": "identity"},
            stream=True,
            catch_response=True,
        ) as response:
            content_type = (response.headers or {}).get("Content-Type", "")
            if response.status_code != 200 or not content_type.startswith("text/event-stream"):
                response.failure(f"{response.status_code} {content_type}")
                _close(response)
                return
        try:
            self._read(response, poll, started, max(seconds, 1.0))
        finally:
            _close(response)

    def _read(self, response: Response, poll: Poll, started: float, seconds: float) -> None:
        stream = response._response
        assert stream is not None
        events_seen = 0
        version = -1
        data = ""
        deadline = started + seconds
        try:
            with gevent.Timeout(seconds, False):
                while True:
                    line = stream.readline(b"\n")
                    if not line:
                        break  # the edge ended the stream
                    text = line.decode("utf-8", "replace").rstrip("\r\n")
                    if text.startswith("data:"):
                        data = text[5:].strip()
                    elif text == "" and data:
                        tally = json.loads(data)
                        data = ""
                        if events_seen == 0:
                            self._fire("first tally event", started, None)
                        events_seen += 1
                        if tally.get("poll_id") != poll.id or tally["version"] < version:
                            self._fire("tally order", started, ValueError(f"bad tally {tally}"))
                            return
                        version = tally["version"]
                    if events_seen == 0 and time.perf_counter() - started > FIRST_EVENT_TIMEOUT:
                        break
        except (OSError, ValueError, KeyError, HTTPException) as exc:
            if time.perf_counter() < deadline:
                self._fire("stream", started, exc)
            return
        if events_seen == 0:
            self._fire("first tally event", started, TimeoutError("no tally event"))

    def _fire(self, name: str, started: float, exception: Exception | None) -> None:
        self.environment.events.request.fire(
            request_type="SSE",
            name=name,
            response_time=(time.perf_counter() - started) * 1000,
            response_length=0,
            exception=exception,
            context={},
        )


def _close(response: Response) -> None:
    """Drop the connection: an unfinished stream must not go back to the pool."""
    stream = response._response
    if stream is not None:
        stream.release()  # closes the socket, the message being incomplete


# -- the load shape -----------------------------------------------------------


class VoteflowShape(LoadTestShape):
    """The reference stages, scaled by --scale and --time-scale; --run-time ends it early."""

    use_common_options = True  # it reads --run-time as a hard bound

    def tick(self) -> tuple[int, float] | None:
        options = self.runner.environment.parsed_options if self.runner else None
        profile = Profile(
            scale=float(getattr(options, "scale", 1.0)),
            time_scale=float(getattr(options, "time_scale", 1.0)),
            max_run_time=getattr(options, "run_time", None) or None,
        )
        started: float = self.start_time  # LoadTestShape.get_run_time, which is untyped
        return profile.tick(time.perf_counter() - started)
