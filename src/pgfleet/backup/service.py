"""The collector daemon's backups: WAL receivers, scheduled base backups, retention.

The daemon owns one :class:`BackupService`.  After every fleet round it says
which servers this collector holds (:meth:`BackupService.reconcile`); each held
server gets a :class:`ServerBackups`, which, when the server's backups are
enabled (``[backup]`` and its ``[[backup.servers]]`` entry, see
``BackupConfig.for_server``), runs:

- a :class:`~pgfleet.backup.wal.WalReceiver` when ``wal_streaming``;
- base backups on its schedule: due at once when the server has no valid
  backup, else at ``schedule.next_after(start of the latest valid one)``; one
  that fails is tried again after 5 minutes, then 10, 20... up to an hour
  (never before it is due);
- retention (``retention.retain``: the backups the policy lets go, then the
  WAL no kept backup needs) after every backup taken here, and every 6 hours;
- ``Catalog.cleanup()`` once, when the server comes to this collector (at the
  start, say), in case a process died mid-backup.

Any held server, enabled or not, may also be backed up on demand
(``pgfleet ctl backup create``), its catalog read, verified and pruned.

What must always hold:

- A server's receiver and backups run only on the collector holding its lease:
  a server that leaves the fleet, or whose lease goes to another collector
  (the round says so), has its receiver stopped and its backup cancelled at
  once.  A collector cut off from the repository keeps them until a round
  tells it otherwise, as it keeps its workers; a second receiver on the same
  slot is refused by the server itself (the slot is active), and one on the
  same host by the catalog's receiver lock.
- Base backups are heavy: at most ``max_concurrent`` run at once in the
  collector (the others wait their turn, in the order they were asked for),
  and never two of one server.  The daemon does not give a server's lease
  away for balance while its backup runs (see ``busy()``).
- A backup that fails or is cancelled (SIGTERM, the lease lost) is INVALID,
  its partial files removed, by the time its job ends: ``BaseBackup.run``
  does it in its thread, and the job waits for the thread.  A process killed
  mid-backup leaves it IN_PROGRESS, which the next cleanup marks INVALID.
  Nothing but ``BaseBackup.run`` marks a backup VALID.
- A server's loop never dies: whatever fails in it is logged, and it carries on.
- Reading the state (``pgfleet ctl``, /metrics) does no I/O: each catalog is
  summarised in a thread after every change made here and every 5 minutes.
- Each summary's list of backups goes to the repository for the web UI (a
  :class:`~pgfleet.backup.mirror.Mirror`, when the daemon gives one): a backup
  begun shows there while it runs.  The repository never holds a backup up.

Reload (SIGHUP, ``pgfleet ctl reload``, ``conf set``): every ``[backup]``
setting applies at once but ``directory``, which needs a restart (receivers
and backups in flight hold files in the old one).  A new compression or
encryption applies to the files written from then on, WAL segments included;
``bin_dir`` to the next start of each program; ``max_rate`` to the next base
backup (one running keeps the rate it started with); a server whose connection
settings changed has its receiver restarted; a server no longer enabled has
its receiver stopped, and its backup, if one runs, finishes.  A key file
that cannot be read fails the reload, and nothing changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine, Mapping, Set
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from pgfleet.backup import retention, schedule
from pgfleet.backup.base import BackupError, BaseBackup
from pgfleet.backup.catalog import BackupInfo, Catalog, NotFound, State
from pgfleet.backup.mirror import Mirror
from pgfleet.backup.store import Codec, Compression, StorageError, load_key, strip_suffix
from pgfleet.backup.verify import VerifyResult, verify
from pgfleet.backup.wal import WalReceiver
from pgfleet.config import Config, ServerBackupSettings
from pgfleet.errors import ConfigError, PgfleetError
from pgfleet.log import EventLogger
from pgfleet.repository.servers import Server

if TYPE_CHECKING:
    from pgfleet.collector.stats import Stats

__all__ = [
    "MAX_CONCURRENT",
    "BackupRequestError",
    "BackupService",
    "ServerBackups",
    "Setup",
    "Summary",
    "backup_json",
    "summarize",
]

# Base backups taken at once by one collector, at most: each reads a whole
# data directory from its server and compresses it on ours.
MAX_CONCURRENT = 2
# Verifications at once, at most (read back, decrypted, decompressed, hashed).
MAX_VERIFIES = 1
# Seconds between two summaries of a server's catalog (sizes, counts, WAL).
SUMMARY_EVERY = 300.0
# Seconds between two retention runs of an enabled server, besides those
# after each backup.
RETENTION_EVERY = 6 * 3600.0
# A scheduled backup that failed is tried again after RETRY_MIN seconds,
# doubling at each failure in a row up to RETRY_MAX.
RETRY_MIN = 300.0
RETRY_MAX = 3600.0
# Finished verifications remembered for ``backup status`` and ``backup info``.
VERIFY_KEEP = 50

_SEGMENT_RE = re.compile(r"[0-9A-F]{24}")

T = TypeVar("T")


class BackupRequestError(PgfleetError):
    """A backup command refused; ``reason`` names the management error code.

    ``NOT_FOUND`` (no such server or backup), ``NOT_ALLOWED`` (refused here:
    the only valid backup, a backup in progress...) or ``BAD_ARGUMENTS``.
    """

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def _iso(t: datetime | None) -> str | None:
    return None if t is None else t.isoformat(timespec="seconds")


def _now() -> datetime:
    return datetime.now(UTC)


def backup_json(b: BackupInfo) -> dict[str, Any]:
    """A backup as ``pgfleet backup ls --json`` shows it (its metadata and duration)."""
    out = b.to_dict()
    out.pop("format", None)
    duration = b.duration
    out["duration_seconds"] = (
        None if duration is None else max(round(duration.total_seconds(), 3), 0.0)
    )
    return out


def next_due(sched: schedule.Schedule, last: datetime) -> datetime:
    """When the backup after one that started at ``last`` is due (an aware time).

    Cron lines are read in the collector's local time, as the schedule says.
    """
    if sched.interval is not None:
        return last + sched.interval
    local = last.astimezone().replace(tzinfo=None)
    return sched.next_after(local).astimezone()


# -- What is configured, checked before it applies


@dataclass(frozen=True)
class Setup:
    """The configuration and what it needs loaded (the key), checked whole."""

    cfg: Config
    # The key file's key: for reading backups (verify) whatever the
    # encryption, and for writing them when encrypting.
    key: bytes | None = None

    def settings(self, alias: str) -> ServerBackupSettings:
        return self.cfg.backup.for_server(alias)

    def codec(self, alias: str) -> Codec:
        """How ``alias``'s new backups and WAL are stored; StorageError if it cannot be."""
        b = self.cfg.backup
        key = self.key if b.encryption != "none" else None
        return Codec(
            Compression(self.settings(alias).compression), b.compression_level or None, key
        )


