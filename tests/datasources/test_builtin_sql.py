"""Every built-in datasource's SQL, run for real as a pg_monitor-only role.

For each source and each server (PostgreSQL 15, 18 and a 15 hot standby) we
check that the query runs, returns ``ts`` and the declared columns in order,
that its text COPY output loads into a table of the declared types (as the
collector's ``COPY ... TO STDOUT`` into the repository will), and that keys are
neither NULL nor duplicated.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from pgfleet.datasources import Datasource, builtin
from tests.datasources.monitor import MONITOR, ensure_monitor_role, monitor, qualified

# Extensions (named as their library) we create in the test database when they
# are preloaded; the fixtures may have put them in template1 already.
EXTENSIONS = ("pg_stat_statements", "pg_qualstats", "pg_stat_kcache", "pg_wait_sampling")

SERVERS = ["pg15", "pg18", "pg15_standby"]


@dataclass
class Target:
    """A server to run sources on, a database there, and where to write."""

    name: str
    cluster: Any
    primary: Any  # the cluster itself, or the standby's primary
    dbname: str
    extensions: frozenset[str]

    @property
    def version_num(self) -> int:
        return int(self.cluster.version_num)

    def monitor(self) -> psycopg.Connection[Any]:
        """A session as the collector's: pg_monitor, search_path pinned to pg_catalog."""
        return monitor(self.cluster, self.dbname)

    def superuser(self, primary: bool = False) -> psycopg.Connection[Any]:
        where = self.primary if primary else self.cluster
        return psycopg.connect(where.dsn(dbname=self.dbname), autocommit=True)


def _dbname(dsn: str) -> str:
    return str(conninfo_to_dict(dsn)["dbname"])


def _preloaded(conn: psycopg.Connection[Any]) -> set[str]:
    row = conn.execute("SELECT current_setting('shared_preload_libraries')").fetchone()
    assert row is not None
    return {lib.strip() for lib in str(row[0]).split(",") if lib.strip()}


def _install_extensions(conn: psycopg.Connection[Any]) -> None:
    available = {r[0] for r in conn.execute("SELECT name FROM pg_available_extensions").fetchall()}
    preloaded = _preloaded(conn)
    for ext in EXTENSIONS:
        if ext in available and ext in preloaded:
            conn.execute(sql.SQL("CREATE EXTENSION IF NOT EXISTS {}").format(sql.Identifier(ext)))


def _wait_replay(primary: Any, standby: Any, dbname: str, timeout: float = 30.0) -> None:
    with psycopg.connect(primary.dsn(dbname=dbname), autocommit=True) as conn:
        # With synchronous_commit off the tail of WAL may wait for the walwriter.
        conn.execute("SET synchronous_commit = on")
        with conn.transaction():
            conn.execute("SELECT pg_current_xact_id()")
        row = conn.execute("SELECT pg_current_wal_flush_lsn()::text").fetchone()
    assert row is not None
    deadline = time.monotonic() + timeout
    with psycopg.connect(standby.dsn(), autocommit=True) as conn:
        while True:
            done = conn.execute(
                "SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (row[0],)
            ).fetchone()
            if done and done[0]:
                return
            assert time.monotonic() < deadline, f"the standby did not replay {row[0]}"
            time.sleep(0.05)


def _make_target(request: pytest.FixtureRequest, name: str) -> Target:
    cluster = request.getfixturevalue(name)
    primary = request.getfixturevalue("pg15") if name == "pg15_standby" else cluster
    ensure_monitor_role(primary)
    # Our own database rather than new_database(): we need it at module scope.
    dbname = _dbname(primary.create_database(f"pgfleet_ds_{uuid.uuid4().hex[:12]}"))
    request.addfinalizer(lambda: _drop_database(primary, dbname))
    with psycopg.connect(primary.dsn(dbname=dbname), autocommit=True) as conn:
        _install_extensions(conn)
        _make_objects(conn)
        # A standby has its primary's catalog: if replay lags, fail rather than skip.
        exts = frozenset(r[0] for r in conn.execute("SELECT extname FROM pg_extension"))
    if primary is not cluster:
        _wait_replay(primary, cluster, dbname)
    return Target(name, cluster, primary, dbname, exts)


def _drop_database(cluster: Any, dbname: str) -> None:
    with psycopg.connect(cluster.dsn(), autocommit=True) as conn:
        conn.execute(
            sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
        )


