"""Reading series back: one query's and one server's over 7 days of 5-minute snapshots.

Fills a repository (embedded PostgreSQL 18) with 7 days of 5-minute snapshots of one
server with 2,000 statements, as aggregation leaves them (coalesce 100: one history
row per statement per ~8 hours, partitioned by day), plus 8 databases' worth of
pg_stat_database; then times, as median of 20 runs each:

- one statement's calls and time per hour over the week;
- the server's transactions per hour over the week (pg_stat_database);
- the server's top 10 statements by time over the last day.

Usage: python bench/series.py [--statements N]
"""

from __future__ import annotations

import argparse
import statistics
import time

import psycopg

from pgfleet.demo.cluster import throwaway
from pgfleet.repository import servers

FILL_PGSS = """
INSERT INTO pgfleet.pg_stat_statements_history
       (srvid, datname, rolname, toplevel, queryid, ts_start, ts_end, points)
SELECT %(srvid)s, 'app', 'app', true, q, w.start, w.start + interval '495 minutes',
       ARRAY(SELECT jsonb_populate_record(NULL::pgfleet.pg_stat_statements_point,
                        jsonb_build_object('ts', w.start + i * interval '5 minutes',
                                           'calls', 10 + (q + i) %% 7, 'rows', 10,
                                           'shared_blks_hit', 100,
                                           'shared_blks_read', nullif((q * i) %% 3, 0),
                                           'total_exec_time', 1.5 + (i %% 5)))
               FROM generate_series(0, 99) i)
  FROM generate_series(1, %(statements)s) q,
       (SELECT now() - interval '7 days' + k * interval '500 minutes' AS start
          FROM generate_series(0, 19) k) w
"""

FILL_DB = """
INSERT INTO pgfleet.pg_stat_database_history (srvid, datname, ts_start, ts_end, points)
SELECT %(srvid)s, 'db' || d, w.start, w.start + interval '495 minutes',
       ARRAY(SELECT jsonb_populate_record(NULL::pgfleet.pg_stat_database_point,
                        jsonb_build_object('ts', w.start + i * interval '5 minutes',
                                           'xact_commit', 1000 + i, 'blks_hit', 50000))
               FROM generate_series(0, 99) i)
  FROM generate_series(1, 8) d,
       (SELECT now() - interval '7 days' + k * interval '500 minutes' AS start
          FROM generate_series(0, 19) k) w
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
            conn.execute(FILL_PGSS, params)
            conn.execute(FILL_DB, params)
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
