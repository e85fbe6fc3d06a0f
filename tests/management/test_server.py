"""The management protocol against a real ``pgfleet collector`` process.

Real sockets throughout: the daemon's local socket and its TCP port, TLS
with a CA and a certificate made for it, SCRAM logins against an admins file,
``psql`` pointed at the port.  One daemon per test, and loops over the ten
compression x encryption combinations inside it, keep the module to seconds.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from scramp import ScramClient

from pgfleet.cluster import Cluster
from pgfleet.management import auth, frame
from pgfleet.management.client import Unreachable
from pgfleet.management.document import ErrorCode, ManagementError, request
from pgfleet.management.frame import Compression, Encryption
from tests.fix_daemon import DaemonFactory, wait_until
from tests.fix_repository import RunCli, add_server
from tests.management.helpers import PASSWORD, USER, Mgmt, call, start_daemon, wait_for

PSQL = Path("/usr/lib/postgresql/15/bin/psql")
COMBOS = [(c, e) for c in Compression for e in Encryption]


def error_of(m: Mgmt, command: str, args: dict[str, Any] | None = None, **kw: Any) -> ErrorCode:
    with pytest.raises(ManagementError) as e:
        asyncio.run(call(m, command, args, **kw))
    assert not isinstance(e.value, Unreachable), e.value
    return e.value.code


async def raw_exchange(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    data: bytes,
    key: bytes | None,
    *,
    max_size: int = 2**24,
) -> tuple[int, int, dict[str, Any]]:
    """Send bytes, read one answer frame: its compression, encryption and document."""
    if data:
        writer.write(data)
        await writer.drain()
    async with asyncio.timeout(10):
        head = await reader.readexactly(frame.HEADER.size)
        c, e, n = frame.HEADER.unpack(head)
        payload = await reader.readexactly(n)
    return c, e, frame.decode(c, e, payload, key=key, max_size=max_size)


async def closed(reader: asyncio.StreamReader) -> bool:
    """Whether the server closed the connection (EOF within a few seconds)."""
    async with asyncio.timeout(10):
        return await reader.read(1) == b""


# -- Every command, locally and remotely, in every combination


def test_every_command_locally_and_remotely(
    repo: str,
    run_cli: RunCli,
    daemon: DaemonFactory,
    mon: Cluster,
    tmp_path: Path,
    sockdir: Path,
) -> None:
    add_server(run_cli, "db1", mon.dsn(), "--frequency", "600")
    m = start_daemon(daemon, repo, tmp_path, sockdir)
    wait_until(lambda: asyncio.run(call(m, "status"))["NumberOfServers"] == 1, 20, "db1's worker")

    async def combos() -> None:
        local = await m.local()
        remote = await m.remote()
        for c, e in COMBOS:
            for client, where in ((local, "local"), (remote, "remote")):
                for command, args in (
                    ("ping", {}),
                    ("status", {"Details": e == Encryption.AES_256_GCM}),
                    ("conf get", {"ConfigKey": "collector.max_in_flight"}),
                    ("conf get", {}),
                    ("conf ls", {}),
                ):
                    doc = await client.request(command, args, compression=c, encryption=e)
                    assert doc["Outcome"]["Status"] is True, (where, c, e, command, doc)
                    assert doc["Header"]["Command"] == command
                    assert (doc["Header"]["Compression"], doc["Header"]["Encryption"]) == (c, e)
                # The commands that change something, too, in every combination:
                # each leaves the daemon as it found it.
                alias = f"combo-{where}-{int(c)}-{int(e)}"
                settings = {"host": "127.0.0.1", "port": 1, "frequency": 3600, "enabled": False}
                changes: list[tuple[str, dict[str, Any], bool]] = [
                    ("snapshot", {"Server": "db1"}, True),
                    (
                        "conf set",
                        {"ConfigKey": "collector.max_in_flight", "ConfigValue": "10"},
                        True,
                    ),
                    ("server add", {"Server": alias, "Settings": settings}, True),
                    ("server ls", {}, True),
                    ("server rm", {"Server": alias}, True),
                    ("clear prometheus", {}, True),
                    # Local only, as in pgmoneta.
                    ("reload", {}, where == "local"),
                    # No [backup] directory here: refused, in the request's types.
                    ("backup ls", {"Server": "db1"}, False),
                ]
                for command, change, ok in changes:
                    doc = await client.request(command, change, compression=c, encryption=e)
                    assert doc["Outcome"]["Status"] is ok, (where, c, e, command, doc)
                    assert (doc["Header"]["Compression"], doc["Header"]["Encryption"]) == (c, e)
                    if not ok:
                        assert doc["Outcome"]["Error"] == ErrorCode.NOT_ALLOWED, doc
                resp = (
                    await client.request("status", {"Details": True}, compression=c, encryption=e)
                )["Response"]
                assert resp["NumberOfServers"] == 1 and resp["Collector"] == m.d.name
                assert [s["alias"] for s in resp["Servers"].values()] == ["db1"]
        # The answer's frame is of the request's types, byte for byte.
        reader, writer = await asyncio.open_unix_connection(str(m.socket))
        for c, e in COMBOS:
            data = frame.encode(request("ping"), c, e, m.key)
            got = await raw_exchange(reader, writer, data, m.key)
            assert got[:2] == (c, e)
            assert got[2]["Outcome"]["Status"] is True
        writer.close()
        for client in (local, remote):
            await client.close()

    asyncio.run(combos())

    for remote in (False, True):
        where = "remote" if remote else "local"
        status = asyncio.run(call(m, "status", {}, remote=remote))
        assert status["Spool"]["Snapshots"] == 0 and status["Leases"]["Held"] == 1, status
        assert status["Repository"]["Reachable"] is True
        assert "Servers" not in status
        files = asyncio.run(call(m, "conf ls", remote=remote))
        assert files["UnixSocket"] == str(m.socket)
        assert files["AdminsFile"] == str(m.admins)
        # conf set: applied at once, or said to need a restart.
        value = "4" if remote else "5"
        got = asyncio.run(
            call(
                m,
                "conf set",
                {"ConfigKey": "collector.max_in_flight", "ConfigValue": value},
                remote=remote,
            )
        )
        assert got["NewValue"] == int(value) and got["Restart"] is False, got
        assert asyncio.run(call(m, "status", remote=remote))["MaxInFlight"] == int(value)
        got = asyncio.run(
            call(m, "conf set", {"ConfigKey": "management.port", "ConfigValue": "1"}, remote=remote)
        )
        assert got == {
            "ConfigKey": "management.port",
            "CurrentValue": m.port,
            "RequestedValue": 1,
            "Restart": True,
        }
        assert (
            error_of(
                m,
                "conf set",
                {"ConfigKey": "collector.max_in_flight", "ConfigValue": "0"},
                remote=remote,
            )
            == ErrorCode.BAD_ARGUMENTS
        )
        assert error_of(m, "conf get", {"ConfigKey": "no.such"}, remote=remote) == (
            ErrorCode.NOT_FOUND
        )
        # snapshot, by alias and by srvid.
        got = asyncio.run(call(m, "snapshot", {"Server": "db1"}, remote=remote))
        assert got["Server"] == "db1" and isinstance(got["Started"], bool)
        srvid = got["Srvid"]
        assert (
            asyncio.run(call(m, "snapshot", {"Server": str(srvid)}, remote=remote))["Server"]
            == "db1"
        )
        assert error_of(m, "snapshot", {"Server": "nope"}, remote=remote) == ErrorCode.NOT_FOUND
        # The servers registry.
        alias = f"extra-{where}"
        got = asyncio.run(
            call(
                m,
                "server add",
                {
                    "Server": alias,
                    "Settings": {
                        "host": "127.0.0.1",
                        "port": 1,
                        "frequency": 3600,
                        "retention": 86400,
                        "enabled": False,
                    },
                },
                remote=remote,
            )
        )
        assert got["Server"]["alias"] == alias and got["Server"]["retention_seconds"] == 86400
        listed = asyncio.run(call(m, "server ls", remote=remote))["Servers"]
        assert {s["alias"]: s["collected"] for s in listed}[alias] is False
        assert {s["alias"]: s["collected"] for s in listed}["db1"] is True
        assert error_of(m, "server add", {"Server": alias}, remote=remote) == (
            ErrorCode.BAD_ARGUMENTS
        )
        got = asyncio.run(call(m, "server rm", {"Server": alias}, remote=remote))
        assert got["Server"]["alias"] == alias
        assert error_of(m, "server rm", {"Server": alias}, remote=remote) == ErrorCode.NOT_FOUND
        # clear prometheus: the counters start again.
        before = m.metrics()
        assert before.get('pgfleet_management_commands_total{command="server rm"}', 0) >= 1
        got = asyncio.run(call(m, "clear prometheus", remote=remote))
        assert got["Cleared"] > 0
        after = m.metrics()
        assert 'pgfleet_management_commands_total{command="server rm"}' not in after
        # Arguments are checked before anything runs; the connection stays open.
        for command, args in (
            ("ping", {"Extra": 1}),
            ("snapshot", {}),
            ("snapshot", {"Server": 1}),
            ("status", {"Details": "yes"}),
            ("server add", {"Server": "x", "Settings": {"port": True}}),
            ("server add", {"Server": "x", "Settings": {"password": "secret"}}),
        ):
            assert error_of(m, command, args, remote=remote) == ErrorCode.BAD_ARGUMENTS, command

    # reload: local only, as in pgmoneta.
    got = asyncio.run(call(m, "reload"))
    assert got["Message"].startswith("configuration reloaded from ") and got["Restart"] is False
    assert asyncio.run(call(m, "status"))["MaxInFlight"] == 10  # the file's value again
    assert error_of(m, "reload", remote=True) == ErrorCode.NOT_ALLOWED

    # A failed command leaves the connection open; an unknown one closes it.
    async def unknown() -> None:
        async with await m.remote() as c:
            doc = await c.request("snapshot", {"Server": "nope"})
            assert doc["Outcome"]["Error"] == ErrorCode.NOT_FOUND
            assert (await c.request("ping"))["Outcome"]["Status"] is True
            doc = await c.request("drop everything")
            assert doc["Outcome"]["Error"] == ErrorCode.UNKNOWN_COMMAND
            assert "unknown command 'drop everything'" in doc["Outcome"]["Message"]
            with pytest.raises(Unreachable, match="closed the connection"):
                await c.request("ping")

    asyncio.run(unknown())

    # shutdown, remotely: the answer comes first, then a clean stop.
    assert asyncio.run(call(m, "shutdown", remote=True)) == {}
    assert m.d.proc is not None and m.d.proc.wait(20) == 0
    assert m.d.find("stopping", reason="management shutdown")
    assert m.d.find("collector stopped")
    assert not m.socket.exists()

    # A socket left by a killed daemon is replaced; shutdown, locally.
    m.d.start()
    wait_for(m)
    m.d.kill()
    assert m.socket.exists()
    m.d.start()
    wait_for(m)
    assert asyncio.run(call(m, "shutdown")) == {}
    assert m.d.proc is not None and m.d.proc.wait(20) == 0
    assert PASSWORD not in m.d.text()


# -- Refusals: counted in /metrics, logged without secrets


async def _pg_message(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readexactly(5)
    (length,) = struct.unpack("!i", head[1:])
    return head[:1], await reader.readexactly(length - 4)


def _sasl_initial(first: str) -> bytes:
    body = b"SCRAM-SHA-256\0" + struct.pack("!i", len(first)) + first.encode()
    return b"p" + struct.pack("!i", len(body) + 4) + body


def _sasl_response(text: str) -> bytes:
    return b"p" + struct.pack("!i", len(text) + 4) + text.encode()


async def hand_written_login(port: int, user: str, password: str) -> tuple[str, str, bytes]:
    """A PostgreSQL-format client written here (scramp only for the SCRAM maths).

    Returns the client-first and client-final messages, and the last
    message type: ``R`` (AuthenticationOk) on success.
    """
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(auth.startup_message(user))
        kind, body = await _pg_message(reader)
        assert (kind, struct.unpack("!i", body[:4])[0]) == (b"R", 10)
        assert b"SCRAM-SHA-256\0" in body
        scram = ScramClient(["SCRAM-SHA-256"], user, password)
        first = scram.get_client_first()
        writer.write(_sasl_initial(first))
        kind, body = await _pg_message(reader)
        assert (kind, struct.unpack("!i", body[:4])[0]) == (b"R", 11)
        scram.set_server_first(body[4:].decode())
        final = scram.get_client_final()
        writer.write(_sasl_response(final))
        kind, body = await _pg_message(reader)
        if kind == b"R":
            assert struct.unpack("!i", body[:4])[0] == 12
            scram.set_server_final(body[4:].decode())
            kind, body = await _pg_message(reader)
            assert (kind, body) == (b"R", struct.pack("!i", 0))
        return first, final, kind
    finally:
        writer.close()


async def replay(port: int, user: str, first: str, final: str) -> dict[str, str]:
    """Send a recorded client-first and client-final again; the server's ErrorResponse."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(auth.startup_message(user))
        await _pg_message(reader)
        writer.write(_sasl_initial(first))
        kind, _ = await _pg_message(reader)
        assert kind == b"R"
        writer.write(_sasl_response(final))
        kind, body = await _pg_message(reader)
        assert kind == b"E", (kind, body)
        return {chr(f[0]): f[1:].decode() for f in body.split(b"\0") if f}
    finally:
        writer.close()


