"""The fleet's families, rendered one server at a time and kept until it changes.

prometheus_client formats some 10 µs of CPU per series, most of it escaping
label values; a fleet of hundreds of servers has hundreds of thousands of
series, so formatting all of them on every scrape takes seconds.  Yet a
server's values change once per snapshot, and its label values hardly ever.
So each server's families are kept, cut at each family, until the server's
generation changes (see :class:`~pgfleet.collector.exporter.latest.Latest`).

A scrape renders only the servers whose generation changed since the last
scrape in its format: nothing is parsed or rendered for a snapshot no scrape
asks for.  A series' line is what prometheus_client writes up to the value
-- its prefix -- then the value formatted by prometheus_client's own
``floatToGoString``.  The first time a series shows (a statement new in the
top, a new table), its prefix is made from a template: what
prometheus_client wrote, through the very encoder the scraper negotiated,
of one entry per view whose label values were marks, cut at the marks
(:func:`_templates`, once per format); the series' label values, escaped,
go between.  prometheus_client's OpenMetrics encoder escapes each sample's
name one character at a time, so rendering each newcomer through it cost
about as much as laying out all the rest (measured: 8% of the daemon's
CPU).  The templates are checked against prometheus_client's own lines of
awkward label values when made; if they differ, newcomers are rendered by
prometheus_client (a registry holding that server's new entries alone,
their values set to 0.0).  The prefixes are not kept apart from the text:
the next render cuts them out of the server's kept families again, knowing
which line is which series (:func:`_recover`).  That a line is its prefix
then its value is checked once per format with awkward values
(:func:`exact`); a format for which it is not gets whole servers rendered
by prometheus_client each time.  The scrape then lays the kept pieces out
family by family (the formats want each family's samples together, after
one HELP and TYPE).  Nothing of the format is written here but label values,
escaped as prometheus_client was seen to escape them: the rest is only cut
and put in order.

Users' sources (:mod:`.custom`) are rendered whole by prometheus_client
each time, after the built-in families: they are few, and their names are
anybody's, so nothing is assumed of their lines.

Rendering runs on the event loop one server at a time, yielding between
servers: a first scrape renders the whole fleet, which must not hold up the
workers for seconds.  (A thread does worse: rendering is pure Python, and
the workers' many short steps then wait for the GIL at every turn --
measured, the fleet's p99 lag went from 2 s to 8.)

Between scrapes, :meth:`Rendered.ahead` renders the servers that changed in
the formats scraped lately, one at a time and resting after each, so that a
scrape finds most servers ready.  Left to the scrape, a fleet's quarter
minute of snapshots (250 servers of 1,000 at 60 s) is parsed and rendered
in one burst of seconds, during which the workers' steps wait, snapshots
take longer and the places in flight fill up: the fleet fell behind its
schedule by seconds at every scrape.  A server that changes more than once
between two scrapes is left to the scrape, so that rendering ahead never
renders a snapshot no scrape shows, but once per scrape at most.
"""

from __future__ import annotations

import asyncio
import functools
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from pgfleet.collector.exporter.fleet import PLANS, custom_families, families
from pgfleet.collector.exporter.latest import Row, ServerView
from pgfleet.log import EventLogger

log = EventLogger("exporter")

Encoder = Callable[[Collector], bytes]
EOF_LINE = b"# EOF\n"  # OpenMetrics' last line
# A format not scraped for this long is forgotten, with what it kept.
UNUSED = 600.0
# Seconds between two looks for servers to render ahead of the scrape.
AHEAD_PERIOD = 0.5
# Rendering ahead rests this many times as long as each server took: it
# takes a third of the event loop at most, and the workers' steps wait for
# one server's render at most.
AHEAD_REST = 2.0

