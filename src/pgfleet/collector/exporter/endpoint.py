"""The collector's HTTP endpoint: ``/metrics``, a ``/`` overview, 403 elsewhere.

A plain ASGI callable rather than a routed framework app: there are two
paths, and everything else must be refused the same way.  ``/metrics`` is
built by prometheus_client from the daemon's memory only (no query at
scrape time): the collector's health from its registry (its families' lines
kept between scrapes, see own.py), the fleet's
statistics from :class:`~pgfleet.collector.exporter.rendered.Rendered` (parsed and
rendered per server between scrapes, or by the scrape that first finds it changed).
The format follows
the scraper's Accept header (OpenMetrics when asked, text 0.0.4 otherwise).
Bodies larger than one chunk go out with ``Transfer-Encoding: chunked``
(uvicorn does so for a response without a length), gzip-compressed when
the scraper accepts it, as Prometheus does -- in a thread, as zlib lets go
of the GIL and a fleet's body is megabytes.  Such a body is never joined
whole: it is sent, or compressed, a megabyte of the kept pieces at a time,
so that a scrape does not add a fleet's body (24 MB for 1,000 servers) and
its compressed copy to the collector's peak memory.

Everything but gzip runs on the event loop, between the workers' awaits:
the collectors read state the loop mutates, and the fleet's servers are
rendered one at a time (see rendered.py).
"""

from __future__ import annotations

import asyncio
import gzip
import html
import time
import zlib
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
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
# Bytes of a large body joined, or compressed, at a time.
BATCH = 1 << 20
# Level 1: most of the gain on such repetitive text, at the least CPU.
GZIP_LEVEL = 1


@dataclass(frozen=True)
class Row:
    """One server of the overview page."""

    alias: str
    state: str
    up: bool | None
    last_snapshot: float | None
    last_error: str | None


def _batches(parts: Sequence[bytes], size: int) -> Iterator[list[bytes]]:
    """``parts`` in runs of about ``size`` bytes (a part longer than that alone)."""
    run: list[bytes] = []
    held = 0
    for part in parts:
        run.append(part)
        held += len(part)
        if held >= size:
            yield run
            run, held = [], 0
    if run:
        yield run


def _pack(packer: Any, run: list[bytes]) -> bytes:
    data: bytes = packer.compress(b"".join(run))
    return data


async def stream(parts: Sequence[bytes], gzipped: bool) -> AsyncIterator[bytes]:
    """The body made of ``parts``, in chunks of about CHUNK bytes, or gzip-compressed
    a BATCH at a time in a thread; never joined whole."""
    if not gzipped:
        for run in _batches(parts, CHUNK):
            yield b"".join(run)
        return
    packer = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, 16 + zlib.MAX_WBITS)  # gzip's wrapping
    for run in _batches(parts, BATCH):
        out = await asyncio.to_thread(_pack, packer, run)
        if out:
            yield out
    yield packer.flush()


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

    async def parts(self, accept: str) -> tuple[list[bytes], str]:
        """The scrape's body in the format `accept` asks for, in parts, and its content type."""
        encoder, content_type = choose_encoder(accept)
        own = await self.own.render_async(content_type, encoder)
        if self.fleet is None:
            return [own], content_type
        fleet = await self.fleet.pieces(content_type, encoder)
        if own.endswith(EOF_LINE):
            return [own[: -len(EOF_LINE)], *fleet, EOF_LINE], content_type
        return [own, *fleet], content_type

    async def metrics(self, accept: str, accept_encoding: str) -> Response:
        parts, content_type = await self.parts(accept)
        size = sum(map(len, parts))
        headers: dict[str, Any] = {"Content-Type": content_type, "Vary": "Accept-Encoding"}
        gzipped = size > CHUNK // 4 and "gzip" in accept_encoding.lower()
        if gzipped:
            headers["Content-Encoding"] = "gzip"
        if size > CHUNK:
            return StreamingResponse(stream(parts, gzipped), headers=headers)
        body = b"".join(parts)
        if gzipped:
            body = await asyncio.to_thread(gzip.compress, body, GZIP_LEVEL)
        return Response(body, headers=headers)
