"""The datasource contract from the ground up: a user's own source in plain SQL.

``my_datasource`` returns a single integer counter ``my_counter`` with a
timestamp.  It is written and registered with nothing but SQL, collected in
local and in remote mode, aggregated, purged by retention and unregistered.
"""

from __future__ import annotations

import shutil
import subprocess
from datetime import UTC, datetime

import psycopg
import pytest
from psycopg.rows import TupleRow

from pgfleet.cluster import Cluster
from tests.collector.exporter import get
from tests.collector.exporter import value as scraped
from tests.fix_clusters import NewDatabase
from tests.fix_daemon import DaemonFactory, wait_until
from tests.fix_repository import RunCli, add_server, connect, one_row, scalar

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"

# What a monitored server needs: the counter and the query_source function.
MONITORED_SQL = """
CREATE TABLE my_counter_table (my_counter integer NOT NULL);
INSERT INTO my_counter_table VALUES (41);
CREATE FUNCTION public.my_datasource_src(srvid integer)
RETURNS TABLE (ts timestamptz, my_counter integer) LANGUAGE sql AS
$$ SELECT now(), my_counter FROM public.my_counter_table $$;
"""

# What the repository needs: the same source (local data for srvid 0, the
# transient table otherwise), storage, and the four operations.
REPOSITORY_SQL = """
CREATE TABLE my_counter_table (my_counter integer NOT NULL);
INSERT INTO my_counter_table VALUES (7);

CREATE UNLOGGED TABLE public.my_datasource_src_tmp (
    srvid integer NOT NULL,
    ts timestamptz NOT NULL,
    my_counter integer NOT NULL
);

CREATE FUNCTION public.my_datasource_src(_srvid integer)
RETURNS TABLE (ts timestamptz, my_counter integer) LANGUAGE plpgsql AS $$
BEGIN
    IF _srvid = 0 THEN
        RETURN QUERY SELECT now(), t.my_counter FROM public.my_counter_table t;
    ELSE
        RETURN QUERY SELECT t.ts, t.my_counter FROM public.my_datasource_src_tmp t
                      WHERE t.srvid = _srvid;
    END IF;
END $$;

CREATE TABLE public.my_datasource_history (
    srvid integer NOT NULL, ts timestamptz NOT NULL, my_counter integer NOT NULL);
CREATE TABLE public.my_datasource_daily (
    srvid integer NOT NULL, day date NOT NULL, min_counter integer, max_counter integer,
    PRIMARY KEY (srvid, day));

CREATE FUNCTION public.my_datasource_snapshot(_srvid integer) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO public.my_datasource_history SELECT _srvid, * FROM public.my_datasource_src(_srvid);
$$;

CREATE FUNCTION public.my_datasource_aggregate(_srvid integer) RETURNS void
LANGUAGE sql AS $$
    INSERT INTO public.my_datasource_daily
    SELECT srvid, ts::date, min(my_counter), max(my_counter)
      FROM public.my_datasource_history WHERE srvid = _srvid GROUP BY 1, 2
    ON CONFLICT (srvid, day) DO UPDATE
       SET min_counter = least(my_datasource_daily.min_counter, excluded.min_counter),
           max_counter = greatest(my_datasource_daily.max_counter, excluded.max_counter);
$$;

CREATE FUNCTION public.my_datasource_purge(_srvid integer) RETURNS void
LANGUAGE sql AS $$
    DELETE FROM public.my_datasource_history h
     USING pgfleet.servers s
     WHERE s.srvid = _srvid AND h.srvid = _srvid AND h.ts < now() - s.retention;
$$;

CREATE FUNCTION public.my_datasource_unregister(_srvid integer) RETURNS boolean
LANGUAGE sql AS $$
    DELETE FROM pgfleet.functions WHERE module = 'my_datasource';
    SELECT true;
$$;

INSERT INTO pgfleet.functions (module, operation, function_name, query_source, added_manually)
VALUES ('my_datasource', 'snapshot',   'public.my_datasource_snapshot',   'public.my_datasource_src', true),
       ('my_datasource', 'aggregate',  'public.my_datasource_aggregate',  NULL, true),
       ('my_datasource', 'unregister', 'public.my_datasource_unregister', NULL, true),
       ('my_datasource', 'purge',      'public.my_datasource_purge',      NULL, true);
"""


