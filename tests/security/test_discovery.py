"""Who may write the servers registry: discovery providers, unprivileged roles.

A discovery provider only ever writes the rows it created: a file_sd target
named like a server added by hand, like ``local`` or like another provider's
server changes nothing, is not collected, and is logged (once) as an error.
The CLI says in one line when the repository refuses it a write.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import psycopg
import pytest

from pgfleet.cluster import Cluster
from pgfleet.repository import schema
from tests.fix_clusters import NewDatabase
from tests.fix_daemon import DaemonFactory, wait_until
from tests.fix_repository import RunCli, add_server, connect, new_repository, scalar

TAKEN = "discovered server ignored: its alias is taken, the server left unchanged"


@pytest.fixture
def repo(repo_cluster: Cluster, new_database: NewDatabase) -> str:
    """A fresh repository, on this module's own cluster (see fix_daemon)."""
    return new_repository(repo_cluster, new_database)


def row(repo: str, alias: str) -> str:
    """The whole row of a server, as text."""
    v = scalar(repo, "SELECT s::text FROM pgfleet.servers s WHERE alias = %s", (alias,))
    assert isinstance(v, str), alias
    return v


def snapshots(repo: str, alias: str) -> int:
    v = scalar(
        repo,
        """SELECT coalesce(st.snapshots, 0) FROM pgfleet.servers s
             LEFT JOIN pgfleet.snapshot_state st USING (srvid) WHERE s.alias = %s""",
        (alias,),
    )
    return v if isinstance(v, int) else 0


def test_file_sd_cannot_take_over_servers(
    repo: str, run_cli: RunCli, daemon: DaemonFactory, mon: Cluster, tmp_path: Path
) -> None:
    add_server(run_cli, "by-hand", mon.dsn(), "--frequency", "1")
    before = {a: row(repo, a) for a in ("by-hand", "local")}
    nowhere = {"user": "intruder", "password_ref": "env:PGFLEET_PW_INTRUDER", "frequency": "1"}
    targets = tmp_path / "targets.json"
    targets.write_text(
        json.dumps(
            [
                # Named like a server added by hand, and like the repository itself.
                {"targets": ["127.0.0.1:1"], "labels": {"alias": "by-hand", **nowhere}},
                {"targets": ["127.0.0.1:1"], "labels": {"alias": "local", **nowhere}},
                # Not colliding: registered and collected as usual.
                {
                    "targets": [f"{mon.host}:{mon.port}"],
                    "labels": {"alias": "fresh", "user": "postgres", "frequency": "1"},
                },
            ]
        )
    )
    static = [{"alias": "st1", "host": mon.host, "port": mon.port, "user": "postgres"}]
    d = daemon(
        repo,
        name="a",
        env={"PGFLEET_PW_INTRUDER": "x"},
        discovery={
            "providers": ["repository", "static", "file_sd"],
            "files": [str(targets)],
            "servers": static,
        },
    )
    wait_until(lambda: snapshots(repo, "fresh") >= 2, 20, "snapshots of the discovered server")
    # The hand-added server is collected with its own settings, as before.
    wait_until(lambda: snapshots(repo, "by-hand") >= 2, 10, "snapshots of the hand-added server")
    time.sleep(3)  # a few refreshes (1 s each)
    assert {a: row(repo, a) for a in ("by-hand", "local")} == before
    with connect(repo) as conn:
        providers = dict(conn.execute("SELECT alias, provider FROM pgfleet.servers").fetchall())
        errors = conn.execute("SELECT count(*) FROM pgfleet.snapshot_errors").fetchall()
    assert providers == {"local": None, "by-hand": None, "fresh": "file_sd", "st1": "static"}
    assert errors == [(0,)], "a server was pointed at the intruder's host"
    # Said once per alias, not at every refresh; never collected.
    taken = {e["server"]: e for e in d.find(TAKEN)}
    assert len(d.find(TAKEN)) == 2, d.find(TAKEN)
    assert taken["by-hand"]["owner"] == "pgfleet server add"
    assert taken["local"]["owner"] == "local"
    assert taken["by-hand"]["origin"] == str(targets) and taken["by-hand"]["level"] == "error"
    assert not d.find("server collected here", server="local")
    assert "intruder" not in row(repo, "by-hand") + row(repo, "local")

    # The hand-added server removed, the name is free: the file's entry is
    # registered at the next refresh (as its provider's).
    assert run_cli("server", "remove", "by-hand").rc == 0
    wait_until(lambda: d.find("alias collision over", server="by-hand"), 10, "the new owner")
    assert scalar(repo, "SELECT provider FROM pgfleet.servers WHERE alias = 'by-hand'") == (
        "file_sd"
    )
    assert len(d.find(TAKEN, server="local")) == 1

    # Another collector's file naming this one's static server: nothing changes.
    st1 = row(repo, "st1")
    other = tmp_path / "other.json"
    other.write_text(json.dumps([{"targets": ["127.0.0.1:1"], "labels": {"alias": "st1"}}]))
    b = daemon(repo, name="b", discovery={"providers": ["file_sd"], "files": [str(other)]})
    wait_until(lambda: b.find(TAKEN, server="st1"), 15, "b's collision")
    assert b.find(TAKEN, server="st1")[0]["owner"] == "static"
    assert b.find(TAKEN, server="st1")[0]["owner_origin"] == str(d.config)
    assert row(repo, "st1") == st1
    assert b.stop() == 0
    assert d.stop() == 0


