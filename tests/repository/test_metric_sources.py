"""The generic metric storage behind the built-in sources.

Checks the storage bars: reset-safe rates, nothing written for unchanged
entries, retention that drops whole partitions, index-driven series reads.
"""

from __future__ import annotations

import psycopg
import pytest
from psycopg.rows import TupleRow

from pgfleet.cluster import Cluster
from tests.fix_clusters import NewDatabase
from tests.fix_repository import RunCli, add_server, connect, one_row, scalar, scalar_int

PGSS_CALLS = """
SELECT coalesce(sum(c.calls), 0)
  FROM pgfleet.pg_stat_statements_series(%s, now() - interval '1 day', now()) c
  JOIN pgfleet.pg_stat_statements_once o
       ON o.srvid = %s AND (o.datname, o.rolname, o.toplevel, o.queryid)
                         = (c.datname, c.rolname, c.toplevel, c.queryid)
 WHERE o.query LIKE 'SELECT count(*) FROM marker%%'
"""


def _setup(
    repo: str, run_cli: RunCli, cluster: Cluster, new_database: NewDatabase, *extra: str
) -> tuple[str, int]:
    mon = new_database(cluster)
    with connect(mon) as conn:
        conn.execute("CREATE TABLE marker (id int)")
    add_server(run_cli, "m", mon, *extra)
    srvid = scalar(repo, "SELECT srvid FROM pgfleet.servers WHERE alias = 'm'")
    assert isinstance(srvid, int)
    return mon, srvid


def _run_marker(mon: str, times: int) -> None:
    with connect(mon) as conn:
        for _ in range(times):
            conn.execute("SELECT count(*) FROM marker")


def test_counter_resets_never_go_negative(
    repo: str, run_cli: RunCli, pg18: Cluster, new_database: NewDatabase
) -> None:
    mon, srvid = _setup(repo, run_cli, pg18, new_database)
    _run_marker(mon, 3)
    assert run_cli("snapshot", "m").rc == 0  # baseline
    _run_marker(mon, 10)
    assert run_cli("snapshot", "m").rc == 0  # +10
    with connect(mon) as conn:
        conn.execute("SELECT pg_stat_statements_reset()")
        conn.execute("SELECT pg_stat_reset()")
    _run_marker(mon, 4)
    assert run_cli("snapshot", "m").rc == 0  # reset, then +4
    _run_marker(mon, 2)
    assert run_cli("snapshot", "m").rc == 0  # +2

    assert scalar(repo, PGSS_CALLS, (srvid, srvid)) == 16
    with connect(repo) as conn:
        negatives = one_row(
            conn,
            """
            SELECT count(*) FROM pgfleet.pg_stat_statements_series(%s, now() - interval '1 day', now())
             WHERE calls < 0 OR total_exec_time < 0 OR rows < 0 OR shared_blks_hit < 0""",
            (srvid,),
        )[0]
        assert negatives == 0
        negatives = one_row(
            conn,
            """
            SELECT count(*) FROM pgfleet.pg_stat_database_series(%s, now() - interval '1 day', now())
             WHERE xact_commit < 0 OR blks_hit < 0 OR tup_returned < 0""",
            (srvid,),
        )[0]
        assert negatives == 0
        # A rate over a range: transactions per second, never absurd.
        rate = one_row(
            conn,
            """
            SELECT sum(xact_commit) / 86400.0
              FROM pgfleet.pg_stat_database_series(%s, now() - interval '1 day', now())""",
            (srvid,),
        )[0]
        assert 0 < rate < 1


def test_unchanged_entries_cost_nothing(
    repo: str, run_cli: RunCli, pg18: Cluster, new_database: NewDatabase
) -> None:
    mon, srvid = _setup(repo, run_cli, pg18, new_database)
    _run_marker(mon, 1)
    assert run_cli("snapshot", "m").rc == 0
    assert run_cli("snapshot", "m").rc == 0
    before = scalar(
        repo, "SELECT count(*) FROM pgfleet.settings_current WHERE srvid = %s", (srvid,)
    )
    pgss_before = scalar_int(
        repo, "SELECT count(*) FROM pgfleet.pg_stat_statements_current WHERE srvid = %s", (srvid,)
    )
    assert run_cli("snapshot", "m").rc == 0
    # Settings did not change: not a single row.
    assert (
        scalar(repo, "SELECT count(*) FROM pgfleet.settings_current WHERE srvid = %s", (srvid,))
        == before
    )
    # Only the statements that ran since (the collector's own source queries
    # among them) wrote rows, not every known statement.
    known = scalar_int(
        repo, "SELECT count(*) FROM pgfleet.pg_stat_statements_last WHERE srvid = %s", (srvid,)
    )
    written = (
        scalar_int(
            repo,
            "SELECT count(*) FROM pgfleet.pg_stat_statements_current WHERE srvid = %s",
            (srvid,),
        )
        - pgss_before
    )
    assert written < known / 2, (written, known)


