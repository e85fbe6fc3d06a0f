"""The collector's in-memory statistics."""

from __future__ import annotations

from pgfleet.stats import BUCKETS, Stats


def test_counters_histograms_and_forget():
    s = Stats()
    s.count("db1", "pg_stat_database", "timeout")
    s.count("db1", "connection", "connect_error", 2)
    s.count("db2", "pg_stat_database", "query_error")
    for v in (0.004, 0.02, 0.3, 7.0):
        s.observe("db1", "pg_stat_database", "query", v)
    s.gauge("", "spool", "bytes", 123.0)
    assert s.get("db1", "connection", "connect_error") == 2
    assert s.server_totals("db1") == {"timeout": 1, "connect_error": 2}
    h = s.histograms()["db1", "pg_stat_database", "query"]
    assert h.count == 4 and abs(h.sum - 7.324) < 1e-9
    cumulative = dict(h.cumulative())
    assert cumulative[0.005] == 1 and cumulative[0.5] == 3 and cumulative[BUCKETS[-1]] == 4
    assert h.quantile(0.5) == 0.025
    s.forget("db1")
    assert set(s.counters()) == {("db2", "pg_stat_database", "query_error")}
    assert s.histograms() == {} and s.gauges() == {("", "spool", "bytes"): 123.0}
