"""The web UI's pages over a week of history: server time of each page's JSON.

Fills a repository (embedded PostgreSQL 18) with 7 days of 5-minute snapshots of
one server with 2,000 statements (pg_stat_statements and pg_stat_kcache), as
aggregation leaves them (coalesce 100: one history row per entry per ~8 hours,
partitioned by day, the last hour and a half not yet aggregated; written by
pgfleet.metric_aggregate() itself, window by window, from points put where
snapshots leave them), plus 8 databases, 100 tables, 150 indexes, wait events,
I/O, WAL, checkpoints, sessions, settings and a standby; then asks the app
in-process (no network) for each page's JSON over the last day and the last
week, 15 times each, and prints the median server time per page.  The server,
database and query pages include pg_stat_kcache's charts and tables; the
period comparisons compare the range with itself (``against=custom``): two
whole ranges of history read, the worst case.  Index advice and plans ask a
monitored server, so they are not measured here.  Bar: 300 ms.

Usage: python bench/ui.py [--statements N] [--runs N] [--dsn DSN | --keep DIR]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import statistics
import time
from pathlib import Path
from typing import Any

import psycopg

from pgfleet.cluster import Cluster, throwaway
from pgfleet.repository import servers

WINDOWS = 20  # of 100 snapshots, 500 minutes each: a week less the last 80 minutes
CURRENT = 16  # snapshots since the last aggregation, 5 minutes apart

# module -> (entries, {key: SQL of k}, {column: SQL of k and i (the snapshot number)})
SOURCES: dict[str, tuple[int, dict[str, str], dict[str, str]]] = {
    "pg_stat_statements": (
        0,  # --statements
        {"datname": "'app'", "rolname": "'app'", "toplevel": "true", "queryid": "k"},
        {
            "calls": "10 + (k + i) % 7",
            "rows": "10",
            "shared_blks_hit": "100",
            "shared_blks_read": "nullif((k * i) % 3, 0)",
            "temp_blks_written": "nullif((k * i) % 50, 0)",
            "wal_bytes": "nullif((k % 5) * 100, 0)",
            "total_exec_time": "1.5 + (i % 5) + (k % 13)",
        },
    ),
    "pg_stat_kcache": (
        0,  # --statements, with pg_stat_statements' keys
        {"datname": "'app'", "rolname": "'app'", "toplevel": "true", "queryid": "k"},
        {
            "exec_user_time": "0.001 * (1 + (k + i) % 5)",
            "exec_system_time": "0.0002 * (1 + k % 3)",
            "exec_reads": "nullif((k * i) % 4, 0) * 8192",
            "exec_writes": "nullif((k * i) % 9, 0) * 8192",
        },
    ),
    "pg_stat_database": (
        8,
        {"datname": "CASE k WHEN 1 THEN 'app' ELSE 'db' || k END"},
        {
            "xact_commit": "1000 + i",
            "xact_rollback": "nullif(i % 3, 0)",
            "blks_hit": "50000",
            "blks_read": "500 + i % 10",
            "tup_returned": "20000",
            "tup_inserted": "100",
            "temp_bytes": "nullif((i % 10) * 8192, 0)",
            "numbackends": "10 + k",
        },
    ),
    "pg_stat_bgwriter": (
        1,
        {},
        {
            "checkpoints_timed": "nullif((i % 2), 0)",
            "buffers_checkpoint": "300 + i",
            "buffers_clean": "50",
            "buffers_alloc": "1000",
            "checkpoint_write_time": "2000.0",
        },
    ),
    "pg_stat_wal": (
        1,
        {},
        {"wal_records": "5000 + i", "wal_fpi": "200", "wal_bytes": "4000000 + i * 100"},
    ),
    "pg_stat_io": (
        30,
        {"backend_type": "'type' || k % 6", "object": "'relation'", "context": "'ctx' || k"},
        {"reads": "10 + k", "writes": "5", "extends": "1", "hits": "1000"},
    ),
    "pg_wait_sampling": (
        1000,
        {"event_type": "'Type' || k % 5", "event": "'Event' || k % 20", "queryid": "k % 2000"},
        {"count": "1 + (k + i) % 4"},
    ),
    "pg_stat_user_tables": (
        100,
        {"datname": "'app'", "schemaname": "'public'", "relname": "'table' || k"},
        {
            "seq_scan": "k % 3",
            "seq_tup_read": "(k % 3) * 1000",
            "idx_scan": "50",
            "n_tup_ins": "5",
            "heap_blks_hit": "500",
            "heap_blks_read": "5",
            "size": "k * 8192000",
            "n_live_tup": "k * 1000",
        },
    ),
    "pg_stat_user_indexes": (
        150,
        {
            "datname": "'app'",
            "schemaname": "'public'",
            "relname": "'table' || k % 100",
            "indexrelname": "'index' || k",
        },
        {"idx_scan": "10 + k % 7", "idx_tup_read": "100", "idx_blks_hit": "50", "size": "k * 8192"},
    ),
    "replication": (
        1,
        {"application_name": "'standby1'", "client_addr": "'10.0.0.2'"},
        {"state": "'streaming'", "replay_lag_bytes": "(i % 7) * 1000", "replay_lag": "0.1"},
    ),
}


def fill(conn: psycopg.Connection[Any], srvid: int, statements: int) -> None:
    t0 = conn.execute("SELECT now() - interval '7 days'").fetchone()[0]  # type: ignore[index]
    for day in range(9):
        conn.execute(
            "SELECT pgfleet.metric_partition(m, (%s::timestamptz + %s * interval '1 day')::date)"
            " FROM pgfleet.metric_sources m(m)",
            (t0, day - 1),
        )
    params = {"srvid": srvid, "t0": t0}
    for module, (n, keys, values) in SOURCES.items():
        n = n or statements
        kcols = "".join(f"{c}, " for c in keys)
        # The snippets use % (modulo): doubled, as they go into queries with parameters.
        kexprs = "".join(f"{e}, " for e in keys.values()).replace("%", "%%")
        vcols = ", ".join(values)
        vexprs = ", ".join(values.values()).replace("%", "%%")
        points = f"""INSERT INTO pgfleet.{module}_current (srvid, {kcols} ts, {vcols})
                     SELECT %(srvid)s, {kexprs} %(start)s::timestamptz + i * interval '5 minutes',
                            {vexprs}
                       FROM generate_series(1, {n}) k, generate_series(0, %(points)s - 1) i"""
        # The history as the collector's aggregations write it, window by
        # window: each window's points wait in <m>_current, then one call
        # packs them (keys and snapshot times shared, values as text).
        for w in range(WINDOWS):
            start = t0 + datetime.timedelta(minutes=500 * w)
            conn.execute(points, {**params, "start": start, "points": 100})
            conn.execute("SELECT pgfleet.metric_aggregate(%s, %s)", (module, srvid))
            # As autovacuum does between aggregations: without it, each window
            # takes new pages, and the snapshots left waiting below would sit
            # at the end of a table of 20 windows' empty pages, which the
            # readers scan.
            conn.execute(f"VACUUM pgfleet.{module}_current")
        start = t0 + datetime.timedelta(minutes=500 * WINDOWS)
        conn.execute(points, {**params, "start": start, "points": CURRENT})
        conn.execute(
            f"""INSERT INTO pgfleet.{module}_last (srvid, {kcols} ts)
                SELECT %(srvid)s, {kexprs} now() FROM generate_series(1, {n}) k
                ON CONFLICT DO NOTHING""",
            params,
        )
        conn.execute("SELECT pgfleet.metric_rollup_rebuild(%s)", (module,))
    conn.execute(
        """INSERT INTO pgfleet.pg_stat_statements_once
               (srvid, datname, rolname, toplevel, queryid, first_seen, query)
           SELECT %(srvid)s, 'app', 'app', true, k, %(t0)s,
                  'SELECT a, b, c FROM table' || k %% 100 || ' WHERE id = $1 AND status IN ($2, $3)'
                  || repeat(' AND x = $4', k %% 20)
             FROM generate_series(1, %(n)s) k""",
        {**params, "n": statements},
    )
    # Sessions per state: a gauge rollup, written at every snapshot.
    conn.execute(
        """INSERT INTO pgfleet.pg_stat_activity_rollup
               (srvid, datname, state, wait_event_type, ts, count)
           SELECT %(srvid)s, 'app', s.state, s.wait, %(t0)s::timestamptz + i * interval '5 minutes',
                  s.n + i %% 3
             FROM generate_series(0, 2015) i,
                  (VALUES ('active', NULL, 2), ('active', 'Lock', 1), ('idle', 'Client', 10),
                          ('idle in transaction', 'Client', 1)) s(state, wait, n)""",
        params,
    )
    # Settings: every one at the first snapshot, three changes later.
    conn.execute(
        """INSERT INTO pgfleet.settings_current (srvid, name, ts, setting, unit, source,
                                                 pending_restart)
           SELECT %(srvid)s, 'setting' || k, %(t0)s, 'value', NULL, 'default', false
             FROM generate_series(1, 350) k""",
        params,
    )
    conn.execute("SELECT pgfleet.metric_aggregate('settings', %s)", (srvid,))
    conn.execute(
        """INSERT INTO pgfleet.settings_current (srvid, name, ts, setting, unit, source,
                                                 pending_restart)
           SELECT %(srvid)s, 'setting' || k, now() - k * interval '1 day', 'changed', NULL,
                  'configuration file', false
             FROM generate_series(1, 3) k""",
        params,
    )
    conn.execute(
        """INSERT INTO pgfleet.snapshot_state
               (srvid, snapshots, last_snapshot, server_version_num, in_recovery)
           VALUES (%(srvid)s, 2016, now(), 180001, false)""",
        params,
    )


PAGES = ["/fleet.json", "/server/{srvid}.json", "/server/{srvid}/database/app.json",
         "/server/{srvid}/query/42.json", "/server/{srvid}/compare.json",
         "/server/{srvid}/database/app/compare.json"]  # fmt: skip
RANGES = {"day": "1d", "week": "7d"}
SPANS = {"1d": datetime.timedelta(days=1), "7d": datetime.timedelta(days=7)}


def params_of(path: str, rng: str) -> dict[str, str]:
    """A page's query string: the range; for a comparison, A is B itself."""
    params = {"range": rng}
    if "/compare" in path:
        now = datetime.datetime.now(datetime.UTC)
        params.update(
            against="custom",
            a_from=f"{(now - SPANS[rng]).timestamp():.0f}",
            a_to=f"{now.timestamp():.0f}",
        )
    return params


