"""The daemon's backup catalogs, copied into the repository for the web UI.

The web UI reads the repository alone and may run on another host than the
collectors, whose backup directories hold the catalogs; so each server's
catalog is copied into ``pgfleet.backups`` (see
:mod:`pgfleet.repository.backups`) whenever :class:`~pgfleet.backup.service.ServerBackups`
reads it again: after every change the daemon makes (a backup begun, taken or
failed, retention, cleanup, a deletion) and at every summary (5 minutes).

What must always hold:

- Backups never wait for the repository, nor fail because of it.  ``put``
  only notes the server's latest list; one task copies the lists, in the
  order the servers changed, on a connection of its own (a
  :class:`~pgfleet.collector.link.RepositoryLink`, "backups"), so a slow or
  absent repository holds neither the snapshots' links nor the backups.
- What the repository missed is copied later: a list it could not take is
  kept (unless a newer one of the same server replaced it) and tried again
  after a backoff (1 s, 2 s... up to a minute) and at every new list, so a
  repository back after an outage has every server's latest list within a
  minute or so.  An outage is logged once, and its end.
- Only the latest list of a server matters: each copy replaces the server's
  rows whole, in one transaction (``pgfleet.backups_mirror``).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass

import psycopg

from pgfleet.backup.catalog import BackupInfo
from pgfleet.collector.link import RepositoryLink, RepositoryUnavailable
from pgfleet.collector.scheduler import Backoff
from pgfleet.connections import first_line
from pgfleet.errors import PgfleetError
from pgfleet.log import EventLogger
from pgfleet.repository import backups as repository_backups

__all__ = ["RETRY_MAX", "Mirror"]

# Seconds between two tries at most while the repository does not take the lists.
RETRY_MAX = 60.0


@dataclass(frozen=True)
class _Pending:
    alias: str
    backups: tuple[BackupInfo, ...]


class Mirror:
    """Each held server's latest catalog list, on its way to the repository."""

    def __init__(self, link: RepositoryLink, log: EventLogger | None = None) -> None:
        self.link = link
        self.log = log or EventLogger("backup")
        # srvid -> its latest list not yet copied, in the order to copy them
        # (a server's newer list replaces its older one, at the end).
        self._pending: dict[int, _Pending] = {}
        self._wake = asyncio.Event()
        self._backoff = Backoff(RETRY_MAX)
        self._retry_at: float | None = None  # monotonic; None: no failure to retry
        self._failing: str | None = None  # the error of the outage under way
        self._closing = False
        self._task: asyncio.Task[None] | None = None

    def put(self, srvid: int, alias: str, backups: Sequence[BackupInfo]) -> None:
        """Copy server ``srvid``'s list ``backups`` (its catalog's, whole) soon."""
        self._pending.pop(srvid, None)
        self._pending[srvid] = _Pending(alias, tuple(backups))
        self._wake.set()

    def start(self) -> None:
        """Start copying (in the daemon's event loop)."""
        self._task = asyncio.create_task(self._run(), name="backup mirror")

    async def _run(self) -> None:
        while True:
            if not self._closing:
                timeout = None
                if self._pending and self._retry_at is not None:
                    timeout = max(0.0, self._retry_at - time.monotonic())
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
            self._wake.clear()
            # Stopping in the middle of a backoff: the repository is not asked again.
            backing_off = self._retry_at is not None and time.monotonic() < self._retry_at
            if not (self._closing and backing_off):
                await self._drain()
            if self._closing:
                return

    async def close(self, until: float) -> None:
        """A last copy of what is pending, by ``until`` (monotonic); then no more."""
        self._closing = True
        self._wake.set()
        task = self._task
        if task is not None and not task.done():
            _, late = await asyncio.wait({task}, timeout=max(0.0, until - time.monotonic()))
            if late:
                task.cancel()
                await asyncio.wait({task}, timeout=5)
        if self._pending:
            self.log.info(
                "backup lists not copied to the repository: the collector stops",
                servers=",".join(p.alias for p in self._pending.values()),
            )

    async def _drain(self) -> None:
        while self._pending:
            srvid = next(iter(self._pending))
            item = self._pending[srvid]
            try:
                async with self.link.use() as conn:
                    held = await repository_backups.mirror_async(conn, srvid, item.backups)
            except psycopg.Error as e:
                if not isinstance(e, psycopg.OperationalError) and _refused(e):
                    # The list itself (an odd backup.json): the same would
                    # fail for ever, and hold every other server's.
                    if self._pending.get(srvid) is item:
                        del self._pending[srvid]
                    self.log.error("backup list refused by the repository", server=item.alias,
                                   error=first_line(e), sqlstate=e.sqlstate)  # fmt: skip
                    continue
                self._failed(item, e)
                return
            except (RepositoryUnavailable, PgfleetError) as e:
                self._failed(item, e)
                return
            # A newer list may have come meanwhile: it stays, to be copied next.
            if self._pending.get(srvid) is item:
                del self._pending[srvid]
            if self._failing is not None:
                self.log.info("backup lists copied to the repository again")
                self._failing = None
            self._retry_at = None
            self._backoff.reset()
            if held is None:
                self.log.debug("backup list not copied: no such server", server=item.alias)
            else:
                self.log.debug("backup list copied", server=item.alias, backups=held)

    def _failed(self, item: _Pending, e: BaseException) -> None:
        error = str(e) if isinstance(e, PgfleetError) else first_line(e)
        delay = max(self._backoff.next(), self.link.retry_in)
        self._retry_at = time.monotonic() + delay
        if self._failing is None:
            self.log.warning(
                "backup lists not copied to the repository: tried again later",
                server=item.alias,
                error=error,
                retry=round(delay, 1),
            )
        else:
            self.log.debug("backup lists still not copied", error=error, retry=round(delay, 1))
        self._failing = error


def _refused(e: psycopg.Error) -> bool:
    """Whether the repository refused the rows themselves (data, constraint: 22, 23)."""
    return (e.sqlstate or "")[:2] in ("22", "23")
