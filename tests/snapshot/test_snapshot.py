"""One-shot remote and local snapshots of real servers, and how they fail."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from pgfleet.cluster import Cluster
from pgfleet.config import CollectorConfig
from pgfleet.datasources import builtin
from pgfleet.repository import servers
from pgfleet.snapshot.fetch import ServerSession
from pgfleet.snapshot.model import FailureKind, SnapshotResult
from pgfleet.snapshot.stream import snapshot_remote
from tests.fix_clusters import NewCluster, NewDatabase
from tests.fix_repository import RunCli, add_server, connect, one_row, scalar, scalar_int


def _srvid(repo: str, alias: str) -> int:
    v = scalar(repo, "SELECT srvid FROM pgfleet.servers WHERE alias = %s", (alias,))
    assert isinstance(v, int)
    return v


def _monitor_role(dsn: str, name: str, password: str) -> None:
    with connect(dsn) as conn:
        conn.execute(f"DROP ROLE IF EXISTS {name}")
        conn.execute(f"CREATE ROLE {name} LOGIN PASSWORD '{password}' IN ROLE pg_monitor")


def test_every_builtin_source_as_pg_monitor(
    repo: str, run_cli: RunCli, monitored: Cluster, new_database: NewDatabase
) -> None:
    """A pg_monitor role is enough: every applicable source is stored, no errors."""
    mon = new_database(monitored)
    with connect(mon) as conn:
        conn.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
        conn.execute("INSERT INTO t SELECT g, 'x' FROM generate_series(1, 100) g")
        conn.execute("CREATE FUNCTION f() RETURNS int LANGUAGE sql AS 'SELECT 1'")
        conn.execute("SELECT f(), count(*) FROM t")
    role = f"mon_{monitored.port}"
    _monitor_role(mon, role, "s3cret")
    add_server(run_cli, "mon", mon, "--password-ref", "env:PGFLEET_PW_MON")
    assert run_cli("server", "update", "mon", "--user", role).rc == 0
    env = {"PGFLEET_PW_MON": "s3cret"}

    res = run_cli("snapshot", "mon", "--json", env=env)
    assert res.rc == 0, res.err
    first = json.loads(res.out)
    assert first["errors"] == {}
    expected = set(builtin())
    assert set(first["stored"]) | set(first["skipped"]) == expected
    # pg_stat_statements is the point of the exercise.
    assert "pg_stat_statements" in first["stored"]
    if monitored.version_num >= 160000:
        assert "pg_stat_io" in first["stored"]
    else:
        assert first["skipped"]["pg_stat_io"] == "not available on PostgreSQL 15"

    with connect(mon) as conn:
        for _ in range(5):
            conn.execute("SELECT f(), count(*) FROM t WHERE id < 50")
    res = run_cli("snapshot", "mon", "--json", env=env)
    assert res.rc == 0, res.err
    srvid = _srvid(repo, "mon")
    with connect(repo) as conn:
        # Per-database sources reached the test database.
        assert (
            one_row(
                conn,
                "SELECT count(*) FROM pgfleet.pg_stat_user_tables_last"
                " WHERE srvid = %s AND datname = %s AND relname = 't'",
                (srvid, conninfo_to_dict(mon)["dbname"]),
            )[0]
            == 1
        )
        # The statement's calls since the first snapshot are a delta of 5.
        rows = conn.execute(
            """
            SELECT c.calls FROM pgfleet.pg_stat_statements_current c
              JOIN pgfleet.pg_stat_statements_once o USING (srvid, datname, rolname, toplevel, queryid)
             WHERE c.srvid = %s AND o.query LIKE 'SELECT f(), count(*) FROM t WHERE id < $1%%'
             ORDER BY c.ts""",
            (srvid,),
        ).fetchall()
        assert rows[-1] == (5,)
        # Query texts are stored once per query, not per snapshot.
        assert one_row(
            conn,
            """
            SELECT count(*) = count(DISTINCT (datname, rolname, toplevel, queryid))
              FROM pgfleet.pg_stat_statements_once WHERE srvid = %s""",
            (srvid,),
        )[0]
        assert scalar(repo, "SELECT count(*) FROM pgfleet.snapshot_errors") == 0
        assert conn.execute(
            "SELECT server_version_num, in_recovery FROM pgfleet.snapshot_state WHERE srvid = %s",
            (srvid,),
        ).fetchone() == (monitored.version_num, False)


def test_standby_skips_what_does_not_apply(
    repo: str, run_cli: RunCli, pg15: Cluster, pg15_standby: Cluster
) -> None:
    add_server(run_cli, "standby", pg15_standby.dsn())
    res = run_cli("snapshot", "standby", "--json")
    assert res.rc == 0, res.err
    result = json.loads(res.out)
    assert result["errors"] == {}
    assert "wal_receiver" in result["stored"]
    srvid = _srvid(repo, "standby")
    assert (
        scalar(repo, "SELECT in_recovery FROM pgfleet.snapshot_state WHERE srvid = %s", (srvid,))
        is True
    )
    assert (
        scalar(repo, "SELECT count(*) FROM pgfleet.wal_receiver_current WHERE srvid = %s", (srvid,))
        == 1
    )


def test_local_snapshot(repo: str, run_cli: RunCli) -> None:
    res = run_cli("snapshot", "--local", "--json")
    assert res.rc == 0, res.err
    result = json.loads(res.out)
    assert "pg_stat_database" in result["stored"]
    assert (
        scalar_int(repo, "SELECT count(*) FROM pgfleet.pg_stat_database_current WHERE srvid = 0")
        > 0
    )


def _nothing_written(repo: str, srvid: int) -> None:
    with connect(repo) as conn:
        for (module,) in conn.execute("SELECT module FROM pgfleet.metric_sources").fetchall():
            n = one_row(
                conn, f"SELECT count(*) FROM pgfleet.{module}_current WHERE srvid = %s", (srvid,)
            )[0]
            assert n == 0, module
            n = one_row(conn, f"SELECT count(*) FROM pgfleet.{module}_src_tmp")[0]
            assert n == 0, module


def test_unreachable_server(repo: str, run_cli: RunCli) -> None:
    assert run_cli("server", "add", "gone", "--host", "127.0.0.1", "--port", "1").rc == 0
    res = run_cli("snapshot", "gone")
    assert res.rc == 1
    lines = res.err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("pgfleet: error: server 'gone': cannot connect:")
    assert "refused" in lines[0].lower()
    srvid = _srvid(repo, "gone")
    _nothing_written(repo, srvid)
    # The failure is on the record.
    assert (
        scalar(repo, "SELECT source FROM pgfleet.snapshot_errors WHERE srvid = %s", (srvid,))
        == "connection"
    )


def test_wrong_password_never_echoed(
    repo: str, run_cli: RunCli, pg18: Cluster, new_database: NewDatabase
) -> None:
    mon = new_database(pg18)
    _monitor_role(mon, "pwtest", "right-one")
    add_server(run_cli, "pw", mon, "--password-ref", "env:PGFLEET_PW_PW")
    assert run_cli("server", "update", "pw", "--user", "pwtest").rc == 0
    res = run_cli("snapshot", "pw", env={"PGFLEET_PW_PW": "wrong-one"})
    assert res.rc == 1
    assert len(res.err.strip().splitlines()) == 1
    assert 'password authentication failed for user "pwtest"' in res.err
    assert "wrong-one" not in res.err + res.out
    _nothing_written(repo, _srvid(repo, "pw"))
    # A reference to an unset variable is named, not sent.
    res = run_cli("snapshot", "pw")
    assert res.rc == 1
    assert "environment variable PGFLEET_PW_PW is not set" in res.err
    # The repository never saw a password.
    assert "wrong-one" not in str(scalar(repo, "SELECT array_agg(s::text) FROM pgfleet.servers s"))


def test_missing_extension_is_skipped_by_name(
    repo: str, run_cli: RunCli, pg18: Cluster, new_database: NewDatabase
) -> None:
    mon = new_database(pg18)
    with connect(mon) as conn:
        conn.execute("DROP EXTENSION IF EXISTS pg_stat_statements")
    add_server(run_cli, "nopgss", mon)
    res = run_cli("snapshot", "nopgss")
    assert res.rc == 0, res.err
    # The embedded PostgreSQL has no pg_stat_kcache.  (pg_stat_statements,
    # dropped here, is read in another database of the server that has it:
    # tests/snapshot/test_extension_placement.py.)
    assert "pg_stat_kcache (extension pg_stat_kcache is not installed in any database)" in res.out


def test_missing_privilege_fails_only_that_source(
    repo: str, run_cli: RunCli, pg18: Cluster, new_database: NewDatabase
) -> None:
    """Without pg_monitor, what PostgreSQL refuses is one recorded error per source."""
    mon = new_database(pg18)
    with connect(mon) as conn:
        conn.execute("DROP ROLE IF EXISTS plain")
        conn.execute("CREATE ROLE plain LOGIN PASSWORD 'p'")
    add_server(run_cli, "plain", mon, "--password-ref", "env:PGFLEET_PW_PLAIN")
    assert run_cli("server", "update", "plain", "--user", "plain").rc == 0
    res = run_cli("snapshot", "plain", "--json", env={"PGFLEET_PW_PLAIN": "p"})
    result = json.loads(res.out)
    # pg_stat_database is readable by anyone and is stored regardless.
    assert "pg_stat_database" in result["stored"]
    for line in res.err.strip().splitlines():
        assert line.startswith("pgfleet: error: server 'plain': ")


@pytest.mark.parametrize(
    "content, message",
    [
        ("[repository]\ndns = 'x'\n", "repository.dns: unknown key"),
        (
            "[collector]\nstatement_timeout = 'soon'\n",
            "collector.statement_timeout: expected a number",
        ),
        ("[collector\n", "invalid configuration"),
    ],
)
def test_invalid_config_file(run_cli: RunCli, tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "pgfleet.toml"
    path.write_text(content)
    res = run_cli("-c", str(path), "server", "list")
    assert res.rc == 1
    assert len(res.err.strip().splitlines()) == 1
    assert message in res.err
    assert str(path) in res.err


def test_invalid_arguments(run_cli: RunCli) -> None:
    res = run_cli("server", "add", "x", "--port", "70000")
    assert res.rc == 2
    assert "invalid port 70000" in res.err
    res = run_cli("server", "add", "bad alias!")
    assert res.rc == 1
    assert res.err.strip().startswith("pgfleet: error: invalid alias 'bad alias!'")
    res = run_cli("server", "add", "x", "--options", "password=oops")
    assert res.rc == 1 and "may not contain a password" in res.err
    res = run_cli("snapshot", "nope")
    assert res.rc == 1
    assert res.err.strip() == "pgfleet: error: no server named 'nope' (see 'pgfleet server list')"


def test_unreachable_database_loses_only_its_rows(
    repo: str, run_cli: RunCli, new_cluster: NewCluster
) -> None:
    """Per-database sources of a database the role may not connect to record
    that, and the other databases' rows and the cluster-wide sources (on the
    main connection) are stored."""
    mon = new_cluster("refusing", shared_preload_libraries=["pg_stat_statements"])
    app = mon.create_database("app")
    # First in name order: the connection the cluster-wide sources would use.
    mon.create_database("a_refused")
    with connect(mon.dsn()) as conn:
        conn.execute("REVOKE CONNECT ON DATABASE a_refused FROM PUBLIC")
        conn.execute("CREATE ROLE mon LOGIN PASSWORD 'm' IN ROLE pg_monitor")
    with connect(app) as conn:
        conn.execute("CREATE EXTENSION pg_stat_statements")
        conn.execute("CREATE TABLE t (id int)")
    add_server(run_cli, "refusing", app, "--password-ref", "env:PGFLEET_PW_MON")
    assert run_cli("server", "update", "refusing", "--user", "mon").rc == 0
    res = run_cli("snapshot", "refusing", "--json", env={"PGFLEET_PW_MON": "m"})
    assert res.rc == 3, res.err
    result = json.loads(res.out)
    per_database = {
        m for m, ds in builtin().items() if ds.per_database and m not in result["skipped"]
    }
    assert {"pg_stat_user_tables", "pg_stat_user_indexes"} <= per_database
    # Recorded as failed, though the rows of the databases reached are stored.
    assert set(result["errors"]) == per_database
    for message in result["errors"].values():
        assert "a_refused" in message
    for module in ("pg_stat_database", "settings", "pg_stat_statements", "pg_stat_activity"):
        assert module in result["stored"]
    srvid = _srvid(repo, "refusing")
    assert scalar(
        repo,
        "SELECT array_agg(DISTINCT datname) FROM pgfleet.pg_stat_user_tables_last WHERE srvid = %s",
        (srvid,),
    ) == ["app"]
    assert (
        scalar_int(repo, "SELECT count(*) FROM pgfleet.settings_last WHERE srvid = %s", (srvid,))
        > 100
    )


async def _snapshots(repo: str, alias: str, n: int, **kwargs: float) -> list[SnapshotResult]:
    """``n`` one-shot snapshots of ``alias`` over one session, as the bench takes them."""
    cfg = CollectorConfig()
    with psycopg.connect(repo) as conn:
        server = servers.get(conn, alias)
    session = ServerSession(server, cfg)
    out = []
    async with await psycopg.AsyncConnection.connect(repo, autocommit=True) as conn:
        for _ in range(n):
            out.append(await snapshot_remote(conn, server, cfg, session=session, **kwargs))
    await session.close()
    return out


def test_unchanged_sources_are_not_staged_again(
    repo: str, pg18: Cluster, new_database: NewDatabase, run_cli: RunCli
) -> None:
    """A built-in source whose rows did not change since the previous snapshot
    this process stored is left out (it would write nothing), and still
    reported stored; a change, or a snapshot stored by someone else in
    between, brings it back."""
    mon = new_database(pg18)
    add_server(run_cli, "same", mon)
    srvid = _srvid(repo, "same")

    def snapshots(n: int) -> list[SnapshotResult]:
        return asyncio.run(_snapshots(repo, "same", n))

    first, second = snapshots(2)
    assert first.unchanged == []
    assert "settings" in second.unchanged
    assert "pg_stat_statements" not in second.unchanged
    assert set(second.unchanged) <= set(second.stored)
    assert second.failures == []
    settings_rows = "SELECT count(*) FROM pgfleet.settings_current WHERE srvid = %s"
    before = scalar_int(repo, settings_rows, (srvid,))
    with connect(mon) as conn:
        conn.execute("ALTER SYSTEM SET work_mem = '5MB'")
        conn.execute("SELECT pg_reload_conf()")
    try:
        (changed,) = snapshots(1)
        assert "settings" not in changed.unchanged
        assert scalar(repo, settings_rows, (srvid,)) == before + 1
        (same,) = snapshots(1)
        assert "settings" in same.unchanged
        # Another snapshot stored since: nothing is left out.
        with connect(repo) as conn:
            conn.execute(
                "UPDATE pgfleet.snapshot_state SET snapshots = snapshots + 1 WHERE srvid = %s",
                (srvid,),
            )
        (after,) = snapshots(1)
        assert after.unchanged == []
    finally:
        with connect(mon) as conn:
            conn.execute("ALTER SYSTEM RESET work_mem")
            conn.execute("SELECT pg_reload_conf()")
    # Each source's transient table is empty, left out or not.
    with connect(repo) as conn:
        for (module,) in conn.execute("SELECT module FROM pgfleet.metric_sources").fetchall():
            assert one_row(conn, f"SELECT count(*) FROM pgfleet.{module}_src_tmp")[0] == 0


_PROBE_CALLS = """
SELECT sum(c.calls) FROM pgfleet.pg_stat_statements_current c
  JOIN pgfleet.pg_stat_statements_once o USING (srvid, datname, rolname, toplevel, queryid)
 WHERE c.srvid = %s AND o.query LIKE %s
