"""The remote management handshake: PostgreSQL's wire format, then our frames.

Before any management frame on the TCP port, client and server go through
what a PostgreSQL client and server would (protocol 3.0):

1. optionally SSLRequest; the server answers ``S`` and does TLS when it has a
   certificate, ``N`` otherwise (a GSSENCRequest is always answered ``N``);
2. a StartupMessage with ``user`` and ``pgfleet_management=1``;
3. SCRAM-SHA-256 as PostgreSQL does it: AuthenticationSASL,
   SASLInitialResponse, AuthenticationSASLContinue, SASLResponse,
   AuthenticationSASLFinal, AuthenticationOk.  Over TLS the server offers
   SCRAM-SHA-256-PLUS too, with ``tls-server-end-point`` channel binding.

After AuthenticationOk both sides speak :mod:`.frame` frames; refusals are
PostgreSQL ErrorResponses (severity FATAL) and the connection is closed.

Why ``pgfleet_management``: this port is not a database, and a real libpq
client (psql, a driver, a pooler pointed at the wrong port) must fail at once
and say so, not after a password prompt nor by misreading our frames as
protocol messages.  libpq cannot send a startup parameter of that name, so a
startup without it gets ``FATAL 08P01 this is the pgfleet management port,
not a PostgreSQL server`` before any authentication.

Invariants:

- Whether a user exists is not revealed: an unknown user runs SCRAM against a
  mock verifier (stable per name, as PostgreSQL's) and gets the same
  ``password authentication failed`` as a wrong password.  Only the server's
  log and counters tell them apart.
- The whole handshake runs under one deadline (PostgreSQL's
  authentication_timeout): a client that stops, or drips bytes, is cut off.
- Passwords, proofs, keys and SCRAM messages are never logged.
- Replay fails by construction: each connection gets a new server nonce, and
  the client's proof signs it.
- A client never accepts AuthenticationOk before the server has proved, with
  its SCRAM signature, that it holds the verifier: a fake server cannot skip
  authentication.
- Plaintext that arrives with an SSLRequest, before the TLS handshake, is
  refused (PostgreSQL's CVE-2021-23214 and CVE-2021-23222): it would otherwise
  be read as if it had come through TLS.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import os
import secrets
import ssl
import stat
import struct
from collections import Counter
from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives.serialization import Encoding
from scramp import ScramClient, ScramException, ScramMechanism

from pgfleet.errors import ConfigError
from pgfleet.log import EventLogger
from pgfleet.management.document import ErrorCode, ManagementError
from pgfleet.management.users import DEFAULT_ITERATIONS, SALT_SIZE, User

log = EventLogger("pgfleet.management")

# PostgreSQL's magic numbers (pqcomm.h).
PROTOCOL_3_0 = 3 << 16
SSL_REQUEST = (1234 << 16) | 5679
GSSENC_REQUEST = (1234 << 16) | 5680
CANCEL_REQUEST = (1234 << 16) | 5678
# PostgreSQL's MAX_STARTUP_PACKET_LENGTH.
MAX_STARTUP_PACKET = 10000
# SCRAM messages are a few hundred bytes; PostgreSQL allows 64 kB.
MAX_AUTH_MESSAGE = 16384

AUTH_OK = 0
AUTH_SASL = 10
AUTH_SASL_CONTINUE = 11
AUTH_SASL_FINAL = 12

SCRAM = "SCRAM-SHA-256"
SCRAM_PLUS = "SCRAM-SHA-256-PLUS"
CHANNEL_BINDING = "tls-server-end-point"

# The startup parameter that marks our own clients (see the module docstring).
MANAGEMENT_PARAMETER = "pgfleet_management"
NOT_A_DATABASE = "this is the pgfleet management port, not a PostgreSQL server (use pgfleet ctl)"

# Why connections were refused: the keys ``stats`` counts (exported by the daemon).
REFUSALS = (
    "auth_failed",  # wrong password, or a failed SCRAM exchange
    "unknown_user",  # no such user (the client is told "auth failed" all the same)
    "tls_required",  # require_tls and the client did not do TLS
    "timeout",  # the handshake did not finish in time
    "bad_startup",  # malformed or unexpected packets, a cancel request, a lost connection
    "not_management_client",  # a PostgreSQL client (psql...) that took us for a database
)

# ErrorResponse SQLSTATEs, both ways.  Each code the client must tell apart
# has a SQLSTATE of its own, so nothing parses messages.
_SQLSTATE = {
    ErrorCode.AUTH_FAILED: "28P01",  # invalid_password
    ErrorCode.TLS_REQUIRED: "28000",  # invalid_authorization_specification, as pg_hba
    ErrorCode.BAD_FRAME: "08P01",  # protocol_violation
    ErrorCode.NOT_ALLOWED: "08P01",
    ErrorCode.TIMEOUT: "57014",  # query_canceled: "canceling authentication due to timeout"
    ErrorCode.TOO_MANY_CONNECTIONS: "53300",  # too_many_connections
    ErrorCode.SHUTTING_DOWN: "57P03",  # cannot_connect_now
}
_FROM_SQLSTATE = {
    "28P01": ErrorCode.AUTH_FAILED,
    "28000": ErrorCode.TLS_REQUIRED,
    "08P01": ErrorCode.BAD_FRAME,
    "0A000": ErrorCode.BAD_FRAME,  # feature_not_supported: the protocol version
    "57014": ErrorCode.TIMEOUT,
    "53300": ErrorCode.TOO_MANY_CONNECTIONS,
    "57P03": ErrorCode.SHUTTING_DOWN,
    "57P01": ErrorCode.SHUTTING_DOWN,  # admin_shutdown
}

# Mock verifiers for unknown users are derived from this, as PostgreSQL
# derives them from its cluster's mock_authentication_nonce: stable for a
# name (a prober sees the same salt twice), unguessable across daemons.
_MOCK_SECRET = secrets.token_bytes(32)


@dataclass(frozen=True)
class Peer:
    """Who is on the other end of an authenticated management connection."""

    user: str
    tls: bool
    address: str


class Refused(ManagementError):
    """:func:`accept` refused a connection: the client's message, and the server's view.

    ``message`` is what the client was told; ``reason`` (one of
    :data:`REFUSALS`) and ``detail`` (e.g. scramp's objection, "no such
    user") are for the server's log only: neither holds a secret.
    """

    def __init__(
        self,
        code: ErrorCode,
        message: str,
        *,
        reason: str,
        detail: str | None = None,
        user: str | None = None,
    ) -> None:
        super().__init__(code, message)
        self.reason = reason
        self.detail = detail
        self.user = user


# -- TLS ----------------------------------------------------------------------


class ServerSSLContext(ssl.SSLContext):
    """A server context that knows its certificate's channel-binding hash.

    Python's ssl tells a server its peer's certificate, not its own, so
    :func:`server_ssl_context` reads the file once and keeps the hash here.
    """

    channel_binding: bytes | None = None


def tls_server_end_point(der: bytes) -> bytes | None:
    """RFC 5929's ``tls-server-end-point`` data for a certificate, None if undefined.

    The hash is the certificate's signature hash, SHA-256 when that is MD5 or
    SHA-1; certificates whose signature has no single hash (Ed25519) have no
    binding, as with PostgreSQL.
    """
    try:
        cert = x509.load_der_x509_certificate(der)
        algorithm = cert.signature_hash_algorithm
    except (ValueError, UnsupportedAlgorithm):
        return None
    if algorithm is None:
        return None
    name = algorithm.name.lower()
    if name in ("md5", "sha1"):
        name = "sha256"
    try:
        return hashlib.new(name, der).digest()
    except ValueError:
        return None


def _check_key_file(key_file: str | os.PathLike[str]) -> None:
    # PostgreSQL's rule for ssl_key_file: 0600 (or 0640 when root owns it).
    try:
        st = os.stat(key_file)
    except OSError as e:
        raise ConfigError(f"TLS key file '{os.fspath(key_file)}': {e.strerror}") from None
    allowed = 0o037 if st.st_uid == 0 else 0o077
    if st.st_mode & allowed:
        raise ConfigError(
            f"TLS key file '{os.fspath(key_file)}' has group or world access "
            f"(mode {stat.S_IMODE(st.st_mode):04o}): chmod 0600"
        )


def server_ssl_context(
    cert_file: str | os.PathLike[str],
    key_file: str | os.PathLike[str],
    ca_file: str | os.PathLike[str] | None = None,
) -> ssl.SSLContext:
    """The management port's TLS context (TLS 1.2 or later).

    With ``ca_file``, a client certificate is asked for and, when given,
    verified against it (PostgreSQL's ssl_ca_file).  Returns a
    :class:`ServerSSLContext`, which :func:`accept` uses for channel binding.
    """
    _check_key_file(key_file)
    ctx = ServerSSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(cert_file, key_file)
        if ca_file is not None:
            ctx.load_verify_locations(cafile=ca_file)
            ctx.verify_mode = ssl.CERT_OPTIONAL
        with open(cert_file, "rb") as f:
            pem = f.read()
    except (OSError, ssl.SSLError) as e:
        raise ConfigError(
            f"TLS certificate '{os.fspath(cert_file)}' or key '{os.fspath(key_file)}': "
            f"{getattr(e, 'strerror', None) or e}"
        ) from None
    try:
        # The first certificate of the file is the one the server presents.
        leaf = x509.load_pem_x509_certificates(pem)[0]
    except (ValueError, IndexError):
        leaf = None
    if leaf is not None:
        ctx.channel_binding = tls_server_end_point(leaf.public_bytes(Encoding.DER))
    return ctx


def client_ssl_context(
    ca_file: str | os.PathLike[str] | None = None, *, verify: bool = True
) -> ssl.SSLContext:
    """A client context (TLS 1.2 or later): verifies the server against ``ca_file``
    (the system's CAs when None), or, with ``verify=False``, not at all.

    Without verification, channel binding still stops a man in the middle
    from relaying the authentication, but not from reading what follows.
    """
    if verify:
        ctx = ssl.create_default_context(cafile=os.fspath(ca_file) if ca_file else None)
    else:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    return ctx


# -- PostgreSQL messages --------------------------------------------------------


def _message(kind: bytes, body: bytes) -> bytes:
    return kind + struct.pack("!i", len(body) + 4) + body


def _cstring(text: str) -> bytes:
    return text.encode("utf-8") + b"\0"


def error_response(sqlstate: str, message: str) -> bytes:
    """A FATAL ErrorResponse, as PostgreSQL sends when it refuses a connection."""
    fields = (("S", "FATAL"), ("V", "FATAL"), ("C", sqlstate), ("M", " ".join(message.split())))
    return _message(b"E", b"".join(k.encode() + _cstring(v) for k, v in fields) + b"\0")


def _parse_error_response(body: bytes) -> dict[str, str]:
    fields: dict[str, str] = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode("utf-8", "replace")
    return fields


def _auth(kind: int, data: bytes = b"") -> bytes:
    return _message(b"R", struct.pack("!i", kind) + data)


def _buffered(reader: asyncio.StreamReader) -> int:
    # StreamReader has no public way to ask; its buffer is the only place
    # where bytes sent before the TLS handshake could hide.
    buffer = getattr(reader, "_buffer", b"")
    return len(buffer)


async def _read_message(reader: asyncio.StreamReader, limit: int) -> tuple[bytes, bytes]:
    """One typed message: (type byte, body)."""
    head = await reader.readexactly(5)
    kind, length = head[:1], struct.unpack("!i", head[1:])[0]
    if not 4 <= length <= limit:
        raise _Refusal("bad_startup", ErrorCode.BAD_FRAME, f"invalid message length {length}")
    return kind, await reader.readexactly(length - 4)


def _address(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[0], peer[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return "local"


async def _close(writer: asyncio.StreamWriter, farewell: bytes | None = None) -> None:
    """Send a last message if any, then close without hanging on a dead peer."""
    try:
        if farewell is not None and not writer.is_closing():
            writer.write(farewell)
        writer.close()
        await asyncio.wait_for(writer.wait_closed(), 1.0)
    except Exception:
        # A peer that does not read, or is gone: drop the connection now.
        writer.transport.abort()


async def refuse(writer: asyncio.StreamWriter, code: ErrorCode, message: str) -> None:
    """Refuse a connection the PostgreSQL way: a FATAL ErrorResponse, then close.

    For the server's own refusals before :func:`accept` (too many
    connections, shutting down); the client sees ``ManagementError(code)``.
    """
    await _close(writer, error_response(_SQLSTATE.get(code, "08P01"), message))


# -- server ---------------------------------------------------------------------


class _Refusal(Exception):
    """Internal: why the handshake stops, what the client is told, what is logged."""

    def __init__(
        self,
        reason: str,
        code: ErrorCode,
        message: str,
        *,
        sqlstate: str | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.code = code
        self.message = message
        self.sqlstate = sqlstate or _SQLSTATE.get(code, "08P01")
        self.detail = detail


def _mock_auth_info(name: str, iterations: int) -> tuple[bytes, bytes, bytes, int]:
    def derive(label: bytes) -> bytes:
        return hmac.new(_MOCK_SECRET, label + name.encode("utf-8"), hashlib.sha256).digest()

    # Random-looking keys no password can match; the salt stable per name.
    return derive(b"salt")[:SALT_SIZE], derive(b"stored"), derive(b"server"), iterations


def _usual_iterations(users: Mapping[str, User]) -> int:
    # The mock verifier must look like the real ones, iteration count included.
    counts = Counter(u.iterations for u in users.values())
    return counts.most_common(1)[0][0] if counts else DEFAULT_ITERATIONS


class _ServerHandshake:
    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        users: Mapping[str, User],
        ssl_context: ssl.SSLContext | None,
        require_tls: bool,
        channel_binding: bytes | None,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.users = users
        self.ssl_context = ssl_context
        self.require_tls = require_tls
        self.channel_binding = channel_binding
        self.address = _address(writer)
        self.tls = False
        # While the TLS handshake runs, nothing may be written in clear.
        self.negotiating_tls = False
        self.user: str | None = None

    async def _startup_packet(self) -> tuple[int, bytes]:
        (length,) = struct.unpack("!i", await self.reader.readexactly(4))
        if not 8 <= length <= MAX_STARTUP_PACKET:
            raise _Refusal("bad_startup", ErrorCode.BAD_FRAME, "invalid length of startup packet")
        body = await self.reader.readexactly(length - 4)
        return struct.unpack("!I", body[:4])[0], body[4:]

    async def _negotiate(self) -> dict[str, str]:
        """SSLRequest / GSSENCRequest until the StartupMessage; its parameters."""
        ssl_asked = gss_asked = False
        while True:
            code, body = await self._startup_packet()
            if code == SSL_REQUEST and not ssl_asked and not self.tls:
                ssl_asked = True
                if self.ssl_context is None:
                    self.writer.write(b"N")
                    await self.writer.drain()
                    continue
                if _buffered(self.reader):
                    raise _Refusal(
                        "bad_startup",
                        ErrorCode.BAD_FRAME,
                        "received unencrypted data after SSL request",
                    )
                self.writer.write(b"S")
                self.negotiating_tls = True
                await self.writer.start_tls(self.ssl_context)
                self.negotiating_tls = False
                self.tls = True
                continue
            if code == GSSENC_REQUEST and not gss_asked and not self.tls:
                gss_asked = True
                self.writer.write(b"N")
                await self.writer.drain()
                continue
            if code in (SSL_REQUEST, GSSENC_REQUEST):
                raise _Refusal("bad_startup", ErrorCode.BAD_FRAME, "unexpected encryption request")
            if code == CANCEL_REQUEST:
                raise _Refusal(
                    "bad_startup",
                    ErrorCode.BAD_FRAME,
                    "cancel requests are not supported on the pgfleet management port",
                )
            major, minor = code >> 16, code & 0xFFFF
            if major != 3:
                raise _Refusal(
                    "bad_startup",
                    ErrorCode.BAD_FRAME,
                    f"unsupported frontend protocol {major}.{minor}: server supports 3.0 to 3.0",
                    sqlstate="0A000",
                )
            params = self._parameters(body)
            unknown = sorted(k for k in params if k.startswith("_pq_."))
            if minor > 0 or unknown:
                # As PostgreSQL: offer 3.0 and list the options we ignore.
                self.writer.write(
                    _message(
                        b"v",
                        struct.pack("!ii", 0, len(unknown)) + b"".join(map(_cstring, unknown)),
                    )
                )
            return params

    @staticmethod
    def _parameters(body: bytes) -> dict[str, str]:
        if not body.endswith(b"\0"):
            raise _Refusal("bad_startup", ErrorCode.BAD_FRAME, "invalid startup packet layout")
        parts = body[:-1].split(b"\0")
        if parts[-1] != b"" or len(parts) % 2 != 1:
            raise _Refusal("bad_startup", ErrorCode.BAD_FRAME, "invalid startup packet layout")
        try:
            words = [p.decode("utf-8") for p in parts[:-1]]
        except UnicodeDecodeError:
            raise _Refusal(
                "bad_startup", ErrorCode.BAD_FRAME, "invalid UTF-8 in startup packet"
            ) from None
        return dict(zip(words[::2], words[1::2], strict=True))

    async def _sasl_response(self) -> bytes:
        kind, body = await _read_message(self.reader, MAX_AUTH_MESSAGE)
        if kind != b"p":
            raise _Refusal(
                "bad_startup",
                ErrorCode.BAD_FRAME,
                f"expected SASL response, got message type {kind!r}",
            )
        return body

    async def run(self) -> Peer:
        params = await self._negotiate()
        if params.get(MANAGEMENT_PARAMETER) != "1":
            raise _Refusal(
                "not_management_client",
                ErrorCode.NOT_ALLOWED,
                NOT_A_DATABASE,
                detail=f"startup parameters: {', '.join(sorted(params))}",
            )
        user = params.get("user", "")
        if not user:
            raise _Refusal(
                "bad_startup", ErrorCode.BAD_FRAME, "no user name specified in startup packet"
            )
        self.user = user
        if self.require_tls and not self.tls:
            raise _Refusal(
                "tls_required",
                ErrorCode.TLS_REQUIRED,
                f'the pgfleet management port requires TLS: user "{user}" connected without '
                "encryption",
            )
        return await self._scram(user)

    async def _scram(self, user: str) -> Peer:
        binding = self.channel_binding if self.tls else None
        mechanisms = [SCRAM_PLUS, SCRAM] if binding is not None else [SCRAM]
        self.writer.write(_auth(AUTH_SASL, b"".join(map(_cstring, mechanisms)) + b"\0"))
        await self.writer.drain()

        known = self.users.get(user)
        reason = "auth_failed" if known is not None else "unknown_user"
        failed = f'password authentication failed for user "{user}"'

        body = await self._sasl_response()
        mechanism, sep, rest = body.partition(b"\0")
        if not sep or len(rest) < 4:
            raise _Refusal(
                reason, ErrorCode.AUTH_FAILED, "malformed SASL initial response", sqlstate="08P01"
            )
        (length,) = struct.unpack("!i", rest[:4])
        if length != len(rest) - 4:
            raise _Refusal(
                reason, ErrorCode.AUTH_FAILED, "malformed SASL initial response", sqlstate="08P01"
            )
        name = mechanism.decode("ascii", "replace")
        if name not in mechanisms:
            raise _Refusal(
                reason,
                ErrorCode.AUTH_FAILED,
                "client selected an invalid SASL authentication mechanism",
                sqlstate="08P01",
            )
        first = rest[4:]
        if name == SCRAM and first.startswith(b"p="):
            # PostgreSQL refuses this too: binding data under the plain name.
            raise _Refusal(
                reason,
                ErrorCode.AUTH_FAILED,
                "the client selected SCRAM-SHA-256 without channel binding, "
                "but the SCRAM message includes channel binding data",
                sqlstate="08P01",
            )
        info = (
            known.auth_info()
            if known is not None
            else _mock_auth_info(user, _usual_iterations(self.users))
        )

        def auth_fn(_scram_name: str) -> tuple[bytes, bytes, bytes, int]:
            # As PostgreSQL, the SCRAM message's user name is ignored: the
            # startup packet's is the one authenticated.
            return info

        try:
            server = ScramMechanism(name).make_server(
                auth_fn, channel_binding=(CHANNEL_BINDING, binding) if binding else None
            )
            server.set_client_first(first.decode("utf-8"))
            self.writer.write(_auth(AUTH_SASL_CONTINUE, server.get_server_first().encode()))
            await self.writer.drain()
            final = await self._sasl_response()
            server.set_client_final(final.decode("utf-8"))
            server_final = server.get_server_final()
        except _Refusal:
            raise
        except (ScramException, UnicodeDecodeError, ValueError, TypeError) as e:
            # scramp parses what the client sent; whatever it objects to, the
            # client hears the same line, and the log gets scramp's reason.
            raise _Refusal(reason, ErrorCode.AUTH_FAILED, failed, detail=str(e)) from None
        if known is None:  # the mock keys cannot verify, but never rely on it alone
            raise _Refusal(reason, ErrorCode.AUTH_FAILED, failed, detail="no such user")
        self.writer.write(_auth(AUTH_SASL_FINAL, server_final.encode()) + _auth(AUTH_OK))
        await self.writer.drain()
        return Peer(user, self.tls, self.address)


async def accept(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    users: Mapping[str, User],
    ssl_context: ssl.SSLContext | None,
    require_tls: bool,
    timeout: float,
    stats: MutableMapping[str, int] | None = None,
    channel_binding: bytes | None = None,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, Peer]:
    """Authenticate a new TCP management connection; the server side.

    Returns the (possibly TLS-upgraded) streams and the peer.  On refusal the
    client gets a FATAL ErrorResponse, the connection is closed, the reason is
    counted in ``stats`` (keys in :data:`REFUSALS`), and :class:`Refused` (a
    ``ManagementError``) is raised with what the client was told, plus what
    only the server may know (the reason, e.g. ``unknown_user``).

    ``channel_binding`` defaults to that of a context made by
    :func:`server_ssl_context`; without one, SCRAM-SHA-256-PLUS is not offered.
    """
    if channel_binding is None and isinstance(ssl_context, ServerSSLContext):
        channel_binding = ssl_context.channel_binding
    hs = _ServerHandshake(reader, writer, users, ssl_context, require_tls, channel_binding)

    def refused(reason: str, code: ErrorCode, message: str, detail: str | None) -> Refused:
        if stats is not None:
            # Any mapping will do (a Counter, a plain dict): no default assumed.
            stats[reason] = stats.get(reason, 0) + 1
        # Debug only: the server logs refusals itself, rate-limited, from
        # Refused's fields; a flood of bad logins must not be a flood of lines.
        log.debug(
            "management connection refused",
            reason=reason,
            address=hs.address,
            user=hs.user,
            tls=hs.tls,
            error=message,
            detail=detail,
        )
        return Refused(code, message, reason=reason, detail=detail, user=hs.user)

    try:
        async with asyncio.timeout(timeout):
            peer = await hs.run()
    except TimeoutError:
        message = "canceling authentication due to timeout"
        if hs.negotiating_tls:
            # Mid-TLS-handshake a clear-text message would only be noise, and
            # no orderly close can complete: drop the connection.
            writer.transport.abort()
        else:
            await _close(writer, error_response("57014", message))
        raise refused("timeout", ErrorCode.TIMEOUT, message, f"after {timeout}s") from None
    except _Refusal as r:
        await _close(writer, error_response(r.sqlstate, r.message))
        raise refused(r.reason, r.code, r.message, r.detail) from None
    except (asyncio.IncompleteReadError, OSError) as e:
        # The client went away, or its TLS handshake failed (ssl.SSLError is
        # an OSError): nobody is left to tell.
        await _close(writer)
        why = "connection closed" if isinstance(e, asyncio.IncompleteReadError) else str(e)
        raise refused(
            "bad_startup",
            ErrorCode.BAD_FRAME,
            f"connection lost during authentication: {why}",
            None,
        ) from None
    except BaseException:
        # Cancelled (the daemon is stopping) or a bug: never leave the socket open.
        await _close(writer)
        raise
    log.debug(
        "management connection authenticated", user=peer.user, address=peer.address, tls=peer.tls
    )
    return reader, writer, peer


# -- client ---------------------------------------------------------------------


def _error_from_response(body: bytes) -> ManagementError:
    fields = _parse_error_response(body)
    code = _FROM_SQLSTATE.get(fields.get("C", ""), ErrorCode.AUTH_FAILED)
    return ManagementError(code, fields.get("M") or f"refused by the server ({fields.get('C')})")


def startup_message(user: str) -> bytes:
    """Our StartupMessage: protocol 3.0, the user, and the management marker."""
    params = (("user", user), (MANAGEMENT_PARAMETER, "1"))
    body = b"".join(_cstring(k) + _cstring(v) for k, v in params) + b"\0"
    return struct.pack("!iI", len(body) + 8, PROTOCOL_3_0) + body


async def _client_scram(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    *,
    user: str,
    password: str,
    binding: bytes | None,
) -> None:
    scram: Any = None
    verified = False
    while True:
        try:
            kind, body = await _read_message(reader, 65536)
        except _Refusal as r:
            raise ManagementError(ErrorCode.BAD_FRAME, f"server sent {r.message}") from None
        if kind == b"E":
            raise _error_from_response(body)
        if kind == b"N":  # a NoticeResponse: nothing to act on
            continue
        if kind != b"R" or len(body) < 4:
            raise ManagementError(
                ErrorCode.BAD_FRAME, f"unexpected message type {kind!r} during authentication"
            )
        (request,) = struct.unpack("!i", body[:4])
        data = body[4:]
        try:
            if request == AUTH_SASL and scram is None:
                offered = [m.decode("ascii", "replace") for m in data.split(b"\0") if m]
                if binding is not None and SCRAM_PLUS in offered:
                    scram = ScramClient(
                        [SCRAM_PLUS], user, password, channel_binding=(CHANNEL_BINDING, binding)
                    )
                elif SCRAM in offered:
                    # Over TLS without PLUS on offer, scramp sends the 'y'
                    # flag: a server that did support binding will refuse,
                    # which defeats a man in the middle stripping PLUS.
                    scram = ScramClient(
                        [SCRAM],
                        user,
                        password,
                        channel_binding=(CHANNEL_BINDING, binding) if binding is not None else None,
                    )
                else:
                    raise ManagementError(
                        ErrorCode.AUTH_FAILED,
                        f"the server offers no supported SASL mechanism ({', '.join(offered)})",
                    )
                first = scram.get_client_first().encode("utf-8")
                writer.write(
                    _message(
                        b"p",
                        _cstring(scram.mechanism_name) + struct.pack("!i", len(first)) + first,
                    )
                )
            elif request == AUTH_SASL_CONTINUE and scram is not None and not verified:
                scram.set_server_first(data.decode("utf-8"))
                writer.write(_message(b"p", scram.get_client_final().encode("utf-8")))
            elif request == AUTH_SASL_FINAL and scram is not None and not verified:
                scram.set_server_final(data.decode("utf-8"))
                verified = True
            elif request == AUTH_OK:
                if not verified:
                    raise ManagementError(
                        ErrorCode.AUTH_FAILED,
                        "the server accepted the connection without proving it knows the "
                        "user's verifier",
                    )
                return
            else:
                raise ManagementError(
                    ErrorCode.AUTH_FAILED,
                    f"unsupported authentication request {request} (expected SCRAM-SHA-256)",
                )
        except (ScramException, UnicodeDecodeError, ValueError) as e:
            raise ManagementError(
                ErrorCode.AUTH_FAILED, f"SCRAM authentication with the server failed: {e}"
            ) from None
        await writer.drain()


async def connect(
    host: str,
    port: int,
    *,
    user: str,
    password: str,
    ssl_context: ssl.SSLContext | None,
    require_tls: bool = False,
    timeout: float = 10.0,
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Open an authenticated management connection; the client side.

    With ``ssl_context`` the client asks for TLS and, when the server says no,
    goes on in clear unless ``require_tls``.  Raises ``ManagementError``:
    ``AUTH_FAILED``, ``TLS_REQUIRED``, ``TIMEOUT``..., and ``COMMAND_FAILED``
    when the port cannot be reached at all.
    """
    where = f"{host}:{port}"
    writer: asyncio.StreamWriter | None = None
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            binding: bytes | None = None
            if ssl_context is not None:
                writer.write(struct.pack("!iI", 8, SSL_REQUEST))
                await writer.drain()
                answer = await reader.readexactly(1)
                if answer == b"S":
                    if _buffered(reader):
                        raise ManagementError(
                            ErrorCode.BAD_FRAME,
                            f"{where} sent unencrypted data after accepting TLS",
                        )
                    await writer.start_tls(ssl_context, server_hostname=host)
                    ssl_object = writer.get_extra_info("ssl_object")
                    der = ssl_object.getpeercert(binary_form=True) if ssl_object else None
                    binding = tls_server_end_point(der) if der else None
                elif answer == b"N":
                    if require_tls:
                        raise ManagementError(ErrorCode.TLS_REQUIRED, f"{where} does not offer TLS")
                elif answer == b"E":
                    (length,) = struct.unpack("!i", await reader.readexactly(4))
                    if not 4 <= length <= 65536:
                        raise ManagementError(ErrorCode.BAD_FRAME, f"{where}: invalid answer")
                    raise _error_from_response(await reader.readexactly(length - 4))
                else:
                    raise ManagementError(
                        ErrorCode.BAD_FRAME,
                        f"{where} is not a pgfleet management port (answered {answer!r} "
                        "to SSLRequest)",
                    )
            elif require_tls:
                raise ManagementError(
                    ErrorCode.TLS_REQUIRED, "TLS is required but no TLS context was given"
                )
            writer.write(startup_message(user))
            await writer.drain()
            await _client_scram(reader, writer, user=user, password=password, binding=binding)
            return reader, writer
    except ManagementError:
        if writer is not None:
            await _close(writer)
        raise
    except TimeoutError:
        if writer is not None:
            await _close(writer)
        raise ManagementError(
            ErrorCode.TIMEOUT, f"no answer from {where} within {timeout}s"
        ) from None
    except asyncio.IncompleteReadError:
        if writer is not None:
            await _close(writer)
        raise ManagementError(
            ErrorCode.COMMAND_FAILED, f"{where} closed the connection during authentication"
        ) from None
    except OSError as e:
        if writer is not None:
            await _close(writer)
        why = str(e) if isinstance(e, ssl.SSLError) else (e.strerror or str(e))
        raise ManagementError(
            ErrorCode.COMMAND_FAILED, f"cannot connect to {where}: {why}"
        ) from None
    except BaseException:
        if writer is not None:
            await _close(writer)
        raise
