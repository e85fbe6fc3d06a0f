"""pgfleet.backups: the repository's copy of each server's backup catalog.

The catalog (:mod:`pgfleet.backup.catalog`) is on the collector's host and is
the truth; the web UI reads the repository only, and may run elsewhere.  So
whoever changes a catalog copies it here whole (:func:`mirror`): the daemon
(:mod:`pgfleet.backup.mirror`) and ``pgfleet backup create|delete|retain``.
Migration 0016 holds the table and ``pgfleet.backups_mirror``, which replaces
a server's rows in one statement; this module is every statement on them.

What must hold: a catalog is on a disk anyone with access to the host may
write, so nothing read from it reaches the repository unchecked.  An LSN that
is not one becomes NULL, texts are cut short and lose their NUL bytes (which
neither jsonb nor text can hold), numbers are bounded: one odd backup.json
must not make a server's copy fail for ever.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.rows import dict_row

from pgfleet.snapshot.model import mark

if TYPE_CHECKING:
    from pgfleet.backup.catalog import BackupInfo

Row = dict[str, Any]

# Rows the web UI lists, newest first, at most (retention keeps far fewer).
LIST_LIMIT = 500

_LSN_RE = re.compile(r"[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}")
_INT4_MAX = 2**31 - 1
_INT8_MAX = 2**63 - 1
# Longest text kept per column (the catalog scrubs errors to 2,000 already).
_TEXT_MAX = {"backup_id": 100, "kind": 40, "state": 40, "parent": 100, "label": 1000,
             "start_wal": 100, "end_wal": 100, "error": 2000}  # fmt: skip


def _text(value: object, column: str) -> str | None:
    if value is None:
        return None
    return str(value).replace("\0", "")[: _TEXT_MAX[column]]


def _lsn(value: object) -> str | None:
    return value if isinstance(value, str) and _LSN_RE.fullmatch(value) else None


def _int(value: object, maximum: int) -> int | None:
    if not isinstance(value, int) or isinstance(value, bool):
        return None
    return value if 0 <= value <= maximum else None


def _time(value: datetime | None) -> str | None:
    return None if value is None else value.isoformat()


def rows(backups: Iterable[BackupInfo]) -> list[dict[str, Any]]:
    """``backups`` as ``pgfleet.backups_mirror`` takes them, checked (see above)."""
    out = []
    for b in backups:
        out.append(
            {
                "backup_id": _text(b.id, "backup_id"),
                "kind": _text(b.kind, "kind"),
                "state": _text(b.state, "state"),
                "parent": _text(b.parent, "parent"),
                "label": _text(b.label, "label"),
                "started": _time(b.started),
                "finished": _time(b.finished),
                "start_lsn": _lsn(b.start_lsn),
                "end_lsn": _lsn(b.end_lsn),
                "timeline": _int(b.timeline, _INT4_MAX),
                "start_wal": _text(b.start_wal, "start_wal"),
                "end_wal": _text(b.end_wal, "end_wal"),
                "raw_bytes": _int(b.raw_bytes, _INT8_MAX) or 0,
                "stored_bytes": _int(b.stored_bytes, _INT8_MAX) or 0,
                "error": _text(b.error, "error"),
            }
        )
    return out


_MIRROR = mark("SELECT pgfleet.backups_mirror(%s, %s::jsonb)")


def _result(row: tuple[Any, ...] | None) -> int | None:
    return None if row is None or row[0] is None else int(row[0])


def mirror(conn: psycopg.Connection[Any], srvid: int, backups: Iterable[BackupInfo]) -> int | None:
    """Make server ``srvid``'s rows ``backups``; the rows it has, None if it is not registered."""
    cur = conn.execute(_MIRROR, (srvid, json.dumps(rows(backups))))
    return _result(cur.fetchone())


async def mirror_async(
    conn: psycopg.AsyncConnection[Any], srvid: int, backups: Iterable[BackupInfo]
) -> int | None:
    """:func:`mirror`, for the collector's event loop."""
    cur = await conn.execute(_MIRROR, (srvid, json.dumps(rows(backups))))
    return _result(await cur.fetchone())


async def listed(
    conn: psycopg.AsyncConnection[Any], srvid: int, limit: int = LIST_LIMIT
) -> list[Row]:
    """Server ``srvid``'s backups as last copied, newest first (the web UI's read)."""
    async with conn.cursor(row_factory=dict_row) as cur:
        await cur.execute(
            mark(
                """SELECT backup_id AS id, kind, state, parent, label, started, finished,
                          -- greatest() would make a running backup's NULL 0.
                          CASE WHEN finished IS NOT NULL
                               THEN greatest(extract(epoch FROM finished - started), 0)::float8
                          END AS duration_seconds,
                          start_lsn::text, end_lsn::text, timeline, start_wal, end_wal,
                          raw_bytes, stored_bytes, error, recorded_at
                     FROM pgfleet.backups
                    WHERE srvid = %(srvid)s
                    ORDER BY started DESC, backup_id DESC
                    LIMIT %(limit)s"""
            ),
            {"srvid": srvid, "limit": limit},
        )
        return await cur.fetchall()
