"""Each server's latest statistics, kept in memory for the exporter.

The collector calls :meth:`Latest.update` with every snapshot it fetched,
before the spools go to the repository; the exporter reads
:meth:`Latest.view` (or :meth:`Latest.servers`) at scrape time.  Only what
:data:`~pgfleet.collector.exporter.views.VIEWS` exports is parsed and kept.

Work is done only when someone looks: ``update`` keeps the bytes of the
sources the exporter reads, as they are, and the snapshot is parsed when the
renderer first asks for the server (ahead of the next scrape, or at it: see
rendered.py).  A snapshot followed by another before the renderer asks is
never parsed at all (a server snapshotted every 5 s and scraped every 15 s,
left to the scrape, is parsed once in three).  The bytes waiting so are bounded by
``max_pending``: past it, ``update`` parses at once, as if asked.  Every
change of what a server shows bumps its generation (:meth:`Latest.generations`),
so that the renderer knows what changed without parsing anything.

Counters are exported *monotonic*: an entry's value is the sum of its
non-negative increments since it was first seen, its first value counting
whole, over the snapshots parsed (those a scrape asked for).  When a raw
counter goes backwards, or the entry's epoch column (``stats_reset``,
pg_stat_statements' ``stats_since``) changes, the increment is the new raw
value.  Until an entry's first reset the exported value is the
raw one, exactly.  A reset therefore never shows up as a drop, and
``rate()``/``increase()`` see through it.

Capped views (statements, tables, indexes) export the entries ranked highest
by cumulative activity (View.rank).  Counter state is kept only for entries
exported: those that stop being exported -- out of the top, vanished from the
server, or their source failed this time -- keep their state for
:data:`RETAIN` seconds so that a return, even after a reset, does not drop.

A server whose snapshot failed altogether (:meth:`Latest.down`: unreachable,
timed out) shows nothing until its next snapshot: its last values are not
fresh, and the collector's health families (``pgfleet_up``, the last
snapshot's time) say why.  Its counter state is kept, as for a source that
failed.  Users' sources that declare exported columns are parsed alongside
the built-in ones (see :mod:`.custom`).
"""

from __future__ import annotations

import dataclasses
import functools
import heapq
import itertools
import math
import operator
import re
import sys
import threading
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from pgfleet.collector.exporter import custom
from pgfleet.collector.exporter.custom import CustomView
from pgfleet.collector.exporter.views import VIEWS, View
from pgfleet.datasources import builtin
from pgfleet.log import EventLogger
from pgfleet.snapshot.model import ServerInfo, Staged

log = EventLogger("exporter")

# Seconds an entry no longer exported keeps its counter state.
RETAIN = 3600.0
# Bytes of snapshots kept unparsed until a scrape asks for them, fleet-wide:
# some 50 servers' worth of 2,000 pg_stat_statements entries.
PENDING_BYTES = 32 << 20

NAN = math.nan
_NULL = b"\\N"
_NOTHING = frozenset((b"0", _NULL))


class Row:
    """One entry of a view: its label values, then its values in View.series order."""

    __slots__ = ("epoch", "info", "labels", "raw", "seen", "values")

    def __init__(
        self,
        labels: tuple[str, ...],
        values: array[float],
        raw: array[float] | None,
        epoch: bytes | None,
        info: str | None,
        seen: float,
    ) -> None:
        self.labels = labels
        # Exported values: monotonic counters first, then gauges; NaN for NULL.
        self.values = values
        # The raw counters last seen, when they differ from the exported
        # ones (after a reset); None saves the memory otherwise.
        self.raw = raw
        self.epoch = epoch
        self.info = info
        self.seen = seen


@dataclass(frozen=True)
class ServerView:
    """What the exporter shows of one server: rows per view, by VIEWS index."""

    alias: str
    taken_at: float
    version_num: int
    in_recovery: bool
    rows: tuple[list[Row], ...]
    # Users' sources: each exporting one's declaration and rows, by module.
    custom: tuple[tuple[CustomView, list[Row]], ...] = ()


