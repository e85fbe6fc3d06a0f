"""The collector daemon as a real process, against real clusters.

Frequencies of 1-2 s and lease periods of 2 s keep each test to seconds.
"""

from __future__ import annotations

import json
import logging
import signal
import time
from pathlib import Path
from typing import Any

import psycopg
import pytest

from pgfleet import config
from pgfleet.cluster import Cluster
from pgfleet.errors import ConfigError
from pgfleet.repository import schema
from tests.fix_clusters import NewCluster, NewDatabase
from tests.fix_daemon import DaemonFactory, wait_until
from tests.fix_repository import (
    RunCli,
    add_server,
    connect,
    new_repository,
    one_row,
    scalar,
    scalar_int,
)


@pytest.fixture
def repo(repo_cluster: Cluster, new_database: NewDatabase) -> str:
    """A fresh repository, on this module's own cluster (see fix_daemon)."""
    return new_repository(repo_cluster, new_database)


def snapshots(repo: str, alias: str) -> int:
    v = scalar(
        repo,
        """SELECT coalesce(st.snapshots, 0) FROM pgfleet.servers s
             LEFT JOIN pgfleet.snapshot_state st USING (srvid) WHERE s.alias = %s""",
        (alias,),
    )
    assert v is None or isinstance(v, int), v
    return int(v or 0)


def srvid(repo: str, alias: str) -> int:
    v = scalar(repo, "SELECT srvid FROM pgfleet.servers WHERE alias = %s", (alias,))
    assert isinstance(v, int), alias
    return v


def leases(repo: str) -> dict[str, int]:
    with connect(repo) as conn:
        rows = conn.execute(
            "SELECT owner, count(*) FROM pgfleet.collector_leases GROUP BY owner"
        ).fetchall()
    return {r[0]: r[1] for r in rows}


def add(run_cli: RunCli, alias: str, cluster: Cluster, *extra: str) -> None:
    add_server(run_cli, alias, cluster.dsn(), *extra)


# -- Settings


def test_daemon_settings_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "pgfleet.toml"
    cases = [
        ("[collector]\nmax_in_flight = 0\n", "collector.max_in_flight: must be positive"),
        ("[collector]\nmax_in_flight = true\n", "collector.max_in_flight: expected int"),
        ("[logging]\nformat = 'xml'\n", "logging.format: 'xml' is not one of 'keyvalue', 'json'"),
        ("[discovery]\nproviders = ['ldap']\n", "discovery.providers: 'ldap' is not one of"),
        ("[discovery]\nfiles = 'x.json'\n", "discovery.files: expected an array"),
        ("[[discovery.servers]]\nhost = 'h'\n", "discovery.servers[0].alias: required"),
        (
            "[[discovery.servers]]\nalias = 'a'\nport = 'x'\n",
            "discovery.servers[0].port: expected int",
        ),
        ("[spool]\nmax_size = -1\n", "spool.max_size: must be positive"),
    ]
    for text, message in cases:
        path.write_text(text)
        with pytest.raises(ConfigError) as exc:
            config.load(path)
        assert str(exc.value) == f"invalid configuration {str(path)!r}: {message}" or (
            message in str(exc.value)
        ), text
    path.write_text(
        "[collector]\nmax_in_flight = 3\n[discovery]\nproviders = ['static', 'file_sd']\n"
        "files = ['/etc/pgfleet/*.json']\n[[discovery.servers]]\nalias = 'a'\nport = 5433\n"
    )
    cfg = config.load(path)
    assert cfg.collector.max_in_flight == 3
    assert cfg.discovery.providers == ("static", "file_sd")
    assert cfg.discovery.servers[0].alias == "a" and cfg.discovery.servers[0].port == 5433


def test_collector_command_line_errors(run_cli: RunCli, tmp_path: Path) -> None:
    res = run_cli("collector", env={"PGFLEET_REPOSITORY": ""})
    assert res.rc == 1
    assert res.err.startswith("pgfleet: error: no repository configured")
    # No collector running: the commands say so in one line.
    for args in (("status",), ("reload",), ("snapshot", "--now", "x")):
        res = run_cli(*args)
        assert res.rc == 1, args
        assert len(res.err.strip().splitlines()) == 1, res.err
    assert "no collector is running" in run_cli("status").err


