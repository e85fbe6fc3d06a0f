"""Step 2 of a snapshot: write the spooled rows and take the snapshot, in one transaction.

The spooled rows are COPYed into each source's transient table,
``pgfleet.take_snapshot(srvid, modules)`` stores them (each source in its
own subtransaction), the transient tables are TRUNCATEd, commit.  A crash
anywhere leaves nothing half-written.  The statements themselves are
:mod:`pgfleet.repository.snapshots`'.

Only a source whose own rows the repository refuses (a data exception or a
constraint: :func:`~pgfleet.repository.snapshots.rows_refused`) is left out
and recorded as failed, the others stored.  Any other error -- the
repository read-only, full, a privilege taken away -- fails the whole
snapshot, which the daemon keeps and stores once the repository is itself
again: stored without the source, it would be lost for it.
"""

from __future__ import annotations

import hashlib
import io
import re
import time
from dataclasses import dataclass, field
from typing import Any

import psycopg
from psycopg import sql

from pgfleet.connections import first_line
from pgfleet.datasources import builtin
from pgfleet.repository import snapshots as q
from pgfleet.snapshot import wire
from pgfleet.snapshot.fetch import plan_builtin
from pgfleet.snapshot.model import (
    CHUNK,
    FailureKind,
    ServerInfo,
    SnapshotResult,
    Staged,
)


async def store(
    repo: psycopg.AsyncConnection[Any],
    srvid: int,
    info: ServerInfo | None,
    staged: list[Staged],
    result: SnapshotResult,
    *,
    preloaded: frozenset[str] = frozenset(),
    key: str | None = None,
    clock: tuple[float, float] | None = None,
    purge_interval: float | None = None,
) -> float:
    """Write spooled rows and take the snapshot, in one transaction.

    The whole transaction is one multi-statement query: the snapshot lock,
    a ``COPY ... FROM STDIN`` per source with rows, ``take_snapshot``, the
    fetch failures, the server's facts and the ``TRUNCATE`` of the transient
    tables -- one round trip per COPY, plus one.  Staging rarely fails (a
    user's source whose rows do not fit its transient table): if it does,
    the transaction is rolled back and done again with each COPY under its
    own savepoint, so that the other sources are kept.

    A built-in source whose rows are the same as in the server's previous
    snapshot, which this process stored (the timestamps aside: settings,
    mostly), would write nothing: it is neither staged nor snapshotted, but
    counted as stored -- unless another snapshot of the server was stored
    since (``snapshot_state.snapshots`` says), which costs one more round
    trip when there is such a source.  Its spool is left as it is.

    ``preloaded``: modules whose rows the caller already COPYed into their
    transient tables, in the transaction this one is then a savepoint of.

    ``key``: the snapshot's own (see :class:`~pgfleet.collector.spool.Stamp`),
    claimed in the transaction: a snapshot stored already fails with
    :data:`~pgfleet.repository.snapshots.STORED_ALREADY` instead of going in
    twice.  ``clock``: when it was taken by the repository's clock (start,
    end); rows whose timestamps are more than a minute off are brought to it
    (the server's clock is off).  Return the shift applied, in seconds (0:
    none).  ``purge_interval``: see ``take_snapshot``.
    """
    ph = result.phases
    t = time.perf_counter()
    rows = result.rows
    failures = len(result.failures)
    cached = (repo.info.host, repo.info.port, repo.info.dbname, srvid)
    before = _stored.get(cached)
    digests = _digests(staged, before.busy() if before else set())
    unchanged = {
        m
        for m, d in digests.items()
        if before and before.digests.get(m) == d and m not in preloaded
    }
    stored: _Stored | None = None
    extra = _Extra(key, clock, purge_interval)
    try:
        try:
            async with repo.transaction():
                stored = await _store_script(
                    repo,
                    srvid,
                    info,
                    result,
                    staged,
                    fast=True,
                    unchanged=unchanged,
                    expect=before.snapshots if before else None,
                    preloaded=preloaded,
                    extra=extra,
                )
        except _StagingFailed:
            # Rolled back: nothing of the first attempt is left.
            result.rows = rows
            del result.failures[failures:]
            ph.pop("copy", None)
            loaded: list[Staged] = []
            async with repo.transaction():
                await repo.execute(q.LOCK)
                if key is not None:
                    await repo.execute(q.claim(srvid, key))
                for st in staged:
                    if st.source.module in preloaded:
                        loaded.append(st)
                        continue
                    try:
                        async with repo.transaction():
                            result.rows += await _stage(repo, st)
                        loaded.append(st)
                    except psycopg.Error as e:
                        if not q.rows_refused(e):
                            raise
                        result.fail(
                            st.source.module, FailureKind.STORE, f"cannot store: {first_line(e)}"
                        )
                stored = await _store_script(
                    repo, srvid, info, result, loaded, fast=False, preloaded=preloaded, extra=extra
                )
    except BaseException:
        _stored.pop(cached, None)
        raise
    finally:
        # As the Staged contract says, whatever was read from them.
        for st in staged:
            if not st.spool.closed:
                st.spool.seek(0, io.SEEK_END)
    # Committed, or (in the daemon) part of the caller's transaction: should
    # that fail, the snapshot count will not match next time.
    failed = {f.source for f in result.failures}
    assert stored is not None
    result.rows += sum(digests[m][1] for m in stored.skipped)
    result.unchanged = [m for m in result.stored if m in stored.skipped]
    stored.digests = {m: d for m, d in digests.items() if m not in failed}
    previous = before.changes if before else {}
    stored.changes = {
        m: 0 if m in stored.skipped else previous.get(m, 0) + (m in digests)
        for m in previous.keys() | digests.keys()
    }
    _stored[cached] = stored
    now = time.perf_counter()
    ph["store"] = now - t
    ph["commit"] = now - ph.pop("_end", now)
    return stored.shift


