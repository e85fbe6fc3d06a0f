"""Tests of the Prometheus exporter, and what they share: real snapshots.

``snapshot()`` runs the real ``collector.fetch()`` of every built-in source on
a real server, hands the spools to ``Latest.update()`` and checks it left them
as the writer expects them (positioned at their end, whole).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry
from psycopg.conninfo import conninfo_to_dict

from pgfleet.collector.exporter.fleet import FleetCollector
from pgfleet.collector.exporter.latest import Latest
from pgfleet.config import CollectorConfig
from pgfleet.datasources import builtin
from pgfleet.demo.cluster import _free_port
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
Query = Callable[[str], list[dict[str, Any]]]


@contextlib.contextmanager
def running_prometheus(workdir: Path, target: str) -> Iterator[Query]:
    """A real Prometheus scraping ``target`` (host:port) every second; yields a
    function running an instant query through its HTTP API ([] until it answers)."""
    assert PROMETHEUS is not None
    port = _free_port()
    (workdir / "prometheus.yml").write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n  - job_name: pgfleet\n"
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

    def query(q: str) -> list[dict[str, Any]]:
        url = f"http://127.0.0.1:{port}/api/v1/query?" + urllib.parse.urlencode({"query": q})
        try:
            with urllib.request.urlopen(url, timeout=5) as r:
                data = json.load(r)
        except OSError:
            return []
        assert data["status"] == "success", (q, data)
        result: list[dict[str, Any]] = data["data"]["result"]
        return result

    try:
        yield query
    finally:
        prom.terminate()
        prom.wait(30)
        log.close()