def test_settings_changes_over_time(
    repo: str, run_cli: RunCli, pg18: Cluster, new_database: NewDatabase
) -> None:
    mon, srvid = _setup(repo, run_cli, pg18, new_database)
    assert run_cli("snapshot", "m").rc == 0
    with connect(mon) as conn:
        conn.execute("ALTER SYSTEM SET work_mem = '7MB'")
        conn.execute("SELECT pg_reload_conf()")
    try:
        assert run_cli("snapshot", "m").rc == 0
        values = [
            r[0]
            for r in _all(
                repo,
                """
            SELECT setting FROM pgfleet.settings_series(%s, now() - interval '1 hour', now())
             WHERE name = 'work_mem' ORDER BY ts""",
                (srvid,),
            )
        ]
        assert values == ["4096", "7168"]
    finally:
        with connect(mon) as conn:
            conn.execute("ALTER SYSTEM RESET work_mem")
            conn.execute("SELECT pg_reload_conf()")


def _all(dsn: str, query: str, params: tuple[object, ...] = ()) -> list[TupleRow]:
    with connect(dsn) as conn:
        return conn.execute(query, params).fetchall()


def test_aggregate_then_purge_drops_partitions(
    repo: str, run_cli: RunCli, pg18: Cluster, new_database: NewDatabase
) -> None:
    mon, srvid = _setup(repo, run_cli, pg18, new_database, "--coalesce", "2")
    for _ in range(2):
        _run_marker(mon, 2)
        assert run_cli("snapshot", "m").rc == 0
    with connect(repo) as conn:
        # Aggregated: current emptied into one history row per key.
        assert (
            one_row(
                conn,
                "SELECT count(*) FROM pgfleet.pg_stat_database_current WHERE srvid = %s",
                (srvid,),
            )[0]
            == 0
        )
        assert (
            one_row(
                conn,
                "SELECT count(*) FROM pgfleet.pg_stat_database_history WHERE srvid = %s",
                (srvid,),
            )[0]
            > 0
        )
        # The series reads history and current alike.
        assert (
            one_row(
                conn,
                "SELECT count(*) FROM pgfleet.pg_stat_database_series(%s, "
                "now() - interval '1 hour', now())",
                (srvid,),
            )[0]
            > 0
        )
        # An old day of data, as if collected 20 days ago and aggregated then.
        conn.execute(
            """INSERT INTO pgfleet.pg_stat_database_current (srvid, ts, datname, xact_commit)
                        VALUES (%s, now() - interval '20 days', 'old', 1)""",
            (srvid,),
        )
        conn.execute("SELECT pgfleet.metric_aggregate('pg_stat_database', %s)", (srvid,))
        old_part = one_row(
            conn,
            """
            SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid
             WHERE i.inhparent = 'pgfleet.pg_stat_database_history'::regclass
             ORDER BY c.relname LIMIT 1""",
        )[0]
        conn.execute("SELECT pgfleet.pg_stat_database_purge(%s)", (srvid,))
        assert one_row(conn, "SELECT to_regclass('pgfleet.' || %s)", (old_part,))[0] is None
        # Recent data is untouched.
        assert (
            one_row(
                conn,
                "SELECT count(*) FROM pgfleet.pg_stat_database_history WHERE srvid = %s",
                (srvid,),
            )[0]
            > 0
        )