# -- Collecting


def test_collects_and_answers_the_cli(
    repo: str, run_cli: RunCli, daemon: DaemonFactory, mon: Cluster
) -> None:
    """Servers at their own frequency, status/reload/snapshot --now, clean stop, no secrets."""
    mon.execute("DROP ROLE IF EXISTS watcher")
    mon.execute("CREATE ROLE watcher LOGIN PASSWORD 'hunter2-secret' IN ROLE pg_monitor")
    add(run_cli, "fast", mon, "--frequency", "1")
    add(run_cli, "slow", mon, "--frequency", "2", "--password-ref", "env:PGFLEET_PW_WATCHER")
    assert run_cli("server", "update", "slow", "--user", "watcher").rc == 0
    d = daemon(repo, env={"PGFLEET_PW_WATCHER": "hunter2-secret"})

    wait_until(
        lambda: snapshots(repo, "fast") >= 3 and snapshots(repo, "slow") >= 2, 20, "snapshots"
    )
    res = run_cli("status", "--json")
    assert res.rc == 0, res.err
    status = json.loads(res.out)
    assert {s["alias"] for s in status.values()} == {"fast", "slow"}
    for s in status.values():
        assert s["collector"] == d.name
        assert s["state"] in ("waiting", "queued", "running")
        assert s["last_snapshot"] and s["next_run"]
        assert s["last_error"] is None
    res = run_cli("status")
    assert res.rc == 0 and "fast" in res.out and d.name in res.out

    before = snapshots(repo, "slow")
    res = run_cli("snapshot", "--now", "slow")
    assert res.rc == 0, res.err
    assert "'slow'" in res.out and d.name in res.out
    res = run_cli("reload")
    assert res.rc == 0, res.err
    assert res.out.startswith(f"collector {d.name}: configuration reloaded")
    wait_until(lambda: snapshots(repo, "slow") > before, 5, "the forced snapshot")

    # The schedule: each on its own grid, none late by much.
    time.sleep(2)
    stored = d.find("snapshot stored")
    lags = [e["lag"] for e in stored if "lag" in e]
    assert lags and max(lags) < 1, lags
    assert all(e.get("server") in ("fast", "slow") for e in stored)
    n_fast = len([e for e in stored if e["server"] == "fast"])
    n_slow = len([e for e in stored if e["server"] == "slow"])
    assert n_fast > n_slow

    assert d.stop() == 0
    assert d.find("collector stopped")
    # Leases are given back at once: another collector need not wait.
    assert leases(repo) == {}
    assert scalar(repo, "SELECT count(*) FROM pgfleet.collectors") == 0
    # The password was used (snapshots of 'slow' were stored) and never shown.
    assert "hunter2-secret" not in d.text()
    assert "hunter2-secret" not in str(
        scalar(repo, "SELECT array_agg(s::text) FROM pgfleet.servers s")
    )


def test_run_with_trace_logs_in_key_value_lines(
    repo: str, run_cli: RunCli, daemon: DaemonFactory, mon: Cluster
) -> None:
    """'pgfleet run' is the collector; TRACE logs every value fetched; SIGINT stops it."""
    add(run_cli, "tr", mon, "--frequency", "1")
    d = daemon(repo, command="run", logging={"level": "trace", "format": "keyvalue"})
    wait_until(lambda: snapshots(repo, "tr") >= 1, 20, "a snapshot")
    wait_until(lambda: "msg=value" in d.text(), 5, "trace lines")
    lines = d.text().splitlines()
    assert all(line.startswith("ts=") and " level=" in line for line in lines)
    values = [
        line for line in lines if " msg=value " in line and "source=pg_stat_database " in line
    ]
    assert values and all(" server=tr " in line for line in values)
    assert any("postgres" in line for line in values)
    assert any(' msg="source fetched" ' in line and " rows=" in line for line in lines)
    d.signal(signal.SIGINT)
    assert d.proc is not None
    assert d.proc.wait(15) == 0
    assert "signal=SIGINT" in d.text()


