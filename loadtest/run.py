"""`make loadtest`: a private stack, the Locust profile against it, then the verdict.

    python -m loadtest.run [--scale 0.01] [--time-scale 1.0] [--workers 1] [--processes 1]

The stack starts as `voteflow up` starts it (voteflow.stack), in a temporary
directory, with rate limits off (every simulated user comes from 127.0.0.1);
docs/benchmarks.md ("Load test") says what runs and what it reports, in
loadtest/results/<time>/. Exit status: 0 when the thresholds and the verdict
pass; 1 when either fails; 2 when the stack could not be started.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, cast

import asyncpg
import redis

from loadtest import verdict
from loadtest.profile import ENV_LEDGER, ENV_SCALE, ENV_TIME_SCALE, Profile
from voteflow.children import Child, children, spawn
from voteflow.keys import GROUP, Keys, consumer_of
from voteflow.servers import free_port
from voteflow.settings import Settings
from voteflow.stack import prepare, start

REPO = Path(__file__).resolve().parents[1]
LOCUSTFILE = Path(__file__).resolve().with_name("locustfile.py")
RESULTS = REPO / "loadtest" / "results"
STARTUP_TIMEOUT = 60.0
# Beyond the shape's own duration: Locust's start-up and its last ramp-down.
RUN_TIME_SLACK = 30.0
# The driver's own bound on Locust, past --run-time: SIGTERM, then SIGKILL.
LOCUST_GRACE = 30.0

# What the driver decides for the stack; any other VOTEFLOW_* of the caller's
# environment (shards, batch size, backlog...) reaches the edge and workers.
_OWN = {
    f"VOTEFLOW_{name}"
    for name in ("DATABASE_URL", "REDIS_URL", "HOST", "PORT", "ADMIN_TOKEN", "WORKER_METRICS_PORT")
}


def _wait_consuming(workers: list[Child], keys: Keys, redis_url: str) -> None:
    """Until every worker's consumers (named with its pid) joined every shard's group."""
    deadline = time.monotonic() + STARTUP_TIMEOUT

    def consumes(client: redis.Redis, stream: str, pid: int) -> bool:
        with contextlib.suppress(redis.ResponseError):  # no group yet
            # redis-py types the sync client's answers as Awaitable | Any.
            found = cast(list[dict[str, Any]], client.xinfo_consumers(stream, GROUP))
            return any(consumer_of(c["name"], pid) for c in found)
        return False

    with redis.Redis.from_url(redis_url, decode_responses=True) as client:
        while not all(
            consumes(client, stream, worker.pid) for worker in workers for stream in keys.streams()
        ):
            for worker in workers:
                worker.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"the workers did not consume within {STARTUP_TIMEOUT:.0f}s")
            time.sleep(0.2)


def run(args: argparse.Namespace) -> int:
    profile = Profile(scale=args.scale, time_scale=args.time_scale)
    run_time = args.run_time or int(profile.duration + RUN_TIME_SLACK)
    out = args.results / time.strftime("%Y%m%d-%H%M%S")
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"loadtest: peak {profile.peak:,} users, shape {profile.duration:.0f}s "
        f"(scale {args.scale:g}, time scale {args.time_scale:g}), at most {run_time}s; "
        f"results in {out}",
        flush=True,
    )
    with contextlib.ExitStack() as stack:
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="voteflow-loadtest-")))
        env = {k: v for k, v in os.environ.items() if k not in _OWN}
        env.update(
            VOTEFLOW_HOST="127.0.0.1",
            VOTEFLOW_PORT=str(free_port()),
            VOTEFLOW_ADMIN_TOKEN=secrets.token_urlsafe(24),
            VOTEFLOW_WORKER_METRICS_PORT="0",
            # Every simulated user comes from 127.0.0.1.
            VOTEFLOW_RATE_LIMIT_PER_IP="0",
            VOTEFLOW_RATE_LIMIT_PER_VOTER="0",
            VOTEFLOW_LIVE_MAX_PER_ADDRESS="1000000",
        )
        # Private servers, migrated, and the processes, as `voteflow up` starts them.
        settings = Settings.from_env(env)
        database_url, redis_url = prepare(stack, settings, work, lambda line: None)
        env.update(VOTEFLOW_DATABASE_URL=database_url, VOTEFLOW_REDIS_URL=redis_url)
        url = f"http://127.0.0.1:{settings.port}"
        edge, workers = start(stack, env, url, workers=args.workers, logs=out, cwd=REPO)
        edge.wait_http(f"{url}/ready", STARTUP_TIMEOUT, beside=workers)
        keys = Keys(settings.key_prefix, settings.stream_shards)
        _wait_consuming(workers, keys, redis_url)
        print(f"loadtest: stack up at {url} (1 edge, {args.workers} worker(s))", flush=True)

        ledger = out / "ledger"
        env |= {ENV_SCALE: str(args.scale), ENV_TIME_SCALE: str(args.time_scale)}
        env[ENV_LEDGER] = str(ledger)
        argv = [sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless"]
        argv += ["--host", url, "--run-time", f"{run_time}s", "--stop-timeout", "5"]
        argv += ["--csv", str(out / "locust"), "--html", str(out / "report.html")]
        if args.processes > 1:
            argv += ["--processes", str(args.processes)]
        if args.quiet:
            argv += ["--only-summary", "--loglevel", "WARNING"]
        locust = spawn("locust", argv, env=env, cwd=REPO)
        stack.enter_context(children(LOCUST_GRACE)).append(locust)
        try:
            thresholds_code = locust.popen.wait(timeout=run_time + LOCUST_GRACE)
        except subprocess.TimeoutExpired:
            print("loadtest: Locust outlived its run time; stopping it", file=sys.stderr)
            locust.stop(LOCUST_GRACE)
            thresholds_code = 1

        outcome = asyncio.run(
            verdict.check(
                database_url,
                ledger,
                redis_url=redis_url,
                keys=keys,
                drain_timeout=args.drain_timeout,
            )
        )
        for detail in outcome.details:
            print(f"  {detail}")
        print(outcome.line, flush=True)
    # Everything started above is stopped by now.
    print(
        f"loadtest: reports in {out}: report.html, locust_stats.csv, locust_stats_history.csv, "
        "locust_failures.csv, edge.log, worker*.log, ledger/",
        flush=True,
    )
    thresholds = "PASS" if thresholds_code == 0 else f"FAIL (locust exit {thresholds_code})"
    print(f"loadtest: thresholds {thresholds}; verdict {'PASS' if outcome.passed else 'FAIL'}")
    return 0 if thresholds_code == 0 and outcome.passed else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m loadtest.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--scale",
        type=float,
        default=float(os.environ.get(ENV_SCALE) or 0.01),
        help=f"users as a share of the 50,000 peak (default {ENV_SCALE} or 0.01: 500 users)",
    )
    parser.add_argument(
        "--time-scale",
        type=float,
        default=float(os.environ.get(ENV_TIME_SCALE) or 1.0),
        help=f"stage durations as a share of the 3.5 minutes (default {ENV_TIME_SCALE} or 1)",
    )
    parser.add_argument("--workers", type=int, default=1, help="voteflow worker processes")
    parser.add_argument(
        "--processes", type=int, default=1, help="Locust processes (>1: a master and workers)"
    )
    parser.add_argument(
        "--run-time",
        type=int,
        default=0,
        help="hard bound on Locust in seconds (default: the shape's duration + 30 s)",
    )
    parser.add_argument(
        "--drain-timeout", type=float, default=120.0, help="seconds the verdict waits for the drain"
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help="where run directories go")
    parser.add_argument("--quiet", action="store_true", help="Locust's summary only")
    args = parser.parse_args(argv)
    # SIGTERM as Ctrl-C: the ExitStack in run() stops everything it started.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        return run(args)
    except (KeyboardInterrupt, asyncio.CancelledError):
        # A Ctrl-C during the verdict's asyncio.run() can arrive as
        # CancelledError when the interrupted task was cancelled on its way out.
        print("\nloadtest: interrupted; everything it started is stopped", file=sys.stderr)
        return 1
    except (RuntimeError, OSError, asyncpg.PostgresError, verdict.VerdictError) as exc:
        print(f"loadtest: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
