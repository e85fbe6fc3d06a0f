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
from pgfleet.web.runs import Runs
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
    # Index advice and plans, on demand (POST), and what came of them.
    runs: Runs = field(default_factory=Runs)


class NotFound(LookupError):
    pass


@dataclass
class Ctx:
    request: Request
    state: WebState
    user: User
    range: TimeRange
    only: frozenset[str] | None  # None: every part

    @property
    def address(self) -> str:
        """The client's: the TCP peer (see pgfleet.asgi)."""
        return self.request.client.host if self.request.client else "unknown"

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
        values = await concurrently(*wanted.values())
        return dict(zip(wanted, values, strict=True))


async def concurrently(*aws: Awaitable[Any]) -> list[Any]:
    """`asyncio.gather()`, but the first failure cancels the others: a page
    that cannot be shown stops reading (and frees its connections) at once."""
    tasks = [asyncio.ensure_future(a) for a in aws]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for t in tasks:
            # Once only: a task already cancelled is cancelling its query in
            # the repository (psycopg does), and a second cancel would make
            # psycopg drop the connection with the query still running there.
            if not t.done() and not (isinstance(t, asyncio.Task) and t.cancelling()):
                t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


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


# Identifiers in paths: a srvid is an integer, a queryid a bigint.
INT4_MAX = 2**31 - 1
INT8_MAX = 2**63 - 1


def path_int(ctx: Ctx, name: str, what: str, maximum: int, minimum: int = 0) -> int:
    """The path parameter `name`, an integer in [minimum, maximum], or NotFound."""
    text = str(ctx.request.path_params[name])
    digits = text[1:] if text[:1] == "-" else text
    # Not int() alone: it takes "1_0", " 1", Arabic digits, and 5,000-digit numbers slowly.
    if not (0 < len(digits) <= 19 and digits.isascii() and digits.isdigit()):
        raise NotFound(f"{what} {text[:40]!r} is not a number")
    value = int(text)
    if not minimum <= value <= maximum:
        raise NotFound(f"no {what} {value}")
    return value


def buckets_for(ctx: Ctx, server: Mapping[str, Any]) -> reads.Buckets:
    # Never narrower than the server's snapshot interval: a rate per bucket
    # would otherwise alternate between zero and a spike.
    return reads.Buckets.over(
        ctx.range.start, ctx.range.end, points=300, min_width=float(server["frequency"] or 1)
    )
