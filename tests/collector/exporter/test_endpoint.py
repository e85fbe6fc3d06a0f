"""The collector's HTTP endpoint, served by a real daemon, read by real tools.

promtool checks what /metrics says; a real Prometheus server scrapes it and
answers a query about it; a removed server's series leave the next scrape.
"""

from __future__ import annotations

import http.client
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from pgfleet.demo.cluster import Cluster
from tests.collector.exporter import PROMETHEUS, running_prometheus
from tests.fix_clusters import NewDatabase
from tests.fix_daemon import DaemonFactory, wait_until
from tests.fix_repository import RunCli, add_server, new_repository

PROMTOOL = shutil.which("promtool")


@pytest.fixture
def repo(repo_cluster: Cluster, new_database: NewDatabase) -> str:
    return new_repository(repo_cluster, new_database)


def get(
    url: str, path: str, method: str = "GET", headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    """(status, headers, body) of one request, on a fresh connection."""
    u = urllib.parse.urlsplit(url)
    assert u.hostname is not None, url
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        r = conn.getresponse()
        return r.status, {k.lower(): v for k, v in r.getheaders()}, r.read()
    finally:
        conn.close()


def samples(url: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a scrape, by name and sorted labels; none before it listens."""
    try:
        status, _, body = get(url, "/metrics")
    except ConnectionRefusedError:
        return {}
    assert status == 200
    out = {}
    for fam in text_string_to_metric_families(body.decode()):
        for s in fam.samples:
            out[s.name, tuple(sorted(s.labels.items()))] = s.value
    return out


def value(url: str, name: str, **labels: str) -> float | None:
    for (n, ls), v in samples(url).items():
        if n == name and all((k, val) in ls for k, val in labels.items()):
            return v
    return None


def servers_in(url: str) -> set[str]:
    return {dict(ls).get("server", "") for (_, ls) in samples(url)} - {""}


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
    import gzip

    assert len(zipped) < len(body) / 4
    assert gzip.decompress(zipped).count(b"\n") > 1000
    assert d.stop() == 0


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
    add_server(run_cli, "main", mon.dsn(), "--frequency", "1")
    d = daemon(repo)
    target = d.exporter_url.removeprefix("http://")
    with running_prometheus(tmp_path, target) as query:
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