# -- COPY text format ---------------------------------------------------------

_ESCAPE = re.compile(rb"\\(?:([0-7]{1,3})|x([0-9A-Fa-f]{1,2})|(.))", re.DOTALL)
_SIMPLE = {b"b": b"\b", b"f": b"\f", b"n": b"\n", b"r": b"\r", b"t": b"\t", b"v": b"\v"}


def _unescape_one(m: re.Match[bytes]) -> bytes:
    if m[1] is not None:
        return bytes((int(m[1], 8) & 0xFF,))
    if m[2] is not None:
        return bytes((int(m[2], 16),))
    return _SIMPLE.get(m[3], m[3])


def copy_text(field: bytes) -> str:
    """A COPY text field as a string, NULL as ''."""
    if field == _NULL:
        return ""
    if b"\\" in field:
        field = _ESCAPE.sub(_unescape_one, field)
    return field.decode("utf-8", "replace")


def _num(field: bytes) -> float:
    return NAN if field == _NULL else float(field)


def _bool(field: bytes) -> float:
    return NAN if field == _NULL else float(field == b"t")


def copy_time(field: bytes) -> float:
    """A COPY timestamptz as Unix seconds; NaN for NULL, infinity or a non-ISO DateStyle."""
    try:
        return NAN if field == _NULL else datetime.fromisoformat(field.decode()).timestamp()
    except ValueError:
        return NAN


_PARSERS: dict[str, Callable[[bytes], float]] = {"num": _num, "bool": _bool, "time": copy_time}


# -- Views compiled against their datasource's columns -----------------------


@dataclass(frozen=True)
class _Compiled:
    index: int  # in VIEWS
    view: View
    ncols: int
    labels: tuple[int, ...]
    values: tuple[tuple[int, float, Callable[[bytes], float]], ...]
    # (value index, divisor column): Series.divide.
    ratios: tuple[tuple[int, int], ...]
    ncounters: int
    maxed: tuple[bool, ...]  # per value: merged with max rather than sum
    epoch: int | None
    where: tuple[int, bytes, bool] | None
    rank: tuple[int, ...]
    info: tuple[int, int, bool] | None  # column, characters kept, read at every snapshot
    # Label columns do not identify a row: rows sharing them merge.
    merge: bool
    # A split row's label fields, and its value fields, as tuples.
    key: Callable[[list[bytes]], tuple[bytes, ...]]
    raw_values: Callable[[list[bytes]], tuple[bytes, ...]]

    def parse(self, f: list[bytes]) -> list[float]:
        vals = [p(f[i]) * scale for i, scale, p in self.values]
        for j, d in self.ratios:
            divisor = _num(f[d])
            vals[j] = vals[j] / divisor if divisor else NAN
        return vals


def _getter(columns: Sequence[int]) -> Callable[[list[bytes]], tuple[bytes, ...]]:
    """The fields at ``columns`` of a split row, as a tuple (itemgetter's, at any length)."""
    if not columns:
        return lambda f: ()
    if len(columns) == 1:
        (i,) = columns
        return lambda f: (f[i],)
    return operator.itemgetter(*columns)


