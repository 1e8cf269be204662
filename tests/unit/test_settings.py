"""Settings are read once from VOTEFLOW_* variables; a bad value stops the start
with a message naming the variable."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys

import pytest

from voteflow.settings import Settings, SettingsError, parse_origins


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


def test_worker_metrics_listen_on_loopback_unless_an_address_is_set() -> None:
    assert Settings.from_env({}).worker_metrics_host == "127.0.0.1"
    env = {"VOTEFLOW_WORKER_METRICS_HOST": "0.0.0.0"}
    assert Settings.from_env(env).worker_metrics_host == "0.0.0.0"
    assert Settings.from_env({"VOTEFLOW_WORKER_METRICS_HOST": "::"}).worker_metrics_host == "::"


@pytest.mark.parametrize("host", ["localhost", "0.0.0.0:9464", "10.0.0.0/8", "*", ""])
def test_a_worker_metrics_host_that_is_no_ip_address_stops_the_start_naming_it(host: str) -> None:
    with pytest.raises(SettingsError, match="VOTEFLOW_WORKER_METRICS_HOST must be an IP address"):
        Settings.from_env({"VOTEFLOW_WORKER_METRICS_HOST": host})


@pytest.mark.parametrize(
    "token", ["change-me", "CHANGEME", "Secret", "admin", "change-me-to-a-long-random-token"]
)
def test_placeholder_admin_token_stops_the_start_naming_the_variable(token: str) -> None:
    with pytest.raises(SettingsError, match="VOTEFLOW_ADMIN_TOKEN is a placeholder") as raised:
        Settings.from_env({"VOTEFLOW_ADMIN_TOKEN": token})
    assert repr(token) not in str(raised.value)


def test_admin_token_under_24_characters_stops_the_start_without_echoing_it() -> None:
    token = "x7Kq-short-but-random"  # 21 characters
    with pytest.raises(SettingsError, match="VOTEFLOW_ADMIN_TOKEN must be at least 24") as raised:
        Settings.from_env({"VOTEFLOW_ADMIN_TOKEN": token})
    assert repr(token) not in str(raised.value)


def test_admin_token_that_no_header_can_carry_stops_the_start() -> None:
    with pytest.raises(SettingsError, match="VOTEFLOW_ADMIN_TOKEN must be printable ASCII"):
        Settings.from_env({"VOTEFLOW_ADMIN_TOKEN": "ä" * 30})


def test_empty_admin_token_is_allowed_and_a_long_random_one_too() -> None:
    assert Settings.from_env({"VOTEFLOW_ADMIN_TOKEN": ""}).admin_token == ""
    token = secrets.token_urlsafe(24)  # 32 characters
    assert Settings.from_env({"VOTEFLOW_ADMIN_TOKEN": token}).admin_token == token


@pytest.mark.parametrize(
    "spec",
    ["app.example.com", "https://app.example.com/", "https://app.example.com/vote", "*",
     "ftp://app.example.com", "https://app.example.com, null"],
)  # fmt: skip
def test_allowed_origin_that_is_not_an_origin_stops_the_start_naming_it(spec: str) -> None:
    with pytest.raises(SettingsError, match=r"VOTEFLOW_ALLOWED_ORIGINS: .* is not an origin"):
        Settings.from_env({"VOTEFLOW_ALLOWED_ORIGINS": spec})


def test_allowed_origins_are_compared_as_browsers_spell_them() -> None:
    settings = Settings.from_env(
        {"VOTEFLOW_ALLOWED_ORIGINS": "HTTPS://App.Example.com:443, http://localhost:3000,"}
    )
    assert parse_origins(settings.allowed_origins) == {
        "https://app.example.com",
        "http://localhost:3000",
    }


@pytest.mark.parametrize("command", ["edge", "up"])
def test_edge_and_up_refuse_a_placeholder_admin_token_at_start(command: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOTEFLOW_")}
    env["VOTEFLOW_ADMIN_TOKEN"] = "change-me"
    done = subprocess.run(
        [sys.executable, "-m", "voteflow", command],
        env=env, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    assert "VOTEFLOW_ADMIN_TOKEN is a placeholder" in done.stderr


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"VOTEFLOW_LIVE_MAX_PER_ADDRESS": "0"}, "VOTEFLOW_LIVE_MAX_PER_ADDRESS must be >= 1"),
        ({"VOTEFLOW_LIVE_MAX_SECONDS": "0"}, "VOTEFLOW_LIVE_MAX_SECONDS must be > 0"),
        ({"VOTEFLOW_LIVE_MAX_SECONDS": "soon"}, "VOTEFLOW_LIVE_MAX_SECONDS must be a number"),
        (
            {"VOTEFLOW_MAX_CONNECTIONS": "100", "VOTEFLOW_LIVE_MAX_CONNECTIONS": "100"},
            r"VOTEFLOW_LIVE_MAX_CONNECTIONS must be .* below VOTEFLOW_MAX_CONNECTIONS \(100\)",
        ),
        ({"VOTEFLOW_LIVE_MAX_CONNECTIONS": "-1"}, "VOTEFLOW_LIVE_MAX_CONNECTIONS must be"),
    ],
)
def test_live_stream_limits_out_of_range_stop_the_start_naming_the_variable(
    env: dict[str, str], named: str
) -> None:
    with pytest.raises(SettingsError, match=named):
        Settings.from_env(env)


def test_live_streams_take_half_the_connections_unless_told_otherwise() -> None:
    assert Settings.from_env({"VOTEFLOW_MAX_CONNECTIONS": "40"}).live_connections == 20
    told = {"VOTEFLOW_MAX_CONNECTIONS": "40", "VOTEFLOW_LIVE_MAX_CONNECTIONS": "30"}
    assert Settings.from_env(told).live_connections == 30
