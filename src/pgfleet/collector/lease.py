"""Leases: which collector collects which server, held in the repository.

Each collector runs a *lease round* every third of the lease period (one
repository function, ``pgfleet.lease_round``): it heartbeats, renews what it
holds, lets go of servers it no longer sees, and takes free or expired
leases up to its fair share of the fleet.  A collector that dies stops
renewing; its leases expire after one period and the others take them at
their next round, so its servers move within 4/3 of a period.

Holding a lease is what lets a collector *start* snapshots of a server.  Each
grant of a lease is a *term*, kept while its owner renews it and ended when
another collector takes the lease.  What must always hold:

- two collectors never store one server's snapshots of the same moment, and
  a server's snapshots reach the repository in the order they were taken
  (the repository computes deltas against the last stored values);
- a snapshot taken while its collector held the lease is stored, whoever
  holds the lease when it reaches the repository: it is the server's only
  record of that moment.

Hence the fence: every store runs in a transaction that first asks
``pgfleet.lease_fence`` about the snapshot's term and when it was taken (by
the repository's clock, see :meth:`Leases.clock`).  Under the current term,
it goes in.  Under a term another collector took since, it goes in only if
it was taken before the takeover and the new owner stored nothing yet (the
*handover*: the new owner keeps its own snapshots of the server in its spool
meanwhile, until the old one says it has drained -- at once, or at its next
round -- or a period passes without it).  Taken after the takeover, it is
dropped: the new owner has that moment.

A repository outage is not a collector's: when no collector at all was heard
of for a period, the first one back gives the others ``grace`` seconds to
come back before it may take their leases (see ``lease_round``), rather than
take them all and leave their outage to a handover.

The statements are sent by :mod:`pgfleet.repository.leases`; this module
keeps who we are (name, host, pid), the period, our terms, our estimate of
the repository's clock and the count of rounds.
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable, Set
from dataclasses import dataclass
from typing import Any

import psycopg

from pgfleet.cluster import pid_alive
from pgfleet.repository import leases
from pgfleet.repository.leases import Fence

# Seconds a collector cut off from the repository takes at most to try again
# once it is back: the cap of RepositoryLink's backoff, which the daemon's
# links keep at its default.
RECONNECT = 10.0
# Our clock may run this much faster or slower than the repository's (NTP
# slews by 500 ppm at most), plus a margin, when we reckon its time.
_DRIFT = 1e-3
_SLACK = 0.05


def _elapsed() -> float:
    """Seconds from an arbitrary start, suspends included (a suspended host's
    repository went on ticking: leaving them out would make us early)."""
    try:
        return time.clock_gettime(time.CLOCK_BOOTTIME)
    except (AttributeError, OSError):  # not Linux
        return time.monotonic()


@dataclass(frozen=True)
class RoundResult:
    owned: frozenset[int]
    share: int
    collectors: int


class Leases:
    def __init__(self, owner: str, period: float, *, reconnect: float = RECONNECT) -> None:
        self.owner = owner
        self.period = period
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.rounds = 0
        # After a repository outage, the collectors alive when it began get
        # this long to come back before their leases may be taken: their
        # links retry every ``reconnect`` seconds at most.
        self.grace = period + 2 * reconnect
        # The term of each lease we hold, as the last round said.
        self.terms: dict[int, int] = {}
        # The servers we have snapshots of in the spool: the writer sets it.
        self.pending: Callable[[], Set[int]] = frozenset
        # From the last round: (_elapsed() when sent, the repository's clock
        # then, the repository's clock minus our wall clock).
        self._clock: tuple[float, float, float] | None = None

    async def round(self, conn: psycopg.AsyncConnection[Any], srvids: set[int]) -> RoundResult:
        sent, wall = _elapsed(), time.time()
        r = await leases.lease_round(
            conn,
            self.owner,
            self.host,
            self.pid,
            self.period,
            srvids,
            pending=self.pending(),
            grace=self.grace,
        )
        self.rounds += 1
        self.terms = r.terms
        self._clock = (sent, r.clock, r.clock - wall)
        return RoundResult(frozenset(r.terms), r.share, r.collectors)

    def term(self, srvid: int) -> int | None:
        """Our term of ``srvid``'s lease, as of the last round (None: not ours)."""
        return self.terms.get(srvid)

    def clock(self, taken_at: float) -> tuple[float, float] | None:
        """When a snapshot that started at ``taken_at`` (our wall clock) and
        ends now happened, by the repository's clock (Unix time): an estimate
        of its start, and an upper bound of its end.  None before any round.

        The bound does not trust our wall clock: the repository read its
        clock after we sent the last round, so no more time than we measured
        since (give or take the drift) has passed on it.
        """
        if self._clock is None:
            return None
        sent, repo, offset = self._clock
        end = repo + (_elapsed() - sent) * (1 + _DRIFT) + _SLACK
        return min(taken_at + offset, end), end

    async def name_taken(self, conn: psycopg.AsyncConnection[Any]) -> str | None:
        """Who else, alive, uses our name: a misconfiguration that would collect twice."""
        found = await leases.live_collector(conn, self.owner)
        if found is None:
            return None
        host, pid = found
        if host != self.host:
            return f"host {host}"
        # One that exited but is not reaped yet (a zombie) collects nothing: the name is free.
        if pid != self.pid and pid_alive(pid):
            return f"process {pid} on this host"
        return None

    async def fence(
        self,
        conn: psycopg.AsyncConnection[Any],
        srvid: int,
        term: int | None,
        taken: float | None,
    ) -> Fence:
        """The fence: may our snapshot taken under ``term``, by ``taken`` at the
        latest (repository clock), be stored?  Call it inside the store's
        transaction; it locks the lease row until its end."""
        return await leases.fence(conn, srvid, self.owner, term, taken)

    async def drained(self, conn: psycopg.AsyncConnection[Any], srvid: int, term: int) -> None:
        """Nothing more to store under ``term``, which another collector took from us."""
        await leases.drained(conn, srvid, self.owner, term)

    async def held(self, conn: psycopg.AsyncConnection[Any], srvid: int) -> bool:
        """Whether we hold ``srvid``'s lease; locks its row until the transaction ends."""
        return await leases.held(conn, srvid, self.owner)

    async def release(self, conn: psycopg.AsyncConnection[Any], srvids: set[int]) -> None:
        await leases.release(conn, self.owner, srvids)

    async def leave(self, conn: psycopg.AsyncConnection[Any], keep: set[int]) -> None:
        await leases.leave(conn, self.owner, keep)
