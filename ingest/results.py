"""Reading a poll's current tally (the workers' snapshot, else PostgreSQL),
and its results as an export."""

from __future__ import annotations

import csv
import io
import logging

import asyncpg

from voteflow.keys import Keys
from voteflow.outages import REDIS_DOWN
from voteflow.redisconn import AnyRedis
from voteflow.tally import SNAPSHOT_TALLY, Tally, decode
from voteflow.timeutil import to_us

log = logging.getLogger(__name__)


async def tally_from_database(pool: asyncpg.Pool, poll_id: str) -> Tally:
    row = await pool.fetchrow("SELECT * FROM poll_tally($1)", poll_id)
    return Tally(
        poll_id=poll_id,
        version=row["version"],
        total_ballots=row["total_ballots"],
        votes={str(id_): n for id_, n in zip(row["option_ids"], row["votes"], strict=True)},
        as_of_us=to_us(row["updated_at"]),
    )


async def current_tally(redis: AnyRedis, pool: asyncpg.Pool, keys: Keys, poll_id: str) -> Tally:
    """One Redis round trip when the workers have published the poll.

    PostgreSQL answers when there is no snapshot yet (a poll nobody voted on)
    or Redis cannot be read: results stay available during a Redis outage.
    """
    try:
        raw = await redis.hget(keys.tally(poll_id), SNAPSHOT_TALLY)  # type: ignore[misc]
    except REDIS_DOWN as exc:
        log.warning("tally snapshot of %s unreadable, reading PostgreSQL: %s", poll_id, exc)
        raw = None
    if raw is not None:
        return decode(raw)
    return await tally_from_database(pool, poll_id)


# What a spreadsheet would run as a formula at the start of a cell (OWASP's
# "CSV injection"): such a label is exported with a leading apostrophe.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")
CSV_HEADER = ("option_id", "label", "votes", "share_of_ballots")


def results_csv(tally: Tally, labels: dict[str, str]) -> str:
    """The poll's results as CSV (RFC 4180): a header, then an option a row.

    share_of_ballots is the option's votes over the counted ballots, so on a
    poll that allows several choices the shares can add up to more than 1.
    """
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    writer.writerow(CSV_HEADER)
    for option_id, label in labels.items():
        votes = tally.votes.get(option_id, 0)
        share = votes / tally.total_ballots if tally.total_ballots else 0.0
        if label.startswith(_FORMULA_STARTS):
            label = "'" + label
        writer.writerow((option_id, label, votes, f"{share:.4f}"))
    return out.getvalue()