def _compile(index: int, view: View) -> _Compiled:
    ds = builtin()[view.module]
    # COPY rows are srvid, ts, then the declared columns.
    pos = {c.name: 2 + i for i, c in enumerate(ds.columns)}
    labels = tuple(pos[c] for _, c in view.labels)
    identified = {c for _, c in view.labels}
    where = None
    if view.where is not None:
        col, value, equal = view.where
        where = (pos[col], value.encode(), equal)
        if equal:
            identified.add(col)
    epoch = ds.names("epoch")
    info = None
    if view.info is not None:
        info = (pos[view.info[2]], view.info[4], view.info_moves)
    if view.cap is not None and not view.rank:
        raise ValueError(f"{view.module}: a capped view needs rank columns")
    merge = not set(ds.names("key")) <= identified
    ratios = tuple((j, pos[s.divide]) for j, s in enumerate(view.series) if s.divide)
    if ratios and (merge or any(j < len(view.counters) for j, _ in ratios)):
        raise ValueError(f"{view.module}: a ratio is a gauge of a view that merges nothing")
    return _Compiled(
        index=index,
        view=view,
        ncols=2 + len(ds.columns),
        labels=labels,
        values=tuple((pos[s.column], s.scale, _PARSERS[s.parse]) for s in view.series),
        ratios=ratios,
        ncounters=len(view.counters),
        maxed=tuple(s.merge == "max" for s in view.series),
        epoch=pos[epoch[0]] if epoch else None,
        where=where,
        rank=tuple(pos[c] for c in view.rank),
        info=info,
        merge=merge,
        key=_getter(labels),
        raw_values=_getter([pos[s.column] for s in view.series]),
    )


@functools.cache
def _sources() -> dict[str, tuple[_Compiled, ...]]:
    out: dict[str, list[_Compiled]] = {}
    for i, view in enumerate(VIEWS):
        out.setdefault(view.module, []).append(_compile(i, view))
    return {m: tuple(cs) for m, cs in out.items()}


def _lines(data: bytes) -> list[bytes]:
    # Tabs and newlines inside values are escaped: splitting is parsing.
    lines = data.split(b"\n")
    if lines and not lines[-1]:
        lines.pop()
    return lines


def _filter(cv: _Compiled, fields: list[list[bytes]]) -> list[list[bytes]]:
    if cv.where is None:
        return fields
    i, value, equal = cv.where
    return [f for f in fields if (f[i] == value) is equal]


def _ranks(cv: _Compiled, lines: list[bytes]) -> list[float]:
    """Each line's rank: the sum of its rank columns, NULL counting 0."""
    ncols = cv.ncols
    # Split off the end of the line only: the query text stays in one piece.
    cut = ncols - min(cv.rank)
    offsets = [i - ncols for i in cv.rank]
    if len(offsets) == 2:  # pg_stat_statements and indexes: the hot loop, unrolled
        a, b = offsets
        try:
            out = []
            for line in lines:
                f = line.rsplit(b"\t", cut)
                out.append(float(f[a]) + float(f[b]))
            return out
        except ValueError:  # a NULL: the general case below
            pass
    fields = _getter(offsets)
    out = []
    for line in lines:
        r = 0.0
        for v in fields(line.rsplit(b"\t", cut)):
            if v != _NULL:
                r += float(v)
        out.append(r)
    return out


def _top(cv: _Compiled, lines: list[bytes], cap: int) -> list[list[bytes]]:
    """The ``cap`` most active rows that pass the view's filter, split, most active first.

    pg_stat_statements has thousands of rows of some 30 columns, a query text
    among them, and we keep a hundred: rank every row on its rank columns
    alone, and split whole only the winners.  Ties go to the later row.
    """
    if cap <= 0:
        return []
    ranks = _ranks(cv, lines)
    # Highest rank first and, among equals, the later row first: nlargest
    # keeps the order of equals, so it is given the rows from the last.
    rows = range(len(lines) - 1, -1, -1)
    want = cap
    while True:
        out: list[list[bytes]] = []
        for n in heapq.nlargest(want, rows, key=ranks.__getitem__):
            line = lines[n]
            if cv.where is not None:
                i, value, equal = cv.where
                # Split as far as the filter's column first: a row left out
                # (a nested statement) is not worth splitting whole.
                if (line.split(b"\t", i + 1)[i] == value) is not equal:
                    continue
            out.append(line.split(b"\t"))
            if len(out) == cap:
                return out
        if want >= len(lines):
            return out
        want *= 4  # the filter left out too many: look further down


