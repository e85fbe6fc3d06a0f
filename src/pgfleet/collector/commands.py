"""The collectors' command channel: LISTEN/NOTIFY on the repository.

A request is the payload ``COMMAND RESPONSE_CHANNEL [ARGS...]``, sent with
``SELECT pgfleet.collector_command(payload[, channel])``; ``-`` as response
channel asks for no answer.  Every live collector answers
``COMMAND OK|KO DATA`` on the response channel:

- ``RELOAD``: reread the configuration file and the fleet.
- ``WORKERS_STATUS [SRVID]``: JSON keyed by srvid (state, last snapshot,
  last error, next run...) for the servers this collector holds.
- ``FORCE_SNAPSHOT SRVID``: snapshot now; KO from collectors not holding it.

Who may command: NOTIFY cannot be restricted in PostgreSQL and does not say
who sent it, only the sending backend's pid.  ``collector_command()``
therefore also inserts a request row that only members of
``pgfleet_admin`` may insert, whose sender and pid columns they cannot set;
a collector acts on a notification only if such a row exists for the
notifying pid with the same payload, and its sender is (still) a member.
Everything else gets ``KO``.  See migration 0003 for the details.

An answer longer than a NOTIFY payload may be (under 8000 bytes) is stored
in ``pgfleet.collector_replies`` and the notification carries
``COMMAND OK|KO @reply ID`` instead of the data; :func:`request` follows the
reference, so callers always get the whole answer.

This module is the protocol: parsing, authorization, answers, the client's
wait for them.  The rows and notifications themselves are sent by
:mod:`pgfleet.repository.channel` (and the live collectors read by
:mod:`pgfleet.repository.leases`).
"""

from __future__ import annotations

import json
import re
import secrets
import time
from dataclasses import dataclass
from typing import Any

import psycopg

from pgfleet.errors import PgfleetError, RepositoryError
from pgfleet.repository import channel as repo_channel
from pgfleet.repository import leases

# PostgreSQL refuses payloads of 8000 bytes or more (the default BLCKSZ).
PAYLOAD_LIMIT = 8000
REPLY_REF = "@reply "
DEFAULT_CHANNEL = "pgfleet_collector"

# Name -> (min args, max args).
COMMANDS: dict[str, tuple[int, int]] = {
    "RELOAD": (0, 0),
    "WORKERS_STATUS": (0, 1),
    "FORCE_SNAPSHOT": (1, 1),
}