def test_migration_gives_local_back(repo_cluster: Cluster, new_database: NewDatabase) -> None:
    """A repository where a provider took local over: 0011 gives it its settings back."""
    dsn = new_database(repo_cluster)
    with psycopg.connect(dsn, autocommit=True) as conn:
        with conn.transaction():
            conn.execute("CREATE SCHEMA pgfleet")
            conn.execute(
                "CREATE TABLE pgfleet.schema_migrations (version integer PRIMARY KEY,"
                " name text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"
            )
            for mig in schema.migrations():
                if mig.version < 11:
                    conn.execute(mig.sql.encode())
                    conn.execute(
                        "INSERT INTO pgfleet.schema_migrations (version, name) VALUES (%s, %s)",
                        (mig.version, mig.name),
                    )
        conn.execute(
            "UPDATE pgfleet.servers SET host = 'intruder', port = 1, username = 'x',"
            " password_ref = 'env:X', provider = 'file_sd' WHERE srvid = 0"
        )
        conn.execute(
            "INSERT INTO pgfleet.servers (alias, provider) VALUES ('odd', 'ldap'), ('f', 'file_sd')"
        )
        schema.upgrade(conn)
        rows = conn.execute(
            "SELECT alias, host, port, username, password_ref, provider, origin"
            " FROM pgfleet.servers ORDER BY srvid"
        ).fetchall()
        assert rows == [
            ("local", "", 5432, "", None, None, None),
            ("odd", "", 5432, "", None, None, None),
            ("f", "", 5432, "", None, "file_sd", None),
        ]
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("UPDATE pgfleet.servers SET provider = 'static' WHERE srvid = 0")
        with pytest.raises(psycopg.errors.CheckViolation):
            conn.execute("UPDATE pgfleet.servers SET provider = 'ldap' WHERE alias = 'f'")


# -- The CLI, refused a write


def test_cli_says_what_the_repository_refused(
    repo: str, run_cli: RunCli, repo_cluster: Cluster
) -> None:
    dbname = str(psycopg.conninfo.conninfo_to_dict(repo)["dbname"])
    repo_cluster.execute("DROP ROLE IF EXISTS cli_reader")
    repo_cluster.execute("CREATE ROLE cli_reader LOGIN PASSWORD 'pw'")
    repo_cluster.execute("GRANT USAGE ON SCHEMA pgfleet TO cli_reader", dbname=dbname)
    repo_cluster.execute(
        "GRANT SELECT ON ALL TABLES IN SCHEMA pgfleet TO cli_reader", dbname=dbname
    )
    reader = psycopg.conninfo.make_conninfo(repo, user="cli_reader", password="pw")
    assert run_cli("server", "add", "db1", "--host", "h").rc == 0
    try:
        refused: list[tuple[str, ...]] = [
            ("server", "add", "db2", "--host", "h"),
            ("server", "update", "db1", "--port", "5433"),
            ("server", "remove", "db1"),
            ("repo", "upgrade"),
        ]
        for args in refused:
            res = run_cli("--repository", reader, *args)
            assert res.rc == 1, (args, res)
            assert res.err.count("\n") == 1 and "Traceback" not in res.err, res.err
            assert res.err.startswith("pgfleet: error: repository: permission denied"), res.err
            assert "the repository role lacks this privilege" in res.err
        assert run_cli("--repository", reader, "server", "list").rc == 0

        # A read-only repository (a standby would say the same).
        repo_cluster.execute(f'ALTER DATABASE "{dbname}" SET default_transaction_read_only = on')
        read_only: list[tuple[str, ...]] = [
            ("server", "add", "db3", "--host", "h"),
            ("server", "update", "db1", "--port", "5433"),
            ("server", "remove", "db1", "--purge"),
        ]
        for args in read_only:
            res = run_cli(*args)
            assert res.rc == 1, (args, res)
            assert res.err.count("\n") == 1, res.err
            assert "read-only transaction" in res.err and "the repository is read-only" in res.err
    finally:
        repo_cluster.execute(f'ALTER DATABASE "{dbname}" RESET default_transaction_read_only')
        repo_cluster.execute("DROP OWNED BY cli_reader", dbname=dbname)
        repo_cluster.execute("DROP ROLE cli_reader")


def test_cli_port_and_numbers_are_checked(run_cli: RunCli) -> None:
    for value in ("0", "65536", "-1", "1_000", "\u0663", "99999999999999999999", "x"):
        res = run_cli("server", "add", "x", "--port", value)
        assert res.rc == 2, value
        assert res.err.count("\n") == 1 and "must be between 1 and 65535" in res.err, res.err
    res = run_cli("server", "add", "x", "--port", "5433\n--x")
    assert res.rc == 2 and res.err.count("\n") == 1, res.err
    for value in ("inf", "nan", "-5d", "1e400d", "0"):
        res = run_cli("server", "add", "x", f"--retention={value}")
        assert res.rc == 2 and "invalid duration" in res.err, (value, res.err)
    res = run_cli("server", "add", "x", "--frequency", "4294967296")
    assert res.rc == 1 and "invalid frequency" in res.err, res.err
    res = run_cli("status", "--timeout", "nan")
    assert res.rc == 2 and "invalid number of seconds" in res.err
