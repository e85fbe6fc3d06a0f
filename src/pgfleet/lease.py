"""Leases: which collector collects which server, held in the repository.

Each collector runs a *lease round* every third of the lease period (one
repository function, ``pgfleet.lease_round``): it heartbeats, renews what it
holds, lets go of servers it no longer sees, and takes free or expired
leases up to its fair share of the fleet.  A collector that dies stops
renewing; its leases expire after one period and the others take them at
their next round, so its servers move within 4/3 of a period.

Holding a lease is what lets a collector *start* snapshots of a server; what
guarantees that no snapshot is stored twice is the fence: every store runs
in a transaction that first locks its server's lease row and checks it is
still ours (``pgfleet.lease_held``).  A collector cut off from the
repository keeps collecting into its spool; when it is back, what it spooled
is stored only if nobody took the lease meanwhile, and dropped otherwise.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import psycopg


@dataclass(frozen=True)
class RoundResult:
    owned: frozenset[int]
    share: int
    collectors: int


class Leases:
    def __init__(self, owner: str, period: float) -> None:
        self.owner = owner
        self.period = period
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.rounds = 0

    async def round(self, conn: psycopg.AsyncConnection[Any], srvids: set[int]) -> RoundResult:
        async with conn.transaction():
            cur = await conn.execute(
                "SELECT owned, share, collectors FROM pgfleet.lease_round(%s, %s, %s, %s, %s)",
                (self.owner, self.host, self.pid, timedelta(seconds=self.period), sorted(srvids)),
            )
            row = await cur.fetchone()
        assert row is not None
        self.rounds += 1
        return RoundResult(frozenset(row[0]), row[1], row[2])

    async def name_taken(self, conn: psycopg.AsyncConnection[Any]) -> str | None:
        """Who else, alive, uses our name: a misconfiguration that would collect twice."""
        cur = await conn.execute(
            "SELECT host, pid FROM pgfleet.collectors WHERE name = %s AND expires_at > now()",
            (self.owner,),
        )
        row = await cur.fetchone()
        if row is None:
            return None
        host, pid = row
        if host != self.host:
            return f"host {host}"
        if pid != self.pid and _alive(pid):
            return f"process {pid} on this host"
        return None

    async def held(self, conn: psycopg.AsyncConnection[Any], srvid: int) -> bool:
        """The fence: call inside the store's transaction; locks the lease row until its end."""
        cur = await conn.execute("SELECT pgfleet.lease_held(%s, %s)", (srvid, self.owner))
        row = await cur.fetchone()
        return bool(row and row[0])

    async def release(self, conn: psycopg.AsyncConnection[Any], srvids: set[int]) -> None:
        await conn.execute("SELECT pgfleet.lease_release(%s, %s)", (self.owner, sorted(srvids)))

    async def leave(self, conn: psycopg.AsyncConnection[Any], keep: set[int]) -> None:
        await conn.execute("SELECT pgfleet.collector_leave(%s, %s)", (self.owner, sorted(keep)))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
