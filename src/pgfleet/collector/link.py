"""A repository connection for one task of the daemon, rebuilt when lost.

The daemon holds a few of these (one writes snapshots, one runs leases,
discovery and commands, one listens): each is used by one operation at a
time (an asyncio lock), connects on demand, and after losing the repository
waits out an exponential backoff before trying again, so a repository outage
costs one failed attempt per backoff step, not one per caller.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, suppress
from typing import Any

import psycopg
from psycopg import errors as pgerrors

from pgfleet.collector.scheduler import Backoff
from pgfleet.connections import connect_repository_async, first_line
from pgfleet.errors import RepositoryError
from pgfleet.log import EventLogger

log = EventLogger("link")


class RepositoryUnavailable(RepositoryError):
    """The repository cannot be reached now; try again later."""


# Errors after which the connection cannot be trusted (or is gone): the
# server shut down or crashed, or the link itself failed.
_LOST = (
    pgerrors.AdminShutdown,
    pgerrors.CrashShutdown,
    pgerrors.CannotConnectNow,
    pgerrors.ConnectionException,
    pgerrors.IdleSessionTimeout,
)


def lost(e: BaseException, conn: psycopg.AsyncConnection[Any] | None) -> bool:
    """Whether ``e`` means the repository connection is gone."""
    if conn is not None and (conn.closed or conn.broken):
        return True
    if isinstance(e, _LOST):
        return True
    # Errors raised client-side (no SQLSTATE) on a connection we could not use.
    return isinstance(e, psycopg.OperationalError) and getattr(e, "sqlstate", None) is None


class RepositoryLink:
    def __init__(
        self,
        dsn: str,
        role: str,
        *,
        application_name: str,
        statement_timeout: float | None = None,
        connect_timeout: float = 10.0,
        retry_max: float = 10.0,
    ) -> None:
        self.dsn = dsn
        self.role = role
        self.application_name = application_name
        self.statement_timeout = statement_timeout
        self.connect_timeout = connect_timeout
        self.lock = asyncio.Lock()
        self._conn: psycopg.AsyncConnection[Any] | None = None
        self._backoff = Backoff(retry_max)
        self._retry_at = 0.0
        self.last_error: str | None = None

    @property
    def up(self) -> bool:
        c = self._conn
        return c is not None and not c.closed and not c.broken

    @property
    def retry_in(self) -> float:
        return max(0.0, self._retry_at - time.monotonic())

    def retry_now(self) -> None:
        """Another link reached the repository: no need to wait out our backoff."""
        if not self.up:
            self._retry_at = 0.0

    async def connection(self) -> psycopg.AsyncConnection[Any]:
        """The connection, (re)connecting if needed; RepositoryUnavailable if not now."""
        if self.up:
            assert self._conn is not None
            return self._conn
        if time.monotonic() < self._retry_at:
            raise RepositoryUnavailable(self.last_error or "the repository is unreachable")
        try:
            # Bounded here too: libpq waits for ever by default, and a
            # repository host that dropped off the network would hold its
            # callers (the writer: every snapshot) for minutes.
            async with asyncio.timeout(self.connect_timeout):
                conn = await connect_repository_async(self.dsn)
            # Named per role so that pg_stat_activity tells the pieces apart;
            # statement_timeout bounds the writer's hold on the snapshot lock.
            await conn.execute(
                "SELECT set_config('application_name', %s, false),"
                " set_config('statement_timeout', %s, false)",
                (
                    f"{self.application_name} ({self.role})"[:63],
                    str(round(self.statement_timeout * 1000)) if self.statement_timeout else "0",
                ),
            )
        except TimeoutError:
            self._failed(
                f"cannot connect to the repository: no answer in {self.connect_timeout:g} s"
            )
            raise RepositoryUnavailable(self.last_error or "unreachable") from None
        except (RepositoryError, psycopg.Error) as e:
            self._failed(str(e) if isinstance(e, RepositoryError) else first_line(e))
            raise RepositoryUnavailable(self.last_error or "unreachable") from None
        if self.last_error is not None:
            log.info("repository reachable again", link=self.role)
        self._conn = conn
        self._backoff.reset()
        self.last_error = None
        return conn

    def _failed(self, message: str) -> None:
        first = self.last_error is None
        self.last_error = message
        delay = self._backoff.next()
        self._retry_at = time.monotonic() + delay
        if first:
            log.warning("repository unreachable", link=self.role, error=message)
        else:
            log.debug("repository still unreachable", link=self.role, error=message, retry=delay)

    async def drop(self, reason: str, *, failed: bool = True) -> None:
        """Forget the connection; after an error that lost it (``failed``), back off."""
        await self.close()
        if failed:
            self._failed(reason)

    @asynccontextmanager
    async def use(self) -> AsyncIterator[psycopg.AsyncConnection[Any]]:
        """The connection, for one task at a time; a lost connection is dropped.

        Errors that lose the repository become RepositoryUnavailable; other
        psycopg errors (a constraint, a bug) propagate as they are.
        """
        async with self.lock:
            conn = await self.connection()
            try:
                yield conn
            except psycopg.Error as e:
                if lost(e, conn):
                    await self.drop(first_line(e))
                    raise RepositoryUnavailable(
                        f"repository connection lost: {first_line(e)}"
                    ) from None
                raise
            except asyncio.CancelledError:
                # Cancelled mid-query: psycopg tried to cancel it on the
                # server, but the connection's state is unknown now.
                if conn.broken or conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
                    await asyncio.shield(self.drop("cancelled", failed=False))
                raise

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            with suppress(psycopg.Error, OSError, TimeoutError):
                await asyncio.wait_for(conn.close(), 5)
