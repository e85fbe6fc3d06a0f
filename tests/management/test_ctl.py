"""``pgfleet ctl`` and ``pgfleet user``: the command lines, their output and exit codes.

The daemon is a real process (see helpers.py); the CLI runs in-process,
but for the password prompt, which needs a terminal (a pty).
"""

from __future__ import annotations

import json
import os
import pty
import select
import stat
import time
from pathlib import Path

from pgfleet.management import users
from tests.fix_daemon import PGFLEET, DaemonFactory
from tests.fix_repository import RunCli
from tests.management.helpers import PASSWORD, USER, Mgmt, start_daemon


def ctl(run_cli: RunCli, m: Mgmt, *args: str, password: str | None = None) -> tuple[int, str, str]:
    env = {"PGFLEET_PASSWORD": password} if password is not None else {}
    res = run_cli("-c", str(m.d.config), "ctl", *args, env=env)
    return res.rc, res.out, res.err


def remote(m: Mgmt, *extra: str) -> list[str]:
    return [
        "--host", "localhost", "--port", str(m.port), "--user", USER, "--tls",
        "--ca-file", str(m.pki.ca), *extra,
    ]  # fmt: skip


def test_ctl_commands_output_and_exit_codes(
    repo: str, run_cli: RunCli, daemon: DaemonFactory, tmp_path: Path, sockdir: Path
) -> None:
    m = start_daemon(daemon, repo, tmp_path, sockdir)

    rc, out, err = ctl(run_cli, m, "ping")
    assert (rc, out, err) == (0, "the collector is running\n", "")
    rc, out, err = ctl(run_cli, m, "status")
    assert rc == 0, err
    assert out.startswith(f"collector   {m.d.name} (pid {m.d.pid}, pgfleet ")
    assert "repository  reachable" in out and "management  1 connection(s)" in out
    rc, out, err = ctl(run_cli, m, "--format", "json", "--compression", "zstd", "status", "details")
    answer = json.loads(out)
    assert answer["Outcome"]["Status"] is True and answer["Header"]["Compression"] == 2
    assert answer["Response"]["Servers"] == {}

    # The servers registry, through the collector.
    rc, out, err = ctl(
        run_cli, m, "server", "add", "far", "--host", "127.0.0.1", "--port", "1", "--disabled",
        "--retention", "2d",
    )  # fmt: skip
    assert rc == 0, err
    assert out.startswith("server 'far' added (srvid ")
    rc, out, err = ctl(run_cli, m, "server", "ls")
    assert rc == 0 and out.splitlines()[0].split() == [
        "srvid", "alias", "host", "port", "user", "dbname", "freq", "enabled", "here",
    ]  # fmt: skip
    assert out.splitlines()[1].split()[1:] == [
        "far",
        "127.0.0.1",
        "1",
        "postgres",
        "300",
        "no",
        "no",
    ]
    rc, out, err = ctl(run_cli, m, "server", "add", "bad alias")
    assert rc == 1 and err.startswith("pgfleet: error: invalid alias 'bad alias'"), err
    rc, out, err = ctl(run_cli, m, "server", "rm", "far", "--purge")
    assert (rc, out) == (0, "server 'far' removed and its data purged\n"), err

    # The configuration.
    rc, out, err = ctl(run_cli, m, "conf", "ls")
    assert rc == 0 and f"UnixSocket: {m.socket}" in out
    rc, out, err = ctl(run_cli, m, "conf", "get", "management.port")
    assert (rc, out) == (0, f"{m.port}\n")
    rc, out, err = ctl(run_cli, m, "conf", "get")
    assert rc == 0 and 'logging.level = "debug"' in out and 'web.token = ""' in out
    rc, out, err = ctl(run_cli, m, "conf", "set", "logging.level", "info")
    assert (rc, out) == (0, "logging.level: debug -> info\n"), err
    rc, out, err = ctl(run_cli, m, "conf", "set", "management.unix_socket_dir", "/elsewhere")
    assert rc == 0 and out.startswith("management.unix_socket_dir: needs a restart"), err
    rc, out, err = ctl(run_cli, m, "conf", "set", "logging.level", "loud")
    assert rc == 1
    assert err == (
        "pgfleet: error: invalid configuration 'conf set': logging.level: 'loud' is not one of "
        "'trace', 'debug', 'info', 'warning', 'error' (error 8, bad_arguments)\n"
    )
    rc, out, err = ctl(run_cli, m, "snapshot", "nope")
    assert rc == 1
    assert err.endswith("(error 16, not_found)\n") and err.count("\n") == 1
    rc, out, err = ctl(run_cli, m, "--format", "json", "snapshot", "nope")
    assert rc == 1 and json.loads(out)["Outcome"]["Error"] == 16
    rc, out, err = ctl(run_cli, m, "clear", "prometheus")
    assert rc == 0 and out.endswith("counter series cleared\n")
    # Backups: this collector has no [backup] directory.
    rc, out, err = ctl(run_cli, m, "backup", "ls", "far")
    assert rc == 1 and err.count("\n") == 1 and "(error 9, not_allowed)" in err, err
    rc, out, err = ctl(run_cli, m, "--format", "json", "backup", "status")
    assert rc in (0, 1) and "Outcome" in json.loads(out), (rc, out, err)
    rc, out, err = ctl(run_cli, m, "reload")
    assert rc == 0 and out.startswith("configuration reloaded from "), err

    # Remotely: the password from the environment, never the command line.
    rc, out, err = ctl(run_cli, m, *remote(m), "ping", password=PASSWORD)
    assert (rc, out) == (0, "the collector is running\n"), err
    for compression in ("none", "gzip", "zstd", "lz4", "bzip2"):
        rc, out, err = ctl(
            run_cli, m, *remote(m), "--compression", compression, "--encryption", "aes-256-gcm",
            "--format", "json", "conf", "get", "collector.max_in_flight", password=PASSWORD,
        )  # fmt: skip
        assert rc == 0, err
        assert json.loads(out)["Response"]["ConfigValue"] == 10
    rc, out, err = ctl(run_cli, m, *remote(m), "reload", password=PASSWORD)
    assert rc == 1 and err.endswith("(error 9, not_allowed)\n"), err
    # Unreachable or not logged in: 3, one line.
    rc, out, err = ctl(run_cli, m, *remote(m), "ping", password="wrong")
    assert rc == 3 and err == (
        f'pgfleet: error: password authentication failed for user "{USER}"\n'
    )
    rc, out, err = ctl(run_cli, m, *remote(m), "ping")
    assert (
        rc == 3
        and err == "pgfleet: error: no password: set PGFLEET_PASSWORD, or run from a terminal\n"
    )
    rc, out, err = ctl(run_cli, m, "--socket", str(tmp_path / "nowhere"), "ping")
    assert rc == 3 and "is the collector running?" in err and err.count("\n") == 1
    # The command line itself: 2.
    for args in (("frobnicate",), ("conf", "set", "only-a-key"), ("--port", "0", "ping")):
        rc, out, err = ctl(run_cli, m, *args)
        assert rc == 2 and err.startswith("pgfleet: error: "), args
    rc, out, err = ctl(run_cli, m, "--encryption", "aes-256-gcm", "--key-file",
                       str(tmp_path / "no-key"), "ping")  # fmt: skip
    assert rc == 1 and "encryption key file" in err

    # A user added now can log in at once; deleted, no more.
    res = run_cli("user", "add", "ops", "--admins-file", str(m.admins),
                  env={"PGFLEET_PASSWORD": "ops-password-1"})  # fmt: skip
    assert res.rc == 0, res.err
    rc, out, err = ctl(run_cli, m, *remote(m)[:4], "--user", "ops", "--tls", "--ca-file",
                       str(m.pki.ca), "ping", password="ops-password-1")  # fmt: skip
    assert rc == 0, err
    assert run_cli("user", "del", "ops", "--admins-file", str(m.admins)).rc == 0
    rc, out, err = ctl(run_cli, m, *remote(m)[:4], "--user", "ops", "--tls", "--ca-file",
                       str(m.pki.ca), "ping", password="ops-password-1")  # fmt: skip
    assert rc == 3, err

    rc, out, err = ctl(run_cli, m, "shutdown")
    assert (rc, out) == (0, "the collector is stopping\n")
    assert m.d.proc is not None and m.d.proc.wait(20) == 0
    rc, out, err = ctl(run_cli, m, "ping")
    assert rc == 3
    text = m.d.text()
    assert PASSWORD not in text and "ops-password-1" not in text
    assert "Traceback" not in text


