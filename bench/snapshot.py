"""Remote snapshot cost with ~2,000 distinct pg_stat_statements entries.

Two embedded PostgreSQL 18 clusters: a monitored server with 2,000 distinct
statements, and a repository.  For each scenario -- every entry changing
between snapshots, and 5% of them changing -- it takes a warm-up round of
``coalesce`` snapshots, then a measured round of ``coalesce`` snapshots
(ending with an aggregation), then a plain VACUUM, and prints one line:

  median / max wall ms per remote snapshot, collector CPU ms per snapshot,
  repository bytes per snapshot (database growth over the measured round).

Usage: python bench/snapshot.py [--coalesce N] [--tables N]
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import tempfile
import time
from pathlib import Path

import psycopg

from pgfleet.cluster import Cluster
from pgfleet.collector import ServerSession, snapshot_remote
from pgfleet.config import CollectorConfig
from pgfleet.repository import schema, servers

# Ten statement shapes per table: 200 tables give 2,000 distinct queryids.
SHAPES = (
    "SELECT count(*) FROM {t}",
    "SELECT v FROM {t} WHERE id = 1",
    "SELECT count(*) FROM {t} WHERE id < 5",
    "UPDATE {t} SET v = v + 1 WHERE id = 2",
    "SELECT max(v) FROM {t}",
    "SELECT min(v) FROM {t}",
    "SELECT sum(v) FROM {t}",
    "SELECT avg(v) FROM {t}",
    "SELECT id FROM {t} ORDER BY v DESC LIMIT 1",
    "SELECT count(*) FROM {t} WHERE v > 0",
)


def workload(mon: Cluster, tables: int) -> list[str]:
    with mon.connect("bench") as conn:
        for i in range(tables):
            conn.execute(f"CREATE TABLE t{i} (id int PRIMARY KEY, v int NOT NULL DEFAULT 0)")
            conn.execute(f"INSERT INTO t{i} SELECT g, g FROM generate_series(1, 10) g")
    return [shape.format(t=f"t{i}") for i in range(tables) for shape in SHAPES]


def run_queries(conn: psycopg.Connection[tuple[object, ...]], queries: list[str]) -> None:
    with conn.pipeline():
        for q in queries:
            conn.execute(q)


async def scenario(
    repo_dsn: str,
    mon: Cluster,
    server: servers.Server,
    queries: list[str],
    share: float,
    coalesce: int,
) -> tuple[float, float, float, float, float, float]:
    cfg = CollectorConfig()
    session = ServerSession(server, cfg)
    rng = random.Random(42)
    walls: list[float] = []
    cpus: list[float] = []
    phases: list[tuple[float, float]] = []
    with mon.connect("bench") as load, psycopg.connect(repo_dsn, autocommit=True) as sync_repo:
        async with await psycopg.AsyncConnection.connect(repo_dsn, autocommit=True) as repo:
            for measured in (False, True):
                if measured:
                    sync_repo.execute("VACUUM")
                    row = sync_repo.execute(
                        "SELECT pg_database_size(current_database())"
                    ).fetchone()
                    size_before = row[0] if row else 0
                for _ in range(coalesce):
                    n = max(1, round(len(queries) * share))
                    run_queries(load, rng.sample(queries, n) if share < 1 else queries)
                    time.sleep(0.05)  # let the backend flush its statistics
                    c0, w0 = time.process_time(), time.perf_counter()
                    result = await snapshot_remote(repo, server, cfg, session=session)
                    w1, c1 = time.perf_counter(), time.process_time()
                    if result.errors:
                        raise SystemExit(f"snapshot failed: {result.errors}")
                    if measured:
                        walls.append((w1 - w0) * 1000)
                        cpus.append((c1 - c0) * 1000)
                        phases.append((result.fetch_seconds * 1000, result.store_seconds * 1000))
            sync_repo.execute("VACUUM")
            row = sync_repo.execute("SELECT pg_database_size(current_database())").fetchone()
            size_after = row[0] if row else 0
    await session.close()
    return (
        statistics.median(walls),
        max(walls),
        statistics.median(cpus),
        (size_after - size_before) / coalesce,
        statistics.median(p[0] for p in phases),
        statistics.median(p[1] for p in phases),
    )


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--coalesce", type=int, default=100)
    ap.add_argument("--tables", type=int, default=200)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="pgfleet-bench-") as tmp:
        base = Path(tmp)
        base.chmod(0o755)
        repo = Cluster.embedded(base / "repository")
        mon = Cluster.embedded(
            base / "monitored",
            shared_preload_libraries="pg_stat_statements",
            settings={"pg_stat_statements.max": 5000},
        )
        try:
            for c in (repo, mon):
                c.init()
                c.start()
            mon.create_database("bench")
            mon.create_extension("pg_stat_statements", "bench")
            queries = workload(mon, args.tables)
            figures = []
            for label, share in (("all", 1.0), ("5%", 0.05)):
                repo_dsn = repo.create_database(f"repo_{'all' if share == 1 else 'some'}")
                with psycopg.connect(repo_dsn, autocommit=True) as conn:
                    schema.upgrade(conn)
                    server = servers.add(
                        conn,
                        "bench",
                        host=mon.host,
                        port=mon.port,
                        username="postgres",
                        dbname="bench",
                        coalesce=args.coalesce,
                    )
                with mon.connect("bench") as conn:
                    conn.execute("SELECT pg_stat_statements_reset()")
                med, mx, cpu, size, fetch, store = asyncio.run(
                    scenario(repo_dsn, mon, server, queries, share, args.coalesce)
                )
                figures.append(
                    f"{label} changing: wall median {med:.1f} ms max {mx:.1f} ms "
                    f"(fetch {fetch:.1f} + store {store:.1f}), "
                    f"cpu {cpu:.1f} ms, {size / 1024:.1f} kB/snapshot"
                )
            print(
                f"snapshot ({len(queries)} statements, coalesce {args.coalesce}): "
                + "; ".join(figures),
                flush=True,
            )
        finally:
            for c in (mon, repo):
                c.stop()


if __name__ == "__main__":
    main()
