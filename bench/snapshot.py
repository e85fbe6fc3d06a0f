"""Remote snapshot cost with ~2,000 distinct pg_stat_statements entries: the one-shot path.

This times ``pgfleet snapshot SERVER`` in-process (or, with
PGFLEET_BENCH_STREAM=0, the daemon's fetch() and store() called in-process):
not the daemon as users run it, whose real cost, side by side with PoWA's
collector, is bench/powa.py's.

Two embedded PostgreSQL 18 clusters: a monitored server with 2,000 distinct
statements, and a repository, both vacuumed, analyzed and checkpointed
once set up (see settle()).  For each scenario -- every entry changing
between snapshots, and 5% of them changing -- it takes a warm-up round of
``coalesce`` snapshots, then a measured round of ``coalesce`` snapshots
(ending with an aggregation), then a plain VACUUM, and prints one line:

  median / max wall ms per remote snapshot, collector CPU ms per snapshot,
  repository bytes per snapshot (database growth over the measured round),
  and the bytes of pg_stat_statements history the round wrote (its
  aggregation) per statement-point: per point written when every entry
  changes; when 5% do, averaged over every entry and snapshot of the round,
  changed or not (what a snapshot of the server costs in history).

Usage: python bench/snapshot.py [--coalesce N] [--tables N] [--phases]

Each snapshot is what ``pgfleet snapshot SERVER`` takes: pg_stat_statements'
rows are COPYed into the repository while the server sends them when the
snapshot lock is free (it is, here; see collector.snapshot_remote).
PGFLEET_BENCH_STREAM=0 takes them the daemon's way instead (fetch, then store).

--phases (or PGFLEET_BENCH_PHASES=1) adds, after that line, per scenario:
the median ms of each phase of store() (stream -- from taking the lock to the
end of the fetch, when streamed --, COPY, take_snapshot, the state queries,
TRUNCATE, commit; timed by the repository's clock) and of fetch()
(each connection's batch, "@dbname", and each source -- approximate, as a
batch's results arrive as the server's output buffer fills); how often each
source was left out as unchanged; and the repository functions that took
the most time per snapshot (pg_stat_user_functions, self time).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import time

import psycopg

from pgfleet.cluster import Cluster, throwaway
from pgfleet.config import CollectorConfig
from pgfleet.repository import servers
from pgfleet.snapshot.fetch import ServerSession
from pgfleet.snapshot.stream import STREAM_HOLD, snapshot_remote

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
            conn.execute(
                f"CREATE TABLE t{i} (id int PRIMARY KEY, v int NOT NULL DEFAULT 0)"
                " WITH (autovacuum_enabled = false)"
            )
            conn.execute(f"INSERT INTO t{i} SELECT g, g FROM generate_series(1, 10) g")
    return [shape.format(t=f"t{i}") for i in range(tables) for shape in SHAPES]


def settle(conn: psycopg.Connection[tuple[object, ...]]) -> None:
    """Leave nothing of the set-up for autovacuum to do during the measures.

    A database whose 200 tables (or whose repository schema) were just
    created gets them vacuumed and analyzed by autovacuum within the next
    minute, on the same 2 cores as the snapshots being timed.  Done once
    here, as pgbench does before its runs.
    """
    conn.execute("VACUUM ANALYZE")
    conn.execute("CHECKPOINT")


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
    breakdown: list[str] | None = None,
) -> tuple[float, float, float, float, float, float, float]:
    cfg = CollectorConfig()
    session = ServerSession(server, cfg)
    hold = 0.0 if os.environ.get("PGFLEET_BENCH_STREAM", "1") == "0" else STREAM_HOLD
    rng = random.Random(42)
    walls: list[float] = []
    cpus: list[float] = []
    phases: list[tuple[float, float]] = []
    detail: dict[str, list[float]] = {}
    unchanged: dict[str, int] = {}
    with mon.connect("bench") as load, psycopg.connect(repo_dsn, autocommit=True) as sync_repo:
        async with await psycopg.AsyncConnection.connect(repo_dsn, autocommit=True) as repo:
            for measured in (False, True):
                if measured:
                    sync_repo.execute("VACUUM")
                    row = sync_repo.execute(
                        "SELECT pg_database_size(current_database())"
                    ).fetchone()
                    size_before = row[0] if row else 0
                    history_before = _statements_history(sync_repo)
                    funcs_before = _function_times(sync_repo)
                for _ in range(coalesce):
                    n = max(1, round(len(queries) * share))
                    run_queries(load, rng.sample(queries, n) if share < 1 else queries)
                    time.sleep(0.05)  # let the backend flush its statistics
                    c0, w0 = time.process_time(), time.perf_counter()
                    result = await snapshot_remote(
                        repo, server, cfg, session=session, stream_hold=hold
                    )
                    w1, c1 = time.perf_counter(), time.process_time()
                    if result.failures:
                        raise SystemExit(f"snapshot failed: {result.failures}")
                    if measured:
                        walls.append((w1 - w0) * 1000)
                        cpus.append((c1 - c0) * 1000)
                        phases.append((result.fetch_seconds * 1000, result.store_seconds * 1000))
                        for name, sec in result.phases.items():
                            detail.setdefault(name, []).append(sec * 1000)
                        for module in result.unchanged:
                            unchanged[module] = unchanged.get(module, 0) + 1
            funcs_after = _function_times(sync_repo)
            sync_repo.execute("VACUUM")
            row = sync_repo.execute("SELECT pg_database_size(current_database())").fetchone()
            size_after = row[0] if row else 0
            history_after = _statements_history(sync_repo)
            row = sync_repo.execute(
                "SELECT count(*) FROM pgfleet.pg_stat_statements_last WHERE srvid = %s",
                (server.srvid,),
            ).fetchone()
            entries = int(row[0]) if row else 0
    await session.close()
    if breakdown is not None:
        fetched = {k: v for k, v in detail.items() if k.startswith("fetch ")}
        stored = {k: v for k, v in detail.items() if not k.startswith("fetch ")}
        breakdown.append(
            "  store: " + ", ".join(f"{k} {statistics.median(v):.1f}" for k, v in stored.items())
        )
        top = sorted(fetched.items(), key=lambda kv: -statistics.median(kv[1]))
        breakdown.append(
            "  fetch: " + ", ".join(f"{k[6:]} {statistics.median(v):.1f}" for k, v in top if v)
        )
        breakdown.append(
            "  left out as unchanged (snapshots of "
            + str(coalesce)
            + "): "
            + (", ".join(f"{m} {n}" for m, n in sorted(unchanged.items())) or "none")
        )
        spent = {
            f: (funcs_after[f][0] - funcs_before.get(f, (0.0, 0.0))[0]) / coalesce
            for f in funcs_after
        }
        worst = sorted(spent.items(), key=lambda kv: -kv[1])[:12]
        breakdown.append(
            "  repository functions, self ms per snapshot (mean): "
            + ", ".join(f"{f} {ms:.1f}" for f, ms in worst if ms >= 0.05)
        )
    written = history_after[0] - history_before[0]
    # Every entry changing, the points are entries x snapshots (less the few
    # a snapshot misses); at 5%, per entry and snapshot, changed or not.
    per = history_after[1] - history_before[1] if share >= 1 else entries * coalesce
    return (
        statistics.median(walls),
        max(walls),
        statistics.median(cpus),
        (size_after - size_before) / coalesce,
        statistics.median(p[0] for p in phases),
        statistics.median(p[1] for p in phases),
        written / per if per > 0 else float("nan"),
    )


def _statements_history(conn: psycopg.Connection[tuple[object, ...]]) -> tuple[int, int]:
    """Bytes of pg_stat_statements history (every partition, its TOAST and
    indexes) and statement-points in it (the set bits of each row's ``at``)."""
    row = conn.execute(
        "SELECT (SELECT coalesce(sum(pg_total_relation_size(relid)), 0)"
        "          FROM pg_partition_tree('pgfleet.pg_stat_statements_history')),"
        " (SELECT coalesce(sum(length(replace(at::text, '0', ''))), 0)"
        "    FROM pgfleet.pg_stat_statements_history)"
    ).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)  # type: ignore[call-overload]


