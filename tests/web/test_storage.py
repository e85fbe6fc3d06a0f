"""Migration 0004: window totals, chunks, <module>_sums, rollups and roles.

Whatever the storage adds, what it answers must be what the points say:
``<module>_sums`` against ``<module>_series`` over ranges cutting windows
anywhere, rollups against the series they summarise.
"""

from __future__ import annotations

import random

import psycopg
import pytest

from pgfleet.cluster import Cluster
from pgfleet.repository import schema
from tests.fix_clusters import NewDatabase
from tests.fix_repository import RunCli, add_server, connect, one_row, scalar

# Five windows of 100 snapshots 5 minutes apart, each written by aggregation
# as a collector leaves it, and a sixth of 4 snapshots (no totals kept).
FILL = """
INSERT INTO pgfleet.pg_stat_statements_current
       (srvid, ts, datname, rolname, toplevel, queryid, calls, total_exec_time, wal_bytes)
SELECT {srvid}, w.start + i * interval '5 minutes', 'app', 'app', true, q,
       nullif((q + i) % 7, 0), 0.5 + i % 3, (q * i) % 11
  FROM generate_series(1, 20) q, generate_series(0, {last}) i,
       (SELECT date_trunc('hour', now()) - interval '2 days' + {k} * interval '500 minutes' AS start) w
 WHERE (q * i) % 13 <> 0;
SELECT pgfleet.metric_aggregate('pg_stat_statements', {srvid});
"""

COMPARE = """
SELECT (SELECT row(sum(calls), sum(total_exec_time)::numeric(20,6), sum(wal_bytes))::text
          FROM pgfleet.pg_stat_statements_sums(%(srvid)s, %(from)s, %(to)s)),
       (SELECT row(sum(calls), sum(total_exec_time)::numeric(20,6), sum(wal_bytes))::text
          FROM pgfleet.pg_stat_statements_series(%(srvid)s, %(from)s, %(to)s))
"""


def _server(repo: str, alias: str = "s") -> int:
    with connect(repo) as conn:
        row = conn.execute(
            "INSERT INTO pgfleet.servers (alias, host) VALUES (%s, '127.0.0.1') RETURNING srvid",
            (alias,),
        ).fetchone()
    assert row is not None
    return int(row[0])


def test_sums_equal_series_whatever_the_range(repo: str) -> None:
    srvid = _server(repo)
    with connect(repo) as conn:
        for k in range(6):
            conn.execute(FILL.format(srvid=srvid, k=k, last=99 if k < 5 else 3))
        # Windows of more than 5 points keep their totals, the others not.
        assert one_row(
            conn,
            """SELECT bool_and((t IS NOT NULL) = (length(replace(at::text, '0', '')) > 5))
                      AND bool_or(t IS NULL) AND bool_or(t IS NOT NULL)
                 FROM pgfleet.pg_stat_statements_history WHERE srvid = %s""",
            (srvid,),
        )[0]
        (start,) = one_row(
            conn,
            "SELECT min(ts_start) FROM pgfleet.pg_stat_statements_history WHERE srvid = %s",
            (srvid,),
        )
        rng = random.Random(5)
        ranges: list[tuple[str, str] | tuple[float, float]] = [("-infinity", "infinity")]
        for _ in range(40):
            lo = rng.uniform(-60, 2600) * 60  # seconds from the first point
            ranges.append((lo, lo + rng.uniform(1, 1800) * 60))
        for a, b in ranges:
            params: dict[str, object] = {"srvid": srvid}
            if a == "-infinity":
                params.update({"from": a, "to": b})
            else:
                (params["from"], params["to"]) = one_row(
                    conn,
                    "SELECT %s + make_interval(secs => %s), %s + make_interval(secs => %s)",
                    (start, a, start, b),
                )
            sums, series = one_row(conn, COMPARE, params)
            assert sums == series, (a, b)