# One rendered family: its name as the format writes it, header lines, sample lines.
Piece = tuple[bytes, bytes, bytes]
# Where an entry's families are kept: (view index, labels); the server's own
# families (version, recovery) under (-1, ()).
_Key = tuple[int, tuple[str, ...]]
_SERVER: _Key = (-1, ())
# A series' line up to its value, but its label values: the text around
# them, and which goes between (0 the server's alias, then the entry's
# labels, then an info line's text).
_Template = tuple[tuple[bytes, ...], tuple[int, ...]]
# In a label value, what prometheus_client writes for it (checked: _templates).
_ESCAPES = (("\\", "\\\\"), ("\n", "\\n"), ('"', '\\"'))
# Values whose formatting is checked: integers, fractions, where Go and Python
# switch to exponents, negative, tiny, huge.
_AWKWARD = (0.0, 1.0, 0.1, 1.5, -2.0, 123456.0, 1234567.0, 12345678.0, 1e21, 3e-7,
            2.0**53, 2.0**63, 9007199254740993.0, 0.001, 1e-05)  # fmt: skip


class Views(Protocol):
    """Where the servers' views come from: :class:`~pgfleet.collector.exporter.latest.Latest`."""

    def generations(self) -> dict[str, int]: ...

    def view(self, alias: str) -> tuple[int, ServerView] | None: ...


class _One:
    """A collector of one server's view (``custom``: its users' sources only)."""

    def __init__(self, view: ServerView, custom: bool = False) -> None:
        self.view = view
        self.custom = custom

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        if self.custom:
            return custom_families([self.view])
        return families([self.view])


def split(text: bytes) -> list[Piece]:
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


def _render(encoder: Encoder, view: ServerView, custom: bool = False) -> list[Piece]:
    """One server's families (``custom``: its users' only), rendered alone by
    prometheus_client, cut at each family."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_One(view, custom))
    return split(encoder(registry))


class _Probe:
    """A gauge with awkward values, to see how an encoder writes them."""

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        g = GaugeMetricFamily("pgfleet_probe", "Probe.", labels=("l",))
        for i, v in enumerate(_AWKWARD):
            g.add_metric((f'a "b" \\ c\n{i}',), v)
        yield g


def value_line(v: float) -> bytes:
    """A sample's value and the end of its line, as prometheus_client writes them."""
    text: str = floatToGoString(v)  # type: ignore[no-untyped-call]
    return text.encode() + b"\n"


def exact(encoder: Encoder) -> bool:
    """Whether a sample line of ``encoder`` is its text up to the value, then the value."""
    try:
        ((_, _, samples),) = split(encoder(_Probe()))
        lines = samples.splitlines(keepends=True)
        return len(lines) == len(_AWKWARD) and all(
            line.endswith(b" " + value_line(v)) for line, v in zip(lines, _AWKWARD, strict=True)
        )
    except ValueError:
        return False


class _Mismatch(Exception):
    """prometheus_client did not write what the prefixes assume: render whole."""


@dataclass
class _Lines:
    """What prometheus_client wrote for one entry's series, but their values."""

    # Per value, in View.series order; None where no sample showed it yet.
    prefixes: tuple[bytes | None, ...]
    info: bytes | None  # the entry's info line, whole (its value is always 1)
    info_text: str | None


# Per view, its entries in the order laid out: (labels, a bit per value that
# has a sample, info text).  Enough to find each series' line again.
_Layout = tuple[tuple[tuple[tuple[str, ...], int, str | None], ...], ...]


@dataclass
class _Server:
    generation: int
    pieces: list[Piece]
    # The prefixes are not kept apart from the pieces, which hold them
    # already: they are cut out again at the next render (see _recover).
    layout: _Layout
    # Entries laid out before, not now, that may come back.  (The prefixes
    # of series without a sample now, a NULL, are not kept: a fleet's were
    # 17 MB, most of them series that never show; one that shows again has
    # its prefix made again from a template, see _mend.)
    spare: dict[_Key, _Lines]


@dataclass(frozen=True)
class _Templates:
    """How new series' lines start in one format, cut out of prometheus_client's."""

    server: tuple[_Template, ...]  # the server's own families
    # Per view: per value, then its info line's, whole (its value is always 1).
    views: tuple[tuple[tuple[_Template, ...], _Template | None], ...]


