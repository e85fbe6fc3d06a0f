"""The time range of a page, from its query string.

``?range=1h|6h|1d|7d|30d`` (the last hour... up to now) or ``?from=&to=`` in
seconds since the epoch (what dragging on a chart sends) or ISO 8601.

Whatever the query string holds, `parse` returns a range between
``EARLIEST`` and ``LATEST`` or raises `BadRange`: no datetime arithmetic
downstream (buckets, the minimum span, templates) can overflow.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from starlette.datastructures import QueryParams

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


def parse(params: QueryParams, now: datetime | None = None) -> TimeRange:
    now = now or datetime.now(UTC)
    if params.get("from"):
        start = _parse_time(params["from"], "from")
        end = _parse_time(params["to"], "to") if params.get("to") else now
        if end <= start:
            raise BadRange("the range ends before it starts")
        if end - start < MIN_SPAN:
            mid = start + (end - start) / 2
            start, end = mid - MIN_SPAN / 2, mid + MIN_SPAN / 2
        return TimeRange(start, end, None)
    preset = params.get("range") or DEFAULT
    if preset not in RANGES:
        raise BadRange(f"invalid range {preset[:20]!r}: use one of {', '.join(RANGES)}")
    return TimeRange(now - RANGES[preset], now, preset)
