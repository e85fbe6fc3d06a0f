"""The collector's HTTP endpoint, served by a real daemon, read by real tools.

promtool checks what /metrics says; a real Prometheus server scrapes it and
answers a query about it; a removed server's series leave the next scrape.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import random
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgfleet.cluster import Cluster
from pgfleet.collector.exporter.endpoint import stream
from tests.collector.exporter import (
    PROMETHEUS,
    get,
    running_prometheus,
    samples,
    servers_in,
    value,
)
from tests.fix_clusters import NewCluster, NewDatabase
from tests.fix_daemon import DaemonFactory, wait_until
from tests.fix_repository import RunCli, add_server, new_repository

PROMTOOL = shutil.which("promtool")
RULES = Path(__file__).parents[3] / "contrib" / "prometheus" / "pgfleet.rules.yml"


@pytest.fixture
def repo(repo_cluster: Cluster, new_database: NewDatabase) -> str:
    return new_repository(repo_cluster, new_database)


def test_metrics_overview_and_refusals(
    repo: str, run_cli: RunCli, daemon: DaemonFactory, mon: Cluster
) -> None:
    """/metrics in both formats, / as escaped HTML, 403 elsewhere, GET and HEAD only."""
    add_server(run_cli, "db1", mon.dsn(), "--frequency", "1")
    # Its error message quotes the database name: markup, for the overview.
    add_server(run_cli, "bad", mon.dsn(), "--frequency", "1", "--dbname", "<b>nope</b>")
    d = daemon(repo)
    url = d.exporter_url
    wait_until(lambda: value(url, "pgfleet_up", server="db1") == 1.0, 20, "pgfleet_up to be 1")
    wait_until(lambda: value(url, "pgfleet_up", server="bad") == 0.0, 20, "pgfleet_up to be 0")
    wait_until(
        lambda: value(url, "pgfleet_database_xact_commit_total", server="db1"),
        20,
        "a source's counter",
    )
    assert (value(url, "pgfleet_errors_total", server="bad", kind="connect") or 0) >= 1

    status, headers, body = get(url, "/metrics")
    assert status == 200
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    text = body.decode()
    assert (
        "# HELP pgfleet_up " in text
        and "# TYPE pgfleet_snapshot_duration_seconds histogram" in text
    )
    assert "pgfleet_build_info{" in text

    status, headers, body = get(
        url, "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert status == 200
    assert headers["content-type"].startswith("application/openmetrics-text")
    assert body.decode().rstrip().endswith("# EOF")

    status, headers, body = get(url, "/metrics", method="HEAD")
    assert status == 200 and body == b""

    status, headers, body = get(url, "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    page = body.decode()
    assert "&lt;b&gt;nope&lt;/b&gt;" in page and "<b>nope</b>" not in page
    assert "db1" in page
    assert d.name in page

    for path in ("/metrics/", "/favicon.ico", "/debug", "/../etc/passwd"):
        assert get(url, path)[0] == 403, path
    status, headers, _ = get(url, "/metrics", method="POST")
    assert status == 405 and headers["allow"] == "GET, HEAD"
    assert d.stop() == 0


def test_large_scrape_is_chunked_and_compressed(
    repo: str, run_cli: RunCli, daemon: DaemonFactory, mon: Cluster
) -> None:
    """Many servers' worth: chunked transfer, gzip when asked, same samples either way."""
    for i in range(12):
        add_server(run_cli, f"s{i:02d}", mon.dsn(), "--frequency", "1")
    d = daemon(repo)
    url = d.exporter_url
    wait_until(lambda: len(servers_in(url)) == 12, 30, "12 servers in the scrape")
    wait_until(
        lambda: len(get(url, "/metrics")[2]) > 64 * 1024, 30, "a scrape larger than one chunk"
    )
    status, headers, body = get(url, "/metrics")
    assert status == 200
    assert headers.get("transfer-encoding") == "chunked" and "content-length" not in headers
    status, headers, zipped = get(url, "/metrics", headers={"Accept-Encoding": "gzip"})
    assert headers.get("content-encoding") == "gzip"
    assert len(zipped) < len(body) / 4
    assert gzip.decompress(zipped).count(b"\n") > 1000
    assert d.stop() == 0


