"""The families postgres_exporter has that pgfleet lacked (issue 17), from real snapshots.

Database size and wraparound ages, locks by mode, the postmaster's start,
settings as numbers in base units, tables' last vacuum and analyze, a vacuum
in progress, statements' min/max/mean/stddev times: each read from a
PostgreSQL 15 (with its extensions) and 18, and checked against what the
server itself says.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import psycopg
import pytest
from prometheus_client import generate_latest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from pgfleet.cluster import Cluster
from pgfleet.collector.exporter.latest import Latest
from tests.collector.exporter import registry, snapshot
from tests.fix_clusters import NewDatabase

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"


def _db(dsn: str) -> str:
    return str(conninfo_to_dict(dsn)["dbname"])


def _one(dsn: str, query: str, params: tuple[Any, ...] = ()) -> Any:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(query, params).fetchone()
    assert row is not None, query
    return row[0]


def _poll(dsn: str, query: str, ok: Callable[[Any], bool], timeout: float = 20) -> Any:
    """``query``'s value once ``ok``: statistics reach shared memory lazily."""
    deadline = time.monotonic() + timeout
    while True:
        got = _one(dsn, query)
        if ok(got):
            return got
        assert time.monotonic() < deadline, f"{query!r} still gives {got!r}"
        time.sleep(0.1)


def _promtool(body: bytes) -> None:
    res = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True)
    assert res.returncode == 0, res.stdout.decode() + res.stderr.decode()
    assert res.stdout.decode().strip() == "", res.stdout.decode()


def test_database_size_and_wraparound_ages(monitored: Cluster, new_database: NewDatabase) -> None:
    dsn = new_database(monitored)
    db = _db(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, pad text)")
        conn.execute("INSERT INTO t SELECT g, repeat('x', 200) FROM generate_series(1, 5000) g")
        conn.execute("VACUUM ANALYZE t")
    latest = Latest()
    snapshot(latest, "s", dsn)
    reg = registry(latest)
    labels = {"server": "s", "dbname": db}
    size = reg.get_sample_value("pgfleet_database_size_bytes", labels)
    pages = _one(
        dsn,
        "SELECT sum(relpages::bigint) * current_setting('block_size')::bigint FROM pg_class"
        " WHERE relkind IN ('r', 'i', 't', 'm', 'S')",
    )
    assert size == pages
    # Within a few percent of the files' size: the maps and new pages aside.
    files = _one(dsn, "SELECT pg_database_size(current_database())")
    assert 0.8 * files < size <= files
    # Templates are not visited: no size, but their ages.
    assert (
        reg.get_sample_value("pgfleet_database_size_bytes", {**labels, "dbname": "template1"})
        is None
    )
    ages = _one(
        dsn,
        "SELECT array[age(datfrozenxid), mxid_age(datminmxid)] FROM pg_database WHERE datname = %s",
        (db,),
    )
    xid_age = reg.get_sample_value("pgfleet_database_xid_age", labels)
    assert xid_age is not None and 0 < xid_age <= ages[0]
    assert ages[0] - xid_age < 100  # what other sessions did since the snapshot
    assert reg.get_sample_value("pgfleet_database_mxid_age", labels) == ages[1]
    for template in ("template0", "template1"):
        assert reg.get_sample_value("pgfleet_database_xid_age", {**labels, "dbname": template})


