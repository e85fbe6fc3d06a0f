"""Tests of the Prometheus exporter, and what they share: real snapshots.

``snapshot()`` runs the real ``collector.fetch()`` of every built-in source on
a real server, hands the spools to ``Latest.update()`` and checks it left them
as the writer expects them (positioned at their end, whole).
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families
from psycopg.conninfo import conninfo_to_dict

from pgfleet.cluster import _free_port
from pgfleet.collector.exporter.fleet import FleetCollector
from pgfleet.collector.exporter.latest import Latest
from pgfleet.config import CollectorConfig
from pgfleet.datasources import builtin
from pgfleet.repository.servers import Server
from pgfleet.snapshot.fetch import ServerSession, fetch
from pgfleet.snapshot.model import RegisteredSource, ServerInfo, SnapshotResult, Staged


def sources() -> list[RegisteredSource]:
    """Every built-in source, as the repository registers them."""
    return [
        RegisteredSource(ds.module, ds.src_function, ds.cleanup, False, ds.priority)
        for ds in builtin().values()
    ]


def fetch_staged(dsn: str) -> tuple[ServerInfo, list[Staged]]:
    """Run every built-in source on the server behind ``dsn`` into spools."""
    p = conninfo_to_dict(dsn)
    server = Server(
        srvid=1,
        alias="test",
        host=str(p["host"]),
        port=int(str(p["port"])),
        username=str(p.get("user", "postgres")),
        dbname=str(p.get("dbname", "postgres")),
    )

    async def run() -> tuple[ServerInfo, list[Staged]]:
        session = ServerSession(server, CollectorConfig())
        result = SnapshotResult(server.alias, server.srvid)
        try:
            info, staged = await fetch(session, sources(), result)
        finally:
            await session.close()
        assert result.failures == [], result.failures
        return info, staged

    return asyncio.run(run())


def snapshot(
    latest: Latest,
    alias: str,
    dsn: str,
    *,
    taken_at: float | None = None,
    without: Collection[str] = (),
) -> None:
    """One real snapshot of ``dsn`` into ``latest`` as ``alias``; ``without`` sources failed."""
    info, staged = fetch_staged(dsn)
    try:
        given = [st for st in staged if st.source.module not in without]
        before = []
        for st in given:
            end = st.spool.tell()
            st.spool.seek(0)
            before.append((end, st.spool.read()))
            st.spool.seek(end)
        latest.update(alias, time.time() if taken_at is None else taken_at, info, given)
        for st, (end, data) in zip(given, before, strict=True):
            assert st.spool.tell() == end, st.source.module
            st.spool.seek(0)
            assert st.spool.read() == data, st.source.module
    finally:
        for st in staged:
            st.spool.close()


def registry(latest: Latest) -> CollectorRegistry:
    reg = CollectorRegistry()
    reg.register(FleetCollector(latest))
    return reg


PROMETHEUS = shutil.which("prometheus")


class Query:
    """A running Prometheus's HTTP API: ``query(q)`` an instant query's result,
    ``query.api(path)`` what a path under /api/v1 says ([] until it answers)."""

    def __init__(self, port: int) -> None:
        self.port = port

    def api(self, path: str, params: dict[str, str] | None = None) -> Any:
        url = f"http://127.0.0.1:{self.port}/api/v1{path}"
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                data = json.load(r)
        except OSError:
            return []
        assert data["status"] == "success", (path, params, data)
        return data["data"]

    def __call__(self, q: str) -> list[dict[str, Any]]:
        data = self.api("/query", {"query": q})
        result: list[dict[str, Any]] = data["result"] if data else []
        return result


@contextlib.contextmanager
def running_prometheus(workdir: Path, target: str, rules: Collection[Path] = ()) -> Iterator[Query]:
    """A real Prometheus scraping ``target`` (host:port) every second, evaluating
    the ``rules`` files as often."""
    assert PROMETHEUS is not None
    port = _free_port()
    rule_files = "".join(f"  - '{path}'\n" for path in rules)
    (workdir / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n"
        + (f"rule_files:\n{rule_files}" if rules else "")
        + "scrape_configs:\n  - job_name: pgfleet\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
    )
    log = (workdir / "prometheus.log").open("wb")
    prom = subprocess.Popen(
        [
            PROMETHEUS,
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield Query(port)
    finally:
        prom.terminate()
        prom.wait(30)
        log.close()


# -- Scraping a running daemon's exporter ----------------------------------------


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