def test_a_large_body_streams_in_parts_plain_or_gzipped() -> None:
    """The parts as one body, never joined whole: chunks of about 64 kB, or gzip
    of a megabyte at a time that decompresses to the very body."""
    rnd = random.Random(7)
    parts = [
        "".join(rnd.choice("abc{}=\"\n ") for _ in range(rnd.choice((10, 3000, 300_000)))).encode()
        for _ in range(40)
    ] + [b"", b"# EOF\n"]
    body = b"".join(parts)

    async def read(gzipped: bool) -> list[bytes]:
        return [chunk async for chunk in stream(parts, gzipped)]

    chunks = asyncio.run(read(False))
    assert b"".join(chunks) == body
    assert all(len(c) < 64 * 1024 + 300_000 for c in chunks) and len(chunks) > 10
    zipped = asyncio.run(read(True))
    assert gzip.decompress(b"".join(zipped)) == body
    assert len(zipped) > 2  # a megabyte at a time, then the end


@pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (Debian package prometheus)")
def test_promtool_accepts_the_scrape(
    repo: str, run_cli: RunCli, daemon: DaemonFactory, mon: Cluster, pg15: Cluster
) -> None:
    """`promtool check metrics` on a real scrape of PG 18 and PG 15 (with its extensions)."""
    pg15.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    add_server(run_cli, "pg18", mon.dsn(), "--frequency", "1")
    add_server(run_cli, "pg15", pg15.dsn(), "--frequency", "1")
    d = daemon(repo)
    url = d.exporter_url
    wait_until(lambda: servers_in(url) >= {"pg18", "pg15"}, 30, "both servers in the scrape")
    # Two snapshots each: counters and histograms with history.
    wait_until(
        lambda: (value(url, "pgfleet_snapshots_total", server="pg15", outcome="stored") or 0) >= 2,
        30,
        "two snapshots of pg15",
    )
    _, _, body = get(url, "/metrics")
    assert PROMTOOL is not None
    res = subprocess.run(
        [PROMTOOL, "check", "metrics"], input=body, capture_output=True, timeout=60
    )
    assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()
    assert res.stdout.decode().strip() == "" and res.stderr.decode().strip() == "", (
        res.stdout.decode() + res.stderr.decode()
    )
    assert d.stop() == 0


