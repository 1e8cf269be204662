"""voteflow's stream writers, run by arq: ``arq workers.WorkerSettings``."""

from __future__ import annotations

from typing import Any


def __getattr__(name: str) -> Any:
    # Built on first use, not at import: reading the environment is start-up
    # work, and importing a module of this package must not need a Redis URL.
    if name == "WorkerSettings":
        from voteflow.settings import Settings

        from .worker import worker_settings

        return type("WorkerSettings", (), worker_settings(Settings.from_env()))
    raise AttributeError(name)
