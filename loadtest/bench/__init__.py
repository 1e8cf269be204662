"""`make bench`: voteflow's throughput next to what bounds it, in one run.

    python -m loadtest.bench [--quick] [--stages 1,2,3] [--repeats 3] [--duration 8]

Before it starts, the bench prints how long each stage will take (``timing``):
every stage fits in about 10 minutes on 2 cores, in about 3 with ``--quick``.

Stages, each a module here, each measured with wrk (``vote.lua``: a new
voter and vote_id on every request):

1. ``ceiling``: the HTTP ceiling, a bare aiohttp + uvloop + orjson app in one
   process (``ceiling_app``) that parses the vote and answers 202.
2. ``edge``: the real edge (``python -m voteflow edge``) appending to Redis
   Streams (``appendfsync always``), no worker running; ratio to (1).
3. ``naive``: the design voteflow replaces (``naive_app``): SELECT, DELETE,
   INSERT in PostgreSQL per vote; the ratio of (2) to it.

4. ``drain``: how fast workers empty a backlog, against PostgreSQL alone.
5. ``steady``, 6. ``spike``, 7. ``cost``: the whole pipeline at a fixed rate,
   at a 50,000-vote spike, and flat out with CPU per process.
8. ``fanout``: thousands of SSE watchers on one edge while votes flow.
9. / 10. ``replicas``: the edge on a Redis Cluster, without and with a
   replica's confirmation of each append.
11. ``cluster_cost``: the pipeline on a Redis Cluster, 1 edge + 1 worker and
    2 + 2, CPU per vote and exactness.
12. ``edge-2-processes``: the edge as two processes; 13. ``edge-voter-tokens``: the
    edge verifying a voter token on every vote.

Each stage is registered in ``cli.STAGES``.

The stages run in rounds, one repeat of each per round, so the shared
machine's noise falls on each alike; ratios are taken within a round. The
table and ``bench/results/<UTC timestamp>.json`` show medians and spreads,
the server's CPU seconds per 1,000 requests and wrk's own CPU use; the JSON
is rewritten after each measured run (``"complete": false`` until the end),
and the goals (``goals``) are judged from it. ``--compare A.json B.json``
prints two kept runs side by side (``compare``). Every
process the bench starts (private PostgreSQL and Redis, the edge, the apps,
wrk) is stopped when it ends, also on Ctrl-C.
"""