def _read(st: Staged) -> bytes:
    spool = st.spool
    if spool.closed:
        return b""
    end = spool.tell()
    try:
        spool.seek(0)
        return spool.read(end)
    finally:
        # The writer copies the spool from here afterwards: leave it as found.
        spool.seek(end)


def _merge(into: list[float], vals: list[float], maxed: tuple[bool, ...]) -> None:
    for j, v in enumerate(vals):
        if v != v:
            continue
        cur = into[j]
        if cur != cur:
            into[j] = v
        elif maxed[j]:
            into[j] = max(cur, v)
        else:
            into[j] = cur + v


def _info(field: bytes, chars: int) -> str:
    # Enough bytes for `chars` characters even after collapsing whitespace.
    s = copy_text(field[: chars * 4 + 64])
    return " ".join(s.split())[:chars]


@dataclass(frozen=True)
class _Pending:
    """A snapshot not parsed yet: what ``update`` was given, as bytes."""

    generation: int
    taken_at: float
    info: ServerInfo
    spools: dict[str, bytes]  # per module the exporter reads
    caps: dict[str, int]  # at the time of the update
    size: int
    # Users' sources that export columns: each one's declaration and bytes.
    custom: dict[str, tuple[CustomView, bytes]]


class Latest:
    """Per server alias, the latest values of the built-in sources."""

    def __init__(
        self,
        *,
        max_statements: int = 20,
        max_tables: int = 20,
        max_pending: int = PENDING_BYTES,
    ) -> None:
        self._caps = {"statements": max_statements, "tables": max_tables}
        self.max_pending = max_pending
        # Per server: the generation of its view, and the view.
        self._servers: dict[str, tuple[int, ServerView]] = {}
        self._pending: dict[str, _Pending] = {}
        self._pending_bytes = 0
        # Per server, per view: the rows exported, and those retired that
        # still have counter state worth keeping; for users' sources, per module.
        self._kept: dict[str, list[dict[tuple[str, ...], Row]]] = {}
        self._kept_custom: dict[str, dict[str, dict[tuple[str, ...], Row]]] = {}
        self._generation = itertools.count(1)
        self._stats: Counter[str] = Counter()
        # Guards the dictionaries above; held briefly, never while parsing.
        self._lock = threading.Lock()
        # Held while parsing, so that a server's snapshots are parsed in
        # order, and ``forget``/``configure`` wait for a parse under way.
        self._parsing = threading.Lock()

    @property
    def max_statements(self) -> int:
        return self._caps["statements"]

    @property
    def max_tables(self) -> int:
        return self._caps["tables"]

    def configure(self, *, max_statements: int, max_tables: int) -> None:
        """Change the caps; lowering one applies at once, raising one at the next snapshot."""
        caps = {"statements": max_statements, "tables": max_tables}
        with self._parsing, self._lock:
            self._caps = caps
            for alias, (_, srv) in self._servers.items():
                rows = tuple(
                    r[: caps[v.cap]] if v.cap is not None else r
                    for v, r in zip(VIEWS, srv.rows, strict=True)
                )
                self._servers[alias] = (
                    next(self._generation),
                    ServerView(
                        srv.alias, srv.taken_at, srv.version_num, srv.in_recovery, rows, srv.custom
                    ),
                )

    def forget(self, alias: str) -> None:
        """The server left the fleet: its series vanish from the next scrape."""
        with self._parsing, self._lock:
            self._servers.pop(alias, None)
            self._kept.pop(alias, None)
            self._kept_custom.pop(alias, None)
            pending = self._pending.pop(alias, None)
            if pending is not None:
                self._pending_bytes -= pending.size

    def down(self, alias: str) -> None:
        """The server's snapshot failed: its series vanish until its next snapshot.

        Its counter state stays (for :data:`RETAIN` seconds), so that its
        counters go on from where they were when it is back.
        """
        with self._parsing, self._lock:
            self._servers.pop(alias, None)
            pending = self._pending.pop(alias, None)
            if pending is not None:
                self._pending_bytes -= pending.size
                self._stats["skipped"] += 1

    def generations(self) -> dict[str, int]:
        """Every server's generation, by alias: it changes whenever its view does.

        Nothing is parsed: a pending snapshot has its generation already.
        """
        with self._lock:
            out = {alias: gen for alias, (gen, _) in self._servers.items()}
            out |= {alias: p.generation for alias, p in self._pending.items()}
        return {alias: out[alias] for alias in sorted(out)}

    def view(self, alias: str) -> tuple[int, ServerView] | None:
        """The server's latest view and its generation, parsing its latest snapshot if need be.

        Views and their rows are never modified once published (updates and
        reloads publish new ones), so the caller may read them in any thread.
        """
        self._parse(alias)
        with self._lock:
            return self._servers.get(alias)

    def servers(self) -> list[ServerView]:
        """Every server's latest view, by alias (see :meth:`view`)."""
        views = (self.view(alias) for alias in self.generations())
        return [v[1] for v in views if v is not None]

    def get_stats(self) -> dict[str, int]:
        """Snapshots given, parsed, and skipped (superseded before any scrape asked)."""
        with self._lock:
            return {**self._stats, "pending_bytes": self._pending_bytes}

    def update(
        self, alias: str, taken_at: float, info: ServerInfo, staged: Sequence[Staged]
    ) -> None:
        """Take a snapshot's values: called right after the fetch, before the store."""
        sources = _sources()
        known = builtin()
        spools = {
            st.source.module: _read(st)
            for st in staged
            if st.source.module in sources
            and not st.source.added_manually
            and st.source.module in known
        }
        declared = custom.views(tuple(st.source for st in staged if st.source.exports))
        users = {
            st.source.module: (declared[st.source.module], _read(st))
            for st in staged
            if st.source.module in declared
        }
        size = sum(map(len, spools.values())) + sum(len(data) for _, data in users.values())
        with self._lock:
            pending = _Pending(
                next(self._generation), taken_at, info, spools, dict(self._caps), size, users
            )
            old = self._pending.pop(alias, None)
            if old is not None:
                self._pending_bytes -= old.size
                self._stats["skipped"] += 1
            self._pending[alias] = pending
            self._pending_bytes += size
            self._stats["updates"] += 1
            over = self._pending_bytes > self.max_pending
        if over:
            self._parse(alias)

    def _parse(self, alias: str) -> None:
        """Parse the server's pending snapshot, if it has one, and publish its view."""
        with self._parsing:
            with self._lock:
                pending = self._pending.pop(alias, None)
                if pending is None:
                    return
                self._pending_bytes -= pending.size
                # Lowering a cap applies at once, raising one at the next snapshot.
                caps = {k: min(v, self._caps[k]) for k, v in pending.caps.items()}
                kept = self._kept.get(alias) or [{} for _ in VIEWS]
                kept_custom = self._kept_custom.get(alias, {})
            try:
                view, new_kept = _parse(alias, pending, caps, kept)
            except Exception:
                # The exporter's loss, not the snapshot's: the previous view stays.
                log.exception("latest values not parsed for the exporter", server=alias)
                return
            users, new_custom = _parse_custom(alias, pending, kept_custom)
            if users:
                view = dataclasses.replace(view, custom=users)
            with self._lock:
                self._servers[alias] = (pending.generation, view)
                self._kept[alias] = new_kept
                if new_custom:
                    self._kept_custom[alias] = new_custom
                else:
                    self._kept_custom.pop(alias, None)
                self._stats["parsed"] += 1