"""


@pytest.mark.parametrize("how", ["streamed", "given up", "lock taken"])
def test_streamed_snapshot_stores_every_row(
    repo: str, pg18: Cluster, new_database: NewDatabase, run_cli: RunCli, how: str
) -> None:
    """pg_stat_statements' rows go into the repository while the server sends
    them when the snapshot lock is free; when it is not, or the server takes
    longer than the lock may be held, the snapshot is stored from the spools.
    Either way every row is there: a statement run 7 times between two
    snapshots has 7 calls, and the transient table is left empty."""
    mon = new_database(pg18)
    add_server(run_cli, "streamed", mon)
    srvid = _srvid(repo, "streamed")
    probe = f"SELECT %s AS probe_{how.replace(' ', '_')}"
    # The test clusters hold many databases, each fetched on its own
    # connection: give the streamed case all the time it needs.
    hold = 1e-6 if how == "given up" else 60.0
    asyncio.run(_snapshots(repo, "streamed", 1, stream_hold=hold))
    with connect(mon) as conn:
        for i in range(7):
            conn.execute(probe, (i,))
    locker = psycopg.connect(repo, autocommit=True)
    try:
        if how == "lock taken":
            locker.execute("BEGIN")
            locker.execute("SELECT pgfleet.snapshot_lock()")

        async def taken_then_released() -> SnapshotResult:
            task = asyncio.create_task(_snapshots(repo, "streamed", 1, stream_hold=hold))
            if how == "lock taken":
                # Fetched, then waiting for the lock to store: not holding it.
                await asyncio.sleep(1.0)
                assert not task.done()
                locker.execute("COMMIT")
            (result,) = await task
            return result

        result = asyncio.run(taken_then_released())
    finally:
        locker.close()
    assert result.failures == []
    assert "pg_stat_statements" in result.stored
    assert ("stream" in result.phases) is (how == "streamed")
    like = f"%probe_{how.replace(' ', '_')}%"
    assert scalar(repo, _PROBE_CALLS, (srvid, like)) == 7
    assert scalar(repo, "SELECT count(*) FROM pgfleet.pg_stat_statements_src_tmp") == 0


def test_failing_streamed_source_loses_only_itself(
    repo: str, pg18: Cluster, new_database: NewDatabase, run_cli: RunCli
) -> None:
    """pg_stat_statements at a version the source's SQL does not fit fails on
    the server while its rows were being streamed: none of them stays, the
    failure is recorded, and every other source is stored."""
    mon = new_database(pg18)
    with connect(mon) as conn:
        conn.execute("DROP EXTENSION pg_stat_statements")
        conn.execute("CREATE EXTENSION pg_stat_statements VERSION '1.4'")
    add_server(run_cli, "old_pgss", mon)
    srvid = _srvid(repo, "old_pgss")
    (result,) = asyncio.run(_snapshots(repo, "old_pgss", 1))
    (failure,) = result.failures
    assert (failure.source, failure.kind) == ("pg_stat_statements", FailureKind.QUERY)
    assert "does not exist" in failure.message
    assert "pg_stat_database" in result.stored and "pg_stat_statements" not in result.stored
    recorded = scalar(
        repo,
        "SELECT count(*) FROM pgfleet.snapshot_errors WHERE srvid = %s"
        " AND source = 'pg_stat_statements'",
        (srvid,),
    )
    assert recorded == 1
    for table in ("pg_stat_statements_src_tmp", "pg_stat_statements_last"):
        assert scalar(repo, f"SELECT count(*) FROM pgfleet.{table}") == 0
    assert scalar(
        repo, "SELECT count(*) FROM pgfleet.pg_stat_database_last WHERE srvid = %s", (srvid,)
    )