def test_user_commands(run_cli: RunCli, tmp_path: Path) -> None:
    admins = tmp_path / "admins"
    f = ("--admins-file", str(admins))
    res = run_cli("user", "add", "alice", *f, env={"PGFLEET_PASSWORD": "alice-secret"})
    assert (res.rc, res.out) == (0, "user 'alice' added\n"), res.err
    assert stat.S_IMODE(admins.stat().st_mode) == 0o600
    assert "alice-secret" not in admins.read_text()
    assert admins.read_text().startswith("alice:SCRAM-SHA-256$4096:")
    res = run_cli("user", "add", "bob", *f, env={"PGFLEET_PASSWORD": "bob-secret"})
    assert res.rc == 0
    assert run_cli("user", "ls", *f).out == "alice\nbob\n"
    before = users.load(admins)["bob"].verifier
    res = run_cli("user", "edit", "bob", *f, env={"PGFLEET_PASSWORD": "bob-new"})
    assert (res.rc, res.out) == (0, "user 'bob' has a new password\n")
    assert users.load(admins)["bob"].verifier != before
    res = run_cli("user", "del", "alice", *f)
    assert (res.rc, res.out) == (0, "user 'alice' removed\n")
    assert run_cli("user", "ls", *f).out == "bob\n"
    # Errors: one line each.
    for args, env, message in (
        (("add", "bob"), {"PGFLEET_PASSWORD": "x"}, "user 'bob' already exists"),
        (("del", "carol"), {}, "no user 'carol'"),
        (("add", "bad:name"), {"PGFLEET_PASSWORD": "x"}, "invalid user name 'bad:name'"),
        (("add", "dave"), {}, "no password: set PGFLEET_PASSWORD, or run from a terminal"),
    ):
        res = run_cli("user", *args, *f, env=env)
        assert res.rc == 1 and message in res.err and res.err.count("\n") == 1, (args, res.err)
    res = run_cli("user", "ls")
    assert res.rc == 1 and "no admins file" in res.err
    # A password on the command line is not a thing.
    res = run_cli("user", "add", "eve", "--password", "x", *f)
    assert res.rc == 2


