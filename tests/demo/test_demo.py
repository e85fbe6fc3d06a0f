"""``make demo`` (``pgfleet demo``): the real daemon on embedded PostgreSQL.

It starts within 15 s, prints the URLs and the logins, a line per snapshot of
the primary and of its standby, serves /metrics and the web UI, and stops
everything, cleanly, at Ctrl-C.
"""

from __future__ import annotations

import contextlib
import io
import itertools
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from pgfleet import cli

PGFLEET = Path(sys.executable).parent / "pgfleet"
START_WITHIN = 15.0  # seconds, the promise

_numbers = itertools.count(1)


@pytest.fixture
def workdir(clusters_dir: Path) -> Path:
    return clusters_dir / f"demo-{next(_numbers)}"


class Demo:
    """A ``pgfleet demo`` process in its own process group, as a terminal runs it."""

    def __init__(self, workdir: Path, *args: str) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("PGFLEET_")}
        self.started = time.monotonic()
        self.proc = subprocess.Popen(
            [str(PGFLEET), "demo", "--workdir", str(workdir), *args],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        self.lines: list[str] = []

    def until(self, pattern: str, timeout: float) -> re.Match[str]:
        """Read lines until one matches `pattern`; fail after `timeout` seconds."""
        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        # The demo prints a line every few seconds: a blocking read returns in time.
        while time.monotonic() < deadline:
            line = self.proc.stdout.readline()
            if not line:
                break
            self.lines.append(line.rstrip("\n"))
            if m := re.search(pattern, line):
                return m
        pytest.fail(f"no line matching {pattern!r}:\n" + "\n".join(self.lines))

    def ctrl_c(self, timeout: float = 60) -> int:
        """SIGINT to the whole group, as Ctrl-C sends it; the rest of the output read."""
        os.killpg(self.proc.pid, signal.SIGINT)
        out, _ = self.proc.communicate(timeout=timeout)
        self.lines += out.splitlines()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def demo(workdir: Path) -> Iterator[Demo]:
    d = Demo(workdir, "--frequency", "2")
    try:
        yield d
    finally:
        d.kill()
        # A demo killed mid-way stops its leftovers at the next start: do
        # it the same way, by starting (and at once stopping) another.
        if any((workdir / n / "postmaster.pid").exists() for n in ("repository", "primary")):
            Demo(workdir, "--seconds", "1").proc.communicate(timeout=120)


def _csrf(page: str) -> str:
    return page.split('name="csrf" value="')[1].split('"')[0]


def test_demo_runs_the_daemon_until_ctrl_c(demo: Demo, workdir: Path) -> None:
    demo.until(r"^started in ", START_WITHIN)
    elapsed = time.monotonic() - demo.started
    assert elapsed < START_WITHIN, f"started in {elapsed:.1f} s"
    banner = "\n".join(demo.lines)
    web = re.search(r"web UI\s+(http://\S+/)", banner)
    metrics = re.search(r"metrics\s+(http://\S+/metrics)", banner)
    token = re.search(r"the token (\S+) ", banner)
    password = re.search(r"as 'demo', password (\S+) ", banner)
    assert web and metrics and token and password, banner

    # A line per snapshot, of both servers.
    seen: set[str] = set()
    while seen != {"primary", "standby"}:
        m = demo.until(r"snapshot (\w+): (\d+) sources, (\d+) rows, \d+ ms$", 30)
        assert int(m[2]) > 10 and int(m[3]) > 0, m[0]
        seen.add(m[1])

    # Another demo in the same directory is refused at once.
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli.main(["demo", "--workdir", str(workdir)]) == 1
    assert err.getvalue() == f"pgfleet: error: another pgfleet demo runs in {workdir}\n"

    text = httpx.get(metrics[1], timeout=10).text
    assert re.search(r'^pgfleet_up\{server="primary"\} 1', text, re.M), text[:2000]
    assert re.search(r'^pgfleet_server_in_recovery\{server="standby"\} 1', text, re.M)
    assert re.search(r"^pgfleet_replication_lag_bytes\{", text, re.M)

    with httpx.Client(base_url=web[1], timeout=15) as c:
        r = c.get("/fleet.json", headers={"Authorization": f"Bearer {token[1]}"})
        assert r.status_code == 200, r.text
        fleet = {s["alias"]: s for s in r.json()["servers"]}
        assert fleet.keys() == {"primary", "standby"}
        assert fleet["standby"]["in_recovery"] and not fleet["primary"]["in_recovery"]
        # The admin login sees the live workers.
        login = {
            "csrf": _csrf(c.get("/login").text),
            "username": "demo",
            "password": password[1],
            "next": "/collector",
        }
        assert c.post("/login", data=login).status_code == 303
        live = c.get("/collector.json").json()["live"]
        assert {w["alias"] for w in live["workers"].values()} == {"primary", "standby"}

    t = time.monotonic()
    assert demo.ctrl_c() == 0, "\n".join(demo.lines)
    assert time.monotonic() - t < 30
    assert demo.lines[-1] == "pgfleet demo: stopped", demo.lines[-5:]
    # Nothing but the demo's lines: no warning, no traceback.
    assert not [line for line in demo.lines if "level=" in line or "Traceback" in line]
    for name in ("repository", "primary", "standby"):
        assert not (workdir / name / "postmaster.pid").exists(), name


def test_demo_keeps_out_of_a_directory_not_its_own(tmp_path: Path) -> None:
    (tmp_path / "precious").write_text("")
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        assert cli.main(["demo", "--workdir", str(tmp_path)]) == 1
    assert err.getvalue() == (
        f"pgfleet: error: {tmp_path} is not empty and not a pgfleet demo's: give another --workdir\n"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["precious"]