def test_discovery_providers_and_reload(
    repo: str, run_cli: RunCli, daemon: DaemonFactory, mon: Cluster, tmp_path: Path
) -> None:
    """Static and file_sd servers, file changes picked up, SIGHUP reloads."""
    targets = tmp_path / "targets.json"
    targets.write_text(
        json.dumps(
            [
                {
                    "targets": [f"{mon.host}:{mon.port}"],
                    "labels": {"alias": "f1", "frequency": "1", "user": "postgres", "team": "db"},
                },
                {
                    "targets": [f"{mon.host}:{mon.port}"],
                    "labels": {"alias": "f2", "frequency": "1", "user": "postgres"},
                },
            ]
        )
    )
    yaml_targets = tmp_path / "more.yml"
    yaml_targets.write_text(
        f"- targets: ['{mon.host}:{mon.port}']\n  labels: {{alias: y1, frequency: '1', user: postgres}}\n"
    )
    add(run_cli, "by-hand", mon, "--frequency", "1")  # not listed: repository provider off
    static = [
        {"alias": "st1", "host": mon.host, "port": mon.port, "user": "postgres", "frequency": 1}
    ]
    d = daemon(
        repo,
        discovery={
            "providers": ["static", "file_sd"],
            "files": [str(targets), str(tmp_path / "*.yml")],
            "servers": static,
        },
    )
    for alias in ("st1", "f1", "f2", "y1"):

        def collected(a: str = alias) -> bool:
            return snapshots(repo, a) >= 2

        wait_until(collected, 20, f"snapshots of {alias}")
    with connect(repo) as conn:
        providers = dict(conn.execute("SELECT alias, provider FROM pgfleet.servers").fetchall())
    assert providers == {
        "local": None,
        "by-hand": None,
        "st1": "static",
        "f1": "file_sd",
        "f2": "file_sd",
        "y1": "file_sd",
    }
    assert snapshots(repo, "by-hand") == 0

    # f2 leaves its file: no longer collected, its data kept.
    targets.write_text(json.dumps([json.loads(targets.read_text())[0]]))
    wait_until(lambda: d.find("server left the fleet", server="f2"), 10, "f2 to leave")
    left = snapshots(repo, "f2")
    # A broken file keeps its previous targets.
    yaml_targets.write_text("- targets: [unclosed\n")
    wait_until(lambda: d.find("file_sd file ignored, its previous targets kept"), 10, "the error")
    time.sleep(2.5)
    assert snapshots(repo, "f2") == left
    assert scalar(repo, "SELECT count(*) FROM pgfleet.servers WHERE alias = 'f2'") == 1
    y1 = snapshots(repo, "y1")
    wait_until(lambda: snapshots(repo, "y1") > y1, 5, "y1 still collected")

    # SIGHUP: a new static server is picked up; a setting that needs a
    # restart is named, not silently ignored; a broken file changes nothing.
    d.sections["discovery"]["servers"] = [*static, {**static[0], "alias": "st2"}]
    d.sections["spool"]["directory"] = str(tmp_path / "elsewhere")
    d.write_config()
    d.signal(signal.SIGHUP)
    wait_until(lambda: snapshots(repo, "st2") >= 1, 10, "st2 after SIGHUP")
    warning = d.find("settings changed that need a restart: old values kept")
    assert warning and warning[0]["settings"] == "spool.directory"
    d.config.write_text("[collector\n")
    d.signal(signal.SIGHUP)
    wait_until(lambda: d.find("reload failed, configuration unchanged"), 5, "the reload error")
    st2 = snapshots(repo, "st2")
    wait_until(lambda: snapshots(repo, "st2") > st2, 5, "st2 still collected")
    assert d.alive()
    assert d.stop() == 0


