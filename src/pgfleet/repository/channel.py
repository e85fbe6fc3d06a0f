"""The repository's side of the command channel: requests, replies and NOTIFY.

Owns ``pgfleet.collector_requests`` and ``pgfleet.collector_replies``, the
``pgfleet.collector_command()`` function that fills the first, and every
LISTEN, UNLISTEN and NOTIFY pgfleet sends.  The protocol (payloads, who may
command, when an answer goes through the replies table) is
:mod:`pgfleet.collector.commands`'s; what is here only moves rows and
notifications.

Collectors use the async functions, the client (``pgfleet status``, the web
UI) the sync ones.  Requests and replies are kept 10 minutes: a request older
than that is not acted upon, and :func:`forget_old` deletes both.
"""

from __future__ import annotations

from collections.abc import Collection
from datetime import datetime
from typing import Any, NamedTuple

import psycopg
from psycopg import sql

from pgfleet.connections import first_line
from pgfleet.errors import RepositoryError

# -- The collectors' side


class RequestRow(NamedTuple):
    """A request row: what the notifier could not forge."""

    id: int
    pid: int  # the backend that inserted it (and notified)
    payload: str
    sender: str
    admin: bool  # the sender is (still) a member of pgfleet_admin


async def listen_async(conn: psycopg.AsyncConnection[Any], channel: str) -> datetime:
    """LISTEN on ``channel``; return when, by the repository's clock."""
    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))
    cur = await conn.execute("SELECT statement_timestamp()")
    row = await cur.fetchone()
    assert row is not None
    when: datetime = row[0]
    return when


async def pending_requests(
    conn: psycopg.AsyncConnection[Any],
    channel: str,
    since: datetime,
    used: Collection[int],
    limit: int,
) -> list[RequestRow]:
    """The requests on ``channel`` made after ``since`` (and recently), but those ``used``."""
    # Membership is checked now, not when the request was made: a role
    # removed from pgfleet_admin meanwhile is refused.
    cur = await conn.execute(
        """SELECT id, pid, payload, sender,
                  CASE WHEN to_regrole('pgfleet_admin') IS NULL THEN false
                       ELSE EXISTS (SELECT 1 FROM pg_roles r WHERE r.rolname = sender
                                       AND pg_has_role(r.oid, 'pgfleet_admin', 'MEMBER'))
                  END
             FROM pgfleet.collector_requests
            WHERE channel = %s AND NOT (id = ANY (%s))
              AND created_at > greatest(%s, now() - interval '10 minutes')
            ORDER BY id LIMIT %s""",
        (channel, list(used), since, limit),
    )
    return [RequestRow(*row) for row in await cur.fetchall()]


async def store_reply(conn: psycopg.AsyncConnection[Any], channel: str, body: str) -> int:
    """Keep an answer too long for a NOTIFY payload; return its id for the reference."""
    cur = await conn.execute(
        "INSERT INTO pgfleet.collector_replies (channel, body) VALUES (%s, %s) RETURNING id",
        (channel, body),
    )
    row = await cur.fetchone()
    assert row is not None
    return int(row[0])


async def notify(conn: psycopg.AsyncConnection[Any], channel: str, payload: str) -> None:
    # pg_notify() rather than NOTIFY: it takes the channel as a parameter.
    await conn.execute("SELECT pg_notify(%s, %s)", (channel, payload))


async def forget_old(conn: psycopg.AsyncConnection[Any]) -> None:
    """Delete the requests and replies nobody needs any more."""
    await conn.execute(
        "DELETE FROM pgfleet.collector_requests WHERE created_at < now() - interval '10 minutes'"
    )
    await conn.execute(
        "DELETE FROM pgfleet.collector_replies WHERE created_at < now() - interval '10 minutes'"
    )


# -- The client's side


def listen(conn: psycopg.Connection[Any], channel: str) -> None:
    conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(channel)))


def unlisten(conn: psycopg.Connection[Any], channel: str) -> None:
    conn.execute(sql.SQL("UNLISTEN {}").format(sql.Identifier(channel)))


def send_command(conn: psycopg.Connection[Any], payload: str, channel: str) -> None:
    """Record the request and notify it, as only a pgfleet_admin member may."""
    try:
        conn.execute("SELECT pgfleet.collector_command(%s, %s)", (payload, channel))
    except psycopg.errors.InsufficientPrivilege as e:
        raise RepositoryError(first_line(e)) from None


def reply_body(conn: psycopg.Connection[Any], ref: str) -> str:
    """The answer stored under ``ref`` (the ID of an ``@reply ID`` notification)."""
    row = conn.execute(
        "SELECT body FROM pgfleet.collector_replies WHERE id = %s",
        (int(ref) if ref.strip().isdigit() else -1,),
    ).fetchone()
    if row is None:
        raise RepositoryError(f"the answer {ref.strip()} is missing from pgfleet.collector_replies")
    return str(row[0])
