"""The repository's side of leases: ``pgfleet.collectors``, ``pgfleet.collector_leases``
and ``pgfleet.lease_terms``.

Every statement against those tables, and the functions that keep them
(``lease_round``, ``lease_fence``, ``lease_drained``, ``lease_held``,
``lease_release``, ``collector_leave``, defined in the migrations), is sent
from here.  The rules they enforce (fair share, expiry, terms and their
handover, the fence) live in those SQL functions, so that every collector
applies them under the same row locks; the bookkeeping around them is
:mod:`pgfleet.collector.lease`'s.
"""

from __future__ import annotations

import enum
from collections.abc import Set
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg


class Fence(enum.Enum):
    """What ``pgfleet.lease_fence`` says of a snapshot about to be stored."""

    # Taken under its collector's current term: store it.
    OK = "ok"
    # Taken under a term another collector took since, before it did, and
    # that one stored nothing yet: store it (the previous owner drains).
    HANDOVER = "handover"
    # Not now: an earlier owner of the server may still store what it took.
    WAIT = "wait"
    # Never: taken after another collector took the lease, or that one has
    # stored since (an older snapshot cannot go in after a newer one).
    LOST = "lost"


@dataclass(frozen=True)
class Round:
    """What a lease round says: the leases held and their terms, the fair
    share, the live collectors, and the repository's clock (Unix time)."""

    terms: dict[int, int]
    share: int
    collectors: int
    clock: float


async def lease_round(
    conn: psycopg.AsyncConnection[Any],
    owner: str,
    host: str,
    pid: int,
    period: float,
    srvids: Set[int],
    *,
    pending: Set[int] = frozenset(),
    grace: float | None = None,
) -> Round:
    """Heartbeat, renew, let go and take, in one call.

    ``pending``: the servers we have snapshots of waiting in the spool (the
    terms others took from us stay open for them).  ``grace``: how long the
    collectors alive when the repository went quiet for everyone get to come
    back (see ``lease_round`` in the migrations).
    """
    # Committed here, whatever mode the connection is in: the lease rows the
    # round locks must not stay locked after it.
    async with conn.transaction():
        cur = await conn.execute(
            "SELECT owned, terms, share, collectors, clock"
            " FROM pgfleet.lease_round(%s, %s, %s, %s, %s, %s, %s)",
            (
                owner,
                host,
                pid,
                timedelta(seconds=period),
                sorted(srvids),
                sorted(pending),
                None if grace is None else timedelta(seconds=grace),
            ),
        )
        row = await cur.fetchone()
    assert row is not None
    return Round(dict(zip(row[0], row[1], strict=True)), row[2], row[3], float(row[4]))


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


async def fence(
    conn: psycopg.AsyncConnection[Any],
    srvid: int,
    owner: str,
    term: int | None,
    taken: float | None,
) -> Fence:
    """May ``owner`` store its snapshot of ``srvid`` taken under ``term``, by the
    repository's clock before ``taken`` (Unix time)?  Call it in the store's
    transaction: it locks the lease row and the terms it read until the end."""
    cur = await conn.execute(
        "SELECT pgfleet.lease_fence(%s, %s, %s, %s)",
        (
            srvid,
            owner,
            term,
            None if taken is None else datetime.fromtimestamp(taken, UTC),
        ),
    )
    row = await cur.fetchone()
    assert row is not None
    return Fence(row[0])


async def drained(conn: psycopg.AsyncConnection[Any], srvid: int, owner: str, term: int) -> None:
    """Nothing more of ``owner``'s to store under ``term``, a term another collector took."""
    async with conn.transaction():
        await conn.execute("SELECT pgfleet.lease_drained(%s, %s, %s)", (srvid, owner, term))


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
