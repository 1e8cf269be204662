"""`make bench`: voteflow's throughput next to what bounds it, in one run.

    python -m loadtest.bench [--quick] [--stages 1,2,3] [--repeats 3] [--duration 8]

A stage is a Stage subclass (``stage``) registered in ``cli.STAGES``:
``baselines`` (1 the HTTP ceiling, 3 the naive design), ``edge`` (2, 9, 10,
12, 13: the edge alone), ``drain`` (4), and on voteflow's whole pipeline
(``pipeline``) ``steady`` (5), ``spike`` (6), ``cost`` (7, 11) and ``fanout``
(8). ``--help`` lists them and docs/benchmarks.md says what each measures and
how. The stages run in rounds, one repeat of each per round, so the shared
machine's noise falls on each alike; ratios are taken within a round.
``report`` prints the table and keeps ``bench/results/<UTC timestamp>.json``,
``goals`` judges the cost goals, ``timing`` plans the run and says what it
took, ``compare`` sets two kept runs side by side. Every process the bench
starts is stopped when it ends, also on Ctrl-C.
"""