class _StagingFailed(Exception):
    pass


@dataclass(frozen=True)
class _Extra:
    """What the daemon's stores add to a snapshot's statements (see store())."""

    key: str | None = None
    clock: tuple[float, float] | None = None
    purge_interval: float | None = None


@dataclass
class _Stored:
    """What this process last stored of a server: its snapshot count after
    that snapshot, and a digest of each built-in source's rows."""

    snapshots: int
    digests: dict[str, tuple[bytes, int]] = field(default_factory=dict)
    # Per module, the snapshots in a row its rows were found changed.
    changes: dict[str, int] = field(default_factory=dict)
    # The modules this snapshot left out as unchanged.
    skipped: set[str] = field(default_factory=set)
    # Seconds its rows' timestamps were moved by, to the repository's clock.
    shift: float = 0.0

    def busy(self) -> set[str]:
        """Modules not worth a digest this time: changed at each of their
        last few snapshots (a busy server's tables, indexes, predicates).
        Looked at again every few snapshots, in case they quieten down."""
        if self.snapshots % _RECHECK == 0:
            return set()
        return {m for m, n in self.changes.items() if n >= _BUSY}


# Per repository (host, port, dbname) and srvid.
_stored: dict[tuple[str, int, str, int], _Stored] = {}
# Larger spools (pg_stat_statements') are not compared: they always change.
_COMPARED = 256 * 1024


# A source whose rows changed this many snapshots in a row is digested only
# every _RECHECK-th snapshot: a digest is a pass over every row, worth it
# only if the rows may be the same.
_BUSY = 3
_RECHECK = 8