def counted(m: Mgmt, interface: str, reason: str, n: int) -> None:
    """Wait for the daemon's count of ``reason`` refusals to reach ``n``."""
    wait_until(lambda: m.refusals(interface, reason) == n, 5, f"{n} {interface} {reason} refusals")


def test_refusals_are_counted_and_logged_without_secrets(
    repo: str, daemon: DaemonFactory, tmp_path: Path, sockdir: Path
) -> None:
    m = start_daemon(daemon, repo, tmp_path, sockdir, timeout=2)

    # Wrong password, unknown user: the same answer to the client.
    for user, password in ((USER, "not-the-password"), ("nobody", PASSWORD)):
        with pytest.raises(Unreachable) as e:
            asyncio.run(m.remote(user, password))
        assert e.value.code == ErrorCode.AUTH_FAILED
        assert f'password authentication failed for user "{user}"' in e.value.message
    # Counted as each connection ends, after the answer went out: waited for.
    counted(m, "remote", "auth_failed", 1)
    counted(m, "remote", "unknown_user", 1)

    # A client written by hand logs in; its proof, replayed, does not.
    first, final, last = asyncio.run(hand_written_login(m.port, USER, PASSWORD))
    assert last == b"R"
    error = asyncio.run(replay(m.port, USER, first, final))
    assert error["C"] == "28P01" and "password authentication failed" in error["M"]
    counted(m, "remote", "auth_failed", 2)

    # TLS required: a client without TLS is refused, before any SCRAM.
    asyncio.run(call(m, "conf set", {"ConfigKey": "management.require_tls", "ConfigValue": "true"}))
    with pytest.raises(Unreachable) as e:
        asyncio.run(m.remote(tls=False))
    assert e.value.code == ErrorCode.TLS_REQUIRED

    # A downgrade: SSLRequest answered 'S', then the startup in clear.
    async def downgrade() -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", m.port)
        writer.write(struct.pack("!iI", 8, auth.SSL_REQUEST))
        assert await reader.readexactly(1) == b"S"
        writer.write(auth.startup_message(USER))
        data = await reader.read(4096)
        writer.close()
        return data

    assert b"SCRAM" not in asyncio.run(downgrade())
    counted(m, "remote", "tls_required", 1)
    counted(m, "remote", "bad_startup", 1)
    assert asyncio.run(call(m, "ping", remote=True)) == {}  # with TLS, fine

    # A client that stops mid-handshake, and one that stalls past the timeout.
    async def stops(stall: bool) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", m.port)
        writer.write(struct.pack("!iI", 8, auth.SSL_REQUEST))
        assert await reader.readexactly(1) == b"S"
        await writer.start_tls(auth.client_ssl_context(m.pki.ca), server_hostname="localhost")
        writer.write(auth.startup_message(USER))
        kind, _ = await _pg_message(reader)
        assert kind == b"R"
        if stall:
            async with asyncio.timeout(10):
                data = await reader.read()
        else:
            data = b""
        writer.close()
        return data

    asyncio.run(stops(stall=False))
    began = time.monotonic()
    assert b"timeout" in asyncio.run(stops(stall=True))
    assert 1.5 < time.monotonic() - began < 8
    wait_until(lambda: m.refusals("remote", "bad_startup") == 2, 5, "the stopped handshake")
    counted(m, "remote", "timeout", 1)

    # psql is not a management client: it fails at once, saying why.
    if PSQL.exists():
        res = subprocess.run(
            [
                str(PSQL),
                f"host=127.0.0.1 port={m.port} user={USER} dbname=x sslmode=require "
                f"connect_timeout=5",
                "-c",
                "SELECT 1",
            ],
            env={**os.environ, "PGPASSWORD": PASSWORD},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert res.returncode == 2, res
        assert "not a PostgreSQL server" in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) <= 2
        counted(m, "remote", "not_management_client", 1)

    # The local socket: any other uid is refused, even given the socket.
    os.chmod(sockdir.parent, 0o711)
    os.chmod(sockdir, 0o711)
    os.chmod(m.socket, 0o666)
    script = (
        "import socket, sys\n"
        f"s = socket.socket(socket.AF_UNIX); s.connect({str(m.socket)!r})\n"
        "s.settimeout(10); sys.stdout.buffer.write(s.recv(65536))\n"
    )
    other = subprocess.run(
        # The system's Python: the test's may be in a directory only we can read.
        [shutil.which("python3", path="/usr/bin:/bin") or sys.executable, "-c", script],
        user="pgfleet",
        capture_output=True,
        timeout=30,
    )
    assert other.returncode == 0, other.stderr
    c, e, n = frame.HEADER.unpack(other.stdout[:6])
    doc = frame.decode(c, e, other.stdout[6 : 6 + n], key=None, max_size=2**20)
    assert doc["Outcome"]["Error"] == ErrorCode.NOT_ALLOWED
    counted(m, "local", "not_allowed", 1)
    os.chmod(m.socket, 0o600)

    # Every refusal was logged, and no secret.
    refused = m.d.find("management connection refused")
    assert {e.get("reason") for e in refused} >= {
        "auth_failed",
        "unknown_user",
        "tls_required",
        "timeout",
        "bad_startup",
        "not_allowed",
    }
    text = m.d.text()
    assert PASSWORD not in text
    assert "not-the-password" not in text
    assert final not in text and final.rsplit("p=", 1)[1] not in text
    assert m.d.alive()
    assert asyncio.run(call(m, "ping")) == {}


