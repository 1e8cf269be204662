"""The Locust profile: voters and dashboard watchers against voteflow.

    locust -f loadtest/locustfile.py --headless --host http://127.0.0.1:8080 \\
        --admin-token TOKEN --scale 0.01

``python -m loadtest.run`` starts a private stack and runs this for you;
docs/benchmarks.md ("Load test") describes the profile. At test start the
master (or the only process) creates the polls; every vote answered 202 goes
into this process's ledger for ``python -m loadtest.verdict``; when the run
ends, the thresholds set the exit code.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import random
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Any, TypeVar

import gevent
from locust import LoadTestShape, between, events, task
from locust.contrib.fasthttp import FastHttpUser
from locust.env import Environment
from locust.runners import WorkerRunner

from loadtest.profile import (
    DEFAULT_LEDGER,
    ENV_LEDGER,
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

# A watcher keeps a stream open this long (seconds, before --time-scale), then reconnects.
WATCH_SECONDS = (5.0, 20.0)
# The first tally event is sent at once; a stream without one this long is a failure.
FIRST_EVENT_TIMEOUT = 10.0
# A voter remembers this many of its accepted ballots for re-votes and retries.
REMEMBERED_BALLOTS = 20
MAX_RETRY_AFTER = 5.0
INVALID_KINDS = (
    "not json",
    "option of another poll",
    "no options",
    "too many options",
    "no voter",
    "unknown poll",
)


@dataclass(frozen=True, slots=True)
class Poll:
    id: str
    options: tuple[str, ...]
    max_choices: int

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Poll:
        """A poll as the admin API answers it, or as the master sends it (asdict)."""
        options = tuple(o if isinstance(o, str) else o["id"] for o in body["options"])
        return cls(body["id"], options, int(body["max_choices"]))


@dataclass
class Run:
    """This process's part of the current test (Locust runs one at a time)."""

    ledger: Ledger | None = None
    setup_error: str = ""


RUN = Run()

Handler = TypeVar("Handler", bound=Callable[..., None])


def listen(hook: Any) -> Callable[[Handler], Handler]:
    """``@hook.add_listener`` for a typed handler (Locust's EventHook is untyped)."""

    def register(handler: Handler) -> Handler:
        hook.add_listener(handler)
        return handler

    return register


# -- options, set-up, verdict -----------------------------------------------------


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
    for flag, env, what in (
        ("--scale", ENV_SCALE, "users as a share of the reference profile's 50,000"),
        ("--time-scale", ENV_TIME_SCALE, "stage durations as a share of the 3.5 minutes"),
    ):
        help = f"{what} ({env}; default 1)"
        parser.add_argument(flag, type=float, env_var=env, default=1.0, help=help)
    limits = Thresholds.from_env()  # the environment's limits are the flags' defaults
    for name, (env, what) in Thresholds.OPTIONS.items():
        default = getattr(limits, name)
        help = f"{what} ({env}; default {default:g})"
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=default, help=help)


@listen(events.test_start)
def _test_start(environment: Environment, **_: Any) -> None:
    RUN.ledger = Ledger(Path(os.environ.get(ENV_LEDGER) or DEFAULT_LEDGER))
    runner, options = environment.runner, environment.parsed_options
    if isinstance(runner, WorkerRunner) or options is None:
        return
    RUN.setup_error = ""
    polls: list[Poll] = []
    try:
        polls = _create_polls(environment.host or "", options.admin_token, options.small_polls)
        log.info("created the hot poll %s and %d small polls", polls[0].id, len(polls) - 1)
    except (OSError, ValueError, KeyError) as exc:
        RUN.setup_error = f"could not create the polls: {exc}"
        log.error(RUN.setup_error)
        if runner is not None:
            gevent.spawn(runner.quit)
    # Locust sends the custom attributes of parsed_options to its workers with
    # each spawn message, and sends the first only after this handler returns:
    # the workers' users find the polls where the local ones do.
    options.voteflow_polls = [asdict(poll) for poll in polls]


