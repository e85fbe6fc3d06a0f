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

The statements are sent by :mod:`pgfleet.repository.leases`; this module
keeps who we are (name, host, pid), the period and the count of rounds.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any

import psycopg

from pgfleet.repository import leases


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
        owned, share, collectors = await leases.lease_round(
            conn, self.owner, self.host, self.pid, self.period, srvids
        )
        self.rounds += 1
        return RoundResult(owned, share, collectors)

    async def name_taken(self, conn: psycopg.AsyncConnection[Any]) -> str | None:
        """Who else, alive, uses our name: a misconfiguration that would collect twice."""
        found = await leases.live_collector(conn, self.owner)
        if found is None:
            return None
        host, pid = found
        if host != self.host:
            return f"host {host}"
        if pid != self.pid and _alive(pid):
            return f"process {pid} on this host"
        return None

    async def held(self, conn: psycopg.AsyncConnection[Any], srvid: int) -> bool:
        """The fence: call inside the store's transaction; locks the lease row until its end."""
        return await leases.held(conn, srvid, self.owner)

    async def release(self, conn: psycopg.AsyncConnection[Any], srvids: set[int]) -> None:
        await leases.release(conn, self.owner, srvids)

    async def leave(self, conn: psycopg.AsyncConnection[Any], keep: set[int]) -> None:
        await leases.leave(conn, self.owner, keep)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