@dataclass
class _Format:
    encoder: Encoder
    used: float
    exact: bool
    servers: dict[str, _Server] = field(default_factory=dict)
    # Per family, by (view index, family index): (name, header lines).
    headers: dict[tuple[int, int], tuple[bytes, bytes]] = field(default_factory=dict)
    # How new series' lines start (see _templates); None until checked, and
    # where they were found wrong: prometheus_client renders new series then.
    templates: _Templates | None = None
    checked: bool = False
    # Per server, its generation when last looked at, and how many times it
    # changed since the last scrape; those that changed more than once
    # between the last two scrapes are not rendered ahead.
    seen: dict[str, int] = field(default_factory=dict)
    changes: Counter[str] = field(default_factory=Counter)
    fast: frozenset[str] = frozenset()

    def look(self, generations: dict[str, int]) -> None:
        """Count the servers' changes since the last look."""
        seen = self.seen
        for alias, generation in generations.items():
            if seen.get(alias) != generation:
                seen[alias] = generation
                self.changes[alias] += 1
        if len(seen) > len(generations):
            for alias in [a for a in seen if a not in generations]:
                del seen[alias]


class Rendered:
    """Every server's families, kept per format scraped, rendered again when they change."""

    def __init__(self, latest: Views) -> None:
        self.latest = latest
        self._formats: dict[str, _Format] = {}
        self._stats: Counter[str] = Counter()

    def get_stats(self) -> dict[str, int]:
        """Servers rendered (``renders``; ``ahead``: of those, between scrapes), series
        whose lines were made (``series``), of those, the ones made from templates
        rather than by prometheus_client (``templated``), and among these, of known
        entries, series that had no sample at the server's last render (``mended``)."""
        return dict(self._stats)

    async def pieces(self, content_type: str, encoder: Encoder) -> list[bytes]:
        """Every server's families in `content_type`, laid out family by family."""
        now = time.monotonic()
        for ct in [ct for ct, f in self._formats.items() if now - f.used > UNUSED]:
            del self._formats[ct]
        fmt = self._formats.get(content_type)
        if fmt is None:
            fmt = self._formats[content_type] = _Format(encoder, now, exact(encoder))
        fmt.used = now
        generations = self.latest.generations()
        fmt.look(generations)
        fmt.fast = frozenset(a for a, n in fmt.changes.items() if n > 1)
        fmt.changes.clear()
        for alias in [a for a in fmt.servers if a not in generations]:
            del fmt.servers[alias]  # left the fleet
        for alias, generation in generations.items():
            if self._refresh(fmt, alias, generation):
                await asyncio.sleep(0)  # one server at a time: let the workers run
        by_family: dict[bytes, list[bytes]] = {}
        for alias in generations:
            server = fmt.servers.get(alias)
            if server is None:
                continue  # left the fleet while we rendered
            for name, header, samples in server.pieces:
                got_family = by_family.get(name)
                if got_family is None:
                    by_family[name] = [header, samples]
                elif got_family[0] == header:  # the same object, but for users' families
                    got_family.append(samples)
                # else: a user's family declared otherwise for another server
                # (a declaration changed between their snapshots): left out
                # until this server's next snapshot, lest one family have two types.
        return [piece for pieces in by_family.values() for piece in pieces]

    async def ahead(self, period: float = AHEAD_PERIOD, rest: float = AHEAD_REST) -> None:
        """Render, between scrapes, the servers that changed since, in every format
        scraped lately, resting ``rest`` times as long as each render took; forever."""
        failed = ""
        while True:
            await asyncio.sleep(period)
            if not self._formats:
                continue  # nobody scrapes: nothing is parsed or rendered
            try:
                now = time.monotonic()
                generations = self.latest.generations()
                for fmt in list(self._formats.values()):
                    if now - fmt.used > UNUSED:
                        continue  # forgotten at the next scrape
                    fmt.look(generations)
                    for alias, generation in generations.items():
                        if alias in fmt.fast or fmt.changes[alias] > 1:
                            continue  # changes faster than it is scraped
                        started = time.perf_counter()
                        if self._refresh(fmt, alias, generation):
                            self._stats["ahead"] += 1
                            await asyncio.sleep((time.perf_counter() - started) * rest)
                failed = ""
            except Exception as e:  # the scrape renders what is left, and says why
                if str(e) != failed:
                    log.exception("rendering ahead of the scrape failed")
                failed = str(e)

    def _refresh(self, fmt: _Format, alias: str, generation: int) -> bool:
        """Render the server in ``fmt`` unless it is as new as ``generation``; whether it was."""
        kept = fmt.servers.get(alias)
        # Generations only grow: one rendered ahead meanwhile may be newer.
        if kept is not None and kept.generation >= generation:
            return False
        got = self.latest.view(alias)  # parsed here if need be
        if got is None:
            fmt.servers.pop(alias, None)  # left the fleet since
            return False
        fmt.servers[alias] = self._render(fmt, got[0], got[1], kept)
        self._stats["renders"] += 1
        return True

    def _render(
        self, fmt: _Format, generation: int, view: ServerView, old: _Server | None
    ) -> _Server:
        if fmt.exact:
            try:
                try:
                    lines = _recover(old) if old is not None and old.layout else {}
                except (StopIteration, ValueError) as e:  # pieces not as laid out
                    raise _Mismatch(str(e)) from e
                shown = self._lines(fmt, view, lines)
                pieces, layout = _compose(fmt, view, shown)
                if view.custom:
                    # After the built-in ones: _recover reads those alone.
                    pieces += _render(fmt.encoder, view, custom=True)
                # Entries no longer shown often come back (the top moves,
                # backends change state): keep the prefixes of a few.
                spare: dict[_Key, _Lines] = {}
                room = len(shown) // 4 + 16
                for key, got in lines.items():
                    if len(spare) >= room:
                        break
                    if key not in shown:
                        spare[key] = got
                return _Server(generation, pieces, layout, spare)
            except _Mismatch as e:
                log.warning("rendering whole servers from now on", reason=str(e))
                fmt.exact = False
        return _Server(generation, _render(fmt.encoder, view), (), {})

    def _lines(self, fmt: _Format, view: ServerView, old: dict[_Key, _Lines]) -> dict[_Key, _Lines]:
        """The prefixes of every series of ``view``: known ones, and the others rendered."""
        lines: dict[_Key, _Lines] = {}
        new: list[list[Row]] = [[] for _ in view.rows]
        # Known entries with a series to show whose line is not known.
        gaps: list[tuple[int, Row, _Lines]] = []
        for vi, rows in enumerate(view.rows):
            for row in rows:
                key = (vi, row.labels)
                got = old.get(key)
                if got is None or got.info_text != row.info:
                    new[vi].append(row)
                elif None in got.prefixes and _unknown(got.prefixes, row.values):
                    gaps.append((vi, row, got))
                else:
                    lines[key] = got
        server = old.get(_SERVER)
        if server is not None and not any(new) and not gaps:
            lines[_SERVER] = server
            return lines
        if not fmt.checked:
            fmt.templates = _templates(fmt)
            fmt.checked = True
        if fmt.templates is not None:
            mended = _mend(fmt.templates, view.alias, gaps, lines)
            made = _fill(fmt.templates, view.alias, new, lines) + mended
            self._stats["mended"] += mended
            self._stats["series"] += made
            self._stats["templated"] += made
            return lines
        for vi, row, _ in gaps:
            new[vi].append(row)
        # Render the others with every value 0.0, so that every series shows.
        zeros = tuple(
            [Row(r.labels, array("d", bytes(8 * len(r.values))), None, None, r.info, 0.0)
             for r in rows]
            for rows in new
        )  # fmt: skip
        probe = ServerView(view.alias, 0.0, 0, False, zeros)
        pieces = iter(_render(fmt.encoder, probe))
        self._stats["series"] += _take(fmt, pieces, lines, probe)
        if next(pieces, None) is not None:
            raise _Mismatch("more families than expected")
        return lines