def _parse(
    alias: str,
    pending: _Pending,
    caps: dict[str, int],
    kept: list[dict[tuple[str, ...], Row]],
) -> tuple[ServerView, list[dict[tuple[str, ...], Row]]]:
    """A snapshot's view, and the counter state to keep, given the state kept so far."""
    sources = _sources()
    taken_at = pending.taken_at
    rows: list[list[Row]] = [[] for _ in VIEWS]
    new_kept: list[dict[tuple[str, ...], Row]] = [{} for _ in VIEWS]
    for module, data in pending.spools.items():
        lines = _lines(data)
        split: list[list[bytes]] | None = None
        for cv in sources[module]:
            if cv.view.cap is not None:
                fields = _top(cv, lines, caps[cv.view.cap])
            else:
                if split is None:
                    split = [line.split(b"\t") for line in lines]
                fields = _filter(cv, split)
            rows[cv.index] = _rows(cv, fields, kept[cv.index], taken_at)
    for cv in (c for cs in sources.values() for c in cs):
        new = {r.labels: r for r in rows[cv.index]}
        if cv.ncounters:
            cap = caps[cv.view.cap] if cv.view.cap is not None else None
            _retire(kept[cv.index], new, taken_at, cap)
        new_kept[cv.index] = new
    info = pending.info
    view = ServerView(alias, taken_at, info.version_num, info.in_recovery, tuple(rows))
    return view, new_kept


