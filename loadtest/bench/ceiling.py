"""Stage 1, the HTTP ceiling: requests/s of ``ceiling_app`` (aiohttp + uvloop +
orjson, one process, the body parsed, 202, no storage). What the edge could
answer if appending to Redis cost nothing."""

from __future__ import annotations

import sys
import uuid

from voteflow.servers import HOST, free_port

from .stack import Bench
from .stage import WrkStage


class HttpCeiling(WrkStage):
    number = 1
    name = "http-ceiling"
    unit = "req/s"
    title = "bare aiohttp + uvloop + orjson app, one process: parse the vote, answer 202"

    def start(self, bench: Bench) -> None:
        super().start(bench)
        port = free_port()
        argv = [sys.executable, "-m", "loadtest.bench.ceiling_app", "--port", str(port)]
        app = bench.spawn("ceiling_app", argv, bench.child_env())
        self.url = f"http://{HOST}:{port}"
        app.wait_http(f"{self.url}/health")
        self.server = app
        # The app checks nothing: any ids do.
        self.poll_id = str(uuid.uuid4())
        self.option_ids = [str(uuid.uuid4()) for _ in range(4)]