def _unknown(prefixes: tuple[bytes | None, ...], values: array[float]) -> bool:
    """Whether a value to show has no prefix known."""
    return any(p is None and v == v for p, v in zip(prefixes, values, strict=True))


def _cut(line: bytes) -> bytes:
    """A sample line up to its value (which holds no space; exact checked)."""
    return line[: line.rindex(b" ") + 1]


@functools.cache
def _targets(vi: int) -> list[list[int]]:
    """Per family of view ``vi``, the indexes of the values it shows."""
    plan = PLANS[vi]
    return [
        [t for t, (fi, _, _) in enumerate(plan.targets) if fi == f]
        for f in range(len(plan.families))
    ]


def _recover(old: _Server) -> dict[_Key, _Lines]:
    """The prefixes of what ``old``'s pieces show, cut out of them; then its spare ones."""
    pieces = iter(old.pieces)
    out: dict[_Key, _Lines] = {}
    server = tuple(_cut(next(pieces)[2]) for _ in range(2))
    out[_SERVER] = _Lines(server, None, None)
    for vi, entries in enumerate(old.layout):
        if not entries:
            continue
        masks = [mask for _, mask, _ in entries]
        prefixes: list[list[bytes | None]] = [[None] * len(PLANS[vi].targets) for _ in entries]
        for ts in _targets(vi):
            if len(ts) == 1:  # most families: one value each
                (t,) = ts
                shown = [p for p, mask in zip(prefixes, masks, strict=True) if mask >> t & 1]
                if shown:
                    for p, line in zip(shown, next(pieces)[2].split(b"\n"), strict=False):
                        p[t] = line[: line.rindex(b" ") + 1]
                continue
            bits = sum(1 << t for t in ts)
            if not any(mask & bits for mask in masks):
                continue  # no sample: the family was left out
            lines = iter(next(pieces)[2].split(b"\n"))
            for p, mask in zip(prefixes, masks, strict=True):
                for t in ts:
                    if mask >> t & 1:
                        p[t] = _cut(next(lines))
        infos: list[bytes | None] = [None] * len(entries)
        if any(text is not None for _, _, text in entries):
            lines = iter(next(pieces)[2].split(b"\n"))
            for i, (_, _, text) in enumerate(entries):
                if text is not None:
                    infos[i] = next(lines) + b"\n"
        for (labels, _, text), p, info in zip(entries, prefixes, infos, strict=True):
            out[(vi, labels)] = _Lines(tuple(p), info, text)
    for key, got in old.spare.items():
        out.setdefault(key, got)
    return out


