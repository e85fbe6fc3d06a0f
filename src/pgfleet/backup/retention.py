"""Which backups to keep, pgmoneta's way, and which WAL the kept ones need.

A policy is pgmoneta's ``retention = days, weeks, months, years`` (``7`` by
default; ``7, 4, 12, 1``; ``-``, ``x``, ``0`` or nothing for a value not set;
trailing ones may be left out).  A VALID backup is kept when any rule keeps it:

- days: it started less than ``days`` x 24 hours ago;
- weeks: it is the latest backup of its ISO week (Monday to Sunday), for the
  current week and the ``weeks - 1`` before it;
- months, years: likewise, the latest of each calendar month, of each year.

Weeks, months and years are those of ``now``'s time zone (UTC, as backup IDs,
unless the caller passes a local ``now``).

pgmoneta itself keeps, per period, the latest backup taken *on* its first day
(a Monday, the 1st, January 1st), so a week whose Monday backup failed keeps
nothing; pgfleet keeps the period's latest backup whichever day it was taken,
as Barman's and pgBackRest's users expect of "one per week".  The parsing and
its validation rules are pgmoneta's: days must be set; weeks at most 4 when
months are set; months at most 12 when years are.

Whatever the rules say:

- the newest VALID backup is never deleted, so neither is the only one;
- a backup a kept (or running) incremental backup depends on is kept, up its
  chain of parents;
- IN_PROGRESS backups are never deleted;
- INVALID backups are kept while they are newer than the oldest kept valid one
  (they say what went wrong), deleted once older; DELETING ones are deleted
  (that finishes an interrupted deletion).

WAL: the oldest segment a kept backup needs is its ``start_wal``; every
segment whose name sorts before the oldest such is no longer needed (names
sort by timeline, then position: a newer timeline starts with a copy of the
segment it forked in).  Timeline history files and pg_receivewal's incoming
directory are never touched.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from pgfleet.backup.catalog import TMP_PREFIX, BackupInfo, Catalog, State
from pgfleet.backup.store import StorageError, fsync_dir, strip_suffix
from pgfleet.errors import ConfigError

__all__ = ["Policy", "RetentionRun", "expunge_wal", "parse", "plan", "retain", "wal_to_keep"]

_SEGMENT_RE = re.compile(r"[0-9A-F]{24}")
_UNSET = {"", "-", "x", "X", "0"}


@dataclass(frozen=True)
class Policy:
    """Keep backups of the last ``days`` days, and one per week, month, year for so many."""

    days: int | None = 7
    weeks: int | None = None
    months: int | None = None
    years: int | None = None

    def __post_init__(self) -> None:
        for name in ("days", "weeks", "months", "years"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool)):
                raise ConfigError(f"retention {name} must be a whole number, not {value!r}")
            if value is not None and value < 1:
                raise ConfigError(f"retention {name} must be at least 1, not {value}")

    def __str__(self) -> str:
        values = (self.days, self.weeks, self.months, self.years)
        return ",".join("-" if v is None else str(v) for v in values)


def parse(text: str | int) -> Policy:
    """pgmoneta's ``retention`` value: ``7`` or ``7,4,12,1``, ``-`` for unset; ConfigError."""
    if isinstance(text, int) and not isinstance(text, bool):
        text = str(text)
    if not isinstance(text, str):
        raise ConfigError(f"invalid retention {text!r}: expected days[,weeks[,months[,years]]]")

    def bad(why: str) -> ConfigError:
        return ConfigError(f"invalid retention {text!r}: {why}")

    parts = [p.strip() for p in text.split(",")]
    if len(parts) > 4:
        raise bad("at most 4 values: days, weeks, months, years")
    values: list[int | None] = []
    for name, part in zip(("days", "weeks", "months", "years"), parts, strict=False):
        if part in _UNSET:
            values.append(None)
        elif part.isascii() and part.isdigit():
            values.append(int(part))
        else:
            raise bad(f"{name} {part!r} is not a number (nor -, x or 0 for unset)")
    values += [None] * (4 - len(values))
    days, weeks, months, years = values
    if days is None:
        raise bad("days must be set (at least 1)")
    if months is not None and weeks is not None and weeks > 4:
        raise bad(f"at most 4 weeks when months are kept, not {weeks}")
    if years is not None and months is not None and months > 12:
        raise bad(f"at most 12 months when years are kept, not {months}")
    return Policy(days, weeks, months, years)


def _week(dt: datetime) -> Hashable:
    iso = dt.isocalendar()
    return (iso.year, iso.week)


def _month(dt: datetime) -> Hashable:
    return (dt.year, dt.month)


def _year(dt: datetime) -> Hashable:
    return dt.year


