"""A server entry must not steal secrets.

A server's host and password reference are whatever whoever edits the
registry (or a file_sd file) wrote.  Pointed at a fake PostgreSQL that asks
for the password in clear, an entry once got the repository's DSN, password
and all.  Now references are confined to what ``[collector]`` allows
(``password_env_prefix``, ``password_dirs``), and libpq never answers a
cleartext or MD5 request unless the server's options say so.

The fake server speaks just enough of the v3 protocol: it declines SSL and
GSS encryption, reads the StartupMessage, asks for a password in clear or
as MD5, and records whatever PasswordMessage comes back.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import struct
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from psycopg.conninfo import conninfo_to_dict

from pgfleet.cluster import Cluster
from pgfleet.config import CollectorConfig
from pgfleet.connections import REFUSE_WEAK_AUTH, resolve_password, server_conninfo
from pgfleet.errors import ConfigError, ServerError
from pgfleet.repository.servers import Server
from pgfleet.snapshot.fetch import ServerSession
from tests.fix_clusters import NewDatabase
from tests.fix_daemon import DaemonFactory, wait_until
from tests.fix_repository import RunCli, add_server, connect, new_repository, scalar

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104
PROTOCOL_3 = 3 << 16


@dataclasses.dataclass
class Startup:
    """One connection the fake server received."""

    params: dict[str, str]
    # The PasswordMessage's payload, if the client sent one.
    password: bytes | None = None


class FakePostgres:
    """A TCP server on 127.0.0.1 that asks every client for its password.

    ``auth``: "password" (AuthenticationCleartextPassword, R 3) or "md5"
    (AuthenticationMD5Password, R 5).  Runs its own event loop in a thread,
    so that a daemon process and in-process code can both talk to it.
    """

    def __init__(self, auth: str) -> None:
        self.auth = auth
        self.startups: list[Startup] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fake-postgres", daemon=True)
        self._server: asyncio.Server | None = None

    def __enter__(self) -> FakePostgres:
        self._thread.start()
        assert self._ready.wait(10), "the fake server did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    @property
    def passwords(self) -> list[bytes]:
        return [s.password for s in self.startups if s.password is not None]

    def users(self) -> list[str]:
        return [s.params.get("user", "") for s in self.startups]

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0)
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        self._server.close()
        self._loop.run_until_complete(self._server.wait_closed())
        self._loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await self._converse(reader, writer)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client hung up, as a careful one does
        finally:
            writer.close()

    async def _converse(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            length, code = struct.unpack("!ii", await reader.readexactly(8))
            if code in (SSL_REQUEST, GSSENC_REQUEST):
                writer.write(b"N")  # no encryption here: carry on in clear
                await writer.drain()
                continue
            body = await reader.readexactly(length - 8)
            break
        if code != PROTOCOL_3 and code >> 16 != 3:
            return
        fields = body.split(b"\0")
        params = {
            k.decode(): v.decode() for k, v in zip(fields[0::2], fields[1::2], strict=False) if k
        }
        startup = Startup(params)
        self.startups.append(startup)
        if self.auth == "md5":
            writer.write(b"R" + struct.pack("!ii", 12, 5) + b"salt")
        else:
            writer.write(b"R" + struct.pack("!ii", 8, 3))
        await writer.drain()
        kind = await reader.readexactly(1)
        (size,) = struct.unpack("!i", await reader.readexactly(4))
        payload = await reader.readexactly(size - 4)
        if kind == b"p":
            startup.password = payload.rstrip(b"\0")
        error = b"SFATAL\0C28P01\0Mpassword authentication failed\0\0"
        writer.write(b"E" + struct.pack("!i", len(error) + 4) + error)
        await writer.drain()


@pytest.fixture(params=["password", "md5"])
def fake(request: pytest.FixtureRequest) -> Iterator[FakePostgres]:
    with FakePostgres(request.param) as server:
        yield server


def one_line(message: str) -> str:
    assert message and "\n" not in message.strip(), message
    return message


# -- References are confined to what the configuration allows


def test_env_references_need_the_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    repository = "host=repo dbname=pgfleet user=pgfleet password=repo-secret-5512"
    monkeypatch.setenv("PGFLEET_REPOSITORY", repository)
    monkeypatch.setenv("PGFLEET_CONFIG", "/etc/pgfleet/pgfleet.toml")
    monkeypatch.setenv("HOME_SECRET", "home-secret-8841")
    monkeypatch.setenv("PGFLEET_PW_DB1", "db1-secret")
    cfg = CollectorConfig()

    assert resolve_password("env:PGFLEET_PW_DB1", cfg, server="db1") == "db1-secret"
    assert resolve_password(None, cfg, server="db1") is None
    refused = ("env:PGFLEET_REPOSITORY", "env:HOME_SECRET", "env:PGFLEET_PW_", "env:")
    for ref in (*refused, "env:PGFLEET_PW_DB1\nHOME_SECRET", "env:PGFLEET_PW_DB1=x"):
        with pytest.raises(ConfigError) as exc:
            resolve_password(ref, cfg, server="evil")
        message = one_line(str(exc.value))
        assert message.startswith(f"server 'evil': password reference {ref!r}: "), message
        assert "PGFLEET_PW_..." in message
        assert "secret" not in message
    # Not even with a prefix that would let them through: the collector's own.
    loose = dataclasses.replace(cfg, password_env_prefix="PGFLEET_")
    for ref in ("env:PGFLEET_REPOSITORY", "env:PGFLEET_CONFIG"):
        with pytest.raises(ConfigError):
            resolve_password(ref, loose, server="evil")
    other = dataclasses.replace(cfg, password_env_prefix="MONITORING_")
    monkeypatch.setenv("MONITORING_DB2", "db2-secret")
    assert resolve_password("env:MONITORING_DB2", other, server="db2") == "db2-secret"
    with pytest.raises(ConfigError, match="PGFLEET_PW_DB1"):
        resolve_password("env:PGFLEET_PW_DB1", other, server="db1")
    # Allowed, but unset: said so, by name.
    with pytest.raises(ConfigError) as exc:
        resolve_password("env:PGFLEET_PW_NONE", cfg, server="db3")
    assert str(exc.value) == (
        "server 'db3': password reference 'env:PGFLEET_PW_NONE': "
        "environment variable PGFLEET_PW_NONE is not set"
    )
    with pytest.raises(ConfigError, match="use env:VARIABLE or file:/path"):
        resolve_password("vault:db1", cfg, server="db1")


def test_file_references_stay_in_their_directories(tmp_path: Path) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "db1").write_text("db1-secret\n")
    outside = tmp_path / "pgfleet.toml"
    outside.write_text("[web]\ntoken = 'web-secret-7781'\n")
    (secrets / "link").symlink_to(outside)
    (secrets / "sub").mkdir()
    (secrets / "sub" / "db2").write_text("db2-secret")
    # The configured directory may itself be reached through a symlink.
    (tmp_path / "alias").symlink_to(secrets)

    # None configured: file references are refused, whatever the path.
    with pytest.raises(ConfigError) as exc:
        resolve_password(f"file:{secrets / 'db1'}", CollectorConfig(), server="db1")
    assert "password_dirs" in one_line(str(exc.value))

    cfg = CollectorConfig(password_dirs=(str(tmp_path / "alias"),))
    assert resolve_password(f"file:{secrets / 'db1'}", cfg, server="db1") == "db1-secret"
    assert resolve_password(f"file:{tmp_path}/alias/sub/db2", cfg, server="db2") == "db2-secret"
    assert resolve_password(f"file:{secrets}/sub/../db1", cfg, server="db1") == "db1-secret"
    escapes = [
        f"file:{outside}",
        f"file:{secrets}/../pgfleet.toml",
        f"file:{secrets}/link",
        f"file:{tmp_path}/alias/../pgfleet.toml",
        "file:/etc/passwd",
        "file:/nonexistent/secret",
    ]
    for ref in escapes:
        with pytest.raises(ConfigError) as exc:
            resolve_password(ref, cfg, server="evil")
        message = one_line(str(exc.value))
        assert message.startswith(f"server 'evil': password reference {ref!r}: not in a directory")
        assert str(secrets) in message
        assert "secret-7781" not in message
    with pytest.raises(ConfigError, match="must be absolute"):
        resolve_password("file:secrets/db1", cfg, server="db1")
    with pytest.raises(ConfigError) as exc:
        resolve_password(f"file:{secrets}/missing", cfg, server="db1")
    assert str(exc.value).endswith(f"cannot read {secrets}/missing: No such file or directory")


def test_conninfo_refuses_weak_authentication_and_applies_sslmode() -> None:
    server = Server(srvid=1, alias="db1", host="db1.example", username="mon")
    cfg = CollectorConfig(sslmode="verify-full")
    params = conninfo_to_dict(server_conninfo(server, cfg))
    assert params["require_auth"] == REFUSE_WEAK_AUTH == "!password,!md5"
    assert params["sslmode"] == "verify-full"
    # The server's own options win: it was set on purpose, for that server.
    own = dataclasses.replace(server, options="require_auth=md5 sslmode=disable")
    params = conninfo_to_dict(server_conninfo(own, cfg))
    assert params["require_auth"] == "md5"
    assert params["sslmode"] == "disable"
    # libpq's default (or PGSSLMODE) when neither says.
    assert "sslmode" not in conninfo_to_dict(server_conninfo(server, CollectorConfig()))


# -- A fake server asking for the password


def _session(port: int, options: str = "", user: str = "mon") -> ServerSession:
    server = Server(
        srvid=1,
        alias="evil",
        host="127.0.0.1",
        port=port,
        username=user,
        password_ref="env:PGFLEET_PW_EVIL",
        options=options,
    )
    return ServerSession(server, CollectorConfig(connect_timeout=3))


async def _connect(session: ServerSession) -> str:
    try:
        await session.info()
    except ServerError as e:
        return str(e)
    finally:
        await session.close()
    raise AssertionError("connected to the fake server")


def test_fake_server_never_gets_the_password(
    fake: FakePostgres, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PGFLEET_PW_EVIL", "real-secret-4471")
    message = one_line(asyncio.run(_connect(_session(fake.port))))
    assert message.startswith("server 'evil': cannot connect: ")
    wanted = "a cleartext password" if fake.auth == "password" else "a hashed password"
    assert message.endswith(f"server requested {wanted}, refused by require_auth=!password,!md5")
    assert "real-secret" not in message
    # It was asked, and answered nothing.
    assert fake.users() == ["mon"]
    assert fake.passwords == []

    # The fake does record a password when one is sent: with require_auth in
    # the server's own options, libpq answers (a decoy here).
    monkeypatch.setenv("PGFLEET_PW_EVIL", "decoy-2208")
    asyncio.run(_connect(_session(fake.port, f"require_auth={fake.auth}", user="control")))
    assert fake.users() == ["mon", "control"]
    (sent,) = fake.passwords
    assert sent == b"decoy-2208" if fake.auth == "password" else sent.startswith(b"md5")


@pytest.fixture
def repo(repo_cluster: Cluster, new_database: NewDatabase) -> str:
    """A fresh repository, on this module's own cluster (see fix_daemon)."""
    return new_repository(repo_cluster, new_database)


