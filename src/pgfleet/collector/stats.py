"""The collector's numbers about itself, kept in memory for the exporter.

Counters and duration histograms are keyed by ``(server, source, kind)``:
``server`` is the alias, ``source`` a datasource module (or ``connection``,
``repository``...), ``kind`` what happened (``stored``, ``spooled``...).
Failures are counted apart, by their :class:`FailureKind` as it was set
where they were caught (:meth:`Stats.fail`).  Process-wide
numbers use the server ``""``.  A later ``prometheus_client`` Collector reads
:meth:`Stats.counters`, :meth:`Stats.histograms` and :meth:`Stats.gauges` on
every scrape; :meth:`Stats.forget` drops a vanished server's series so they
vanish from the scrape too.

Nothing here does I/O or awaits: every method is safe to call from the event
loop at any point.
"""

from __future__ import annotations

import bisect
from collections import Counter
from dataclasses import dataclass, field

from pgfleet.snapshot.model import Failure, FailureKind

# Seconds; the last bucket is +Inf.  Coarse on purpose: enough to tell a
# healthy source (milliseconds) from one nearing its statement timeout.
BUCKETS: tuple[float, ...] = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, float("inf"),
)  # fmt: skip


Key = tuple[str, str, str]
FailureKey = tuple[str, str, FailureKind]


@dataclass
class Histogram:
    """Cumulative-bucket histogram, the shape Prometheus wants."""

    counts: list[int] = field(default_factory=lambda: [0] * len(BUCKETS))
    count: int = 0
    sum: float = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(BUCKETS, value)] += 1
        self.count += 1
        self.sum += value

    def cumulative(self) -> list[tuple[float, int]]:
        out, total = [], 0
        for bound, n in zip(BUCKETS, self.counts, strict=True):
            total += n
            out.append((bound, total))
        return out

    def quantile(self, q: float) -> float:
        """An upper bound of the q-quantile (the bucket it falls in)."""
        if not self.count:
            return 0.0
        rank = q * self.count
        for bound, total in self.cumulative():
            if total >= rank:
                return bound
        return BUCKETS[-1]


class Stats:
    """Counters, histograms and gauges of one collector process."""

    def __init__(self) -> None:
        self._counters: Counter[Key] = Counter()
        self._histograms: dict[Key, Histogram] = {}
        self._gauges: dict[Key, float] = {}
        self._failures: Counter[FailureKey] = Counter()

    def fail(self, server: str, failure: Failure) -> None:
        self._failures[server, failure.source, failure.kind] += 1

    def failures(self) -> dict[FailureKey, int]:
        """Failures by (server, source, kind)."""
        return dict(self._failures)

    def failure_totals(self, server: str | None = None) -> Counter[FailureKind]:
        """Failures of one server (of all when None), summed over sources, by kind."""
        out: Counter[FailureKind] = Counter()
        for (srv, _, kind), n in self._failures.items():
            if server is None or srv == server:
                out[kind] += n
        return out

    def count(self, server: str, source: str, kind: str, n: int = 1) -> None:
        self._counters[server, source, kind] += n

    def observe(self, server: str, source: str, kind: str, seconds: float) -> None:
        key = (server, source, kind)
        h = self._histograms.get(key)
        if h is None:
            h = self._histograms[key] = Histogram()
        h.observe(seconds)

    def gauge(self, server: str, source: str, kind: str, value: float) -> None:
        self._gauges[server, source, kind] = value

    def counters(self) -> dict[Key, int]:
        return dict(self._counters)

    def histograms(self) -> dict[Key, Histogram]:
        return {k: Histogram(list(h.counts), h.count, h.sum) for k, h in self._histograms.items()}

    def gauges(self) -> dict[Key, float]:
        return dict(self._gauges)

    def get(self, server: str, source: str, kind: str) -> int:
        return self._counters.get((server, source, kind), 0)

    def server_totals(self, server: str) -> dict[str, int]:
        """Every counter of one server, summed over its sources, by kind."""
        out: Counter[str] = Counter()
        for (srv, _, kind), n in self._counters.items():
            if srv == server:
                out[kind] += n
        return dict(out)

    def reset(self) -> int:
        """Zero every counter, failure and histogram; return how many there were.

        ``pgfleet ctl clear prometheus``: Prometheus reads a counter that went
        down as a reset.  Gauges stay: they are states, not counts.
        """
        n = len(self._counters) + len(self._failures) + len(self._histograms)
        self._counters.clear()
        self._failures.clear()
        self._histograms.clear()
        return n

    def forget(self, server: str) -> None:
        """Drop everything about a server that left the fleet."""
        for store in (self._counters, self._histograms, self._gauges):
            for key in [k for k in store if k[0] == server]:
                del store[key]
        for fkey in [k for k in self._failures if k[0] == server]:
            del self._failures[fkey]
