"""FleetCollector: what a scrape says of real snapshots, checked by promtool and Grafana's view."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.parser import text_string_to_metric_families

from pgfleet.cluster import Cluster
from pgfleet.collector.exporter.fleet import FleetCollector, family_labels, family_names
from pgfleet.collector.exporter.latest import Latest
from pgfleet.collector.exporter.views import VIEWS
from tests.collector.exporter import PROMETHEUS, registry, running_prometheus, snapshot
from tests.fix_clusters import NewDatabase
from tests.fix_repository import one_row

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
DASHBOARD = Path(__file__).parents[3] / "contrib" / "grafana" / "pgfleet-fleet.json"

# What the collector's health collector (exporter/health.py) exports; the
# dashboard may use these too.
HEALTH = {
    "pgfleet_up": ("server",),
    "pgfleet_snapshot_duration_seconds": ("server", "le"),
    "pgfleet_source_query_duration_seconds": ("source", "le"),
    "pgfleet_errors_total": ("server", "source", "kind"),
    "pgfleet_last_snapshot_timestamp_seconds": ("server",),
    "pgfleet_snapshots_in_flight": (),
    "pgfleet_spool_bytes": (),
    "pgfleet_spool_dropped_total": (),
    "pgfleet_spool_snapshots": (),
    "pgfleet_snapshot_interval_seconds": ("server",),
}
RULES = DASHBOARD.parents[1] / "prometheus" / "pgfleet.rules.yml"
RULES_TESTS = RULES.with_name("pgfleet.rules.test.yml")


def _workload(dsn: str) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO t SELECT g, 'x' FROM generate_series(1, 1000) g")
        for i in range(20):
            conn.execute("SELECT count(*) FROM t WHERE id < %s", (i,))
            conn.execute("UPDATE t SET v = 'y' WHERE id = %s", (i,))
        conn.execute("SELECT pg_sleep(0.05)")


@pytest.fixture
def fleet(pg15: Cluster, pg18: Cluster, new_database: NewDatabase) -> Latest:
    """Two snapshots each of a PostgreSQL 15 (every extension) and an 18, as three servers."""
    # Caps above the defaults: the session's clusters hold other tests' busier
    # tables and statements, which would crowd out this workload's.
    latest = Latest(max_statements=100, max_tables=100)
    dsns = {"pg15": new_database(pg15), "pg18": new_database(pg18)}
    for dsn in dsns.values():
        _workload(dsn)
    # An idle client on each server, as real servers have: pg_stat_activity,
    # read on the collector's main connection, leaves that one out.
    clients = [psycopg.connect(dsn) for dsn in dsns.values()]
    try:
        for _ in range(2):
            for alias, dsn in dsns.items():
                snapshot(latest, alias, dsn)
            snapshot(latest, "pg18-again", dsns["pg18"])
    finally:
        for c in clients:
            c.close()
    return latest


def test_promtool_finds_nothing_to_say(fleet: Latest) -> None:
    body = generate_latest(registry(fleet))
    res = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=body, capture_output=True, timeout=60
    )
    assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()
    assert res.stdout.decode().strip() == "" and res.stderr.decode().strip() == ""
    # Every family we promise, from the extensions of PostgreSQL 15 too.
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    for expected in ("pgfleet_wait_event_samples", "pgfleet_io_reads", "pgfleet_statement_info"):
        assert expected in names


def test_families_are_typed_documented_and_declared(fleet: Latest) -> None:
    body = generate_latest(registry(fleet)).decode()
    declared = set(family_names())
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", body, re.M))
    helps = dict(re.findall(r"^# HELP (\S+) (.*)$", body, re.M))
    assert types and set(types) <= declared
    for name, kind in types.items():
        assert helps.get(name), f"{name} has no HELP"
        assert name.startswith("pgfleet_")
        assert (kind == "counter") == name.endswith("_total"), name
        assert kind in ("counter", "gauge")
    # Base units only: no milliseconds, no kilobytes.
    assert not [n for n in declared if re.search(r"_(ms|milliseconds|kb|kilobytes)(_|$)", n)]
    labels = {
        k for fam in text_string_to_metric_families(body) for s in fam.samples for k in s.labels
    }
    assert "server" in labels
    assert not labels & {"instance", "job"}
    # Every sample of every family names its server.
    for fam in text_string_to_metric_families(body):
        for s in fam.samples:
            assert s.labels.get("server") in {"pg15", "pg18", "pg18-again"}, s


def test_server_facts(fleet: Latest, pg15: Cluster, pg18: Cluster) -> None:
    reg = registry(fleet)
    assert (
        reg.get_sample_value("pgfleet_server_version_num", {"server": "pg15"}) == pg15.version_num
    )
    assert (
        reg.get_sample_value("pgfleet_server_version_num", {"server": "pg18"}) == pg18.version_num
    )
    assert reg.get_sample_value("pgfleet_server_in_recovery", {"server": "pg18"}) == 0


def test_family_names_are_unique() -> None:
    names = family_names()
    assert len(names) == len(set(names))
    for view in VIEWS:
        assert all(s.help.endswith(".") for s in view.series), view.module


def test_every_family_is_documented() -> None:
    """docs/metrics.md names each family, whole or as `..._suffix` after a sibling."""
    doc = (Path(__file__).parents[3] / "docs" / "metrics.md").read_text()
    short = re.findall(r"`\.\.\.(_\w+)`", doc)
    assert [n for n in family_names() if n not in doc and not n.endswith(tuple(short))] == []


def test_describe_does_not_collect() -> None:
    latest = Latest()
    collector = FleetCollector(latest)
    assert collector.describe() == []
    reg = CollectorRegistry()
    reg.register(collector)
    assert generate_latest(reg) == b""


def test_replication_lag_in_bytes_and_seconds(pg15: Cluster, pg15_standby: Cluster) -> None:
    with psycopg.connect(pg15.dsn(), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS exporter_repl (id int)")
        conn.execute("INSERT INTO exporter_repl VALUES (1)")
        # A standby reports its write, flush and replay positions some time
        # after it connected.
        deadline = time.monotonic() + 30
        while not one_row(
            conn,
            "SELECT bool_and(replay_lsn IS NOT NULL) FROM pg_stat_replication",
        )[0]:
            assert time.monotonic() < deadline, "the standby never reported its replay position"
            time.sleep(0.1)
    # And the standby learns the end of the primary's WAL from the sender's
    # next message (a fresh standby may not have had one yet).
    with psycopg.connect(pg15_standby.dsn(), autocommit=True) as standby:
        while not one_row(
            standby, "SELECT bool_and(latest_end_lsn IS NOT NULL) FROM pg_stat_wal_receiver"
        )[0]:
            assert time.monotonic() < deadline, "the standby never heard of the primary's WAL end"
            time.sleep(0.1)
    latest = Latest()
    snapshot(latest, "primary", pg15.dsn())
    snapshot(latest, "standby", pg15_standby.dsn())
    body = generate_latest(registry(latest)).decode()
    samples = [s for fam in text_string_to_metric_families(body) for s in fam.samples]
    lag = [s for s in samples if s.name == "pgfleet_replication_lag_bytes"]
    assert {s.labels["stage"] for s in lag} == {"sent", "write", "flush", "replay"}
    assert all(s.labels["server"] == "primary" and s.value >= 0 for s in lag)
    receiver = {s.name for s in samples if s.labels["server"] == "standby"}
    assert "pgfleet_wal_receiver_receive_lag_bytes" in receiver
    assert "pgfleet_wal_receiver_replay_lag_seconds" in receiver
    reg = registry(latest)
    assert reg.get_sample_value("pgfleet_server_in_recovery", {"server": "standby"}) == 1


def _exprs(dashboard: dict[str, Any]) -> list[str]:
    """Every PromQL text of a dashboard: its panels' targets, its query variables."""
    out: list[str] = []

    def panels(items: list[dict[str, Any]]) -> None:
        for panel in items:
            out.extend(t["expr"] for t in panel.get("targets", ()) if "expr" in t)
            panels(panel.get("panels", []))

    panels(dashboard["panels"])
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            out.append(var["query"]["query"] if isinstance(var["query"], dict) else var["query"])
    return out