def test_daemon_gives_no_secret_to_a_fake_server(
    repo: str, run_cli: RunCli, daemon: DaemonFactory, tmp_path: Path
) -> None:
    """The incident: entries reaching for the collector's own secrets, and
    one with a proper reference, all pointed at a fake server that asks for
    the password in clear."""
    repository = f"{repo} password=repo-secret-9120"
    pwdir = tmp_path / "passwords"
    pwdir.mkdir()
    (pwdir / "config").symlink_to(tmp_path / "daemon-d" / "pgfleet.toml")
    refs = {
        "by_env": "env:PGFLEET_REPOSITORY",
        "by_file": f"file:{tmp_path}/daemon-d/pgfleet.toml",
        "by_dotdot": f"file:{pwdir}/../daemon-d/pgfleet.toml",
        "by_link": f"file:{pwdir}/config",
        "allowed": "env:PGFLEET_PW_ALLOWED",
    }
    with FakePostgres("password") as fake:
        for alias, ref in refs.items():
            dsn = f"host=127.0.0.1 port={fake.port} user={alias} dbname=postgres"
            add_server(run_cli, alias, dsn, "--frequency", "1", "--password-ref", ref)
        d = daemon(
            repo,
            env={"PGFLEET_REPOSITORY": repository, "PGFLEET_PW_ALLOWED": "allowed-secret-3302"},
            collector={"password_dirs": [str(pwdir)]},
            web={"token": "web-secret-6617"},
        )

        def errors() -> dict[str, str] | None:
            with connect(repo) as conn:
                rows = conn.execute(
                    """SELECT DISTINCT ON (s.alias) s.alias, e.message
                         FROM pgfleet.snapshot_errors e JOIN pgfleet.servers s USING (srvid)
                        WHERE s.alias = ANY(%s) ORDER BY s.alias, e.ts""",
                    (list(refs),),
                ).fetchall()
            return {str(a): str(m) for a, m in rows} if len(rows) == len(refs) else None

        found: dict[str, str] = wait_until(errors, 30, "an error recorded for every server")
        # Only the allowed reference got as far as connecting, and it sent nothing.
        assert set(fake.users()) == {"allowed"}
        assert fake.passwords == []
    assert d.alive()
    assert d.stop() == 0
    for alias, ref in refs.items():
        message = found[alias]
        assert "\n" not in message
        if alias == "allowed":
            assert message.startswith("server 'allowed': cannot connect: ")
            assert message.endswith(
                "server requested a cleartext password, refused by require_auth=!password,!md5"
            )
        else:
            assert message.startswith(f"server {alias!r}: password reference {ref!r}: ")
    assert "PGFLEET_PW_..." in found["by_env"]
    assert "password_dirs" in found["by_link"]
    everything = d.text() + str(
        scalar(repo, "SELECT array_agg(e::text) FROM pgfleet.snapshot_errors e")
    )
    for secret in ("repo-secret", "web-secret", "allowed-secret"):
        assert secret not in everything