def _digests(
    staged: list[Staged], skip: frozenset[str] | set[str] = frozenset()
) -> dict[str, tuple[bytes, int]]:
    """A digest of the rows of each built-in source that could be unchanged.

    The timestamp (the second field of every row, after srvid) is left out;
    sources with ``delta`` columns are never unchanged (the same non-zero
    delta twice is two rows), nor are user sources (their columns are theirs).
    """
    known = builtin()
    out: dict[str, tuple[bytes, int]] = {}
    for st in staged:
        ds = None if st.source.added_manually else known.get(st.source.module)
        if ds is None or ds.names("delta") or st.spool.closed or st.source.module in skip:
            continue
        size = st.spool.tell()
        if size > _COMPARED:
            continue
        st.spool.seek(0)
        # One pass in C over the rows, not a Python loop over each.
        data = _TIMESTAMP.sub(b"", st.spool.read(size))
        digest = hashlib.blake2b(data, digest_size=16).digest()
        out[st.source.module] = (digest, data.count(b"\n"))
    return out


# A row's first two fields, srvid (the same in every row) and its timestamp,
# which _digests leaves out.  A plain replacement, not a template: re expands
# a template in Python for every row.
_TIMESTAMP = re.compile(rb"^[^\t\n]*\t[^\t\n]*", re.MULTILINE)


async def _store_script(
    repo: psycopg.AsyncConnection[Any],
    srvid: int,
    info: ServerInfo | None,
    result: SnapshotResult,
    loaded: list[Staged],
    *,
    fast: bool,
    unchanged: set[str] | None = None,
    expect: int | None = None,
    preloaded: frozenset[str] = frozenset(),
    extra: _Extra = _Extra(),
) -> _Stored:
    """Run what a snapshot writes as one multi-statement query.

    ``fast``: the snapshot lock (and the claim of the snapshot's key) and the
    COPYs come first in the same query (else the caller took the lock,
    claimed the key and staged ``loaded`` already).
    ``unchanged``: modules to leave out, if the server's snapshot count is
    still ``expect`` (checked under the lock, before the rest is sent).
    ``preloaded``: modules staged already (not COPYed, but TRUNCATEd).
    Return the snapshot count after this snapshot.
    """
    count = q.snapshot_count(srvid)
    locked = not fast
    # Right after the lock: a store of the same snapshot still in flight
    # (one given up on) ends before the claim looks.
    lock: list[tuple[str, sql.Composable]] = [("lock", q.LOCK)]
    if extra.key is not None:
        lock.append(("claim", q.claim(srvid, extra.key)))
    skip: set[str] = set()
    if fast and unchanged and expect is not None:
        results = await _run_script(repo, [*lock, ("count", count)], [])
        locked = True
        if wire.int_value(results[-1]) == expect:
            skip = unchanged
    with_rows = [
        st
        for st in loaded
        if not st.spool.closed and st.spool.tell() and st.source.module not in skip
    ]
    modules = [st.source.module for st in loaded if st.source.module not in skip]
    # (what, statement): "copy" statements are fed from ``copies`` in order;
    # "mark" statements read the server's clock, so that the phases are
    # timed where they run (the results of a multi-statement query reach the
    # client together at the end).
    stmts: list[tuple[str, sql.Composable]] = [("mark", q.MARK)]
    copies: list[Staged] = []
    if not locked:
        stmts += lock
        stmts.append(("mark", q.MARK))
    if fast:
        for st in with_rows:
            if st.source.module in preloaded:
                continue
            stmts.append(("copy", q.copy_in(st.source)))
            copies.append(st)
        stmts.append(("mark", q.MARK))
    if extra.clock is not None and with_rows:
        sources = [st.source.query_source for st in with_rows if st.source.query_source]
        stmts.append(("clamp", q.clamp(sources, extra.clock)))
    # Sources unregistered for this server while it lacks their extension,
    # registered again once they run (migration 0015).
    present = [st.source.module for st in loaded]
    stmts.append(("presence", q.presence(srvid, extension_absent(result), present)))
    stmts.append(("take_snapshot", q.take_snapshot(srvid, modules, extra.purge_interval)))
    stmts.append(("mark", q.MARK))
    stmts.append(("count", count))
    for failure in result.failures:
        stmts.append(("record_error", q.record_error(srvid, failure)))
    # The failures take_snapshot recorded, and what we learnt of the server.
    stmts.append(("state", q.state(srvid, info, [f.source for f in result.failures])))
    stmts.append(("mark", q.MARK))
    # Transient rows only ever live inside this transaction.
    if with_rows:
        stmts.append(("truncate", q.truncate([st.source for st in with_rows])))
        stmts.append(("mark", q.MARK))
    results = await _run_script(repo, stmts, copies, staging=fast)
    ph = result.phases
    clock: float | None = None
    phase = "start"
    snapshots = 0
    shift = 0.0
    for (what, _), res in zip(stmts, results, strict=True):
        if what == "mark":
            at = float(wire.value(res) or 0)
            if clock is not None:
                ph[phase] = at - clock
            clock = at
        elif what == "copy":
            result.rows += max(res.command_tuples or 0, 0)
        elif what == "count":
            snapshots = wire.int_value(res)
        elif what == "clamp":
            shift = float(wire.value(res) or 0)
        elif what == "state":
            result.failures.extend(q.failures(wire.text_rows(res, repo.info.encoding)))
        if what not in ("mark", "claim"):
            phase = what  # (the claim's time counts as the lock's)
    ph["_end"] = time.perf_counter()
    failed = {f.source for f in result.failures}
    result.stored = [st.source.module for st in loaded if st.source.module not in failed]
    return _Stored(snapshots, skipped=skip, shift=shift)