def test_monitored_server_stops_and_comes_back(
    repo: str, run_cli: RunCli, daemon: DaemonFactory, new_cluster: NewCluster, mon: Cluster
) -> None:
    """The daemon survives, records the error, and the next snapshot succeeds."""
    flaky = new_cluster("flaky")
    add(run_cli, "flaky", flaky, "--frequency", "1")
    add(run_cli, "steady", mon, "--frequency", "1")
    d = daemon(repo)
    wait_until(lambda: snapshots(repo, "flaky") >= 2, 20, "first snapshots")
    flaky.stop(mode="immediate")
    sid = srvid(repo, "flaky")
    wait_until(
        lambda: scalar(
            repo,
            "SELECT count(*) FROM pgfleet.snapshot_errors WHERE srvid = %s AND source = 'connection'",
            (sid,),
        ),
        15,
        "the connection error on record",
    )
    message = scalar(
        repo,
        "SELECT message FROM pgfleet.snapshot_errors WHERE srvid = %s ORDER BY ts DESC LIMIT 1",
        (sid,),
    )
    assert str(message).startswith("server 'flaky': cannot connect")
    steady = snapshots(repo, "steady")
    wait_until(lambda: snapshots(repo, "steady") >= steady + 2, 10, "the other server unaffected")
    before = snapshots(repo, "flaky")
    flaky.start()
    wait_until(lambda: snapshots(repo, "flaky") >= before + 2, 20, "snapshots after the restart")
    assert d.alive()
    assert d.find("server unreachable", server="flaky")
    assert d.stop() == 0


def test_hung_query_is_cancelled_on_the_server(
    repo: str, run_cli: RunCli, daemon: DaemonFactory, new_cluster: NewCluster, mon: Cluster
) -> None:
    """A source blocked by a lock times out server-side; other servers keep their pace."""
    locked = new_cluster("locked", shared_preload_libraries=["pg_stat_statements"])
    locked.create_extension("pg_stat_statements")
    add(run_cli, "locked", locked, "--frequency", "1")
    add(run_cli, "free", mon, "--frequency", "1")
    d = daemon(repo, collector={"statement_timeout": 1})
    wait_until(
        lambda: snapshots(repo, "locked") >= 1 and snapshots(repo, "free") >= 1,
        20,
        "first snapshots",
    )
    holder = psycopg.connect(locked.dsn(), autocommit=False)
    try:
        # The pg_stat_statements source reads this view, which waits (the
        # view is over a function: no catalog is locked with it).
        holder.execute("LOCK TABLE public.pg_stat_statements IN ACCESS EXCLUSIVE MODE")
        free_before = snapshots(repo, "free")
        t0 = time.monotonic()
        sid = srvid(repo, "locked")
        wait_until(
            lambda: (
                scalar_int(
                    repo,
                    "SELECT count(*) FROM pgfleet.snapshot_errors WHERE srvid = %s AND source = 'pg_stat_statements'",
                    (sid,),
                )
                >= 2
            ),
            15,
            "timeouts on record",
        )
        message = scalar(
            repo,
            "SELECT message FROM pgfleet.snapshot_errors WHERE srvid = %s AND source = 'pg_stat_statements' LIMIT 1",
            (sid,),
        )
        assert "timeout" in str(message) or "timed out" in str(message)
        # Cancelled on the server: no pgfleet query waits longer than its timeout.
        waiting = locked.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pgfleet collector'"
            " AND wait_event_type = 'Lock' AND now() - query_start > interval '1.5 s'"
        )
        assert waiting == [(0,)]
        elapsed = time.monotonic() - t0
        # The other server missed nothing meanwhile (one per second, give or take one).
        assert snapshots(repo, "free") - free_before >= int(elapsed) - 1
        status = json.loads(run_cli("status", "--json").out)
        by_alias = {s["alias"]: s for s in status.values()}
        assert by_alias["locked"]["timeouts"] >= 2
        assert by_alias["free"]["timeouts"] == 0
        # Snapshots of the locked server still store everything else.
        assert d.find("snapshot stored", server="locked", errors=1)
    finally:
        holder.close()
    assert d.stop() == 0