def _last_periods(
    now: datetime, policy: Policy
) -> list[tuple[Callable[[datetime], Hashable], set[Hashable]]]:
    """For each rule set: the function naming a time's period, and the periods kept."""
    rules: list[tuple[Callable[[datetime], Hashable], set[Hashable]]] = []
    if policy.weeks:
        rules.append((_week, {_week(now - timedelta(weeks=k)) for k in range(policy.weeks)}))
    if policy.months:
        months: set[Hashable] = set()
        year, month = now.year, now.month
        for _ in range(policy.months):
            months.add((year, month))
            year, month = (year, month - 1) if month > 1 else (year - 1, 12)
        rules.append((_month, months))
    if policy.years:
        rules.append((_year, {now.year - k for k in range(policy.years)}))
    return rules


def plan(
    backups: Sequence[BackupInfo], policy: Policy, now: datetime
) -> tuple[list[BackupInfo], list[BackupInfo]]:
    """Split ``backups`` into (keep, delete), both oldest first; see the module docstring.

    Delete in reverse (newest first): an incremental backup then goes before
    the one it depends on.
    """
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    ordered = sorted(backups, key=lambda b: (b.started, b.id))
    valid = [b for b in ordered if b.state is State.VALID]
    keep: set[str] = set()

    if policy.days is not None:
        since = now - timedelta(days=policy.days)
        keep.update(b.id for b in valid if b.started >= since)
    for period_of, periods in _last_periods(now, policy):
        latest: dict[Hashable, BackupInfo] = {}
        for b in valid:  # oldest first: the last one of a period wins
            period = period_of(b.started.astimezone(now.tzinfo))
            if period in periods:
                latest[period] = b
        keep.update(b.id for b in latest.values())
    if valid:
        keep.add(valid[-1].id)
    keep.update(b.id for b in ordered if b.state is State.IN_PROGRESS)

    # An incremental backup is worth nothing without its whole chain.
    by_id = {b.id: b for b in ordered}
    for backup_id in list(keep):
        parent = by_id[backup_id].parent
        while parent is not None and parent in by_id and parent not in keep:
            if by_id[parent].state is not State.DELETING:
                keep.add(parent)
            parent = by_id[parent].parent

    kept_valid = [b.started for b in valid if b.id in keep]
    oldest: datetime | None
    if kept_valid:
        oldest = min(kept_valid)
    else:
        oldest = now - timedelta(days=policy.days) if policy.days is not None else None
    for b in ordered:
        if (
            b.state is State.INVALID
            and b.id not in keep
            and (oldest is None or b.started >= oldest)
        ):
            keep.add(b.id)
    return [b for b in ordered if b.id in keep], [b for b in ordered if b.id not in keep]


def wal_to_keep(kept: Sequence[BackupInfo]) -> str | None:
    """The oldest WAL segment a kept backup needs; None: keep all WAL (nothing to go by).

    None when no valid or running backup is kept, or when a valid one does not
    record its first segment: then nothing can safely be said to be unneeded.
    """
    needed: list[str] = []
    for b in kept:
        if b.state is State.VALID and b.start_wal is None:
            return None
        if b.state in (State.VALID, State.IN_PROGRESS) and b.start_wal is not None:
            needed.append(b.start_wal)
    return min(needed) if needed else None


def expunge_wal(catalog: Catalog, oldest: str | None) -> list[str]:
    """Delete the archived WAL segments before ``oldest`` (never it, nor any after)."""
    if oldest is None:
        return []
    if not _SEGMENT_RE.fullmatch(oldest):
        raise StorageError(f"{oldest!r} is not a WAL segment name")
    removed = []
    with catalog.lock():
        try:
            names = sorted(os.listdir(catalog.wal_dir))
        except FileNotFoundError:
            return []
        for name in names:
            segment = strip_suffix(name)
            if name.startswith(TMP_PREFIX) or not _SEGMENT_RE.fullmatch(segment):
                continue
            if segment < oldest:
                try:
                    (catalog.wal_dir / name).unlink()
                except FileNotFoundError:
                    continue
                except OSError as e:
                    raise StorageError(
                        f"cannot remove {catalog.wal_dir / name}: {e.strerror}"
                    ) from None
                removed.append(name)
        if removed:
            fsync_dir(catalog.wal_dir)
    return removed


@dataclass(frozen=True)
class RetentionRun:
    """What one :func:`retain` did."""

    kept: list[BackupInfo]
    deleted: list[BackupInfo]
    wal_removed: list[str]


def retain(catalog: Catalog, policy: Policy, now: datetime | None = None) -> RetentionRun:
    """Apply ``policy`` to a server: delete the backups it lets go, then the WAL none needs."""
    now = now or datetime.now(UTC)
    with catalog.lock():
        keep, delete = plan(catalog.list(), policy, now)
        for b in reversed(delete):
            # A DELETING backup is half gone already: no child can be saved by refusing.
            catalog.delete(b.id, force=b.state is State.DELETING)
        wal = expunge_wal(catalog, wal_to_keep(keep))
    return RetentionRun(keep, delete, wal)
