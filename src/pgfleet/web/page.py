"""What every page shares: the app's state, a request's context, a page's declaration.

A leaf of :mod:`pgfleet.web`: the app (:mod:`.app`) and the page modules
(:mod:`.views`) both import it, and it imports neither.  Each page type
declares a :class:`Page` whose ``build`` returns the page's data, served as
HTML at ``PATH`` and as JSON at ``PATH.json``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

import jinja2
from starlette.requests import Request

from pgfleet.config import Config
from pgfleet.repository import reads
from pgfleet.web.timerange import TimeRange

if TYPE_CHECKING:
    from pgfleet.web.sessions import Sessions, User

T = TypeVar("T")


@dataclass
class WebState:
    config: Config
    sessions: Sessions
    env: jinja2.Environment
    uplot: bool  # whether uPlot's files were found


class NotFound(LookupError):
    pass


@dataclass
class Ctx:
    request: Request
    state: WebState
    user: User
    range: TimeRange
    only: frozenset[str] | None  # None: every part

    def wants(self, part: str) -> bool:
        return self.only is None or part in self.only

    async def read(self, fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
        """Run a `reads` function on a connection of the user's pool."""
        async with self.state.sessions.connection(self.user) as conn:
            return await fn(conn, *args, **kwargs)

    async def gather(self, parts: Mapping[str, Coroutine[Any, Any, Any]]) -> dict[str, Any]:
        """Run the wanted parts concurrently (on up to the pool's size of connections)."""
        wanted = {k: c for k, c in parts.items() if self.wants(k)}
        for k, c in parts.items():
            if k not in wanted:
                c.close()
        values = await asyncio.gather(*wanted.values())
        return dict(zip(wanted, values, strict=True))


@dataclass(frozen=True)
class Page:
    name: str
    path: str  # a Starlette path template, without ".json"
    template: str
    build: Callable[[Ctx], Awaitable[dict[str, Any]]]
    # The parts the HTML page renders itself (the rest its scripts load).
    html_parts: frozenset[str] = field(default_factory=frozenset)
    timed: bool = True  # has a time range


def chart(
    cid: str, title: str, series: list[dict[str, Any]], *, note: str | None = None
) -> dict[str, Any]:
    return {"id": cid, "title": title, "series": [s for s in series if s], "note": note}


def line(label: str, values: list[float | None], unit: str, *, fill: bool = True) -> dict[str, Any]:
    """A series; `fill`: no row in a bucket between two that have one means zero
    (entries that did not change write nothing)."""
    if fill:
        values = _fill_gaps(values)
    return {"label": label, "unit": unit, "values": [_round(v) for v in values]}


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 4)


def _fill_gaps(values: list[float | None]) -> list[float | None]:
    idx = [i for i, v in enumerate(values) if v is not None]
    if not idx:
        return values
    out = list(values)
    for i in range(idx[0], idx[-1] + 1):
        if out[i] is None:
            out[i] = 0.0
    return out


def values(
    data: Mapping[Any, Mapping[str, list[float | None]]], key: Any, column: str, count: int
) -> list[float | None]:
    d = data.get(key)
    return list(d[column]) if d and column in d else [None] * count


def add(*lists: list[float | None]) -> list[float | None]:
    out: list[float | None] = []
    for vs in zip(*lists, strict=True):
        present = [v for v in vs if v is not None]
        out.append(sum(present) if present else None)
    return out


def buckets_for(ctx: Ctx, server: Mapping[str, Any]) -> reads.Buckets:
    # Never narrower than the server's snapshot interval: a rate per bucket
    # would otherwise alternate between zero and a spike.
    return reads.Buckets.over(
        ctx.range.start, ctx.range.end, points=300, min_width=float(server["frequency"] or 1)
    )
