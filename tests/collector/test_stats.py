"""The collector's in-memory statistics."""

from __future__ import annotations

from pgfleet.collector.stats import BUCKETS, Stats
from pgfleet.snapshot.model import Failure, FailureKind


def test_counters_histograms_and_forget() -> None:
    s = Stats()
    s.fail("db1", Failure("pg_stat_database", FailureKind.TIMEOUT, "timed out"))
    s.count("db1", "connection", "opened", 2)
    s.fail("db1", Failure("connection", FailureKind.CONNECT, "refused"))
    s.fail("db1", Failure("connection", FailureKind.CONNECT, "refused again"))
    s.fail("db2", Failure("pg_stat_database", FailureKind.QUERY, "oops"))
    for v in (0.004, 0.02, 0.3, 7.0):
        s.observe("db1", "pg_stat_database", "query", v)
    s.gauge("", "spool", "bytes", 123.0)
    assert s.get("db1", "connection", "opened") == 2
    assert s.server_totals("db1") == {"opened": 2}
    # Counted by the kind set where they were caught, whatever the message.
    assert s.failure_totals("db1") == {FailureKind.TIMEOUT: 1, FailureKind.CONNECT: 2}
    assert s.failure_totals() == {
        FailureKind.TIMEOUT: 1,
        FailureKind.CONNECT: 2,
        FailureKind.QUERY: 1,
    }
    h = s.histograms()["db1", "pg_stat_database", "query"]
    assert h.count == 4 and abs(h.sum - 7.324) < 1e-9
    cumulative = dict(h.cumulative())
    assert cumulative[0.005] == 1 and cumulative[0.5] == 3 and cumulative[BUCKETS[-1]] == 4
    assert h.quantile(0.5) == 0.025
    s.forget("db1")
    assert s.counters() == {}
    assert s.failures() == {("db2", "pg_stat_database", FailureKind.QUERY): 1}
    assert s.histograms() == {} and s.gauges() == {("", "spool", "bytes"): 123.0}
