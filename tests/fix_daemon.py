"""Fixtures running ``pgfleet collector`` as a real process.

- `daemon`: a factory, ``daemon(repo_dsn, **settings)`` writes a
  configuration file (JSON logs at debug level, a private spool directory,
  short periods, the exporter on a free port) and starts the collector; every daemon still running at the
  end of the test is killed, and the log of each is printed on failure.
- `mon`: a private monitored cluster shared by this module's tests: the
  session clusters hold a database per test, and every server of a cluster
  is snapshotted through each of its databases.
- `repo_cluster`: a private cluster for this module's repositories: daemons
  send the repository many statements, which would crowd the session
  clusters' pg_stat_statements that other tests read.
- `wait_until`: poll a condition with a deadline and a clear failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Protocol

import pytest

from pgfleet.cluster import Cluster, _free_port
from tests.fix_clusters import _start, _teardown

PGFLEET = Path(sys.executable).parent / "pgfleet"


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


def write_config(path: Path, sections: dict[str, dict[str, Any]]) -> Path:
    lines = []
    for section, values in sections.items():
        tables = {
            k: v for k, v in values.items() if isinstance(v, list) and v and isinstance(v[0], dict)
        }
        lines.append(f"[{section}]")
        lines += [f"{k} = {_toml(v)}" for k, v in values.items() if k not in tables]
        for key, items in tables.items():
            for item in items:
                lines.append(f"[[{section}.{key}]]")
                lines += [f"{k} = {_toml(v)}" for k, v in item.items()]
    path.write_text("\n".join(lines) + "\n")
    return path


class DaemonProcess:
    def __init__(
        self,
        workdir: Path,
        sections: dict[str, dict[str, Any]],
        env: dict[str, str],
        command: str = "collector",
    ):
        self.command = command
        self.workdir = workdir
        self.sections = sections
        self.config = workdir / "pgfleet.toml"
        self.log_path = workdir / "collector.log"
        self.env = env
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def write_config(self) -> None:
        write_config(self.config, self.sections)

    def start(self) -> DaemonProcess:
        self.write_config()
        env = {k: v for k, v in os.environ.items() if not k.startswith("PGFLEET_")}
        env.pop("NOTIFY_SOCKET", None)
        env.update(self.env)
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [str(PGFLEET), self.command, "-c", str(self.config)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        log.close()
        self.starts += 1
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, and the exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.text().splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
        return out

    def find(self, msg: str, **fields: Any) -> list[dict[str, Any]]:
        return [
            e
            for e in self.events()
            if e.get("msg") == msg and all(e.get(k) == v for k, v in fields.items())
        ]

    @property
    def exporter_url(self) -> str:
        """Where the exporter listens (it is on by default)."""
        ex = self.sections["exporter"]
        return f"http://{ex.get('listen', '127.0.0.1')}:{ex['port']}"

    @property
    def name(self) -> str:
        """The collector's name, which it makes at its first start."""
        path = self.workdir / "spool" / "collector_name"
        wait_until(path.exists, 10, f"{path} to be written")
        return path.read_text().strip()


class DaemonFactory(Protocol):
    """The `daemon` fixture's factory."""

    def __call__(
        self,
        repo_dsn: str,
        name: str = ...,
        env: dict[str, str] | None = ...,
        start: bool = ...,
        command: str = ...,
        **sections: dict[str, Any],
    ) -> DaemonProcess: ...


@pytest.fixture
def daemon(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[DaemonFactory]:
    """``daemon(repo_dsn, name="a", env={}, start=True, command="collector", **sections)``."""
    made: list[DaemonProcess] = []

    def factory(
        repo_dsn: str,
        name: str = "d",
        env: dict[str, str] | None = None,
        start: bool = True,
        command: str = "collector",
        **sections: dict[str, Any],
    ) -> DaemonProcess:
        workdir = tmp_path / f"daemon-{name}"
        workdir.mkdir()
        base: dict[str, dict[str, Any]] = {
            "repository": {"dsn": repo_dsn},
            "collector": {
                "lease_period": 2,
                "statement_timeout": 5,
                "connect_timeout": 2,
                "shutdown_timeout": 10,
            },
            "discovery": {"refresh": 1},
            "spool": {"directory": str(workdir / "spool")},
            "logging": {"level": "debug", "format": "json"},
            # Daemons run side by side: each its own port.
            "exporter": {"port": _free_port()},
        }
        for section, values in sections.items():
            base.setdefault(section, {}).update(values)
        d = DaemonProcess(workdir, base, env or {}, command)
        made.append(d)
        return d.start() if start else d

    yield factory
    failed = getattr(request.node, "rep_call", None)
    for d in made:
        d.kill()
        if failed is not None and failed.failed:
            tail = "\n".join(d.text().splitlines()[-60:])
            print(f"--- last lines of {d.log_path}:\n{tail}")


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    # Remember each phase's report on the item, for fixtures to see failures.
    rep = yield
    setattr(item, f"rep_{rep.when}", rep)
    return rep


@pytest.fixture(scope="module")
def mon(clusters_dir: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """A private monitored PostgreSQL 18 for one test module."""
    name = f"mon_{request.module.__name__.rsplit('.', 1)[-1]}"
    cluster = Cluster.embedded(clusters_dir / name, name=name)
    _start(cluster, f"the cluster {name!r}")
    yield cluster
    _teardown(cluster)


@pytest.fixture(scope="module")
def repo_cluster(clusters_dir: Path, request: pytest.FixtureRequest) -> Iterator[Cluster]:
    """A private PostgreSQL 18 for one test module's repositories."""
    name = f"repo_{request.module.__name__.rsplit('.', 1)[-1]}"
    cluster = Cluster.embedded(clusters_dir / name, name=name)
    _start(cluster, f"the cluster {name!r}")
    yield cluster
    _teardown(cluster)


def wait_until(
    condition: Callable[[], Any], timeout: float, what: str, interval: float = 0.2
) -> Any:
    """Return the first truthy value of ``condition()``; fail naming ``what`` after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}", pytrace=False)
        time.sleep(interval)
