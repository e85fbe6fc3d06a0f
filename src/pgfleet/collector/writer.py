"""The repository side of the daemon's snapshots: stored in order, or spooled.

One writer per collector, one repository connection: stores are serialised
by the repository anyway (``pgfleet.snapshot_lock``).  A snapshot goes
straight to the repository when its server has nothing spooled and the
repository answers; otherwise to the spool, behind that server's older
snapshots.  The replay task stores spooled snapshots, oldest first, as soon
as the repository is back.  "Has this server anything spooled?" and the
store are decided under one lock, so a new snapshot never overtakes an
older one being replayed.

Every store is fenced by the server's lease (see :mod:`pgfleet.collector.lease`), in
the same transaction as :func:`pgfleet.snapshot.store.store`, whose own transaction becomes
a savepoint of ours: all of it commits or none of it does.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg import errors as pgerrors

from pgfleet.collector import scheduler
from pgfleet.collector.lease import Leases
from pgfleet.collector.link import RepositoryLink, RepositoryUnavailable
from pgfleet.collector.spool import Spool, SpoolError
from pgfleet.collector.stats import Stats
from pgfleet.connections import first_line
from pgfleet.log import EventLogger
from pgfleet.repository.servers import Server
from pgfleet.repository.snapshots import record_failure, seed_state
from pgfleet.snapshot.model import Failure, FailureKind, ServerInfo, SnapshotResult, Staged
from pgfleet.snapshot.store import store

log = EventLogger("writer")

# Repository errors after which the same snapshot may well be stored later:
# keep it (spooled) rather than drop it.
_TRANSIENT = (
    pgerrors.QueryCanceled,
    pgerrors.LockNotAvailable,
    pgerrors.DeadlockDetected,
    pgerrors.SerializationFailure,
)


class Outcome(enum.Enum):
    STORED = "stored"
    SPOOLED = "spooled"
    DROPPED = "dropped"


class LeaseLost(Exception):
    """The server's lease is no longer ours: another collector took it."""


@dataclass
class Ticket:
    """Tells a cancelled submitter whether its snapshot may already be in the repository."""

    begun: bool = False