# -- Malformed frames, limits, timeouts


def test_bad_frames_limits_and_timeouts(
    repo: str, daemon: DaemonFactory, tmp_path: Path, sockdir: Path
) -> None:
    m = start_daemon(daemon, repo, tmp_path, sockdir, max_frame_size=4096, max_connections=4)
    ping = frame.encode(request("ping"))
    cases: list[tuple[bytes, ErrorCode]] = [
        (ping[:3], ErrorCode.BAD_FRAME),  # a truncated header
        (ping[:-2], ErrorCode.BAD_FRAME),  # a truncated body
        (frame.HEADER.pack(0, 0, 5000) + b"{}", ErrorCode.FRAME_TOO_LARGE),
        (frame.HEADER.pack(9, 0, 2) + b"{}", ErrorCode.BAD_COMPRESSION),
        (frame.HEADER.pack(1, 0, 4) + b"nope", ErrorCode.BAD_COMPRESSION),
        (frame.HEADER.pack(0, 7, 2) + b"{}", ErrorCode.BAD_ENCRYPTION),
        (frame.HEADER.pack(0, 1, 40) + bytes(40), ErrorCode.BAD_ENCRYPTION),
        (frame.HEADER.pack(0, 0, 3) + b"{x}", ErrorCode.BAD_JSON),
        (frame.HEADER.pack(0, 0, 3) + b"\xff\xfe{", ErrorCode.BAD_JSON),
        (frame.HEADER.pack(0, 0, 2) + b"[]", ErrorCode.BAD_DOCUMENT),
        (frame.encode({"Header": {}}), ErrorCode.BAD_DOCUMENT),
        (frame.encode(request("format c:")), ErrorCode.UNKNOWN_COMMAND),
        # A gzip bomb: small on the wire, over the limit once inflated.
        (
            frame.encode({"Header": {"Command": "ping"}, "x": "0" * 100_000}, Compression.GZIP),
            ErrorCode.FRAME_TOO_LARGE,
        ),
    ]

    async def each() -> None:
        for data, code in cases:
            reader, writer = await asyncio.open_unix_connection(str(m.socket))
            writer.write(data)
            writer.write_eof()
            _, _, doc = await raw_exchange(reader, writer, b"", m.key)
            assert doc["Outcome"]["Status"] is False
            assert doc["Outcome"]["Error"] == code, (data[:40], doc)
            assert await closed(reader), data[:40]
            writer.close()

    asyncio.run(each())

    # The cap: past max_connections, refused at once, locally and remotely.
    async def cap() -> None:
        held = [await m.local() for _ in range(4)]
        for c in held:  # each really counted before the next one
            assert (await c.request("ping"))["Outcome"]["Status"] is True
        reader, writer = await asyncio.open_unix_connection(str(m.socket))
        async with asyncio.timeout(10):
            head = await reader.readexactly(6)
            c, e, n = frame.HEADER.unpack(head)
            doc = frame.decode(c, e, await reader.readexactly(n), key=None, max_size=2**20)
        assert doc["Outcome"]["Error"] == ErrorCode.TOO_MANY_CONNECTIONS
        writer.close()
        with pytest.raises(Unreachable) as e:
            await m.remote()
        assert e.value.code == ErrorCode.TOO_MANY_CONNECTIONS
        for c in held:
            await c.close()

    asyncio.run(cap())
    wait_until(
        lambda: (
            m.refusals("local", "too_many_connections") == 1
            and m.refusals("remote", "too_many_connections") == 1
        ),
        5,
        "the refusals counted",
    )

    # An idle connection is told, then closed, after [management] timeout.
    asyncio.run(call(m, "conf set", {"ConfigKey": "management.timeout", "ConfigValue": "1"}))

    async def idle() -> float:
        reader, writer = await asyncio.open_unix_connection(str(m.socket))
        began = time.monotonic()
        writer.write(ping[:4])  # and never the rest
        async with asyncio.timeout(10):
            c, e, n = frame.HEADER.unpack(await reader.readexactly(6))
            doc = frame.decode(c, e, await reader.readexactly(n), key=None, max_size=2**20)
        assert doc["Outcome"]["Error"] == ErrorCode.TIMEOUT
        assert await closed(reader)
        writer.close()
        return time.monotonic() - began

    assert 0.8 < asyncio.run(idle()) < 4

    errors = m.metrics()
    for code in (
        "bad_frame",
        "frame_too_large",
        "bad_compression",
        "bad_encryption",
        "bad_json",
        "bad_document",
        "unknown_command",
        "timeout",
    ):
        assert errors.get(f'pgfleet_management_errors_total{{code="{code}"}}', 0) >= 1, code
    assert m.d.alive()