def _make_objects(conn: psycopg.Connection[Any]) -> None:
    """A table, an index and two overloads of a function, for the per-database sources."""
    conn.execute(
        """
        CREATE TABLE pgfleet_t (a integer PRIMARY KEY, b text);
        INSERT INTO pgfleet_t SELECT g, g::text FROM generate_series(1, 1000) g;
        CREATE INDEX pgfleet_t_b ON pgfleet_t (b);
        CREATE FUNCTION pgfleet_f(x integer) RETURNS integer LANGUAGE plpgsql
            AS $$ BEGIN RETURN x + 1; END $$;
        CREATE FUNCTION pgfleet_f(x text) RETURNS text LANGUAGE plpgsql
            AS $$ BEGIN RETURN x || '!'; END $$;
        ANALYZE pgfleet_t;
        """
    )


@pytest.fixture(scope="module", params=SERVERS)
def target(request: pytest.FixtureRequest) -> Target:
    return _make_target(request, request.param)


@pytest.fixture(scope="module", params=["pg15", "pg18"])
def primary_target(request: pytest.FixtureRequest) -> Target:
    """A target on a primary, where we can make statistics move."""
    return _make_target(request, request.param)


def _query_or_skip(ds: Datasource, t: Target) -> str:
    query = ds.query_for(t.version_num)
    if query is None:
        pytest.skip(f"{ds.module} does not exist on server version {t.version_num}")
    if ds.extension and ds.extension not in t.extensions:
        pytest.skip(f"{ds.module} needs the {ds.extension} extension, not installed on {t.name}")
    return query


def _qualified(query: str, conn: psycopg.Connection[Any]) -> str:
    """The source's SQL with its extensions' schemas, as the collector runs it."""
    resolved = qualified(query, conn)
    assert resolved is not None, "an extension the source needs is missing"
    return resolved


def _run(ds: Datasource, t: Target) -> list[dict[str, Any]]:
    """Run a source as the monitor role; return its rows as dicts."""
    query = _query_or_skip(ds, t)
    with t.monitor() as conn:
        cur = conn.execute(_qualified(query, conn))
        assert cur.description is not None
        names = [c.name for c in cur.description]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


@pytest.mark.parametrize("module", list(builtin()))
def test_source_runs_as_pg_monitor(target: Target, module: str) -> None:
    ds = builtin()[module]
    query = _query_or_skip(ds, target)

    with target.monitor() as conn:
        query = _qualified(query, conn)
        cur = conn.execute(query)
        assert cur.description is not None
        assert [c.name for c in cur.description] == ["ts", *(c.name for c in ds.columns)]
        rows = cur.fetchall()

        # What the collector does: the text COPY of the source, with srvid first.
        copy_out = sql.SQL("COPY (SELECT 1, * FROM ({}) s) TO STDOUT").format(sql.SQL(query))
        with conn.cursor().copy(copy_out) as copy:
            data = b"".join(bytes(chunk) for chunk in copy)

    # Keys identify an entry: never NULL, never twice in a snapshot.
    keys = [i + 1 for i, c in enumerate(ds.columns) if c.kind == "key"]
    for row in rows:
        assert all(row[i] is not None for i in keys), f"NULL key in {row}"
    assert len({tuple(row[i] for i in keys) for row in rows}) == len(rows), "duplicate keys"
    if not keys:
        assert len(rows) <= 1, "a source without keys must return at most one row"

    # The declared types must accept that text: load it into a table of them.
    columns = sql.SQL(", ").join(
        sql.SQL("{} {}").format(sql.Identifier(c.name), sql.SQL(c.type)) for c in ds.columns
    )
    with target.superuser(primary=True) as conn:
        conn.execute(
            sql.SQL("CREATE TEMP TABLE dest (srvid integer, ts timestamptz, {})").format(columns)
        )
        with conn.cursor().copy("COPY dest FROM STDIN") as copy:
            copy.write(data)
        count = conn.execute("SELECT count(*) FROM dest").fetchone()
    # Text COPY escapes newlines in values: one line per row.
    assert count is not None and count[0] == data.count(b"\n")


