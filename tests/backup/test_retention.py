"""Retention: pgmoneta's policy over a simulated year, chains, the WAL kept."""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from pgfleet.backup.catalog import ID_FORMAT, BackupInfo, Catalog, Kind, State, segment_name
from pgfleet.backup.retention import Policy, expunge_wal, parse, plan, retain, wal_to_keep
from pgfleet.backup.store import Codec, StorageError, copy_in
from pgfleet.errors import ConfigError


def backup(
    when: datetime,
    state: State = State.VALID,
    kind: Kind = Kind.FULL,
    parent: str | None = None,
    start_wal: str | None = "auto",
) -> BackupInfo:
    return BackupInfo(
        id=when.strftime(ID_FORMAT),
        server="db1",
        state=state,
        kind=kind,
        parent=parent,
        started=when,
        start_wal=f"00000001{int(when.timestamp()) // 86400:016X}"
        if start_wal == "auto"
        else start_wal,
    )


def ids(backups: Sequence[BackupInfo]) -> list[str]:
    return [b.id for b in backups]


def day(y: int, m: int, d: int, h: int = 2) -> datetime:
    return datetime(y, m, d, h, tzinfo=UTC)


# -- parsing -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, policy",
    [
        ("7", Policy(7)),
        (7, Policy(7)),
        ("7,4,12,1", Policy(7, 4, 12, 1)),
        (" 7 , 4 , 12 , 5 ", Policy(7, 4, 12, 5)),
        ("7,-,12", Policy(7, None, 12)),
        ("7,x,X,0", Policy(7)),
        ("7,,,2", Policy(7, None, None, 2)),
        ("30,8", Policy(30, 8)),  # more than 4 weeks is fine without months
        ("1,1,24", Policy(1, 1, 24)),  # more than 12 months is fine without years
    ],
)
def test_parse(text: str | int, policy: Policy) -> None:
    assert parse(text) == policy
    assert parse(str(policy)) == policy


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "days must be set"),
        ("-,4", "days must be set"),
        ("seven", "days 'seven' is not a number"),
        ("-1", "days '-1' is not a number"),
        ("7,4,12,1,1", "at most 4 values"),
        ("7,5,12", "at most 4 weeks when months are kept, not 5"),
        ("7,4,13,1", "at most 12 months when years are kept, not 13"),
        ("7,\u0661", "weeks '\u0661' is not a number"),  # an Arabic-Indic digit
    ],
)
def test_parse_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text)
    assert str(info.value) == f"invalid retention {text!r}: {message}" or message in str(info.value)
    assert "\n" not in str(info.value)


def test_policy_checks_its_values() -> None:
    assert str(Policy()) == "7,-,-,-" and str(Policy(7, 4, 12, 1)) == "7,4,12,1"
    with pytest.raises(ConfigError, match="retention weeks must be at least 1, not 0"):
        Policy(7, 0)
    with pytest.raises(ConfigError, match="retention days must be a whole number"):
        Policy(True)


# -- a year of daily backups -----------------------------------------------------


def expected_keep(
    backups: list[BackupInfo], now: datetime, days: int, weeks: int, months: int, years: int
) -> set[str]:
    """The policy computed another way: explicit period boundaries, no isocalendar."""
    keep: set[str] = set()

    def latest_in(start: datetime, end: datetime) -> None:
        inside = [b for b in backups if start <= b.started < end]
        if inside:
            keep.add(max(inside, key=lambda b: b.started).id)

    keep.update(b.id for b in backups if now - b.started <= timedelta(days=days))
    monday = datetime(now.year, now.month, now.day, tzinfo=UTC) - timedelta(days=now.weekday())
    for k in range(weeks):
        latest_in(monday - timedelta(days=7 * k), monday - timedelta(days=7 * k - 7))
    y, m = now.year, now.month
    for _ in range(months):
        ny, nm = (y + 1, 1) if m == 12 else (y, m + 1)
        latest_in(datetime(y, m, 1, tzinfo=UTC), datetime(ny, nm, 1, tzinfo=UTC))
        y, m = (y - 1, 12) if m == 1 else (y, m - 1)
    for k in range(years):
        latest_in(
            datetime(now.year - k, 1, 1, tzinfo=UTC), datetime(now.year - k + 1, 1, 1, tzinfo=UTC)
        )
    keep.add(max(backups, key=lambda b: b.started).id)
    return keep


YEAR = [backup(day(2025, 1, 1) + timedelta(days=i)) for i in range(396)]  # 2025-01-01 .. 2026-01-31


