"""The web UI's repository connections: a small pool per login, all under one cap.

What must always hold, whatever the requests do:

- A :class:`Pool` never holds more than its ``size`` connections, idle and in
  use together.
- All the UI's connections together (every login's pool, the token's pool,
  logins being checked, collector commands) never number more than the
  :class:`Slots`' ``limit``: a connection is opened only on a slot taken
  first, and the slot is given back only once the connection is closed.
- Nobody waits forever: a request waits at most ``wait`` seconds for a
  connection or a slot, then gets :class:`Busy` (the app answers 503).
- At the cap, the connection idle the longest, in whichever pool, is closed
  to make room: idle logins never starve busy ones.
- A connection coming back broken, or not idle (a query cut short), is
  closed, never lent again.

Everything runs in one event loop: no locks, only futures to wake waiters.
Waiters are all woken and check again (there are a few dozen at most), so a
waiter cancelled meanwhile never swallows a wake-up meant for another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import psycopg
from psycopg import pq

from pgfleet.errors import PgfleetError

logger = logging.getLogger("pgfleet.web")

T = TypeVar("T")
Conn = psycopg.AsyncConnection[Any]
Configure = Callable[[Conn], Awaitable[None]]

# libpq's own bound on opening a connection (seconds).
CONNECT_TIMEOUT = 10


class Busy(PgfleetError):
    """No repository connection could be had in time: every one allowed is in use."""


class PoolClosed(PgfleetError):
    """The pool was closed (its user logged out) while a request waited on it."""


class Slots:
    """The cap on the UI's repository connections, shared by all the pools."""

    def __init__(self, limit: int, wait: float) -> None:
        self.limit = max(1, limit)
        self.wait = wait
        self.used = 0
        self.pools: set[Pool] = set()
        self._waiters: list[asyncio.Future[None]] = []
        self.stats: Counter[str] = Counter()

    def deadline(self) -> float:
        return asyncio.get_running_loop().time() + self.wait

    async def take(self, deadline: float) -> None:
        """Take a slot, closing another pool's idle connection if none is free."""
        loop = asyncio.get_running_loop()
        while self.used >= self.limit:
            conn = self._evict()
            if conn is not None:
                # Its slot passes to us as it is: the count never goes past the cap.
                self.stats["evicted"] += 1
                try:
                    await conn.close()
                except BaseException:
                    self.give_back()
                    raise
                return
            remaining = deadline - loop.time()
            if remaining <= 0:
                self.stats["timeouts"] += 1
                raise Busy(
                    f"the web UI's {self.limit} repository connections ([web] max_connections)"
                    " are all in use: try again in a moment"
                )
            await _wait(self._waiters, remaining)
        self.used += 1
        self.stats["taken"] += 1

    def give_back(self) -> None:
        self.used -= 1
        _wake(self._waiters)

    def _evict(self) -> Conn | None:
        oldest: tuple[float, Pool] | None = None
        for pool in self.pools:
            if pool.idle and (oldest is None or pool.idle[0][1] < oldest[0]):
                oldest = (pool.idle[0][1], pool)
        if oldest is None:
            return None
        pool = oldest[1]
        conn, _ = pool.idle.popleft()
        pool.total -= 1
        _wake(pool._waiters)
        return conn

    async def connect(self, conninfo: str, deadline: float) -> Conn:
        """A connection on a slot of its own: give it back with `close()`."""
        await self.take(deadline)
        try:
            return await psycopg.AsyncConnection.connect(
                conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT
            )
        except BaseException:
            self.give_back()
            raise

    async def close(self, conn: Conn) -> None:
        """Close a connection of `connect()` and give its slot back."""
        try:
            await conn.close()
        finally:
            self.give_back()

    async def run_blocking(self, fn: Callable[..., T], *args: Any) -> T:
        """Run `fn` (which opens one connection) in a thread, on a slot.

        The slot is given back when the thread is done, even if our caller
        gave up waiting for it: a thread cannot be cancelled.
        """
        await self.take(self.deadline())
        task = asyncio.ensure_future(asyncio.to_thread(fn, *args))

        def done(t: asyncio.Future[T]) -> None:
            self.give_back()
            if not t.cancelled():
                t.exception()  # retrieved: no "never retrieved" warning

        task.add_done_callback(done)
        return await asyncio.shield(task)

    def snapshot(self) -> dict[str, int]:
        """Figures for the log and the tests."""
        return {
            "limit": self.limit,
            "used": self.used,
            "pools": len(self.pools),
            "idle": sum(len(p.idle) for p in self.pools),
            **self.stats,
        }