def _family(name: str) -> str:
    """A histogram's sample name as its family's."""
    base = re.sub(r"_(bucket|sum|count)$", "", name)
    return base if base in HEALTH else name


def test_dashboard_uses_only_exported_names() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36
    exprs = _exprs(dashboard)
    assert len(exprs) > 20
    known = family_labels() | HEALTH
    used = {_family(name) for expr in exprs for name in re.findall(r"\bpgfleet_\w+", expr)}
    assert used, "no pgfleet metric in the dashboard"
    assert used - set(known) == set()
    # Label matchers name labels their family has.
    for expr in exprs:
        for name, matchers in re.findall(r"\b(pgfleet_\w+)\{([^}]*)\}", expr):
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
                assert label in known[_family(name)], f"{name} has no label {label}: {expr}"
    # Each panel has at least one query.
    for panel in dashboard["panels"]:
        if panel.get("type") != "row":
            assert panel.get("targets"), panel.get("title")


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """promtool parses every query, Grafana's variables given typical values."""
    values = {
        "$__rate_interval": "1m",
        "$__range": "1h",
        "$topn": "10",
        "$server": ".*",
        "$dbname": ".*",
    }
    rules = []
    for i, expr in enumerate(_exprs(json.loads(DASHBOARD.read_text()))):
        if expr.startswith("label_values("):
            continue
        for var, value in values.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, expr
        rules.append({"record": f"dashboard:query:{i}", "expr": expr})
    path = tmp_path / "rules.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    res = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, timeout=60)
    assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (Debian package)")
