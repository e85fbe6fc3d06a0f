"""The repository side of the daemon's snapshots: stored in order, or spooled.

What must always hold:

- A snapshot leaves the collector stored (once), or dropped for a reason
  that will not go away -- its own rows refused by the repository, taken
  after another collector took its server's lease, the spool's bound --
  counted and logged as such.  Never because the repository is in trouble.
- A server's snapshots reach the repository in the order they were taken:
  it computes deltas against the last stored values.

One writer per collector, one repository connection: stores are serialised
by the repository anyway (``pgfleet.snapshot_lock``).  A snapshot goes
straight to the repository when its server has nothing spooled and the
repository is taking snapshots; otherwise to the spool, behind that
server's older snapshots.  The replay task stores spooled snapshots, oldest
first, as soon as the repository takes them again.  "Has this server
anything spooled?" and the store are decided under one lock, so a new
snapshot never overtakes an older one being replayed.

What the repository says of a store is read from its SQLSTATE, never its
message (:func:`verdict`):

- its own rows refused (data exception, constraint: classes 22, 23): it would
  be refused for ever, so it is dropped.  (A source whose rows alone are
  refused is left out by store(), the others stored: see
  :mod:`pgfleet.snapshot.store`.)
- the repository's own state (read-only, out of disk or memory, shutting
  down, a privilege taken away, a table or function missing mid-upgrade,
  a lock or a conflict...): kept, and the repository left alone for a while
  -- an exponential backoff shared by every store, so that a read-only
  repository is asked again after 1, 2, 4... up to ``retry_max`` seconds,
  not at every snapshot.
- anything else: doubtful, so kept and tried again a few times (that server
  only, backing off), then dropped as refused.

Every store is fenced by the server's lease (see :mod:`pgfleet.collector.lease`),
in the same transaction as :func:`pgfleet.snapshot.store.store`, whose own
transaction becomes a savepoint of ours: all of it commits or none of it
does.  Each snapshot carries a :class:`~pgfleet.collector.spool.Stamp`: its
key (claimed in the store's transaction, so that a store given up on while
its COMMIT went through is not stored again from the spool), the lease term
it was taken under and when, by the repository's clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg

from pgfleet.collector import scheduler
from pgfleet.collector.lease import Leases
from pgfleet.collector.link import RepositoryLink, RepositoryUnavailable
from pgfleet.collector.scheduler import Backoff
from pgfleet.collector.spool import Entry, Spool, Spooled, SpoolError, Stamp
from pgfleet.collector.stats import Stats
from pgfleet.connections import first_line
from pgfleet.log import EventLogger
from pgfleet.repository.leases import Fence
from pgfleet.repository.servers import Server
from pgfleet.repository.snapshots import (
    record_failure,
    rows_refused,
    seed_state,
    stored_already,
)
from pgfleet.snapshot.model import Failure, FailureKind, ServerInfo, SnapshotResult, Staged
from pgfleet.snapshot.store import store

log = EventLogger("writer")

# SQLSTATE classes, and codes, of a repository that may take the same
# snapshot later: connection (08), read-only transaction (25), conflicts
# (40), resources (53: disk full, out of memory, too many connections), limits
# (54), object state (55: lock not available), operator intervention (57:
# shutdown, cannot connect now, query canceled), system (58: I/O);
# corruption (XX001, XX002), which is the repository's to repair; a
# privilege taken away (42501); a schema, table or function missing, as in a
# repository being upgraded or restored (3F000, 42P01, 42883).
_KEEP_CLASSES = frozenset({"08", "25", "40", "53", "54", "55", "57", "58"})
_KEEP_CODES = frozenset({"XX001", "XX002", "42501", "3F000", "42P01", "42883"})
# Tries of a snapshot whose failure is neither (an internal error, a bug...):
# should it come from the snapshot itself, its server's later snapshots wait
# behind it meanwhile.
_DOUBT_TRIES = 5


class Verdict(enum.Enum):
    """What a repository error means for the snapshot it failed."""

    # The repository's state: the same snapshot may go in later.
    KEEP = "keep"
    # The snapshot's own rows: refused for ever.
    REFUSED = "refused"
    # Neither known: a few more tries, then as refused.
    DOUBT = "doubt"


def verdict(e: BaseException) -> Verdict:
    """What ``e``, raised by a store, means for its snapshot (by SQLSTATE only)."""
    state = getattr(e, "sqlstate", None)
    if not isinstance(state, str):
        return Verdict.DOUBT
    if rows_refused(e):
        return Verdict.REFUSED
    if state[:2] in _KEEP_CLASSES or state in _KEEP_CODES:
        return Verdict.KEEP
    return Verdict.DOUBT


class Outcome(enum.Enum):
    STORED = "stored"
    SPOOLED = "spooled"
    DROPPED = "dropped"


class LeaseLost(Exception):
    """Taken after another collector took the server's lease (or that one stored since)."""