def test_repository_outage_loses_nothing(
    run_cli: RunCli, daemon: DaemonFactory, new_cluster: NewCluster, mon: Cluster
) -> None:
    """Snapshots taken while the repository is down are spooled, then stored in order."""
    repo_cluster = new_cluster("outage_repo")
    repo = repo_cluster.create_database("pgfleet")
    with psycopg.connect(repo, autocommit=True) as conn:
        schema.upgrade(conn)
    for alias in ("o1", "o2"):
        res = run_cli(
            "--repository",
            repo,
            "server",
            "add",
            alias,
            "--host",
            mon.host,
            "--port",
            str(mon.port),
            "--user",
            "postgres",
            "--frequency",
            "1",
        )
        assert res.rc == 0, res.err
    d = daemon(repo)
    wait_until(
        lambda: snapshots(repo, "o1") >= 2 and snapshots(repo, "o2") >= 2, 20, "first snapshots"
    )
    before = {a: snapshots(repo, a) for a in ("o1", "o2")}
    repo_cluster.stop()
    down = time.monotonic()
    wait_until(lambda: len(d.find("snapshot spooled")) >= 8, 15, "spooled snapshots")
    time.sleep(max(0.0, 6 - (time.monotonic() - down)))  # longer than the lease period
    repo_cluster.start()
    outage = time.monotonic() - down
    wait_until(lambda: d.find("spooled snapshots stored"), 20, "the spool to drain")
    stored = len(d.find("snapshot stored"))
    wait_until(lambda: len(d.find("snapshot stored")) >= stored + 2, 10, "fresh stores")
    spooled = d.find("snapshot spooled")
    for alias in ("o1", "o2"):
        # One per second through the outage, all stored.
        assert snapshots(repo, alias) - before[alias] >= int(outage) - 1, alias
        assert len([e for e in spooled if e["server"] == alias]) >= int(outage) - 2
    assert not d.find("spool full: oldest snapshots dropped")
    assert not d.find("lease lost to another collector: snapshot dropped")
    with connect(repo) as conn:
        for alias in ("o1", "o2"):
            # Stored in order, once each: rows were appended (ctid order) with
            # strictly increasing snapshot times.
            ts = [
                r[0]
                for r in conn.execute(
                    """SELECT c.ts FROM pgfleet.pg_stat_database_current c
                    JOIN pgfleet.servers s USING (srvid)
                   WHERE s.alias = %s AND c.datname = 'postgres' ORDER BY c.ctid""",
                    (alias,),
                ).fetchall()
            ]
            assert len(ts) > 5 and ts == sorted(set(ts)), alias
        assert conn.execute("SELECT message FROM pgfleet.snapshot_errors").fetchall() == []
    assert d.stop() == 0


def _current_rows(conn: psycopg.Connection[Any], srvid: int) -> dict[str, int]:
    """Rows waiting in every source's ``_current`` for the server."""
    modules = [m for (m,) in conn.execute("SELECT module FROM pgfleet.metric_sources")]
    return {
        m: one_row(conn, f"SELECT count(*) FROM pgfleet.{m}_current WHERE srvid = %s", (srvid,))[0]
        for m in modules
    }