def _pty_run(
    argv: list[str], answers: list[tuple[bytes, bytes]], timeout: float = 30
) -> tuple[int, bytes]:
    """Run ``argv`` on a terminal, answering each prompt; its status and what it showed."""
    pid, fd = pty.fork()
    if pid == 0:  # the child
        os.execv(argv[0], argv)
    seen = b""
    deadline = time.monotonic() + timeout
    pending = list(answers)
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:  # the child is gone (EIO)
                    break
                if not chunk:
                    break
                seen += chunk
            if pending and pending[0][0] in seen:
                os.write(fd, pending.pop(0)[1])
                seen += b"\n"  # a prompt repeated later must be seen afresh
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(fd)
    return os.waitstatus_to_exitcode(status), seen


def test_user_add_asks_for_the_password_twice_on_a_terminal(tmp_path: Path) -> None:
    admins = tmp_path / "admins"
    argv = [str(PGFLEET), "user", "add", "tty", "--admins-file", str(admins)]
    rc, seen = _pty_run(
        argv, [(b"Password for tty: ", b"typed-secret\n"), (b"Again: ", b"typed-secret\n")]
    )
    assert rc == 0, seen
    assert b"typed-secret" not in seen  # not echoed
    assert users.names(admins) == ["tty"]
    rc, seen = _pty_run(
        [str(PGFLEET), "user", "edit", "tty", "--admins-file", str(admins)],
        [(b"Password for tty: ", b"one\n"), (b"Again: ", b"two\n")],
    )
    assert rc == 1 and b"the passwords differ" in seen
