"""Scrape cost of the exporter's fleet families, 200 servers' worth of snapshots in memory.

One embedded PostgreSQL 18 with ~2,000 distinct pg_stat_statements entries
over a few dozen tables is snapshotted twice for real (every built-in
source, ``collector.fetch()``), with a workload in between.  Both rounds are
fed to one ``Latest`` under each of N aliases, so that every counter has a
history; then scrapes are timed as the daemon's endpoint builds them
(``Endpoint.body``: each server rendered by prometheus_client once per
snapshot, laid out per family at scrape time):

- warm: no server snapshotted since the last scrape (each server is parsed
  and rendered at the first scrape after its snapshot, then kept);
- 25% new: a quarter of the servers snapshotted since the last scrape and
  not rendered yet (a 60 s snapshot frequency under a 15 s scrape);
- all new: every server changed, the first scrape of a format;
- and, for comparison, ``generate_latest()`` of the whole fleet at once.

Prints one line: series and body size per scrape, those medians, gzip time,
the CPU ``Latest.update`` takes per snapshot (a copy of the bytes the exporter
reads: the parse happens at the next scrape), and the memory the fleet's
latest values take.

Usage: python bench/scrape.py [--servers N] [--tables N] [--max-statements N] [--max-tables N]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import gzip
import io
import statistics
import tempfile
import time
from pathlib import Path

import psycopg
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from snapshot import SHAPES, run_queries

from pgfleet.cluster import Cluster
from pgfleet.collector.exporter.endpoint import Endpoint
from pgfleet.collector.exporter.fleet import FleetCollector
from pgfleet.collector.exporter.latest import Latest
from pgfleet.collector.exporter.rendered import Rendered
from pgfleet.config import CollectorConfig
from pgfleet.datasources import builtin
from pgfleet.repository.servers import Server
from pgfleet.snapshot.fetch import ServerSession, fetch
from pgfleet.snapshot.model import RegisteredSource, ServerInfo, SnapshotResult, Staged

BAR_MS = 100.0
STATEMENTS = 2000


def workload(mon: Cluster, tables: int) -> list[str]:
    """``tables`` tables, and as many statement shapes on each as make ~2,000 statements."""
    # SHAPES, then a growing chain of predicates: each length is a new queryid.
    per_table = max(len(SHAPES), STATEMENTS // tables)
    chains = [
        "SELECT count(*) FROM {t} WHERE " + " AND ".join(["id > 0"] * k)
        for k in range(1, per_table - len(SHAPES) + 1)
    ]
    with mon.connect("bench") as conn:
        for i in range(tables):
            conn.execute(f"CREATE TABLE t{i} (id int PRIMARY KEY, v int NOT NULL DEFAULT 0)")
            conn.execute(f"INSERT INTO t{i} SELECT g, g FROM generate_series(1, 10) g")
    return [s.format(t=f"t{i}") for i in range(tables) for s in (*SHAPES, *chains)]


async def fetch_round(mon: Cluster) -> tuple[ServerInfo, dict[RegisteredSource, bytes]]:
    server = Server(srvid=1, alias="bench", host=mon.host, port=mon.port, username="postgres",
                    dbname="bench")  # fmt: skip
    sources = [
        RegisteredSource(ds.module, ds.src_function, ds.cleanup, False, ds.priority)
        for ds in builtin().values()
    ]
    session = ServerSession(server, CollectorConfig())
    result = SnapshotResult(server.alias, server.srvid)
    try:
        info, staged = await fetch(session, sources, result)
    finally:
        await session.close()
    if result.failures:
        raise SystemExit(f"fetch failed: {result.failures}")
    out = {}
    for st in staged:
        st.spool.seek(0)
        out[st.source] = st.spool.read()
        st.spool.close()
    return info, out


def as_staged(spools: dict[RegisteredSource, bytes]) -> list[Staged]:
    """Spools as fetch() leaves them: whole, positioned at their end."""
    staged = []
    for src, data in spools.items():
        buf = io.BytesIO(data)
        buf.seek(0, io.SEEK_END)
        staged.append(Staged(src, buf))
    return staged


def rss_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--servers", type=int, default=200)
    ap.add_argument("--tables", type=int, default=40)
    ap.add_argument("--scrapes", type=int, default=20)
    defaults = Latest()
    ap.add_argument("--max-statements", type=int, default=defaults.max_statements)
    ap.add_argument("--max-tables", type=int, default=defaults.max_tables)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="pgfleet-bench-") as tmp:
        base = Path(tmp)
        base.chmod(0o755)
        mon = Cluster.embedded(
            base / "monitored",
            shared_preload_libraries="pg_stat_statements",
            settings={"pg_stat_statements.max": 5000},
        )
        try:
            mon.init()
            mon.start()
            mon.create_database("bench")
            mon.create_extension("pg_stat_statements", "bench")
            queries = workload(mon, args.tables)
            rounds = []
            with mon.connect("bench") as load:
                for share in (1, 3):
                    for _ in range(share):
                        run_queries(load, queries)
                    # Let the backend flush its table statistics.
                    load.execute("SELECT pg_stat_force_next_flush()")
                    time.sleep(1.5)
                    rounds.append(asyncio.run(fetch_round(mon)))
            with psycopg.connect(mon.dsn("bench")) as conn:
                row = conn.execute("SELECT count(*) FROM pg_stat_statements").fetchone()
                statements = row[0] if row else 0
        finally:
            mon.stop()

    aliases = [f"db{i:04d}.example" for i in range(args.servers)]
    latest = Latest(max_statements=args.max_statements, max_tables=args.max_tables)
    gc.collect()
    rss0 = rss_kb()
    cpus = []
    t0 = time.time()
    for n, (info, spools) in enumerate(rounds):
        for alias in aliases:
            staged = as_staged(spools)
            c0 = time.process_time()
            latest.update(alias, t0 + 60 * n, info, staged)
            cpus.append((time.process_time() - c0) * 1000)
    gc.collect()
    mem_mb = (rss_kb() - rss0) / 1024

    rendered = Rendered(latest)
    endpoint = Endpoint(CollectorRegistry(), lambda: ("bench", []), rendered)

    # One event loop for every scrape, as in the daemon.  (asyncio.run per
    # scrape costs ~100 ms here on Python 3.11: restoring its SIGINT handler
    # formats the repr of the finished task, 19 MB of body in it.)
    loop = asyncio.new_event_loop()

    def scrape() -> tuple[float, bytes]:
        w0 = time.perf_counter()
        body, content_type = loop.run_until_complete(endpoint.body(""))
        assert content_type == CONTENT_TYPE_PLAIN_0_0_4
        return (time.perf_counter() - w0) * 1000, body

    info, spools = rounds[-1]
    cold, warm, quarter, zipped = [], [], [], []
    for n in range(max(3, args.scrapes // 5)):
        # Every server changed: each rendered at this scrape.
        for alias in aliases:
            latest.update(alias, t0 + 120 + n, info, as_staged(spools))
        cold.append(scrape()[0])
    for n in range(args.scrapes):
        warm.append(scrape()[0])
        g0 = time.perf_counter()
        gzip.compress(scrape()[1], 1)
        zipped.append((time.perf_counter() - g0) * 1000)
        for alias in aliases[n % 4 :: 4]:
            latest.update(alias, t0 + 200 + n, info, as_staged(spools))
        quarter.append(scrape()[0])
    _, body = scrape()

    registry = CollectorRegistry()
    registry.register(FleetCollector(latest))
    whole = []
    for _ in range(3):
        w0 = time.perf_counter()
        generate_latest(registry)
        whole.append((time.perf_counter() - w0) * 1000)

    series = sum(1 for line in body.splitlines() if line and not line.startswith(b"#"))
    med = statistics.median(warm)
    print(
        f"scrape ({args.servers} servers x {statements} statements, {args.tables} tables; "
        f"caps {args.max_statements}/{args.max_tables}): {series} series, "
        f"{len(body) / 1e6:.1f} MB; median warm {med:.0f} ms (max {max(warm):.0f}), "
        f"25% new {statistics.median(quarter):.0f} ms, all new {statistics.median(cold):.0f} ms, "
        f"gzip +{statistics.median(zipped):.0f} ms (in a thread); "
        f"whole fleet at once {statistics.median(whole):.0f} ms; "
        f"update cpu median {statistics.median(cpus[len(aliases) :]):.2f} ms/snapshot; "
        f"latest values ~{mem_mb:.0f} MB; "
        f"bar {BAR_MS:.0f} ms {'met' if med <= BAR_MS else 'NOT met'} (warm)",
        flush=True,
    )


if __name__ == "__main__":
    main()