def test_sigkill_mid_snapshot_leaves_no_partial_snapshot(
    repo: str, run_cli: RunCli, daemon: DaemonFactory, mon: Cluster
) -> None:
    """Killed inside the store transaction: nothing of that snapshot is in the repository."""
    add(run_cli, "k1", mon, "--frequency", "1")
    d = daemon(repo, collector={"store_timeout": 60})
    wait_until(lambda: snapshots(repo, "k1") >= 2, 20, "first snapshots")
    sid = srvid(repo, "k1")
    with psycopg.connect(repo, autocommit=False) as blocker:
        # store() reads snapshot_errors after take_snapshot wrote the metrics:
        # the daemon's transaction stops there, half done.
        blocker.execute("LOCK TABLE pgfleet.snapshot_errors IN ACCESS EXCLUSIVE MODE")
        wait_until(
            lambda: scalar(
                repo,
                "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'pgfleet collector %% (writer)'"
                " AND wait_event_type = 'Lock' AND state = 'active'",
            ),
            10,
            "the store to block",
        )
        with connect(repo) as conn:
            # Mid-snapshot indeed: its transaction has written metric rows
            # (of whichever sources changed: an unchanged one is skipped).
            assert one_row(
                conn,
                """SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)
                    WHERE a.application_name LIKE 'pgfleet collector %% (writer)' AND l.granted
                      AND l.relation::regclass::text ~ '^pgfleet\\.\\w+_current$'
                      AND l.mode = 'RowExclusiveLock'""",
            )[0] >= 1
            state = one_row(
                conn, "SELECT snapshots FROM pgfleet.snapshot_state WHERE srvid = %s", (sid,)
            )[0]
            current = _current_rows(conn, sid)
        d.kill()
        blocker.rollback()
    # The dead collector's transaction ends with its connection.
    wait_until(
        lambda: (
            scalar(
                repo,
                "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE 'pgfleet collector %% (writer)'",
            )
            == 0
        ),
        10,
        "the killed collector's session to end",
    )
    with connect(repo) as conn:
        assert (
            one_row(
                conn,
                "SELECT snapshots FROM pgfleet.snapshot_state WHERE srvid = %s",
                (sid,),
            )[0]
            == state
        )
        assert _current_rows(conn, sid) == current
        for (module,) in conn.execute("SELECT module FROM pgfleet.metric_sources").fetchall():
            assert one_row(conn, f"SELECT count(*) FROM pgfleet.{module}_src_tmp")[0] == 0, module
    # Restarted, it carries on: same name, same leases, no errors.
    d.start()
    wait_until(lambda: snapshots(repo, "k1") >= state + 2, 20, "snapshots after the restart")
    assert scalar(repo, "SELECT count(*) FROM pgfleet.snapshot_errors") == 0
    assert d.stop() == 0


def test_two_collectors_share_the_fleet_and_take_over(
    repo: str, run_cli: RunCli, daemon: DaemonFactory, mon: Cluster
) -> None:
    aliases = [f"m{i}" for i in range(4)]
    for alias in aliases:
        add(run_cli, alias, mon, "--frequency", "1")
    a = daemon(repo, name="a")
    wait_until(lambda: leases(repo) == {a.name: 4}, 15, "a to hold everything")
    b = daemon(repo, name="b")
    wait_until(lambda: leases(repo) == {a.name: 2, b.name: 2}, 15, "a and b to share")

    def counts() -> dict[str, int]:
        return {x: snapshots(repo, x) for x in aliases}

    # Shared: each server collected once per second, not twice.
    c0, t0 = counts(), time.monotonic()
    time.sleep(4)
    c1, t1 = counts(), time.monotonic()
    for x in aliases:
        assert c1[x] - c0[x] <= (t1 - t0) + 1.5, (x, c0, c1)
        assert c1[x] - c0[x] >= (t1 - t0) - 2, (x, c0, c1)

    with connect(repo) as conn:
        a_servers = [
            r[0]
            for r in conn.execute(
                "SELECT s.alias FROM pgfleet.collector_leases l JOIN pgfleet.servers s USING (srvid) WHERE owner = %s",
                (a.name,),
            ).fetchall()
        ]
    a.kill()
    killed = time.monotonic()
    wait_until(lambda: leases(repo) == {b.name: 4}, 6, "b to take a's servers")
    took = time.monotonic() - killed
    assert took <= 2 * 2 + 0.5  # two lease periods, and a poll
    c2 = counts()
    wait_until(
        lambda: all(snapshots(repo, x) >= c2[x] + 2 for x in a_servers),
        10,
        "a's servers collected by b",
    )
    c3, t3 = counts(), time.monotonic()
    time.sleep(3)
    c4, t4 = counts(), time.monotonic()
    for x in aliases:
        assert c4[x] - c3[x] <= (t4 - t3) + 1.5, (x, c3, c4)
    assert b.stop() == 0