async def measure(dsn: str, srvid: int, runs: int) -> dict[str, float]:
    import httpx

    from pgfleet.config import Config, RepositoryConfig, WebConfig
    from pgfleet.web.app import create_app

    token = "bench-token"
    cfg = Config(repository=RepositoryConfig(dsn=dsn), web=WebConfig(token=token))
    app = create_app(cfg)
    figures: dict[str, float] = {}
    transport = httpx.ASGITransport(app=app)
    async with (
        app.router.lifespan_context(app),
        httpx.AsyncClient(
            transport=transport,
            base_url="http://bench",
            headers={"Authorization": f"Bearer {token}"},
        ) as client,
    ):
        for page in PAGES:
            path = page.format(srvid=srvid)
            for label, rng in RANGES.items():
                times = []
                for n in range(runs + 1):
                    t = time.perf_counter()
                    r = await client.get(path, params=params_of(path, rng))
                    elapsed = (time.perf_counter() - t) * 1000
                    r.raise_for_status()
                    if n:  # the first warms the caches and the pool
                        times.append(elapsed)
                name = path.replace(f"/{srvid}", "").removesuffix(".json").strip("/") or "fleet"
                figures[f"{name} {label}"] = statistics.median(times)
    return figures


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--statements", type=int, default=2000)
    ap.add_argument("--runs", type=int, default=15)
    ap.add_argument("--dsn", help="use this repository (already filled) instead of a new one")
    ap.add_argument(
        "--keep",
        metavar="DIR",
        help="fill a repository in DIR and leave it (stopped); a later --keep DIR measures it"
        " again",
    )
    args = ap.parse_args()
    if args.dsn:
        with psycopg.connect(args.dsn, autocommit=True) as conn:
            srvid = servers.get(conn, "bench").srvid
        report(asyncio.run(measure(args.dsn, srvid, args.runs)), args.statements, None)
        return
    if args.keep:
        keep = Path(args.keep)
        keep.mkdir(parents=True, exist_ok=True)
        keep.chmod(0o755)
        if (keep / "filled").exists():
            # Filled by an earlier run: start it again and measure.
            repo = Cluster.embedded(keep / "repository", name="repository")
            repo.start()
            try:
                dsn = repo.dsn("repo")  # its port is new at every start
                with psycopg.connect(dsn, autocommit=True) as conn:
                    srvid = servers.get(conn, "bench").srvid
                report(asyncio.run(measure(dsn, srvid, args.runs)), args.statements, None)
            finally:
                repo.stop()
            return
    with throwaway(args.keep) as tw:
        dsn = tw.new_repository()
        with psycopg.connect(dsn, autocommit=True) as conn:
            srv = servers.add(conn, "bench", host="127.0.0.1")
            t0 = time.perf_counter()
            fill(conn, srv.srvid, args.statements)
            conn.execute("VACUUM ANALYZE")
            filled = time.perf_counter() - t0
        if args.keep:
            (Path(args.keep) / "filled").write_text(f"{filled:.0f} s\n")
        report(asyncio.run(measure(dsn, srv.srvid, args.runs)), args.statements, filled)


def report(figures: dict[str, float], statements: int, filled: float | None) -> None:
    worst = max(figures.values())
    verdict = "ok" if worst <= 300 else "OVER the 300 ms bar"
    fill = f", filled in {filled:.0f} s" if filled is not None else ""
    print(
        f"ui ({statements} statements x 2016 snapshots{fill}; median JSON server time): "
        + "; ".join(f"{k} {v:.0f} ms" for k, v in figures.items())
        + f"; worst {worst:.0f} ms ({verdict})",
        flush=True,
    )


if __name__ == "__main__":
    main()
