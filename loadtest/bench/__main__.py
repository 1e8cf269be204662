"""``python -m loadtest.bench``: see loadtest/bench/__init__.py."""

from loadtest.bench.cli import main

raise SystemExit(main())