class HandoverWait(Exception):
    """An earlier owner of the server's lease may still store what it took: not yet."""


class StoredAlready(Exception):
    """The snapshot is in the repository: a store given up on went through."""


@dataclass
class Ticket:
    """Tells a cancelled submitter whether its snapshot may already be in the
    repository, and under which stamp (spooled again with it, it would be
    recognised rather than stored twice)."""

    begun: bool = False
    stamp: Stamp | None = None


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
        retry_max: float = 30.0,
        purge_interval: float | None = None,
        client_margin: float = 10.0,
    ) -> None:
        self.link = link
        self.spool = spool
        self.leases = leases
        self.stats = stats
        self.store_timeout = store_timeout
        # Seconds we wait for a store past store_timeout (the repository's
        # statement_timeout) before giving up on the repository: it may
        # have stopped answering altogether.
        self.client_margin = client_margin
        # Seconds between two purges of a server at most (None: the repository's default).
        self.purge_interval = purge_interval
        self.kick = asyncio.Event()
        # Spooled snapshots are stored only once a lease round confirmed
        # which leases are still ours: replaying a previous run's spool
        # before would drop them for want of a renewed lease.
        self.ready = False
        self.on_lease_lost = on_lease_lost
        # The fleet as last discovered, for the settings of spooled snapshots' servers.
        self.fleet: dict[int, Server] = {}
        # The terms others took from us stay open while we have snapshots of
        # their servers to store: each lease round says which.
        leases.pending = spool.servers
        self._order = asyncio.Lock()
        self._seeded: set[int] = set()
        # The repository refusing snapshots for now (KEEP): not before _retry_at.
        self._backoff = Backoff(retry_max)
        self._retry_at = 0.0
        self._refusing: str | None = None
        # Servers whose spooled snapshots wait (a handover, a doubtful
        # failure): not before this time.  Tries of doubtful snapshots, by seq.
        self._hold: dict[int, float] = {}
        self._doubts: dict[int, int] = {}
        self._wake: asyncio.TimerHandle | None = None

    @property
    def retry_max(self) -> float:
        return self._backoff.cap

    @retry_max.setter
    def retry_max(self, value: float) -> None:
        self._backoff.cap = value

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
        # Stamped now, when its fetch is over, not when the lock is ours.
        stamp = ticket.stamp = self._stamp(server.srvid, taken_at)
        doubt = False
        async with self._order:
            if self._may_store(server.srvid):
                ticket.begun = True
                try:
                    await self._store(server, info, staged, result, stamp)
                    return Outcome.STORED
                except StoredAlready:  # a fresh key: cannot be, but it is there
                    return Outcome.STORED
                except LeaseLost:
                    self._lease_lost(server)
                    return Outcome.DROPPED
                except HandoverWait:
                    self.stats.count(server.alias, "lease", "waited")
                    log.debug("previous owner still storing: snapshot kept", server=server.alias)
                    self._hold[server.srvid] = time.monotonic() + self._handover_poll
                except RepositoryUnavailable as e:
                    log.debug("snapshot kept for later", server=server.alias, reason=str(e))
                except TimeoutError as e:
                    await self._refused_for_now(server, e)
                except psycopg.Error as e:
                    v = verdict(e)
                    if v is Verdict.REFUSED:
                        self._refused(server, e)
                        return Outcome.DROPPED
                    if v is Verdict.KEEP:
                        await self._refused_for_now(server, e)
                    else:
                        doubt = True
                        self._doubtful(server, e, 1)
            entry = self.put(server, taken_at, info, staged, result, stamp)
            if doubt and entry is not None:
                self._doubts[entry.seq] = 1
                self._hold[server.srvid] = time.monotonic() + _doubt_delay(1)
            return Outcome.SPOOLED

    def put(
        self,
        server: Server,
        taken_at: float,
        info: ServerInfo | None,
        staged: list[Staged],
        result: SnapshotResult,
        stamp: Stamp | None = None,
    ) -> Entry | None:
        """Spool a snapshot (synchronous: safe in a cancelled task's cleanup).

        ``stamp``: the one it was submitted with, if it was (see :class:`Ticket`).
        """
        if stamp is None:
            stamp = self._stamp(server.srvid, taken_at)
        try:
            entry, dropped = self.spool.put(
                server.srvid, server.alias, taken_at, info, staged, result.failures, stamp
            )
        except OSError as e:
            self.stats.count("", "spool", "dropped")
            log.error("snapshot lost: cannot spool it", server=server.alias, error=e.strerror)
            return None
        self.stats.count(server.alias, "spool", "spooled")
        if dropped:
            self.stats.count("", "spool", "dropped", dropped)
            log.warning("spool full: oldest snapshots dropped", dropped=dropped)
        self.kick.set()
        return entry

    def _stamp(self, srvid: int, taken_at: float) -> Stamp:
        return Stamp(str(uuid.uuid4()), self.leases.term(srvid), self.leases.clock(taken_at))

    def _may_store(self, srvid: int) -> bool:
        """Whether a fresh snapshot of ``srvid`` may go straight to the repository."""
        return (
            not self.spool.has(srvid)
            and (self.link.up or self.link.retry_in == 0)
            and time.monotonic() >= self._retry_at
        )

    async def _store(
        self,
        server: Server,
        info: ServerInfo | None,
        staged: list[Staged],
        result: SnapshotResult,
        stamp: Stamp | None,
    ) -> Fence:
        """Store one snapshot under the fence; return what the fence said (OK or HANDOVER).

        Failed, it leaves ``result.failures`` as it found them: the snapshot
        is spooled with those, and the next try finds its own.
        """
        t0 = time.perf_counter()
        term = stamp.term if stamp is not None else None
        clock = stamp.clock if stamp is not None else None
        failures = len(result.failures)
        try:
            # Given up on, the store may still commit (its COMMIT was on its
            # way): the stamp's key makes the spooled copy harmless.
            async with (
                asyncio.timeout(self.store_timeout + self.client_margin),
                self.link.use() as conn,
                conn.transaction(),
            ):
                fence = await self.leases.fence(
                    conn, server.srvid, term, None if clock is None else clock[1]
                )
                if fence is Fence.LOST:
                    raise LeaseLost(server.alias)
                if fence is Fence.WAIT:
                    raise HandoverWait(server.alias)
                if server.srvid not in self._seeded:
                    await _seed_state(conn, server)
                try:
                    shift = await store(
                        conn,
                        server.srvid,
                        info,
                        staged,
                        result,
                        key=None if stamp is None else stamp.key,
                        clock=clock,
                        purge_interval=self.purge_interval,
                    )
                except psycopg.Error as e:
                    if stored_already(e):
                        raise StoredAlready(server.alias) from None
                    raise
        except BaseException:
            del result.failures[failures:]
            raise
        # Committed: only now is the seed row there for good.
        self._seeded.add(server.srvid)
        self.stats.observe(server.alias, "repository", "store", time.perf_counter() - t0)
        if self._refusing is not None:
            log.info("the repository takes snapshots again", after=self._refusing)
            self._refusing = None
        self._backoff.reset()
        self._retry_at = 0.0
        if shift:
            # The server's clock is off: its rows were brought to the repository's.
            self.stats.count(server.alias, "clock", "clamped")
            self.stats.gauge(server.alias, "clock", "clamp_seconds", shift)
            log.debug("timestamps moved to the repository's clock", server=server.alias, by=shift)
        return fence

    async def _refused_for_now(self, server: Server, e: BaseException) -> None:
        """The repository cannot take snapshots now: leave it alone a while."""
        delay = self._backoff.next()
        self._retry_at = time.monotonic() + delay
        self.stats.count(server.alias, "repository", "kept")
        state = getattr(e, "sqlstate", None) or type(e).__name__
        fields = {"server": server.alias, "sqlstate": state, "retry": round(delay, 1)}
        if self._refusing is None:
            log.warning(
                "the repository refuses snapshots: kept for later", error=first_line(e), **fields
            )
        else:
            log.debug("the repository still refuses snapshots", error=first_line(e), **fields)
        self._refusing = state
        if isinstance(state, str) and state.startswith("25"):
            # Read-only: it may be this session's (a database or role
            # setting, a standby); a new one picks up a change.
            await self.link.drop(first_line(e), failed=False)

    def _refused(self, server: Server, e: BaseException) -> None:
        """The repository refused the snapshot's own rows: it is dropped."""
        self.stats.fail(server.alias, Failure("repository", FailureKind.STORE, first_line(e)))
        self.stats.count(server.alias, "repository", "refused")
        log.error(
            "snapshot refused by the repository: dropped",
            server=server.alias,
            sqlstate=getattr(e, "sqlstate", None),
            error=first_line(e),
        )

    def _doubtful(self, server: Server, e: BaseException, tries: int) -> None:
        log.warning(
            "snapshot not stored: kept, to try again",
            server=server.alias,
            sqlstate=getattr(e, "sqlstate", None),
            error=first_line(e),
            tries=tries,
        )

    @property
    def _handover_poll(self) -> float:
        """Seconds between two looks at a handover we wait for."""
        return min(max(self.leases.period / 6, 0.25), 5.0)

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

    def _wake_in(self, delay: float) -> None:
        """Replay again in ``delay`` seconds (or sooner, if already due sooner)."""
        loop = asyncio.get_running_loop()
        when = loop.time() + max(delay, 0.05)
        if self._wake is not None and not self._wake.cancelled() and self._wake.when() <= when:
            return
        if self._wake is not None:
            self._wake.cancel()
        self._wake = loop.call_at(when, self.kick.set)

    async def _drain(self) -> None:
        if not self.link.up and self.link.retry_in > 0:
            # Down, and said so already: come back when the link may retry.
            self._wake_in(self.link.retry_in)
            return
        if (wait := self._retry_at - time.monotonic()) > 0:
            self._wake_in(wait)
            return
        stored = 0
        t0 = time.monotonic()
        skip: set[int] = set()  # servers whose next snapshot must wait
        for entry in self.spool.entries():
            if entry.srvid in skip:
                continue
            if (hold := self._hold.get(entry.srvid, 0.0) - time.monotonic()) > 0:
                skip.add(entry.srvid)
                self._wake_in(hold)
                continue
            self._hold.pop(entry.srvid, None)
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
                    fence = await self._store(server, snap.info, snap.staged, result, snap.stamp)
                except HandoverWait:
                    self.spool.busy(entry, False)
                    skip.add(entry.srvid)
                    self._hold[entry.srvid] = time.monotonic() + self._handover_poll
                    self._wake_in(self._handover_poll)
                    continue
                except LeaseLost:
                    self._lease_lost(server)
                    await self._done(entry, snap)
                    continue
                except StoredAlready:
                    self.stats.count(snap.alias, "spool", "duplicate")
                    log.info("spooled snapshot was stored already", server=snap.alias)
                    await self._done(entry, snap)
                    continue
                except RepositoryUnavailable as e:
                    self.spool.busy(entry, False)
                    log.debug("replay paused", error=str(e))
                    self._wake_in(max(self.link.retry_in, 0.5))
                    return
                except (TimeoutError, psycopg.Error) as e:
                    self.spool.busy(entry, False)
                    v = Verdict.KEEP if isinstance(e, TimeoutError) else verdict(e)
                    if v is Verdict.KEEP:
                        await self._refused_for_now(server, e)
                        self._wake_in(self._retry_at - time.monotonic())
                        return
                    tries = self._doubts.get(entry.seq, 0) + 1
                    if v is Verdict.DOUBT and tries < _DOUBT_TRIES:
                        self._doubts[entry.seq] = tries
                        self._doubtful(server, e, tries)
                        skip.add(entry.srvid)
                        self._hold[entry.srvid] = time.monotonic() + _doubt_delay(tries)
                        self._wake_in(_doubt_delay(tries))
                        continue
                    self._refused(server, e)
                    self.stats.count("", "spool", "dropped")
                    await self._done(entry, snap)
                    continue
                finally:
                    snap.close()
                await self._done(entry, snap)
                stored += 1
                self.stats.count(snap.alias, "spool", "replayed")
                if fence is Fence.HANDOVER:
                    self.stats.count(snap.alias, "lease", "handover")
                log.debug(
                    "spooled snapshot stored",
                    server=snap.alias,
                    age=round(time.time() - snap.taken_at, 1),
                    rows=result.rows,
                    handover=fence is Fence.HANDOVER or None,
                )
        if stored:
            log.info(
                "spooled snapshots stored",
                snapshots=stored,
                seconds=round(time.monotonic() - t0, 1),
                left=len(self.spool),
            )

    async def _done(self, entry: Entry, snap: Spooled) -> None:
        """A spooled snapshot is over (stored, or dropped): out of the spool.

        The last one of a server taken under a term another collector took
        from us: tell the repository, so that the new owner stores its own
        without waiting for our next lease round.
        """
        self.spool.remove(entry)
        self._doubts.pop(entry.seq, None)
        stamp = snap.stamp
        if (
            stamp is None
            or stamp.term is None
            or stamp.term == self.leases.term(entry.srvid)
            or self.spool.has(entry.srvid)
        ):
            return
        try:
            async with asyncio.timeout(self.store_timeout), self.link.use() as conn:
                await self.leases.drained(conn, entry.srvid, stamp.term)
        except (RepositoryUnavailable, TimeoutError, psycopg.Error) as e:
            # The next lease round says so instead.
            log.debug("handover not closed", server=snap.alias, error=first_line(e))


def _doubt_delay(tries: int) -> float:
    return float(min(2**tries, 60))


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