def _poll(ds: Datasource, t: Target, found: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    """Run the source until a row matches: statistics reach shared memory lazily."""
    deadline = time.monotonic() + 20
    while True:
        rows = _run(ds, t)
        for row in rows:
            if found(row):
                return row
        assert time.monotonic() < deadline, f"{ds.module}: no matching row in {rows}"
        time.sleep(0.2)


def test_per_database_sources_see_our_objects(primary_target: Target) -> None:
    t = primary_target
    with t.superuser() as conn:
        conn.execute("SET track_functions = 'pl'")
        conn.execute("SELECT count(*) FROM pgfleet_t")
        conn.execute("SELECT * FROM pgfleet_t WHERE a = 42")
        conn.execute("SELECT pgfleet_f(1), pgfleet_f('x')")

    table = _poll(
        builtin()["pg_stat_user_tables"], t,
        lambda r: r["relname"] == "pgfleet_t" and r["seq_scan"] >= 1 and r["n_tup_ins"] == 1000,
    )  # fmt: skip
    assert table["datname"] == t.dbname
    assert table["schemaname"] == "public"
    assert table["size"] > 0

    index = _poll(
        builtin()["pg_stat_user_indexes"], t,
        lambda r: r["indexrelname"] == "pgfleet_t_pkey" and (r["idx_scan"] or 0) >= 1,
    )  # fmt: skip
    assert index["relname"] == "pgfleet_t"
    assert index["size"] > 0

    funcs = builtin()["pg_stat_user_functions"]
    _poll(funcs, t, lambda r: r["funcname"] == "pgfleet_f" and r["arguments"] == "integer")
    _poll(funcs, t, lambda r: r["funcname"] == "pgfleet_f" and r["arguments"] == "text")


def test_pg_stat_statements_texts(primary_target: Target) -> None:
    t = primary_target
    ds = builtin()["pg_stat_statements"]
    _query_or_skip(ds, t)
    with t.superuser() as conn:
        conn.execute("SELECT b FROM pgfleet_t WHERE a = %s", (7,))

    row = _poll(ds, t, lambda r: "FROM pgfleet_t WHERE a = $1" in (r["query"] or ""))
    assert row["datname"] == t.dbname
    assert row["rolname"] == "postgres"
    assert row["toplevel"] is True
    assert row["calls"] >= 1
    assert row["stats_since"] is not None


def test_pg_qualstats_quals(primary_target: Target) -> None:
    t = primary_target
    ds = builtin()["pg_qualstats"]
    _query_or_skip(ds, t)
    with t.superuser() as conn:
        conn.execute("SET pg_qualstats.sample_rate = 1")
        conn.execute("SELECT count(*) FROM pgfleet_t WHERE b = '5'")

    row = _poll(ds, t, lambda r: r["qual"] == "public.pgfleet_t.b = ?")
    assert row["constvalue"] == "'5'::text"
    assert row["datname"] == t.dbname
    assert row["rolname"] == "postgres"
    assert row["execution_count"] >= 1


def test_pg_wait_sampling_needs_only_pg_monitor(primary_target: Target) -> None:
    """The profile is read as a counter: no reset, so nothing beyond pg_monitor."""
    t = primary_target
    ds = builtin()["pg_wait_sampling"]
    _query_or_skip(ds, t)
    assert ds.cleanup is None
    with t.superuser() as conn:
        conn.execute("SELECT pg_sleep(0.2)")
    rows = _poll(ds, t, lambda r: r["count"] > 0)
    assert rows["count"] > 0


def test_replication_seen_from_both_ends(request: pytest.FixtureRequest) -> None:
    standby = _make_target(request, "pg15_standby")
    primary = _make_target(request, "pg15")
    slot = f"pgfleet_test_{uuid.uuid4().hex[:8]}"

    senders = _run(builtin()["replication"], primary)
    assert any(r["state"] == "streaming" for r in senders), senders
    for r in senders:
        assert r["replay_lag_bytes"] is not None and r["replay_lag_bytes"] >= 0

    (receiver,) = _run(builtin()["wal_receiver"], standby)
    assert receiver["status"] == "streaming"
    assert receiver["sender_port"] == primary.cluster.port
    assert _run(builtin()["wal_receiver"], primary) == []

    with primary.superuser() as conn:
        conn.execute("SELECT pg_create_physical_replication_slot(%s, true)", (slot,))
        try:
            (row,) = [
                r for r in _run(builtin()["replication_slots"], primary) if r["slot_name"] == slot
            ]
        finally:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
    assert row["slot_type"] == "physical"
    assert row["active"] is False
    assert row["retained_bytes"] >= 0


def test_activity_leaves_out_the_collector(target: Target) -> None:
    # The collector's backend is the only one of its role that is active.
    rows = _run(builtin()["pg_stat_activity"], target)
    assert rows, "no backend at all?"
    assert not [r for r in rows if r["usename"] == MONITOR and r["state"] == "active"]