# -- A server's catalog, summarised


@dataclass(frozen=True)
class Summary:
    """What a server's catalog holds, read in one go (in a thread)."""

    counts: Mapping[State, int]
    raw_bytes: int  # of the valid backups
    stored_bytes: int
    latest: BackupInfo | None  # the newest valid backup
    newest: BackupInfo | None  # the newest backup, whatever its state
    wal_segments: int
    wal_bytes: int
    at: float  # time.monotonic() when the reading began
    backups: tuple[BackupInfo, ...] = ()  # every backup, oldest first


def summarize(catalog: Catalog) -> Summary:
    """Summarise ``catalog``: its backups by state, their sizes, its WAL store."""
    at = time.monotonic()
    backups = catalog.list()
    counts = Counter(b.state for b in backups)
    valid = [b for b in backups if b.state is State.VALID]
    segments = wal_bytes = 0
    try:
        with os.scandir(catalog.wal_dir) as entries:
            for entry in entries:
                if entry.name.startswith(".") or not entry.is_file(follow_symlinks=False):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    wal_bytes += entry.stat(follow_symlinks=False).st_size
                if _SEGMENT_RE.fullmatch(strip_suffix(entry.name)):
                    segments += 1
    except FileNotFoundError:
        pass
    except OSError as e:
        raise StorageError(f"cannot read {catalog.wal_dir}: {e.strerror}") from None
    return Summary(
        counts={s: counts.get(s, 0) for s in State},
        raw_bytes=sum(b.raw_bytes for b in valid),
        stored_bytes=sum(b.stored_bytes for b in valid),
        latest=valid[-1] if valid else None,
        newest=backups[-1] if backups else None,
        wal_segments=segments,
        wal_bytes=wal_bytes,
        at=at,
        backups=tuple(backups),
    )


async def _in_daemon_thread(fn: Callable[[], T], name: str) -> T:
    """``fn()`` in a daemon thread: for read-only work a shutdown may abandon.

    ``asyncio.to_thread``'s threads are waited for when the process exits;
    this one is not (a verification of a large backup must not hold the
    collector's stop for minutes: it wrote nothing).
    """
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(value: T | None, error: BaseException | None) -> None:
        if fut.done():
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(value)  # type: ignore[arg-type]

    def run() -> None:
        try:
            value, error = fn(), None
        except BaseException as e:  # handed over to the awaiting task
            value, error = None, e
        with contextlib.suppress(RuntimeError):  # the loop is gone: nobody waits
            loop.call_soon_threadsafe(settle, value, error)

    threading.Thread(target=run, name=name, daemon=True).start()
    return await fut


# -- Jobs


class Job:
    """One base backup asked for: waiting for a place, then running in a thread."""

    def __init__(self, alias: str, trigger: str, base: BaseBackup) -> None:
        self.alias = alias
        self.trigger = trigger  # "schedule" or "manual"
        self.base = base
        self.state = "queued"  # then "running", then "done"
        self.asked = _now()
        self.started: datetime | None = None
        self.cancelled = False
        self.task: asyncio.Task[None] | None = None

    @property
    def kind(self) -> str:
        return "incremental" if self.base.incremental else "full"

    @property
    def backup_id(self) -> str | None:
        info = self.base.info  # set by the thread once the catalog has it
        return None if info is None else info.id

    def cancel(self) -> None:
        """Stop it: taken off the queue, or pg_basebackup stopped (the backup INVALID)."""
        self.cancelled = True
        self.base.cancel()
        if self.state == "queued" and self.task is not None:
            self.task.cancel()

    def as_json(self) -> dict[str, Any]:
        return {
            "state": self.state,
            "trigger": self.trigger,
            "kind": self.kind,
            "backup": self.backup_id,
            "asked": _iso(self.asked),
            "started": _iso(self.started),
            "seconds": None
            if self.started is None
            else round((_now() - self.started).total_seconds(), 1),
        }


