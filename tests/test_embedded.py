"""The embedded repository: what pgfleet uses when given no repository DSN.

``pgfleet run`` starts it in the state directory and stops it on exit; a
one-shot command run meanwhile reuses it and leaves it running; one run alone
starts it and stops it when done; without the [embedded] extra, one line says
what to configure.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict

from pgfleet import cli, embedded
from pgfleet.cluster import _free_port
from pgfleet.embedded import EmbeddedRepository
from pgfleet.errors import ClusterError
from tests.fix_daemon import wait_until

PGFLEET = Path(sys.executable).parent / "pgfleet"
STARTED = "started the embedded one"
STOPPED = "embedded repository stopped"

_numbers = itertools.count(1)


@pytest.fixture
def state(clusters_dir: Path) -> Iterator[Path]:
    """A fresh state directory the servers' OS user can reach (when we are root)."""
    path = clusters_dir / f"state-{next(_numbers)}"
    yield path
    # Whatever a failed test left running.
    repo = EmbeddedRepository(path, say=None).cluster
    with contextlib.suppress(ClusterError):
        repo.stop(mode="immediate")


def _env(state: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PGFLEET_REPOSITORY", "PGFLEET_CONFIG")}
    env["STATE_DIRECTORY"] = str(state)
    return env


def _pgfleet(state: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(PGFLEET), *args],
        env=_env(state),
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )


def _postmaster(state: Path) -> int | None:
    """The embedded repository's postmaster pid, if it runs."""
    try:
        return int((state / "repository" / "postmaster.pid").read_text().split()[0])
    except (OSError, IndexError, ValueError):
        return None


def test_one_shot_commands_start_it_and_stop_it(state: Path) -> None:
    res = _pgfleet(state, "server", "add", "db1", "--host", "127.0.0.1", "--port", "1")
    assert res.returncode == 0, res.stderr
    assert "server 'db1' added" in res.stdout
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 2, res.stderr
    assert STARTED in lines[0] and str(state / "repository") in lines[0]
    assert "in production, give a repository DSN" in lines[0]
    assert lines[1] == f"pgfleet: {STOPPED}"
    assert _postmaster(state) is None
    # The same repository again: the server is there, the schema current.
    res = _pgfleet(state, "server", "list", "--json")
    assert res.returncode == 0, res.stderr
    assert '"alias": "db1"' in res.stdout
    res = _pgfleet(state, "repo", "status")
    assert "up to date" in res.stdout, res
    # On its socket alone, in its data directory (0700).
    assert (state / "repository").stat().st_mode & 0o777 == 0o700
    dsn = conninfo_to_dict(EmbeddedRepository(state).dsn)
    assert dsn["host"] == str(state / "repository")
    assert dsn["dbname"] == "pgfleet"


def test_run_owns_it_and_one_shot_commands_reuse_it(state: Path) -> None:
    exporter, web = _free_port(), _free_port()
    state.mkdir(mode=0o711)
    config = state / "pgfleet.toml"
    config.write_text(
        f'[exporter]\nport = {exporter}\n[web]\nenabled = true\nport = {web}\ntoken = "t0ken"\n'
    )
    proc = subprocess.Popen(
        [str(PGFLEET), "run", "-c", str(config)],
        env=_env(state),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:

        def answers(url: str) -> bool:
            try:
                return httpx.get(url, timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(lambda: answers(f"http://127.0.0.1:{exporter}/metrics"), 60, "/metrics")
        wait_until(lambda: answers(f"http://127.0.0.1:{web}/login"), 10, "the web UI")
        pid = _postmaster(state)
        assert pid is not None

        res = _pgfleet(state, "server", "add", "db1", "--host", "127.0.0.1", "--port", "1")
        assert res.returncode == 0, res.stderr
        assert res.stderr == "", "reused: neither started nor stopped"
        assert _postmaster(state) == pid

        # The web UI reads that repository too.
        with httpx.Client(base_url=f"http://127.0.0.1:{web}", timeout=10) as c:
            fleet = c.get("/fleet.json", headers={"Authorization": "Bearer t0ken"})
            assert fleet.status_code == 200, fleet.text
            assert [s["alias"] for s in fleet.json()["servers"]] == ["db1"]
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            _, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            _, err = proc.communicate()
    assert proc.returncode == 0, err
    assert STARTED in err
    assert err.strip().endswith(f"pgfleet: {STOPPED}"), err
    assert _postmaster(state) is None


def test_the_last_user_stops_it(state: Path) -> None:
    with EmbeddedRepository(state, durable=False, say=None) as outer:
        assert outer.started
        with EmbeddedRepository(state, durable=False, say=None) as inner:
            assert not inner.started
            assert inner.dsn == outer.dsn
        # The inner one's exit left it running for the outer one.
        with psycopg.connect(outer.dsn) as conn:
            assert conn.execute("SELECT count(*) FROM pgfleet.schema_migrations").fetchone()
            # Its socket, and no TCP port.
            assert conn.execute("SHOW listen_addresses").fetchone() == ("",)
            assert conn.info.host == str(state / "repository")
    assert not outer.cluster.is_running()


def test_collector_never_falls_back_on_it(state: Path) -> None:
    # The production daemon: no DSN is a configuration error, nothing started.
    res = _pgfleet(state, "collector")
    assert res.returncode == 1
    assert res.stderr.startswith("pgfleet: error: no repository configured"), res.stderr
    assert not (state / "repository").exists()


def test_without_the_extra_one_line_says_what_to_do(
    state: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(embedded, "available", lambda: False)
    for name, value in _env(state).items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("PGFLEET_REPOSITORY", raising=False)
    monkeypatch.delenv("PGFLEET_CONFIG", raising=False)
    for args in (["server", "list"], ["run"], ["snapshot", "db1"]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = cli.main(args)
        assert rc == 1, args
        lines = err.getvalue().strip().splitlines()
        assert len(lines) == 1, lines
        assert lines[0].startswith("pgfleet: error: no repository configured: pass --repository")
        assert "pip install 'pgfleet[embedded]'" in lines[0]
    assert not (state / "repository").exists()


def test_a_socket_path_too_long_is_said(clusters_dir: Path) -> None:
    deep = clusters_dir / f"state-{next(_numbers)}" / ("d" * 90)
    with pytest.raises(ClusterError, match="bytes long, more than the 107"):
        EmbeddedRepository(deep, durable=False, say=None).__enter__()


@pytest.mark.skipif(os.geteuid() != 0, reason="as root only")
def test_as_root_a_state_directory_out_of_reach_is_said(tmp_path: Path) -> None:
    # pytest's tmp_path is 0700: the servers' OS user cannot get through it.
    state = tmp_path / "state"
    with pytest.raises(ClusterError) as exc:
        EmbeddedRepository(state, say=None).__enter__()
    assert "running PostgreSQL cannot" in str(exc.value)
    assert str(tmp_path) in str(exc.value)
    assert "set STATE_DIRECTORY to a directory 'pgfleet' can reach" in str(exc.value)
    assert not state.exists(), "nothing made where the server could not run"