def test_rollups_follow_snapshots(
    repo: str, run_cli: RunCli, pg18: Cluster, new_database: NewDatabase
) -> None:
    mon = new_database(pg18)
    add_server(run_cli, "m", mon, "--coalesce", "2")
    srvid = scalar(repo, "SELECT srvid FROM pgfleet.servers WHERE alias = 'm'")
    for i in range(5):
        with connect(mon) as conn:
            for _ in range(3 + i):
                conn.execute("SELECT count(*) FROM pg_class")
        assert run_cli("snapshot", "m").rc == 0
    with connect(repo) as conn:
        # Aggregation ran (coalesce 2): rollups and series agree per snapshot.
        assert (
            one_row(
                conn,
                "SELECT count(*) FROM pgfleet.pg_stat_statements_history WHERE srvid = %s",
                (srvid,),
            )[0]
            > 0
        )
        rows = conn.execute(
            """SELECT r.ts, r.calls, r.total_exec_time::numeric(20, 6), s.calls, s.t::numeric(20, 6)
                 FROM (SELECT ts, sum(calls) AS calls, sum(total_exec_time) AS total_exec_time
                         FROM pgfleet.pg_stat_statements_rollup WHERE srvid = %(s)s GROUP BY ts) r
                 FULL JOIN (SELECT ts, nullif(sum(calls), 0) AS calls,
                                   nullif(sum(total_exec_time), 0) AS t
                              FROM pgfleet.pg_stat_statements_series(%(s)s, '-infinity', 'infinity')
                             GROUP BY ts) s USING (ts)""",
            {"s": srvid},
        ).fetchall()
        assert len(rows) == 5
        for ts, rc, rt, sc, st in rows:
            assert (rc, rt) == (sc, st), ts
        # Sessions per state: summed over the live entries at each snapshot.
        assert (
            one_row(
                conn,
                "SELECT count(DISTINCT ts) FROM pgfleet.pg_stat_activity_rollup WHERE srvid = %s",
                (srvid,),
            )[0]
            >= 1
        )
        # Removing a server removes its rollups.
        conn.execute("DELETE FROM pgfleet.servers WHERE srvid = %s", (srvid,))
        assert (
            one_row(
                conn,
                "SELECT count(*) FROM pgfleet.pg_stat_statements_rollup WHERE srvid = %s",
                (srvid,),
            )[0]
            == 0
        )


def test_upgrade_extends_existing_data(
    pg18: Cluster, new_database: NewDatabase, run_cli: RunCli, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A repository filled before 0004 gets totals and rollups on upgrade."""
    dsn = new_database(pg18)
    every = schema.migrations
    monkeypatch.setattr(schema, "migrations", lambda: [m for m in every() if m.version < 4])
    with connect(dsn) as conn:
        schema.upgrade(conn)
        srvid = _server(dsn)
        for k in range(6):
            conn.execute(FILL.format(srvid=srvid, k=k, last=99 if k < 5 else 3))
        assert (
            one_row(
                conn,
                "SELECT count(*) FROM pg_attribute WHERE attrelid ="
                " 'pgfleet.pg_stat_statements_history'::regclass AND attname = 'total'",
            )[0]
            == 0
        )
    monkeypatch.setattr(schema, "migrations", every)
    with connect(dsn) as conn:
        applied = schema.upgrade(conn)
        assert applied[0].version == 4
        sums, series = one_row(
            conn, COMPARE, {"srvid": srvid, "from": "-infinity", "to": "infinity"}
        )
        assert sums == series
        assert one_row(
            conn,
            """SELECT (SELECT sum(calls) FROM pgfleet.pg_stat_statements_rollup WHERE srvid = %(s)s)
                    = (SELECT sum(calls) FROM pgfleet.pg_stat_statements_series(
                           %(s)s, '-infinity', 'infinity'))""",
            {"s": srvid},
        )[0]


def test_pgfleet_read_may_read_not_write(repo: str, pg18: Cluster) -> None:
    with connect(repo) as conn:
        conn.execute("DROP ROLE IF EXISTS ro_test")
        conn.execute("CREATE ROLE ro_test LOGIN PASSWORD 'ro' IN ROLE pgfleet_read")
        assert one_row(conn, "SELECT pg_has_role('pgfleet_admin', 'pgfleet_read', 'MEMBER')")[0]
    dbname = psycopg.conninfo.conninfo_to_dict(repo)["dbname"]
    with psycopg.connect(pg18.dsn(dbname=str(dbname), user="ro_test", password="ro")) as conn:
        conn.execute(
            "SELECT * FROM pgfleet.pg_stat_statements_sums(1, now() - interval '1 day', now())"
        )
        conn.execute("SELECT * FROM pgfleet.pg_stat_statements_rollup LIMIT 1")
        conn.execute("SELECT * FROM pgfleet.servers")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("DELETE FROM pgfleet.servers")
