"""Repository creation and in-place upgrades."""

from __future__ import annotations

import threading

import psycopg
import pytest

from pgfleet.cluster import Cluster
from pgfleet.datasources import builtin
from pgfleet.errors import RepositoryError
from pgfleet.repository import schema
from tests.fix_clusters import NewDatabase
from tests.fix_repository import RunCli, connect, scalar, scalar_int


def test_init_is_idempotent(run_cli: RunCli, repo: str) -> None:
    res = run_cli("repo", "init")
    assert res.rc == 0, res.err
    assert f"already at schema version {schema.latest_version()}" in res.out
    res = run_cli("repo", "status")
    assert res.rc == 0 and "up to date" in res.out


def test_upgrade_keeps_collected_data(
    pg18: Cluster, new_database: NewDatabase, monitored: Cluster, run_cli: RunCli
) -> None:
    """An old repository holding data is upgraded in place; nothing is lost."""
    dsn = new_database(pg18)
    first = schema.migrations()[0]
    with connect(dsn) as conn:
        # A repository as the first release left it.
        conn.execute("CREATE SCHEMA pgfleet")
        conn.execute(
            "CREATE TABLE pgfleet.schema_migrations (version integer PRIMARY KEY, "
            "name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        conn.execute(first.sql)
        conn.execute(
            "INSERT INTO pgfleet.schema_migrations VALUES (%s, %s)", (first.version, first.name)
        )
        conn.execute("INSERT INTO pgfleet.servers (alias, host, port) VALUES ('old', 'h', 5432)")
        conn.execute(
            "INSERT INTO pgfleet.snapshot_state (srvid, snapshots) "
            "SELECT srvid, 42 FROM pgfleet.servers WHERE alias = 'old'"
        )
        conn.execute(
            "SELECT pgfleet.record_error(srvid, 'x', 'kept') FROM pgfleet.servers "
            "WHERE alias = 'old'"
        )
    res = run_cli("repo", "upgrade", env={"PGFLEET_REPOSITORY": dsn})
    assert res.rc == 0, res.err
    assert "applied" in res.out
    assert (
        scalar(dsn, "SELECT max(version) FROM pgfleet.schema_migrations") == schema.latest_version()
    )
    assert (
        scalar(
            dsn,
            "SELECT snapshots FROM pgfleet.snapshot_state s JOIN pgfleet.servers "
            "USING (srvid) WHERE alias = 'old'",
        )
        == 42
    )
    assert scalar(dsn, "SELECT message FROM pgfleet.snapshot_errors") == "kept"

    # Collected data survives a later upgrade, which also re-installs the
    # built-in sources.
    mon = new_database(monitored)
    add_server_env = {"PGFLEET_REPOSITORY": dsn}
    p = psycopg.conninfo.conninfo_to_dict(mon)
    assert (
        run_cli(
            "server",
            "add",
            "mon",
            "--host",
            str(p["host"]),
            "--port",
            str(p["port"]),
            "--user",
            "postgres",
            "--dbname",
            str(p["dbname"]),
            env=add_server_env,
        ).rc
        == 0
    )
    assert run_cli("snapshot", "mon", env=add_server_env).rc == 0
    before = scalar_int(dsn, "SELECT count(*) FROM pgfleet.pg_stat_database_current")
    assert before and before > 0
    assert run_cli("repo", "upgrade", env=add_server_env).rc == 0
    assert scalar(dsn, "SELECT count(*) FROM pgfleet.pg_stat_database_current") == before


def test_concurrent_upgrades_serialise(pg18: Cluster, new_database: NewDatabase) -> None:
    dsn = new_database(pg18)
    errors: list[BaseException] = []

    def upgrade() -> None:
        try:
            with psycopg.connect(dsn, autocommit=True) as conn:
                schema.upgrade(conn)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=upgrade) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert scalar(dsn, "SELECT count(*) FROM pgfleet.schema_migrations") == len(schema.migrations())


