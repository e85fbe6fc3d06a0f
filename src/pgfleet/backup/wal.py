"""WAL streaming: one ``pg_receivewal`` per server, kept running, its segments stored.

A :class:`WalReceiver` supervises, on the asyncio loop, one server's
``pg_receivewal``:

    pg_receivewal -d CONNINFO -D <server>/wal/incoming --slot=pgfleet_<alias> \\
        --no-loop -v --status-interval=N

through a physical replication slot it creates first (``--create-slot
--if-not-exists``; the slot is the server's promise to keep WAL until it is
received, so none is lost while the receiver is down -- and WAL piles up on
the server while it is: see ``max_slot_wal_keep_size``).  The programs are the
lowest PostgreSQL at or above the server's major version (:mod:`tools`).

Segments: pg_receivewal writes the segment it is receiving as
``<segment>.partial`` and renames it ``<segment>`` once complete (fsynced).
Completed segments and timeline history files are copied into the WAL store
(``<server>/wal/<segment><suffix>``, compressed and encrypted as configured,
through store.copy_in: temporary name, fsync, rename, fsync of the
directory), and only then removed from incoming.  The ``.partial`` stays
where it is until pg_receivewal completes it (``wal-get`` serves it to a
restore, up to where it got); so does the newest complete segment, as a copy,
so that a restarted pg_receivewal finds where to resume on any server version
(it looks at its directory first, and at the slot only from PostgreSQL 15
on).  A ``.partial`` of an old timeline is left there for good.

The supervisor restarts pg_receivewal when it exits (the server restarted,
the network dropped, a promotion...), after a pause that doubles at each
failure from ``backoff_min`` to ``backoff_max``, with jitter, and starts
again from ``backoff_min`` once a run lasted ``stable_after`` seconds.  It
never raises: errors are its state (``status()``), logged.  One receiver per
server: the catalog's ``receiver`` lock (an flock) keeps a second one, in
this process or another, from starting.

Lag: every ``lag_interval`` seconds a short connection asks the server how
far its WAL is ahead of what the receiver wrote (``pg_stat_replication``'s
``write_lsn`` for the receiver's walsender, the slot's ``restart_lsn``
otherwise).  Synchronous replication (``--synchronous``) is not used.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import enum
import hashlib
import os
import random
import re
import signal
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg

from pgfleet.backup.catalog import Catalog
from pgfleet.backup.store import Codec, StorageError, copy_in, fsync_dir
from pgfleet.backup.tools import Program, ToolError, find_program, replication_target, worst_line
from pgfleet.config import CollectorConfig
from pgfleet.connections import first_line, server_conninfo
from pgfleet.errors import PgfleetError
from pgfleet.log import EventLogger
from pgfleet.repository.servers import Server

__all__ = [
    "LAG_SQL",
    "ReceiverState",
    "ReceiverStatus",
    "WalReceiver",
    "archive_completed",
    "slot_name",
]

_SEGMENT_RE = re.compile(r"[0-9A-F]{24}")
_HISTORY_RE = re.compile(r"[0-9A-F]{8}\.history")
_SLOT_RE = re.compile(r"[a-z0-9_]+")
_STARTING_RE = re.compile(r"starting log streaming at ([0-9A-F]+/[0-9A-F]+) \(timeline (\d+)\)")
_FINISHED_RE = re.compile(r"finished segment at ([0-9A-F]+/[0-9A-F]+) \(timeline (\d+)\)")
# PostgreSQL's NAMEDATALEN - 1.
_MAX_SLOT = 63

LAG_SQL = """\
SELECT pg_wal_lsn_diff(
         CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn()
              ELSE pg_current_wal_lsn() END,
         coalesce(r.write_lsn, s.restart_lsn))::bigint,
       coalesce(r.write_lsn, s.restart_lsn)::text,
       s.active