def test_dashboard_queries_find_data_in_a_real_prometheus(fleet: Latest, tmp_path: Path) -> None:
    """A real Prometheus scrapes a fleet; every panel whose families it has finds data."""
    httpd, thread = start_http_server(0, addr="127.0.0.1", registry=registry(fleet))
    target = f"127.0.0.1:{httpd.server_address[1]}"
    with running_prometheus(tmp_path, target) as query:
        # rate() wants two samples in its window.
        deadline = time.monotonic() + 60
        scrapes = "min(count_over_time(pgfleet_server_version_num[1m])) >= 3"
        while not query(scrapes):
            assert time.monotonic() < deadline, "Prometheus did not scrape the fleet thrice"
            time.sleep(0.5)
        present = {r["metric"]["__name__"] for r in query('{__name__=~"pgfleet_.+"}')}
        values = {"$__rate_interval": "1m", "$__range": "1h", "$topn": "10"}
        values |= {"$server": ".*", "$dbname": ".*"}
        empty, checked = [], 0
        dashboard = json.loads(DASHBOARD.read_text())
        for expr in _exprs(dashboard):
            if expr.startswith("label_values("):
                continue
            names = {_family(n) for n in re.findall(r"\bpgfleet_\w+", expr)}
            if not names <= present:  # health families, or nothing of the kind here
                continue
            for var, value in values.items():
                expr = expr.replace(var, value)
            checked += 1
            if not query(expr):
                empty.append(expr)
        assert checked > 30
        # Nothing waits on these idle servers but their background processes.
        assert [e for e in empty if "pgfleet_backends_waiting" not in e] == []
    httpd.shutdown()
    thread.join(10)


# -- contrib/prometheus: alerting rules ---------------------------------------------


def test_rules_pass_promtool_and_their_own_tests() -> None:
    """`promtool check rules`, and the alerts fire as pgfleet.rules.test.yml says."""
    for command in (["check", "rules", str(RULES)], ["test", "rules", str(RULES_TESTS)]):
        res = subprocess.run([PROMTOOL, *command], capture_output=True, timeout=60)
        assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()
    # Every alert of the file has a case in the tests.
    alerts = set(re.findall(r"^\s+- alert: (\w+)", RULES.read_text(), re.M))
    tested = set(re.findall(r"alertname: (\w+)", RULES_TESTS.read_text()))
    assert len(alerts) > 15
    untested = alerts - tested
    # Prometheus's own up: what a real Prometheus makes of a target, not ours.
    assert untested == {"PgfleetCollectorDown"}


def test_rules_use_only_exported_names() -> None:
    exprs = re.findall(
        r"^\s+expr: (?:\|\n)?((?:.+\n)+?)(?=\s+(?:for|labels):)", RULES.read_text(), re.M
    )
    assert len(exprs) == len(re.findall(r"^\s+- alert: ", RULES.read_text(), re.M))
    known = family_labels() | HEALTH
    used = {_family(n) for e in exprs for n in re.findall(r"\bpgfleet_\w+", e)}
    assert used and used - set(known) == set()
    for expr in exprs:
        for name, matchers in re.findall(r"\b(pgfleet_\w+)\{([^}]*)\}", expr):
            for label in re.findall(r"(\w+)\s*(?:=~|!~|!=|=)", matchers):
                assert label in known[_family(name)], f"{name} has no label {label}: {expr}"