class Pool:
    """At most `size` connections to `conninfo`, opened on demand on `slots`."""

    def __init__(
        self,
        slots: Slots,
        conninfo: str,
        *,
        size: int,
        name: str,
        configure: Configure | None = None,
    ) -> None:
        self.slots = slots
        self.conninfo = conninfo
        self.size = max(1, size)
        self.name = name
        self.configure = configure
        # (connection, idle since): reused from the right (warmest),
        # evicted and expired from the left (coldest).
        self.idle: deque[tuple[Conn, float]] = deque()
        self.total = 0  # idle, lent and being opened
        self.closed = False
        self._waiters: list[asyncio.Future[None]] = []
        slots.pools.add(self)

    def __repr__(self) -> str:
        return f"<Pool {self.name!r} {self.total}/{self.size}>"

    def adopt(self, conn: Conn) -> None:
        """Take over a connection of ``slots.connect()`` (its slot with it)."""
        if self.closed or self.total >= self.size:
            raise ValueError(f"the pool {self.name!r} cannot take one more connection")
        self.total += 1
        self.idle.append((conn, time.monotonic()))

    @contextlib.asynccontextmanager
    async def connection(self) -> AsyncIterator[Conn]:
        conn = await self._get()
        try:
            yield conn
        finally:
            await self._put(conn)

    async def _get(self) -> Conn:
        deadline = self.slots.deadline()
        loop = asyncio.get_running_loop()
        while True:
            if self.closed:
                raise PoolClosed(f"the pool {self.name!r} is closed: its session ended")
            while self.idle:
                conn, _ = self.idle.pop()
                if not conn.closed:
                    return conn
                self.total -= 1
                self.slots.give_back()
            if self.total < self.size:
                self.total += 1
                try:
                    await self.slots.take(deadline)
                except BaseException:
                    self.total -= 1
                    _wake(self._waiters)
                    raise
                try:
                    return await self._connect()
                except BaseException:
                    self.total -= 1
                    self.slots.give_back()
                    _wake(self._waiters)
                    raise
            remaining = deadline - loop.time()
            if remaining <= 0:
                self.slots.stats["timeouts"] += 1
                raise Busy(
                    f"the {self.size} repository connections of this login ([web] pool_size)"
                    " stayed busy: try again in a moment"
                )
            await _wait(self._waiters, remaining)

    async def _connect(self) -> Conn:
        conn = await psycopg.AsyncConnection.connect(
            self.conninfo, autocommit=True, connect_timeout=CONNECT_TIMEOUT
        )
        if self.configure is not None:
            try:
                await self.configure(conn)
            except BaseException:
                await conn.close()
                raise
        self.slots.stats["opened"] += 1
        return conn

    async def _put(self, conn: Conn) -> None:
        status = conn.info.transaction_status
        if status == pq.TransactionStatus.ACTIVE and not conn.closed:
            # A query cut short: closing alone would leave it running there.
            with contextlib.suppress(Exception):
                await conn.cancel_safe(timeout=2)
        if self.closed or conn.closed or status != pq.TransactionStatus.IDLE:
            await self._discard(conn)
        else:
            self.idle.append((conn, time.monotonic()))
            # Our own waiters first; with none, those waiting for a slot may
            # close it to take its place.
            if not _wake(self._waiters):
                _wake(self.slots._waiters)

    async def _discard(self, conn: Conn) -> None:
        self.total -= 1
        try:
            await conn.close()
        finally:
            self.slots.give_back()
            _wake(self._waiters)

    async def close_idle(self, older_than: float) -> int:
        """Close the connections idle for more than `older_than` seconds."""
        limit = time.monotonic() - older_than
        n = 0
        while self.idle and self.idle[0][1] <= limit:
            conn, _ = self.idle.popleft()
            await self._discard(conn)
            n += 1
        return n

    async def close(self) -> None:
        """Close the idle connections now, the lent ones when they come back."""
        self.closed = True
        self.slots.pools.discard(self)
        _wake(self._waiters)
        while self.idle:
            conn, _ = self.idle.popleft()
            await self._discard(conn)


async def _wait(waiters: list[asyncio.Future[None]], timeout: float) -> None:
    """Wait to be woken, or `timeout` seconds."""
    fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    waiters.append(fut)
    try:
        await asyncio.wait_for(fut, timeout)
    except TimeoutError:
        pass
    finally:
        with contextlib.suppress(ValueError):
            waiters.remove(fut)


def _wake(waiters: list[asyncio.Future[None]]) -> int:
    """Wake every waiter; return how many were still waiting."""
    woken = 0
    for fut in waiters:
        if not fut.done():
            fut.set_result(None)
            woken += 1
    waiters.clear()
    return woken