def test_command_channel_refuses_garbage(
    repo: str, run_cli: RunCli, daemon: DaemonFactory, mon: Cluster, repo_cluster: Cluster
) -> None:
    """Malformed or unauthorized commands get KO, never disturb the daemon; long answers arrive whole."""
    add(run_cli, "c1", mon, "--frequency", "1")
    # Enough servers for an answer longer than a NOTIFY payload; they would
    # fail (port 1) but are due once a day only.
    with connect(repo) as conn:
        conn.execute(
            "INSERT INTO pgfleet.servers (alias, host, port, frequency)"
            " SELECT 'far-' || g, '127.0.0.1', 1, 86400 FROM generate_series(1, 60) g"
        )
    d = daemon(repo)
    wait_until(lambda: snapshots(repo, "c1") >= 1, 20, "a snapshot")
    wait_until(lambda: leases(repo) == {d.name: 61}, 10, "all servers held")
    dbname = str(psycopg.conninfo.conninfo_to_dict(repo)["dbname"])
    for role in ("cmd_admin", "cmd_nobody"):
        repo_cluster.execute(f"DROP ROLE IF EXISTS {role}")
        repo_cluster.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'pw'")
    repo_cluster.execute("GRANT pgfleet_admin TO cmd_admin")
    # Say, a dashboard's role: it sees the schema, it may not command.
    repo_cluster.execute("GRANT USAGE ON SCHEMA pgfleet TO cmd_nobody", dbname=dbname)
    admin = psycopg.conninfo.make_conninfo(repo, user="cmd_admin", password="pw")
    nobody = psycopg.conninfo.make_conninfo(repo, user="cmd_nobody", password="pw")

    with psycopg.connect(repo, autocommit=True) as listener:
        listener.execute("LISTEN t_answers")

        def answers(n: int, timeout: float = 5) -> list[str]:
            got: list[str] = []
            deadline = time.monotonic() + timeout
            while len(got) < n and time.monotonic() < deadline:
                got += [
                    x.payload
                    for x in listener.notifies(timeout=deadline - time.monotonic(), stop_after=1)
                ]
            return got

        def notify(dsn: str, payload: str) -> None:
            with psycopg.connect(dsn, autocommit=True) as c:
                c.execute("SELECT pg_notify('pgfleet_collector', %s)", (payload,))

        # Sent by hand, even by a superuser: not through the request table.
        notify(repo, "RELOAD t_answers")
        assert answers(1) == [
            "RELOAD KO not authorized: send commands with pgfleet.collector_command() as a member of pgfleet_admin"
        ]
        notify(nobody, "FORCE_SNAPSHOT t_answers 1")
        assert answers(1)[0].startswith("FORCE_SNAPSHOT KO not authorized")
        # Malformed, with a channel to say so on.
        notify(repo, "BOGUS t_answers")
        assert answers(1) == [
            "BOGUS KO unknown command 'BOGUS': use one of RELOAD, WORKERS_STATUS, FORCE_SNAPSHOT"
        ]
        notify(repo, "FORCE_SNAPSHOT t_answers abc")
        assert answers(1) == ["FORCE_SNAPSHOT KO invalid srvid 'abc': expected a number"]
        notify(repo, "RELOAD t_answers extra")
        assert answers(1) == ["RELOAD KO RELOAD takes 0 argument(s), not 1"]
        # Nowhere to answer: ignored, logged.
        for garbage in (
            "",
            "x",
            "RELOAD bad-channel!",
            "RELOAD -",
            "\u00e9\u00e8 " * 1000,
            "RELOAD pgfleet_collector",
        ):
            notify(repo, garbage)
        assert answers(1, timeout=1.5) == []
        # Not a member: the function refuses before anything is sent.
        with (
            psycopg.connect(nobody, autocommit=True) as c,
            pytest.raises(psycopg.errors.InsufficientPrivilege) as exc,
        ):
            c.execute("SELECT pgfleet.collector_command('RELOAD t_answers')")
        assert 'role "cmd_nobody" is not a member of pgfleet_admin' in str(exc.value)
        # A member is obeyed; the status of 61 servers is longer than a payload.
        with psycopg.connect(admin, autocommit=True) as c:
            c.execute("SELECT pgfleet.collector_command('WORKERS_STATUS t_answers')")
            got = answers(1)
            assert len(got) == 1 and got[0].startswith("WORKERS_STATUS OK @reply ")
            body = one_row(
                c,
                "SELECT body FROM pgfleet.collector_replies WHERE id = %s",
                (int(got[0].rsplit(" ", 1)[1]),),
            )[0]
            status = json.loads(body)
            assert len(status) == 61 and len(body.encode()) > 8000
            c.execute(
                "SELECT pgfleet.collector_command(%s)",
                (f"WORKERS_STATUS t_answers {srvid(repo, 'c1')}",),
            )
            one = answers(1)[0]
            assert (
                one.startswith("WORKERS_STATUS OK {")
                and json.loads(one.split(" ", 2)[2])[str(srvid(repo, "c1"))]["alias"] == "c1"
            )
            c.execute("SELECT pgfleet.collector_command('FORCE_SNAPSHOT t_answers 99999')")
            assert answers(1) == [
                f"FORCE_SNAPSHOT KO server 99999 is not collected by collector {d.name}"
            ]
            # Answered once per request, even if the notification is replayed by hand.
            c.execute("SELECT pgfleet.collector_command('RELOAD t_answers')")
            assert answers(1)[0].startswith("RELOAD OK collector ")
        repo_cluster.execute("REVOKE pgfleet_admin FROM cmd_admin")
        with (
            psycopg.connect(admin, autocommit=True) as c,
            pytest.raises(psycopg.errors.InsufficientPrivilege),
        ):
            c.execute("SELECT pgfleet.collector_command('RELOAD t_answers')")

    # Still standing, and the CLI follows long answers by itself.
    res = run_cli("status", "--json")
    assert res.rc == 0, res.err
    assert len(json.loads(res.out)) == 61
    assert d.alive()
    assert len(d.find("malformed command")) >= 7
    assert d.stop() == 0
    repo_cluster.execute("DROP OWNED BY cmd_nobody", dbname=dbname)
    for role in ("cmd_admin", "cmd_nobody"):
        repo_cluster.execute(f"DROP ROLE {role}")


