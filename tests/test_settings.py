"""Settings are read once from VOTEFLOW_* variables; a bad value stops the start
with a message naming the variable."""

from __future__ import annotations

import pytest

from voteflow.settings import Settings, SettingsError


@pytest.mark.parametrize(("raw", "value"), [("true", True), ("1", True), ("No", False)])
def test_redis_cluster_reads_the_usual_spellings_of_a_boolean(raw: str, value: bool) -> None:
    assert Settings.from_env({"VOTEFLOW_REDIS_CLUSTER": raw}).redis_cluster is value


def test_a_boolean_that_is_neither_stops_the_start_naming_the_variable() -> None:
    with pytest.raises(SettingsError, match="VOTEFLOW_REDIS_CLUSTER must be true or false"):
        Settings.from_env({"VOTEFLOW_REDIS_CLUSTER": "maybe"})


def test_min_replicas_and_statement_cache_refuse_negative_values() -> None:
    with pytest.raises(SettingsError, match="VOTEFLOW_REDIS_MIN_REPLICAS"):
        Settings.from_env({"VOTEFLOW_REDIS_MIN_REPLICAS": "-1"})
    with pytest.raises(SettingsError, match="VOTEFLOW_DATABASE_STATEMENT_CACHE_SIZE"):
        Settings.from_env({"VOTEFLOW_DATABASE_STATEMENT_CACHE_SIZE": "-5"})