class Verification:
    """One ``backup verify``: its backup read back in a thread, and the verdict."""

    def __init__(self, alias: str, backup_id: str) -> None:
        self.alias = alias
        self.backup_id = backup_id
        # queued, running, then intact, damaged (the first problem is said)
        # or failed (it could not be read: the error is said).
        self.state = "queued"
        self.problem: str | None = None
        self.files_checked = 0
        self.asked = _now()
        self.started: datetime | None = None
        self.finished: datetime | None = None
        self.task: asyncio.Task[None] | None = None

    @property
    def done(self) -> bool:
        return self.state not in ("queued", "running")

    def as_json(self) -> dict[str, Any]:
        return {
            "server": self.alias,
            "backup": self.backup_id,
            "state": self.state,
            "problem": self.problem,
            "files_checked": self.files_checked,
            "asked": _iso(self.asked),
            "started": _iso(self.started),
            "finished": _iso(self.finished),
        }


# -- One held server


class ServerBackups:
    """The backups of one server this collector holds: receiver, schedule, retention."""

    def __init__(self, service: BackupService, server: Server) -> None:
        assert service.setup is not None and service.directory is not None
        self.service = service
        self.server = server
        self.catalog = Catalog(service.directory, server.alias)
        self.log = service.log.bind(server=server.alias)
        self.settings = service.setup.settings(server.alias)
        self.codec = service.setup.codec(server.alias)
        self.receiver: WalReceiver | None = None
        self.job: Job | None = None
        self.summary: Summary | None = None
        # Scheduled backups that failed in a row, and when to try again.
        self.failures = 0
        self.retry_at: datetime | None = None
        self.last_result: dict[str, Any] | None = None
        # The last backup taken here, until a summary read since has seen it.
        self.taken: BackupInfo | None = None
        self._taken_at = 0.0
        self.last_retention: dict[str, Any] | None = None
        self.active = True
        self.task: asyncio.Task[None] | None = None
        self._retained_at = float("-inf")
        self._wake = asyncio.Event()

    @property
    def alias(self) -> str:
        return self.server.alias

    @property
    def enabled(self) -> bool:
        return self.active and self.settings.enabled

    @property
    def streaming_wanted(self) -> bool:
        return self.enabled and self.service.cfg.backup.wal_streaming

    # -- driven by the service

    def start(self) -> None:
        self.task = self.service.spawn(self._run(), f"backups {self.alias}")

    def update(self, server: Server) -> None:
        """New connection settings, or a new configuration: apply them now."""
        setup = self.service.setup
        assert setup is not None
        restart = server != self.server and self.receiver is not None
        self.server = server
        self.settings = setup.settings(self.alias)
        self.codec = setup.codec(self.alias)
        if self.receiver is not None:
            if restart:
                self.log.info("wal receiver restarting: the server's settings changed")
                self._stop_receiver()
            else:
                # Read at each segment stored and each start of pg_receivewal.
                self.receiver.codec = self.codec
                self.receiver.collector = self.service.cfg.collector
                self.receiver.bin_dir = self.service.cfg.backup.bin_dir
        self._sync_receiver()
        self.wake()

    def stop(self, *, cancel: bool) -> None:
        """No more receiver nor schedule; with ``cancel``, the running backup goes too."""
        self.active = False
        if self.task is not None:
            self.task.cancel()
        self._stop_receiver()
        if cancel and self.job is not None:
            self.job.cancel()

    def wake(self) -> None:
        self._wake.set()

    def create(self, *, trigger: str, incremental: bool = False) -> Job:
        """Ask for a base backup now (it waits for a place among those running)."""
        assert self.job is None
        cfg = self.service.cfg
        base = BaseBackup(
            self.catalog,
            self.server,
            cfg.collector,
            self.codec,
            incremental=incremental,
            bin_dir=cfg.backup.bin_dir,
            max_rate=self.settings.max_rate or None,
            label=f"pgfleet {self.alias} {trigger}",
            application_name=f"pgfleet backup {self.service.collector}".strip(),
        )
        job = Job(self.alias, trigger, base)
        self.job = job
        job.task = self.service.spawn(self._run_job(job), f"backup {self.alias}")
        return job

    # -- schedule

    def next_due(self) -> datetime | None:
        """When the next scheduled backup is due; None: none is (disabled, on demand only)."""
        if not self.enabled or not self.settings.schedule or self.summary is None:
            return None
        sched = schedule.parse(self.settings.schedule)
        last = self._last_valid_start()
        due = _now() if last is None else next_due(sched, last)
        if self.retry_at is not None and self.retry_at > due:
            due = self.retry_at
        return due

    def _last_valid_start(self) -> datetime | None:
        """When the newest valid backup started: the catalog's, or the one just taken here."""
        starts = [b.started for b in (self.summary and self.summary.latest, self.taken) if b]
        return max(starts, default=None)

    def interval(self) -> float | None:
        """Seconds the schedule gave the latest valid backup until the next one is due."""
        if not self.enabled or not self.settings.schedule:
            return None
        last = self._last_valid_start()
        if last is None:
            return None
        return (next_due(schedule.parse(self.settings.schedule), last) - last).total_seconds()

    async def _run(self) -> None:
        try:
            await self._startup()
        except asyncio.CancelledError:
            raise
        except Exception:
            self.log.exception("backup scheduler failed at start")
        while True:
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception:
                # A bug: said, and the next tick tries again.
                self.log.exception("backup scheduler failed")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._sleep_for())
            self._wake.clear()

    async def _startup(self) -> None:
        if self.catalog.root.is_dir():
            try:
                done = await asyncio.to_thread(self.catalog.cleanup)
            except (PgfleetError, OSError) as e:
                self.log.error("backup catalog cleanup failed", error=str(e))
            else:
                for line in done:
                    self.log.warning("backup catalog cleaned up", what=line)
        await self.refresh()
        self._sync_receiver()

    async def _tick(self) -> None:
        self._sync_receiver()
        if self.summary is None or time.monotonic() - self.summary.at >= SUMMARY_EVERY:
            await self.refresh()
        if (
            self.enabled
            and self.catalog.root.is_dir()
            and time.monotonic() - self._retained_at >= RETENTION_EVERY
        ):
            with contextlib.suppress(PgfleetError, OSError):
                await self.retain("schedule")
        due = self.next_due()
        if due is not None and due <= _now() and self.job is None and not self.service.closing:
            self.create(trigger="schedule")

    def _sleep_for(self) -> float:
        waits = [SUMMARY_EVERY]
        if self.summary is not None:
            waits.append(self.summary.at + SUMMARY_EVERY - time.monotonic())
        if self.enabled:
            waits.append(self._retained_at + RETENTION_EVERY - time.monotonic())
        due = self.next_due()
        if due is not None and self.job is None:
            waits.append((due - _now()).total_seconds())
        return min(max(min(waits), 1.0), SUMMARY_EVERY)

    async def refresh(self) -> None:
        """Read the catalog's summary again (in a thread)."""
        try:
            summary = await asyncio.to_thread(summarize, self.catalog)
        except (PgfleetError, OSError) as e:
            self.log.warning("backup catalog unreadable", error=str(e))
            return
        self.summary = summary
        if summary.at >= self._taken_at:
            self.taken = None  # the summary has it (or it was deleted since)
        mirror = self.service.mirror
        if mirror is not None:
            mirror.put(self.server.srvid, self.alias, summary.backups)

    # -- receiver

    def _sync_receiver(self) -> None:
        want = self.streaming_wanted and not self.service.closing
        if want and self.receiver is None:
            self._start_receiver()
        elif not want and self.receiver is not None:
            self._stop_receiver()

    def _start_receiver(self) -> None:
        cfg = self.service.cfg
        receiver = WalReceiver(
            self.catalog,
            self.server,
            cfg.collector,
            self.codec,
            bin_dir=cfg.backup.bin_dir,
            application_name=f"pgfleet wal receiver {self.service.collector}".strip(),
            log=self.service.log,
        )
        self.receiver = receiver
        self.service.start_receiver(self.alias, receiver)

    def _stop_receiver(self) -> None:
        if self.receiver is not None:
            self.receiver.stop()
            self.receiver = None

    # -- backups

    async def _run_job(self, job: Job) -> None:
        info: BackupInfo | None = None
        error: str | None = None
        try:
            async with self.service.slots:
                if job.cancelled:
                    raise asyncio.CancelledError
                job.state = "running"
                job.started = _now()
                self.log.info("backup starting", trigger=job.trigger, kind=job.kind)
                thread = asyncio.ensure_future(asyncio.to_thread(self._take, job))
                try:
                    await self._begun(job, thread)
                    info = await asyncio.shield(thread)
                except asyncio.CancelledError:
                    # The thread goes on until pg_basebackup is stopped and the
                    # backup marked INVALID.
                    job.cancel()
                    raise
        except asyncio.CancelledError:
            if job.started is None:
                self.log.info("backup cancelled before it started", trigger=job.trigger)
                self._job_done(job)
                raise
            self._record(job, None, "cancelled at shutdown")
            self._job_done(job)
            raise
        except (PgfleetError, OSError) as e:
            error = str(e)
        except Exception as e:  # a bug: said, and the job ends
            self.log.exception("backup failed", backup=job.backup_id)
            error = f"{type(e).__name__}: {e}"
        self._record(job, info, error)
        try:
            if info is not None and self.active:
                with contextlib.suppress(PgfleetError, OSError):
                    await self.retain("backup")
            await self.refresh()
        finally:
            # Only now: the schedule reads the summary this refresh made.
            self._job_done(job)

    async def _begun(self, job: Job, thread: asyncio.Future[BackupInfo]) -> None:
        """Once the backup is in the catalog (IN_PROGRESS), read it again: the
        summary, /metrics and the repository's copy show it running."""
        while job.base.info is None and not thread.done():
            # asyncio.wait, not wait_for: the thread's future is never cancelled here.
            await asyncio.wait({thread}, timeout=0.2)
        if not thread.done():
            await self.refresh()

    def _take(self, job: Job) -> BackupInfo:
        """In a thread: settle what dead processes left, then the backup."""
        for line in self.catalog.cleanup():
            self.log.warning("backup catalog cleaned up", what=line)
        # Ours are not running (one per server): an IN_PROGRESS backup that
        # cleanup left is another live process's ('pgfleet backup create').
        busy = [b.id for b in self.catalog.list() if b.state is State.IN_PROGRESS]
        if busy:
            raise BackupError(
                f"server {self.alias!r}: backup {busy[-1]} is being taken by another process"
            )
        return job.base.run()

    def _job_done(self, job: Job) -> None:
        job.state = "done"
        if self.job is job:
            self.job = None
        self.wake()

    def _record(self, job: Job, info: BackupInfo | None, error: str | None) -> None:
        if info is not None:
            outcome = "valid"
        elif job.cancelled:
            outcome = "cancelled"
        else:
            outcome = "failed"
        self.service.stats.count(self.alias, "backup", outcome)
        backup_id = info.id if info is not None else job.backup_id
        self.last_result = {
            "backup": backup_id,
            "outcome": outcome,
            "trigger": job.trigger,
            "at": _iso(_now()),
            "error": error,
        }
        if info is not None:
            self.taken, self._taken_at = info, time.monotonic()
            if job.trigger == "schedule":
                self.failures, self.retry_at = 0, None
            self.log.info(
                "backup taken",
                backup=info.id,
                kind=str(info.kind),
                trigger=job.trigger,
                raw_bytes=info.raw_bytes,
                stored_bytes=info.stored_bytes,
                seconds=None if info.duration is None else round(info.duration.total_seconds(), 1),
            )
            return
        if outcome == "cancelled":
            self.log.info("backup cancelled", backup=backup_id, trigger=job.trigger)
            return
        fields: dict[str, Any] = {}
        if job.trigger == "schedule":
            self.failures += 1
            delay = min(RETRY_MAX, RETRY_MIN * 2 ** (self.failures - 1))
            self.retry_at = _now() + timedelta(seconds=delay)
            fields["retry_at"] = _iso(self.retry_at)
        self.log.error("backup failed", backup=backup_id, trigger=job.trigger, error=error,
                       **fields)  # fmt: skip

    # -- retention

    async def retain(self, trigger: str) -> retention.RetentionRun:
        """Apply the server's retention policy now (in a thread); count and say what it did."""
        policy = retention.parse(self.settings.retention)

        def work() -> tuple[list[str], retention.RetentionRun]:
            return self.catalog.cleanup(), retention.retain(self.catalog, policy)

        self._retained_at = time.monotonic()
        stats = self.service.stats
        try:
            cleaned, run = await asyncio.to_thread(work)
        except (PgfleetError, OSError) as e:
            stats.count(self.alias, "retention", "failed")
            self.last_retention = {"at": _iso(_now()), "trigger": trigger, "error": str(e)}
            self.log.error("retention failed", policy=str(policy), error=str(e))
            raise
        for line in cleaned:
            self.log.warning("backup catalog cleaned up", what=line)
        stats.count(self.alias, "retention", "ok")
        stats.count(self.alias, "retention", "deleted", len(run.deleted))
        stats.count(self.alias, "retention", "wal_removed", len(run.wal_removed))
        self.last_retention = {
            "at": _iso(_now()),
            "trigger": trigger,
            "policy": str(policy),
            "kept": len(run.kept),
            "deleted": [b.id for b in run.deleted],
            "wal_removed": len(run.wal_removed),
            "error": None,
        }
        if run.deleted or run.wal_removed:
            self.log.info(
                "retention applied",
                policy=str(policy),
                kept=len(run.kept),
                deleted=",".join(b.id for b in run.deleted) or None,
                wal_removed=len(run.wal_removed),
            )
        if run.deleted or run.wal_removed or cleaned:
            await self.refresh()
        return run

    # -- what it says

    def status(self) -> dict[str, Any]:
        s = self.summary
        latest = s.latest if s is not None else None
        due = self.next_due()
        return {
            "server": self.alias,
            "srvid": self.server.srvid,
            "enabled": self.enabled,
            "schedule": self.settings.schedule or None,
            "retention": self.settings.retention,
            "compression": str(self.codec.compression),
            "encrypted": self.codec.encrypted,
            "wal_streaming": self.streaming_wanted,
            "backups": None if s is None else {str(k): v for k, v in s.counts.items()},
            "raw_bytes": None if s is None else s.raw_bytes,
            "stored_bytes": None if s is None else s.stored_bytes,
            "latest": None
            if latest is None
            else {
                "id": latest.id,
                "kind": str(latest.kind),
                "finished": _iso(latest.finished),
                "raw_bytes": latest.raw_bytes,
                "stored_bytes": latest.stored_bytes,
            },
            "next_backup": _iso(due),
            "job": None if self.job is None else self.job.as_json(),
            "last_result": self.last_result,
            "last_retention": self.last_retention,
            "wal": None if s is None else {"segments": s.wal_segments, "stored_bytes": s.wal_bytes},
            "receiver": None if self.receiver is None else self.receiver.status().as_json(),
        }

    @property
    def exported(self) -> bool:
        """Whether /metrics shows this server: backed up here, or with a valid backup.

        (A server whose backups are not enabled has no alert for having none.)
        """
        return (
            self.enabled
            or self.job is not None
            or (self.summary is not None and self.summary.latest is not None)
        )


