"""pg_stat_user_tables and pg_stat_user_indexes: the views' figures, read
without opening a single table or index.

The two sources compute from pg_class, pg_namespace and pg_index, with the
pg_stat_get_* functions, what the views pg_stat_user_tables,
pg_statio_user_tables, pg_stat_user_indexes and pg_statio_user_indexes show;
their sizes are ``relpages``, where ``pg_table_size()`` and
``pg_relation_size()`` locked every relation in turn (and so queued behind a
pending ALTER TABLE).  Here they meet the views on relations of every kind the
views list, and tables and indexes locked by a transaction that never ends.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from pgfleet.cluster import Cluster
from pgfleet.datasources import builtin
from tests.datasources.monitor import ensure_monitor_role, monitor
from tests.fix_clusters import NewDatabase

SOURCES = ("pg_stat_user_tables", "pg_stat_user_indexes")

# What the sources showed when they read the views: every column but size.
VIEWS = {
    "pg_stat_user_tables": """
        SELECT t.schemaname, t.relname, t.n_live_tup, t.n_dead_tup,
               t.last_autovacuum, t.last_autoanalyze,
               t.seq_scan, t.seq_tup_read, t.idx_scan, t.idx_tup_fetch,
               t.n_tup_ins, t.n_tup_upd, t.n_tup_del, t.n_tup_hot_upd,
               t.vacuum_count, t.autovacuum_count, t.analyze_count, t.autoanalyze_count,
               io.heap_blks_read, io.heap_blks_hit, io.idx_blks_read, io.idx_blks_hit,
               io.toast_blks_read, io.toast_blks_hit, t.last_vacuum, t.last_analyze
          FROM pg_catalog.pg_stat_user_tables t
          LEFT JOIN pg_catalog.pg_statio_user_tables io USING (relid)""",
    "pg_stat_user_indexes": """
        SELECT i.schemaname, i.relname, i.indexrelname,
               i.idx_scan, i.idx_tup_read, i.idx_tup_fetch, io.idx_blks_read, io.idx_blks_hit
          FROM pg_catalog.pg_stat_user_indexes i
          LEFT JOIN pg_catalog.pg_statio_user_indexes io USING (indexrelid)""",
}

# The pages each source's size counts, read the slow way: from the files.
FILE_SIZES = {
    "pg_stat_user_tables": """
        SELECT n.nspname, c.relname,
               pg_relation_size(c.oid) + COALESCE(pg_relation_size(c.reltoastrelid), 0)
          FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
          JOIN pg_stat_user_tables s ON s.relid = c.oid""",
    "pg_stat_user_indexes": """
        SELECT s.schemaname, s.relname, s.indexrelname, pg_relation_size(s.indexrelid)
          FROM pg_stat_user_indexes s""",
}

# One relation of each kind the views list (and some they do not), with
# NULLs where a view has them: a table without index nor TOAST table, a
# partitioned table (no block I/O in pg_statio_user_tables), an index on it
# (not listed), a materialized view, names that need quoting.
OBJECTS = """
CREATE TABLE plain (id integer PRIMARY KEY, v integer, pad text);
CREATE INDEX plain_v ON plain (v);
INSERT INTO plain SELECT g, g % 7, pg_catalog.repeat('x', 50) FROM generate_series(1, 2000) g;
CREATE TABLE bare (a integer);
INSERT INTO bare SELECT generate_series(1, 100);
CREATE TABLE toasted (id integer PRIMARY KEY, doc text);
ALTER TABLE toasted ALTER doc SET STORAGE EXTERNAL;
INSERT INTO toasted SELECT g, pg_catalog.repeat(md5(g::text), 200) FROM generate_series(1, 300) g;
CREATE TABLE parted (id integer, v integer) PARTITION BY RANGE (id);
CREATE TABLE parted_1 PARTITION OF parted FOR VALUES FROM (0) TO (1000);
CREATE INDEX parted_v ON parted (v);
INSERT INTO parted SELECT g, g FROM generate_series(1, 999) g;
CREATE MATERIALIZED VIEW mv AS SELECT g FROM generate_series(1, 500) g;
CREATE INDEX mv_g ON mv (g);
CREATE UNLOGGED TABLE unlogged (id integer PRIMARY KEY);
CREATE SCHEMA "Odd Schema";
CREATE TABLE "Odd Schema"."Odd Table" (id integer PRIMARY KEY);
CREATE VIEW a_view AS SELECT 1 AS one;
CREATE SEQUENCE a_sequence;
"""

ACTIVITY = """
SELECT count(*) FROM plain;
SELECT * FROM plain WHERE id = 42;
SELECT * FROM plain WHERE v = 3;
UPDATE plain SET v = v + 1 WHERE id <= 10;
DELETE FROM plain WHERE id > 1990;
SELECT count(*) FROM bare;
SELECT pg_catalog.length(doc) FROM toasted WHERE id = 7;
SELECT * FROM parted WHERE v = 5;
SELECT * FROM mv WHERE g = 3;
"""


def _dbname(dsn: str) -> str:
    return str(conninfo_to_dict(dsn)["dbname"])


def _rows(conn: psycopg.Connection[Any], query: str) -> list[dict[str, Any]]:
    cur = conn.execute(query)
    assert cur.description is not None
    names = [c.name for c in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def _keyed(module: str, rows: list[dict[str, Any]]) -> dict[tuple[Any, ...], dict[str, Any]]:
    keys = [c.name for c in builtin()[module].columns if c.kind == "key" and c.name != "datname"]
    return {tuple(row[k] for k in keys): row for row in rows}


def _source(module: str, cluster: Cluster) -> str:
    query = builtin()[module].query_for(cluster.version_num)
    assert query is not None
    return query


@pytest.fixture
def database(monitored: Cluster, new_database: NewDatabase) -> Iterator[tuple[Cluster, str]]:
    """A database holding OBJECTS after ACTIVITY, and a temporary table that
    another session keeps open (the views list those too)."""
    cluster = monitored
    ensure_monitor_role(cluster)
    dbname = _dbname(new_database(cluster))
    with psycopg.connect(cluster.dsn(dbname=dbname), autocommit=True) as conn:
        conn.execute(OBJECTS)
        conn.execute(ACTIVITY)
    with psycopg.connect(cluster.dsn(dbname=dbname), autocommit=True) as temp:
        temp.execute("CREATE TEMP TABLE session_own (id integer PRIMARY KEY)")
        temp.execute("INSERT INTO session_own SELECT generate_series(1, 10)")
        # Only its session can vacuum or analyze it.
        temp.execute("ANALYZE session_own")
        yield cluster, dbname


@pytest.mark.parametrize("module", SOURCES)
def test_same_rows_as_the_views(database: tuple[Cluster, str], module: str) -> None:
    """Every column but size equals the views', NULLs included, for the same
    relations; the statistics are read in one snapshot for both."""
    cluster, dbname = database
    with monitor(cluster, dbname) as conn:
        # Statistics reach shared memory when the sessions that made them
        # flush: wait for the ones above, then freeze them for this transaction.
        _wait_for_stats(conn)
        with conn.transaction():
            conn.execute("SET LOCAL stats_fetch_consistency = snapshot")
            source = _keyed(module, _rows(conn, _source(module, cluster)))
            views = _keyed(module, _rows(conn, VIEWS[module]))

    assert source.keys() == views.keys()
    names = {k[-1] for k in views}
    if module == "pg_stat_user_tables":
        assert {"plain", "bare", "toasted", "parted", "parted_1", "mv", "Odd Table"} <= names
        assert {"session_own", "unlogged"} <= names
        assert source[("public", "plain")]["seq_scan"] >= 1
        assert source[("public", "bare")]["idx_scan"] is None  # no index
        assert source[("public", "bare")]["toast_blks_hit"] is None  # no TOAST table
        assert source[("public", "parted")]["heap_blks_hit"] is None  # not in pg_statio_*
    else:
        assert {"plain_pkey", "plain_v", "parted_1_v_idx", "mv_g", "Odd Table_pkey"} <= names
        assert "parted_v" not in names  # the partitioned table's own index
    for key, row in views.items():
        got = {k: v for k, v in source[key].items() if k not in ("ts", "datname", "size")}
        assert got == row, key


@pytest.mark.parametrize("module", SOURCES)
def test_size_counts_the_pages_of_the_last_vacuum_and_analyze(
    database: tuple[Cluster, str], module: str
) -> None:
    """After VACUUM (which counts the TOAST tables' pages) and ANALYZE (the
    tables' and indexes'), size is the main forks' size: pg_table_size()
    without the free space and visibility maps and the TOAST index."""
    cluster, dbname = database
    with psycopg.connect(cluster.dsn(dbname=dbname), autocommit=True) as conn:
        conn.execute("VACUUM")
        conn.execute("ANALYZE")
        expected = {tuple(r[:-1]): r[-1] for r in conn.execute(FILE_SIZES[module]).fetchall()}
    with monitor(cluster, dbname) as conn:
        sizes = {
            k: r["size"] for k, r in _keyed(module, _rows(conn, _source(module, cluster))).items()
        }
    assert sizes == expected
    if module == "pg_stat_user_tables":
        assert sizes[("public", "plain")] > 0
        assert sizes[("public", "toasted")] > sizes[("public", "plain")]  # its TOAST table counts
        assert sizes[("public", "parted")] == 0  # relpages is -1


def test_locked_tables_and_indexes_are_read_without_waiting(
    database: tuple[Cluster, str],
) -> None:
    """A transaction holds ACCESS EXCLUSIVE locks on a table and an index, as a
    pending ALTER TABLE or DROP INDEX would: both sources still list them at
    once, and hold no lock on any relation but the catalogs' meanwhile."""
    cluster, dbname = database
    holder = psycopg.connect(cluster.dsn(dbname=dbname), autocommit=False)
    try:
        holder.execute("LOCK TABLE plain IN ACCESS EXCLUSIVE MODE")
        holder.execute("DROP INDEX mv_g")  # locks the index (and its relation)
        with monitor(cluster, dbname) as conn:
            conn.execute("SET lock_timeout = '200ms'")
            # The trap works: what the sources used to call waits for these locks.
            for trap in ("pg_table_size('public.plain')", "pg_relation_size('public.mv_g')"):
                with pytest.raises(psycopg.errors.LockNotAvailable):
                    conn.execute(f"SELECT pg_catalog.{trap}")

            conn.execute("SET lock_timeout = '5s'")
            with conn.transaction():
                tables = _keyed(
                    "pg_stat_user_tables", _rows(conn, _source("pg_stat_user_tables", cluster))
                )
                indexes = _keyed(
                    "pg_stat_user_indexes", _rows(conn, _source("pg_stat_user_indexes", cluster))
                )
                locked = _relation_locks(cluster, dbname, conn.info.backend_pid)
        assert ("public", "plain") in tables
        assert ("public", "mv", "mv_g") in indexes  # the DROP is not committed
        assert locked == [], f"the sources lock {locked}"
    finally:
        holder.close()


def _relation_locks(cluster: Cluster, dbname: str, pid: int) -> list[str]:
    """The relations created after initdb that backend ``pid`` holds a lock on."""
    with psycopg.connect(cluster.dsn(dbname=dbname), autocommit=True) as conn:
        return [
            r[0]
            for r in conn.execute(
                """SELECT l.relation::regclass::text FROM pg_locks l
                    WHERE l.pid = %s AND l.locktype = 'relation' AND l.relation >= 16384""",
                (pid,),
            )
        ]


def _wait_for_stats(conn: psycopg.Connection[Any]) -> None:
    """Until the views show the activity of the fixture's sessions."""
    for _ in range(200):
        row = conn.execute(
            "SELECT n_tup_del, idx_scan FROM pg_catalog.pg_stat_user_tables WHERE relname = 'plain'"
        ).fetchone()
        if row is not None and row[0] and row[1]:
            return
        conn.execute("SELECT pg_catalog.pg_sleep(0.1)")
    pytest.fail("the statistics of the fixture's activity never showed")
