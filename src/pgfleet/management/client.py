"""``pgfleet ctl``'s side of the protocol: a connection, requests, and answers for people.

A :class:`Client` is one connection to a running daemon: over its local
socket (no password: the socket's permissions and the peer's uid decide), or
over TCP after the PostgreSQL-format login of :func:`.auth.connect`.  It
sends requests and reads their answers in order; :func:`text` turns an answer
into the lines ``pgfleet ctl`` prints.

Invariants:

- Failing to reach the daemon, to log in, or to get an answer at all raises
  :class:`Unreachable`; an answer that reports an error raises a plain
  :class:`ManagementError`: ``pgfleet ctl`` exits 3 for the first, 1 for
  the second.
- An encrypted request must get an encrypted answer: a success that comes
  back in clear is refused (anyone on the path could have written it).  An
  error may come back in clear: the server could not read the request, so
  it cannot know how to answer it.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from datetime import datetime
from pathlib import Path
from types import TracebackType
from typing import Any

from pgfleet.management import auth, document, frame
from pgfleet.management.document import ErrorCode, ManagementError, OutputFormat

# Answers may be larger than requests: a fleet's ``status details``.
MAX_ANSWER = 256 * 2**20


class Unreachable(ManagementError):
    """The daemon could not be reached or logged into, or did not answer."""


class Client:
    """One management connection; ``async with`` closes it."""

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        *,
        key: bytes | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.key = key
        self.timeout = timeout

    @classmethod
    async def local(
        cls, path: str | Path, *, key: bytes | None = None, timeout: float = 10.0
    ) -> Client:
        """Connect to the daemon's socket file ``path``."""
        # Imported here: the server's module is the daemon's, and heavier.
        from pgfleet.management.server import short_path

        try:
            async with asyncio.timeout(timeout):
                with short_path(Path(path)) as address:
                    reader, writer = await asyncio.open_unix_connection(address)
        except TimeoutError:
            raise Unreachable(
                ErrorCode.TIMEOUT, f"no answer from {path} within {timeout:g} s"
            ) from None
        except OSError as e:
            hint = (
                " (is the collector running? see [management] unix_socket_dir, or --socket)"
                if isinstance(e, FileNotFoundError | ConnectionRefusedError)
                else ""
            )
            raise Unreachable(
                ErrorCode.COMMAND_FAILED, f"cannot connect to {path}: {e.strerror or e}{hint}"
            ) from None
        return cls(reader, writer, key=key, timeout=timeout)

    @classmethod
    async def remote(
        cls,
        host: str,
        port: int,
        *,
        user: str,
        password: str,
        ssl_context: ssl.SSLContext | None,
        require_tls: bool = False,
        key: bytes | None = None,
        timeout: float = 10.0,
    ) -> Client:
        """Log into the daemon's management port (SCRAM-SHA-256, TLS if asked)."""
        try:
            reader, writer = await auth.connect(
                host,
                port,
                user=user,
                password=password,
                ssl_context=ssl_context,
                require_tls=require_tls,
                timeout=timeout,
            )
        except ManagementError as e:
            raise Unreachable(e.code, e.message) from None
        except UnicodeError:
            # A host name IDNA refuses, a user name that is not text.
            raise Unreachable(
                ErrorCode.COMMAND_FAILED,
                f"cannot connect to {host[:100]!r} port {port} as {user[:64]!r}: not valid names",
            ) from None
        return cls(reader, writer, key=key, timeout=timeout)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    async def close(self) -> None:
        try:
            self.writer.close()
            async with asyncio.timeout(1.0):
                await self.writer.wait_closed()
        except (OSError, TimeoutError, ssl.SSLError):
            self.writer.transport.abort()

    async def send(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        *,
        output_format: OutputFormat = OutputFormat.TEXT,
        compression: int = 0,
        encryption: int = 0,
    ) -> None:
        """Send one request (answers come back in order: see :meth:`answer`)."""
        doc = document.request(
            command,
            arguments,
            output_format=output_format,
            compression=compression,
            encryption=encryption,
        )
        data = frame.encode(doc, compression, encryption, self.key)
        try:
            async with asyncio.timeout(self.timeout):
                self.writer.write(data)
                await self.writer.drain()
        except (OSError, TimeoutError, ssl.SSLError) as e:
            raise Unreachable(
                ErrorCode.COMMAND_FAILED, f"the collector stopped reading: {_why(e)}"
            ) from None

    async def answer(self, *, encrypted: bool = False) -> dict[str, Any]:
        """The next answer's document, whatever its outcome."""
        try:
            async with asyncio.timeout(self.timeout):
                received = await frame.read_frame(self.reader, max_size=MAX_ANSWER, key=self.key)
        except TimeoutError:
            raise Unreachable(
                ErrorCode.TIMEOUT, f"no answer from the collector within {self.timeout:g} s"
            ) from None
        except ManagementError as e:
            raise Unreachable(e.code, f"unreadable answer: {e.message}") from None
        except (OSError, asyncio.IncompleteReadError, ssl.SSLError) as e:
            raise Unreachable(
                ErrorCode.COMMAND_FAILED, f"the connection to the collector broke: {_why(e)}"
            ) from None
        if received is None:
            raise Unreachable(
                ErrorCode.COMMAND_FAILED, "the collector closed the connection without answering"
            )
        doc = received.document
        if encrypted and not received.encryption and document.outcome_error(doc) is None:
            raise Unreachable(
                ErrorCode.BAD_ENCRYPTION, "the answer to an encrypted request came back in clear"
            )
        return doc

    async def request(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        *,
        output_format: OutputFormat = OutputFormat.TEXT,
        compression: int = 0,
        encryption: int = 0,
    ) -> dict[str, Any]:
        """Send a request and return its answer's document, whatever its outcome."""
        await self.send(
            command,
            arguments,
            output_format=output_format,
            compression=compression,
            encryption=encryption,
        )
        return await self.answer(encrypted=bool(encryption))

    async def call(
        self,
        command: str,
        arguments: dict[str, Any] | None = None,
        *,
        compression: int = 0,
        encryption: int = 0,
    ) -> dict[str, Any]:
        """The ``Response`` of a request; ManagementError if its outcome is an error."""
        doc = await self.request(command, arguments, compression=compression, encryption=encryption)
        error = document.outcome_error(doc)
        if error is not None:
            raise error
        response = doc.get(document.RESPONSE)
        return response if isinstance(response, dict) else {}


