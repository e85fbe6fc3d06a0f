"""The remote handshake over real sockets and real TLS, with certificates made here.

Besides pgfleet's own client, a hand-written PostgreSQL-format client (struct
packing and scramp) authenticates, and misbehaves on purpose: replayed
proofs, downgrades, stalls, wrong channel bindings, plaintext injected
before TLS.  psql, when installed, must fail cleanly with our message.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import ssl
import struct
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from scramp import ScramClient
from scramp.core import CBindData

from pgfleet.errors import ConfigError
from pgfleet.management import auth, frame, users
from pgfleet.management.auth import Peer
from pgfleet.management.document import ErrorCode, ManagementError
from tests.management.helpers import Pki, make_pki

PASSWORD = "s3cret-pässword"
MB = 1 << 20


# -- certificates ---------------------------------------------------------------------


@dataclass(frozen=True)
class Certs(Pki):
    other_ca: Path  # a CA that signed nothing we serve


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certs:
    """A CA and a server certificate for 127.0.0.1 and localhost, signed with SHA-384.

    SHA-384, not SHA-256: channel binding must hash with the certificate's
    own algorithm, and a wrong choice would only show with another one.
    """
    tmp = tmp_path_factory.mktemp("certs")
    pki = make_pki(tmp / "ours", signed_with=hashes.SHA384, curve=ec.SECP384R1)
    other = make_pki(tmp / "other", ca_name="some other CA")
    return Certs(pki.ca, pki.cert, pki.key, other_ca=other.ca)


@pytest.fixture(scope="module")
def admins(tmp_path_factory: pytest.TempPathFactory) -> dict[str, users.User]:
    path = tmp_path_factory.mktemp("admins") / "admins"
    users.add(path, "admin", PASSWORD)
    users.add(path, "other", "another password")
    return users.load(path)


# -- a server running accept() -----------------------------------------------------------


@dataclass
class Server:
    port: int
    results: list[Peer | ManagementError] = field(default_factory=list)
    stats: Counter[str] = field(default_factory=Counter)

    async def outcome(self, n: int = 1) -> Peer | ManagementError:
        """The n-th connection's outcome on the server side, waiting for it."""
        async with asyncio.timeout(10):
            while len(self.results) < n:
                await asyncio.sleep(0.01)
        return self.results[n - 1]


@asynccontextmanager
async def serving(
    admins: dict[str, users.User],
    ssl_context: ssl.SSLContext | None = None,
    *,
    require_tls: bool = False,
    timeout: float = 5.0,
) -> AsyncIterator[Server]:
    """accept() each connection; an authenticated peer gets one frame echoed."""
    box: list[Server] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        srv = box[0]
        try:
            reader, writer, peer = await auth.accept(
                reader,
                writer,
                users=admins,
                ssl_context=ssl_context,
                require_tls=require_tls,
                timeout=timeout,
                stats=srv.stats,
            )
        except ManagementError as e:
            srv.results.append(e)
            return
        srv.results.append(peer)
        try:
            got = await frame.read_frame(reader, max_size=MB, key=None)
            if got is not None:
                answer = {"echo": got.document, "user": peer.user, "tls": peer.tls}
                await frame.write_frame(writer, answer, got.compression)
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    box.append(Server(server.sockets[0].getsockname()[1]))
    try:
        yield box[0]
    finally:
        server.close()
        await server.wait_closed()