def test_series_read_is_index_driven(
    repo: str, run_cli: RunCli, pg18: Cluster, new_database: NewDatabase
) -> None:
    mon, srvid = _setup(repo, run_cli, pg18, new_database, "--coalesce", "1")
    _run_marker(mon, 1)
    assert run_cli("snapshot", "m").rc == 0
    with connect(repo) as conn:
        conn.execute("SET enable_seqscan = off")
        plan = "\n".join(
            r[0]
            for r in conn.execute(
                """
            EXPLAIN SELECT * FROM pgfleet.pg_stat_statements_series(%s, now() - interval '7 days', now())
             WHERE queryid = 42""",
                (srvid,),
            ).fetchall()
        )
    assert "pg_stat_statements_history" in plan
    assert "Seq Scan" not in plan, plan


ROLLTEST = """
CREATE UNLOGGED TABLE public.rolltest_src_tmp (
    srvid integer NOT NULL, ts timestamptz NOT NULL,
    db text NOT NULL, id integer NOT NULL, c bigint, g integer);
CREATE FUNCTION public.rolltest_src(_srvid integer)
RETURNS TABLE (ts timestamptz, db text, id integer, c bigint, g integer) LANGUAGE sql AS
$$ SELECT t.ts, t.db, t.id, t.c, t.g FROM public.rolltest_src_tmp t WHERE t.srvid = _srvid $$;
INSERT INTO pgfleet.metric_rollups (module, keys, gauges) VALUES ('rolltest', '{db}', '{g}');
SELECT pgfleet.create_metric_source(
    'rolltest', 'public.rolltest_src', _keys => '{db,id}', _counters => '{c}',
    _deltas => '{}', _gauges => '{g}', _onces => '{}', _scope => 'db');
"""


def test_rollups_written_by_the_snapshot(repo: str) -> None:
    """Rollups (0004) come from the snapshot statement (0005), not a trigger,
    and say what the trigger said: counters summed per rollup key and
    snapshot, tombstones included; gauges summed over the live entries,
    entries out of scope included; old rows dropped by retention."""
    with connect(repo) as conn:
        conn.execute(ROLLTEST)
    with connect(repo) as conn:
        # Extending it again (as 0004 documents) brings no trigger back.
        conn.execute("SELECT pgfleet.metric_extend('rolltest')")
        srvid = one_row(
            conn, "INSERT INTO pgfleet.servers (alias, host) VALUES ('r', 'h') RETURNING srvid"
        )[0]
        assert (
            one_row(
                conn,
                "SELECT count(*) FROM pg_trigger"
                " WHERE tgrelid = 'pgfleet.rolltest_current'::regclass AND NOT tgisinternal",
            )[0]
            == 0
        )
        conn.execute(
            "INSERT INTO pgfleet.rolltest_rollup (srvid, db, ts, c)"
            " VALUES (%s, 'a', now() - interval '30 days', 1)",
            (srvid,),
        )
    snapshots = [
        [("a", 1, 10, 1), ("a", 2, 5, 2), ("b", 3, 1, 7)],
        [("a", 1, 15, 1), ("a", 2, 5, 2)],  # b out of scope: kept
        [("a", 1, 3, 4), ("b", 3, 2, 7)],  # a/1 reset, a/2 vanished
        [("a", 1, 3, 4), ("b", 3, 2, 7)],  # nothing changed: nothing written
        [],  # every database gone out of scope: nothing vanishes
    ]
    for i, rows in enumerate(snapshots):
        with connect(repo) as conn, conn.transaction():
            ts = one_row(conn, "SELECT now() + make_interval(mins => %s)", (i,))[0]
            for db, id_, c, g in rows:
                conn.execute(
                    "INSERT INTO public.rolltest_src_tmp VALUES (%s, %s, %s, %s, %s, %s)",
                    (srvid, ts, db, id_, c, g),
                )
            conn.execute("SELECT pgfleet.take_snapshot(%s, '{rolltest}')", (srvid,))
            conn.execute("TRUNCATE public.rolltest_src_tmp")
        with connect(repo) as conn:
            assert one_row(conn, "SELECT count(*) FROM pgfleet.snapshot_errors")[0] == 0
            # Counters: per database and snapshot, the rows written.
            summed = conn.execute(
                """SELECT db, ts, coalesce(sum(c), 0) FROM pgfleet.rolltest_rollup
                    WHERE srvid = %(s)s AND g IS NULL GROUP BY 1, 2 ORDER BY 1, 2""",
                {"s": srvid},
            ).fetchall()
            written = conn.execute(
                """SELECT db, ts, coalesce(sum(c), 0) FROM pgfleet.rolltest_current
                    WHERE srvid = %(s)s GROUP BY 1, 2 ORDER BY 1, 2""",
                {"s": srvid},
            ).fetchall()
            assert summed == written, i
            # Gauges: summed over the live entries, at the snapshot's ts.
            if i in (0, 1, 2):
                gauges = conn.execute(
                    """SELECT db, g FROM pgfleet.rolltest_rollup
                        WHERE srvid = %s AND g IS NOT NULL AND ts = %s ORDER BY 1""",
                    (srvid, ts),
                ).fetchall()
                live = conn.execute(
                    """SELECT db, sum(g) FROM pgfleet.rolltest_last
                        WHERE srvid = %s GROUP BY 1 ORDER BY 1""",
                    (srvid,),
                ).fetchall()
                assert gauges == live, i
            # The 30-day-old row went at the first snapshot (retention 7 days).
            assert (
                one_row(
                    conn,
                    "SELECT count(*) FROM pgfleet.rolltest_rollup WHERE ts < now() - interval '1 day'",
                )[0]
                == 0
            )
    with connect(repo) as conn:
        # The deltas: a reset counts from zero, the vanished entry's tombstone.
        rows = conn.execute(
            "SELECT db, id, c, g FROM pgfleet.rolltest_current WHERE srvid = %s ORDER BY ts, db, id",
            (srvid,),
        ).fetchall()
        assert rows == [
            ("a", 1, None, 1),
            ("a", 2, None, 2),
            ("b", 3, None, 7),
            ("a", 1, 5, 1),
            ("a", 1, 3, 4),
            ("a", 2, None, None),
            ("b", 3, 1, 7),
        ]
        assert conn.execute(
            "SELECT db, id FROM pgfleet.rolltest_last WHERE srvid = %s ORDER BY 1, 2", (srvid,)
        ).fetchall() == [("a", 1), ("b", 3)]
        # Nothing changed at the 4th and 5th snapshots: no rollup row either.
        assert (
            one_row(
                conn,
                "SELECT count(DISTINCT ts) FROM pgfleet.rolltest_rollup WHERE srvid = %s",
                (srvid,),
            )[0]
            == 3
        )


