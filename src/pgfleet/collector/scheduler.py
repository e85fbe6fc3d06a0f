"""When to take snapshots: slots, in-flight limit, backoff.  No I/O here.

Each server's snapshots fall on a grid of wall-clock *slots*,
``k * frequency + phase``, its phase derived from its alias: a fleet added
at once spreads over the period instead of firing together, and the grid is
the same after a restart or on whichever collector holds the server, so a
takeover neither doubles nor skips a slot.

A late snapshot is taken once, for the latest slot already due, never once
per missed slot.
"""

from __future__ import annotations

import asyncio
import math
import random
import zlib


def phase(key: str, frequency: float) -> float:
    """A stable offset in [0, frequency) for ``key``, spread uniformly."""
    return zlib.crc32(key.encode()) / 2**32 * frequency


def spread(key: str, modulo: int) -> int:
    """A stable number in [0, modulo) for ``key``, independent of :func:`phase`."""
    return zlib.crc32(b"spread:" + key.encode()) % modulo


def slot_at_or_before(t: float, frequency: float, offset: float) -> float:
    return math.floor((t - offset) / frequency) * frequency + offset


def next_due(now: float, last_slot: float | None, frequency: float, offset: float) -> float:
    """The slot the next snapshot is for.

    The first slot after ``last_slot`` (the one last taken) if it is still
    ahead; if it is already past (we are late), the latest slot due, which
    is then taken at once.  With no slot taken yet, the next one ahead.
    """
    latest = slot_at_or_before(now, frequency, offset)
    if last_slot is None:
        return latest + frequency if latest < now else latest
    following = last_slot + frequency
    return max(following, latest) if following <= now else following


class Backoff:
    """Exponential backoff with jitter: 1 s, 2 s, 4 s... up to ``cap``.

    Each delay is drawn in [d/2, d] ("equal jitter") so that servers which
    failed together do not retry together.
    """

    def __init__(self, cap: float, base: float = 1.0) -> None:
        self.cap = cap
        self.base = base
        self.failures = 0

    def next(self) -> float:
        d = min(self.cap, self.base * 2**self.failures)
        self.failures += 1
        return random.uniform(d / 2, d)

    def reset(self) -> None:
        self.failures = 0


class Limiter:
    """At most ``limit`` holders at once; the limit can change while in use.

    An asyncio.Semaphore cannot be resized, and a reload may change
    ``max_in_flight``: waiters are served in arrival order.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.active = 0
        self._cond = asyncio.Condition()

    async def acquire(self) -> None:
        async with self._cond:
            await self._cond.wait_for(lambda: self.active < self.limit)
            self.active += 1

    async def release(self) -> None:
        async with self._cond:
            self.active -= 1
            self._cond.notify()

    async def resize(self, limit: int) -> None:
        async with self._cond:
            self.limit = limit
            self._cond.notify_all()

    async def __aenter__(self) -> Limiter:
        await self.acquire()
        return self

    async def __aexit__(self, *exc: object) -> None:
        # Shielded: a holder cancelled on its way out must still give its
        # place back, or the limit shrinks for good.
        await asyncio.shield(self.release())
