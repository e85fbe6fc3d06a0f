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
``pgfleet_admin`` may insert, whose sender and pid columns they cannot set.
The rows are what a collector acts upon, each once, and only if its sender
is (still) a member; a notification only wakes the collector up.  One that
matches no row (same pid, same payload) gets ``KO``.  See migration 0003
for the details.

Floods: anyone who can connect may NOTIFY, as fast as they like.  The
listener files every notification in an :class:`Inbox` (no I/O, so it keeps
up), which caps what waits per sending backend and in all, and counts what
it drops.  The handler reads the request rows first, at every wake-up, so
authorised requests never queue behind garbage (nor need their own
notification to have been kept); what matched no row is answered when
nothing new waits, a sender at a time in turn.

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
from collections import Counter, deque
from dataclasses import dataclass
from datetime import datetime
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

# Notifications waiting to be handled, per sending backend and in all: past
# either, the newest are dropped (and counted).  An authorised request is
# read from its row whether or not its notification was kept.
PER_SENDER = 32
INBOX_MAX = 2000
# Request rows read per wake-up, at most (oldest first; the rest next time).
REQUESTS_PER_ROUND = 100

# A channel is an identifier; keep to those that need no quoting, so that
# what we LISTEN to is exactly what the requester named.
_CHANNEL_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_SRVID_RE = re.compile(r"[0-9]{1,9}")
_WORD_RE = re.compile(r"[A-Za-z0-9_]{1,70}")


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
    if channel != "-" and not _CHANNEL_RE.fullmatch(channel):
        raise BadRequest(f"invalid response channel {channel[:70]!r}")
    chan = None if channel == "-" else channel
    # ASCII only: str.upper() makes "RELOAD" of other letters too (U+017F is "S").
    command = name.upper() if name.isascii() else name
    if command not in COMMANDS:
        # The answer names it back: only if it is a word.
        echo = name if _WORD_RE.fullmatch(name) else "ERROR"
        raise BadRequest(
            f"unknown command {name[:70]!r}: use one of {', '.join(COMMANDS)}", echo, chan
        )
    low, high = COMMANDS[command]
    if not low <= len(args) <= high:
        want = str(low) if low == high else f"{low} to {high}"
        raise BadRequest(f"{command} takes {want} argument(s), not {len(args)}", command, chan)
    for a in args:
        # Not str.isdigit(): "²" is a digit to it, and no number to int().
        if not _SRVID_RE.fullmatch(a):
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