def run(main: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
    return asyncio.run(main())


async def ping(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> dict[str, Any]:
    """One frame there and back over an authenticated connection."""
    await frame.write_frame(writer, {"Header": {"Command": "ping"}}, frame.Compression.ZSTD)
    got = await frame.read_frame(reader, max_size=MB, key=None)
    writer.close()
    assert got is not None and got.compression == frame.Compression.ZSTD
    return got.document


# -- pgfleet's own client ---------------------------------------------------------------------


def test_tls_with_channel_binding(certs: Certs, admins: dict[str, users.User]) -> None:
    ctx = auth.server_ssl_context(certs.cert, certs.key)

    async def main() -> tuple[dict[str, Any], Peer | ManagementError, Server]:
        async with serving(admins, ctx, require_tls=True) as srv:
            reader, writer = await auth.connect(
                "127.0.0.1",
                srv.port,
                user="admin",
                password=PASSWORD,
                ssl_context=auth.client_ssl_context(certs.ca),
                require_tls=True,
            )
            assert writer.get_extra_info("ssl_object") is not None
            return await ping(reader, writer), await srv.outcome(), srv

    answer, peer, srv = run(main)
    assert answer == {"echo": {"Header": {"Command": "ping"}}, "user": "admin", "tls": True}
    assert isinstance(peer, Peer) and peer.user == "admin" and peer.tls
    assert peer.address.startswith("127.0.0.1:")
    assert sum(srv.stats.values()) == 0


def test_client_binds_to_the_certificate_it_sees(
    certs: Certs, admins: dict[str, users.User], monkeypatch: pytest.MonkeyPatch
) -> None:
    """connect() uses SCRAM-SHA-256-PLUS: with other binding data it cannot log in."""
    ctx = auth.server_ssl_context(certs.cert, certs.key)  # hashes the real certificate
    monkeypatch.setattr(auth, "tls_server_end_point", lambda der: b"\x02" * 48)

    async def main() -> tuple[ManagementError, Server]:
        async with serving(admins, ctx) as srv:
            with pytest.raises(ManagementError) as info:
                await auth.connect(
                    "127.0.0.1",
                    srv.port,
                    user="admin",
                    password=PASSWORD,
                    ssl_context=auth.client_ssl_context(certs.ca),
                )
            await srv.outcome()
            return info.value, srv

    error, srv = run(main)
    assert error.code == ErrorCode.AUTH_FAILED
    assert srv.stats == Counter({"auth_failed": 1})


def test_plain_connection(admins: dict[str, users.User]) -> None:
    async def main() -> tuple[dict[str, Any], Peer | ManagementError]:
        async with serving(admins) as srv:
            reader, writer = await auth.connect(
                "127.0.0.1",
                srv.port,
                user="other",
                password="another password",
                ssl_context=None,
            )
            return await ping(reader, writer), await srv.outcome()

    answer, peer = run(main)
    assert answer["user"] == "other" and answer["tls"] is False
    assert isinstance(peer, Peer) and not peer.tls


def test_client_asking_for_tls_goes_plain_unless_required(
    certs: Certs, admins: dict[str, users.User]
) -> None:
    client_ctx = auth.client_ssl_context(certs.ca)

    async def main() -> tuple[dict[str, Any], ManagementError]:
        async with serving(admins, None) as srv:  # the server has no certificate: 'N'
            reader, writer = await auth.connect(
                "127.0.0.1", srv.port, user="admin", password=PASSWORD, ssl_context=client_ctx
            )
            answer = await ping(reader, writer)
            with pytest.raises(ManagementError) as info:
                await auth.connect(
                    "127.0.0.1",
                    srv.port,
                    user="admin",
                    password=PASSWORD,
                    ssl_context=client_ctx,
                    require_tls=True,
                )
            return answer, info.value

    answer, error = run(main)
    assert answer["tls"] is False
    assert error.code == ErrorCode.TLS_REQUIRED and "does not offer TLS" in error.message


def test_client_verifies_the_server_certificate(
    certs: Certs, admins: dict[str, users.User]
) -> None:
    ctx = auth.server_ssl_context(certs.cert, certs.key)

    async def main() -> ManagementError:
        async with serving(admins, ctx) as srv:
            with pytest.raises(ManagementError) as info:
                await auth.connect(
                    "127.0.0.1",
                    srv.port,
                    user="admin",
                    password=PASSWORD,
                    ssl_context=auth.client_ssl_context(certs.other_ca),
                )
            # Unverified TLS still authenticates (channel binding holds).
            reader, writer = await auth.connect(
                "127.0.0.1",
                srv.port,
                user="admin",
                password=PASSWORD,
                ssl_context=auth.client_ssl_context(verify=False),
            )
            assert (await ping(reader, writer))["tls"] is True
            return info.value

    error = run(main)
    assert error.code == ErrorCode.COMMAND_FAILED and "certificate verify failed" in error.message


@pytest.mark.parametrize(
    ("user", "password", "reason"),
    [
        ("admin", "wrong", "auth_failed"),
        ("nobody", PASSWORD, "unknown_user"),
    ],
)
@pytest.mark.parametrize("tls", [False, True])
def test_wrong_password_and_unknown_user_look_the_same(
    certs: Certs, admins: dict[str, users.User], user: str, password: str, reason: str, tls: bool
) -> None:
    ctx = auth.server_ssl_context(certs.cert, certs.key) if tls else None

    async def main() -> tuple[ManagementError, Peer | ManagementError, Server]:
        async with serving(admins, ctx) as srv:
            with pytest.raises(ManagementError) as info:
                await auth.connect(
                    "127.0.0.1",
                    srv.port,
                    user=user,
                    password=password,
                    ssl_context=auth.client_ssl_context(certs.ca) if tls else None,
                )
            return info.value, await srv.outcome(), srv

    error, server_side, srv = run(main)
    assert error.code == ErrorCode.AUTH_FAILED
    # The very same line for both: whether the user exists is not revealed.
    assert error.message == f'password authentication failed for user "{user}"'
    assert isinstance(server_side, auth.Refused) and server_side.code == ErrorCode.AUTH_FAILED
    # The server, and only it, knows which it was.
    assert server_side.reason == reason and server_side.user == user
    assert srv.stats == Counter({reason: 1})


def test_nothing_secret_is_logged(certs: Certs, admins: dict[str, users.User]) -> None:
    """Even at debug level: no password, no proof, no verifier, no SCRAM message."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("pgfleet.management")
    handler, level = Keep(), logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    ctx = auth.server_ssl_context(certs.cert, certs.key)

    async def main() -> None:
        async with serving(admins, ctx) as srv:
            reader, writer = await auth.connect(
                "127.0.0.1",
                srv.port,
                user="admin",
                password=PASSWORD,
                ssl_context=auth.client_ssl_context(certs.ca),
            )
            await ping(reader, writer)
            for user, password in (("admin", PASSWORD[::-1]), ("nobody", PASSWORD)):
                with pytest.raises(ManagementError):
                    await auth.connect(
                        "127.0.0.1", srv.port, user=user, password=password, ssl_context=None
                    )
            await srv.outcome(3)

    try:
        run(main)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    text = " ".join(f"{r.getMessage()} {getattr(r, 'fields', '')}" for r in records)
    assert "refused" in text and "authenticated" in text
    verifier = admins["admin"].verifier
    for secret in (PASSWORD, PASSWORD[::-1], "p=", "r=", verifier.split("$")[2][:12]):
        assert secret not in text


def test_tls_required_refuses_a_plain_client(certs: Certs, admins: dict[str, users.User]) -> None:
    ctx = auth.server_ssl_context(certs.cert, certs.key)

    async def main() -> tuple[ManagementError, Peer | ManagementError, Server]:
        async with serving(admins, ctx, require_tls=True) as srv:
            with pytest.raises(ManagementError) as info:
                await auth.connect(
                    "127.0.0.1", srv.port, user="admin", password=PASSWORD, ssl_context=None
                )
            return info.value, await srv.outcome(), srv

    error, server_side, srv = run(main)
    assert error.code == ErrorCode.TLS_REQUIRED and "requires TLS" in error.message
    assert isinstance(server_side, ManagementError)
    assert server_side.code == ErrorCode.TLS_REQUIRED
    assert srv.stats == Counter({"tls_required": 1})


def test_client_timeout_against_a_silent_server() -> None:
    async def main() -> tuple[ManagementError, float]:
        async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await reader.read()  # reads, never answers
            writer.close()

        server = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(ManagementError) as info:
            await auth.connect(
                "127.0.0.1", port, user="admin", password="x", ssl_context=None, timeout=0.3
            )
        elapsed = loop.time() - started
        server.close()
        await server.wait_closed()
        return info.value, elapsed

    error, elapsed = run(main)
    assert error.code == ErrorCode.TIMEOUT and elapsed < 2


def test_client_refuses_a_server_that_skips_authentication() -> None:
    """A fake server answering AuthenticationOk at once proves nothing: refused."""

    async def main() -> ManagementError:
        async def fake(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_startup(reader)
            writer.write(b"R" + struct.pack("!ii", 8, 0))
            await writer.drain()
            await reader.read()
            writer.close()

        server = await asyncio.start_server(fake, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(ManagementError) as info:
            await auth.connect("127.0.0.1", port, user="admin", password="x", ssl_context=None)
        server.close()
        await server.wait_closed()
        return info.value

    error = run(main)
    assert error.code == ErrorCode.AUTH_FAILED and "without proving" in error.message


@pytest.mark.parametrize(
    ("code", "expected"),
    [
        (ErrorCode.TOO_MANY_CONNECTIONS, ErrorCode.TOO_MANY_CONNECTIONS),
        (ErrorCode.SHUTTING_DOWN, ErrorCode.SHUTTING_DOWN),
    ],
)
def test_refuse_reaches_the_client_as_its_code(code: ErrorCode, expected: ErrorCode) -> None:
    async def main() -> ManagementError:
        async def busy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await read_startup(reader)
            await auth.refuse(writer, code, "sorry, too busy")

        server = await asyncio.start_server(busy, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(ManagementError) as info:
            await auth.connect("127.0.0.1", port, user="admin", password="x", ssl_context=None)
        server.close()
        await server.wait_closed()
        return info.value

    error = run(main)
    assert (error.code, error.message) == (expected, "sorry, too busy")


# -- a hand-written PostgreSQL-format client ------------------------------------------------------


async def read_startup(reader: asyncio.StreamReader) -> bytes:
    (length,) = struct.unpack("!i", await reader.readexactly(4))
    return await reader.readexactly(length - 4)


def startup(params: dict[str, str], version: int = 196608) -> bytes:
    body = struct.pack("!I", version)
    body += b"".join(k.encode() + b"\0" + v.encode() + b"\0" for k, v in params.items()) + b"\0"
    return struct.pack("!i", len(body) + 4) + body


def msg(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


async def recv(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readexactly(5)
    (length,) = struct.unpack("!i", head[1:])
    return head[:1], await reader.readexactly(length - 4)


def error_fields(body: bytes) -> dict[str, str]:
    return {p[:1].decode(): p[1:].decode() for p in body.split(b"\0") if p}


@dataclass
class RawClient:
    """A minimal PostgreSQL-protocol client, every byte packed here."""

    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter
    sent: list[bytes] = field(default_factory=list)  # SCRAM messages, for replays

    @classmethod
    async def open(cls, port: int, tls: ssl.SSLContext | None = None) -> RawClient:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        if tls is not None:
            writer.write(struct.pack("!ii", 8, 80877103))
            await writer.drain()
            assert await reader.readexactly(1) == b"S"
            await writer.start_tls(tls, server_hostname="127.0.0.1")
        return cls(reader, writer)

    def send(self, data: bytes) -> None:
        self.writer.write(data)

    async def sasl(
        self,
        user: str,
        password: str,
        *,
        mechanism: str | None = None,
        binding: tuple[str, Any] | None = None,
        replay: list[bytes] | None = None,
    ) -> tuple[bytes, bytes]:
        """Run SCRAM; return the last message (R 0 on success, E on refusal)."""
        self.send(startup({"user": user, "pgfleet_management": "1"}))
        kind, body = await recv(self.reader)
        assert kind == b"R" and struct.unpack("!i", body[:4])[0] == 10
        offered = [m.decode() for m in body[4:].split(b"\0") if m]
        self.offered = offered
        name = mechanism or offered[0]
        client = ScramClient([name], user, password, channel_binding=binding)
        first = replay[0] if replay else client.get_client_first().encode()
        self.sent.append(first)
        self.send(msg(b"p", name.encode() + b"\0" + struct.pack("!i", len(first)) + first))
        kind, body = await recv(self.reader)
        if kind == b"E":
            return kind, body
        assert struct.unpack("!i", body[:4])[0] == 11
        if replay:
            final = replay[1]
        else:
            client.set_server_first(body[4:].decode())
            final = client.get_client_final().encode()
        self.sent.append(final)
        self.send(msg(b"p", final))
        kind, body = await recv(self.reader)
        if kind == b"E":
            return kind, body
        assert struct.unpack("!i", body[:4])[0] == 12
        client.set_server_final(body[4:].decode())  # the server's signature checks out
        return await recv(self.reader)


def test_hand_written_client_authenticates_plain_and_over_tls(
    certs: Certs, admins: dict[str, users.User]
) -> None:
    ctx = auth.server_ssl_context(certs.cert, certs.key)
    client_ctx = auth.client_ssl_context(certs.ca)

    async def main() -> list[Any]:
        out: list[Any] = []
        async with serving(admins, ctx) as srv:
            plain = await RawClient.open(srv.port)
            out.append(await plain.sasl("admin", PASSWORD))
            out.append(plain.offered)
            out.append(await ping(plain.reader, plain.writer))

            tls = await RawClient.open(srv.port, client_ctx)
            ssl_object = tls.writer.get_extra_info("ssl_object")
            out.append(
                await tls.sasl("admin", PASSWORD, binding=("tls-server-end-point", ssl_object))
            )
            out.append(tls.offered)
            out.append(await ping(tls.reader, tls.writer))
        return out

    ok_plain, offered_plain, answer_plain, ok_tls, offered_tls, answer_tls = run(main)
    auth_ok = (b"R", struct.pack("!i", 0))
    assert ok_plain == auth_ok and ok_tls == auth_ok
    assert offered_plain == ["SCRAM-SHA-256"]
    assert offered_tls == ["SCRAM-SHA-256-PLUS", "SCRAM-SHA-256"]
    assert answer_plain["tls"] is False and answer_tls["tls"] is True
    assert answer_tls["echo"] == {"Header": {"Command": "ping"}}


def test_channel_binding_hash_matches_scramps(certs: Certs) -> None:
    """Ours (cryptography) and scramp's (asn1crypto) agree on a SHA-384 certificate."""
    der = x509.load_pem_x509_certificate(certs.cert.read_bytes()).public_bytes(
        serialization.Encoding.DER
    )
    ours = auth.tls_server_end_point(der)
    assert ours is not None and len(ours) == 48
    assert ours == CBindData.from_der(der).data
    ctx = auth.server_ssl_context(certs.cert, certs.key)
    assert isinstance(ctx, auth.ServerSSLContext) and ctx.channel_binding == ours


def test_wrong_channel_binding_and_downgrades_are_refused(
    certs: Certs, admins: dict[str, users.User]
) -> None:
    ctx = auth.server_ssl_context(certs.cert, certs.key)
    client_ctx = auth.client_ssl_context(certs.ca)

    async def main() -> tuple[list[tuple[bytes, bytes]], Server]:
        out = []
        async with serving(admins, ctx) as srv:
            # Binding data of another certificate (a man in the middle's).
            c = await RawClient.open(srv.port, client_ctx)
            out.append(
                await c.sasl("admin", PASSWORD, binding=("tls-server-end-point", b"\x01" * 48))
            )
            # Plain SCRAM with the 'y' flag over TLS: "I could bind but you can't" - a lie.
            c = await RawClient.open(srv.port, client_ctx)
            ssl_object = c.writer.get_extra_info("ssl_object")
            out.append(
                await c.sasl(
                    "admin",
                    PASSWORD,
                    mechanism="SCRAM-SHA-256",
                    binding=("tls-server-end-point", ssl_object),
                )
            )
            # PLUS without TLS: not offered, so refused.
            c = await RawClient.open(srv.port)
            out.append(
                await c.sasl(
                    "admin",
                    PASSWORD,
                    mechanism="SCRAM-SHA-256-PLUS",
                    binding=("tls-server-end-point", b"\x01" * 32),
                )
            )
            await srv.outcome(3)
        return out, srv

    results, srv = run(main)
    assert [kind for kind, _ in results] == [b"E", b"E", b"E"]
    assert error_fields(results[0][1])["M"] == 'password authentication failed for user "admin"'
    assert error_fields(results[2][1])["M"] == (
        "client selected an invalid SASL authentication mechanism"
    )
    assert srv.stats == Counter({"auth_failed": 3})


def test_plain_scram_over_tls_without_binding_support_is_accepted(
    certs: Certs, admins: dict[str, users.User]
) -> None:
    """A client that cannot bind at all ('n' flag) may still log in, as with PostgreSQL."""
    ctx = auth.server_ssl_context(certs.cert, certs.key)

    async def main() -> tuple[bytes, bytes]:
        async with serving(admins, ctx) as srv:
            c = await RawClient.open(srv.port, auth.client_ssl_context(certs.ca))
            result = await c.sasl("admin", PASSWORD, mechanism="SCRAM-SHA-256")
            c.writer.close()
            return result

    assert run(main) == (b"R", struct.pack("!i", 0))


def test_replayed_client_proof_is_refused(admins: dict[str, users.User]) -> None:
    async def main() -> tuple[tuple[bytes, bytes], tuple[bytes, bytes], Server]:
        async with serving(admins) as srv:
            first = await RawClient.open(srv.port)
            ok = await first.sasl("admin", PASSWORD)
            first.writer.close()
            # An eavesdropper replays the exact client messages on a new connection.
            again = await RawClient.open(srv.port)
            replayed = await again.sasl("admin", "unknown to the attacker", replay=first.sent)
            await srv.outcome(2)
            return ok, replayed, srv

    ok, replayed, srv = run(main)
    assert ok == (b"R", struct.pack("!i", 0))
    assert replayed[0] == b"E"
    fields = error_fields(replayed[1])
    assert fields["C"] == "28P01" and fields["S"] == "FATAL"
    assert fields["M"] == 'password authentication failed for user "admin"'
    assert srv.stats == Counter({"auth_failed": 1})


@pytest.mark.parametrize("stage", ["nothing", "startup", "sasl", "tls"])
def test_client_stopping_mid_handshake_times_out(
    certs: Certs, admins: dict[str, users.User], stage: str
) -> None:
    ctx = auth.server_ssl_context(certs.cert, certs.key)

    async def main() -> tuple[Peer | ManagementError, bytes, float, Server]:
        async with serving(admins, ctx, timeout=0.3) as srv:
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            if stage == "tls":
                writer.write(struct.pack("!ii", 8, 80877103))  # then no TLS handshake at all
            elif stage == "startup":
                writer.write(startup({"user": "admin", "pgfleet_management": "1"})[:10])
            elif stage == "sasl":
                writer.write(startup({"user": "admin", "pgfleet_management": "1"}))
            loop = asyncio.get_running_loop()
            started = loop.time()
            outcome = await srv.outcome()
            elapsed = loop.time() - started
            rest = await asyncio.wait_for(reader.read(), 2)
            writer.close()
            return outcome, rest, elapsed, srv

    outcome, rest, elapsed, srv = run(main)
    assert isinstance(outcome, ManagementError) and outcome.code == ErrorCode.TIMEOUT
    assert elapsed < 2
    assert srv.stats == Counter({"timeout": 1})
    if stage != "tls":
        assert b"canceling authentication due to timeout" in rest


def test_not_a_management_client_is_told_so_before_authentication(
    admins: dict[str, users.User],
) -> None:
    async def main() -> tuple[bytes, bytes, Server]:
        async with serving(admins) as srv:
            c = await RawClient.open(srv.port)
            c.send(startup({"user": "admin", "database": "postgres"}))
            kind, body = await recv(c.reader)
            await srv.outcome()
            return kind, body, srv

    kind, body, srv = run(main)
    assert kind == b"E"
    fields = error_fields(body)
    assert fields["S"] == "FATAL" and fields["C"] == "08P01"
    assert fields["M"] == auth.NOT_A_DATABASE
    assert srv.stats == Counter({"not_management_client": 1})


@pytest.mark.parametrize(
    ("packet", "sqlstate"),
    [
        (struct.pack("!iiii", 16, 80877102, 1, 2), "08P01"),  # CancelRequest
        (startup({"user": "admin"}, version=2 << 16), "0A000"),  # protocol 2.0
        (struct.pack("!ii", 4, 0), "08P01"),  # too short
        (struct.pack("!i", 100_000) + b"\0" * 8, "08P01"),  # too long
        (struct.pack("!iI", 11, 196608) + b"ab\0", "08P01"),  # not name/value pairs
        (startup({"pgfleet_management": "1"}), "08P01"),  # no user
    ],
)
def test_bad_startup_packets(admins: dict[str, users.User], packet: bytes, sqlstate: str) -> None:
    async def main() -> tuple[bytes, bytes, Server]:
        async with serving(admins) as srv:
            c = await RawClient.open(srv.port)
            c.send(packet)
            kind, body = await recv(c.reader)
            await srv.outcome()
            return kind, body, srv

    kind, body, srv = run(main)
    assert kind == b"E" and error_fields(body)["C"] == sqlstate
    assert srv.stats == Counter({"bad_startup": 1})


def test_plaintext_injected_before_tls_is_refused(
    certs: Certs, admins: dict[str, users.User]
) -> None:
    """Bytes sent with the SSLRequest must not be read as if they came through TLS."""
    ctx = auth.server_ssl_context(certs.cert, certs.key)

    async def main() -> tuple[bytes, Server]:
        async with serving(admins, ctx) as srv:
            reader, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            writer.write(struct.pack("!ii", 8, 80877103) + startup({"user": "admin", "x": "1"}))
            data = await asyncio.wait_for(reader.read(), 5)
            await srv.outcome()
            writer.close()
            return data, srv

    data, srv = run(main)
    assert b"received unencrypted data after SSL request" in data
    assert srv.stats == Counter({"bad_startup": 1})


def test_gssenc_request_is_declined(admins: dict[str, users.User]) -> None:
    async def main() -> tuple[bytes, tuple[bytes, bytes]]:
        async with serving(admins) as srv:
            c = await RawClient.open(srv.port)
            c.send(struct.pack("!ii", 8, 80877104))
            answer = await c.reader.readexactly(1)
            return answer, await c.sasl("admin", PASSWORD)

    answer, result = run(main)
    assert answer == b"N" and result == (b"R", struct.pack("!i", 0))


def test_newer_protocol_minor_is_negotiated_down(admins: dict[str, users.User]) -> None:
    async def main() -> tuple[bytes, bytes]:
        async with serving(admins) as srv:
            c = await RawClient.open(srv.port)
            c.send(
                startup(
                    {"user": "admin", "pgfleet_management": "1", "_pq_.x": "1"},
                    version=(3 << 16) | 2,
                )
            )
            return await recv(c.reader)

    kind, body = run(main)
    assert kind == b"v"
    assert body == struct.pack("!ii", 0, 1) + b"_pq_.x\0"


def test_abrupt_disconnect_is_counted(admins: dict[str, users.User]) -> None:
    async def main() -> tuple[Peer | ManagementError, Server]:
        async with serving(admins) as srv:
            _, writer = await asyncio.open_connection("127.0.0.1", srv.port)
            writer.write(b"\0\0")
            writer.close()
            return await srv.outcome(), srv

    outcome, srv = run(main)
    assert isinstance(outcome, ManagementError) and outcome.code == ErrorCode.BAD_FRAME
    assert srv.stats == Counter({"bad_startup": 1})


def test_accept_counts_into_a_plain_dict(admins: dict[str, users.User]) -> None:
    """stats may be any mutable mapping, not only a Counter."""
    stats: dict[str, int] = {}

    async def main() -> None:
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with pytest.raises(ManagementError):
                await auth.accept(
                    reader,
                    writer,
                    users=admins,
                    ssl_context=None,
                    require_tls=True,
                    timeout=5,
                    stats=stats,
                )

        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        with pytest.raises(ManagementError):
            await auth.connect("127.0.0.1", port, user="admin", password="x", ssl_context=None)
        server.close()
        await server.wait_closed()

    run(main)
    assert stats == {"tls_required": 1}


# -- TLS configuration ------------------------------------------------------------------------------


def test_server_context_refuses_a_readable_key(certs: Certs, tmp_path: Path) -> None:
    key = tmp_path / "server.key"
    key.write_bytes(certs.key.read_bytes())
    key.chmod(0o644)
    with pytest.raises(ConfigError, match="has group or world access"):
        auth.server_ssl_context(certs.cert, key)
    with pytest.raises(ConfigError, match="No such file"):
        auth.server_ssl_context(certs.cert, tmp_path / "missing.key")
    key.chmod(0o600)
    with pytest.raises(ConfigError, match="TLS certificate"):
        auth.server_ssl_context(certs.ca, key)  # a certificate that does not match the key


def test_contexts_need_tls_1_2(certs: Certs) -> None:
    server = auth.server_ssl_context(certs.cert, certs.key, certs.ca)
    client = auth.client_ssl_context(certs.ca)
    assert server.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert client.minimum_version >= ssl.TLSVersion.TLSv1_2
    assert server.verify_mode == ssl.CERT_OPTIONAL
    assert client.verify_mode == ssl.CERT_REQUIRED and client.check_hostname


# -- psql -------------------------------------------------------------------------------------------------


def _psql() -> str | None:
    found = shutil.which("psql")
    if found:
        return found
    for version in (18, 17, 16, 15):
        candidate = f"/usr/lib/postgresql/{version}/bin/psql"
        if os.access(candidate, os.X_OK):
            return candidate
    return None


@pytest.mark.skipif(_psql() is None, reason="psql is not installed")
@pytest.mark.parametrize("sslmode", ["disable", "prefer", "require"])
def test_psql_fails_cleanly(certs: Certs, admins: dict[str, users.User], sslmode: str) -> None:
    """A real libpq client is told at once that this is not a database, no password asked."""
    ctx = auth.server_ssl_context(certs.cert, certs.key)
    psql = _psql()
    assert psql is not None

    async def main() -> tuple[int, str, Server]:
        async with serving(admins, ctx) as srv:
            env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
            env["PGCONNECT_TIMEOUT"] = "5"
            proc = await asyncio.create_subprocess_exec(
                psql,
                "-w",
                "-X",
                "-d",
                f"host=127.0.0.1 port={srv.port} user=admin dbname=postgres sslmode={sslmode}",
                "-c",
                "select 1",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                env=env,
            )
            _, err = await asyncio.wait_for(proc.communicate(), 20)
            await srv.outcome()
            return proc.returncode or 0, err.decode(), srv

    code, err, srv = run(main)
    assert code != 0
    assert auth.NOT_A_DATABASE in err
    assert "password" not in err.lower()
    # sslmode=prefer may retry in clear after the refusal over TLS: one or two.
    assert set(srv.stats) == {"not_management_client"}