def _parse_custom(
    alias: str, pending: _Pending, kept: dict[str, dict[tuple[str, ...], Row]]
) -> tuple[tuple[tuple[CustomView, list[Row]], ...], dict[str, dict[tuple[str, ...], Row]]]:
    """The users' sources of a snapshot: their rows, and the counter state to keep.

    Each source on its own: one whose rows do not parse is left out (and
    said), not the server's other sources.
    """
    out: list[tuple[CustomView, list[Row]]] = []
    new_kept: dict[str, dict[tuple[str, ...], Row]] = {}
    taken_at = pending.taken_at
    for module, (cv, data) in sorted(pending.custom.items()):
        old = kept.get(module, {})
        try:
            rows = _custom_rows(cv, data, old, taken_at)
        except Exception:
            log.exception("user source not parsed for the exporter", server=alias, source=module)
            rows = []
        new = {r.labels: r for r in rows}
        if cv.ncounters:
            _retire(old, new, taken_at, custom.MAX_ENTRIES)
        new_kept[module] = new
        if rows:
            out.append((cv, rows))
    # A source no longer declared or fetched keeps its state a while, too.
    for module, old in kept.items():
        if module not in new_kept:
            retired: dict[tuple[str, ...], Row] = {}
            _retire(old, retired, taken_at, custom.MAX_ENTRIES)
            if retired:
                new_kept[module] = retired
    return tuple(out), new_kept


def _custom_rows(
    cv: CustomView, data: bytes, kept: dict[tuple[str, ...], Row], taken_at: float
) -> list[Row]:
    """A user's source's rows: entries per label values, their values summed."""
    parsers = [(v.position, _SAFE[v.parse]) for v in cv.values]
    positions = cv.label_positions
    width = cv.width
    entries: dict[tuple[bytes, ...], list[float]] = {}
    maxed = (False,) * len(parsers)
    for line in _lines(data):
        f = line.split(b"\t")
        if len(f) < width:
            continue  # not the shape declared: the repository's COPY refuses it too
        key = tuple(f[i] for i in positions)
        vals = [p(f[i]) for i, p in parsers]
        seen = entries.get(key)
        if seen is not None:
            _merge(seen, vals, maxed)
        elif len(entries) < custom.MAX_ENTRIES:
            entries[key] = vals
    out = []
    for key, vals in entries.items():
        labels = tuple(map(_label, key))
        values, raw = _monotonic(cv.ncounters, False, vals, None, kept.get(labels))
        out.append(Row(labels, values, raw, None, None, taken_at))
    return out


