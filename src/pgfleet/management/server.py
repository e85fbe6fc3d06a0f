"""The daemon's management listeners: a private Unix socket, and a TCP port for remote admins.

A connection is a loop of request frames, each answered by one frame in the
compression and encryption the client chose (:mod:`.frame`), until the
client closes it, stays silent for ``[management] timeout`` seconds, or
sends something that is not a request.

Invariants:

- Nothing a peer sends stops the daemon: every connection runs in its own
  task, and whatever escapes it (a bug) is logged and counted, never raised
  into the loop.  Memory per connection is bounded by ``max_frame_size``,
  connections by ``max_connections``.
- A frame that cannot be read (truncated, oversized, undecodable, not a
  request, an unknown command) gets an ``Outcome`` with its error code, then
  the connection closes: after one bad frame, where the next one starts is
  anyone's guess.  A command that fails (a bad argument, a server not
  found) leaves the connection open.  An answer to a frame that could not
  be decoded goes out uncompressed and unencrypted (its types may be what
  was wrong).
- The local socket is for the daemon's OS user and root only: its directory
  is created 0700, the socket is 0600, and each peer's uid is checked
  (SO_PEERCRED) all the same.  A socket file left by a dead daemon is
  removed, never one a live daemon serves: a lock file next to it says
  which.
- Remote peers authenticate first (:func:`.auth.accept`: SCRAM-SHA-256,
  TLS when configured); the admins file is read at each login, so a user
  added or removed counts at the next one.  Nothing secret is logged.
- Every connection, refusal and error is counted (``count(family, label)``,
  the daemon's /metrics), and warnings about refusals are rate-limited: a
  flood of bad logins is a count, not a log line each.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import socket
import ssl
import stat
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from pgfleet import log
from pgfleet.config import ManagementConfig
from pgfleet.errors import ConfigError, PgfleetError
from pgfleet.management import auth, document, frame, handlers, users
from pgfleet.management.document import ErrorCode, ManagementError

SOCKET_NAME = "pgfleet.sock"
_LOCK_SUFFIX = ".lock"
# sun_path is 108 bytes on Linux, with its terminating NUL.
MAX_SOCKET_PATH = 107
# Error codes after which the connection closes: where the next frame starts,
# or whether the peer speaks the protocol at all, is unknown.
_FATAL = {
    ErrorCode.BAD_FRAME,
    ErrorCode.FRAME_TOO_LARGE,
    ErrorCode.BAD_COMPRESSION,
    ErrorCode.BAD_ENCRYPTION,
    ErrorCode.BAD_JSON,
    ErrorCode.BAD_DOCUMENT,
    ErrorCode.UNKNOWN_COMMAND,
    ErrorCode.TIMEOUT,
    ErrorCode.SHUTTING_DOWN,
    ErrorCode.TOO_MANY_CONNECTIONS,
}
# Commands that change something are logged at info, the others at debug:
# a monitoring script pinging every second is not news.
_QUIET = {
    "ping", "status", "conf ls", "conf get", "server ls",
    "backup status", "backup ls", "backup info",
}  # fmt: skip
# Warnings about refused connections: so many per window (seconds), then a count.
_WARNINGS_PER_WINDOW = 20
_WARNING_WINDOW = 10.0

# What is counted, as Stats kinds of the source "management" (the daemon
# exports them, see collector/exporter/health.py): "FAMILY/LABEL...".
STATS_SOURCE = "management"
ACCEPTED = "accepted"  # /local, /remote
REFUSED = "refused"  # /local/REASON, /remote/REASON
ERRORS = "errors"  # /CODE: an ErrorCode name in lower case, or "internal"
COMMANDS = "commands"  # /COMMAND
OPEN = "connections"  # a gauge: connections open now


class Counters(Protocol):
    """Where the server counts (the daemon's :class:`pgfleet.collector.stats.Stats`)."""

    def count(self, server: str, source: str, kind: str, n: int = 1) -> None: ...

    def gauge(self, server: str, source: str, kind: str, value: float) -> None: ...


@dataclass(frozen=True)
class Settings:
    """What the server reads of ``[management]``, with the files it names loaded."""

    cfg: ManagementConfig
    key: bytes | None
    ssl_context: ssl.SSLContext | None


def prepare(cfg: ManagementConfig) -> Settings:
    """Load the key and the TLS files ``cfg`` names; ConfigError naming the bad one.

    Done before anything changes, so that a reload with a bad file keeps the
    old settings whole.
    """
    key = None
    if cfg.encryption_key_file:
        try:
            key = frame.load_key(cfg.encryption_key_file)
        except ManagementError as e:  # it names the file
            raise ConfigError(f"[management] {e.message}") from None
    context = None
    if cfg.tls_cert_file:
        # A ConfigError naming the files if they are unreadable, wrong or
        # readable by others.
        context = auth.server_ssl_context(
            cfg.tls_cert_file, cfg.tls_key_file, cfg.tls_ca_file or None
        )
    return Settings(cfg, key, context)


@contextlib.contextmanager
def short_path(path: Path) -> Iterator[str]:
    """``path`` as bind() and connect() take it, however deep its directory.

    sun_path holds 107 bytes: a longer path goes through a descriptor of its
    directory, ``/proc/self/fd/N/NAME`` (Linux), valid within the block.
    """
    if len(os.fsencode(path)) <= MAX_SOCKET_PATH:
        yield os.fspath(path)
        return
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        yield f"/proc/self/fd/{fd}/{path.name}"
    finally:
        os.close(fd)


def socket_path(cfg: ManagementConfig, spool_directory: Path) -> Path:
    """Where the local socket is: ``unix_socket_dir``, or the spool directory."""
    directory = Path(cfg.unix_socket_dir).expanduser() if cfg.unix_socket_dir else spool_directory
    return directory / SOCKET_NAME


class _Budget:
    """At most so many warnings per window; the rest are counted and said once."""

    def __init__(self, logger: log.EventLogger) -> None:
        self.log = logger
        self._window = time.monotonic()
        self._said = 0
        self._held = 0

    def warning(self, msg: str, **fields: Any) -> None:
        now = time.monotonic()
        if now - self._window >= _WARNING_WINDOW:
            if self._held:
                self.log.warning("more management refusals, not logged", count=self._held)
            self._window, self._said, self._held = now, 0, 0
        if self._said < _WARNINGS_PER_WINDOW:
            self._said += 1
            self.log.warning(msg, **fields)
        else:
            self._held += 1


class ManagementServer:
    """The listeners and their connections; ``start()``, then ``close()``."""

    def __init__(
        self,
        settings: Settings,
        target: handlers.Target,
        *,
        socket_file: Path,
        stats: Counters,
        logger: log.EventLogger | None = None,
    ) -> None:
        self.settings = settings
        self.target = target
        self.socket_file = socket_file
        self.stats = stats
        self.log = logger or log.EventLogger("management")
        self._budget = _Budget(self.log)
        self._servers: list[asyncio.Server] = []
        self._connections: set[asyncio.Task[None]] = set()
        # Connections running a command: given time to answer at close.
        self._busy: set[asyncio.Task[None]] = set()
        self._lock: IO[bytes] | None = None
        self._bound = False  # the socket file is ours to remove
        self._closing = False
        self.address: tuple[str, int] | None = None  # the TCP port's, once bound

    @property
    def connections(self) -> int:
        """Management connections open now."""
        return len(self._connections)

    def configure(self, settings: Settings) -> None:
        """Apply new settings (a reload, ``conf set``): the limits, the users, TLS, the key.

        The addresses (``unix_socket_dir``, ``host``, ``port``) need a
        restart; the daemon keeps their old values.
        """
        self.settings = settings

    # -- Listening

    async def start(self) -> None:
        """Bind the local socket, and the TCP port if any; ConfigError if impossible."""
        cfg = self.settings.cfg
        await self._start_local()
        if cfg.port:
            host = None if cfg.host == "*" else cfg.host
            try:
                server = await asyncio.start_server(
                    self._remote, host, cfg.port, reuse_address=True, backlog=128
                )
            except OSError as e:
                await self.close()
                raise ConfigError(
                    f"management cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}"
                ) from None
            self._servers.append(server)
            self.address = server.sockets[0].getsockname()[:2]

    async def _start_local(self) -> None:
        path = self.socket_file
        where = f"management socket directory '{path.parent}'"
        try:
            created = not path.parent.exists()
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if created:
                os.chmod(path.parent, 0o700)  # whatever the umask
            st = os.lstat(path.parent)
        except OSError as e:
            raise ConfigError(f"{where}: {e.strerror or e}") from None
        if stat.S_ISLNK(st.st_mode):
            raise ConfigError(f"{where}: a symbolic link (name the directory itself)")
        if not stat.S_ISDIR(st.st_mode):
            raise ConfigError(f"{where}: not a directory")
        if st.st_uid != os.geteuid():
            raise ConfigError(f"{where}: owned by uid {st.st_uid}, not by this process's")
        if st.st_mode & 0o022:
            # Others could replace our socket with theirs.
            raise ConfigError(
                f"{where}: mode {stat.S_IMODE(st.st_mode):04o} lets group or others write "
                "(chmod 0700)"
            )
        lock_path = path.with_name(path.name + _LOCK_SUFFIX)
        try:
            fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            lock = os.fdopen(fd, "r+b")
        except OSError as e:
            raise ConfigError(f"management socket lock '{lock_path}': {e.strerror}") from None
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            lock.close()
            raise ConfigError(
                f"management socket '{path}' is in use by another collector: give each "
                "collector its own [management] unix_socket_dir"
            ) from None
        self._lock = lock
        # Holding the lock, any socket there is a dead daemon's.
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            pass
        except OSError as e:
            self._release()
            raise ConfigError(f"management socket '{path}': {e.strerror}") from None
        else:
            if not stat.S_ISSOCK(st.st_mode):
                self._release()
                raise ConfigError(
                    f"management socket '{path}' exists and is not a socket: move it away"
                )
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            with short_path(path) as address:
                sock.bind(address)
            self._bound = True
            os.chmod(path, 0o600)
            sock.listen(128)
            sock.setblocking(False)
            server = await asyncio.start_unix_server(self._local, sock=sock)
        except OSError as e:
            sock.close()
            self._release()
            raise ConfigError(f"management socket '{path}': {e.strerror or e}") from None
        self._servers.append(server)

    def _release(self) -> None:
        if self._bound:
            with contextlib.suppress(OSError):
                self.socket_file.unlink(missing_ok=True)
            self._bound = False
        if self._lock is not None:
            self._lock.close()
            self._lock = None

    async def close(self, timeout: float = 1.0) -> None:
        """Stop listening, end every connection, remove the socket."""
        self._closing = True
        for server in self._servers:
            server.close()
        # Connections in a command get a moment to answer; idle ones go now.
        me = asyncio.current_task()
        for t in self._connections - self._busy:
            if t is not me:
                t.cancel()
        pending = {t for t in self._connections if t is not me}
        if pending:
            _, late = await asyncio.wait(pending, timeout=timeout)
            for t in late:
                t.cancel()
            if late:
                await asyncio.wait(late, timeout=0.2)
        for server in self._servers:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(0.2):
                    await server.wait_closed()
        self._servers.clear()
        self._release()

    # -- Connections

    def _admit(self) -> ErrorCode | None:
        if self._closing:
            return ErrorCode.SHUTTING_DOWN
        if len(self._connections) >= self.settings.cfg.max_connections:
            return ErrorCode.TOO_MANY_CONNECTIONS
        return None

    def count(self, family: str, label: str) -> None:
        self.stats.count("", STATS_SOURCE, f"{family}/{label}")

    def _track(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self.stats.gauge("", STATS_SOURCE, OPEN, len(self._connections))

    def _untrack(self) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.discard(task)
        self._busy.discard(task)
        self.stats.gauge("", STATS_SOURCE, OPEN, len(self._connections))

    def _refused(self, interface: str, reason: str, **fields: Any) -> None:
        self.count(REFUSED, f"{interface}/{reason}")
        self._budget.warning("management connection refused", interface=interface, reason=reason,
                             **fields)  # fmt: skip

    async def _local(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        refusal = self._admit()
        if refusal is not None:
            # Not tracked: a flood of refusals must not hold places.
            self._refused("local", refusal.name.lower())
            await self._answer_error(writer, ManagementError(refusal, _refusal_text(refusal)))
            await _close(writer)
            return
        self._track()
        try:
            uid = _peer_uid(writer)
            if uid is None or uid not in (os.geteuid(), 0):
                self._refused("local", "not_allowed", uid=uid)
                await self._answer_error(
                    writer,
                    ManagementError(
                        ErrorCode.NOT_ALLOWED,
                        "only the collector's OS user and root may use its socket",
                    ),
                )
                return
            self.count(ACCEPTED, "local")
            await self._session(reader, writer, handlers.Caller(local=True, user=f"uid {uid}"))
        except asyncio.CancelledError:
            # close() ends idle connections so; the task must end normally,
            # or asyncio's stream callback logs a traceback (Python 3.11).
            pass
        except Exception:
            self.count(ERRORS, "internal")
            self.log.exception("management connection failed")
        finally:
            self._untrack()
            await _close(writer)

    async def _remote(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        address = _address(writer)
        refusal = self._admit()
        if refusal is not None:
            # Remote peers read PostgreSQL messages until they are logged in.
            self._refused("remote", refusal.name.lower(), address=address)
            await auth.refuse(writer, refusal, _refusal_text(refusal))
            return
        self._track()
        settings = self.settings
        try:
            try:
                admins = users.load(settings.cfg.admins_file) if settings.cfg.admins_file else {}
            except ConfigError as e:
                # Said at every login until fixed: nobody can log in meanwhile.
                self.log.error("management login impossible", error=str(e))
                admins = {}
            why: dict[str, int] = {}
            try:
                reader, writer, peer = await auth.accept(
                    reader,
                    writer,
                    users=admins,
                    ssl_context=settings.ssl_context,
                    require_tls=settings.cfg.require_tls,
                    timeout=settings.cfg.timeout,
                    stats=why,
                )
            except ManagementError as e:
                # auth.accept said why in the log (without secrets) and closed.
                reason = next(iter(why), e.code.name.lower())
                self.count(REFUSED, f"remote/{reason}")
                return
            self.count(ACCEPTED, "remote")
            await self._session(reader, writer, handlers.Caller(local=False, user=peer.user))
        except asyncio.CancelledError:
            pass  # see _local
        except Exception:
            self.count(ERRORS, "internal")
            self.log.exception("management connection failed", address=address)
        finally:
            self._untrack()
            await _close(writer)

    async def _session(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, who: handlers.Caller
    ) -> None:
        """Answer requests until the peer is done, silent too long, or wrong."""
        while not self._closing:
            settings = self.settings
            try:
                async with asyncio.timeout(settings.cfg.timeout):
                    received = await frame.read_frame(
                        reader, max_size=settings.cfg.max_frame_size, key=settings.key
                    )
            except TimeoutError:
                await self._answer_error(
                    writer,
                    ManagementError(
                        ErrorCode.TIMEOUT, f"no request for {settings.cfg.timeout:g} s: closed"
                    ),
                )
                return
            except ManagementError as e:
                await self._answer_error(writer, e)
                return
            except (OSError, asyncio.IncompleteReadError, ssl.SSLError):
                return  # the peer is gone; nobody to answer
            if received is None:
                return
            if not await self._request(writer, received, who):
                return

    async def _request(
        self, writer: asyncio.StreamWriter, received: frame.Frame, who: handlers.Caller
    ) -> bool:
        """Answer one decoded frame; whether the connection goes on."""
        started = time.monotonic()
        header: dict[str, Any] | None = None
        command = ""
        after = None
        task = asyncio.current_task()
        assert task is not None
        self._busy.add(task)
        try:
            command, arguments, header = document.parse_request(received.document)
            if command in handlers.COMMANDS:
                self.count(COMMANDS, command)
            outcome = await handlers.dispatch(self.target, command, arguments, who)
            answer = document.response(header, command, outcome.result, started=started)
            after = outcome.after
            error = None
        except ManagementError as e:
            error = e
        except PgfleetError as e:
            # The daemon's own refusal (a bad setting, the repository).
            error = ManagementError(ErrorCode.COMMAND_FAILED, str(e))
        except Exception:
            # A bug: said in the log, and the peer told where to look.
            self.count(ERRORS, "internal")
            self.log.exception("management command failed", command=command)
            error = ManagementError(
                ErrorCode.COMMAND_FAILED, "internal error (see the collector's log)"
            )
        if error is not None:
            self.count(ERRORS, error.code.name.lower())
            self.log.debug(
                "management request failed",
                command=command[:64],
                user=who.user,
                code=int(error.code),
                error=error.message,
            )
            answer = document.response(header, command, None, started=started, error=error)
        elif command in _QUIET:
            self.log.debug("management command", command=command, user=who.user)
        else:
            self.log.info("management command", command=command, user=who.user)
        try:
            async with asyncio.timeout(self.settings.cfg.timeout):
                await frame.write_frame(
                    writer, answer, received.compression, received.encryption, self.settings.key
                )
        except ManagementError as e:
            # The answer could not be encoded (a bug: a value JSON cannot hold).
            self.count(ERRORS, "internal")
            self.log.error("management answer not sent", command=command, error=e.message)
            await self._answer_error(writer, ManagementError(ErrorCode.COMMAND_FAILED, e.message))
            return False
        except (OSError, TimeoutError, ssl.SSLError):
            return False
        finally:
            self._busy.discard(task)
            if after is not None:
                after()
        return error is None or error.code not in _FATAL

    async def _answer_error(self, writer: asyncio.StreamWriter, error: ManagementError) -> None:
        """Send an outcome for what could not be read, as plain frame (best effort)."""
        self.count(ERRORS, error.code.name.lower())
        self.log.debug("management frame refused", code=int(error.code), error=error.message)
        answer = document.response(None, "", None, started=time.monotonic(), error=error)
        with contextlib.suppress(OSError, TimeoutError, ssl.SSLError, ManagementError):
            async with asyncio.timeout(1.0):
                await frame.write_frame(writer, answer)


def _refusal_text(code: ErrorCode) -> str:
    if code is ErrorCode.TOO_MANY_CONNECTIONS:
        return "too many management connections: try again later"
    return "the collector is shutting down"


def _peer_uid(writer: asyncio.StreamWriter) -> int | None:
    sock = writer.get_extra_info("socket")
    if sock is None:
        return None
    try:
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    _pid, uid, _gid = struct.unpack("3i", creds)
    return int(uid)


def _address(writer: asyncio.StreamWriter) -> str:
    peer = writer.get_extra_info("peername")
    if isinstance(peer, tuple) and len(peer) >= 2:
        host, port = peer[:2]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(peer)


async def _close(writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError, TimeoutError, ssl.SSLError):
        writer.close()
        async with asyncio.timeout(0.5):
            await writer.wait_closed()
    if not writer.transport.is_closing():
        writer.transport.abort()