def test_removed_server_leaves_the_scrape(
    repo: str, run_cli: RunCli, daemon: DaemonFactory, mon: Cluster
) -> None:
    add_server(run_cli, "keep", mon.dsn(), "--frequency", "1")
    add_server(run_cli, "gone", mon.dsn(), "--frequency", "1")
    d = daemon(repo)
    url = d.exporter_url
    wait_until(lambda: servers_in(url) == {"keep", "gone"}, 30, "both servers in the scrape")
    wait_until(
        lambda: value(url, "pgfleet_database_xact_commit_total", server="gone"),
        20,
        "a source's counter of 'gone'",
    )
    res = run_cli("server", "remove", "gone")
    assert res.rc == 0, res.err
    wait_until(lambda: servers_in(url) == {"keep"}, 20, "'gone' to leave the scrape")
    # And it stays gone (no worker left behind to bring it back).
    time.sleep(2)
    assert "gone" not in servers_in(url)
    assert d.stop() == 0


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (Debian package)")
def test_real_prometheus_scrapes_the_collector(
    repo: str, run_cli: RunCli, daemon: DaemonFactory, mon: Cluster, tmp_path: Path
) -> None:
    """Prometheus scrapes a collector and evaluates contrib/prometheus's rules on it."""
    add_server(run_cli, "main", mon.dsn(), "--frequency", "1")
    add_server(run_cli, "bad", mon.dsn(), "--frequency", "1", "--dbname", "no_such_database")
    d = daemon(repo)
    target = d.exporter_url.removeprefix("http://")
    with running_prometheus(tmp_path, target, rules=[RULES]) as query:
        found = wait_until(
            lambda: query('pgfleet_up{server="main"}'), 60, "Prometheus to have pgfleet_up"
        )
        assert found[0]["metric"]["job"] == "pgfleet"
        assert found[0]["value"][1] == "1"
        # The target is healthy, and a source counter made it through too.
        assert wait_until(lambda: query(f'up{{instance="{target}"}} == 1'), 30, "target up")
        commits = wait_until(
            lambda: query('pgfleet_database_xact_commit_total{server="main"}'), 30, "commits"
        )
        assert float(commits[0]["value"][1]) > 0

        # Every rule loaded and evaluated without an error, on real series.
        def evaluated() -> list[dict[str, Any]]:
            groups = query.api("/rules") or {"groups": []}
            rules: list[dict[str, Any]] = [r for g in groups["groups"] for r in g["rules"]]
            # Not evaluated yet: the zero time.
            done = rules and all(not r["lastEvaluation"].startswith("0001") for r in rules)
            return rules if done else []

        rules = wait_until(evaluated, 30, "every rule to be evaluated")
        assert len(rules) == len(re.findall(r"^\s+- alert: ", RULES.read_text(), re.M))
        assert [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"] == []
        # The unreachable server's alert is on its way (it fires after 5 minutes).
        pending = wait_until(
            lambda: query('ALERTS{alertname="PgfleetServerDown"}'), 30, "PgfleetServerDown"
        )
        assert [(a["metric"]["server"], a["metric"]["alertstate"]) for a in pending] == [
            ("bad", "pending")
        ]
        # Settings, postmaster and the collector's own process made it through.
        for q in (
            'pgfleet_setting{server="main", name="max_connections"}',
            'pgfleet_postmaster_start_timestamp_seconds{server="main"}',
            f'process_resident_memory_bytes{{instance="{target}"}}',
        ):
            assert wait_until(functools.partial(query, q), 30, q)
    assert d.stop() == 0


def test_stopped_server_leaves_its_health_alone(
    repo: str, run_cli: RunCli, daemon: DaemonFactory, new_cluster: NewCluster
) -> None:
    """A server that stops answering: its statistics leave the scrape at once,
    pgfleet_up says 0, its last snapshot's time stays; back, they are back."""
    server = new_cluster("stops")
    add_server(run_cli, "stops", server.dsn(), "--frequency", "1")
    d = daemon(repo)
    url = d.exporter_url

    def statistics() -> set[str]:
        return {
            n
            for (n, ls) in samples(url)
            if ("server", "stops") in ls
            and n.startswith(
                ("pgfleet_database_", "pgfleet_server_", "pgfleet_setting", "pgfleet_backends")
            )
        }

    wait_until(lambda: "pgfleet_database_xact_commit_total" in statistics(), 30, "statistics")
    assert value(url, "pgfleet_up", server="stops") == 1
    assert value(url, "pgfleet_snapshot_interval_seconds", server="stops") == 1
    # The collector's own process.
    assert (value(url, "process_cpu_seconds_total") or 0) > 0
    assert (value(url, "process_resident_memory_bytes") or 0) > 0

    server.stop()
    wait_until(lambda: value(url, "pgfleet_up", server="stops") == 0, 30, "pgfleet_up to be 0")
    assert statistics() == set()
    last = value(url, "pgfleet_last_snapshot_timestamp_seconds", server="stops")
    assert last is not None and last > 0
    time.sleep(2)  # and they stay away
    assert statistics() == set()
    assert value(url, "pgfleet_last_snapshot_timestamp_seconds", server="stops") == last

    server.start()
    wait_until(lambda: "pgfleet_database_xact_commit_total" in statistics(), 60, "statistics back")
    assert value(url, "pgfleet_up", server="stops") == 1
    assert d.stop() == 0


def test_statement_counter_survives_a_reset(
    repo: str, run_cli: RunCli, daemon: DaemonFactory, pg18: Cluster, new_database: NewDatabase
) -> None:
    """pg_stat_statements_reset() on the server: the exported _total does not drop."""
    mon = new_database(pg18)
    add_server(run_cli, "main", mon, "--frequency", "1")

    def work(n: int) -> str:
        with psycopg.connect(mon, autocommit=True) as conn:
            for _ in range(n):
                conn.execute("SELECT count(*) FROM pg_class /* pgfleet reset probe */")
            row = conn.execute(
                "SELECT queryid::text FROM pg_stat_statements"
                " WHERE query LIKE '%pgfleet reset probe%' AND toplevel"
            ).fetchone()
        assert row is not None
        return str(row[0])

    queryid = work(20)
    # Uncapped: the session's cluster holds other tests' busier statements.
    d = daemon(repo, exporter={"max_statements": 100_000})
    url = d.exporter_url

    def calls() -> float | None:
        return value(url, "pgfleet_statement_calls_total", queryid=queryid, server="main")

    before = wait_until(lambda: (calls() or 0) >= 20 and calls(), 30, "the probe's calls")
    pg18.execute("SELECT pg_stat_statements_reset()")
    assert work(5) == queryid
    # Sampled across several snapshots: never below what was exported before.
    seen: list[float] = []
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline and (not seen or seen[-1] < before + 5):
        v = calls()
        if v is not None:
            seen.append(v)
        time.sleep(0.3)
    assert seen and min(seen) >= before, (before, seen)
    assert seen[-1] >= before + 5, (before, seen)
    assert d.stop() == 0