def _safe(parse: Callable[[bytes], float]) -> Callable[[bytes], float]:
    """``parse``, NaN (no sample) for what does not parse: users' values are anybody's."""

    def safe(field: bytes) -> float:
        try:
            return parse(field)
        except ValueError:
            return NAN

    return safe


_SAFE = {kind: _safe(parse) for kind, parse in _PARSERS.items()}


def _retire(
    old: dict[tuple[str, ...], Row],
    new: dict[tuple[str, ...], Row],
    now: float,
    cap: int | None,
) -> None:
    """Carry into ``new`` the rows of ``old`` not exported now but recent enough."""
    retired = [r for k, r in old.items() if k not in new and now - r.seen <= RETAIN]
    if cap is not None and len(retired) > cap:
        retired = heapq.nlargest(cap, retired, key=lambda r: r.seen)
    for r in retired:
        new[r.labels] = r


# Label values already decoded: database, schema, table and role names
# repeat on many rows, snapshots and servers.  Emptied when it grows large.
_LABELS: dict[bytes, str] = {}
_LABELS_MAX = 1 << 16


def _label(field: bytes) -> str:
    got = _LABELS.get(field)
    if got is None:
        if len(_LABELS) >= _LABELS_MAX:
            _LABELS.clear()
        got = _LABELS[field] = sys.intern(copy_text(field))
    return got


def _rows(
    cv: _Compiled,
    fields: list[list[bytes]],
    kept: dict[tuple[str, ...], Row],
    taken_at: float,
) -> list[Row]:
    """One view's rows from the chosen split COPY rows, in their order."""
    epoch_i = cv.epoch
    sparse = cv.view.sparse
    entries: dict[tuple[bytes, ...], tuple[list[float], bytes | None, list[bytes]]] = {}
    key_of = cv.key
    nothing = _NOTHING.issuperset
    raw_values = cv.raw_values
    for f in fields:
        key = key_of(f)
        if sparse and nothing(raw_values(f)) and tuple(map(_label, key)) not in kept:
            continue  # the common case of a sparse view: spare the parsing
        vals = cv.parse(f)
        epoch = f[epoch_i] if epoch_i is not None else None
        seen = entries.get(key) if cv.merge else None
        if seen is None:
            entries[key] = (vals, epoch, f)
        else:
            _merge(seen[0], vals, cv.maxed)
            if epoch is not None and (seen[1] is None or epoch > seen[1]):
                entries[key] = (seen[0], epoch, seen[2])
    out = []
    for key, (vals, epoch, f) in entries.items():
        labels = tuple(map(_label, key))
        prev = kept.get(labels)
        info = None
        if cv.info is not None:
            col, chars, moves = cv.info
            info = prev.info if prev is not None and not moves else _info(f[col], chars)
        values, raw = _monotonic(cv.ncounters, cv.epoch is not None, vals, epoch, prev)
        if sparse and not any(v for v in values if v == v):
            continue
        out.append(Row(labels, values, raw, epoch, info, taken_at))
    return out


def _monotonic(
    n: int, epochs: bool, vals: list[float], epoch: bytes | None, prev: Row | None
) -> tuple[array[float], array[float] | None]:
    """The exported values for raw ``vals`` (``n`` counters first), and the raw
    counters when they differ; ``epochs``: the entries have an epoch column."""
    if prev is None or n == 0:
        return array("d", vals), None
    reset = epochs and epoch != prev.epoch
    last_raw = prev.raw if prev.raw is not None else prev.values
    out = list(vals)
    differs = False
    for j in range(n):
        r = vals[j]
        total = prev.values[j]
        if r != r or total != total:  # NULL now or before: start again from raw
            continue
        last = last_raw[j]
        if reset or r < last:
            out[j] = total + r
        elif total != last:  # an earlier reset's offset
            out[j] = total + (r - last)
        differs = differs or out[j] != r
    return array("d", out), (array("d", vals[:n]) if differs else None)