FROM pg_replication_slots s
LEFT JOIN pg_stat_replication r ON r.pid = s.active_pid
WHERE s.slot_name = %s
"""


def slot_name(alias: str) -> str:
    """The replication slot of a server: ``pgfleet_`` and its alias, made a valid slot name.

    A slot name is lower-case letters, digits and underscores: an alias that
    is not (``db1.example``) gets the others replaced and a hash of itself
    appended, so that two aliases never share a slot.
    """
    plain = re.sub(r"[^a-z0-9_]", "_", alias.lower())
    name = f"pgfleet_{plain}"
    if plain != alias or len(name) > _MAX_SLOT:
        digest = hashlib.sha256(alias.encode()).hexdigest()[:8]
        name = f"{name[: _MAX_SLOT - 9]}_{digest}"
    assert _SLOT_RE.fullmatch(name) and len(name) <= _MAX_SLOT
    return name


def archive_completed(catalog: Catalog, codec: Codec, *, keep_newest: bool = True) -> list[str]:
    """Store the completed segments and history files of ``incoming``; remove them there.

    Each is stored (if not already) and fsynced before its original goes.
    The newest complete segment is stored but left in place when
    ``keep_newest`` (pg_receivewal resumes after it).  Return the names stored.
    """
    try:
        names = sorted(os.listdir(catalog.incoming_dir))
    except FileNotFoundError:
        return []
    except OSError as e:
        raise StorageError(f"cannot read {catalog.incoming_dir}: {e.strerror}") from None
    done = [n for n in names if _SEGMENT_RE.fullmatch(n) or _HISTORY_RE.fullmatch(n)]
    segments = [n for n in done if _SEGMENT_RE.fullmatch(n)]
    newest = segments[-1] if segments and keep_newest else None
    stored: list[str] = []
    removed = False
    for name in done:
        src = catalog.incoming_dir / name
        if catalog.wal_file(name) is None:
            try:
                with open(src, "rb") as f:
                    copy_in(f, catalog.wal_dir / f"{name}{codec.suffix}", codec)
            except FileNotFoundError:
                continue
            except OSError as e:
                raise StorageError(f"cannot read {src}: {e.strerror}") from None
            stored.append(name)
        if name == newest:
            continue
        try:
            src.unlink()
            removed = True
        except FileNotFoundError:
            pass
        except OSError as e:
            raise StorageError(f"cannot remove {src}: {e.strerror}") from None
    if removed:
        fsync_dir(catalog.incoming_dir)
    return stored


class ReceiverState(enum.IntEnum):
    """A receiver's state; the numbers are exported and never change meaning."""

    STOPPED = 0
    STARTING = 1  # connecting, checking, creating the slot, pg_receivewal starting
    STREAMING = 2
    WAITING = 3  # after a failure, until the next attempt


@dataclass(frozen=True)
class ReceiverStatus:
    """What a receiver is doing, for ``pgfleet ctl``, /metrics and the UI."""

    server: str
    slot: str
    state: ReceiverState
    pid: int | None
    program: str | None
    restarts: int  # runs of pg_receivewal after the first
    failures: int  # in a row, now
    last_segment: str | None  # the last segment stored
    last_segment_at: datetime | None
    segments_stored: int
    received_lsn: str | None  # what the server says the receiver wrote
    lag_bytes: int | None  # the server's WAL ahead of it
    lag_at: datetime | None
    last_error: str | None
    last_error_at: datetime | None
    next_attempt_at: datetime | None  # when WAITING

    def as_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["state"] = self.state.name.lower()
        for k, v in out.items():
            if isinstance(v, datetime):
                out[k] = v.isoformat()
        return out


