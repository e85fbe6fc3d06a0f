"""The collector's HTTP endpoint: ``/metrics``, a ``/`` overview, 403 elsewhere.

A plain ASGI callable rather than a routed framework app: there are two
paths, and everything else must be refused the same way.  ``/metrics`` is
built by prometheus_client from the daemon's memory only (no query at
scrape time): the collector's health from its registry (its families' lines
kept between scrapes, see own.py), the fleet's
statistics from :class:`~pgfleet.collector.exporter.rendered.Rendered` (parsed and
rendered per server at the scrape that first finds it changed).  The format follows
the scraper's Accept header (OpenMetrics when asked, text 0.0.4 otherwise).
Bodies larger than one chunk go out with ``Transfer-Encoding: chunked``
(uvicorn does so for a response without a length), gzip-compressed when
the scraper accepts it, as Prometheus does -- in a thread, as zlib lets go
of the GIL and a fleet's body is megabytes.

Everything but gzip runs on the event loop, between the workers' awaits:
the collectors read state the loop mutates, and the fleet's servers are
rendered one at a time (see rendered.py).
"""

from __future__ import annotations

import asyncio
import gzip
import html
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from prometheus_client.exposition import choose_encoder
from prometheus_client.registry import CollectorRegistry
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from pgfleet.collector.exporter.own import Own
from pgfleet.collector.exporter.rendered import EOF_LINE, Rendered

CHUNK = 64 * 1024


@dataclass(frozen=True)
class Row:
    """One server of the overview page."""

    alias: str
    state: str
    up: bool | None
    last_snapshot: float | None
    last_error: str | None


def _chunks(body: bytes) -> AsyncIterator[bytes]:
    async def gen() -> AsyncIterator[bytes]:
        for i in range(0, len(body), CHUNK):
            yield body[i : i + CHUNK]

    return gen()


def _age(t: float | None, now: float) -> str:
    if t is None:
        return "never"
    s = max(0, round(now - t))
    if s < 120:
        return f"{s} s"
    if s < 7200:
        return f"{s // 60} min"
    return f"{s // 3600} h"


def overview_html(collector: str, rows: Sequence[Row], now: float) -> str:
    """The / page: every server, its state and last error, escaped."""
    e = html.escape
    lines = [
        f"<tr><td>{e(r.alias)}</td>"
        f"<td>{'up' if r.up else 'down' if r.up is not None else '-'}</td>"
        f"<td>{e(r.state)}</td><td>{_age(r.last_snapshot, now)}</td>"
        f"<td>{e(r.last_error or '')}</td></tr>"
        for r in rows
    ]
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
        f"<title>pgfleet collector {e(collector)}</title>"
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:.2em .8em;"
        "text-align:left;vertical-align:top}tr:nth-child(even){background:#f4f4f4}</style>"
        f"</head><body><h1>pgfleet collector {e(collector)}</h1>"
        f'<p>{len(rows)} server(s). Metrics: <a href="metrics">/metrics</a></p>'
        "<table><tr><th>server</th><th>reached</th><th>state</th>"
        "<th>last snapshot</th><th>last error</th></tr>\n" + "\n".join(lines) + "\n</table>"
        "</body></html>\n"
    )


class Endpoint:
    """The ASGI application; ``overview()`` gives the / page's collector name and rows."""

    def __init__(
        self,
        registry: CollectorRegistry,
        overview: Callable[[], tuple[str, Sequence[Row]]],
        fleet: Rendered | None = None,
    ) -> None:
        self.registry = registry
        self.own = Own(registry)
        self.overview = overview
        self.fleet = fleet

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return  # no lifespan to speak of
        request = Request(scope, receive)
        response: Response
        if request.method not in ("GET", "HEAD"):
            response = PlainTextResponse(
                "only GET and HEAD here\n", status_code=405, headers={"Allow": "GET, HEAD"}
            )
        elif scope["path"] == "/metrics":
            response = await self.metrics(
                request.headers.get("accept", ""), request.headers.get("accept-encoding", "")
            )
        elif scope["path"] == "/":
            collector, rows = self.overview()
            response = HTMLResponse(overview_html(collector, rows, time.time()))
        else:
            response = PlainTextResponse("forbidden: see /metrics\n", status_code=403)
        await response(scope, receive, send)

    async def body(self, accept: str) -> tuple[bytes, str]:
        """The scrape's body in the format `accept` asks for, and its content type."""
        encoder, content_type = choose_encoder(accept)
        own = await self.own.render_async(content_type, encoder)
        if self.fleet is None:
            return own, content_type
        fleet = await self.fleet.pieces(content_type, encoder)
        if own.endswith(EOF_LINE):
            return b"".join((own[: -len(EOF_LINE)], *fleet, EOF_LINE)), content_type
        return b"".join((own, *fleet)), content_type

    async def metrics(self, accept: str, accept_encoding: str) -> Response:
        body, content_type = await self.body(accept)
        headers: dict[str, Any] = {"Content-Type": content_type, "Vary": "Accept-Encoding"}
        if len(body) > CHUNK // 4 and "gzip" in accept_encoding.lower():
            # Level 1: most of the gain on such repetitive text, at the least CPU.
            body = await asyncio.to_thread(gzip.compress, body, 1)
            headers["Content-Encoding"] = "gzip"
        if len(body) <= CHUNK:
            return Response(body, headers=headers)
        return StreamingResponse(_chunks(body), headers=headers)
