"""Reading series back: one query's and one server's over 7 days of 5-minute snapshots.

Fills a repository (embedded PostgreSQL 18) with 7 days of 5-minute snapshots of one
server with 2,000 statements, as aggregation leaves them (coalesce 100: one history
row per statement per ~8 hours, partitioned by day), plus 8 databases' worth of
pg_stat_database -- written by pgfleet.metric_aggregate() itself, window by window,
from points put where snapshots leave them; then times, as median of 20 runs each:

- one statement's calls and time per hour over the week;
- the server's transactions per hour over the week (pg_stat_database);
- the server's top 10 statements by time over the last day.

Usage: python bench/series.py [--statements N]
"""

from __future__ import annotations

import argparse
import datetime
import statistics
import time

import psycopg

from pgfleet.cluster import throwaway
from pgfleet.repository import servers

WINDOWS = 20  # of 100 snapshots, 500 minutes each: the week less its last 80 minutes

# One window's points, waiting in <m>_current as snapshots leave them; i is the
# snapshot's number in the window.  metric_aggregate() then packs them.
FILL_PGSS = """
INSERT INTO pgfleet.pg_stat_statements_current
       (srvid, ts, datname, rolname, toplevel, queryid,
        calls, rows, shared_blks_hit, shared_blks_read, total_exec_time)
SELECT %(srvid)s, %(start)s::timestamptz + i * interval '5 minutes', 'app', 'app', true, q,
       10 + (q + i) %% 7, 10, 100, nullif((q * i) %% 3, 0), 1.5 + (i %% 5)
  FROM generate_series(1, %(statements)s) q, generate_series(0, 99) i
"""

FILL_DB = """
INSERT INTO pgfleet.pg_stat_database_current (srvid, ts, datname, xact_commit, blks_hit)
SELECT %(srvid)s, %(start)s::timestamptz + i * interval '5 minutes', 'db' || d, 1000 + i, 50000
  FROM generate_series(1, 8) d, generate_series(0, 99) i
"""

QUERIES = {
    "one statement, 7 days": """
        SELECT date_trunc('hour', ts), sum(calls), sum(total_exec_time)
          FROM pgfleet.pg_stat_statements_series(%(srvid)s, now() - interval '7 days', now())
         WHERE datname = 'app' AND rolname = 'app' AND toplevel AND queryid = 42
         GROUP BY 1""",
    "server transactions, 7 days": """
        SELECT date_trunc('hour', ts), sum(xact_commit)
          FROM pgfleet.pg_stat_database_series(%(srvid)s, now() - interval '7 days', now())
         GROUP BY 1""",
    "top 10 statements, 1 day": """
        SELECT queryid, sum(total_exec_time) AS t
          FROM pgfleet.pg_stat_statements_series(%(srvid)s, now() - interval '1 day', now())
         GROUP BY queryid ORDER BY t DESC LIMIT 10""",
}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--statements", type=int, default=2000)
    args = ap.parse_args()
    with throwaway() as tw:
        dsn = tw.new_repository()
        with psycopg.connect(dsn, autocommit=True) as conn:
            srv = servers.add(conn, "bench", host="127.0.0.1")
            params = {"srvid": srv.srvid, "statements": args.statements}
            for day in range(9):
                conn.execute(
                    "SELECT pgfleet.metric_partition(m, (now() - %s * interval '1 day')::date)"
                    " FROM unnest(ARRAY['pg_stat_statements', 'pg_stat_database']) m",
                    (day,),
                )
            t0 = time.perf_counter()
            start = conn.execute("SELECT now() - interval '7 days'").fetchone()[0]  # type: ignore[index]
            # Window by window, as the collector's aggregations write them:
            # each window's rows together, keys and snapshot times shared.
            for w in range(WINDOWS):
                at = {**params, "start": start + datetime.timedelta(minutes=500 * w)}
                for module, insert in (
                    ("pg_stat_statements", FILL_PGSS),
                    ("pg_stat_database", FILL_DB),
                ):
                    conn.execute(insert, at)
                    conn.execute("SELECT pgfleet.metric_aggregate(%s, %s)", (module, srv.srvid))
                    # As autovacuum does between aggregations: the next
                    # window reuses the space instead of growing the table.
                    conn.execute(f"VACUUM pgfleet.{module}_current")
            conn.execute("VACUUM ANALYZE")
            fill = time.perf_counter() - t0
            figures = []
            for label, query in QUERIES.items():
                times = []
                for _ in range(20):
                    t = time.perf_counter()
                    conn.execute(query, params).fetchall()
                    times.append((time.perf_counter() - t) * 1000)
                figures.append(f"{label} {statistics.median(times):.1f} ms")
            row = conn.execute(
                "SELECT pg_size_pretty(sum(pg_total_relation_size(inhrelid))) FROM pg_inherits"
                " WHERE inhparent = 'pgfleet.pg_stat_statements_history'::regclass"
            ).fetchone()
        print(
            f"series ({args.statements} statements x 2016 snapshots, filled in {fill:.0f} s, "
            f"{row[0] if row else '?'}): " + "; ".join(figures),
            flush=True,
        )


if __name__ == "__main__":
    main()