def test_my_datasource_local_and_remote(
    repo: str, run_cli: RunCli, monitored: Cluster, new_database: NewDatabase
) -> None:
    with connect(repo) as conn:
        conn.execute(REPOSITORY_SQL)
    mon = new_database(monitored)
    with connect(mon) as conn:
        conn.execute(MONITORED_SQL)
    add_server(run_cli, "mon", mon, "--coalesce", "2")

    # Local mode: srvid 0 reads the repository's own counter.
    res = run_cli("snapshot", "--local")
    assert res.rc == 0, res.err
    assert "my_datasource" not in res.err
    # Remote mode: the collector ran my_datasource_src(0) on the monitored
    # server and staged the rows in the transient table.
    res = run_cli("snapshot", "mon")
    assert res.rc == 0, res.err
    with connect(repo) as conn:
        rows = conn.execute(
            "SELECT srvid, my_counter FROM public.my_datasource_history ORDER BY srvid"
        ).fetchall()
        srvid = one_row(conn, "SELECT srvid FROM pgfleet.servers WHERE alias = 'mon'")[0]
    assert rows == [(0, 7), (srvid, 41)]
    # Transient rows never outlive the snapshot's transaction.
    assert scalar(repo, "SELECT count(*) FROM public.my_datasource_src_tmp") == 0

    # coalesce = 2: the second snapshot aggregates.
    with connect(mon) as conn:
        conn.execute("UPDATE my_counter_table SET my_counter = 45")
    assert run_cli("snapshot", "mon").rc == 0
    with connect(repo) as conn:
        daily = conn.execute(
            "SELECT min_counter, max_counter FROM public.my_datasource_daily WHERE srvid = %s",
            (srvid,),
        ).fetchall()
        state = conn.execute(
            "SELECT snapshots, aggregates, last_aggregate IS NOT NULL FROM pgfleet.snapshot_state "
            "WHERE srvid = %s",
            (srvid,),
        ).fetchone()
    assert daily == [(41, 45)]
    assert state == (2, 1, True)

    # Purge runs after every 10 aggregates and honours retention: an old row
    # goes, the recent ones stay.
    with connect(repo) as conn:
        conn.execute(
            "INSERT INTO public.my_datasource_history VALUES (%s, now() - interval '30 days', 1)",
            (srvid,),
        )
    assert run_cli("server", "update", "mon", "--retention", "7d", "--coalesce", "1").rc == 0
    for _ in range(9):
        assert run_cli("snapshot", "mon").rc == 0
    with connect(repo) as conn:
        assert conn.execute(
            "SELECT aggregates, last_purge IS NOT NULL FROM pgfleet.snapshot_state WHERE srvid = %s",
            (srvid,),
        ).fetchone() == (10, True)
        oldest = conn.execute(
            "SELECT min(ts) > now() - interval '1 day', count(*) FROM public.my_datasource_history "
            "WHERE srvid = %s",
            (srvid,),
        ).fetchone()
    assert oldest == (True, 11)

    # Unregister: the registry rows go, snapshots no longer touch the source,
    # and what it collected is kept.
    with connect(repo) as conn:
        conn.execute("SELECT pgfleet.unregister_module('my_datasource')")
        assert (
            one_row(
                conn,
                "SELECT count(*) FROM pgfleet.functions WHERE module = 'my_datasource'",
            )[0]
            == 0
        )
    assert run_cli("snapshot", "mon").rc == 0
    assert (
        scalar(repo, "SELECT count(*) FROM public.my_datasource_history WHERE srvid = %s", (srvid,))
        == 11
    )