def test_user_query_source_is_called(repo: str) -> None:
    """A user's query_source function decides what a snapshot stores, even
    when it is not a plain read of its transient table: the snapshot
    function reads the staged rows through it, never around it."""
    with connect(repo) as conn:
        conn.execute(
            """CREATE UNLOGGED TABLE public.doubled_src_tmp (
                   srvid integer NOT NULL, ts timestamptz NOT NULL, k text NOT NULL, c bigint);
               CREATE FUNCTION public.doubled_src(_srvid integer)
               RETURNS TABLE (ts timestamptz, k text, c bigint) LANGUAGE sql AS
               $$ SELECT t.ts, upper(t.k), t.c * 2 FROM public.doubled_src_tmp t
                   WHERE t.srvid = _srvid $$;
               SELECT pgfleet.create_metric_source(
                   'doubled', 'public.doubled_src', _keys => '{k}', _counters => '{c}',
                   _deltas => '{}', _gauges => '{}', _onces => '{}');"""
        )
        srvid = one_row(
            conn, "INSERT INTO pgfleet.servers (alias, host) VALUES ('d', 'h') RETURNING srvid"
        )[0]
    for c in (5, 8):
        with connect(repo) as conn, conn.transaction():
            conn.execute(
                "INSERT INTO public.doubled_src_tmp VALUES (%s, now(), 'x', %s)", (srvid, c)
            )
            conn.execute("SELECT pgfleet.take_snapshot(%s, '{doubled}')", (srvid,))
            conn.execute("TRUNCATE public.doubled_src_tmp")
    with connect(repo) as conn:
        assert one_row(conn, "SELECT count(*) FROM pgfleet.snapshot_errors")[0] == 0
        assert conn.execute(
            "SELECT k, c FROM pgfleet.doubled_last WHERE srvid = %s", (srvid,)
        ).fetchall() == [("X", 16)]
        assert conn.execute(
            "SELECT k, c FROM pgfleet.doubled_current WHERE srvid = %s ORDER BY ts", (srvid,)
        ).fetchall() == [("X", None), ("X", 6)]