def _create_polls(host: str, token: str, count: int) -> list[Poll]:
    """The hot single-vote poll, then ``count`` small ones, every third
    allowing multiple votes."""
    if not token:
        raise ValueError("no admin token: pass --admin-token or set VOTEFLOW_ADMIN_TOKEN")

    def create(**body: Any) -> Poll:
        request = urllib.request.Request(
            f"{host.rstrip('/')}/api/polls",
            data=json.dumps(body).encode(),
            headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
            method="POST",
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return Poll.from_json(json.loads(response.read()))
        except urllib.error.HTTPError as exc:
            raise ValueError(f"POST /api/polls answered {exc.code}: {exc.read()[:200]!r}") from exc

    hot = ["Blue", "Green", "Orange", "Purple"]
    polls = [create(question="Load test: the hot poll", options=hot, max_choices=1)]
    rng = random.Random()
    for n in range(count):
        labels = [f"option {k}" for k in range(1, rng.randint(2, 6) + 1)]
        multiple = n % 3 == 0
        polls.append(
            create(
                question=f"Load test: small poll {n}",
                options=labels,
                allow_multiple_votes=multiple,
                max_choices=min(len(labels), 2 if multiple else 1 + n % 2),
            )
        )
    return polls


@listen(events.test_stop)
def _close_ledger(**_: Any) -> None:
    if RUN.ledger is not None:
        RUN.ledger.close()


@listen(events.quitting)
def _quitting(environment: Environment, **_: Any) -> None:
    _close_ledger()
    if not isinstance(environment.runner, WorkerRunner):  # the master judges the whole run
        environment.process_exit_code = judge(environment)


def judge(environment: Environment) -> int:
    """Print the thresholds' verdicts; 0 if all pass."""
    total, entries = environment.stats.total, environment.stats.entries.values()
    options = environment.parsed_options
    thresholds = Thresholds(**{name: getattr(options, name) for name in Thresholds.OPTIONS})
    lines = thresholds.check(
        requests=total.num_requests,
        failures=total.num_failures,
        p95_ms=float(total.get_response_time_percentile(0.95) or 0.0),
        votes=sum(
            e.num_requests
            for e in entries
            if e.name.startswith(VOTE) and not e.name.startswith(INVALID)
        ),
        shed=sum(e.num_requests for e in entries if e.name == SHED),
    )
    runner = environment.runner
    if runner is not None and runner.exceptions:
        lines.append(f"FAIL {len(runner.exceptions)} exception(s) in the locustfile's tasks")
    if RUN.setup_error:
        lines.append(f"FAIL {RUN.setup_error}")
    for line in lines:
        print(f"THRESHOLD: {line}", flush=True)
    failed = any(line.startswith("FAIL") for line in lines)
    print(f"THRESHOLDS: {'FAIL' if failed else 'PASS'}", flush=True)
    return 1 if failed else 0


# -- the users --------------------------------------------------------------------


class Visitor(FastHttpUser):
    """What voters and watchers share: the run's polls, a random source, timeouts."""

    abstract = True
    network_timeout = 30.0  # longer than the edge's 15 s SSE heartbeat
    connection_timeout = 10.0

    def on_start(self) -> None:
        options = self.environment.parsed_options
        polls = [Poll.from_json(p) for p in getattr(options, "voteflow_polls", None) or ()]
        if not polls:
            raise RuntimeError("no polls for this run: the master could not create them")
        self.hot, *self.small = polls
        self.time_scale = float(getattr(options, "time_scale", 1.0))
        self.rng = random.Random()

    def any_poll(self, hot_share: float) -> Poll:
        return self.hot if self.rng.random() < hot_share else self.rng.choice(self.small)


class Voter(Visitor):
    """One slot of the crowd: each new ballot is a new person, most on the hot poll."""

    weight = 19
    wait_time = between(0.5, 3.0)

    def on_start(self) -> None:
        super().on_start()
        self.tag = uuid.uuid4().hex[:12]
        self.people = 0
        self.ballots: list[tuple[Poll, dict[str, Any]]] = []  # recent accepted ones

    # The mix: weights are per task pick.
    @task(55)
    def vote_on_hot_poll(self) -> None:
        self._send(self.hot, self._body(self.hot), VOTE)

    @task(20)
    def vote_on_small_poll(self) -> None:
        poll = self.rng.choice(self.small)
        self._send(poll, self._body(poll), VOTE)

    @task(8)
    def re_vote(self) -> None:
        """The same voter changes their mind: a new vote_id, other options."""
        if not self.ballots:
            return self.vote_on_hot_poll()
        poll, earlier = self.rng.choice(self.ballots)
        body = {**earlier, "option_ids": self._choose(poll), "vote_id": str(uuid.uuid4())}
        self._send(poll, body, f"{VOTE} (re-vote)")

    @task(5)
    def retry_same_vote_id(self) -> None:
        """A client that did not see its 202 sends the very same ballot again."""
        if not self.ballots:
            return self.vote_on_small_poll()
        poll, body = self.rng.choice(self.ballots)
        self._send(poll, body, f"{VOTE} (retry same vote_id)")

    @task(5)
    def invalid_ballot(self) -> None:
        """A broken client: refused with its 4xx, nothing queued."""
        kind = self.rng.choice(INVALID_KINDS)
        body = self._body(self.hot if kind == "too many options" else self.rng.choice(self.small))
        request: dict[str, Any] = {"json": body}
        expected = 422
        if kind == "not json":
            request, expected = {"data": '{"poll_id": '}, 400
        elif kind == "option of another poll":
            body["option_ids"] = [self.hot.options[0]]
        elif kind == "no options":
            body["option_ids"] = []
        elif kind == "too many options":  # the hot poll takes one option per ballot
            body["option_ids"] = list(self.hot.options[:2])
        elif kind == "no voter":
            body.pop("voter_fingerprint", None)
            body.pop("user_id", None)
        elif kind == "unknown poll":
            body["poll_id"] = str(uuid.uuid4())
            expected = 404
        with self.client.post(
            "/api/vote",
            **request,
            headers={"Content-Type": "application/json"},
            name=f"{INVALID}: {kind}, expect {expected})",
            catch_response=True,
        ) as response:
            if response.status_code == expected:
                response.success()
            else:
                response.failure(f"expected {expected}, got {response.status_code}")

    @task(7)
    def look_at_results(self) -> None:
        poll = self.any_poll(hot_share=0.6)
        with self.client.get(
            f"/api/polls/{poll.id}/results",
            name="GET /api/polls/[id]/results",
            catch_response=True,
        ) as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {(response.text or '')[:200]}")
            elif response.json().get("poll_id") != poll.id:
                response.failure("the results name another poll")

    def _body(self, poll: Poll) -> dict[str, Any]:
        self.people += 1
        person = f"lt-{self.tag}-{self.people}"
        body: dict[str, Any] = {"poll_id": poll.id, "option_ids": self._choose(poll)}
        body["user_id" if self.rng.random() < 0.2 else "voter_fingerprint"] = person
        # Most clients choose their vote_id (the idempotency key); some let the edge do it.
        if self.rng.random() < 0.9:
            body["vote_id"] = str(uuid.uuid4())
        return body

    def _choose(self, poll: Poll) -> list[str]:
        return self.rng.sample(poll.options, self.rng.randint(1, poll.max_choices))

    def _send(self, poll: Poll, body: dict[str, Any], name: str, retry: bool = True) -> None:
        with self.client.post("/api/vote", json=body, name=name, catch_response=True) as response:
            status = response.status_code
            answer: Any = None
            with contextlib.suppress(ValueError, TypeError):
                answer = response.json()
            vote_id = answer.get("vote_id") if isinstance(answer, dict) else None
            if status == 202:
                if not isinstance(vote_id, str) or answer.get("status") != "queued":
                    response.failure(f"202 with an unexpected body: {(response.text or '')[:200]}")
                elif body.get("vote_id", vote_id) != vote_id:
                    response.failure(f"202 for vote_id {vote_id}, sent {body['vote_id']}")
                else:
                    body = {**body, "vote_id": vote_id}  # retries and re-votes reuse the edge's
                    if RUN.ledger is not None:
                        RUN.ledger.record(vote_id, poll.id, body)
                    if (poll, body) not in self.ballots:
                        self.ballots.append((poll, body))
                        del self.ballots[:-REMEMBERED_BALLOTS]
                return
            if status != 503:
                response.failure(f"{status}: {(response.text or '')[:200]}")
                return
            # Shed (the backlog is full) or Redis away: not a failure up to
            # --max-shed of the votes; counted apart, under SHED, retried once.
            response.request_meta["name"] = SHED
            response.success()
            retry_after = 1.0
            with contextlib.suppress(ValueError):
                retry_after = float((response.headers or {}).get("Retry-After", ""))
        if retry:
            if "vote_id" not in body and isinstance(vote_id, str):
                body = {**body, "vote_id": vote_id}
            gevent.sleep(min(retry_after, MAX_RETRY_AFTER) * self.time_scale)
            self._send(poll, body, f"{VOTE} (retry after 503)", retry=False)


class Watcher(Visitor):
    """A dashboard: the live tallies of one poll, for a while, then again."""

    weight = 1
    wait_time = between(1.0, 3.0)

    @task
    def watch(self) -> None:
        poll = self.any_poll(hot_share=0.7)
        seconds = self.rng.uniform(*WATCH_SECONDS) * self.time_scale
        started = time.perf_counter()
        with self.client.get(
            f"/api/polls/{poll.id}/live",
            name="GET /api/polls/[id]/live",
            headers={"Accept": "text/event-stream", "Accept-Encoding": "identity"},
            stream=True,
            catch_response=True,
        ) as response:
            content_type = (response.headers or {}).get("Content-Type", "")
            ok = response.status_code == 200 and content_type.startswith("text/event-stream")
            if not ok:
                response.failure(f"{response.status_code} {content_type}")
        try:
            if ok:
                self._read(response._response, poll, started, max(seconds, 1.0))
        finally:
            # Drop the connection: an unfinished stream must not go back to
            # the pool (release() closes the socket, the message being incomplete).
            if response._response is not None:
                response._response.release()

    def _read(self, stream: Any, poll: Poll, started: float, seconds: float) -> None:
        """Tally events for ``seconds``: the first at once, then in version order.
        The edge sends each event's JSON on one ``data:`` line."""
        events_seen = 0
        version = -1
        try:
            with gevent.Timeout(seconds, False):
                while line := stream.readline(b"\n"):  # empty: the edge ended the stream
                    if line.startswith(b"data:"):
                        tally = json.loads(line[5:])
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
            if time.perf_counter() < started + seconds:
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
