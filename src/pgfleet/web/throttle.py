"""How many failed logins a client address, and a user name, may have in a minute.

What must always hold:

- Past ``limit`` failures in the last ``window`` seconds from an address, or
  for a user name, a login from there (or as that user) is refused without
  being tried: not one more password reaches the repository.
- An attempt counts as a failure from the moment it starts, and stops
  counting only if it succeeds: 300 attempts sent at once are as many as 300
  sent one after the other, not 300 that each saw no failure yet.
- An IPv6 client is its /64: whoever has one address of a network has them
  all, and would otherwise get ``limit`` tries per address.
- Memory stays bounded: entries older than the window are dropped, and past
  ``max_keys`` addresses and names the quietest are forgotten first.

I/O-free: the caller says who tries, and whether it worked.
"""

from __future__ import annotations

import contextlib
import ipaddress
import time
from collections import Counter, deque
from dataclasses import dataclass


@dataclass(frozen=True)
class Attempt:
    """A login under way, counted as failed unless `LoginThrottle.succeeded()`."""

    keys: tuple[str, ...]
    at: float


def client_network(address: str) -> str:
    """What a client is counted as: its IPv4 address, or its IPv6 /64."""
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip)


class Throttled(Exception):
    """Too many failed logins from this address or for this user name lately."""


class LoginThrottle:
    def __init__(
        self,
        limit: int,
        window: float = 60.0,
        *,
        max_keys: int = 100_000,
    ) -> None:
        self.limit = limit  # <= 0: no limit
        self.window = window
        self.max_keys = max_keys
        self._failures: dict[str, deque[float]] = {}
        self.stats: Counter[str] = Counter()

    def begin(self, address: str, user: str | None) -> Attempt:
        """Count an attempt from `address` as `user` (None: a token); raise
        `Throttled` if either has had too many failures lately."""
        now = time.monotonic()
        keys: tuple[str, ...] = (f"address {client_network(address)}",)
        if user is not None:
            keys += (f"user {user}",)
        if self.limit > 0:
            for key in keys:
                if self._recent(key, now) >= self.limit:
                    self.stats["throttled"] += 1
                    raise Throttled(
                        f"more than {self.limit} failed logins in {self.window:.0f} s for {key}"
                    )
        for key in keys:
            self._failures.setdefault(key, deque()).append(now)
        if len(self._failures) > self.max_keys:
            self.prune(now)
        self.stats["attempts"] += 1
        return Attempt(keys, now)

    def succeeded(self, attempt: Attempt) -> None:
        for key in attempt.keys:
            times = self._failures.get(key)
            if times is not None:
                with contextlib.suppress(ValueError):
                    times.remove(attempt.at)
                if not times:
                    del self._failures[key]

    def cancel(self, attempt: Attempt) -> None:
        """Forget an attempt that was never tried (the repository was busy)."""
        self.succeeded(attempt)

    def _recent(self, key: str, now: float) -> int:
        times = self._failures.get(key)
        if not times:
            return 0
        while times and times[0] <= now - self.window:
            times.popleft()
        return len(times)

    def prune(self, now: float | None = None) -> None:
        """Drop what the window no longer covers; past `max_keys`, the quietest keys."""
        now = time.monotonic() if now is None else now
        for key in list(self._failures):
            if not self._recent(key, now):
                del self._failures[key]
        if len(self._failures) > self.max_keys:
            by_last = sorted(self._failures, key=lambda k: self._failures[k][-1])
            for key in by_last[: len(by_last) - self.max_keys]:
                del self._failures[key]

    def __len__(self) -> int:
        return len(self._failures)