def test_user_source_missing_on_server_is_an_error_not_a_loss(
    repo: str, run_cli: RunCli, pg18: Cluster, new_database: NewDatabase
) -> None:
    """A source whose function is absent on the server fails alone."""
    with connect(repo) as conn:
        conn.execute(REPOSITORY_SQL)
    mon = new_database(pg18)  # no my_datasource_src there
    add_server(run_cli, "bare", mon)
    res = run_cli("snapshot", "bare")
    assert res.rc == 3
    assert "my_datasource: function public.my_datasource_src(integer) does not exist" in res.err
    assert len(res.err.strip().splitlines()) == 1
    with connect(repo) as conn:
        srvid = one_row(conn, "SELECT srvid FROM pgfleet.servers WHERE alias = 'bare'")[0]
        # The built-in sources were stored all the same.
        assert (
            one_row(
                conn,
                "SELECT count(*) FROM pgfleet.pg_stat_database_current WHERE srvid = %s",
                (srvid,),
            )[0]
            > 0
        )
        assert conn.execute(
            "SELECT source FROM pgfleet.snapshot_errors WHERE srvid = %s", (srvid,)
        ).fetchall() == [("my_datasource",)]


def test_failing_snapshot_function_loses_nothing_else(
    repo: str, run_cli: RunCli, pg18: Cluster, new_database: NewDatabase
) -> None:
    with connect(repo) as conn:
        conn.execute(REPOSITORY_SQL)
        conn.execute(
            "CREATE OR REPLACE FUNCTION public.my_datasource_snapshot(_srvid integer) RETURNS void "
            "LANGUAGE plpgsql AS $$ BEGIN INSERT INTO public.my_datasource_history "
            "SELECT _srvid, * FROM public.my_datasource_src(_srvid); "
            "RAISE EXCEPTION 'my_datasource is broken'; END $$"
        )
    mon = new_database(pg18)
    with connect(mon) as conn:
        conn.execute(MONITORED_SQL)
    add_server(run_cli, "mon", mon)
    res = run_cli("snapshot", "mon")
    assert res.rc == 3
    assert "my_datasource is broken" in res.err
    with connect(repo) as conn:
        # Its own partial insert was rolled back with its subtransaction...
        assert one_row(conn, "SELECT count(*) FROM public.my_datasource_history")[0] == 0
        # ...and the other sources were stored.
        assert one_row(conn, "SELECT count(*) FROM pgfleet.pg_stat_database_current")[0] > 0
        assert one_row(conn, "SELECT count(*) FROM public.my_datasource_src_tmp")[0] == 0


def test_registry_shape(repo: str) -> None:
    with connect(repo) as conn:
        cols = [
            r[0]
            for r in conn.execute(
                "SELECT attname FROM pg_attribute WHERE attrelid = 'pgfleet.functions'::regclass "
                "AND attnum > 0 AND NOT attisdropped ORDER BY attnum"
            ).fetchall()
        ]
        assert cols == [
            "module",
            "operation",
            "function_name",
            "query_source",
            "query_cleanup",
            "added_manually",
            "enabled",
            "priority",
        ]
        # Built-in sources are registered through the same contract, and
        # their transient tables follow the naming and shape rules.
        bad = conn.execute("""
            SELECT f.query_source FROM pgfleet.functions f
             WHERE f.operation = 'snapshot' AND NOT f.added_manually
               AND NOT EXISTS (
                   SELECT 1 FROM pg_class c JOIN pg_attribute a ON a.attrelid = c.oid AND a.attnum = 1
                    WHERE c.oid = to_regclass(f.query_source || '_tmp')
                      AND c.relpersistence = 'u' AND a.attname = 'srvid'
                      AND a.atttypid = 'integer'::regtype AND a.attnotnull)""").fetchall()
        assert bad == []
        ops = conn.execute("SELECT DISTINCT operation FROM pgfleet.functions ORDER BY 1").fetchall()
        assert ops == [("aggregate",), ("purge",), ("snapshot",), ("unregister",)]