def test_summary_line_counts_since_the_last_one(tmp_path: Path) -> None:
    import io

    from pgfleet import log
    from pgfleet.collector.daemon import Daemon
    from pgfleet.collector.spool import Spool
    from pgfleet.config import Config
    from pgfleet.snapshot.model import Failure, FailureKind

    out = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("pgfleet", "psycopg")]
    saved = [(list(lg.handlers), lg.level, lg.propagate) for lg in loggers]
    log.setup("info", "json", stream=out)
    try:
        d = Daemon(Config(), config_path=None, dsn="host=nowhere")
        d.spool = Spool(tmp_path, 1000)
        d.stats.count("db1", "snapshot", "stored", 3)
        d.stats.count("db1", "snapshot", "spooled", 2)
        d.stats.count("db1", "spool", "spooled", 2)
        d.stats.count("", "spool", "dropped", 1)
        d.stats.fail("db1", Failure("connection", FailureKind.CONNECT, "refused"))
        d.stats.fail("db1", Failure("pg_stat_database", FailureKind.TIMEOUT, "timed out"))
        d._summary()
        d.stats.count("db1", "snapshot", "stored", 4)
        d._summary()
    finally:
        for lg, (handlers, level, propagate) in zip(loggers, saved, strict=True):
            lg.handlers, lg.level, lg.propagate = handlers, level, propagate
    first, second = (json.loads(line) for line in out.getvalue().splitlines())
    assert first["msg"] == "collecting"
    assert (first["stored"], first["spooled"], first["dropped"]) == (3, 2, 1)
    assert (first["unreachable"], first["timeouts"]) == (1, 1)
    assert (second["stored"], second["spooled"], second["unreachable"]) == (4, 0, 0)
