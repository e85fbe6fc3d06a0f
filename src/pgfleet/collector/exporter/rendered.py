"""The fleet's families, rendered one server at a time and kept until it changes.

prometheus_client formats some 7 µs of CPU per series; a fleet of hundreds
of servers has hundreds of thousands, so formatting all of them on every
scrape takes seconds.  Yet a server's values change once per snapshot
(minutes), while Prometheus scrapes every few seconds.  So each server's
families are rendered by prometheus_client itself -- a registry holding
that server alone, through the very encoder the scraper negotiated --
and the text is kept, cut at each family, until the server's next
snapshot.  A scrape then lays the kept pieces out family by family (the
formats want each family's samples together, after one HELP and TYPE):
nothing of the format is written here, only put in order.

Servers are rendered for the formats scraped recently, by :meth:`warm`
in the background, right after their snapshots; a scrape renders only
what changed since then.  Rendering runs on the event loop one server at
a time, yielding between servers: a first scrape renders the whole fleet,
which must not hold up the workers for seconds.  (A thread does worse:
rendering is pure Python, and the workers' many short steps then wait for
the GIL at every turn -- measured, the fleet's p99 lag went from 2 s to 8.)
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from prometheus_client.core import Metric
from prometheus_client.registry import Collector, CollectorRegistry

from pgfleet.collector.exporter.fleet import families
from pgfleet.collector.exporter.latest import Latest, ServerView

Encoder = Callable[[Collector], bytes]
EOF_LINE = b"# EOF\n"  # OpenMetrics' last line
# A format not scraped for this long is no longer rendered in advance.
UNUSED = 600.0


class _One:
    """A collector of one server's view."""

    def __init__(self, view: ServerView) -> None:
        self.view = view

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        return families([self.view])


def split(text: bytes) -> list[tuple[bytes, bytes, bytes]]:
    """Rendered text as (family name, header lines, sample lines) per family."""
    out = []
    # A sample line never holds a newline (label values escape theirs), so
    # "\n# HELP " only ever starts a family.
    parts = (b"\n" + text).split(b"\n# HELP ")[1:]
    for i, part in enumerate(parts):
        if i < len(parts) - 1:
            part += b"\n"  # the one the split took
        name = part[: part.index(b" ")]
        pos = part.index(b"\n") + 1
        while part.startswith(b"# ", pos) and not part.startswith(EOF_LINE, pos):
            pos = part.index(b"\n", pos) + 1
        samples = part[pos:]
        if samples.endswith(EOF_LINE):
            samples = samples[: -len(EOF_LINE)]
        out.append((name, b"# HELP " + part[:pos], samples))
    return out


@dataclass
class _Format:
    encoder: Encoder
    used: float
    # alias -> (the view rendered, its families)
    servers: dict[str, tuple[ServerView, list[tuple[bytes, bytes, bytes]]]]


class Rendered:
    def __init__(self, latest: Latest) -> None:
        self.latest = latest
        self._formats: dict[str, _Format] = {}

    async def _render(self, fmt: _Format, views: list[ServerView]) -> None:
        for view in views:
            fmt.servers[view.alias] = (view, _render(fmt.encoder, view))
            await asyncio.sleep(0)  # one server at a time: let the workers run

    def _stale(self, fmt: _Format, views: list[ServerView]) -> list[ServerView]:
        alive = {v.alias for v in views}
        for alias in [a for a in fmt.servers if a not in alive]:
            del fmt.servers[alias]  # left the fleet
        return [v for v in views if (fmt.servers.get(v.alias) or (None,))[0] is not v]

    async def pieces(self, content_type: str, encoder: Encoder) -> list[bytes]:
        """Every server's families in `content_type`, laid out family by family."""
        fmt = self._formats.get(content_type)
        if fmt is None:
            fmt = self._formats[content_type] = _Format(encoder, 0.0, {})
        fmt.used = time.monotonic()
        views = self.latest.servers()
        await self._render(fmt, self._stale(fmt, views))
        by_family: dict[bytes, list[bytes]] = {}
        for view in views:
            kept = fmt.servers.get(view.alias)
            if kept is None:
                continue  # left the fleet while we rendered
            for name, header, samples in kept[1]:
                got = by_family.get(name)
                if got is None:
                    by_family[name] = [header, samples]
                else:
                    got.append(samples)
        return [piece for pieces in by_family.values() for piece in pieces]

    async def warm(self) -> int:
        """Render the servers that changed, for the formats in use; how many renders."""
        now = time.monotonic()
        for ct in [ct for ct, f in self._formats.items() if now - f.used > UNUSED]:
            del self._formats[ct]
        done = 0
        for fmt in list(self._formats.values()):
            stale = self._stale(fmt, self.latest.servers())
            await self._render(fmt, stale)
            done += len(stale)
        return done


def _render(encoder: Encoder, view: ServerView) -> list[tuple[bytes, bytes, bytes]]:
    """One server's families, rendered alone, cut at each family."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_One(view))
    return split(encoder(registry))