def test_a_year_of_daily_backups_kept_as_pgmoneta_says() -> None:
    now = day(2026, 1, 31, 12)  # a Saturday
    keep, delete = plan(YEAR, Policy(7, 4, 12, 1), now)
    assert set(ids(keep)) | set(ids(delete)) == set(ids(YEAR)) and not set(ids(keep)) & set(
        ids(delete)
    )
    # By hand: the last 7 days (Jan 25-31), the latest of the weeks of Jan 12 and Jan 5
    # (Sundays 18 and 11; the week of Jan 19 ends on the 25th, kept anyway), the last day
    # of every month back to February 2025, and this year's latest (Jan 31).
    assert [b.started.date().isoformat() for b in keep] == [
        "2025-02-28", "2025-03-31", "2025-04-30", "2025-05-31", "2025-06-30", "2025-07-31",
        "2025-08-31", "2025-09-30", "2025-10-31", "2025-11-30", "2025-12-31",
        "2026-01-11", "2026-01-18",
        "2026-01-25", "2026-01-26", "2026-01-27", "2026-01-28", "2026-01-29", "2026-01-30",
        "2026-01-31",
    ]  # fmt: skip
    assert set(ids(keep)) == expected_keep(YEAR, now, 7, 4, 12, 1)


@pytest.mark.parametrize(
    "policy", [(7, 4, 12, 1), (3, 2, 6, 2), (1, 1, 1, 1), (14, 8, 24, 0), (7, 0, 0, 0)]
)
def test_every_day_of_the_year(policy: tuple[int, int, int, int]) -> None:
    """Retention run every day after the backup: the end state is what one run at the end says,
    and on every day, the kept set is the independent computation's."""
    p = Policy(*(v or None for v in policy))
    d, w, m, y = policy
    present: list[BackupInfo] = []
    for b in YEAR:
        present.append(b)
        now = b.started + timedelta(hours=1)
        keep, _ = plan(present, p, now)
        assert set(ids(keep)) == expected_keep(present, now, d, w, m, y), now
        present = keep
    assert ids(present) == ids(plan(YEAR, p, YEAR[-1].started + timedelta(hours=1))[0])


def test_weeks_follow_now_s_time_zone() -> None:
    """Sunday 23:00 UTC is Monday in Tokyo: another week there."""
    tokyo = timezone(timedelta(hours=9))
    sunday = backup(day(2026, 1, 11, 23))
    saturday = backup(day(2026, 1, 10, 12))
    monday = backup(day(2026, 1, 12, 12))
    now = day(2026, 1, 30)
    assert ids(plan([saturday, sunday, monday], Policy(1, 4), now)[0]) == [sunday.id, monday.id]
    assert ids(plan([saturday, sunday, monday], Policy(1, 4), now.astimezone(tokyo))[0]) == [
        saturday.id,
        monday.id,
    ]


# -- what is never deleted ------------------------------------------------------------


def test_the_only_valid_backup_is_kept() -> None:
    old = backup(day(2020, 1, 1))
    assert plan([old], Policy(1), day(2026, 1, 1)) == ([old], [])
    older = backup(day(2019, 1, 1))
    invalid = backup(day(2021, 1, 1), State.INVALID)
    assert plan([older, old, invalid], Policy(1), day(2026, 1, 1)) == ([old, invalid], [older])


def test_incremental_chains_keep_their_parents() -> None:
    full = backup(day(2025, 12, 30))
    inc1 = backup(day(2025, 12, 31), kind=Kind.INCREMENTAL, parent=full.id)
    inc2 = backup(day(2026, 1, 1), kind=Kind.INCREMENTAL, parent=inc1.id)
    full2 = backup(day(2026, 1, 6))
    inc3 = backup(day(2026, 1, 7), kind=Kind.INCREMENTAL, parent=full2.id)
    now = day(2026, 1, 20)
    # Only the newest is wanted: its chain comes along.
    keep, delete = plan([full, inc1, inc2, full2, inc3], Policy(1), now)
    assert ids(keep) == [full2.id, inc3.id] and ids(delete) == [full.id, inc1.id, inc2.id]
    # inc2 is the latest of the week of December 29: its whole chain stays.
    monday = backup(day(2026, 1, 19))
    keep, delete = plan([full, inc1, inc2, full2, inc3, monday], Policy(1, 4), now)
    assert ids(keep) == [full.id, inc1.id, inc2.id, full2.id, inc3.id, monday.id] and delete == []
    # A running incremental backup needs its parents as much.
    running = backup(day(2026, 1, 19), State.IN_PROGRESS, Kind.INCREMENTAL, parent=inc2.id)
    newer = backup(day(2026, 1, 18, 3))
    keep, delete = plan([full, inc1, inc2, newer, running], Policy(1), now)
    assert ids(keep) == [full.id, inc1.id, inc2.id, newer.id, running.id] and delete == []
    # A kept full backup does not keep its children.
    keep, delete = plan([full, inc1, full2], Policy(1, None, 1), day(2026, 1, 31))
    assert ids(keep) == [full2.id] and ids(delete) == [full.id, inc1.id]