def _why(e: BaseException) -> str:
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


# -- What pgfleet ctl prints --------------------------------------------------


def _value(v: Any) -> str:
    if isinstance(v, str):
        return v
    return json.dumps(v, ensure_ascii=False)


def _size(n: Any) -> str:
    if not isinstance(n, int | float):
        return "?"
    for unit in ("B", "kB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return "?"
    s = int(seconds)
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    if s < 172800:
        return f"{s // 3600} h {s % 3600 // 60} min"
    return f"{s // 86400} d {s % 86400 // 3600} h"


def _clock(iso: Any) -> str:
    if not isinstance(iso, str) or not iso:
        return "-"
    try:
        t = datetime.fromisoformat(iso).astimezone()
    except ValueError:
        return iso
    return t.strftime("%H:%M:%S" if t.date() == datetime.now().date() else "%Y-%m-%d %H:%M")


def table(headers: list[str], rows: list[list[Any]]) -> list[str]:
    """Columns padded to their widest cell."""
    cells = [headers, *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in cells]


def _status(r: dict[str, Any]) -> list[str]:
    repo = r.get("Repository") or {}
    spool = r.get("Spool") or {}
    leases = r.get("Leases") or {}
    states = r.get("States") or {}
    by_state = ", ".join(f"{k} {v}" for k, v in states.items())
    lines = [
        f"collector   {r.get('Collector')} (pid {r.get('Pid')}, pgfleet {r.get('Version')}), "
        f"up {_duration(r.get('Uptime'))}" + (", stopping" if r.get("Stopping") else ""),
        "repository  "
        + ("reachable" if repo.get("Reachable") else f"unreachable: {repo.get('LastError')}"),
        f"servers     {r.get('NumberOfServers')}"
        + (f" ({by_state})" if by_state else "")
        + f", in flight {r.get('InFlight')} of {r.get('MaxInFlight')}",
        f"spool       {spool.get('Snapshots')} snapshot(s), {_size(spool.get('Bytes'))} "
        f"of {_size(spool.get('MaxBytes'))} in {spool.get('Directory')}",
        f"leases      {leases.get('Held')} held, {leases.get('Rounds')} round(s)",
        f"management  {(r.get('Management') or {}).get('Connections')} connection(s)",
    ]
    servers = r.get("Servers")
    if isinstance(servers, dict):
        rows = []
        for srvid, s in servers.items():
            if not isinstance(s, dict):
                continue
            err = s.get("last_error")
            rows.append(
                [
                    srvid,
                    s.get("alias"),
                    s.get("state"),
                    _clock(s.get("last_snapshot")),
                    _clock(s.get("next_run")),
                    s.get("snapshots"),
                    s.get("spooled", 0),
                    ""
                    if not isinstance(err, dict)
                    else f"{_clock(err.get('at'))} {err.get('source')}: {err.get('message')}",
                ]
            )
        lines.append("")
        lines += table(
            ["srvid", "alias", "state", "last", "next", "snapshots", "spooled", "last error"],
            rows,
        )
    return lines


def _conf_set(r: dict[str, Any]) -> list[str]:
    key = r.get("ConfigKey")
    if r.get("Restart"):
        return [
            f"{key}: needs a restart: {_value(r.get('RequestedValue'))} not applied, "
            f"the collector keeps {_value(r.get('CurrentValue'))} until then"
        ]
    return [f"{key}: {_value(r.get('OldValue'))} -> {_value(r.get('NewValue'))}"]


def _servers(r: dict[str, Any]) -> list[str]:
    rows = [
        [
            s.get("srvid"),
            s.get("alias"),
            s.get("host"),
            s.get("port"),
            s.get("username"),
            s.get("dbname"),
            s.get("frequency"),
            "yes" if s.get("enabled") else "no",
            "yes" if s.get("collected") else "no",
        ]
        for s in r.get("Servers") or []
        if isinstance(s, dict)
    ]
    headers = ["srvid", "alias", "host", "port", "user", "dbname", "freq", "enabled", "here"]
    return table(headers, rows)


def text(command: str, response: dict[str, Any]) -> list[str]:
    """The lines ``pgfleet ctl --format text`` prints for a successful answer."""
    r = response
    server = r.get("Server") if isinstance(r.get("Server"), dict) else {}
    assert isinstance(server, dict)
    if command == "ping":
        return ["the collector is running"]
    if command == "status":
        return _status(r)
    if command == "reload":
        return [str(r.get("Message", "configuration reloaded"))]
    if command == "shutdown":
        return ["the collector is stopping"]
    if command == "conf ls":
        return [f"{k}: {'-' if v is None else v}" for k, v in r.items()]
    if command == "conf get":
        if "Settings" in r and isinstance(r["Settings"], dict):
            # As TOML would write them (strings quoted); one setting alone is bare.
            return [f"{k} = {json.dumps(v, ensure_ascii=False)}" for k, v in r["Settings"].items()]
        return [_value(r.get("ConfigValue"))]
    if command == "conf set":
        return _conf_set(r)
    if command == "snapshot":
        state = "started" if r.get("Started") else "already running"
        return [f"snapshot of {r.get('Server')!r} (srvid {r.get('Srvid')}) {state}"]
    if command == "server ls":
        return _servers(r)
    if command == "server add":
        return [f"server {server.get('alias')!r} added (srvid {server.get('srvid')})"]
    if command == "server rm":
        extra = " and its data purged" if r.get("Purged") else ""
        return [f"server {server.get('alias')!r} removed{extra}"]
    if command == "clear prometheus":
        return [f"{r.get('Cleared')} counter series cleared"]
    return [json.dumps(r, indent=2, ensure_ascii=False)]
