"""The collector's own health, as Prometheus metric families.

Everything comes from what the daemon keeps in memory anyway: its workers'
state, :class:`pgfleet.collector.stats.Stats` and the spool.  Each scrape builds the
families afresh, so a server that left the fleet (its worker gone, its stats
forgotten) is absent from the next scrape.

Counter kinds of :mod:`pgfleet.collector.stats` map to the ``kind`` label of
``pgfleet_errors_total``; those label values never change meaning once
shipped (alerts depend on them).

The process's own figures (``process_cpu_seconds_total``, memory, open
files, start time) come from prometheus_client's ProcessCollector, asked
from here rather than registered on its own: the daemon builds a private
registry (no global one), holding this collector.
"""

from __future__ import annotations

import platform
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING

from prometheus_client import ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
    Metric,
)

from pgfleet.collector.stats import Histogram, Key, Stats

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
        # registry=None: not the global registry, which nobody scrapes.
        self._process = ProcessCollector(registry=None)

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
        interval = GaugeMetricFamily(
            "pgfleet_snapshot_interval_seconds",
            "The server's snapshot frequency: seconds between two scheduled snapshots.",
            labels=["server"],
        )
        for w in workers:
            if w.reachable is not None:
                up.add_metric([w.server.alias], 1.0 if w.reachable else 0.0)
            if w.last_success is not None:
                last.add_metric([w.server.alias], w.last_success)
            interval.add_metric([w.server.alias], w.server.frequency)
        yield up
        yield last
        yield interval

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
            "Connections opened to the server: the main one (kept between snapshots) and one "
            "per database visited.",
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
        yield from _events(counters, f.stats.gauges())
        info = InfoMetricFamily("pgfleet_build", "pgfleet's version and what it runs on.")
        info.add_metric([], {**self._build, "collector": f.collector})
        yield info
        # Linux only (/proc): nothing elsewhere.
        yield from self._process.collect()


# Per-server event counters: Stats (source, kind) -> (family, label value).
# The families' label is named by _EVENT_FAMILIES.
_EVENTS: dict[tuple[str, str], tuple[str, str]] = {
    ("repository", "kept"): ("pgfleet_repository_refusals", "kept"),
    ("repository", "refused"): ("pgfleet_repository_refusals", "dropped"),
    ("lease", "lost"): ("pgfleet_lease_events", "lost"),
    ("lease", "handover"): ("pgfleet_lease_events", "handover"),
    ("lease", "waited"): ("pgfleet_lease_events", "waited"),
    ("spool", "duplicate"): ("pgfleet_spool_duplicates", ""),
    ("clock", "skewed"): ("pgfleet_clock_skewed", ""),
    ("clock", "clamped"): ("pgfleet_clock_clamped", ""),
}
_EVENT_FAMILIES: dict[str, tuple[str, str]] = {
    "pgfleet_repository_refusals": (
        "Stores the repository refused, by what became of the snapshot: kept (spooled, "
        "retried: read-only, full, privileges...) or dropped (its own rows refused).",
        "outcome",
    ),
    "pgfleet_lease_events": (
        "Lease events: a snapshot dropped for a lease another collector took (lost), stored "
        "under a term since taken over (handover), or spooled while an earlier owner may "
        "still store (waited).",
        "event",
    ),
    "pgfleet_spool_duplicates": (
        "Spooled snapshots found already stored (their store committed as it timed out).",
        "",
    ),
    "pgfleet_clock_skewed": (
        "Snapshots of a server whose clock was more than 60 s off the collector's.",
        "",
    ),
    "pgfleet_clock_clamped": (
        "Snapshots whose timestamps were moved to the repository's clock (server clock off).",
        "",
    ),
}
# Process-wide: Stats ("", source, kind) counters.
_NOTIFICATIONS = ("received", "dropped", "ignored", "malformed", "refused")


def _events(counters: Mapping[Key, int], gauges: Mapping[Key, float]) -> Iterator[Metric]:
    """The collector's event counters: leases, refusals, clocks, commands, discovery."""
    families: dict[str, CounterMetricFamily] = {}
    for name, (help_text, label) in _EVENT_FAMILIES.items():
        families[name] = CounterMetricFamily(
            name, help_text, labels=["server", label] if label else ["server"]
        )
    for (server, source, kind), n in sorted(counters.items()):
        event = _EVENTS.get((source, kind))
        if server and event is not None:
            family, value = event
            families[family].add_metric([server, value] if value else [server], n)
    yield from families.values()

    clamp = GaugeMetricFamily(
        "pgfleet_clock_clamp_seconds",
        "How far the last clamped snapshot's timestamps were moved (server clock minus "
        "the repository's).",
        labels=["server"],
    )
    for (server, source, kind), v in sorted(gauges.items()):
        if server and (source, kind) == ("clock", "clamp_seconds"):
            clamp.add_metric([server], v)
    yield clamp

    notifications = CounterMetricFamily(
        "pgfleet_command_notifications",
        "Notifications on the command channel: received, dropped (per-sender cap, full "
        "inbox, left at stop), ignored, malformed or refused (no authorised request).",
        labels=["outcome"],
    )
    for outcome in _NOTIFICATIONS:
        notifications.add_metric([outcome], counters.get(("", "commands", outcome), 0))
    yield notifications
    executed = CounterMetricFamily(
        "pgfleet_commands_executed", "Authorised commands executed, by command.", labels=["command"]
    )
    for (server, source, kind), n in sorted(counters.items()):
        if not server and source == "commands" and kind not in _NOTIFICATIONS:
            executed.add_metric([kind], n)
    yield executed

    yield CounterMetricFamily(
        "pgfleet_discovery_collisions",
        "Discovered servers ignored because their alias belongs to a server added by hand or "
        "by another provider (counted once per collision that starts).",
        value=counters.get(("", "discovery", "collision"), 0),
    )
    yield GaugeMetricFamily(
        "pgfleet_discovery_colliding",
        "Discovered servers ignored right now because their alias is taken.",
        value=gauges.get(("", "discovery", "collisions"), 0.0),
    )
    yield from _management(counters, gauges)


def _management(counters: Mapping[Key, int], gauges: Mapping[Key, float]) -> Iterator[Metric]:
    """``pgfleet ctl``'s connections: Stats kinds "FAMILY/LABEL..." of source "management"."""
    accepted = CounterMetricFamily(
        "pgfleet_management_connections",
        "Management connections accepted (remote: logged in), by interface.",
        labels=["interface"],
    )
    refused = CounterMetricFamily(
        "pgfleet_management_refusals",
        "Management connections refused, by interface and reason (auth_failed, tls_required, "
        "timeout, too_many_connections, not_allowed, disconnected...).",
        labels=["interface", "reason"],
    )
    errors = CounterMetricFamily(
        "pgfleet_management_errors",
        "Management requests answered with an error, by error code name.",
        labels=["code"],
    )
    executed = CounterMetricFamily(
        "pgfleet_management_commands", "Management requests by command.", labels=["command"]
    )
    for (server, source, kind), n in sorted(counters.items()):
        if server or source != "management":
            continue
        family, _, label = kind.partition("/")
        if family == "accepted":
            accepted.add_metric([label], n)
        elif family == "refused":
            interface, _, reason = label.partition("/")
            refused.add_metric([interface, reason], n)
        elif family == "errors":
            errors.add_metric([label], n)
        elif family == "commands":
            executed.add_metric([label], n)
    yield from (accepted, refused, errors, executed)
    yield GaugeMetricFamily(
        "pgfleet_management_connections_open",
        "Management connections open now.",
        value=gauges.get(("", "management", "connections"), 0.0),
    )