class Writer:
    def __init__(
        self,
        link: RepositoryLink,
        spool: Spool,
        leases: Leases,
        stats: Stats,
        *,
        store_timeout: float,
        on_lease_lost: Callable[[int], None] = lambda srvid: None,
    ) -> None:
        self.link = link
        self.spool = spool
        self.leases = leases
        self.stats = stats
        self.store_timeout = store_timeout
        self.kick = asyncio.Event()
        # Spooled snapshots are stored only once a lease round confirmed
        # which leases are still ours: replaying a previous run's spool
        # before would drop them for want of a renewed lease.
        self.ready = False
        self.on_lease_lost = on_lease_lost
        # The fleet as last discovered, for the settings of spooled snapshots' servers.
        self.fleet: dict[int, Server] = {}
        self._order = asyncio.Lock()
        self._seeded: set[int] = set()

    # -- Fresh snapshots

    async def submit(
        self,
        server: Server,
        taken_at: float,
        info: ServerInfo | None,
        staged: list[Staged],
        result: SnapshotResult,
        ticket: Ticket,
    ) -> Outcome:
        """Store one snapshot now, or spool it; ``staged`` is left to the caller to close."""
        async with self._order:
            if not self.spool.has(server.srvid) and (self.link.up or self.link.retry_in == 0):
                ticket.begun = True
                try:
                    await self._store(server, info, staged, result)
                    return Outcome.STORED
                except LeaseLost:
                    self._lease_lost(server)
                    return Outcome.DROPPED
                except (RepositoryUnavailable, TimeoutError) as e:
                    log.debug("snapshot kept for later", server=server.alias, reason=str(e))
                except _TRANSIENT as e:
                    log.warning(
                        "repository busy, snapshot kept for later",
                        server=server.alias,
                        error=first_line(e),
                    )
                except psycopg.Error as e:
                    self.stats.fail(
                        server.alias, Failure("repository", FailureKind.STORE, first_line(e))
                    )
                    log.error("snapshot not stored", server=server.alias, error=first_line(e))
                    return Outcome.DROPPED
            self.put(server, taken_at, info, staged, result)
            return Outcome.SPOOLED

    def put(
        self,
        server: Server,
        taken_at: float,
        info: ServerInfo | None,
        staged: list[Staged],
        result: SnapshotResult,
    ) -> None:
        """Spool a snapshot (synchronous: safe in a cancelled task's cleanup)."""
        try:
            _, dropped = self.spool.put(
                server.srvid, server.alias, taken_at, info, staged, result.failures
            )
        except OSError as e:
            self.stats.count("", "spool", "dropped")
            log.error("snapshot lost: cannot spool it", server=server.alias, error=e.strerror)
            return
        self.stats.count(server.alias, "spool", "spooled")
        if dropped:
            self.stats.count("", "spool", "dropped", dropped)
            log.warning("spool full: oldest snapshots dropped", dropped=dropped)
        self.kick.set()

    async def _store(
        self,
        server: Server,
        info: ServerInfo | None,
        staged: list[Staged],
        result: SnapshotResult,
    ) -> None:
        t0 = time.perf_counter()
        # Client-side bound on top of the server-side statement_timeout, for
        # a repository that stopped answering altogether.
        async with (
            asyncio.timeout(self.store_timeout + 10),
            self.link.use() as conn,
            conn.transaction(),
        ):
            if not await self.leases.held(conn, server.srvid):
                raise LeaseLost(server.alias)
            if server.srvid not in self._seeded:
                await _seed_state(conn, server)
            await store(conn, server.srvid, info, staged, result)
        # Committed: only now is the seed row there for good.
        self._seeded.add(server.srvid)
        self.stats.observe(server.alias, "repository", "store", time.perf_counter() - t0)

    def _lease_lost(self, server: Server) -> None:
        self.stats.count(server.alias, "lease", "lost")
        log.warning("lease lost to another collector: snapshot dropped", server=server.alias)
        self.on_lease_lost(server.srvid)

    async def record_failure(self, server: Server, failure: Failure) -> None:
        """Put a server's unreachability on the record, if the repository is there."""
        try:
            async with asyncio.timeout(self.store_timeout), self.link.use() as conn:
                await record_failure(conn, server.srvid, failure)
        except (RepositoryUnavailable, TimeoutError, psycopg.Error) as e:
            log.debug("failure not recorded", server=server.alias, error=str(e))

    # -- Spooled snapshots

    async def replay(self) -> None:
        """Store spooled snapshots in order, for ever; the daemon cancels it."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.kick.wait(), 5.0)
            self.kick.clear()
            if not self.ready or not len(self.spool):
                continue
            try:
                await self._drain()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("spool replay failed; will retry")
                await asyncio.sleep(1)

    async def _drain(self) -> None:
        if not self.link.up and self.link.retry_in > 0:
            # Down, and said so already: come back when the link may retry.
            asyncio.get_running_loop().call_later(self.link.retry_in, self.kick.set)
            return
        stored = 0
        t0 = time.monotonic()
        for entry in self.spool.entries():
            async with self._order:
                if entry not in self.spool:
                    continue  # dropped meanwhile (spool bound, server removed)
                try:
                    snap = self.spool.read(entry)
                except SpoolError as e:
                    log.error("spooled snapshot unreadable, dropped", error=str(e))
                    self.spool.remove(entry)
                    self.stats.count("", "spool", "dropped")
                    continue
                server = self.fleet.get(entry.srvid) or Server(entry.srvid, snap.alias)
                result = SnapshotResult(snap.alias, entry.srvid, failures=list(snap.failures))
                self.spool.busy(entry, True)
                try:
                    await self._store(server, snap.info, snap.staged, result)
                except (RepositoryUnavailable, TimeoutError, *_TRANSIENT) as e:
                    self.spool.busy(entry, False)
                    log.debug("replay paused", error=str(e) or type(e).__name__)
                    # Wake up when the link may try again.
                    asyncio.get_running_loop().call_later(
                        max(self.link.retry_in, 0.5), self.kick.set
                    )
                    return
                except LeaseLost:
                    self._lease_lost(server)
                    self.spool.remove(entry)
                    continue
                except psycopg.Error as e:
                    self.stats.fail(
                        snap.alias, Failure("repository", FailureKind.STORE, first_line(e))
                    )
                    log.error("spooled snapshot not stored", server=snap.alias, error=first_line(e))
                    self.spool.remove(entry)
                    continue
                finally:
                    snap.close()
                self.spool.remove(entry)
                stored += 1
                self.stats.count(snap.alias, "spool", "replayed")
                log.debug(
                    "spooled snapshot stored",
                    server=snap.alias,
                    age=round(time.time() - snap.taken_at, 1),
                    rows=result.rows,
                )
        if stored:
            log.info(
                "spooled snapshots stored",
                snapshots=stored,
                seconds=round(time.monotonic() - t0, 1),
                left=len(self.spool),
            )


async def _seed_state(conn: psycopg.AsyncConnection[Any], server: Server) -> None:
    """Spread a new server's aggregates and purges over its coalesce cycle.

    take_snapshot aggregates when coalesce_seq reaches coalesce and purges
    every 10th aggregate; a fleet added at once would do both on the same
    snapshot.  Starting each server's counters at a stable offset spreads
    them (the first aggregate comes sooner, and "aggregates" counts a few
    that never happened: the price of spreading them).
    """
    await seed_state(
        conn,
        server.srvid,
        scheduler.spread(server.alias, max(server.coalesce, 1)),
        scheduler.spread(server.alias + "/purge", 10),
    )