def test_rows_that_do_not_fit_fail_only_their_source(
    repo: str, run_cli: RunCli, pg18: Cluster, new_database: NewDatabase
) -> None:
    """A COPY into a transient table that fails loses that source, not the others."""
    with connect(repo) as conn:
        conn.execute(REPOSITORY_SQL)
    mon = new_database(pg18)
    with connect(mon) as conn:
        conn.execute(
            "CREATE FUNCTION public.my_datasource_src(srvid integer) "
            "RETURNS TABLE (ts timestamptz, my_counter text) LANGUAGE sql AS "
            "$$ SELECT now(), 'not a number' $$"
        )
    add_server(run_cli, "mon", mon)
    res = run_cli("snapshot", "mon")
    assert res.rc == 3
    assert "my_datasource: cannot store: invalid input syntax for type integer" in res.err
    with connect(repo) as conn:
        assert one_row(conn, "SELECT count(*) FROM public.my_datasource_history")[0] == 0
        assert one_row(conn, "SELECT count(*) FROM pgfleet.pg_stat_database_current")[0] > 0
        assert one_row(conn, "SELECT count(*) FROM public.my_datasource_src_tmp")[0] == 0


def test_user_source_on_the_generic_storage(
    repo: str, run_cli: RunCli, pg18: Cluster, new_database: NewDatabase
) -> None:
    """A user's source stored by pgfleet.create_metric_source: deltas, series, purge."""
    with connect(repo) as conn:
        conn.execute("""
            CREATE UNLOGGED TABLE public.my_datasource_src_tmp (
                srvid integer NOT NULL, ts timestamptz NOT NULL, my_counter integer NOT NULL);
            CREATE FUNCTION public.my_datasource_src(_srvid integer)
            RETURNS TABLE (ts timestamptz, my_counter integer) LANGUAGE sql AS $$
                SELECT t.ts, t.my_counter FROM public.my_datasource_src_tmp t WHERE t.srvid = _srvid
            $$;
            SELECT pgfleet.create_metric_source(
                'my_datasource', 'public.my_datasource_src',
                _keys => '{}', _counters => '{my_counter}', _deltas => '{}', _gauges => '{}',
                _onces => '{}');""")
    mon = new_database(pg18)
    with connect(mon) as conn:
        conn.execute(MONITORED_SQL)
    add_server(run_cli, "mon", mon, "--coalesce", "2")
    for value in (41, 45, 3, 10):  # 3: the counter was reset
        with connect(mon) as conn:
            conn.execute("UPDATE my_counter_table SET my_counter = %s", (value,))
        assert run_cli("snapshot", "mon").rc == 0
    srvid = scalar(repo, "SELECT srvid FROM pgfleet.servers WHERE alias = 'mon'")
    with connect(repo) as conn:
        deltas = [r[0] for r in conn.execute(
            "SELECT my_counter FROM pgfleet.my_datasource_series(%s, now() - interval '1 hour', now()) "
            "ORDER BY ts", (srvid,)).fetchall()]
        # Unknown on the first snapshot, +4, restarted at 3, +7; aggregated
        # rows and current ones read alike.
        assert deltas == [None, 4, 3, 7]
        assert one_row(
            conn,
            "SELECT count(*) FROM pgfleet.my_datasource_history WHERE srvid = %s", (srvid,)
        )[0] == 2
        assert one_row(
            conn,
            "SELECT added_manually FROM pgfleet.functions WHERE module = 'my_datasource' "
            "AND operation = 'snapshot'")[0] is True


def test_query_cleanup_runs_on_the_server_after_the_source(
    repo: str, run_cli: RunCli, pg18: Cluster, new_database: NewDatabase
) -> None:
    with connect(repo) as conn:
        conn.execute(REPOSITORY_SQL)
        conn.execute(
            "UPDATE pgfleet.functions SET query_cleanup = 'UPDATE public.my_counter_table SET my_counter = 0' "
            "WHERE module = 'my_datasource' AND operation = 'snapshot'"
        )
    mon = new_database(pg18)
    with connect(mon) as conn:
        conn.execute(MONITORED_SQL)
    add_server(run_cli, "mon", mon)
    assert run_cli("snapshot", "mon").rc == 0
    assert run_cli("snapshot", "mon").rc == 0
    # The first snapshot read 41 and reset it; the second read the reset value.
    assert [r[0] for r in _rows(repo, "SELECT my_counter FROM public.my_datasource_history ORDER BY ts")] == [41, 0]
    assert scalar(mon, "SELECT my_counter FROM my_counter_table") == 0