GROUPTEST = """
CREATE UNLOGGED TABLE public.grouptest_src_tmp (
    srvid integer NOT NULL, ts timestamptz NOT NULL,
    db text NOT NULL, id integer NOT NULL, grp bigint, label text, c bigint);
CREATE FUNCTION public.grouptest_src(_srvid integer)
RETURNS TABLE (ts timestamptz, db text, id integer, grp bigint, label text, c bigint)
LANGUAGE sql AS
$$ SELECT t.ts, t.db, t.id, t.grp, t.label, t.c FROM public.grouptest_src_tmp t
    WHERE t.srvid = _srvid $$;
SELECT pgfleet.create_metric_source(
    'grouptest', 'public.grouptest_src', _keys => '{db,id}', _counters => '{c}',
    _deltas => '{}', _gauges => '{}', _onces => '{grp,label}', _scope => 'db',
    _history_keys => '{db,grp}');
"""


def test_history_keys_sum_entries(repo: str) -> None:
    """A source whose history keys are not its keys (pg_qualstats: an entry
    per constant on the server, a history per predicate) keeps its delta
    base per entry, so entries that come and go count right, and stores the
    deltas summed per history key, with its texts once per history key."""
    with connect(repo) as conn:
        conn.execute(GROUPTEST)
        srvid = one_row(
            conn, "INSERT INTO pgfleet.servers (alias, host) VALUES ('g', 'h') RETURNING srvid"
        )[0]
    # (db, id, grp, label, c): ids are constants, grp their predicate.
    snapshots = [
        [("a", 1, 7, "x = 1", 10), ("a", 2, 7, "x = 2", 5), ("a", 3, 8, "y = 1", 1)],
        [("a", 1, 7, "x = 1", 12), ("a", 4, 7, "x = 4", 3), ("a", 3, 8, "y = 1", 1)],
        [("a", 4, 7, "x = 4", 4), ("a", 5, 7, "x = 5", 1), ("a", 3, 8, "y = 1", 6)],
    ]
    for i, rows in enumerate(snapshots):
        with connect(repo) as conn, conn.transaction():
            ts = one_row(conn, "SELECT now() + make_interval(mins => %s)", (i,))[0]
            for row in rows:
                conn.execute(
                    "INSERT INTO public.grouptest_src_tmp VALUES (%s, %s, %s, %s, %s, %s, %s)",
                    (srvid, ts, *row),
                )
            conn.execute("SELECT pgfleet.take_snapshot(%s, '{grouptest}')", (srvid,))
            conn.execute("TRUNCATE public.grouptest_src_tmp")
    with connect(repo) as conn:
        assert one_row(conn, "SELECT count(*) FROM pgfleet.snapshot_errors")[0] == 0
        series = """SELECT grp, c FROM pgfleet.grouptest_series(%s, '-infinity', 'infinity')
                     ORDER BY ts, grp"""
        # First snapshot: no delta; then per predicate: 7 got 2 (id 1) + 3
        # (id 4, new), id 2 vanished; 8 unchanged; then 7 got 1 + 1, 8 got 5.
        expected = [(7, None), (8, None), (7, 5), (7, 2), (8, 5)]
        assert conn.execute(series, (srvid,)).fetchall() == expected
        conn.execute("SELECT pgfleet.metric_aggregate('grouptest', %s)", (srvid,))
        assert conn.execute(series, (srvid,)).fetchall() == expected
        assert one_row(
            conn, "SELECT count(*) FROM pgfleet.grouptest_keys WHERE srvid = %s", (srvid,)
        ) == (2,)
        assert conn.execute(
            "SELECT grp, label FROM pgfleet.grouptest_once WHERE srvid = %s ORDER BY grp",
            (srvid,),
        ).fetchall() == [(7, "x = 1"), (8, "y = 1")]
        sums = conn.execute(
            "SELECT grp, sum(c) FROM pgfleet.grouptest_sums(%s, '-infinity', 'infinity')"
            " GROUP BY grp ORDER BY grp",
            (srvid,),
        ).fetchall()
        assert sums == [(7, 7), (8, 5)]
        # Only counters and deltas can be summed.
        with pytest.raises(psycopg.errors.RaiseException, match="has gauges"):
            conn.execute(
                "SELECT pgfleet.create_metric_source('grouptest2', 'public.grouptest_src',"
                " _keys => '{db,id}', _counters => '{}', _deltas => '{}', _gauges => '{c}',"
                " _onces => '{grp}', _history_keys => '{db,grp}')"
            )
