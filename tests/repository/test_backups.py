"""pgfleet.backups, the repository's copy of each server's backup catalog (migration 0016).

Lists made here, as a catalog would hold them, copied with the function the
daemon and the CLI use; taking real backups is tests/backup's business.
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import UTC, datetime, timedelta
from typing import Any

import psycopg
import pytest

from pgfleet.backup.catalog import BackupInfo, Kind, State
from pgfleet.cluster import Cluster
from pgfleet.repository import backups, schema, servers
from tests.fix_clusters import NewDatabase
from tests.fix_repository import connect, scalar, scalar_int

T0 = datetime(2026, 12, 7, 4, 0, tzinfo=UTC)


def backup(n: int, state: State = State.VALID, **kw: Any) -> BackupInfo:
    started = T0 + timedelta(hours=n)
    fields: dict[str, Any] = {
        "id": started.strftime("%Y%m%dT%H%M%SZ"),
        "server": "db1",
        "state": state,
        "started": started,
        "finished": started + timedelta(seconds=90) if state is not State.IN_PROGRESS else None,
        "start_lsn": f"0/{n + 2:X}000028",
        "end_lsn": f"0/{n + 2:X}000100",
        "timeline": 1,
        "start_wal": f"0000000100000000000000{n + 2:02X}",
        "end_wal": f"0000000100000000000000{n + 2:02X}",
        "raw_bytes": 30_000_000 + n,
        "stored_bytes": 4_000_000 + n,
    }
    fields.update(kw)
    return BackupInfo(**fields)


def rows(dsn: str, srvid: int) -> list[tuple[Any, ...]]:
    with connect(dsn) as conn:
        return conn.execute(
            "SELECT backup_id, kind, state, parent, started, finished, start_lsn::text,"
            " end_lsn::text, timeline, start_wal, end_wal, raw_bytes, stored_bytes, error"
            " FROM pgfleet.backups WHERE srvid = %s ORDER BY backup_id",
            (srvid,),
        ).fetchall()


def as_row(b: BackupInfo) -> tuple[Any, ...]:
    return (b.id, str(b.kind), str(b.state), b.parent, b.started, b.finished, b.start_lsn,
            b.end_lsn, b.timeline, b.start_wal, b.end_wal, b.raw_bytes, b.stored_bytes,
            b.error)  # fmt: skip


def add(dsn: str, alias: str) -> int:
    with connect(dsn) as conn:
        return servers.add(conn, alias, host="db.example", port=5432).srvid


def test_a_servers_rows_are_its_catalogs(repo: str) -> None:
    srvid, other = add(repo, "db1"), add(repo, "db2")
    first = backup(0)
    second = backup(1, kind=Kind.INCREMENTAL, parent=first.id)
    running = backup(2, State.IN_PROGRESS)
    with connect(repo) as conn:
        assert backups.mirror(conn, srvid, [first, second, running]) == 3
        assert backups.mirror(conn, other, [backup(5)]) == 1
    assert rows(repo, srvid) == [as_row(first), as_row(second), as_row(running)]
    recorded = "SELECT backup_id, recorded_at FROM pgfleet.backups WHERE srvid = %s ORDER BY 1"
    with connect(repo) as conn:
        before = dict(conn.execute(recorded, (srvid,)).fetchall())

    # The running one failed, the first went: the copy says so, in one call;
    # the row that did not change is not rewritten.
    failed = dataclasses.replace(
        running, state=State.INVALID, finished=running.started + timedelta(seconds=5),
        error="pg_basebackup: error: could not connect",
    )  # fmt: skip
    with connect(repo) as conn:
        assert backups.mirror(conn, srvid, [second, failed]) == 2
        after = dict(conn.execute(recorded, (srvid,)).fetchall())
    assert rows(repo, srvid) == [as_row(second), as_row(failed)]
    assert after[second.id] == before[second.id]
    assert after[failed.id] > before[failed.id]
    assert len(rows(repo, other)) == 1  # another server's rows are its own

    # The web UI's read: newest first, with the duration.
    async def read() -> list[dict[str, Any]]:
        async with await psycopg.AsyncConnection.connect(repo, autocommit=True) as aconn:
            return await backups.listed(aconn, srvid)

    listed = asyncio.run(read())
    assert [b["id"] for b in listed] == [failed.id, second.id]
    assert listed[0]["duration_seconds"] == 5.0 and listed[0]["error"].startswith("pg_base")
    assert listed[1]["parent"] == first.id and listed[1]["start_lsn"] == second.start_lsn

    # An empty catalog empties the copy; a server removed takes its rows along.
    with connect(repo) as conn:
        assert backups.mirror(conn, srvid, []) == 0
        assert backups.mirror(conn, srvid, [second]) == 1
        servers.remove(conn, "db1")
        assert backups.mirror(conn, srvid, [second]) is None  # gone: nothing copied
    assert rows(repo, srvid) == []
    assert scalar_int(repo, "SELECT count(*) FROM pgfleet.backups") == 1


def test_what_a_catalog_holds_is_checked(repo: str) -> None:
    """An odd backup.json (it is on a disk) never makes the copy fail."""
    srvid = add(repo, "db1")
    odd = backup(
        0,
        State.INVALID,
        id="20261207T040000Z\0<script>",
        label="x" * 5000,
        start_lsn="0/1'; DROP TABLE pgfleet.servers; --",
        end_lsn="nonsense",
        timeline=2**40,
        raw_bytes=2**70,
        stored_bytes=-1,
        error="bad\0byte " + "e" * 3000,
    )
    twice = backup(1)
    with connect(repo) as conn:
        assert backups.mirror(conn, srvid, [odd, twice, twice]) == 2
        got = conn.execute(
            "SELECT backup_id, length(label), start_lsn, end_lsn, timeline, raw_bytes,"
            " stored_bytes, error FROM pgfleet.backups WHERE srvid = %s ORDER BY 1",
            (srvid,),
        ).fetchone()
    assert got is not None
    assert got[:7] == ("20261207T040000Z<script>", 1000, None, None, None, 0, 0)
    assert got[7].startswith("badbyte eee") and len(got[7]) == 2000
    assert scalar(repo, "SELECT count(*) FROM pgfleet.servers WHERE alias = 'db1'") == 1


def test_upgrade_from_0015_keeps_data(
    pg18: Cluster, new_database: NewDatabase, monkeypatch: pytest.MonkeyPatch
) -> None:
    """0016 in place: a repository at 0015 keeps its servers and what they
    recorded, and gets the table, readable by pgfleet_read."""
    dsn = new_database(pg18)
    every = schema.migrations
    monkeypatch.setattr(schema, "migrations", lambda: [m for m in every() if m.version <= 15])
    with connect(dsn) as conn:
        schema.upgrade(conn)
        srvid = servers.add(conn, "old", host="h", port=5432).srvid
        conn.execute("SELECT pgfleet.record_error(%s, 'x', 'kept', 'query')", (srvid,))
    assert scalar(dsn, "SELECT to_regclass('pgfleet.backups')") is None

    monkeypatch.setattr(schema, "migrations", every)
    with connect(dsn) as conn:
        applied = [m.version for m in schema.upgrade(conn)]
        assert applied == [m.version for m in every() if m.version > 15] and applied[0] == 16
        assert backups.mirror(conn, srvid, [backup(0)]) == 1
    assert scalar(dsn, "SELECT message FROM pgfleet.snapshot_errors") == "kept"
    assert scalar(dsn, "SELECT alias FROM pgfleet.servers WHERE srvid = %s", (srvid,)) == "old"
    assert scalar(dsn, "SELECT has_table_privilege('pgfleet_read', 'pgfleet.backups', 'SELECT')")
    assert scalar(dsn, "SELECT max(version) FROM pgfleet.schema_migrations") == max(applied)
