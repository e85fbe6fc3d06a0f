"""The collector's own health, as Prometheus metric families.

Everything comes from what the daemon keeps in memory anyway: its workers'
state, :class:`pgfleet.collector.stats.Stats` and the spool.  Each scrape builds the
families afresh, so a server that left the fleet (its worker gone, its stats
forgotten) is absent from the next scrape.

Counter kinds of :mod:`pgfleet.collector.stats` map to the ``kind`` label of
``pgfleet_errors_total``; those label values never change meaning once
shipped (alerts depend on them).
"""

from __future__ import annotations

import platform
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING

from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

from pgfleet.collector.stats import Histogram, Stats

if TYPE_CHECKING:
    from pgfleet.collector.spool import Spool
    from pgfleet.collector.worker import Worker


@dataclass(frozen=True)
class Fleet:
    """What the health collector reads from the daemon, at scrape time."""

    collector: str
    workers: Mapping[int, Worker]
    stats: Stats
    spool: Spool


def _buckets(h: Histogram) -> list[tuple[str, float]]:
    # The last of stats.BUCKETS is +Inf, as Prometheus wants.
    return [("+Inf" if b == float("inf") else repr(b), n) for b, n in h.cumulative()]


def _version() -> str:
    try:
        return metadata.version("pgfleet")
    except metadata.PackageNotFoundError:  # running from a source tree
        return "unknown"


class HealthCollector:
    """``collect()`` yields the collector's health families (see docs/metrics.md)."""

    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self._build = {
            "version": _version(),
            "python": platform.python_version(),
            "psycopg": metadata.version("psycopg"),
        }

    def describe(self) -> Iterable[Metric]:
        # Registering must not call collect(): the daemon may not be running yet.
        return []

    def collect(self) -> Iterator[Metric]:
        f = self.fleet
        workers = list(f.workers.values())

        up = GaugeMetricFamily(
            "pgfleet_up",
            "1 if the last attempt to snapshot the server reached it, 0 if it could not.",
            labels=["server"],
        )
        last = GaugeMetricFamily(
            "pgfleet_last_snapshot_timestamp_seconds",
            "When the server's last snapshot stored or spooled was taken (Unix time).",
            labels=["server"],
        )
        for w in workers:
            if w.reachable is not None:
                up.add_metric([w.server.alias], 1.0 if w.reachable else 0.0)
            if w.last_success is not None:
                last.add_metric([w.server.alias], w.last_success)
        yield up
        yield last

        yield GaugeMetricFamily(
            "pgfleet_servers", "Servers this collector snapshots.", value=len(workers)
        )
        yield GaugeMetricFamily(
            "pgfleet_snapshots_in_flight",
            "Snapshots being taken right now.",
            value=sum(1 for w in workers if w.state == "running"),
        )

        counters = f.stats.counters()
        errors = CounterMetricFamily(
            "pgfleet_errors",
            "Failures by server, source and kind (connect, query, timeout, cancelled, store).",
            labels=["server", "source", "kind"],
        )
        snapshots = CounterMetricFamily(
            "pgfleet_snapshots",
            "Snapshots taken by server and outcome (stored, spooled for later, dropped).",
            labels=["server", "outcome"],
        )
        opened = CounterMetricFamily(
            "pgfleet_connections_opened",
            "Connections opened to the server (one per database; kept between snapshots).",
            labels=["server"],
        )
        for (server, source, kind), n in sorted(counters.items()):
            if not server:
                continue
            if source == "snapshot":
                snapshots.add_metric([server, kind], n)
            elif (source, kind) == ("connection", "opened"):
                opened.add_metric([server], n)
        # The source of a server's failure is "connection"; of a failed store,
        # "repository".  The kind is the one set where the failure was caught.
        for (server, source, fkind), n in sorted(
            f.stats.failures().items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2].value)
        ):
            if server:
                errors.add_metric([server, source, fkind.value], n)
        yield errors
        yield snapshots
        yield opened

        histograms = f.stats.histograms()
        snap = HistogramMetricFamily(
            "pgfleet_snapshot_duration_seconds",
            "Time to take one snapshot: querying the server and storing (or spooling) it.",
            labels=["server"],
        )
        store = HistogramMetricFamily(
            "pgfleet_store_duration_seconds",
            "Time to write one snapshot into the repository.",
            labels=["server"],
        )
        query = HistogramMetricFamily(
            "pgfleet_source_query_duration_seconds",
            "Time to run one source on a monitored server (all its databases), any server.",
            labels=["source"],
        )
        lag = None
        for (server, source, kind), h in sorted(histograms.items()):
            if server and (source, kind) == ("snapshot", "duration"):
                snap.add_metric([server], _buckets(h), h.sum)
            elif server and (source, kind) == ("repository", "store"):
                store.add_metric([server], _buckets(h), h.sum)
            elif not server and kind == "query":
                query.add_metric([source], _buckets(h), h.sum)
            elif not server and (source, kind) == ("scheduler", "lag"):
                lag = h
        yield snap
        yield store
        yield query
        sched = HistogramMetricFamily(
            "pgfleet_scheduler_lag_seconds",
            "How late scheduled snapshots started (waiting for a place among those in flight).",
        )
        h = lag or Histogram()
        sched.add_metric([], _buckets(h), h.sum)
        yield sched

        yield GaugeMetricFamily(
            "pgfleet_spool_bytes",
            "Size of the snapshots waiting in the spool for the repository.",
            value=f.spool.bytes,
        )
        yield GaugeMetricFamily(
            "pgfleet_spool_snapshots",
            "Snapshots waiting in the spool for the repository.",
            value=len(f.spool),
        )
        yield CounterMetricFamily(
            "pgfleet_spool_dropped",
            "Snapshots lost: spool full, unwritable or unreadable, or their server removed.",
            value=counters.get(("", "spool", "dropped"), 0),
        )
        info = InfoMetricFamily("pgfleet_build", "pgfleet's version and what it runs on.")
        info.add_metric([], {**self._build, "collector": f.collector})
        yield info
