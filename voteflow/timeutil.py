"""Instants as microseconds since the Unix epoch, the unit of every vote message."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def now_us() -> int:
    return time.time_ns() // 1000


def to_us(instant: datetime) -> int:
    # Exact integer arithmetic: a float timestamp would blur the order of two
    # ballots received within the same microsecond range.
    delta = instant - _EPOCH
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_us(us: int) -> datetime:
    return _EPOCH + timedelta(microseconds=us)