# -- The service


class BackupService:
    """Every held server's backups, in the daemon's event loop."""

    def __init__(
        self,
        cfg: Config,
        stats: Stats,
        *,
        collector: str = "",
        max_concurrent: int = MAX_CONCURRENT,
        log: EventLogger | None = None,
        mirror: Mirror | None = None,
    ) -> None:
        self.cfg = cfg
        self.stats = stats
        self.collector = collector
        self.max_concurrent = max_concurrent
        self.log = log or EventLogger("backup")
        # Read once: moving every catalog under running receivers and
        # backups is not something a reload does.
        self.directory = Path(cfg.backup.directory).expanduser() if cfg.backup.directory else None
        # Where the catalogs are copied for the web UI (None: nowhere).
        self.mirror = mirror if self.directory is not None else None
        self.setup: Setup | None = None
        self.closing = False
        self.servers: dict[int, ServerBackups] = {}
        self.fleet: dict[int, Server] = {}
        self.verifications: deque[Verification] = deque()
        self._tasks: set[asyncio.Task[Any]] = set()
        # The last receiver task of each alias: a new receiver of the server
        # waits for the previous one to end (it holds the receiver lock).
        self._receivers: dict[str, asyncio.Task[None]] = {}
        self.slots = asyncio.Semaphore(max_concurrent)
        self._verify_slots = asyncio.Semaphore(MAX_VERIFIES)

    # -- life cycle, from the daemon

    def prepare(self, cfg: Config) -> Setup:
        """``cfg`` checked and its key loaded; ConfigError, and nothing changes, if it cannot be."""
        setup = Setup(cfg)
        b = cfg.backup
        if self.directory is None:
            return setup
        origin = cfg.source
        if b.encryption_key_file:
            try:
                setup = Setup(cfg, load_key(b.encryption_key_file))
            except StorageError as e:
                raise ConfigError(
                    f"invalid configuration {origin!r}: backup.encryption_key_file: {e}"
                ) from None
        for alias in ("", *(s.alias for s in b.servers)):
            try:
                setup.codec(alias)
            except StorageError as e:
                where = f" (server {alias!r})" if alias else ""
                raise ConfigError(
                    f"invalid configuration {origin!r}: backup.compression_level: {e}{where}"
                ) from None
        return setup

    def start(self) -> None:
        """Load the configuration's key (ConfigError if it cannot be); servers come with rounds."""
        self.setup = self.prepare(self.cfg)
        if self.mirror is not None:
            self.mirror.start()
        if self.directory is not None:
            self.log.info(
                "backups configured",
                directory=str(self.directory),
                enabled=self.cfg.backup.enabled,
                listed=len(self.cfg.backup.servers),
                max_concurrent=self.max_concurrent,
            )

    def configure(self, setup: Setup) -> None:
        """Apply a reloaded configuration (``prepare``d) to every held server now."""
        self.cfg = setup.cfg
        self.setup = setup
        for srv in self.servers.values():
            srv.update(srv.server)

    def reconcile(self, fleet: Mapping[int, Server], held: Set[int]) -> None:
        """The fleet and the servers this collector holds now: start and stop what follows."""
        self.fleet = dict(fleet)
        if self.setup is None or self.directory is None or self.closing:
            return
        for srvid in list(self.servers):
            srv = self.servers[srvid]
            server = fleet.get(srvid)
            if server is None or srvid not in held or server.alias != srv.alias:
                why = "left the fleet" if server is None else "now held by another collector"
                if server is not None and server.alias != srv.alias:
                    why = f"renamed {server.alias!r}"
                if srv.job is not None and srv.job.state == "running":
                    self.log.warning("backup cancelled: server " + why, server=srv.alias,
                                     backup=srv.job.backup_id)  # fmt: skip
                srv.stop(cancel=True)
                del self.servers[srvid]
        for srvid in sorted(held):
            server = fleet.get(srvid)
            if server is None:
                continue
            have = self.servers.get(srvid)
            if have is None:
                try:
                    have = ServerBackups(self, server)
                except StorageError as e:  # an alias that cannot name a directory
                    self.log.error("server not backed up", server=server.alias, error=str(e))
                    continue
                self.servers[srvid] = have
                have.start()
            elif server != have.server:
                have.update(server)

    def busy(self, srvid: int) -> bool:
        """Whether a backup of ``srvid`` is asked for or running here."""
        srv = self.servers.get(srvid)
        return srv is not None and srv.job is not None

    async def close(self, until: float) -> None:
        """Stop: receivers stopped, backups cancelled (INVALID), by ``until`` (monotonic)."""
        self.closing = True
        running = [s.job for s in self.servers.values() if s.job and s.job.state == "running"]
        for srv in self.servers.values():
            srv.stop(cancel=True)
        if running:
            self.log.info(
                "backups cancelled: the collector stops",
                backups=",".join(f"{j.alias}:{j.backup_id or '-'}" for j in running),
            )
        for v in self.verifications:
            if v.task is not None and not v.done:
                v.task.cancel()  # read-only: its thread is left to die with the process
        pending = {t for t in self._tasks if not t.done()}
        if pending:
            _, pending = await asyncio.wait(pending, timeout=max(0.0, until - time.monotonic()))
        if pending:
            for t in pending:
                t.cancel()
            self.log.warning(
                "backup tasks still running at the shutdown deadline",
                tasks=",".join(sorted(t.get_name() for t in pending)),
            )
        if self.mirror is not None:
            # The backups cancelled are INVALID now: the repository's copy says so too.
            for job in running:
                held = next((s for s in self.servers.values() if s.alias == job.alias), None)
                if held is None:
                    continue
                with contextlib.suppress(TimeoutError, PgfleetError, OSError):
                    async with asyncio.timeout(max(0.0, until - time.monotonic())):
                        listed = await asyncio.to_thread(held.catalog.list)
                    self.mirror.put(held.server.srvid, held.alias, listed)
            await self.mirror.close(until)

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def start_receiver(self, alias: str, receiver: WalReceiver) -> None:
        previous = self._receivers.get(alias)

        async def run() -> None:
            if previous is not None and not previous.done():
                await asyncio.wait([previous])
            await receiver.run()  # at once over if it was stopped meanwhile

        task = self.spawn(run(), f"wal receiver {alias}")
        self._receivers[alias] = task
        task.add_done_callback(
            lambda t: self._receivers.pop(alias, None) if self._receivers.get(alias) is t else None
        )

    # -- commands (pgfleet ctl)

    def _require_directory(self) -> Path:
        if self.directory is None or self.setup is None:
            raise BackupRequestError(
                "NOT_ALLOWED", f"collector {self.collector} has no backup directory: set [backup] "
                "directory (and restart)"
            )  # fmt: skip
        return self.directory

    def _held(self, name: str) -> ServerBackups:
        self._require_directory()
        for srvid, srv in self.servers.items():
            if srv.alias == name or str(srvid) == name:
                return srv
        known = any(s.alias == name or str(s.srvid) == name for s in self.fleet.values())
        raise BackupRequestError(
            "NOT_FOUND",
            f"server {name[:70]!r} is not backed up by collector {self.collector}: another "
            "collector holds it"
            if known
            else f"no server {name[:70]!r} in the fleet (alias or srvid)",
        )

    def _catalog(self, name: str) -> Catalog:
        """A server's catalog to read: held here, or with backups in the directory."""
        directory = self._require_directory()
        with contextlib.suppress(BackupRequestError):
            return self._held(name).catalog
        alias = next(
            (s.alias for s in self.fleet.values() if s.alias == name or str(s.srvid) == name),
            name,
        )
        try:
            catalog = Catalog(directory, alias)
        except StorageError as e:
            raise BackupRequestError("BAD_ARGUMENTS", str(e)) from None
        if not catalog.root.is_dir():
            raise BackupRequestError(
                "NOT_FOUND", f"no backups of server {name[:70]!r} in {directory}"
            )
        return catalog

    @staticmethod
    async def _get(catalog: Catalog, backup_id: str) -> BackupInfo:
        try:
            return await asyncio.to_thread(catalog.get, backup_id)
        except NotFound as e:
            raise BackupRequestError("NOT_FOUND", str(e)) from None

    def status(self, name: str | None = None) -> dict[str, Any]:
        servers = list(self.servers.values())
        if name is not None:
            servers = [self._held(name)]
        jobs = [s.job for s in self.servers.values() if s.job is not None]
        return {
            "Collector": self.collector,
            "Directory": None if self.directory is None else str(self.directory),
            "MaxConcurrent": self.max_concurrent,
            "Running": sum(1 for j in jobs if j.state == "running"),
            "Queued": sum(1 for j in jobs if j.state == "queued"),
            "Servers": [s.status() for s in sorted(servers, key=lambda s: s.alias)],
            "Verifications": [
                v.as_json()
                for v in self.verifications
                if name is None or v.alias == servers[0].alias
            ],
        }

    def create(self, name: str, *, incremental: bool = False) -> dict[str, Any]:
        srv = self._held(name)
        if self.closing:
            raise BackupRequestError("NOT_ALLOWED", "the collector is stopping")
        started = srv.job is None
        job = srv.create(trigger="manual", incremental=incremental) if started else srv.job
        assert job is not None
        return {"Server": srv.alias, "Started": started, "Job": job.as_json()}

    async def ls(self, name: str) -> dict[str, Any]:
        catalog = self._catalog(name)
        backups = await asyncio.to_thread(catalog.list)
        return {"Server": catalog.server, "Backups": [backup_json(b) for b in backups]}

    async def info(self, name: str, backup_id: str) -> dict[str, Any]:
        catalog = self._catalog(name)
        b = await self._get(catalog, backup_id)
        return {
            "Server": catalog.server,
            "Backup": backup_json(b),
            "Verify": self._verification(catalog.server, b.id),
        }

    def _verification(self, alias: str, backup_id: str) -> dict[str, Any] | None:
        for v in reversed(self.verifications):
            if v.alias == alias and v.backup_id == backup_id:
                return v.as_json()
        return None

    async def verify(self, name: str, backup_id: str) -> dict[str, Any]:
        catalog = self._catalog(name)
        b = await self._get(catalog, backup_id)
        if b.state is not State.VALID:
            raise BackupRequestError(
                "NOT_ALLOWED",
                f"backup {b.id} of server {catalog.server!r} is {b.state}: only valid backups "
                "are verified",
            )
        assert self.setup is not None
        key = self.setup.key
        if b.encrypted and key is None:
            raise PgfleetError(
                f"backup {b.id} of server {catalog.server!r} is encrypted and collector "
                f"{self.collector} has no key ([backup] encryption_key_file)"
            )
        for v in self.verifications:
            if v.alias == catalog.server and v.backup_id == b.id and not v.done:
                return {"Server": catalog.server, "Backup": b.id, "Started": False,
                        "Verify": v.as_json()}  # fmt: skip
        v = Verification(catalog.server, b.id)
        self.verifications.append(v)
        while len(self.verifications) > VERIFY_KEEP:
            old = next((x for x in self.verifications if x.done), None)
            if old is None:
                break
            self.verifications.remove(old)
        v.task = self.spawn(self._verify(catalog, v, key), f"verify {catalog.server} {b.id}")
        return {"Server": catalog.server, "Backup": b.id, "Started": True, "Verify": v.as_json()}

    async def _verify(self, catalog: Catalog, v: Verification, key: bytes | None) -> None:
        log = self.log.bind(server=v.alias, backup=v.backup_id)
        try:
            async with self._verify_slots:
                v.state = "running"
                v.started = _now()
                result: VerifyResult = await _in_daemon_thread(
                    lambda: verify(catalog, v.backup_id, key), f"verify {v.alias}"
                )
            v.files_checked = result.files_checked
            if result.ok:
                v.state = "intact"
                log.info("backup verified: intact", files=result.files_checked)
            else:
                v.state, v.problem = "damaged", result.problems[0]
                log.error("backup verified: damaged", problem=v.problem)
        except asyncio.CancelledError:
            v.state, v.problem = "failed", "cancelled: the collector stops"
            raise
        except (PgfleetError, OSError) as e:
            v.state, v.problem = "failed", str(e)
            log.error("backup verification failed", error=str(e))
        except Exception as e:  # a bug
            v.state, v.problem = "failed", f"{type(e).__name__}: {e}"
            log.exception("backup verification failed")
        finally:
            v.finished = _now()
            if v.state in ("intact", "damaged", "failed"):
                self.stats.count(v.alias, "verify", v.state)

    async def retain(self, name: str) -> dict[str, Any]:
        srv = self._held(name)
        try:
            run = await srv.retain("manual")
        except (PgfleetError, OSError) as e:
            raise PgfleetError(f"retention of server {srv.alias!r} failed: {e}") from None
        return {
            "Server": srv.alias,
            "Retention": (srv.last_retention or {}).get("policy"),
            "Kept": [b.id for b in run.kept],
            "Deleted": [b.id for b in run.deleted],
            "WalRemoved": len(run.wal_removed),
        }

    async def delete(self, name: str, backup_id: str, *, force: bool = False) -> dict[str, Any]:
        srv = self._held(name)
        catalog = srv.catalog
        b = await self._get(catalog, backup_id)

        def work() -> None:
            with catalog.lock():
                valid = [x for x in catalog.list() if x.state is State.VALID]
                if not force and b.state is State.VALID and [x.id for x in valid] == [b.id]:
                    raise BackupRequestError(
                        "NOT_ALLOWED",
                        f"backup {b.id} is the only valid backup of server {srv.alias!r}: "
                        "Force to delete it all the same",
                    )
                try:
                    catalog.delete(b.id, force=force)
                except NotFound as e:
                    raise BackupRequestError("NOT_FOUND", str(e)) from None
                except StorageError as e:
                    # In progress, or the parent of incremental backups.
                    raise BackupRequestError("NOT_ALLOWED", str(e)) from None

        if srv.job is not None and srv.job.backup_id == b.id:
            raise BackupRequestError(
                "NOT_ALLOWED", f"backup {b.id} of server {srv.alias!r} is being taken"
            )
        await asyncio.to_thread(work)
        self.log.info("backup deleted", server=srv.alias, backup=b.id, state=str(b.state),
                      forced=force)  # fmt: skip
        await srv.refresh()
        return {"Server": srv.alias, "Backup": b.id, "Deleted": True}

    # -- what /metrics reads

    def exported(self) -> list[ServerBackups]:
        return [s for s in self.servers.values() if s.exported]