async def _run_script(
    repo: psycopg.AsyncConnection[Any],
    stmts: list[tuple[str, sql.Composable]],
    copies: list[Staged],
    *,
    staging: bool = False,
) -> list[Any]:
    """Run ``stmts`` as one query; raise _StagingFailed if a COPY's rows were refused."""
    query = b";\n".join(stmt.as_bytes(repo) for _, stmt in stmts)
    results, error = await wire.run_script(repo, query, [st.spool for st in copies])
    if error is not None:
        if staging and stmts[len(results)][0] == "copy" and q.rows_refused(error):
            raise _StagingFailed() from error
        raise error
    return results


async def _stage(repo: psycopg.AsyncConnection[Any], st: Staged) -> int:
    """COPY one source's spooled rows into its transient table; return the row count."""
    size = st.spool.tell() if not st.spool.closed else 0
    if size == 0:
        # No rows: nothing to stage or truncate, but the snapshot function
        # still runs (every entry it knew has vanished).
        return 0
    st.spool.seek(0)
    async with repo.cursor().copy(q.copy_in(st.source)) as cp:
        while chunk := st.spool.read(CHUNK):
            await cp.write(chunk)
    return max(cp.cursor.rowcount, 0)


def extension_absent(result: SnapshotResult) -> list[str]:
    """The built-in sources the snapshot skipped because no database of the
    server has their extension (not one it could not reach)."""
    known = builtin()
    out = []
    for module, why in result.skipped:
        ds = known.get(module)
        if (
            ds is not None
            and ds.extension
            and why.startswith(f"extension {ds.extension} is not installed")
            and "could not be" not in why
        ):
            out.append(module)
    return out


async def snapshot_local(repo: psycopg.AsyncConnection[Any]) -> SnapshotResult:
    """Take one local snapshot (srvid 0): the repository monitors itself.

    Each source's query_source function reads local data when called with 0;
    built-in sources that cannot run here (version, missing extension) are
    skipped instead of recorded as failures every time.
    """
    t0 = time.perf_counter()
    result = SnapshotResult("local", 0)
    sources = await q.registered_sources(repo)
    info = await q.local_info(repo)
    known = builtin()
    modules = []
    for src in sources:
        ds = None if src.added_manually else known.get(src.module)
        if ds is not None:
            _, why = plan_builtin(ds, info)
            if why is not None:
                result.skipped.append((src.module, why))
                continue
        modules.append(src.module)
    result.failures.extend(
        await q.take_local_snapshot(repo, info, modules, absent=extension_absent(result))
    )
    failed = {f.source for f in result.failures}
    result.stored = [m for m in modules if m not in failed]
    result.seconds = time.perf_counter() - t0
    return result
