"""Backups on the collector's /metrics: a prometheus_client Collector.

Everything comes from what the daemon's :class:`~pgfleet.backup.service.BackupService`
holds in memory: each server's catalog summary (refreshed by the service after
every change it makes and every 5 minutes, never at scrape time), its job, its
WAL receiver's status, and the collector's statistics (``pgfleet.collector.stats``:
sources ``backup``, ``retention``, ``verify``).  A scrape does no I/O.

A server is in the scrape while this collector holds it and either backs it
up (enabled) or finds a valid backup of it on disk; its series vanish with it,
as the collector's other families do.  Every family is ``pgfleet_backup_*`` with the
label ``server``; counters never go backwards but when the collector restarts,
``pgfleet ctl clear prometheus`` runs (the runs, retention and verify counts),
or the server's receiver is replaced (its restarts and segments: a reload that
changes its connection, the server coming back to this collector).  The
receiver's ``state`` numbers are :class:`~pgfleet.backup.wal.ReceiverState`'s
and never change meaning.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from pgfleet.backup.catalog import State
from pgfleet.backup.wal import ReceiverState

if TYPE_CHECKING:
    from pgfleet.backup.service import BackupService

__all__ = ["BackupCollector"]

# Stats (source, kind) -> (family, label value).
_OUTCOMES = {
    ("backup", "valid"): ("pgfleet_backup_runs", "valid"),
    ("backup", "failed"): ("pgfleet_backup_runs", "failed"),
    ("backup", "cancelled"): ("pgfleet_backup_runs", "cancelled"),
    ("retention", "ok"): ("pgfleet_backup_retention_runs", "ok"),
    ("retention", "failed"): ("pgfleet_backup_retention_runs", "failed"),
    ("verify", "intact"): ("pgfleet_backup_verifications", "intact"),
    ("verify", "damaged"): ("pgfleet_backup_verifications", "damaged"),
    ("verify", "failed"): ("pgfleet_backup_verifications", "failed"),
}
_AMOUNTS = {
    ("retention", "deleted"): "pgfleet_backup_retention_deleted",
    ("retention", "wal_removed"): "pgfleet_backup_wal_expunged",
}


class BackupCollector:
    """``collect()`` yields the backup families (see docs/backup.md, "Metrics")."""

    def __init__(self, service: BackupService) -> None:
        self.service = service

    def describe(self) -> Iterable[Metric]:
        # Registering must not call collect(): the daemon may not be running yet.
        return []

    def collect(self) -> Iterator[Metric]:
        servers = sorted(self.service.exported(), key=lambda s: s.alias)

        def gauge(name: str, text: str, *labels: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(name, text, labels=["server", *labels])

        backups = gauge(
            "pgfleet_backup_backups",
            "Base backups on disk by state: valid, invalid, in_progress, deleting.",
            "state",
        )
        raw = gauge("pgfleet_backup_raw_bytes", "Bytes of the valid backups, uncompressed.")
        stored = gauge(
            "pgfleet_backup_stored_bytes", "Bytes of the valid backups on disk (compressed)."
        )
        latest_raw = gauge(
            "pgfleet_backup_latest_raw_bytes", "Bytes of the newest valid backup, uncompressed."
        )
        latest_stored = gauge(
            "pgfleet_backup_latest_stored_bytes", "Bytes of the newest valid backup on disk."
        )
        success = gauge(
            "pgfleet_backup_last_success_timestamp_seconds",
            "When the newest valid backup finished (Unix time).",
        )
        duration = gauge(
            "pgfleet_backup_last_duration_seconds", "How long the newest valid backup took."
        )
        due = gauge(
            "pgfleet_backup_next_timestamp_seconds",
            "When the next scheduled backup is due (Unix time; in the past: overdue or running).",
        )
        interval = gauge(
            "pgfleet_backup_interval_seconds",
            "Seconds the schedule gives the newest valid backup until the next is due.",
        )
        running = gauge(
            "pgfleet_backup_running", "1 while a base backup of the server runs on this collector."
        )
        wal_segments = gauge("pgfleet_backup_wal_segments", "WAL segments in the WAL store.")
        wal_bytes = gauge(
            "pgfleet_backup_wal_stored_bytes", "Bytes of the WAL store on disk (segments, history)."
        )
        up = gauge(
            "pgfleet_backup_wal_receiver_up", "1 while the server's WAL receiver streams, else 0."
        )
        state = gauge(
            "pgfleet_backup_wal_receiver_state",
            "The WAL receiver's state: 0 stopped, 1 starting, 2 streaming, 3 waiting to restart.",
        )
        lag = gauge(
            "pgfleet_backup_wal_lag_bytes",
            "WAL the server wrote that the receiver has not (measured every 10 s while streaming).",
        )
        last_segment = gauge(
            "pgfleet_backup_wal_last_segment_timestamp_seconds",
            "When the receiver last stored a completed segment (Unix time).",
        )
        restarts = CounterMetricFamily(
            "pgfleet_backup_wal_receiver_restarts",
            "Times the WAL receiver started pg_receivewal again (it ended or failed).",
            labels=["server"],
        )
        segments = CounterMetricFamily(
            "pgfleet_backup_wal_segments_stored",
            "WAL segments the receiver completed and stored.",
            labels=["server"],
        )
        for s in servers:
            a = s.alias
            summary = s.summary
            if summary is not None:
                for st in State:
                    backups.add_metric([a, str(st)], summary.counts.get(st, 0))
                raw.add_metric([a], summary.raw_bytes)
                stored.add_metric([a], summary.stored_bytes)
                wal_segments.add_metric([a], summary.wal_segments)
                wal_bytes.add_metric([a], summary.wal_bytes)
                b = summary.latest
                if b is not None:
                    latest_raw.add_metric([a], b.raw_bytes)
                    latest_stored.add_metric([a], b.stored_bytes)
                    if b.finished is not None:
                        success.add_metric([a], b.finished.timestamp())
                    if b.duration is not None:
                        duration.add_metric([a], max(b.duration.total_seconds(), 0.0))
            when = s.next_due()
            if when is not None:
                due.add_metric([a], when.timestamp())
            period = s.interval()
            if period is not None:
                interval.add_metric([a], period)
            running.add_metric([a], 1.0 if s.job is not None and s.job.state == "running" else 0.0)
            if s.receiver is not None:
                r = s.receiver.status()
                up.add_metric([a], 1.0 if r.state is ReceiverState.STREAMING else 0.0)
                state.add_metric([a], int(r.state))
                # A lag measured before the receiver stopped streaming is no lag any more.
                if r.lag_bytes is not None and r.state is ReceiverState.STREAMING:
                    lag.add_metric([a], max(r.lag_bytes, 0))
                if r.last_segment_at is not None:
                    last_segment.add_metric([a], r.last_segment_at.timestamp())
                restarts.add_metric([a], r.restarts)
                segments.add_metric([a], r.segments_stored)
        yield from (backups, raw, stored, latest_raw, latest_stored, success, duration, due)
        yield from (interval, running, wal_segments, wal_bytes, up, state, lag, last_segment)
        yield from (restarts, segments)

        jobs = [s.job for s in self.service.servers.values() if s.job is not None]
        yield GaugeMetricFamily(
            "pgfleet_backup_queued",
            "Base backups waiting for a place (at most so many run at once per collector).",
            value=sum(1 for j in jobs if j.state == "queued"),
        )
        yield GaugeMetricFamily(
            "pgfleet_backup_max_concurrent",
            "Base backups this collector runs at once, at most.",
            value=self.service.max_concurrent,
        )
        yield from self._counters({s.alias for s in servers})

    def _counters(self, aliases: set[str]) -> Iterator[Metric]:
        runs = {
            "pgfleet_backup_runs": CounterMetricFamily(
                "pgfleet_backup_runs",
                "Base backups taken by this collector, by outcome: valid, failed, cancelled.",
                labels=["server", "outcome"],
            ),
            "pgfleet_backup_retention_runs": CounterMetricFamily(
                "pgfleet_backup_retention_runs",
                "Retention runs (after each backup, every 6 hours, on demand) by outcome: ok, "
                "failed.",
                labels=["server", "outcome"],
            ),
            "pgfleet_backup_verifications": CounterMetricFamily(
                "pgfleet_backup_verifications",
                "Backups read back and checked (pgfleet ctl backup verify), by outcome: intact, "
                "damaged, failed.",
                labels=["server", "outcome"],
            ),
        }
        amounts = {
            "pgfleet_backup_retention_deleted": CounterMetricFamily(
                "pgfleet_backup_retention_deleted",
                "Backups deleted by retention.",
                labels=["server"],
            ),
            "pgfleet_backup_wal_expunged": CounterMetricFamily(
                "pgfleet_backup_wal_expunged",
                "WAL segments deleted by retention: no kept backup needed them.",
                labels=["server"],
            ),
        }
        counters = self.service.stats.counters()
        # Outcomes appear at 0 for every exported server: increase() sees the first one.
        for alias in sorted(aliases):
            for (source, kind), (family, outcome) in _OUTCOMES.items():
                runs[family].add_metric([alias, outcome], counters.get((alias, source, kind), 0))
            for (source, kind), family in _AMOUNTS.items():
                amounts[family].add_metric([alias], counters.get((alias, source, kind), 0))
        yield from runs.values()
        yield from amounts.values()