# A channel is an identifier; keep to those that need no quoting, so that
# what we LISTEN to is exactly what the requester named.
_CHANNEL_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class BadRequest(PgfleetError):
    """A payload that is not a valid request; ``channel`` is where to say so, if known."""

    def __init__(self, reason: str, command: str = "", channel: str | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.command = command
        self.channel = channel


@dataclass(frozen=True)
class Request:
    command: str
    channel: str | None  # None: no answer wanted ("-")
    args: tuple[str, ...]

    def srvid(self) -> int | None:
        return int(self.args[0]) if self.args else None


def parse(payload: str) -> Request:
    tokens = payload.split()
    if len(tokens) < 2:
        raise BadRequest("expected 'COMMAND RESPONSE_CHANNEL [ARGS...]'")
    name, channel, args = tokens[0], tokens[1], tuple(tokens[2:])
    if channel != "-" and not _CHANNEL_RE.match(channel):
        raise BadRequest(f"invalid response channel {channel[:70]!r}")
    chan = None if channel == "-" else channel
    command = name.upper()
    if command not in COMMANDS:
        raise BadRequest(
            f"unknown command {name[:70]!r}: use one of {', '.join(COMMANDS)}", name[:70], chan
        )
    low, high = COMMANDS[command]
    if not low <= len(args) <= high:
        want = str(low) if low == high else f"{low} to {high}"
        raise BadRequest(f"{command} takes {want} argument(s), not {len(args)}", command, chan)
    for a in args:
        if not a.isdigit() or len(a) > 9:
            raise BadRequest(f"invalid srvid {a[:70]!r}: expected a number", command, chan)
    return Request(command, chan, args)


def answer_text(command: str, ok: bool, data: str) -> str:
    return f"{command} {'OK' if ok else 'KO'} {data}"


async def send_answer(
    conn: psycopg.AsyncConnection[Any], channel: str, command: str, ok: bool, data: str
) -> None:
    """NOTIFY the answer, through the replies table if it is too long for a payload."""
    text = answer_text(command, ok, data)
    if len(text.encode()) >= PAYLOAD_LIMIT or data.startswith(REPLY_REF):
        reply = await repo_channel.store_reply(conn, channel, data)
        text = answer_text(command, ok, f"{REPLY_REF}{reply}")
    await repo_channel.notify(conn, channel, text)


class Authorizer:
    """Matches notifications with the request rows only pgfleet_admin can insert."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        self._used: dict[int, float] = {}  # request ids acted upon, when

    async def check(self, conn: psycopg.AsyncConnection[Any], pid: int, payload: str) -> str | None:
        """None if authorized, else the reason for KO."""
        now = time.monotonic()
        self._used = {i: t for i, t in self._used.items() if now - t < 900}
        row = await repo_channel.find_request(conn, pid, self.channel, payload, self._used)
        if row is None:
            return (
                "not authorized: send commands with pgfleet.collector_command() "
                "as a member of pgfleet_admin"
            )
        self._used[row.id] = now
        if not row.admin:
            return f"not authorized: role {row.sender!r} is not a member of pgfleet_admin"
        return None


async def housekeeping(conn: psycopg.AsyncConnection[Any]) -> None:
    """Forget requests and replies nobody needs any more."""
    await repo_channel.forget_old(conn)


# -- The client side: pgfleet status, reload, snapshot --now


@dataclass(frozen=True)
class Answer:
    command: str
    ok: bool
    data: str
    pid: int  # the answering collector's repository backend, to tell answers apart


def live_collectors(conn: psycopg.Connection[Any]) -> list[str]:
    """The collectors expected to answer: those alive, by name."""
    return leases.live_collectors(conn)


def request(
    conn: psycopg.Connection[Any],
    command: str,
    *args: str,
    channel: str = DEFAULT_CHANNEL,
    timeout: float = 5.0,
) -> list[Answer]:
    """Send a command to every live collector and collect their answers.

    Waits until each live collector answered or ``timeout`` passed.
    ``conn`` must be in autocommit mode.
    """
    expected = len(live_collectors(conn))
    if expected == 0:
        raise RepositoryError(
            "no collector is running (none has renewed its leases in the repository lately)"
        )
    reply_to = f"pgfleet_reply_{secrets.token_hex(6)}"
    # Listen first: a quick collector may answer before we would be listening.
    repo_channel.listen(conn, reply_to)
    repo_channel.send_command(conn, " ".join((command, reply_to, *args)), channel)
    answers: dict[int, Answer] = {}
    deadline = time.monotonic() + timeout
    while len(answers) < expected:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        # The connection is busy while notifies() runs: read references after.
        for n in conn.notifies(timeout=remaining, stop_after=1):
            if n.channel != reply_to:
                continue
            parts = n.payload.split(" ", 2)
            if len(parts) < 2 or parts[1] not in ("OK", "KO"):
                continue
            data = parts[2] if len(parts) > 2 else ""
            answers[n.pid] = Answer(parts[0], parts[1] == "OK", data, n.pid)
    repo_channel.unlisten(conn, reply_to)
    return [
        Answer(a.command, a.ok, repo_channel.reply_body(conn, a.data[len(REPLY_REF) :]), a.pid)
        if a.data.startswith(REPLY_REF)
        else a
        for a in answers.values()
    ]


def merged_status(answers: list[Answer]) -> dict[str, Any]:
    """WORKERS_STATUS answers of several collectors, as one mapping by srvid."""
    out: dict[str, Any] = {}
    for a in answers:
        if a.ok:
            out.update(json.loads(a.data))
    return dict(sorted(out.items(), key=lambda kv: int(kv[0])))