def test_allowed_references_work_with_scram(
    run_cli: RunCli, pg18: Cluster, new_database: NewDatabase, tmp_path: Path
) -> None:
    """env: and file: references within the configuration's bounds log in
    with SCRAM, weak methods refused by default all the same; sslmode
    applies to every server unless its options say otherwise."""
    mon = new_database(pg18)
    with connect(mon) as conn:
        assert conn.execute("SHOW password_encryption").fetchone() == ("scram-sha-256",)
        conn.execute("DROP ROLE IF EXISTS scram_mon")
        conn.execute("CREATE ROLE scram_mon LOGIN PASSWORD 'scram-pw-1' IN ROLE pg_monitor")
    pwdir = tmp_path / "pw"
    pwdir.mkdir()
    (pwdir / "mon").write_text("scram-pw-1\n")
    os.chmod(pwdir / "mon", 0o600)
    config = tmp_path / "pgfleet.toml"
    config.write_text(f"[collector]\npassword_dirs = [{str(pwdir)!r}]\n")
    dsn = mon.replace("user=postgres", "user=scram_mon")
    add_server(run_cli, "by_env", dsn, "--password-ref", "env:PGFLEET_PW_MON")
    add_server(run_cli, "by_file", dsn, "--password-ref", f"file:{pwdir}/mon")
    env = {"PGFLEET_PW_MON": "scram-pw-1"}
    for alias in ("by_env", "by_file"):
        res = run_cli("-c", str(config), "snapshot", alias, "--json", env=env)
        assert res.rc == 0, res.err
        assert "pg_stat_database" in res.out

    # sslmode=require for the fleet: this server has no SSL, and says so...
    config.write_text(f"[collector]\npassword_dirs = [{str(pwdir)!r}]\nsslmode = 'require'\n")
    res = run_cli("-c", str(config), "snapshot", "by_env", env=env)
    assert res.rc == 1
    assert "server 'by_env': cannot connect: " in one_line(res.err)
    assert "SSL" in res.err
    # ...unless its own options settle it.
    assert run_cli("server", "update", "by_env", "--options", "sslmode=disable").rc == 0
    res = run_cli("-c", str(config), "snapshot", "by_env", env=env)
    assert res.rc == 0, res.err