def _prefixes(samples: bytes, count: int) -> list[bytes]:
    """The sample lines of a family rendered with 0.0 for value, cut before the value."""
    lines = samples.split(b"\n")
    if len(lines) != count + 1 or lines[-1]:
        raise _Mismatch("unexpected sample lines")
    zero = b" " + value_line(0.0)[:-1]
    out = []
    for line in lines[:-1]:
        if not line.endswith(zero):
            raise _Mismatch("a sample line does not end with its value")
        out.append(line[: len(line) - len(zero) + 1])
    return out


def _take(
    fmt: _Format, pieces: Iterator[Piece], lines: dict[_Key, _Lines], probe: ServerView
) -> int:
    """Read the probe's families into ``lines`` (and their headers); how many series."""

    def family(key: tuple[int, int]) -> bytes:
        piece = next(pieces, None)
        if piece is None:
            raise _Mismatch("fewer families than expected")
        name, header, samples = piece
        fmt.headers[key] = (name, header)
        return samples

    # The server's own families: one sample each.
    server = [p for k in (0, 1) for p in _prefixes(family((-1, k)), 1)]
    lines[_SERVER] = _Lines(tuple(server), None, None)
    count = 2
    for vi, rows in enumerate(probe.rows):
        if not rows:
            continue
        plan = PLANS[vi]
        prefixes: list[list[bytes]] = [[b""] * len(plan.targets) for _ in rows]
        for fi, ts in enumerate(_targets(vi)):
            got = iter(_prefixes(family((vi, fi)), len(rows) * len(ts)))
            for p in prefixes:
                for t in ts:
                    p[t] = next(got)
            count += len(rows) * len(ts)
        infos: list[bytes | None] = [None] * len(rows)
        with_info = [i for i, r in enumerate(rows) if r.info is not None]
        if plan.info is not None and with_info:
            samples = family((vi, len(plan.families)))
            got_info = samples.split(b"\n")
            if len(got_info) != len(with_info) + 1 or got_info[-1]:
                raise _Mismatch("unexpected info lines")
            for i, line in zip(with_info, got_info, strict=False):
                infos[i] = line + b"\n"
            count += len(with_info)
        for row, p, info in zip(rows, prefixes, infos, strict=True):
            lines[(vi, row.labels)] = _Lines(tuple(p), info, row.info)
    return count