def _function_times(conn: psycopg.Connection[tuple[object, ...]]) -> dict[str, tuple[float, float]]:
    """Self and total ms of every repository function so far (track_functions)."""
    conn.execute("SELECT pg_stat_clear_snapshot()")
    rows = conn.execute(
        "SELECT funcname, self_time, total_time FROM pg_stat_user_functions"
    ).fetchall()
    return {str(r[0]): (float(r[1]), float(r[2])) for r in rows}  # type: ignore[arg-type]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--coalesce", type=int, default=100)
    ap.add_argument("--tables", type=int, default=200)
    ap.add_argument(
        "--phases",
        action="store_true",
        default=os.environ.get("PGFLEET_BENCH_PHASES", "") not in ("", "0"),
        help="also print a per-phase breakdown (median ms per snapshot)",
    )
    args = ap.parse_args()
    with throwaway() as tw:
        mon = tw.cluster(
            "monitored",
            shared_preload_libraries="pg_stat_statements",
            settings={"pg_stat_statements.max": 5000},
        )
        mon.create_database("bench")
        mon.create_extension("pg_stat_statements", "bench")
        queries = workload(mon, args.tables)
        with mon.connect("bench") as conn:
            settle(conn)
        figures = []
        breakdown: list[str] | None = [] if args.phases else None
        for label, share in (("all", 1.0), ("5%", 0.05)):
            repo_dsn = tw.new_repository(f"repo_{'all' if share == 1 else 'some'}")
            with psycopg.connect(repo_dsn, autocommit=True) as conn:
                settle(conn)
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
            if breakdown is not None:
                breakdown.append(f"{label} changing:")
            med, mx, cpu, size, fetch, store, per_point = asyncio.run(
                scenario(repo_dsn, mon, server, queries, share, args.coalesce, breakdown)
            )
            figures.append(
                f"{label} changing: wall median {med:.1f} ms max {mx:.1f} ms "
                f"(fetch {fetch:.1f} + store {store:.1f}), "
                f"cpu {cpu:.1f} ms, {size / 1024:.1f} kB/snapshot, "
                f"history {per_point:.1f} B/statement-point" + (" (averaged)" if share < 1 else "")
            )
        path = (
            "daemon's fetch then store"
            if os.environ.get("PGFLEET_BENCH_STREAM", "1") == "0"
            else "one-shot `pgfleet snapshot`, streamed"
        )
        print(
            f"snapshot ({len(queries)} statements, coalesce {args.coalesce}; {path} path,"
            " in-process; the daemon's real cost: bench/powa.py): " + "; ".join(figures),
            flush=True,
        )
        if breakdown is not None:
            print("\n".join(breakdown), flush=True)


if __name__ == "__main__":
    main()
