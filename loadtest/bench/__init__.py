"""`make bench`: voteflow's throughput next to what bounds it, in one run.

    python -m loadtest.bench [--quick] [--stages 1,2,3] [--repeats 3] [--duration 8]

Each stage is a module here with a Stage subclass (``stage``), registered in
``cli.STAGES``; ``--help`` lists them and docs/benchmarks.md says what each
measures and how. Before it starts, the bench prints how long each stage will
take (``timing``): every stage fits in about 10 minutes on 2 cores, in about 3
with ``--quick``. The stages run in rounds, one repeat of each per round, so
the shared machine's noise falls on each alike; ratios are taken within a
round. The table and ``bench/results/<UTC timestamp>.json`` (``report``) show
medians and spreads; the JSON is rewritten after each measured run
(``"complete": false`` until the end), and the goals (``goals``) are judged
from it; ``--compare A.json B.json`` prints two kept runs side by side
(``compare``). Every process the bench starts is stopped when it ends, also
on Ctrl-C.
"""