def test_states() -> None:
    now = day(2026, 6, 1)
    running = backup(day(2025, 1, 1), State.IN_PROGRESS)
    old_invalid = backup(day(2026, 1, 1), State.INVALID)
    kept = backup(day(2026, 5, 30))
    new_invalid = backup(day(2026, 5, 31), State.INVALID)
    deleting = backup(day(2026, 5, 31, 5), State.DELETING)
    keep, delete = plan([running, old_invalid, kept, new_invalid, deleting], Policy(7), now)
    assert ids(keep) == [running.id, kept.id, new_invalid.id]
    assert ids(delete) == [old_invalid.id, deleting.id]
    # No valid backup at all: invalid ones go with the days window.
    keep, delete = plan([old_invalid, new_invalid], Policy(7), now)
    assert ids(keep) == [new_invalid.id] and ids(delete) == [old_invalid.id]


# -- WAL -------------------------------------------------------------------------------


def test_wal_to_keep() -> None:
    a = backup(day(2026, 1, 1), start_wal="000000010000000000000010")
    b = backup(day(2026, 1, 2), start_wal="000000020000000000000008")
    running = backup(day(2026, 1, 3), State.IN_PROGRESS, start_wal="000000020000000000000020")
    assert wal_to_keep([a, b, running]) == "000000010000000000000010"
    assert wal_to_keep([b, running]) == "000000020000000000000008"
    assert wal_to_keep([running]) == "000000020000000000000020"
    assert wal_to_keep([]) is None
    assert wal_to_keep([b, backup(day(2026, 1, 4), start_wal=None)]) is None  # unknown: keep all
    assert wal_to_keep([b, backup(day(2026, 1, 4), State.INVALID, start_wal=None)]) == b.start_wal


def test_expunge_wal(tmp_path: Path) -> None:
    cat = Catalog(tmp_path, "db1")
    cat.create()
    names = [
        "000000010000000000000001.zst",
        "000000010000000000000002.zst.aes",
        "000000010000000000000003",
        "000000010000000000000004.zst",
        "000000020000000000000003.zst",
        "00000002.history.zst",
        ".tmp-000000010000000000000001.zst-abcd",
    ]
    for n in names:
        (cat.wal_dir / n).write_bytes(b"")
    (cat.incoming_dir / "000000010000000000000001.partial").write_bytes(b"")
    assert expunge_wal(cat, None) == []
    assert expunge_wal(cat, "000000010000000000000003") == [
        "000000010000000000000001.zst",
        "000000010000000000000002.zst.aes",
    ]
    assert expunge_wal(cat, "000000020000000000000003") == [
        "000000010000000000000003",
        "000000010000000000000004.zst",
    ]
    assert sorted(os.listdir(cat.wal_dir)) == [
        ".tmp-000000010000000000000001.zst-abcd",
        "00000002.history.zst",
        "000000020000000000000003.zst",
        "incoming",
    ]
    assert os.listdir(cat.incoming_dir) == ["000000010000000000000001.partial"]
    with pytest.raises(StorageError, match="is not a WAL segment name"):
        expunge_wal(cat, "../x")


def test_retain_on_disk(tmp_path: Path) -> None:
    """Two months of daily backups and their WAL, then the policy applied for real."""
    cat = Catalog(tmp_path, "db1")
    start = day(2026, 1, 1)
    for i in range(60):
        when = start + timedelta(days=i)
        info = cat.begin(started=when)
        info = info.with_file(
            copy_in(io.BytesIO(b"x"), cat.backup_dir(info.id) / "base.tar.zst", Codec())
        )
        wal = segment_name(1, (i + 1) << 24)
        info = cat.finish(dataclasses.replace(info, timeline=1, start_wal=wal))
        copy_in(io.BytesIO(b"w"), cat.wal_dir / f"{wal}.zst", Codec())
    failed = cat.begin(started=start + timedelta(days=60))
    cat.fail(failed.id, "boom")
    now = start + timedelta(days=60, hours=1)
    run = retain(cat, Policy(7, 2), now)
    assert run.deleted and not set(ids(run.kept)) & set(ids(run.deleted))
    assert ids(cat.list()) == ids(run.kept) == ids(plan(cat.list(), Policy(7, 2), now)[0])
    assert ids(cat.list())[-1] == failed.id
    oldest = min(b.start_wal for b in run.kept if b.start_wal)
    assert cat.wal_segments()[0] == oldest
    assert len(run.wal_removed) == 60 - len(cat.wal_segments())
    # Run again: nothing more to do.
    again = retain(cat, Policy(7, 2), now)
    assert again.deleted == [] and again.wal_removed == []