class WalReceiver:
    """Keep one server's WAL streaming into its catalog until ``stop()``."""

    def __init__(
        self,
        catalog: Catalog,
        server: Server,
        collector: CollectorConfig,
        codec: Codec,
        *,
        bin_dir: str = "",
        slot: str | None = None,
        backoff_min: float = 1.0,
        backoff_max: float = 60.0,
        stable_after: float = 60.0,
        poll_interval: float = 1.0,
        lag_interval: float = 10.0,
        status_interval: int = 5,
        application_name: str = "pgfleet wal receiver",
        log: EventLogger | None = None,
    ) -> None:
        self.catalog = catalog
        self.server = server
        self.collector = collector
        self.codec = codec
        self.bin_dir = bin_dir
        self.slot = slot or slot_name(server.alias)
        self.backoff_min = backoff_min
        self.backoff_max = backoff_max
        self.stable_after = stable_after
        self.poll_interval = poll_interval
        self.lag_interval = lag_interval
        self.status_interval = status_interval
        self.application_name = application_name
        self.log = (log or EventLogger("backup.wal")).bind(server=server.alias)
        self._stop = asyncio.Event()
        self._state = ReceiverState.STOPPED
        self._proc: asyncio.subprocess.Process | None = None
        self._program: Program | None = None
        self._runs = 0
        self._failures = 0
        self._last_segment: str | None = None
        self._last_segment_at: datetime | None = None
        self._segments_stored = 0
        self._received_lsn: str | None = None
        self._lag: int | None = None
        self._lag_at: datetime | None = None
        self._last_error: str | None = None
        self._last_error_at: datetime | None = None
        self._next_attempt: datetime | None = None
        self._archiving = asyncio.Lock()

    # -- what the daemon calls

    def status(self) -> ReceiverStatus:
        proc = self._proc
        return ReceiverStatus(
            server=self.server.alias,
            slot=self.slot,
            state=self._state,
            pid=proc.pid if proc is not None and proc.returncode is None else None,
            program=str(self._program) if self._program else None,
            restarts=max(self._runs - 1, 0),
            failures=self._failures,
            last_segment=self._last_segment,
            last_segment_at=self._last_segment_at,
            segments_stored=self._segments_stored,
            received_lsn=self._received_lsn,
            lag_bytes=self._lag,
            lag_at=self._lag_at,
            last_error=self._last_error,
            last_error_at=self._last_error_at,
            next_attempt_at=self._next_attempt if self._state is ReceiverState.WAITING else None,
        )

    def stop(self) -> None:
        """Ask ``run()`` to end: pg_receivewal is stopped, what it completed stored."""
        self._stop.set()

    async def run(self) -> None:
        """Stream until ``stop()``; restart pg_receivewal with backoff whenever it ends."""
        self.log.info("wal receiver starting", slot=self.slot)
        try:
            while not self._stop.is_set():
                self._state = ReceiverState.STARTING
                began = time.monotonic()
                try:
                    with self.catalog.exclusive("receiver"):
                        await self._run_once()
                    error = "pg_receivewal ended"
                except PgfleetError as e:
                    error = str(e)
                except (OSError, psycopg.Error) as e:
                    error = first_line(e)
                except Exception as e:  # a bug: logged, and we carry on
                    self.log.exception("wal receiver failed", error=str(e))
                    error = f"{type(e).__name__}: {e}"
                await self._archive()
                if self._stop.is_set():
                    break
                if time.monotonic() - began >= self.stable_after:
                    self._failures = 0
                self._failures += 1
                self._fail(error)
                delay = self._backoff()
                self._state = ReceiverState.WAITING
                self._next_attempt = datetime.now(UTC) + timedelta(seconds=delay)
                self.log.warning(
                    "wal receiver stopped, restarting", error=error, retry_in=round(delay, 1)
                )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), delay)
        finally:
            self._state = ReceiverState.STOPPED
            self.log.info("wal receiver stopped")

    async def measure_lag(self) -> int | None:
        """Ask the server how many bytes of WAL the receiver has yet to write (and remember)."""
        conn = await psycopg.AsyncConnection.connect(
            server_conninfo(self.server, self.collector), autocommit=True
        )
        async with conn:
            cur = await conn.execute(LAG_SQL, (self.slot,))
            row = await cur.fetchone()
        if row is None:
            return None
        self._lag, self._received_lsn = row[0], row[1]
        self._lag_at = datetime.now(UTC)
        return self._lag

    # -- one run of pg_receivewal

    async def _run_once(self) -> None:
        major = await self._check_server()
        target = replication_target(
            self.server, self.collector, application_name=self.application_name
        )
        program = find_program("pg_receivewal", major, bin_dir=self.bin_dir)
        self._program = program
        self.catalog.create()
        base = [*target.args(), "-D", str(self.catalog.incoming_dir), f"--slot={self.slot}"]
        await self._create_slot(program, base, target.env)
        self._runs += 1
        proc = await asyncio.create_subprocess_exec(
            str(program.path),
            *base,
            "--no-loop",
            "-v",
            f"--status-interval={self.status_interval}",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=target.env,
        )
        self._proc = proc
        errors: list[str] = []
        tasks = [
            asyncio.create_task(self._read_stderr(proc, errors)),
            asyncio.create_task(self._poll()),
        ]
        stop = asyncio.create_task(self._stop.wait())
        ended = asyncio.create_task(proc.wait())
        try:
            await asyncio.wait({ended, stop}, return_when=asyncio.FIRST_COMPLETED)
            if not ended.done():
                await self._terminate(proc)
            await ended
            # Its last words (why it exited) are still in the pipe.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(tasks[0]), 5)
        finally:
            for t in (*tasks, stop, ended):
                t.cancel()
            await asyncio.gather(*tasks, stop, ended, return_exceptions=True)
            if proc.returncode is None:
                await self._terminate(proc)
            self._proc = None
        if not self._stop.is_set():
            why = worst_line("\n".join(errors)) if errors else f"exit code {proc.returncode}"
            raise ToolError(f"pg_receivewal exited: {why}")

    async def _check_server(self) -> int:
        try:
            conn = await psycopg.AsyncConnection.connect(
                server_conninfo(self.server, self.collector), autocommit=True
            )
        except psycopg.OperationalError as e:
            raise ToolError(f"cannot connect: {first_line(e)}") from None
        async with conn:
            cur = await conn.execute(
                "SELECT current_setting('server_version_num')::int, current_setting('wal_level'),"
                " (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user)"
            )
            row = await cur.fetchone()
        assert row is not None
        version, wal_level, can_replicate = row
        if wal_level == "minimal":
            raise ToolError("wal_level is minimal: WAL streaming needs replica or logical")
        if not can_replicate:
            raise ToolError(
                f"role {self.server.username or '(default)'!r} may not replicate: "
                "ALTER ROLE ... REPLICATION, and a 'replication' line in pg_hba.conf"
            )
        return int(version) // 10000

    async def _create_slot(self, program: Program, base: list[str], env: dict[str, str]) -> None:
        proc = await asyncio.create_subprocess_exec(
            str(program.path),
            *base,
            "--create-slot",
            "--if-not-exists",
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=env,
        )
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), 60)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise ToolError("pg_receivewal --create-slot did not finish in 60 s") from None
        if proc.returncode != 0:
            why = worst_line(out.decode(errors="replace"))
            raise ToolError(f"cannot create replication slot {self.slot!r}: {why}")

    async def _terminate(self, proc: asyncio.subprocess.Process) -> None:
        # pg_receivewal ends cleanly on SIGINT (flushing what it received).
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()

    async def _read_stderr(self, proc: asyncio.subprocess.Process, errors: list[str]) -> None:
        assert proc.stderr is not None
        while line := await proc.stderr.readline():
            text = line.decode(errors="replace").strip()
            if not text:
                continue
            if m := _STARTING_RE.search(text):
                self._state = ReceiverState.STREAMING
                self.log.info("wal streaming", start=m[1], timeline=int(m[2]))
            elif _FINISHED_RE.search(text):
                await self._archive()
            else:
                errors.append(text)
                del errors[:-20]
                self.log.debug("pg_receivewal", line=text)

    async def _poll(self) -> None:
        next_lag = time.monotonic()
        while True:
            await self._archive()
            if self.lag_interval > 0 and time.monotonic() >= next_lag:
                next_lag = time.monotonic() + self.lag_interval
                try:
                    await self.measure_lag()
                except (psycopg.Error, PgfleetError, OSError) as e:
                    self.log.debug("wal lag unknown", error=first_line(e))
            await asyncio.sleep(self.poll_interval)

    async def _archive(self) -> None:
        """Store what pg_receivewal completed (in a thread: it compresses and fsyncs)."""
        async with self._archiving:
            try:
                stored = await asyncio.to_thread(archive_completed, self.catalog, self.codec)
            except (PgfleetError, OSError) as e:
                self._fail(f"cannot store WAL: {e}")
                self.log.error("cannot store wal", error=str(e))
                return
        if stored:
            segments = [n for n in stored if _SEGMENT_RE.fullmatch(n)]
            self._segments_stored += len(segments)
            if segments:
                self._last_segment = segments[-1]
                self._last_segment_at = datetime.now(UTC)
            self.log.debug("wal stored", files=len(stored), last=stored[-1])

    def _fail(self, error: str) -> None:
        self._last_error = error
        self._last_error_at = datetime.now(UTC)

    def _backoff(self) -> float:
        delay = min(self.backoff_max, self.backoff_min * 2.0 ** (self._failures - 1))
        # Jitter: between half and all of it, so that a fleet does not come back in step.
        return delay * (0.5 + random.random() / 2)