def test_locks_held_and_awaited(monitored: Cluster, new_database: NewDatabase) -> None:
    dsn = new_database(monitored)
    db = _db(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE locked (id int)")
    holder = psycopg.connect(dsn)
    waiter = psycopg.connect(dsn, autocommit=True)
    try:
        holder.execute("LOCK TABLE locked IN ACCESS EXCLUSIVE MODE")
        blocked = threading.Thread(target=lambda: waiter.execute("SELECT count(*) FROM locked"))
        blocked.start()
        _poll(dsn, "SELECT count(*) FROM pg_locks WHERE NOT granted", lambda n: n >= 1)
        time.sleep(0.2)
        latest = Latest()
        snapshot(latest, "s", dsn)
    finally:
        holder.rollback()
        holder.close()
        blocked.join(10)
        waiter.close()
    reg = registry(latest)
    labels = {"server": "s", "dbname": db}
    held = reg.get_sample_value("pgfleet_locks_held", {**labels, "mode": "AccessExclusiveLock"})
    assert held is not None and held >= 1
    awaited = {"server": "s", "dbname": db, "mode": "AccessShareLock"}
    assert reg.get_sample_value("pgfleet_locks_waiting", awaited) == 1
    wait = reg.get_sample_value("pgfleet_locks_longest_wait_seconds", awaited)
    assert wait is not None and 0.1 < wait < 30
    # Transaction IDs and virtual ones belong to no database.
    assert reg.get_sample_value(
        "pgfleet_locks_held", {"server": "s", "dbname": "", "mode": "ExclusiveLock"}
    )
    # No wait, no sample.
    assert (
        reg.get_sample_value(
            "pgfleet_locks_longest_wait_seconds", {**labels, "mode": "AccessExclusiveLock"}
        )
        is None
    )


def test_postmaster_start_and_settings_in_base_units(
    monitored: Cluster, new_database: NewDatabase
) -> None:
    dsn = new_database(monitored)
    db = _db(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        # Seen by the collector's sessions on this database (source "database");
        # not lock_timeout: the collector's own, set by its connection, is left out.
        for name, value in (
            ("work_mem", "3MB"),
            ("idle_session_timeout", "2min"),
            ("lock_timeout", "2min"),
            ("enable_seqscan", "off"),
            ("cursor_tuple_fraction", "0.25"),
        ):
            conn.execute(
                sql.SQL("ALTER DATABASE {} SET {} = {}").format(
                    sql.Identifier(db), sql.Identifier(name), sql.Literal(value)
                )
            )
    latest = Latest()
    snapshot(latest, "s", dsn)
    reg = registry(latest)
    started = _one(dsn, "SELECT extract(epoch FROM pg_postmaster_start_time())::float8")
    assert reg.get_sample_value(
        "pgfleet_postmaster_start_timestamp_seconds", {"server": "s"}
    ) == pytest.approx(started)
    loaded = reg.get_sample_value("pgfleet_config_load_timestamp_seconds", {"server": "s"})
    assert loaded is not None and loaded >= started - 5

    def setting(family: str, name: str) -> float | None:
        return reg.get_sample_value(family, {"server": "s", "name": name})

    assert setting("pgfleet_setting_bytes", "work_mem") == 3 * 1024 * 1024
    assert setting("pgfleet_setting_seconds", "idle_session_timeout") == 120
    assert setting("pgfleet_setting_seconds", "lock_timeout") is None
    assert setting("pgfleet_setting", "enable_seqscan") == 0
    assert setting("pgfleet_setting", "cursor_tuple_fraction") == 0.25
    # shared_buffers in 8 kB blocks, set by the fixtures' configuration.
    shared = _one(dsn, "SELECT pg_size_bytes(current_setting('shared_buffers'))")
    assert setting("pgfleet_setting_bytes", "shared_buffers") == shared
    assert setting("pgfleet_setting", "max_connections") == 400
    # At their built-in default, strings and enums: not exported.
    assert _one(dsn, "SELECT source FROM pg_settings WHERE name = 'autovacuum_naptime'") == (
        "default"
    )
    assert setting("pgfleet_setting_seconds", "autovacuum_naptime") is None
    names = {
        s.labels["name"]
        for fam in registry(latest).collect()
        if fam.name.startswith("pgfleet_setting")
        for s in fam.samples
    }
    assert "shared_preload_libraries" not in names and "wal_level" not in names
    assert len(names) < 60


def test_tables_last_vacuum_and_analyze(monitored: Cluster, new_database: NewDatabase) -> None:
    dsn = new_database(monitored)
    db = _db(dsn)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("CREATE TABLE v (id int) WITH (autovacuum_enabled = off)")
        conn.execute("INSERT INTO v SELECT generate_series(1, 100)")
        conn.execute("VACUUM v")
        conn.execute("ANALYZE v")
        conn.execute("ANALYZE v")
    stats = "SELECT array[vacuum_count, analyze_count] FROM pg_stat_user_tables WHERE relname = 'v'"
    _poll(dsn, stats, lambda counts: counts == [1, 2])
    times = _one(
        dsn,
        "SELECT array[extract(epoch FROM last_vacuum), extract(epoch FROM last_analyze)]::float8[]"
        " FROM pg_stat_user_tables WHERE relname = 'v'",
    )
    latest = Latest(max_tables=100_000)
    snapshot(latest, "s", dsn)
    reg = registry(latest)
    labels = {"server": "s", "dbname": db, "schema": "public", "table": "v"}
    assert reg.get_sample_value("pgfleet_table_vacuums_total", labels) == 1
    assert reg.get_sample_value("pgfleet_table_analyzes_total", labels) == 2
    assert reg.get_sample_value("pgfleet_table_autoanalyzes_total", labels) == 0
    assert reg.get_sample_value(
        "pgfleet_table_last_vacuum_timestamp_seconds", labels
    ) == pytest.approx(times[0])
    assert reg.get_sample_value(
        "pgfleet_table_last_analyze_timestamp_seconds", labels
    ) == pytest.approx(times[1])
    # Never: no sample.
    assert reg.get_sample_value("pgfleet_table_last_autovacuum_timestamp_seconds", labels) is None


def test_statement_min_max_mean_stddev(monitored: Cluster, new_database: NewDatabase) -> None:
    dsn = new_database(monitored)
    with psycopg.connect(dsn, autocommit=True) as conn:
        for seconds in (0.01, 0.03, 0.05):
            conn.execute("SELECT pg_sleep(%s) AS exporter_lifetime_marker", (seconds,))
        row = conn.execute(
            """SELECT queryid::text, min_exec_time, max_exec_time, mean_exec_time,
                      stddev_exec_time
                 FROM pg_stat_statements
                WHERE query LIKE '%%exporter_lifetime_marker%%' AND toplevel
                  AND dbid = (SELECT oid FROM pg_database WHERE datname = current_database())"""
        ).fetchone()
    assert row is not None
    queryid, *ms = row
    latest = Latest(max_statements=100_000)
    snapshot(latest, "s", dsn)
    reg = registry(latest)
    labels = {"server": "s", "dbname": _db(dsn), "user": "postgres", "queryid": queryid}
    got = [
        reg.get_sample_value(f"pgfleet_statement_exec_{stat}_seconds", labels) or 0.0
        for stat in ("min", "max", "mean", "stddev")
    ]
    assert got == pytest.approx([x / 1000 for x in ms])
    low, high, mean, _ = got
    assert 0.01 <= low < mean < high


@pytest.fixture
def vacuuming(monitored: Cluster, new_database: NewDatabase) -> Iterator[str]:
    """A database where a slow VACUUM runs for the while of the test."""
    dsn = new_database(monitored)
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            "CREATE TABLE big (id int PRIMARY KEY, pad text) WITH (autovacuum_enabled = off)"
        )
        conn.execute("INSERT INTO big SELECT g, repeat('x', 50) FROM generate_series(1, 200000) g")
        conn.execute("DELETE FROM big WHERE id % 2 = 0")
    vacuum = psycopg.connect(dsn, autocommit=True)
    pid = vacuum.info.backend_pid
    # A cost limit of 1 with a delay: a few blocks per sleep.
    vacuum.execute("SET vacuum_cost_delay = 50")
    vacuum.execute("SET vacuum_cost_limit = 1")

    def run() -> None:
        # Cancelled at the end of the test.
        with contextlib.suppress(psycopg.errors.QueryCanceled):
            vacuum.execute("VACUUM big")

    t = threading.Thread(target=run)
    t.start()
    try:
        _poll(
            dsn, "SELECT count(*) FROM pg_stat_progress_vacuum WHERE relid = 'big'::regclass", bool
        )
        yield dsn
    finally:
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute("SELECT pg_cancel_backend(%s)", (pid,))
        t.join(30)
        vacuum.close()


def test_vacuum_in_progress(vacuuming: str, monitored: Cluster) -> None:
    dsn = vacuuming
    latest = Latest()
    snapshot(latest, "s", dsn)
    reg = registry(latest)
    labels = {"server": "s", "dbname": _db(dsn), "schema": "public", "table": "big"}
    blocks = reg.get_sample_value("pgfleet_vacuum_heap_blocks", labels)
    pages = _one(dsn, "SELECT pg_relation_size('big') / current_setting('block_size')::int")
    assert blocks is not None and blocks == pages
    scanned = reg.get_sample_value("pgfleet_vacuum_heap_blocks_scanned", labels)
    assert scanned is not None and 0 <= scanned <= blocks
    assert reg.get_sample_value("pgfleet_vacuum_autovacuum", labels) == 0
    assert reg.get_sample_value("pgfleet_vacuum_wraparound", labels) == 0
    started = reg.get_sample_value("pgfleet_vacuum_start_timestamp_seconds", labels)
    assert started is not None and time.time() - 60 < started <= time.time()
    # Dead tuples in bytes from 17 on, against a maximum of tuples before.
    if monitored.version_num >= 170000:
        assert reg.get_sample_value("pgfleet_vacuum_max_dead_tuple_bytes", labels)
        # Counted when the index pass starts.
        assert reg.get_sample_value("pgfleet_vacuum_indexes", labels) is not None
        assert reg.get_sample_value("pgfleet_vacuum_max_dead_tuples", labels) is None
    else:
        assert reg.get_sample_value("pgfleet_vacuum_max_dead_tuples", labels)
        assert reg.get_sample_value("pgfleet_vacuum_max_dead_tuple_bytes", labels) is None
    (phase,) = [
        s.labels["phase"]
        for fam in reg.collect()
        if fam.name == "pgfleet_vacuum_info"
        for s in fam.samples
        if s.labels["table"] == "big"
    ]
    assert phase == "scanning heap"
    _promtool(generate_latest(reg))
