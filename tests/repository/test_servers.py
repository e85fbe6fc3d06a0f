"""pgfleet server add | list | update | remove."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import psycopg
import pytest
from psycopg.rows import dict_row

from pgfleet.cluster import Cluster
from pgfleet.errors import RepositoryError
from pgfleet.repository import servers
from tests.fix_clusters import NewDatabase
from tests.fix_repository import RunCli, add_server, connect, one_row, scalar


def test_add_list_update_remove(run_cli: RunCli) -> None:
    res = run_cli("server", "add", "db1", "--host", "db1.example", "--port", "6432",
                  "--user", "monitor", "--password-ref", "env:DB1_PW", "--frequency", "60",
                  "--retention", "3d", "--options", "sslmode=require")
    assert res.rc == 0, res.err
    assert res.out.strip() == "server 'db1' added (srvid 1)"
    listed = json.loads(run_cli("server", "list", "--json").out)
    assert listed == [{
        "srvid": 1, "alias": "db1", "host": "db1.example", "port": 6432, "username": "monitor",
        "dbname": "postgres", "password_ref": "env:DB1_PW", "options": "sslmode=require",
        "frequency": 60, "coalesce": 100, "retention_seconds": 3 * 86400, "enabled": True,
    }]
    text = run_cli("server", "list").out
    assert "db1.example" in text and "3d" in text

    assert run_cli("server", "update", "db1", "--disable", "--frequency", "30").rc == 0
    listed = json.loads(run_cli("server", "list", "--json").out)
    assert (listed[0]["enabled"], listed[0]["frequency"]) == (False, 30)

    assert run_cli("server", "add", "db1").err.strip() == \
        "pgfleet: error: a server named 'db1' already exists"
    res = run_cli("server", "remove", "db1")
    assert res.rc == 0
    assert "its data stays until retention removes it" in res.out
    assert json.loads(run_cli("server", "list", "--json").out) == []


def test_remove_purge_deletes_collected_data(
    repo: str, run_cli: RunCli, pg18: Cluster, new_database: NewDatabase
) -> None:
    mon = new_database(pg18)
    add_server(run_cli, "gone", mon)
    add_server(run_cli, "kept", mon)
    assert run_cli("snapshot", "gone").rc == 0
    assert run_cli("snapshot", "kept").rc == 0
    gone = scalar(repo, "SELECT srvid FROM pgfleet.servers WHERE alias = 'gone'")
    res = run_cli("server", "remove", "gone", "--purge")
    assert res.rc == 0 and "purged" in res.out
    with connect(repo) as conn:
        for (module,) in conn.execute("SELECT module FROM pgfleet.metric_sources").fetchall():
            for part in ("last", "current"):
                assert one_row(
                    conn,
                    f"SELECT count(*) FROM pgfleet.{module}_{part} WHERE srvid = %s", (gone,)
                )[0] == 0
        # The other server's data is untouched.
        assert one_row(
            conn,
            "SELECT count(*) FROM pgfleet.pg_stat_database_current c JOIN pgfleet.servers s "
            "USING (srvid) WHERE s.alias = 'kept'")[0] > 0


def test_passwords_are_refused(run_cli: RunCli) -> None:
    res = run_cli("server", "add", "x", "--password-ref", "hunter2")
    assert res.rc == 1
    assert "passwords are never stored in the repository" in res.err
    res = run_cli("server", "add", "x", "--options", "host=a password=hunter2")
    assert res.rc == 1
    assert "hunter2" not in res.err


def test_local_server_cannot_be_removed(run_cli: RunCli) -> None:
    res = run_cli("server", "remove", "local")
    assert res.rc == 1
    assert "cannot be removed" in res.err


def test_a_server_read_by_srvid_on_an_async_connection(repo: str, run_cli: RunCli) -> None:
    """What the web UI reads before it asks a server for advice or a plan:
    the same entry as the CLI's synchronous read, whatever the connection's
    row factory, and RepositoryError for a srvid no server has."""
    res = run_cli("server", "add", "srv1", "--host", "srv1.example", "--port", "6432",
                  "--password-ref", "env:SRV1_PW", "--retention", "2d")  # fmt: skip
    assert res.rc == 0, res.err
    with connect(repo) as conn:
        srvid = one_row(conn, "SELECT srvid FROM pgfleet.servers WHERE alias = 'srv1'")[0]
        expected = servers.by_srvid(conn, srvid)

    async def one(conn: psycopg.AsyncConnection[Any]) -> servers.Server:
        with pytest.raises(RepositoryError, match="no server with srvid 424242"):
            await servers.fetch_by_srvid(conn, 424242)
        return await servers.fetch_by_srvid(conn, srvid)

    async def read() -> list[servers.Server]:
        async with await psycopg.AsyncConnection.connect(repo, autocommit=True) as tuples:
            plain = await one(tuples)
        async with await psycopg.AsyncConnection.connect(
            repo, autocommit=True, row_factory=dict_row
        ) as dicts:
            return [plain, await one(dicts)]

    assert asyncio.run(read()) == [expected, expected]
    assert expected.alias == "srv1" and expected.port == 6432
    assert expected.password_ref == "env:SRV1_PW"