def test_the_socket_is_private_and_not_stolen(
    repo: str, daemon: DaemonFactory, tmp_path: Path, sockdir: Path
) -> None:
    m = start_daemon(daemon, repo, tmp_path, sockdir)
    assert (sockdir.stat().st_mode & 0o777) == 0o700
    assert (m.socket.stat().st_mode & 0o777) == 0o600
    # A second daemon pointed at the same directory: one clear error, and the
    # first one's socket still works.
    other = daemon(repo, name="other", management={"unix_socket_dir": str(sockdir)})
    assert other.proc is not None and other.proc.wait(30) == 1
    assert "is in use by another collector" in other.text()
    assert asyncio.run(call(m, "ping")) == {}
    # A file that is not a socket is left alone.
    m.d.stop()
    m.socket.write_text("mine")
    m.d.start()
    assert m.d.proc is not None and m.d.proc.wait(30) == 1
    assert "exists and is not a socket" in m.d.text()
    assert m.socket.read_text() == "mine"


def test_a_socket_deeper_than_sun_path_allows(
    repo: str, daemon: DaemonFactory, tmp_path: Path, sockdir: Path
) -> None:
    deep = sockdir / ("d" * 60) / ("e" * 60)
    assert len(str(deep / "pgfleet.sock")) > 108
    m = start_daemon(daemon, repo, tmp_path, deep)
    assert asyncio.run(call(m, "conf ls"))["UnixSocket"] == str(m.socket)
    assert m.d.stop() == 0
    assert not m.socket.exists()