class Inbox:
    """Notifications waiting for the handler: capped per sender and in all, no I/O.

    New notifications wait in arrival order until the handler matches them
    with the request rows (:meth:`take_new`); those that matched none wait
    in a queue per sender, taken in turn (:meth:`next_unmatched`), so that
    one busy sender does not make the others wait.  Past a cap, a new
    notification is dropped, or, when the inbox is full and its sender has
    nothing waiting, the oldest unmatched one of another sender is.
    """

    def __init__(self, per_sender: int = PER_SENDER, limit: int = INBOX_MAX) -> None:
        self.per_sender = per_sender
        self.limit = limit
        self._new: deque[tuple[int, str]] = deque()
        self._unmatched: dict[int, deque[str]] = {}
        self._turns: deque[int] = deque()  # senders with unmatched notifications, in turn
        self._waiting: Counter[int] = Counter()  # new and unmatched, by sender
        self._total = 0

    def __len__(self) -> int:
        return self._total

    def put(self, pid: int, payload: str) -> int:
        """File a notification; return how many were dropped (0 or 1)."""
        if self._waiting[pid] >= self.per_sender:
            return 1
        if self._total >= self.limit:
            if self._waiting[pid] or not self._turns:
                return 1
            self._drop_unmatched(self._turns[0])
            self._put(pid, payload)
            return 1
        self._put(pid, payload)
        return 0

    def _put(self, pid: int, payload: str) -> None:
        self._new.append((pid, payload))
        self._waiting[pid] += 1
        self._total += 1

    def _taken(self, pid: int) -> None:
        self._total -= 1
        self._waiting[pid] -= 1
        if not self._waiting[pid]:
            del self._waiting[pid]

    def _drop_unmatched(self, pid: int) -> None:
        queue = self._unmatched[pid]
        queue.popleft()
        self._taken(pid)
        if not queue:
            del self._unmatched[pid]
            self._turns.remove(pid)

    @property
    def has_new(self) -> bool:
        return bool(self._new)

    def take_new(self) -> list[tuple[int, str]]:
        """The notifications not matched yet, as (pid, payload), oldest first.

        They still count as waiting: give back those that match no request
        with :meth:`unmatched`, and call :meth:`done` for the others.
        """
        batch = list(self._new)
        self._new.clear()
        return batch

    def done(self, pid: int) -> None:
        """A notification taken with :meth:`take_new` was dealt with."""
        self._taken(pid)

    def unmatched(self, pid: int, payload: str) -> None:
        """A notification taken with :meth:`take_new` matched no request: answer it later."""
        queue = self._unmatched.get(pid)
        if queue is None:
            queue = self._unmatched[pid] = deque()
            self._turns.append(pid)
        queue.append(payload)

    def next_unmatched(self) -> tuple[int, str] | None:
        """The next unmatched notification to answer, senders taking turns."""
        if not self._turns:
            return None
        pid = self._turns.popleft()
        queue = self._unmatched[pid]
        payload = queue.popleft()
        if queue:
            self._turns.append(pid)
        else:
            del self._unmatched[pid]
        self._taken(pid)
        return pid, payload

    def clear(self) -> int:
        """Forget everything waiting; return how many."""
        n = self._total
        self._new.clear()
        self._unmatched.clear()
        self._turns.clear()
        self._waiting.clear()
        self._total = 0
        return n


class Requests:
    """The request rows only pgfleet_admin can insert: which notifications are commands."""

    def __init__(self, channel: str) -> None:
        self.channel = channel
        # Rows older than our first LISTEN were not meant for us.
        self.since: datetime | None = None
        self._used: dict[int, float] = {}  # request ids acted upon, when
        # Requests acted upon before their notification arrived: that
        # notification is no garbage.  (pid, payload) -> when, oldest first.
        self._early: dict[tuple[int, str], list[float]] = {}

    async def pending(self, conn: psycopg.AsyncConnection[Any]) -> list[repo_channel.RequestRow]:
        """The requests not acted upon yet, oldest first; each is returned once."""
        if self.since is None:
            return []
        now = time.monotonic()
        self._used = {i: t for i, t in self._used.items() if now - t < 900}
        self._early = {
            k: kept for k, ts in self._early.items() if (kept := [t for t in ts if now - t < 60])
        }
        rows = await repo_channel.pending_requests(
            conn, self.channel, self.since, self._used, REQUESTS_PER_ROUND
        )
        for row in rows:
            self._used[row.id] = now
        return rows

    def match(
        self, rows: list[repo_channel.RequestRow], batch: list[tuple[int, str]]
    ) -> tuple[list[tuple[int, str]], list[tuple[int, str]]]:
        """Split notifications into (those of a request, those of none).

        A notification matches a row of ``rows`` with its pid and payload, or
        a request acted upon before the notification came.
        """
        now = time.monotonic()
        wanted = Counter((r.pid, r.payload) for r in rows)
        mine, garbage = [], []
        for n in batch:
            if wanted[n]:
                wanted[n] -= 1
                mine.append(n)
            elif self._early.get(n):
                self._early[n].pop(0)
                mine.append(n)
            else:
                garbage.append(n)
        for key, left in wanted.items():
            self._early.setdefault(key, []).extend([now] * left)
        return mine, garbage


NOT_AUTHORIZED = (
    "not authorized: send commands with pgfleet.collector_command() as a member of pgfleet_admin"
)


def refusal(row: repo_channel.RequestRow) -> str | None:
    """None if the request's sender may command, else the reason for KO."""
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