def _rows(dsn: str, query: str) -> list[TupleRow]:
    with connect(dsn) as conn:
        return conn.execute(query).fetchall()


# -- A user's source in Prometheus: pgfleet.export_source (migration 0014) ---------

# A source with an entry per queue: its depth (a gauge), jobs processed (a
# counter), when it last ran (a timestamp), whether it is paused (a boolean),
# and a note (text, not exportable but as a label).
QUEUE_MONITORED_SQL = """
CREATE TABLE public.my_queues (
    queue text PRIMARY KEY, depth integer, processed bigint, last_run timestamptz,
    paused boolean, note text);
INSERT INTO public.my_queues VALUES
    ('mail', 3, 100, '2026-12-01 10:00:00+00', false, 'x'),
    ('sms', 0, 7, NULL, true, 'y');
CREATE FUNCTION public.my_queue_src(srvid integer)
RETURNS TABLE (ts timestamptz, queue text, depth integer, processed bigint,
               last_run timestamptz, paused boolean, note text) LANGUAGE sql AS
$$ SELECT now(), queue, depth, processed, last_run, paused, note FROM public.my_queues $$;
"""

QUEUE_REPOSITORY_SQL = """
CREATE UNLOGGED TABLE public.my_queue_src_tmp (
    srvid integer NOT NULL, ts timestamptz NOT NULL, queue text NOT NULL, depth integer,
    processed bigint, last_run timestamptz, paused boolean, note text);
CREATE FUNCTION public.my_queue_src(_srvid integer)
RETURNS TABLE (ts timestamptz, queue text, depth integer, processed bigint,
               last_run timestamptz, paused boolean, note text) LANGUAGE sql AS $$
    SELECT t.ts, t.queue, t.depth, t.processed, t.last_run, t.paused, t.note
      FROM public.my_queue_src_tmp t WHERE t.srvid = _srvid
$$;
SELECT pgfleet.create_metric_source(
    'my_queue', 'public.my_queue_src', _keys => '{queue}', _counters => '{processed}',
    _deltas => '{}', _gauges => '{depth,last_run,paused}', _onces => '{note}');
"""


def _export_error(conn: psycopg.Connection[TupleRow], call: str) -> str:
    with pytest.raises(psycopg.Error) as e, conn.transaction():
        conn.execute(call)
    return str(e.value)


