"""When a server's next scheduled backup is due: an interval or a cron line.

A leaf module (the configuration checks its values with it).  Two forms:

- an interval, ``"1d"``, ``"6h"``, ``"30m"``, ``"1w"``: the next backup is due that
  long after the last one *started* (a slow backup does not push the whole
  series later);
- a cron line of five fields, ``minute hour day-of-month month day-of-week``,
  as Vixie cron reads it: ``*``, numbers, ranges ``a-b``, steps ``*/n`` and
  ``a-b/n``, lists ``a,b``, three-letter month and day names, Sunday as 0 or 7,
  and when both day fields are restricted a day matching *either* is due.
  ``@hourly``, ``@daily``, ``@weekly``, ``@monthly`` and ``@yearly`` stand for
  their lines.  Times are the collector's local time.

``parse()`` raises ValueError with a message that names the bad part.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from datetime import datetime, timedelta

__all__ = ["Schedule", "parse"]

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_INTERVAL_RE = re.compile(r"([0-9]{1,6})\s*([smhdw])")
_MACROS = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}
_MONTHS = ["jan", "feb", "mar", "apr", "may", "jun", "jul", "aug", "sep", "oct", "nov", "dec"]
_DAYS = ["sun", "mon", "tue", "wed", "thu", "fri", "sat"]
# name, lowest, highest, names (their index + lowest is their number)
_FIELDS = (
    ("minute", 0, 59, None),
    ("hour", 0, 23, None),
    ("day of month", 1, 31, None),
    ("month", 1, 12, _MONTHS),
    ("day of week", 0, 7, _DAYS),
)
# A cron line that can never match (30 2 31 2 *) is found out by searching
# this far ahead: four years and a day hold every calendar day there is.
_HORIZON = timedelta(days=4 * 366 + 1)
# Intervals shorter than this make no sense for base backups.
MIN_INTERVAL = timedelta(minutes=1)


@dataclass(frozen=True)
class Schedule:
    """A parsed schedule; ``text`` is what it was parsed from."""

    text: str
    interval: timedelta | None = None
    minutes: frozenset[int] = frozenset()
    hours: frozenset[int] = frozenset()
    days: frozenset[int] = frozenset()
    months: frozenset[int] = frozenset()
    weekdays: frozenset[int] = frozenset()  # 0 = Sunday
    # Vixie cron: with both day fields restricted, either one matching will do.
    any_day: bool = False

    def next_after(self, last: datetime) -> datetime:
        """When the backup after one that started at ``last`` is due.

        For a cron line, the first matching minute strictly after ``last``
        (naive datetimes are local time; an aware one keeps its zone).
        """
        if self.interval is not None:
            return last + self.interval
        t = last.replace(second=0, microsecond=0) + timedelta(minutes=1)
        end = t + _HORIZON
        while t < end:
            if t.month not in self.months:
                # The first minute of the next month.
                year, month = (t.year + 1, 1) if t.month == 12 else (t.year, t.month + 1)
                t = t.replace(year=year, month=month, day=1, hour=0, minute=0)
                continue
            if not self._day_matches(t):
                t = t.replace(hour=0, minute=0) + timedelta(days=1)
                continue
            if t.hour not in self.hours:
                t = t.replace(minute=0) + timedelta(hours=1)
                continue
            if t.minute not in self.minutes:
                t += timedelta(minutes=1)
                continue
            return t
        raise ValueError(f"schedule {self.text!r} never comes")  # parse() refuses these

    def _day_matches(self, t: datetime) -> bool:
        dom = t.day in self.days
        dow = (t.isoweekday() % 7) in self.weekdays
        return (dom or dow) if self.any_day else (dom and dow)

    def __str__(self) -> str:
        return self.text


@functools.lru_cache(maxsize=1024)
def parse(text: str) -> Schedule:
    """A schedule from ``"6h"``-style intervals or a five-field cron line (parsed once per text)."""
    t = " ".join(text.split()).lower()
    if not t:
        raise ValueError("empty schedule")
    m = _INTERVAL_RE.fullmatch(t)
    if m:
        interval = timedelta(seconds=int(m[1]) * _UNITS[m[2]])
        if interval < MIN_INTERVAL:
            raise ValueError(f"interval {text.strip()!r} is shorter than a minute")
        return Schedule(text=text.strip(), interval=interval)
    line = _MACROS.get(t, t)
    if line.startswith("@"):
        raise ValueError(f"unknown schedule {text.strip()!r}: use " + ", ".join(_MACROS))
    parts = line.split(" ")
    if len(parts) != 5:
        raise ValueError(
            f"invalid schedule {text.strip()!r}: an interval (e.g. 6h, 1d, 1w) or five cron "
            "fields (minute hour day-of-month month day-of-week)"
        )
    values = [_field(p, *spec) for p, spec in zip(parts, _FIELDS, strict=True)]
    weekdays = frozenset(d % 7 for d in values[4])
    schedule = Schedule(
        text=text.strip(),
        minutes=values[0],
        hours=values[1],
        days=values[2],
        months=values[3],
        weekdays=weekdays,
        any_day=parts[2] != "*" and parts[4] != "*",
    )
    try:
        schedule.next_after(datetime(2000, 1, 1))
    except ValueError:
        raise ValueError(f"schedule {text.strip()!r} never comes (no such day)") from None
    return schedule


def _field(text: str, name: str, low: int, high: int, names: list[str] | None) -> frozenset[int]:
    out: set[int] = set()
    for item in text.split(","):
        base, _, step_text = item.partition("/")
        step = 1
        if step_text:
            if not step_text.isdigit() or int(step_text) == 0:
                raise ValueError(f"invalid {name} step {step_text!r} in {text!r}")
            step = int(step_text)
        if base == "*":
            first, last = low, high
        else:
            first_text, dash, last_text = base.partition("-")
            first = _number(first_text, name, low, high, names)
            last = _number(last_text, name, low, high, names) if dash else first
            if dash == "" and step_text:
                last = high  # "5/15": from 5 on, as Vixie cron reads it
            if last < first:
                raise ValueError(f"invalid {name} range {base!r}")
        out.update(range(first, last + 1, step))
    return frozenset(out)


def _number(text: str, name: str, low: int, high: int, names: list[str] | None) -> int:
    if names and text in names:
        return names.index(text) + (1 if name == "month" else 0)
    if not text.isdigit() or not low <= int(text) <= high:
        raise ValueError(f"invalid {name} {text!r}: expected {low} to {high}")
    return int(text)