def test_newer_repository_is_refused(repo: str) -> None:
    with connect(repo) as conn:
        conn.execute("INSERT INTO pgfleet.schema_migrations VALUES (9999, 'future')")
        with pytest.raises(RepositoryError, match="newer than this pgfleet"):
            schema.upgrade(conn)
        with pytest.raises(RepositoryError, match="newer than this pgfleet"):
            schema.require_current(conn)


def test_uninitialised_repository_is_named(
    pg18: Cluster, new_database: NewDatabase, run_cli: RunCli
) -> None:
    dsn = new_database(pg18)
    res = run_cli("server", "list", env={"PGFLEET_REPOSITORY": dsn})
    assert res.rc == 1
    assert (
        res.err.strip()
        == "pgfleet: error: the repository is not initialised: run 'pgfleet repo init'"
    )


def _toasted(dsn: str, table: str) -> bool:
    return bool(
        scalar(dsn, "SELECT reltoastrelid <> 0 FROM pg_class WHERE oid = %s::regclass", (table,))
    )


def test_upgrade_to_inline_rollups(
    pg18: Cluster,
    new_database: NewDatabase,
    monitored: Cluster,
    run_cli: RunCli,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """0005 in place: the rollup triggers go, the snapshot functions are made
    again, transient tables of short rows lose their TOAST table, and the
    data collected before stays and keeps growing."""
    dsn = new_database(pg18)
    env = {"PGFLEET_REPOSITORY": dsn}
    every = schema.migrations
    monkeypatch.setattr(schema, "migrations", lambda: [m for m in every() if m.version < 5])
    with connect(dsn) as conn:
        schema.upgrade(conn)
        # A transient table as the installer made them before 0005.
        activity = builtin()["pg_stat_activity"]
        conn.execute("DROP TABLE pgfleet.pg_stat_activity_src_tmp")
        conn.execute(
            "CREATE UNLOGGED TABLE pgfleet.pg_stat_activity_src_tmp "
            "(srvid integer NOT NULL, ts timestamptz NOT NULL, "
            + ", ".join(f"{c.name} {c.type}" for c in activity.columns)
            + ")"
        )
    assert _toasted(dsn, "pgfleet.pg_stat_activity_src_tmp")
    trigger = "SELECT count(*) FROM pg_trigger WHERE tgname = 'rollup_add'"
    assert scalar_int(dsn, trigger) > 0
    p = psycopg.conninfo.conninfo_to_dict(new_database(monitored))
    args = ["--host", str(p["host"]), "--port", str(p["port"]), "--dbname", str(p["dbname"])]
    assert run_cli("server", "add", "mon", "--user", "postgres", *args, env=env).rc == 0
    assert run_cli("snapshot", "mon", env=env).rc == 0
    assert run_cli("snapshot", "mon", env=env).rc == 0
    snapshots = "SELECT count(DISTINCT ts) FROM pgfleet.pg_stat_database_current"
    before = scalar_int(dsn, "SELECT count(*) FROM pgfleet.pg_stat_statements_rollup")
    assert before and before > 0

    monkeypatch.setattr(schema, "migrations", lambda: [m for m in every() if m.version <= 5])
    with connect(dsn) as conn:
        assert [m.version for m in schema.upgrade(conn)] == [5]
    assert scalar(dsn, trigger) == 0
    assert not _toasted(dsn, "pgfleet.pg_stat_activity_src_tmp")
    assert _toasted(dsn, "pgfleet.pg_stat_statements_src_tmp")
    assert (
        scalar(
            dsn,
            "SELECT count(*) FROM pg_class WHERE relname LIKE '%%\\_src\\_tmp'"
            " AND NOT 'autovacuum_enabled=false' = ANY (coalesce(reloptions, '{}'))",
        )
        == 0
    )
    assert scalar(dsn, "SELECT count(*) FROM pgfleet.pg_stat_statements_rollup") == before
    assert scalar(dsn, snapshots) == 2
    assert run_cli("snapshot", "mon", env=env).rc == 0
    assert scalar(dsn, snapshots) == 3
    # The third snapshot's rollups, written without the trigger.
    assert scalar_int(dsn, "SELECT count(*) FROM pgfleet.pg_stat_statements_rollup") > before
    assert scalar(dsn, "SELECT count(*) FROM pgfleet.snapshot_errors") == 0
