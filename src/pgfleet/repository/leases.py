"""The repository's side of leases: ``pgfleet.collectors`` and ``pgfleet.collector_leases``.

Every statement against those tables, and the functions that keep them
(``lease_round``, ``lease_held``, ``lease_release``, ``collector_leave``,
defined in the migrations), is sent from here.  The rules they enforce
(fair share, expiry, the fence) live in those SQL functions, so that every
collector applies them under the same row locks; the bookkeeping around them
is :mod:`pgfleet.collector.lease`'s.
"""

from __future__ import annotations

from collections.abc import Set
from datetime import timedelta
from typing import Any

import psycopg


async def lease_round(
    conn: psycopg.AsyncConnection[Any],
    owner: str,
    host: str,
    pid: int,
    period: float,
    srvids: Set[int],
) -> tuple[frozenset[int], int, int]:
    """Heartbeat, renew, let go and take, in one call: (owned srvids, fair share, collectors)."""
    # Committed here, whatever mode the connection is in: the lease rows the
    # round locks must not stay locked after it.
    async with conn.transaction():
        cur = await conn.execute(
            "SELECT owned, share, collectors FROM pgfleet.lease_round(%s, %s, %s, %s, %s)",
            (owner, host, pid, timedelta(seconds=period), sorted(srvids)),
        )
        row = await cur.fetchone()
    assert row is not None
    return frozenset(row[0]), row[1], row[2]


async def live_collector(conn: psycopg.AsyncConnection[Any], name: str) -> tuple[str, int] | None:
    """(host, pid) of the live collector called ``name``, if there is one."""
    cur = await conn.execute(
        "SELECT host, pid FROM pgfleet.collectors WHERE name = %s AND expires_at > now()",
        (name,),
    )
    row = await cur.fetchone()
    return None if row is None else (row[0], row[1])


def live_collectors(conn: psycopg.Connection[Any]) -> list[str]:
    """The names of the collectors that renewed their leases lately, sorted."""
    rows = conn.execute(
        "SELECT name FROM pgfleet.collectors WHERE expires_at > now() ORDER BY name"
    ).fetchall()
    return [r[0] for r in rows]


async def held(conn: psycopg.AsyncConnection[Any], srvid: int, owner: str) -> bool:
    """Whether ``owner`` holds the lease of ``srvid``; locks its row until the transaction ends."""
    cur = await conn.execute("SELECT pgfleet.lease_held(%s, %s)", (srvid, owner))
    row = await cur.fetchone()
    return bool(row and row[0])


async def release(conn: psycopg.AsyncConnection[Any], owner: str, srvids: Set[int]) -> None:
    await conn.execute("SELECT pgfleet.lease_release(%s, %s)", (owner, sorted(srvids)))


async def leave(conn: psycopg.AsyncConnection[Any], owner: str, keep: Set[int]) -> None:
    """Release every lease of ``owner`` but those of ``keep``, and say it is gone."""
    await conn.execute("SELECT pgfleet.collector_leave(%s, %s)", (owner, sorted(keep)))
