"""The time range of a page, from its query string.

``?range=1h|6h|1d|7d|30d`` (the last hour... up to now) or ``?from=&to=`` in
seconds since the epoch (what dragging on a chart sends) or ISO 8601.  A
period comparison's other range (:func:`parse_against`) is ``?against=``
the previous period, the day or the week before, or ``custom`` with
``a_from=&a_to=``.

Whatever the query string holds, `parse` returns a range between
``EARLIEST`` and ``LATEST`` or raises `BadRange`: no datetime arithmetic
downstream (buckets, the minimum span, templates) can overflow.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

RANGES = {
    "1h": timedelta(hours=1),
    "6h": timedelta(hours=6),
    "1d": timedelta(days=1),
    "7d": timedelta(days=7),
    "30d": timedelta(days=30),
}
DEFAULT = "1h"
# Fewer than this is not worth a chart; more would not be seen.
MIN_SPAN = timedelta(seconds=60)
# No snapshot is older, none will be this late; far from datetime's limits.
EARLIEST = datetime(1970, 1, 1, tzinfo=UTC)
LATEST = datetime(2200, 1, 1, tzinfo=UTC)


class BadRange(ValueError):
    pass


@dataclass(frozen=True)
class TimeRange:
    start: datetime
    end: datetime
    preset: str | None  # "1h"... or None for a custom range

    @property
    def seconds(self) -> float:
        return (self.end - self.start).total_seconds()

    def query(self) -> str:
        """The query string that asks for this range again."""
        if self.preset:
            return f"range={self.preset}"
        return f"from={self.start.timestamp():.0f}&to={self.end.timestamp():.0f}"

    def as_json(self) -> dict[str, object]:
        return {
            "from": self.start.timestamp(),
            "to": self.end.timestamp(),
            "preset": self.preset,
        }


def _parse_time(text: str, name: str) -> datetime:
    t: datetime | None = None
    if len(text) <= 40:  # fromisoformat and float() of megabytes: no
        try:
            t = datetime.fromtimestamp(float(text), UTC)
        except (ValueError, OverflowError, OSError):
            with contextlib.suppress(ValueError):
                t = datetime.fromisoformat(text)
    if t is None:
        raise BadRange(f"invalid {name} {text[:40]!r}: use seconds since the epoch or ISO 8601")
    if t.tzinfo is None:
        t = t.replace(tzinfo=UTC)
    if not EARLIEST <= t <= LATEST:
        raise BadRange(
            f"invalid {name} {text[:40]!r}: not between {EARLIEST.year} and {LATEST.year}"
        )
    return t.astimezone(UTC)


def _span(start: datetime, end: datetime, what: str = "the range") -> TimeRange:
    if end <= start:
        raise BadRange(f"{what} ends before it starts")
    if end - start < MIN_SPAN:
        mid = start + (end - start) / 2
        start, end = mid - MIN_SPAN / 2, mid + MIN_SPAN / 2
    return TimeRange(start, end, None)


def parse(params: Mapping[str, str], now: datetime | None = None) -> TimeRange:
    now = now or datetime.now(UTC)
    if params.get("from"):
        start = _parse_time(params["from"], "from")
        end = _parse_time(params["to"], "to") if params.get("to") else now
        return _span(start, end)
    preset = params.get("range") or DEFAULT
    if preset not in RANGES:
        raise BadRange(f"invalid range {preset[:20]!r}: use one of {', '.join(RANGES)}")
    return TimeRange(now - RANGES[preset], now, preset)


# What a period is compared against: a shift back in time (None: the
# period's own length, the period just before), or "custom" (a_from, a_to).
AGAINST: dict[str, timedelta | None] = {
    "previous": None,
    "1d": timedelta(days=1),
    "7d": timedelta(days=7),
}


def parse_against(params: Mapping[str, str], b: TimeRange) -> tuple[TimeRange, str]:
    """The range `b` is compared against, and how it was chosen: ``?against=``
    one of AGAINST (B shifted back), or ``custom`` with ``a_from`` (and
    ``a_to``, by default B's length after it).  Without ``against``:
    ``custom`` if ``a_from`` is given, else ``previous``."""
    against = params.get("against") or ("custom" if params.get("a_from") else "previous")
    if against == "custom":
        if not params.get("a_from"):
            raise BadRange("against=custom needs a_from: the start of the range to compare with")
        start = _parse_time(params["a_from"], "a_from")
        end = start + (b.end - b.start)
        if params.get("a_to"):
            end = _parse_time(params["a_to"], "a_to")
        if end > LATEST:
            raise BadRange(f"the range to compare with would end after {LATEST.year}")
        return _span(start, end, "the range to compare with"), against
    if against not in AGAINST:
        raise BadRange(
            f"invalid against {against[:20]!r}: use one of {', '.join(AGAINST)} or custom"
        )
    shift = AGAINST[against] or (b.end - b.start)
    if b.start - shift < EARLIEST:
        raise BadRange(f"the range to compare with would start before {EARLIEST.year}")
    return TimeRange(b.start - shift, b.end - shift, None), against