def _mark(i: int) -> str:
    """A label value that says where label ``i`` goes: NUL escapes to itself."""
    return f"\0{i}\0"


def _probe(alias: str, labels: Callable[[int, int], str], entries: int) -> ServerView:
    """A view with up to ``entries`` entries per view, every value 0.0 and every
    info there, label ``j`` of entry ``e`` ``labels(e, j)`` (the info's: j after the last)."""
    rows = []
    for plan in PLANS:
        n = len(plan.labels) - 1
        zeros = array("d", bytes(8 * len(plan.targets)))
        rows.append(
            [
                Row(
                    tuple(labels(e, j) for j in range(n)),
                    zeros,
                    None,
                    None,
                    labels(e, n) if plan.info is not None else None,
                    0.0,
                )
                for e in range(entries if n else 1)
            ]
        )
    return ServerView(alias, 0.0, 0, False, tuple(rows))


def _template(text: bytes | None) -> _Template:
    """A line of marked label values (_mark) as a template."""
    if text is None:
        raise _Mismatch("a line missing")
    parts = text.split(b"\0")
    if len(parts) % 2 == 0:
        raise _Mismatch("a label value's mark cut")
    return tuple(parts[0::2]), tuple(int(i) for i in parts[1::2])


def _templates(fmt: _Format) -> _Templates | None:
    """Every series' line start as prometheus_client writes it in ``fmt``, but its label
    values; None if it writes lines of awkward label values otherwise."""
    marked = _probe(_mark(0), lambda e, j: _mark(1 + j), 1)
    lines: dict[_Key, _Lines] = {}
    # Every character prometheus_client escapes, where escapes could mislead.
    awkward = ('a "b" \\ c\nd é \\n"', "\\")
    check = _probe('we"ird\\\n', lambda e, j: awkward[(e + j) % 2] + str(e), 2)
    expected: dict[_Key, _Lines] = {}
    made: dict[_Key, _Lines] = {}
    try:
        _take(fmt, iter(_render(fmt.encoder, marked)), lines, marked)
        templates = _Templates(
            tuple(_template(p) for p in lines[_SERVER].prefixes),
            tuple(
                (
                    tuple(_template(p) for p in got.prefixes),
                    _template(got.info) if got.info is not None else None,
                )
                for got in (lines[(vi, rows[0].labels)] for vi, rows in enumerate(marked.rows))
            ),
        )
        _take(fmt, iter(_render(fmt.encoder, check)), expected, check)
        _fill(templates, check.alias, check.rows, made)
    except (_Mismatch, ValueError, IndexError) as e:
        log.warning("rendering new series with prometheus_client", reason=str(e))
        return None
    if made != expected:
        log.warning("rendering new series with prometheus_client", reason="label values differ")
        return None
    return templates


def _escape(value: str) -> bytes:
    for old, new in _ESCAPES:
        value = value.replace(old, new)
    return value.encode()


