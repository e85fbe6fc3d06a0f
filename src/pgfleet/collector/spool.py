"""Snapshots waiting on disk for the repository, stored later in order.

One file per snapshot, ``<seq>-<srvid>.snap``: a JSON header line (server,
when, what the server said about itself, per-source errors, its
:class:`Stamp`, and each source with the size of its rows), then every
source's rows in COPY text format, back to back.  It is written under a temporary name, fsync'ed and
renamed, so a crash leaves either the whole snapshot or nothing.  ``seq``
grows with every snapshot of the process and survives restarts (it is read
back from the names), so the files' order is the order snapshots were
taken: the repository computes deltas against the last stored values, and a
server's snapshots must reach it strictly in order.

The spool is bounded: past ``max_bytes`` the oldest snapshots (of any
server) are dropped, and counted.  A lock file keeps two collectors from
sharing one directory.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import secrets
import shutil
import socket
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from pgfleet.errors import ConfigError, PgfleetError
from pgfleet.snapshot.model import (
    Failure,
    FailureKind,
    RegisteredSource,
    ServerInfo,
    Staged,
    new_spool,
)

_SUFFIX = ".snap"
_TMP_PREFIX = ".tmp-"
_NAME_FILE = "collector_name"


class SpoolError(PgfleetError):
    """A spooled snapshot cannot be read back (truncated or foreign file)."""


@dataclass(frozen=True)
class Entry:
    seq: int
    srvid: int
    path: Path
    size: int


@dataclass(frozen=True)
class Stamp:
    """What the repository needs of a snapshot besides its rows, kept with it.

    ``key``: the snapshot's own, so that it is stored once however often it
    is sent (a store given up on may have committed).  ``term``: the lease
    term its collector held when it took it, and ``clock``: when it was taken
    by the repository's clock (an estimate of its start, an upper bound of
    its end), for the fence (see :mod:`pgfleet.collector.lease`) and to
    bring a server's clock back to the repository's.  Snapshots spooled
    before stamps existed have none: they are stored if their collector holds
    the lease, without those checks.
    """

    key: str
    term: int | None = None
    clock: tuple[float, float] | None = None


@dataclass
class Spooled:
    """A snapshot read back from the spool, ready for ``collector.store()``."""

    entry: Entry
    alias: str
    taken_at: float
    info: ServerInfo | None
    staged: list[Staged]
    failures: list[Failure]
    stamp: Stamp | None = None

    def close(self) -> None:
        for st in self.staged:
            st.spool.close()


def default_directory() -> Path:
    state = os.environ.get("STATE_DIRECTORY")  # set by systemd's StateDirectory=
    if state:
        return Path(state.split(":")[0]) / "spool"
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "pgfleet" / "spool"


class Spool:
    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        self.bytes = 0
        self.dropped = 0
        self._seq = 0
        # Every entry in seq order, and each server's entries in seq order.
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        self._by_server: dict[int, OrderedDict[int, Entry]] = {}
        self._busy: set[int] = set()  # entries being stored: never dropped
        self._lock_file: IO[str] | None = None

    # -- Life cycle

    def open(self) -> None:
        """Create and lock the directory, read back what a previous run left."""
        try:
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            f = (self.directory / "LOCK").open("a+")
        except OSError as e:
            raise ConfigError(f"spool directory {str(self.directory)!r}: {e.strerror}") from None
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise ConfigError(
                f"spool directory {str(self.directory)!r} is in use by another collector: "
                "give each collector its own [spool] directory"
            ) from None
        self._lock_file = f
        for path in self.directory.iterdir():
            if path.name.startswith(_TMP_PREFIX):
                # A snapshot being written when the process died.
                path.unlink(missing_ok=True)
                continue
            if not path.name.endswith(_SUFFIX):
                continue
            try:
                seq_text, srvid_text = path.name[: -len(_SUFFIX)].split("-")
                entry = Entry(int(seq_text), int(srvid_text), path, path.stat().st_size)
            except (ValueError, OSError):
                continue
            self._add(entry)
        self._entries = OrderedDict(sorted(self._entries.items()))
        for srvid, entries in self._by_server.items():
            self._by_server[srvid] = OrderedDict(sorted(entries.items()))
        self._seq = max(self._entries, default=0)

    def close(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    def collector_name(self) -> str:
        """This collector's lasting name, made on first use and kept here."""
        path = self.directory / _NAME_FILE
        with contextlib.suppress(FileNotFoundError):
            name = path.read_text(encoding="utf-8").strip()
            if name:
                return name
        name = f"{socket.gethostname().split('.')[0]}-{secrets.token_hex(3)}"
        path.write_text(name + "\n", encoding="utf-8")
        return name

    # -- Queries

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, entry: object) -> bool:
        return isinstance(entry, Entry) and entry.seq in self._entries

    def has(self, srvid: int) -> bool:
        return bool(self._by_server.get(srvid))

    def count(self, srvid: int) -> int:
        return len(self._by_server.get(srvid, ()))

    def servers(self) -> set[int]:
        return {s for s, e in self._by_server.items() if e}

    def entries(self) -> Iterator[Entry]:
        """Every entry, oldest first (a snapshot, not a live view)."""
        return iter(list(self._entries.values()))

    # -- Changes

    def put(
        self,
        srvid: int,
        alias: str,
        taken_at: float,
        info: ServerInfo | None,
        staged: list[Staged],
        failures: list[Failure],
        stamp: Stamp | None = None,
    ) -> tuple[Entry, int]:
        """Write one snapshot; return its entry and how many old ones were dropped.

        ``staged`` is left open and positioned at its end, as it came.
        """
        sizes = [st.spool.tell() for st in staged]
        header = {
            "srvid": srvid,
            "alias": alias,
            "taken_at": taken_at,
            "info": None
            if info is None
            else {
                "version_num": info.version_num,
                "in_recovery": info.in_recovery,
                "extensions": sorted(info.extensions),
                "databases": list(info.databases),
            },
            "failures": [
                {"source": f.source, "kind": f.kind.value, "message": f.message} for f in failures
            ],
            "stamp": None
            if stamp is None
            else {"key": stamp.key, "term": stamp.term, "clock": stamp.clock},
            "sources": [
                {
                    "module": st.source.module,
                    "query_source": st.source.query_source,
                    "query_cleanup": st.source.query_cleanup,
                    "added_manually": st.source.added_manually,
                    "priority": st.source.priority,
                    "size": size,
                }
                for st, size in zip(staged, sizes, strict=True)
            ],
        }
        self._seq += 1
        name = f"{self._seq:016d}-{srvid}{_SUFFIX}"
        tmp = self.directory / f"{_TMP_PREFIX}{name}"
        try:
            with tmp.open("wb") as f:
                f.write(json.dumps(header).encode() + b"\n")
                for st, size in zip(staged, sizes, strict=True):
                    st.spool.seek(0)
                    shutil.copyfileobj(st.spool, f)
                    st.spool.seek(size)
                f.flush()
                os.fsync(f.fileno())
            path = self.directory / name
            tmp.rename(path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        entry = Entry(self._seq, srvid, path, path.stat().st_size)
        self._add(entry)
        return entry, self._enforce_bound()

    def read(self, entry: Entry) -> Spooled:
        """Load a spooled snapshot back into Staged spools, as fetch() made them."""
        staged: list[Staged] = []
        try:
            with entry.path.open("rb") as f:
                header: dict[str, Any] = json.loads(f.readline())
                failures = _failures(header)
                stamp = _stamp(header)
                for src in header["sources"]:
                    spool = new_spool()
                    staged.append(
                        Staged(
                            RegisteredSource(
                                src["module"],
                                src["query_source"],
                                src["query_cleanup"],
                                src["added_manually"],
                                src["priority"],
                            ),
                            spool,
                        )
                    )
                    remaining = int(src["size"])
                    while remaining:
                        chunk = f.read(min(remaining, 256 * 1024))
                        if not chunk:
                            raise SpoolError(f"spooled snapshot {entry.path.name} is truncated")
                        spool.write(chunk)
                        remaining -= len(chunk)
        except (OSError, ValueError, KeyError, TypeError) as e:
            for st in staged:
                st.spool.close()
            raise SpoolError(f"spooled snapshot {entry.path.name} is unreadable: {e}") from None
        except SpoolError:
            for st in staged:
                st.spool.close()
            raise
        i = header["info"]
        info = (
            None
            if i is None
            else ServerInfo(
                i["version_num"],
                i["in_recovery"],
                frozenset(i["extensions"]),
                tuple(i["databases"]),
            )
        )
        return Spooled(
            entry,
            header["alias"],
            header["taken_at"],
            info,
            staged,
            failures,
            stamp,
        )

    def busy(self, entry: Entry, busy: bool) -> None:
        """Mark an entry as being stored, so that the bound does not drop it meanwhile."""
        if busy:
            self._busy.add(entry.seq)
        else:
            self._busy.discard(entry.seq)

    def remove(self, entry: Entry) -> None:
        self._busy.discard(entry.seq)
        if self._entries.pop(entry.seq, None) is None:
            return
        self._by_server[entry.srvid].pop(entry.seq, None)
        if not self._by_server[entry.srvid]:
            del self._by_server[entry.srvid]
        self.bytes -= entry.size
        entry.path.unlink(missing_ok=True)

    def drop_server(self, srvid: int) -> int:
        """Forget every snapshot of a server (it left the fleet); return how many."""
        entries = list(self._by_server.get(srvid, {}).values())
        for e in entries:
            self.remove(e)
        return len(entries)

    def _add(self, entry: Entry) -> None:
        self._entries[entry.seq] = entry
        self._by_server.setdefault(entry.srvid, OrderedDict())[entry.seq] = entry
        self.bytes += entry.size

    def _enforce_bound(self) -> int:
        dropped = 0
        for entry in list(self._entries.values()):
            if self.bytes <= self.max_bytes or len(self._entries) <= 1:
                break
            if entry.seq in self._busy:
                continue
            self.remove(entry)
            dropped += 1
        self.dropped += dropped
        return dropped


def _stamp(header: dict[str, Any]) -> Stamp | None:
    st = header.get("stamp")
    if st is None:
        return None
    clock = st["clock"]
    return Stamp(
        str(st["key"]),
        None if st["term"] is None else int(st["term"]),
        None if clock is None else (float(clock[0]), float(clock[1])),
    )


def _failures(header: dict[str, Any]) -> list[Failure]:
    """The failures a spooled snapshot carries.

    A spool written before failures had kinds holds ``errors`` as (source,
    message) pairs: what they were was never recorded, and nothing guesses
    it from the message, so they come back as query failures -- the most
    common kind, and the one that changes nothing about how they are stored.
    """
    if "failures" in header:
        return [
            Failure(str(f["source"]), FailureKind(f["kind"]), str(f["message"]))
            for f in header["failures"]
        ]
    return [Failure(str(m), FailureKind.QUERY, str(msg)) for m, msg in header.get("errors", [])]
