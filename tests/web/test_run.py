"""`pgfleet run`: the collector and the web UI in one process, the UI's
collector page talking to that very collector through the command channel."""

from __future__ import annotations

from decimal import Decimal
from pathlib import Path

import httpx
import psycopg
import pytest

from pgfleet.cluster import Cluster, _free_port
from tests.fix_clusters import NewDatabase
from tests.fix_daemon import DaemonFactory, wait_until
from tests.fix_repository import RunCli, add_server, connect, new_repository, scalar


@pytest.fixture
def repo(repo_cluster: Cluster, new_database: NewDatabase) -> str:
    return new_repository(repo_cluster, new_database)


def _csrf(page: str) -> str:
    return page.split('name="csrf" value="')[1].split('"')[0]


def _snapshots(repo: str) -> int:
    v = scalar(repo, "SELECT coalesce(sum(snapshots), 0) FROM pgfleet.snapshot_state")
    assert isinstance(v, int | Decimal), v  # the sum of a bigint is a numeric
    return int(v or 0)


def test_run_serves_the_ui_next_to_the_collector(
    repo: str, run_cli: RunCli, daemon: DaemonFactory, mon: Cluster
) -> None:
    add_server(run_cli, "main", mon.dsn(), "--frequency", "3600")
    srvid = scalar(repo, "SELECT srvid FROM pgfleet.servers WHERE alias = 'main'")
    admin = f"run_admin_{repo_cluster_port(repo)}"
    with connect(repo) as conn:
        conn.execute(f"DROP ROLE IF EXISTS {admin}")
        conn.execute(f"CREATE ROLE {admin} LOGIN PASSWORD 's3cret!' IN ROLE pgfleet_admin")
    port = _free_port()
    d = daemon(repo, command="run", web={"enabled": True, "port": port})
    base = f"http://127.0.0.1:{port}"

    def up() -> bool:
        try:
            return httpx.get(f"{base}/login", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(up, 30, "the web UI of `pgfleet run` to answer")
    # The first snapshot comes at the server's slot in the hour: force one
    # from the UI instead, and see it land.
    with httpx.Client(base_url=base, timeout=15, follow_redirects=False) as c:
        r = c.post(
            "/login",
            data={
                "csrf": _csrf(c.get("/login").text),
                "username": admin,
                "password": "s3cret!",
                "next": "/collector",
            },
        )
        assert r.status_code == 303, r.text
        live = wait_until(
            lambda: (c.get("/collector.json").json()["live"] or {}).get("workers"),
            20,
            "the collector page to list the live workers",
        )
        assert [w["alias"] for w in live.values()] == ["main"]
        assert all(w["collector"] == d.name for w in live.values())

        before = _snapshots(repo)
        page = c.get("/collector").text
        assert "Snapshot now" in page
        r = c.post(f"/collector/snapshot/{srvid}", data={"csrf": _csrf(page)})
        assert r.status_code == 303
        flash = c.get("/collector").text
        assert "FORCE_SNAPSHOT OK" in flash
        wait_until(lambda: _snapshots(repo) > before, 20, "the snapshot forced from the UI")

        r = c.post("/collector/reload", data={"csrf": _csrf(c.get("/collector").text)})
        assert r.status_code == 303
        assert "configuration reloaded" in c.get("/collector").text
    # One process serves both: its exporter is up too, and it stops cleanly.
    assert httpx.get(f"{d.exporter_url}/metrics", timeout=5).status_code == 200
    assert d.stop() == 0
    assert d.find("web UI listening")


def test_run_says_which_port_is_busy(repo: str, daemon: DaemonFactory, tmp_path: Path) -> None:
    import socket

    with socket.create_server(("127.0.0.1", 0)) as busy:
        port = busy.getsockname()[1]
        d = daemon(repo, command="run", web={"enabled": True, "port": port})
        assert d.proc is not None
        assert d.proc.wait(30) != 0
    assert f"the web UI cannot listen on 127.0.0.1:{port}" in d.text()


def repo_cluster_port(dsn: str) -> str:
    return str(psycopg.conninfo.conninfo_to_dict(dsn).get("port", "x"))
