"""One server's life in the daemon: its schedule, connections and snapshots.

A worker is an asyncio task per server.  It sleeps until its next slot (see
:mod:`pgfleet.collector.scheduler`), waits for a place among the snapshots in flight,
fetches from the server over its session (a main connection kept between
snapshots, the other databases visited in turn on connections closed after
each visit: see :class:`~pgfleet.snapshot.fetch.ServerSession`), and hands
the result to the writer.  It never has two snapshots going at once, and a
failure of any kind ends up counted and logged, never in a dead task.

A snapshot is one :func:`~pgfleet.snapshot.fetch.fetch` call: one batch of
COPYs per database, on at most ``max_connections_per_server`` connections at
once, as a one-shot snapshot does.  Each source's duration comes from the
fetch's per-source timings, each failure from ``result.failures`` with the
kind set where it was caught; the server's facts (version, databases, free
connection slots) are read once per snapshot (see :class:`Session`), and so
is its clock: one off by more than ``CLOCK_SKEW`` seconds is counted
(``clock``/``skewed``) at every snapshot and logged once, when it starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import psycopg

from pgfleet.collector import scheduler
from pgfleet.collector.exporter.latest import Latest
from pgfleet.collector.scheduler import Backoff, Limiter
from pgfleet.collector.stats import Stats
from pgfleet.collector.writer import Outcome, Ticket, Writer
from pgfleet.config import CollectorConfig
from pgfleet.connections import first_line
from pgfleet.errors import PgfleetError
from pgfleet.log import TRACE, EventLogger
from pgfleet.repository.servers import Server
from pgfleet.snapshot.fetch import ServerSession, fetch
from pgfleet.snapshot.model import (
    Failure,
    FailureKind,
    RegisteredSource,
    ServerInfo,
    SnapshotResult,
    Staged,
)

log = EventLogger("worker")

# Settings whose change needs new connections.
_CONNECTION = ("host", "port", "username", "dbname", "password_ref", "options")

# Seconds a server's clock may differ from ours before it is reported:
# retention and the web UI's ranges go by the timestamps servers give.
CLOCK_SKEW = 60.0


class Session(ServerSession):
    """A ServerSession that reads the server's facts once per snapshot,
    and counts the connections it opens (every one, the per-database
    visits' included: pgfleet_connections_opened_total)."""

    def __init__(self, server: Server, cfg: CollectorConfig, stats: Stats) -> None:
        super().__init__(server, cfg)
        self._info: ServerInfo | None = None
        self._stats = stats

    async def _connect(self, dbname: str) -> psycopg.AsyncConnection[Any]:
        c = await super()._connect(dbname)
        self._stats.count(self.server.alias, "connection", "opened")
        return c

    def new_snapshot(self) -> None:
        self._info = None

    async def info(self) -> ServerInfo:
        if self._info is None:
            self._info = await super().info()
        return self._info


def _iso(t: float | None) -> str | None:
    return None if t is None else datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


class Worker:
    def __init__(
        self,
        server: Server,
        cfg: CollectorConfig,
        *,
        limiter: Limiter,
        writer: Writer,
        stats: Stats,
        sources: Callable[[], list[RegisteredSource] | None],
        collector: str,
        latest: Latest | None = None,
    ) -> None:
        self.server = server
        self.cfg = cfg
        self.limiter = limiter
        self.writer = writer
        self.stats = stats
        self.sources = sources
        self.collector = collector
        self.log = log.bind(server=server.alias)
        self.latest = latest
        self.session = Session(server, cfg, stats)
        self.state = "starting"
        # Whether the last attempt reached the server; None before the first.
        self.reachable: bool | None = None
        self.next_run: float | None = None
        self.last_slot: float | None = None
        self.last_snapshot: float | None = None
        # The last snapshot stored or spooled (not dropped).
        self.last_success: float | None = None
        self.last_error: tuple[float, str, str] | None = None
        self.last_lag: float | None = None
        self.snapshots = 0
        self._backoff = Backoff(min(cfg.retry_max, server.frequency))
        self._retry_at: float | None = None
        self._wake = asyncio.Event()
        self._forced = False
        self._stopping = False
        self._keep_on_cancel = True
        # A session replaced while its snapshot ran, closed when it ends.
        self._stale: ServerSession | None = None
        # Whether the server's clock was last seen off (and said so).
        self._skewed = False
        self.task: asyncio.Task[None] | None = None

    # -- Control, from the daemon

    def start(self) -> None:
        self.task = asyncio.create_task(self.run(), name=f"worker {self.server.alias}")

    def force(self) -> bool:
        """Snapshot now; False if one is about to run or running already (as fresh)."""
        if self.state in ("queued", "running"):
            return False
        self._forced = True
        self._wake.set()
        return True

    async def update(self, server: Server, cfg: CollectorConfig) -> None:
        """New settings: reconnect if they touch the connection, reschedule in any case."""
        reconnect = cfg != self.cfg or any(
            getattr(server, f) != getattr(self.server, f) for f in _CONNECTION
        )
        self.server, self.cfg = server, cfg
        self.log = log.bind(server=server.alias)
        self._backoff.cap = min(cfg.retry_max, server.frequency)
        if reconnect:
            old, self.session = self.session, Session(server, cfg, self.stats)
            if self.state != "running":
                await old.close()
            else:
                # Closed by the running snapshot's end: see _snapshot.
                self._stale = old
        else:
            self.session.server = server
        self._wake.set()

    def stop(self) -> None:
        """Finish the snapshot in flight, if any, and start no other."""
        self._stopping = True
        self._wake.set()

    async def cancel(self, *, keep: bool) -> None:
        """Stop now; ``keep``: spool a fetched snapshot not yet stored."""
        self._stopping = True
        self._keep_on_cancel = keep
        if self.task is not None and not self.task.done():
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task

    def status(self, spooled: int) -> dict[str, Any]:
        failures = self.stats.failure_totals(self.server.alias)
        err = self.last_error
        return {
            "alias": self.server.alias,
            "collector": self.collector,
            "state": self.state,
            "frequency": self.server.frequency,
            "last_snapshot": _iso(self.last_snapshot),
            "last_error": None
            if err is None
            else {"at": _iso(err[0]), "source": err[1], "message": err[2]},
            "next_run": _iso(self.next_run),
            "lag": None if self.last_lag is None else round(self.last_lag, 3),
            "snapshots": self.snapshots,
            "spooled": spooled,
            "errors": failures[FailureKind.CONNECT] + failures[FailureKind.QUERY],
            "timeouts": failures[FailureKind.TIMEOUT] + failures[FailureKind.CANCELLED],
        }

    # -- The task

    def _due(self, now: float) -> float:
        offset = scheduler.phase(self.server.alias, self.server.frequency)
        due = scheduler.next_due(now, self.last_slot, self.server.frequency, offset)
        if self._retry_at is not None:
            due = min(due, self._retry_at)
        return due

    async def run(self) -> None:
        try:
            while not self._stopping:
                now = time.time()
                due = self._due(now)
                self.next_run = due
                self.state = "backoff" if self._retry_at is not None else "waiting"
                if not self._forced and due > now:
                    self._wake.clear()
                    try:
                        await asyncio.wait_for(self._wake.wait(), due - now)
                        continue  # woken: forced, new settings or stopping
                    except TimeoutError:
                        pass
                    if time.time() < due:
                        # Woken before the slot by the wall clock (the loop's
                        # timers run on another clock, and uvloop's round to the
                        # millisecond): taken now, the snapshot would count for
                        # the slot before, and the slot due be taken again.
                        continue
                if self._stopping:
                    break
                forced, self._forced = self._forced, False
                retry = self._retry_at is not None and not forced
                self.state = "queued"
                async with self.limiter:
                    if self._stopping:
                        break
                    started = time.time()
                    lag = None if forced or retry else max(0.0, started - due)
                    self.state = "running"
                    try:
                        ok = await self._snapshot(lag)
                    except Exception:
                        # A bug, not a server's failure: say so, and carry on.
                        self.log.exception("snapshot failed unexpectedly")
                        ok = True
                    finally:
                        if self._stale is not None:
                            await self._stale.close()
                            self._stale = None
                offset = scheduler.phase(self.server.alias, self.server.frequency)
                self.last_slot = scheduler.slot_at_or_before(started, self.server.frequency, offset)
                if ok:
                    self._backoff.reset()
                    self._retry_at = None
                else:
                    self._retry_at = time.time() + self._backoff.next()
        finally:
            self.state = "stopped"
            self.next_run = None
            await asyncio.shield(self._close())

    async def _close(self) -> None:
        with contextlib.suppress(psycopg.Error, OSError):
            await self.session.close()

    async def _fail(self, message: str, kind: FailureKind = FailureKind.CONNECT) -> bool:
        """The server could not be reached at all: count, record, back off."""
        failure = Failure("connection", kind, message)
        self.stats.fail(self.server.alias, failure)
        self.reachable = False
        if self.latest is not None:
            # Its last values are not current: out of the scrape until a
            # snapshot reaches it again (pgfleet_up says why meanwhile).
            self.latest.down(self.server.alias)
        self.last_error = (time.time(), "connection", message)
        await self._close()
        self.log.warning("server unreachable", error=message)
        await self.writer.record_failure(self.server, failure)
        return False

    def _guard(self, info: ServerInfo | None, sources: int = 0) -> float:
        """Client-side bound of a snapshot's fetch, for a server that stopped answering.

        The server cancels each statement at statement_timeout; this bounds
        the worst case past that: a connection to every database, and each
        source's statement on each of them one after the other.
        """
        cfg = self.cfg
        dbs = len(info.databases) + 1 if info else 1
        return (cfg.connect_timeout + cfg.statement_timeout * sources) * dbs + 5

    async def _snapshot(self, lag: float | None) -> bool:
        """Take one snapshot; False if the server could not be reached at all."""
        sources = self.sources()
        if sources is None:
            self.log.warning("snapshot skipped: source list not read from the repository yet")
            return True
        alias = self.server.alias
        result = SnapshotResult(alias, self.server.srvid)
        t0 = time.perf_counter()
        taken_at = time.time()
        self.session.new_snapshot()
        staged: list[Staged] = []
        ticket = Ticket()
        try:
            try:
                async with asyncio.timeout(self._guard(None)):
                    try:
                        info = await self.session.info()
                    except psycopg.Error:
                        # A kept connection found dead (the server restarted
                        # since last time): one new attempt says whether it
                        # is down or back.
                        await self._close()
                        info = await self.session.info()
            except TimeoutError:
                return await self._fail(
                    f"no answer within {self._guard(None):g} s", FailureKind.TIMEOUT
                )
            except psycopg.Error as e:
                return await self._fail(f"server {alias!r}: {first_line(e)}")
            except PgfleetError as e:  # ServerError, or an unresolvable password reference
                return await self._fail(str(e))
            self.reachable = True
            self._check_clock()
            # Query durations are kept per source, not per server and source:
            # a thousand servers times twenty sources of histograms is more
            # than anyone graphs.
            self.stats.observe("", "server_info", "query", time.perf_counter() - t0)
            guard = self._guard(info, len(sources))
            try:
                async with asyncio.timeout(guard):
                    try:
                        _, staged = await fetch(self.session, sources, result)
                    except PgfleetError:
                        # A connection lost mid-fetch (one of ours was
                        # terminated, or the server is going down): once
                        # more on new connections tells which.
                        await self._close()
                        result = SnapshotResult(alias, self.server.srvid)
                        _, staged = await fetch(self.session, sources, result)
            except TimeoutError:
                # psycopg cancelled the queries on the server on its way out.
                return await self._fail(
                    f"no answer after {guard:g} s (cancelled)", FailureKind.CANCELLED
                )
            except PgfleetError as e:
                return await self._fail(str(e))
            for src in sources:
                elapsed = result.phases.get("fetch " + src.module)
                if elapsed is not None:
                    self.stats.observe("", src.module, "query", elapsed)
            if self.log.enabled(TRACE):
                self._trace(staged, result)
            timed_out = False
            for failure in result.failures:
                self.stats.fail(alias, failure)
                self.log.warning("source failed", source=failure.source, error=failure.message)
                timed_out = timed_out or failure.kind is FailureKind.TIMEOUT
            if timed_out:
                # Rebuilt at the next snapshot: a connection whose query was
                # cancelled may still be stuck behind it.
                await self.session.close()
            fetch_seconds = time.perf_counter() - t0
            if self.latest is not None:
                try:
                    self.latest.update(alias, taken_at, info, staged)
                except Exception:
                    # The exporter's loss, not the snapshot's.
                    self.log.exception("latest values not updated for the exporter")
            submitted = time.perf_counter()
            try:
                outcome = await self.writer.submit(
                    self.server, taken_at, info, staged, result, ticket
                )
            except asyncio.CancelledError:
                if self._keep_on_cancel:
                    # Shutting down before the repository answered: keep it
                    # for the next run rather than lose it.  Spooled under the
                    # stamp it was submitted with, a copy whose store did
                    # commit after all is recognised at replay and skipped.
                    self.writer.put(self.server, taken_at, info, staged, result, ticket.stamp)
                raise
        finally:
            for st in staged:
                st.spool.close()
        self.stats.observe(alias, "snapshot", "duration", time.perf_counter() - t0)
        self.snapshots += 1
        self.last_snapshot = taken_at
        if outcome is not Outcome.DROPPED:
            self.last_success = taken_at
        self.last_lag = lag
        self.stats.count(alias, "snapshot", outcome.value)
        if lag is not None:
            self.stats.observe("", "scheduler", "lag", lag)
        if result.failures:
            last = result.failures[-1]
            self.last_error = (taken_at, last.source, last.message)
        # Debug: a thousand servers make a dozen of these a second; the
        # daemon logs a summary at info level instead.
        self.log.debug(
            f"snapshot {outcome.value}",
            sources=len(result.stored) if outcome is Outcome.STORED else len(staged),
            rows=result.rows,
            errors=len(result.failures),
            fetch_ms=round(fetch_seconds * 1000),
            store_ms=round((time.perf_counter() - submitted) * 1000),
            lag=None if lag is None else round(lag, 3),
        )
        return True

    def _check_clock(self) -> None:
        """Count a snapshot of a server whose clock is off; say so once, when it starts."""
        skew = self.session.skew
        if skew is None:
            return
        if abs(skew) > CLOCK_SKEW:
            self.stats.count(self.server.alias, "clock", "skewed")
            if not self._skewed:
                self._skewed = True
                self.log.warning("server clock differs from the collector's", skew_s=round(skew, 1))
        elif self._skewed:
            self._skewed = False
            self.log.info("server clock agrees with the collector's again", skew_s=round(skew, 1))

    def _trace(self, staged: list[Staged], result: SnapshotResult) -> None:
        """Each fetched row, as COPY text: the finest detail there is."""
        for st in staged:
            module = st.source.module
            end = st.spool.tell()
            st.spool.seek(0)
            rows = st.spool.read(end).splitlines()
            st.spool.seek(end)
            seconds = result.phases.get("fetch " + module, 0.0)
            self.log.trace(
                "source fetched", source=module, rows=len(rows), ms=round(seconds * 1000)
            )
            for line in rows:
                self.log.trace("value", source=module, row=line.decode(errors="replace"))
