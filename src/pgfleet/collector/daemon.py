"""``pgfleet collector``: the long-running process that keeps snapshots coming.

One asyncio event loop runs:

- a worker per server this collector holds (:mod:`pgfleet.collector.worker`), at
  most ``max_in_flight`` of them snapshotting at once;
- the fleet loop: discovery (:mod:`pgfleet.collector.discovery`) and lease rounds
  (:mod:`pgfleet.collector.lease`), which start and stop workers;
- the writer's replay of spooled snapshots (:mod:`pgfleet.collector.writer`);
- the command listener and handler (:mod:`pgfleet.collector.commands`);
- the management listeners (:mod:`pgfleet.management.server`): ``pgfleet ctl``
  over a private Unix socket, and remotely over SCRAM/TLS when a port is set;
  :class:`ManagementCommands` is what their commands do here;
- the backups of the servers it holds (:mod:`pgfleet.backup.service`): WAL
  receivers, scheduled base backups (in threads, a few at once), retention,
  told after every lease round which servers are ours; each server's catalog
  copied into the repository for the web UI (:mod:`pgfleet.backup.mirror`).

Signals: SIGTERM and SIGINT stop taking snapshots and exit within
``shutdown_timeout`` seconds, whatever the repository does meanwhile: the
snapshots in flight get most of it, then are cancelled (what they fetched
goes to the spool), the WAL receivers stop and the running base backups are
cancelled (left INVALID), the leases are given back if the repository answers
in time, and every await on the way out is under that one deadline (see
:meth:`Daemon._shutdown`).  SIGHUP rereads the configuration and the fleet;
settings that need a restart are named in the log and keep their old value.
systemd hears about all of it (:mod:`pgfleet.collector.systemd`).

Exit status: 0 after SIGTERM or SIGINT (every snapshot fetched is stored or
spooled); 1 for what only a human can fix (configuration, repository schema,
a collector name in use, a busy port); :data:`EXIT_FORCED` if the way out
still overran the deadline and the process cut it short (a bug: see the
log); 130 for a second Ctrl-C during the start.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Coroutine, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
from prometheus_client.registry import CollectorRegistry

from pgfleet import __version__, asgi, config, log
from pgfleet.backup.metrics import BackupCollector
from pgfleet.backup.mirror import Mirror
from pgfleet.backup.service import BackupRequestError, BackupService
from pgfleet.collector import commands, systemd
from pgfleet.collector.discovery import Discovery
from pgfleet.collector.exporter.endpoint import Endpoint, Row
from pgfleet.collector.exporter.health import Fleet, HealthCollector
from pgfleet.collector.exporter.latest import Latest
from pgfleet.collector.exporter.rendered import Rendered
from pgfleet.collector.lease import Leases, RoundResult
from pgfleet.collector.link import RepositoryLink, RepositoryUnavailable
from pgfleet.collector.scheduler import Backoff, Limiter
from pgfleet.collector.spool import Spool, default_directory
from pgfleet.collector.stats import Stats
from pgfleet.collector.worker import Worker
from pgfleet.collector.writer import Writer
from pgfleet.config import Config
from pgfleet.connections import connect_repository, connect_repository_async, first_line
from pgfleet.errors import ConfigError, RepositoryError
from pgfleet.management import handlers
from pgfleet.management import server as management
from pgfleet.management.document import ErrorCode, ManagementError
from pgfleet.repository import channel as repo_channel
from pgfleet.repository import schema
from pgfleet.repository import servers as repo_servers
from pgfleet.repository.channel import RequestRow
from pgfleet.repository.servers import Server
from pgfleet.repository.snapshots import registered_sources
from pgfleet.snapshot import wire
from pgfleet.snapshot.model import FailureKind, RegisteredSource
from pgfleet.snapshot.store import snapshot_local

# Settings read once at start: a reload that changes them says so and keeps
# the old value.
# pg_try_advisory_lock's key for local mode's snapshots: one collector takes them.
_LOCAL_LOCK = 0x70_67_66_6C_6C_6F_63  # "pgflloc" in ASCII: arbitrary, and ours

RESTART_SETTINGS = (
    "repository.dsn",
    "collector.name",
    "collector.lease_period",
    "collector.command_channel",
    "spool.directory",
    "exporter.enabled",
    "exporter.listen",
    "exporter.port",
    "web.enabled",
    "web.listen",
    "web.port",
    # Read once when the UI's app is made.
    "web.secret_key_file",
    "web.token",
    "web.token_file",
    "web.session_max_age",
    "web.secure_cookie",
    "web.pool_size",
    "web.max_connections",
    "web.pool_idle",
    "web.statement_timeout",
    "web.login_attempts",
    # The management listeners' addresses, bound at start.
    "management.unix_socket_dir",
    "management.host",
    "management.port",
    # Receivers and backups in flight hold files there (see backup/service.py).
    "backup.directory",
)
# Settings whose value ``conf get`` never shows.
SECRET_SETTINGS = ("web.token",)

# The shutdown: the last part of shutdown_timeout, kept for giving back the
# leases and closing (at most this, and at most a quarter of it).
_SHUTDOWN_RESERVE = 2.0
# psycopg cancels a query politely, waiting up to 10 s for the server: at
# shutdown a task still running after this long is cancelled again, which
# closes its connection instead.
_RECANCEL_EVERY = 0.2
# If the process is still there this long past the deadline (a hung thread,
# an await that ignores cancellation), it exits at once with EXIT_FORCED.
_FORCE_GRACE = 1.0
EXIT_FORCED = 4
# Warnings about bad command notifications: at most so many per window (s).
_WARNINGS_PER_WINDOW = 20
_WARNING_WINDOW = 10.0
SUMMARY_EVERY = 300.0  # seconds between two "collecting" lines at info level
_SUMMARY_COUNTS = {
    ("snapshot", "stored"),
    ("snapshot", "spooled"),
    ("snapshot", "dropped"),
    ("spool", "dropped"),
    ("spool", "replayed"),
}


def _setting(cfg: Config, dotted: str) -> Any:
    section, key = dotted.split(".")
    return getattr(getattr(cfg, section), key)


class Daemon:
    def __init__(
        self, cfg: Config, *, config_path: str | None, dsn: str, serve_web: bool = False
    ) -> None:
        self.cfg = cfg
        # ``pgfleet run`` with [web] enabled: the UI is served from this loop too.
        self.serve_web = serve_web
        self.config_path = config_path
        self.dsn = dsn  # what --repository or the file said, fixed for our life
        self.log = log.EventLogger("daemon")
        self.stats = Stats()
        self.latest = Latest(
            max_statements=cfg.exporter.max_statements, max_tables=cfg.exporter.max_tables
        )
        self.workers: dict[int, Worker] = {}
        self.fleet: dict[int, Server] = {}
        self.exit_code = 0
        self._sources: list[RegisteredSource] | None = None
        self._stop = asyncio.Event()
        self._fleet_wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Task[Any]] = set()
        self.inbox = commands.Inbox()
        self._inbox_wake = asyncio.Event()
        self._rows_due = False  # read the request rows even if nothing new came
        # Warnings about bad notifications: so many per window, then a count.
        self._window = time.monotonic()
        self._warned = 0
        self._held: dict[str, int] = {}
        self._schema_checked = False
        # When a stop was asked for, the shutdown must be over (monotonic).
        self._deadline: float | None = None
        self._force_timer: threading.Timer | None = None
        self._summary_at = time.monotonic()
        self._summary_totals: dict[str, int] = {}
        self.started_at = time.time()
        self.management: management.ManagementServer | None = None

    # -- Life cycle

    async def main(self) -> int:
        cfg = self.cfg
        spool_dir = Path(cfg.spool.directory).expanduser() if cfg.spool.directory else None
        self.spool = Spool(spool_dir or default_directory(), round(cfg.spool.max_size * 2**20))
        self.spool.open()
        try:
            return await self._run()
        finally:
            self.spool.close()

    def prepare(self) -> None:
        """Make the parts that need no I/O: links, leases, writer, discovery.

        ``main`` does it before starting anything; tests that drive one part
        in-process (the command handler, say) call it with ``spool`` set.
        """
        cfg = self.cfg
        self.name = cfg.collector.name or self.spool.collector_name()
        self.log = self.log.bind(collector=self.name)
        app = f"{cfg.collector.application_name} {self.name}"
        self.channel = cfg.collector.command_channel

        def link(role: str, statement_timeout: float = 30) -> RepositoryLink:
            # retry_max stays at its default: lease.RECONNECT counts on it.
            return RepositoryLink(
                self.dsn,
                role,
                application_name=app,
                statement_timeout=statement_timeout,
                connect_timeout=cfg.collector.connect_timeout,
            )

        self.control = link("control")
        self.writer_link = link("writer", cfg.collector.store_timeout)
        self.leases = Leases(self.name, cfg.collector.lease_period)
        self.writer = Writer(
            self.writer_link,
            self.spool,
            self.leases,
            self.stats,
            store_timeout=cfg.collector.store_timeout,
            purge_interval=cfg.collector.purge_interval,
            # A store refused for want of the lease: the next round says
            # which servers are still ours, better now than later.
            on_lease_lost=lambda srvid: self._fleet_wake.set(),
        )
        self.discovery = Discovery(cfg.discovery, cfg.source, self.stats)
        self.limiter = Limiter(cfg.collector.max_in_flight)
        self.requests = commands.Requests(self.channel)
        # The backup catalogs' copy for the web UI, on a link of its own: a
        # slow repository holds neither the snapshots nor the leases.
        self.backups_link = link("backups")
        backup_log = self.log.bind(component="backup")
        self.backups = BackupService(
            cfg,
            self.stats,
            collector=self.name,
            log=backup_log,
            mirror=Mirror(self.backups_link, backup_log),
        )

    async def _run(self) -> int:
        cfg = self.cfg
        self.prepare()
        self.backups.start()  # its key file read: a ConfigError before anything starts
        # Bound before anything starts, so that a busy port is one clear
        # error at start rather than a collector without its endpoint.
        servers = self._http_servers()
        await self._start_management()

        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_hup)

        self.log.info(
            "collector starting",
            providers=",".join(cfg.discovery.providers),
            spool=str(self.spool.directory),
            spooled=len(self.spool),
            max_in_flight=cfg.collector.max_in_flight,
            lease_period=cfg.collector.lease_period,
        )
        for coro, name in (
            (self._fleet_loop(), "fleet"),
            (self._listen_loop(), "listen"),
            (self._command_loop(), "commands"),
            (self.writer.replay(), "replay"),
            (self._watchdog(), "watchdog"),
            (self._local_loop(), "local"),
            *servers,
        ):
            self._tasks.append(asyncio.create_task(coro, name=name))
        systemd.notify("READY=1", "STATUS=collecting")
        try:
            await self._stop.wait()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            await self._shutdown()
        return self.exit_code

    async def _local_loop(self) -> None:
        """Local mode ([collector] local): snapshot srvid 0, the repository's
        own instance, at its frequency.

        One collector of those sharing the repository does it: the one whose
        session holds the advisory lock below (session-level: it goes with
        the session, and another collector takes over within a period).  A
        reload turns it on or off.  The snapshot is the repository's own
        transaction (snapshot_local()): nothing to spool, and a failed one
        is simply the next period's to take.
        """
        conn: psycopg.AsyncConnection[Any] | None = None
        backoff = Backoff(self.cfg.collector.retry_max)
        holder = False
        last_error: str | None = None
        while not self._stop.is_set():
            delay = 5.0
            try:
                if not self.cfg.collector.local:
                    if conn is not None:
                        await conn.close()
                        conn, holder = None, False
                elif conn is None or conn.closed:
                    conn, holder = await connect_repository_async(self.dsn), False
                if conn is not None:
                    if not holder:
                        cur = await conn.execute(
                            "SELECT pg_catalog.pg_try_advisory_lock(%s)", (_LOCAL_LOCK,)
                        )
                        row = await cur.fetchone()
                        holder = bool(row and row[0])
                        if holder:
                            self.log.info("local snapshots: this collector takes them")
                    cur = await conn.execute(
                        "SELECT frequency, enabled FROM pgfleet.servers WHERE srvid = 0"
                    )
                    row = await cur.fetchone()
                    delay = float(row[0]) if row else 300.0
                    if holder and row and row[1]:
                        started = time.monotonic()
                        res = await snapshot_local(conn)
                        self.log.info(
                            "local snapshot",
                            server="local",
                            sources=len(res.stored),
                            failures=len(res.failures),
                            skipped=len(res.skipped),
                            ms=round((time.monotonic() - started) * 1000),
                        )
                        delay = max(1.0, delay - (time.monotonic() - started))
                    elif not holder:
                        # Another collector has it: look again within a period.
                        delay = min(delay, self.cfg.collector.lease_period)
                backoff.reset()
                last_error = None
            except (psycopg.Error, RepositoryError, OSError) as e:
                if first_line(e) != last_error:
                    last_error = first_line(e)
                    self.log.warning("local snapshot failed", error=last_error)
                if conn is not None and (conn.closed or conn.broken):
                    conn, holder = None, False
                delay = backoff.next()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), delay)
        if conn is not None:
            await conn.close()

    async def _start_management(self) -> None:
        """Bind the management socket (and port); ConfigError if impossible."""
        cfg = self.cfg.management
        path = management.socket_path(cfg, self.spool.directory)
        self.management = management.ManagementServer(
            management.prepare(cfg),
            ManagementCommands(self),
            socket_file=path,
            stats=self.stats,
            logger=self.log.bind(component="management"),
        )
        await self.management.start()
        fields: dict[str, Any] = {"socket": str(path)}
        if self.management.address is not None:
            host, port = self.management.address
            fields["remote"] = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            fields["tls"] = "required" if cfg.require_tls else bool(cfg.tls_cert_file)
        self.log.info("management listening", **fields)

    def _http_servers(self) -> list[tuple[Coroutine[Any, Any, None], str]]:
        """The HTTP servers to run (exporter, web UI), their sockets bound."""
        cfg = self.cfg
        out = []
        if cfg.exporter.enabled:
            registry = CollectorRegistry(auto_describe=False)
            registry.register(
                HealthCollector(Fleet(self.name, self.workers, self.stats, self.spool))
            )
            registry.register(BackupCollector(self.backups))
            rendered = Rendered(self.latest)
            app = Endpoint(registry, self._overview, rendered)
            sock = asgi.bind(cfg.exporter.listen, cfg.exporter.port, "the exporter")
            self.log.info("exporter listening", url=f"http://{_hostport(sock)}/metrics")
            out.append((self._serving(asgi.serve(app, sock), "exporter"), "exporter"))
            # Nothing is parsed or rendered for the exporter until a scrape asks
            # (see exporter/latest.py); then, between scrapes, the servers that
            # changed are rendered ahead of the next one (rendered.py).
            out.append((self._serving(rendered.ahead(), "exporter's rendering"), "render-ahead"))
        if self.serve_web:
            from pgfleet import web

            ui = web.create_app(cfg)
            sock = asgi.bind(cfg.web.listen, cfg.web.port, "the web UI")
            self.log.info("web UI listening", url=f"http://{_hostport(sock)}/")
            out.append((self._serving(asgi.serve(ui, sock, lifespan="on"), "web UI"), "web"))
        return out

    async def _serving(self, coro: Coroutine[Any, Any, None], what: str) -> None:
        try:
            await coro
        except ConfigError as e:
            self.fatal(str(e))
        except asyncio.CancelledError:
            raise
        except Exception:
            self.log.exception(f"the {what} stopped")
            self.fatal(f"the {what} stopped unexpectedly")

    def _overview(self) -> tuple[str, list[Row]]:
        rows = []
        for w in sorted(self.workers.values(), key=lambda w: w.server.alias):
            err = w.last_error
            rows.append(
                Row(
                    w.server.alias,
                    w.state,
                    w.reachable,
                    w.last_success,
                    None if err is None else f"{err[1]}: {err[2]}",
                )
            )
        return self.name, rows

    def _on_stop(self, sig: signal.Signals) -> None:
        self.request_stop(signal=sig.name)

    def request_stop(self, **why: Any) -> None:
        """Begin the clean stop (a signal, or ``pgfleet ctl shutdown``)."""
        if self._stop.is_set():
            return
        self._deadline = _now() + self.cfg.collector.shutdown_timeout
        self.log.info("stopping", **why)
        systemd.notify("STOPPING=1", "STATUS=stopping")
        self._stop.set()

    def _on_hup(self) -> None:
        self._spawn(self.reload("SIGHUP"))

    def fatal(self, message: str) -> None:
        """Stop with exit status 1: something only a human can fix."""
        self.log.error(message)
        self.exit_code = 1
        self._stop.set()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _shutdown(self) -> None:
        """Stop everything within shutdown_timeout of the stop request, always.

        Snapshots in flight get the time but a reserve; then they are
        cancelled, and each spools what it fetched but could not store
        (synchronously: nothing can interrupt that).  The reserve gives the
        leases back and closes the links.  Every wait is against the one
        deadline; a task that outlives its cancellation (psycopg waits for
        the server to confirm a cancelled query) is cancelled again, which
        closes its connection.  Should all that still overrun (a hung
        thread), a timer thread ends the process past the deadline.
        """
        timeout = self.cfg.collector.shutdown_timeout
        deadline = self._deadline or time.monotonic() + timeout
        self._arm_force_exit(deadline)
        reserve = min(_SHUTDOWN_RESERVE, timeout / 4)
        if self.management is not None:
            # No new command once stopping; one being answered gets a moment.
            await self.management.close(timeout=min(1.0, reserve))
        # Receivers stopped, base backups cancelled (INVALID), alongside the snapshots.
        backups = asyncio.create_task(self.backups.close(deadline - reserve), name="backups")
        workers = list(self.workers.values())
        for w in workers:
            w.stop()
        # The rest stops now: no lease round, discovery, command or replay
        # starts after a stop request.
        service = asyncio.create_task(
            _settle([*self._tasks, *self._background], deadline - reserve)
        )
        running = [w.task for w in workers if w.task is not None and not w.task.done()]
        if running:
            _, late = await asyncio.wait(running, timeout=max(0.0, deadline - reserve - _now()))
            if late:
                self.log.warning(
                    "snapshots still running at the deadline: cancelled, fetched data spooled",
                    count=len(late),
                )
            await _settle(running, deadline - reserve / 2)
        await service
        await backups
        # Let the others take our servers now rather than when our leases
        # expire; keep those whose snapshots wait in our spool.
        leave = asyncio.create_task(self._leave(), name="leave")
        await _settle([leave], deadline - 0.1, cancel=False)
        left = [
            t for t in (*running, *self._tasks, *self._background, backups, leave) if not t.done()
        ]
        if left:
            self.log.warning(
                "tasks still running at the shutdown deadline",
                tasks=",".join(sorted(t.get_name() for t in left)),
            )
        self._command_totals()
        for link in (self.control, self.writer_link, self.backups_link):
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.05, deadline - _now())):
                    await link.close()
        self.log.info(
            "collector stopped",
            spooled=len(self.spool),
            seconds=round(timeout - (deadline - _now()), 1),
        )

    def _command_totals(self) -> None:
        """What the command channel received and what became of it, if anything."""
        waiting = self.inbox.clear()
        if waiting:
            self.stats.count("", "commands", "dropped", waiting)
            self._held["dropped"] = self._held.get("dropped", 0) + waiting
        self._flush_warnings(final=True)
        counts = {k: n for (srv, src, k), n in self.stats.counters().items() if src == "commands"}
        if counts:
            self.log.info("command channel totals", **dict(sorted(counts.items())))

    async def _leave(self) -> None:
        try:
            async with self.control.use() as conn:
                await self.leases.leave(conn, self.spool.servers())
        except (RepositoryError, psycopg.Error) as e:
            self.log.debug("leases not released", error=first_line(e))

    def _arm_force_exit(self, deadline: float) -> None:
        """The last resort: a thread that ends the process _FORCE_GRACE past ``deadline``."""
        if self._force_timer is not None:
            return
        code = EXIT_FORCED

        def force() -> None:
            self.log.error(
                "shutdown overran shutdown_timeout: exiting now",
                spooled=len(self.spool),
                exit_code=code,
            )
            for h in logging.getLogger(log.ROOT).handlers:
                with contextlib.suppress(Exception):
                    h.flush()
            os._exit(code)

        self._force_timer = threading.Timer(max(0.0, deadline - _now()) + _FORCE_GRACE, force)
        self._force_timer.daemon = True
        self._force_timer.start()

    def disarm(self) -> None:
        """The process is leaving by itself: no need for the last resort."""
        if self._force_timer is not None:
            self._force_timer.cancel()

    # -- Fleet: discovery, leases, workers

    async def _fleet_loop(self) -> None:
        last_discovery = 0.0
        # The last round's error: a repository refusing for minutes (read-only,
        # full) is said once, not every third of a lease period.
        last_error: str | None = None
        while True:
            period = self.cfg.collector.lease_period
            interval = min(period / 3, self.cfg.discovery.refresh)
            try:
                due = time.monotonic() - last_discovery >= self.cfg.discovery.refresh
                async with self.control.use() as conn:
                    if not self._schema_checked and not await self._check_repository(conn):
                        return
                    if due or self._fleet_wake.is_set() or not self.fleet:
                        self._fleet_wake.clear()
                        self.fleet = await self.discovery.refresh(conn)
                        self._sources = await registered_sources(conn)
                        self.writer.fleet = self.fleet
                        last_discovery = time.monotonic()
                    result = await self.leases.round(conn, set(self.fleet))
                    if self.leases.rounds % 100 == 1:
                        await commands.housekeeping(conn)
                await self._reconcile(result)
                if last_error is not None:
                    self.log.info("fleet rounds work again")
                    last_error = None
                self.writer.ready = True
                self.writer_link.retry_now()
                self.writer.kick.set()
            except RepositoryUnavailable:
                pass  # the link said so; carry on with the servers we have
            except ConfigError as e:
                self.log.error("discovery failed", error=str(e))
            except psycopg.Error as e:
                # A lost race with another collector (deadlock), or a
                # repository refusing writes for now.
                if first_line(e) != last_error:
                    last_error = first_line(e)
                    self.log.warning("fleet round failed", error=last_error, sqlstate=e.sqlstate)
                if (e.sqlstate or "")[:2] in ("08", "25", "57"):
                    # A session keeps the read-only setting it started with
                    # (ALTER DATABASE ... default_transaction_read_only):
                    # the next round's new session may not.
                    await self.control.drop("fleet round failed", failed=False)
            except asyncio.CancelledError:
                raise
            except Exception:
                self.log.exception("fleet round failed")
            if time.monotonic() - self._summary_at >= SUMMARY_EVERY:
                self._summary()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._fleet_wake.wait(), interval)

    def _summary(self) -> None:
        """What happened since the last summary, in one line."""
        totals: dict[str, int] = {}
        for (_, source, kind), n in self.stats.counters().items():
            # "spool/spooled" repeats "snapshot/spooled": counted once.
            if (source, kind) in _SUMMARY_COUNTS:
                totals[kind] = totals.get(kind, 0) + n
        for (_, source, fkind), n in self.stats.failures().items():
            if source == "connection":
                key = "unreachable"
            elif fkind in (FailureKind.TIMEOUT, FailureKind.CANCELLED):
                key = "timeouts"
            else:
                continue
            totals[key] = totals.get(key, 0) + n
        delta = {k: n - self._summary_totals.get(k, 0) for k, n in totals.items()}
        self._summary_totals = totals
        lag = self.stats.histograms().get(("", "scheduler", "lag"))
        self.log.info(
            "collecting",
            servers=len(self.workers),
            seconds=round(time.monotonic() - self._summary_at),
            **{k: delta.get(k, 0) for k in ("stored", "spooled", "replayed", "dropped")},
            unreachable=delta.get("unreachable", 0),
            timeouts=delta.get("timeouts", 0),
            spool=len(self.spool),
            # Since the start, as an upper bound (a histogram bucket).
            lag_p99_le=lag.quantile(0.99) if lag else None,
        )
        self._summary_at = time.monotonic()

    async def _check_repository(self, conn: psycopg.AsyncConnection[Any]) -> bool:
        """Whether we can work with this repository; if not, stop with a reason."""
        have = await schema.current_version_async(conn)
        latest = schema.latest_version()
        if have is None:
            self.fatal("the repository is not initialised: run 'pgfleet repo init'")
        elif have != latest:
            self.fatal(
                f"the repository schema is at version {have}, this pgfleet needs {latest}: "
                + ("run 'pgfleet repo upgrade'" if have < latest else "upgrade pgfleet")
            )
        elif (other := await self.leases.name_taken(conn)) is not None:
            self.fatal(
                f"collector name {self.name!r} is in use by a live collector ({other}): "
                "give each collector its own [collector] name"
            )
        self._schema_checked = not self.exit_code
        return self._schema_checked

    async def _reconcile(self, rr: RoundResult) -> None:
        owned = rr.owned & set(self.fleet)
        for srvid in list(self.workers):
            w = self.workers[srvid]
            if srvid not in self.fleet:
                self.log.info("server left the fleet", server=w.server.alias)
                await self._drop_worker(srvid, keep=False)
                dropped = self.spool.drop_server(srvid)
                if dropped:
                    self.stats.count("", "spool", "dropped", dropped)
                self.stats.forget(w.server.alias)
                self.latest.forget(w.server.alias)
            elif srvid not in owned:
                self.log.info("server now collected by another collector", server=w.server.alias)
                await self._drop_worker(srvid, keep=False)
                self.stats.forget(w.server.alias)
                self.latest.forget(w.server.alias)
        for srvid in sorted(owned - set(self.workers)):
            self._start_worker(self.fleet[srvid])
        for srvid, w in self.workers.items():
            if w.server != self.fleet[srvid] or w.cfg != self.cfg.collector:
                await w.update(self.fleet[srvid], self.cfg.collector)
        await self._balance(rr)
        # A server's receiver and backups run where it is collected.
        self.backups.reconcile(self.fleet, set(self.workers))
        systemd.notify(f"STATUS=collecting {len(self.workers)} server(s)")

    def _start_worker(self, server: Server) -> None:
        w = Worker(
            server,
            self.cfg.collector,
            limiter=self.limiter,
            writer=self.writer,
            stats=self.stats,
            sources=lambda: self._sources,
            collector=self.name,
            latest=self.latest,
        )
        self.workers[server.srvid] = w
        w.start()
        self.log.debug("server collected here", server=server.alias)

    async def _drop_worker(self, srvid: int, *, keep: bool) -> None:
        w = self.workers.pop(srvid, None)
        if w is not None:
            await w.cancel(keep=keep)

    async def _balance(self, rr: RoundResult) -> None:
        """Give back leases above our fair share, so that a new collector gets its part."""
        excess = len(self.workers) - rr.share
        if excess <= 0:
            return
        # Idle ones with nothing spooled: nothing is lost by letting them go.
        candidates = sorted(
            (
                w
                for srvid, w in self.workers.items()
                if w.state in ("waiting", "backoff")
                and not self.spool.has(srvid)
                and not self.backups.busy(srvid)
            ),
            key=lambda w: w.next_run or 0.0,
            reverse=True,
        )[:excess]
        if not candidates:
            return
        released = {w.server.srvid for w in candidates}
        for srvid in released:
            await self._drop_worker(srvid, keep=False)
        async with self.control.use() as conn:
            await self.leases.release(conn, released)
        self.log.info(
            "leases given back for balance",
            servers=len(released),
            share=rr.share,
            collectors=rr.collectors,
        )

    # -- Reload

    async def reload(self, origin: str) -> str:
        """Reread the configuration and the fleet; return what happened, in one line."""
        message, _ = await self.reload_details(origin)
        return message

    async def reload_details(self, origin: str) -> tuple[str, list[str]]:
        """``reload``, and the changed settings that wait for a restart."""
        systemd.reloading()
        try:
            try:
                new = config.load(self.config_path)
                restart = await self.apply_config(new)
            except ConfigError as e:
                self.log.error("reload failed, configuration unchanged", error=str(e))
                raise
            self.log.info("configuration reloaded", origin=origin, source=new.source)
            message = f"configuration reloaded from {new.source}"
            if restart:
                message += "; needs a restart to apply: " + ", ".join(restart)
            return message, restart
        finally:
            systemd.notify("READY=1", f"STATUS=collecting {len(self.workers)} server(s)")

    async def apply_config(self, new: Config) -> list[str]:
        """Make ``new`` the configuration; return the changed settings that need a restart.

        Those keep their current values until a restart.  Whatever may fail
        (a discovery file, a TLS file) is checked before anything changes:
        a ConfigError leaves the configuration as it was.
        """
        mgmt = management.prepare(new.management) if self.management is not None else None
        backup_setup = self.backups.prepare(new)
        self.discovery.configure(new.discovery, new.source)
        restart = [k for k in RESTART_SETTINGS if _setting(new, k) != _setting(self.cfg, k)]
        if restart:
            self.log.warning(
                "settings changed that need a restart: old values kept",
                settings=",".join(restart),
            )
        new = _keep(new, self.cfg, RESTART_SETTINGS)
        self.cfg = new
        log.setup(new.logging.level, new.logging.format)
        await self.limiter.resize(new.collector.max_in_flight)
        self.spool.max_bytes = round(new.spool.max_size * 2**20)
        self.writer.store_timeout = new.collector.store_timeout
        self.writer.purge_interval = new.collector.purge_interval
        self.latest.configure(
            max_statements=new.exporter.max_statements, max_tables=new.exporter.max_tables
        )
        if self.management is not None and mgmt is not None:
            self.management.configure(mgmt)
        self.backups.configure(dataclasses.replace(backup_setup, cfg=new))
        self._fleet_wake.set()  # rediscover now; workers get new settings there
        return restart

    # -- Commands

    async def _listen_loop(self) -> None:
        backoff = Backoff(30)
        while True:
            try:
                async with asyncio.timeout(self.cfg.collector.connect_timeout):
                    conn = await connect_repository_async(self.dsn)
                async with conn:
                    since = await repo_channel.listen_async(conn, self.channel)
                    if self.requests.since is None:
                        # A request committed just before we listened was
                        # meant for us too (its transaction began earlier).
                        self.requests.since = since - timedelta(seconds=2)
                    self.log.debug("listening for commands", channel=self.channel)
                    backoff.reset()
                    async for n in wire.notifications(conn):
                        self._received(n)
            except (RepositoryError, psycopg.Error, TimeoutError) as e:
                self.log.debug("command channel lost", error=first_line(e))
            await asyncio.sleep(backoff.next())

    def _received(self, n: psycopg.Notify) -> None:
        """File a notification (no I/O: the listener must keep up with any flood)."""
        self.stats.count("", "commands", "received")
        dropped = self.inbox.put(n.pid, n.payload)
        if dropped:
            self.stats.count("", "commands", "dropped", dropped)
            self._warn_later("dropped", dropped)
            # It may have been a request's: the rows say, dropped or not.
            self._rows_due = True
        self._inbox_wake.set()

    async def _command_loop(self) -> None:
        while True:
            if not self.inbox.has_new and not self._rows_due:
                if not len(self.inbox):
                    await self._inbox_wake.wait()
                # Unmatched notifications wait: a moment for new ones first.
                await asyncio.sleep(0)
            self._inbox_wake.clear()
            try:
                if self.inbox.has_new or self._rows_due:
                    await self._serve_requests()
                await self._answer_unmatched()
            except asyncio.CancelledError:
                raise
            except Exception as e:
                # What waits might be requests: dropped rather than refused;
                # their rows (what counts) are read again once the
                # repository is back, or at the next notification.
                n = self.inbox.clear()
                if n:
                    self.stats.count("", "commands", "dropped", n)
                    self._warn_later("dropped", n)
                self._rows_due = False
                if isinstance(e, RepositoryUnavailable):
                    delay = max(1.0, self.control.retry_in)
                    asyncio.get_running_loop().call_later(delay, self._recheck_rows)
                    self.log.debug("commands not answered", error=str(e))
                elif isinstance(e, RepositoryError | psycopg.Error):
                    self.log.warning("command not answered", error=first_line(e))
                else:
                    self.log.exception("command handling failed")
            self._flush_warnings()

    def _recheck_rows(self) -> None:
        self._rows_due = True
        self._inbox_wake.set()

    async def _serve_requests(self) -> None:
        """Match the new notifications with the request rows; act on the rows, oldest first."""
        batch = self.inbox.take_new()
        # Set again by a drop while we read (that request may be too recent for this read).
        self._rows_due = False
        try:
            async with self.control.use() as conn:
                rows = await self.requests.pending(conn)
        except BaseException:
            for pid, _ in batch:
                self.inbox.done(pid)
            if batch:
                self.stats.count("", "commands", "dropped", len(batch))
                self._warn_later("dropped", len(batch))
            raise
        self._rows_due |= len(rows) >= commands.REQUESTS_PER_ROUND
        mine, garbage = self.requests.match(rows, batch)
        for pid, _ in mine:
            self.inbox.done(pid)
        for pid, payload in garbage:
            self.inbox.unmatched(pid, payload)
        for row in rows:
            # Each row is acted upon once: one that cannot be answered must
            # not take the next ones with it.
            try:
                await self._handle(row.payload, row)
            except (RepositoryError, psycopg.Error) as e:
                self.log.warning("command not answered", error=first_line(e), request=row.id)

    async def _answer_unmatched(self, budget: float = 0.05) -> None:
        """Answer notifications of no request, while nothing new waits, for ``budget`` seconds."""
        until = _now() + budget
        while not self.inbox.has_new and _now() < until:
            item = self.inbox.next_unmatched()
            if item is None:
                return
            await self._handle(item[1], None)

    async def _handle(self, payload: str, row: RequestRow | None) -> None:
        """Answer one request (``row``) or a notification that matched none."""
        try:
            req = commands.parse(payload)
        except commands.BadRequest as e:
            self.stats.count("", "commands", "malformed")
            if self._log_budget():
                self.log.warning("malformed command", payload=payload[:200], error=e.reason)
            if e.channel is not None and e.channel != self.channel:
                await self._answer(e.channel, e.command or "ERROR", False, e.reason)
            return
        if req.channel == self.channel:
            # An answer there would read as a command to every collector.
            self.stats.count("", "commands", "ignored")
            if self._log_budget():
                self.log.warning("command ignored: its response channel is the command channel")
            return
        refusal = commands.NOT_AUTHORIZED if row is None else commands.refusal(row)
        if refusal is not None:
            self.stats.count("", "commands", "refused")
            if self._log_budget():
                self.log.warning("command refused", command=req.command, error=refusal)
            await self._answer(req.channel, req.command, False, refusal)
            return
        assert row is not None
        self.stats.count("", "commands", req.command.lower())
        self.log.info("command", command=req.command, args=" ".join(req.args), sender=row.sender)
        ok, data = await self._execute(req)
        await self._answer(req.channel, req.command, ok, data)

    def _log_budget(self) -> bool:
        """Whether a warning about a bad notification may be logged now (a flood is not)."""
        self._flush_warnings()
        if self._warned < _WARNINGS_PER_WINDOW:
            self._warned += 1
            return True
        self._warn_later("unlogged", 1)
        return False

    def _warn_later(self, what: str, n: int) -> None:
        self._held[what] = self._held.get(what, 0) + n
        self._flush_warnings()

    def _flush_warnings(self, *, final: bool = False) -> None:
        """Say what a flood made us drop or not log, once per window at most."""
        now = _now()
        if not final and now - self._window < _WARNING_WINDOW:
            return
        self._window, self._warned = now, 0
        held, self._held = self._held, {}
        if held.get("dropped"):
            self.log.warning(
                "command notifications dropped: too many waiting",
                dropped=held["dropped"],
                total=self.stats.get("", "commands", "dropped"),
                received=self.stats.get("", "commands", "received"),
            )
        if held.get("unlogged"):
            self.log.warning("more bad command notifications, not logged", count=held["unlogged"])

    async def _execute(self, req: commands.Request) -> tuple[bool, str]:
        if req.command == "RELOAD":
            try:
                return True, f"collector {self.name}: " + await self.reload("command")
            except ConfigError as e:
                return False, str(e)
        if req.command == "WORKERS_STATUS":
            srvid = req.srvid()
            picked = {s: w for s, w in self.workers.items() if srvid is None or s == srvid}
            return True, json.dumps(
                {str(s): w.status(self.spool.count(s)) for s, w in sorted(picked.items())}
            )
        # FORCE_SNAPSHOT
        srvid = req.srvid()
        assert srvid is not None
        w = self.workers.get(srvid)
        if w is None:
            return False, f"server {srvid} is not collected by collector {self.name}"
        if w.force():
            return True, f"snapshot of {w.server.alias!r} started by collector {self.name}"
        return True, f"snapshot of {w.server.alias!r} already running on collector {self.name}"

    async def _answer(self, channel: str | None, command: str, ok: bool, data: str) -> None:
        if channel is None:
            return
        async with self.control.use() as conn:
            await commands.send_answer(conn, channel, command, ok, data)

    # -- systemd watchdog

    async def _watchdog(self) -> None:
        interval = systemd.watchdog_interval()
        if interval is None:
            return
        while True:
            # The loop runs if we get here at all; that is what the watchdog asks.
            systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval)


def _now() -> float:
    return time.monotonic()


def _keep(new: Config, old: Config, settings: tuple[str, ...]) -> Config:
    """``new`` with the values ``settings`` have in ``old``."""
    sections: dict[str, dict[str, Any]] = {}
    for dotted in settings:
        section, key = dotted.split(".")
        sections.setdefault(section, {})[key] = _setting(old, dotted)
    return dataclasses.replace(
        new,
        **{
            section: dataclasses.replace(getattr(new, section), **keys)
            for section, keys in sections.items()
        },
    )


async def _settle(
    tasks: list[asyncio.Task[Any]], until: float, *, cancel: bool = True
) -> set[asyncio.Task[Any]]:
    """Wait for ``tasks`` to end by ``until``, cancelling them meanwhile.

    They are cancelled at once (without ``cancel``: once half the time left
    is over), then again every _RECANCEL_EVERY while they linger.  Return
    those still running at ``until``.
    """
    pending = {t for t in tasks if not t.done()}
    if not cancel and pending:
        _, pending = await asyncio.wait(pending, timeout=max(0.0, (until - _now()) / 2))
    while pending:
        for t in pending:
            t.cancel()
        left = until - _now()
        if left <= 0:
            break
        _, pending = await asyncio.wait(pending, timeout=min(left, _RECANCEL_EVERY))
    return pending


def _hostport(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def run(cfg: Config, *, config_path: str | None, dsn: str, serve_web: bool = False) -> int:
    """Run the collector until SIGTERM or SIGINT; return the exit status."""
    if not dsn:
        raise ConfigError(
            "no repository configured: pass --repository DSN, set PGFLEET_REPOSITORY, "
            "or [repository] dsn in the configuration file"
        )
    log.setup(cfg.logging.level, cfg.logging.format)
    daemon = Daemon(cfg, config_path=config_path, dsn=dsn, serve_web=serve_web)
    try:
        # asyncio.run's own way out (the tasks left, the executor's threads)
        # is under the shutdown's last resort too: disarmed only after it.
        return asyncio.run(daemon.main())
    except KeyboardInterrupt:  # a second Ctrl-C during the start
        return 130
    finally:
        daemon.disarm()


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).isoformat(timespec="seconds")


def _shown(key: str, value: Any) -> Any:
    """A setting as ``conf get`` shows it: tuples as lists, secrets hidden."""
    if key in SECRET_SETTINGS and value:
        return "<redacted>"
    if key == "repository.dsn":
        return log.redact(value)
    return list(value) if isinstance(value, tuple) else value


class ManagementCommands:
    """What the management commands do in this daemon (a :class:`handlers.Target`).

    Everything is read from the daemon's memory, but the ``server``
    commands, which go to the repository as ``pgfleet server`` does, in a
    thread (the registry's functions are synchronous) under
    ``[management] timeout``, and the ``backup`` commands, which are the
    :class:`~pgfleet.backup.service.BackupService`'s (the backup directory
    read in threads; backups and verifications started, not waited for).
    """

    def __init__(self, daemon: Daemon) -> None:
        self.d = daemon

    async def status(self, details: bool) -> dict[str, Any]:
        d = self.d
        workers = list(d.workers.values())
        states = Counter(w.state for w in workers)
        out: dict[str, Any] = {
            "Collector": d.name,
            "Version": __version__,
            "Pid": os.getpid(),
            "Started": _iso(d.started_at),
            "Uptime": round(time.time() - d.started_at, 1),
            "Stopping": d._stop.is_set(),
            "Repository": {
                "Reachable": d.control.up,
                "LastError": d.control.last_error,
            },
            "NumberOfServers": len(workers),
            "Fleet": len(d.fleet),
            "States": dict(sorted(states.items())),
            "InFlight": states.get("running", 0),
            "MaxInFlight": d.cfg.collector.max_in_flight,
            "Spool": {
                "Directory": str(d.spool.directory),
                "Snapshots": len(d.spool),
                "Bytes": d.spool.bytes,
                "MaxBytes": d.spool.max_bytes,
            },
            "Leases": {
                "Held": len(d.leases.terms),
                "Rounds": d.leases.rounds,
                "Period": d.leases.period,
            },
            "Management": {
                "Connections": d.management.connections if d.management is not None else 0
            },
        }
        if details:
            # WORKERS_STATUS's answer, keyed by srvid as there.
            out["Servers"] = {
                str(srvid): w.status(d.spool.count(srvid)) for srvid, w in sorted(d.workers.items())
            }
        return out

    async def reload(self) -> dict[str, Any]:
        try:
            message, restart = await self.d.reload_details("management")
        except ConfigError as e:
            raise ManagementError(
                ErrorCode.COMMAND_FAILED, f"reload failed, configuration unchanged: {e}"
            ) from None
        return {"Message": message, "Restart": bool(restart), "RestartSettings": restart}

    def shutdown(self) -> None:
        self.d.request_stop(reason="management shutdown")

    def conf_files(self) -> dict[str, Any]:
        d = self.d
        m = d.cfg.management
        return {
            "ConfigurationFile": d.config_path,
            "AdminsFile": m.admins_file or None,
            "EncryptionKeyFile": m.encryption_key_file or None,
            "TlsCertFile": m.tls_cert_file or None,
            "TlsKeyFile": m.tls_key_file or None,
            "TlsCaFile": m.tls_ca_file or None,
            "UnixSocket": str(d.management.socket_file) if d.management is not None else None,
            "SpoolDirectory": str(d.spool.directory),
        }

    def _get(self, key: str) -> Any:
        try:
            return config.setting(self.d.cfg, key)
        except ConfigError as e:
            raise ManagementError(ErrorCode.NOT_FOUND, str(e)) from None

    def conf_get(self, key: str | None) -> dict[str, Any]:
        if key is None:
            values = config.settings(self.d.cfg)
            return {"Settings": {k: _shown(k, v) for k, v in values.items()}}
        return {
            "ConfigKey": key,
            "ConfigValue": _shown(key, self._get(key)),
            "Restart": key in RESTART_SETTINGS,
        }

    async def conf_set(self, key: str, value: str) -> dict[str, Any]:
        d = self.d
        old = self._get(key)
        try:
            new = config.with_setting(d.cfg, key, value)
        except ConfigError as e:
            raise ManagementError(ErrorCode.BAD_ARGUMENTS, str(e)) from None
        requested = config.setting(new, key)
        if key in RESTART_SETTINGS:
            # As pgmoneta: not applied, and said so.
            return {
                "ConfigKey": key,
                "CurrentValue": _shown(key, old),
                "RequestedValue": _shown(key, requested),
                "Restart": True,
            }
        try:
            await d.apply_config(new)
        except ConfigError as e:
            raise ManagementError(ErrorCode.BAD_ARGUMENTS, str(e)) from None
        d.log.info("setting changed", key=key, origin="management")
        return {
            "ConfigKey": key,
            "OldValue": _shown(key, old),
            "NewValue": _shown(key, config.setting(d.cfg, key)),
            "Restart": False,
        }

    async def snapshot(self, server: str) -> dict[str, Any]:
        d = self.d
        found = [
            w for srvid, w in d.workers.items() if w.server.alias == server or str(srvid) == server
        ]
        if not found:
            known = any(s.alias == server or str(s.srvid) == server for s in d.fleet.values())
            raise ManagementError(
                ErrorCode.NOT_FOUND,
                f"server {server[:70]!r} is not collected by collector {d.name}"
                if known
                else f"no server {server[:70]!r} in the fleet (alias or srvid)",
            )
        w = found[0]
        started = w.force()
        return {"Server": w.server.alias, "Srvid": w.server.srvid, "Started": started}

    async def _repository(self, work: Callable[[Any], dict[str, Any]]) -> dict[str, Any]:
        d = self.d

        def run() -> dict[str, Any]:
            with connect_repository(d.dsn) as conn:
                return work(conn)

        try:
            async with asyncio.timeout(max(d.cfg.management.timeout, 30.0)):
                return await asyncio.to_thread(run)
        except TimeoutError:
            raise ManagementError(
                ErrorCode.TIMEOUT, "the repository did not answer in time"
            ) from None
        except (RepositoryError, psycopg.Error) as e:
            raise ManagementError(
                ErrorCode.COMMAND_FAILED, f"repository: {first_line(e)}"
            ) from None

    async def server_ls(self) -> dict[str, Any]:
        def work(conn: Any) -> dict[str, Any]:
            rows = repo_servers.list_servers(conn)
            return {
                "Servers": [
                    {**handlers.server_fields(s), "collected": s.srvid in self.d.workers}
                    for s in rows
                ]
            }

        return await self._repository(work)

    async def server_add(self, alias: str, settings: dict[str, Any]) -> dict[str, Any]:
        try:
            repo_servers.validate({"alias": alias, **settings})
        except ConfigError as e:
            raise ManagementError(ErrorCode.BAD_ARGUMENTS, str(e)) from None

        def work(conn: Any) -> dict[str, Any]:
            try:
                s = repo_servers.add(conn, alias, **settings)
            except ConfigError as e:
                raise ManagementError(ErrorCode.BAD_ARGUMENTS, str(e)) from None
            return {"Server": handlers.server_fields(s)}

        out = await self._repository(work)
        self.d._fleet_wake.set()  # collected from the next fleet round on
        return out

    async def server_rm(self, alias: str, purge: bool) -> dict[str, Any]:
        def work(conn: Any) -> dict[str, Any]:
            try:
                repo_servers.get(conn, alias)
            except ConfigError as e:
                raise ManagementError(ErrorCode.NOT_FOUND, str(e)) from None
            try:
                s = repo_servers.remove(conn, alias, purge=purge)
            except ConfigError as e:
                raise ManagementError(ErrorCode.NOT_ALLOWED, str(e)) from None
            return {"Server": handlers.server_fields(s), "Purged": purge}

        out = await self._repository(work)
        self.d._fleet_wake.set()
        return out

    def clear_prometheus(self) -> dict[str, Any]:
        d = self.d
        cleared = d.stats.reset()
        # The summary line's deltas start again from nothing too.
        d._summary_totals = {}
        d.log.info("statistics cleared", origin="management", series=cleared)
        return {"Cleared": cleared}

    # The backup commands: the BackupService's, its refusals as management errors.

    @contextlib.contextmanager
    def _backups(self) -> Iterator[BackupService]:
        try:
            yield self.d.backups
        except BackupRequestError as e:
            raise ManagementError(ErrorCode[e.reason], str(e)) from None

    async def backup_status(self, server: str | None) -> dict[str, Any]:
        with self._backups() as b:
            return b.status(server)

    async def backup_create(self, server: str, incremental: bool) -> dict[str, Any]:
        with self._backups() as b:
            return b.create(server, incremental=incremental)

    async def backup_ls(self, server: str) -> dict[str, Any]:
        with self._backups() as b:
            return await b.ls(server)

    async def backup_info(self, server: str, backup: str) -> dict[str, Any]:
        with self._backups() as b:
            return await b.info(server, backup)

    async def backup_verify(self, server: str, backup: str) -> dict[str, Any]:
        with self._backups() as b:
            return await b.verify(server, backup)

    async def backup_retain(self, server: str) -> dict[str, Any]:
        with self._backups() as b:
            return await b.retain(server)

    async def backup_delete(self, server: str, backup: str, force: bool) -> dict[str, Any]:
        with self._backups() as b:
            return await b.delete(server, backup, force=force)