def test_export_declarations_are_checked(repo: str) -> None:
    with connect(repo) as conn:
        conn.execute(QUEUE_REPOSITORY_SQL)
        # Built-in sources have families of their own; unknown sources none.
        assert "no source \"pg_stat_database\" of yours" in _export_error(
            conn, "SELECT pgfleet.export_source('pg_stat_database', _gauges => '{numbackends}')"
        )
        assert "no source \"nope\"" in _export_error(
            conn, "SELECT pgfleet.export_source('nope', _gauges => '{x}')"
        )
        assert 'has no column "missing"' in _export_error(
            conn, "SELECT pgfleet.export_source('my_queue', _gauges => '{missing}')"
        )
        assert 'column "note" of source "my_queue" is text' in _export_error(
            conn, "SELECT pgfleet.export_source('my_queue', _counters => '{note}')"
        )
        assert "exported twice" in _export_error(
            conn, "SELECT pgfleet.export_source('my_queue', '{depth}', _gauges => '{depth}')"
        )
        # Names Prometheus or pgfleet would misread, written straight into the table.
        for column, kind in (
            ("server", "label"),  # pgfleet's own label
            ("Depth", "gauge"),  # not what an unquoted identifier gives
            ("depth-2", "gauge"),
            ("depth_total", "gauge"),  # a counter's sample
            ("x_bucket", "counter"),
        ):
            with pytest.raises(psycopg.errors.CheckViolation), conn.transaction():
                conn.execute(
                    "INSERT INTO pgfleet.metric_exports (module, column_name, kind)"
                    " VALUES ('my_queue', %s, %s)",
                    (column, kind),
                )

        conn.execute(
            """SELECT pgfleet.export_source('my_queue', _labels => '{queue,note}',
                   _counters => '{processed}', _gauges => '{depth,last_run,paused}',
                   _help => '{"depth": "Jobs waiting."}')"""
        )
        # Where each column is in the rows the collector fetches (srvid first).
        assert conn.execute(
            'SELECT column_name, "position", kind, type, help FROM pgfleet.exported_columns()'
        ).fetchall() == [
            ("queue", 2, "label", "text", ""),
            ("depth", 3, "gauge", "integer", "Jobs waiting."),
            ("processed", 4, "counter", "bigint", ""),
            ("last_run", 5, "gauge", "timestamp with time zone", ""),
            ("paused", 6, "gauge", "boolean", ""),
            ("note", 7, "label", "text", ""),
        ]
        # Declared again: replaced; without values: exported no more.
        conn.execute("SELECT pgfleet.export_source('my_queue', '{queue}', '{processed}')")
        assert one_row(conn, "SELECT count(*) FROM pgfleet.exported_columns()")[0] == 2
        conn.execute("UPDATE pgfleet.functions SET enabled = false WHERE module = 'my_queue'")
        assert one_row(conn, "SELECT count(*) FROM pgfleet.exported_columns()")[0] == 0
        conn.execute("UPDATE pgfleet.functions SET enabled = true WHERE module = 'my_queue'")
        conn.execute("SELECT pgfleet.export_source('my_queue', '{queue}')")
        assert one_row(conn, "SELECT count(*) FROM pgfleet.metric_exports")[0] == 0
        # Unregistering the source forgets its declaration.
        conn.execute("SELECT pgfleet.export_source('my_queue', '{queue}', '{processed}')")
        conn.execute("SELECT pgfleet.unregister_module('my_queue')")
        assert one_row(conn, "SELECT count(*) FROM pgfleet.metric_exports")[0] == 0


def test_user_source_exported_by_the_collector(
    repo: str, run_cli: RunCli, daemon: DaemonFactory, pg18: Cluster, new_database: NewDatabase
) -> None:
    """Declared columns reach /metrics: labels, counters (through a reset), gauges."""
    with connect(repo) as conn:
        conn.execute(QUEUE_REPOSITORY_SQL)
        conn.execute(
            """SELECT pgfleet.export_source('my_queue', _labels => '{queue}',
                   _counters => '{processed}', _gauges => '{depth,last_run,paused}',
                   _help => '{"depth": "Jobs waiting in the queue."}')"""
        )
    mon = new_database(pg18)
    with connect(mon) as conn:
        conn.execute(QUEUE_MONITORED_SQL)
    add_server(run_cli, "mon", mon, "--frequency", "1")
    d = daemon(repo)
    url = d.exporter_url

    def processed(queue: str) -> float | None:
        return scraped(url, "pgfleet_custom_my_queue_processed_total", server="mon", queue=queue)

    wait_until(lambda: processed("mail") == 100, 30, "the user source's counter")
    assert scraped(url, "pgfleet_custom_my_queue_depth", server="mon", queue="mail") == 3
    assert scraped(url, "pgfleet_custom_my_queue_paused", server="mon", queue="sms") == 1
    when = datetime(2026, 12, 1, 10, tzinfo=UTC).timestamp()
    assert scraped(url, "pgfleet_custom_my_queue_last_run", server="mon", queue="mail") == when
    # NULL: no sample.
    assert scraped(url, "pgfleet_custom_my_queue_last_run", server="mon", queue="sms") is None
    _, _, body = get(url, "/metrics")
    text = body.decode()
    assert "# HELP pgfleet_custom_my_queue_depth Jobs waiting in the queue.\n" in text
    assert "# TYPE pgfleet_custom_my_queue_processed_total counter\n" in text
    res = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True)
    assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()
    # The counter restarts on the server: the exported one goes on.
    with connect(mon) as conn:
        conn.execute("UPDATE public.my_queues SET processed = 5 WHERE queue = 'mail'")
    wait_until(lambda: processed("mail") == 105, 30, "the counter past its reset")
    assert d.stop() == 0