def _apply(template: _Template, values: list[bytes]) -> bytes:
    texts, slots = template
    out = [texts[0]]
    for slot, text in zip(slots, texts[1:], strict=True):
        out += (values[slot], text)
    return b"".join(out)


def _fill(
    templates: _Templates, alias: str, new: Sequence[list[Row]], lines: dict[_Key, _Lines]
) -> int:
    """The prefixes of the server's and the ``new`` rows' series into ``lines``; how many."""
    server = [_escape(alias)]
    lines[_SERVER] = _Lines(tuple(_apply(t, server) for t in templates.server), None, None)
    count = 2
    for vi, rows in enumerate(new):
        targets, info = templates.views[vi]
        for row in rows:
            values = server + [_escape(label) for label in row.labels]
            prefixes = tuple([_apply(t, values) for t in targets])
            line = None
            if info is not None and row.info is not None:
                line = _apply(info, [*values, _escape(row.info)])
            lines[(vi, row.labels)] = _Lines(prefixes, line, row.info)
            count += len(prefixes) + (line is not None)
    return count


def _mend(
    templates: _Templates,
    alias: str,
    gaps: list[tuple[int, Row, _Lines]],
    lines: dict[_Key, _Lines],
) -> int:
    """The known entries of ``gaps`` into ``lines``, with the prefixes they lack made; how many."""
    count = 0
    server = [_escape(alias)]
    for vi, row, got in gaps:
        targets, _ = templates.views[vi]
        values = server + [_escape(label) for label in row.labels]
        prefixes = tuple(
            _apply(t, values) if p is None else p
            for t, p in zip(targets, got.prefixes, strict=True)
        )
        count += got.prefixes.count(None)
        lines[(vi, row.labels)] = _Lines(prefixes, got.info, got.info_text)
    return count


def _compose(
    fmt: _Format, view: ServerView, lines: dict[_Key, _Lines]
) -> tuple[list[Piece], _Layout]:
    """``view``'s families, as prometheus_client would render them, from the prefixes."""
    # Many values repeat (0, sizes, settings): each is formatted once.  Keyed
    # so that 0.0 and -0.0, equal as floats, are told apart.
    memo: dict[float | str, bytes] = {}
    headers = fmt.headers
    out: list[Piece] = []
    layout: list[tuple[tuple[tuple[str, ...], int, str | None], ...]] = []
    server = lines[_SERVER].prefixes
    for k, fact in enumerate((view.version_num, view.in_recovery)):
        name, header = headers[(-1, k)]
        prefix = server[k]
        assert prefix is not None
        out.append((name, header, prefix + value_line(float(fact))))
    for vi, rows in enumerate(view.rows):
        if not rows:
            layout.append(())
            continue
        entries: list[tuple[tuple[str, ...], int, str | None]] = []
        plan = PLANS[vi]
        fis = [target[0] for target in plan.targets]
        samples: list[list[bytes]] = [[] for _ in plan.families]
        appends = [s.append for s in samples]
        infos: list[bytes] = []
        # Hot loop: one line per series of a changed server.
        for row in rows:
            kept = lines[(vi, row.labels)]
            mask = 0
            bit = 1
            for fi, prefix, v in zip(fis, kept.prefixes, row.values, strict=True):
                if v == v:  # NaN: NULL in the source, no sample
                    key = v if v else repr(v)
                    line = memo.get(key)
                    if line is None:
                        line = memo[key] = value_line(v)
                    appends[fi](prefix + line)  # type: ignore[operator]  # known: _lines
                    mask |= bit
                bit <<= 1
            if kept.info is not None:
                infos.append(kept.info)
            entries.append((row.labels, mask, row.info))
        layout.append(tuple(entries))
        for fi, got in enumerate(samples):
            if got:
                out.append((*headers[(vi, fi)], b"".join(got)))
        if infos:
            out.append((*headers[(vi, len(plan.families))], b"".join(infos)))
    return out, tuple(layout)
