"""What a snapshot is made of, for everything that carries one.

A leaf: the spool, the writer, the exporter and the CLI import these
dataclasses and nothing else of :mod:`pgfleet.snapshot`, so that none of
them depends on how rows are fetched or stored.

A failure is data (:class:`Failure`): its kind is set where the exception is
caught, carried through the spool, counted by kind and stored with its kind
in ``pgfleet.snapshot_errors``.  Nothing ever reads a kind back out of a
message: messages are for people, and may be reworded.
"""

from __future__ import annotations

import asyncio
import enum
import re
import tempfile
from dataclasses import dataclass, field
from typing import IO, Protocol

from psycopg import sql

# Spooled rows stay in memory up to this size, then spill to a temp file.
SPOOL_MEMORY = 4 * 1024 * 1024
# Rows are written to spools, and read back into COPY, by the chunk: a write
# per row costs more than reading the row, and a streamed source goes to the
# repository a chunk at a time.
CHUNK = 64 * 1024

# Every statement pgfleet sends to a server it snapshots carries this
# comment after its first word (see mark()).  pg_stat_statements has no
# application_name, but it keeps a statement's text as sent, comments
# included, constants aside: the web UI tells our own statements from the
# server's workload by it (see repository.reads.top_queries).  Not before
# the first word: from PostgreSQL 18 on, a statement's text starts at its
# first token, and a leading comment is lost.  Never change it: the texts
# already stored carry it.
STATEMENT_MARKER = "/* pgfleet */"
# A marked text, as a regular expression that Python and PostgreSQL (ARE)
# read alike: the marker after the first keyword, or in front (see mark()).
MARKED = r"^(\(*[A-Za-z]+ )?" + re.escape(STATEMENT_MARKER)
# A statement's first keyword (after any opening parentheses), and what
# follows it: the marker goes between them.
_FIRST_WORD = re.compile(r"\(*[A-Za-z]+(?=[\s(])")


def mark(statement: str) -> str:
    """``statement`` marked as pgfleet's: ``SELECT /* pgfleet */ ...``.

    One that does not start with a keyword (a comment first...) gets the
    marker in front, which pg_stat_statements keeps before PostgreSQL 18
    only.
    """
    text = statement.lstrip()
    m = _FIRST_WORD.match(text)
    if m is None:
        return f"{STATEMENT_MARKER} {text}"
    return f"{text[: m.end()]} {STATEMENT_MARKER}{text[m.end() :]}"


def new_spool() -> IO[bytes]:
    return tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY)


class FailureKind(enum.Enum):
    """Why a source (or a whole server) failed; values are metric labels,
    never renamed once shipped (dashboards depend on them)."""

    # The server, or one of its databases, could not be connected to.
    CONNECT = "connect"
    # The source's query failed on the server (an error, a permission).
    QUERY = "query"
    # The server cancelled the query at statement_timeout.
    TIMEOUT = "timeout"
    # The collector gave up waiting and cancelled the query itself.
    CANCELLED = "cancelled"
    # The repository refused the rows, or the source's snapshot function failed.
    STORE = "store"


@dataclass(frozen=True)
class Failure:
    """One source's failure in one snapshot (``source`` "connection": the server's)."""

    source: str
    kind: FailureKind
    message: str


@dataclass(frozen=True)
class ExportedColumn:
    """A column of a user's source the exporter shows (pgfleet.metric_exports, 0014).

    As the repository says it: the exporter checks the names again.
    """

    column: str
    position: int  # in the source's fetched rows: srvid is 0
    kind: str  # label, counter or gauge
    type: str  # the transient table's, as format_type() names it
    help: str


@dataclass(frozen=True)
class RegisteredSource:
    """A snapshot row of the registry (pgfleet.functions)."""

    module: str
    query_source: str | None
    query_cleanup: str | None
    added_manually: bool
    priority: int
    # What the exporter shows of a user's source; none for a built-in one.
    exports: tuple[ExportedColumn, ...] = ()

    @property
    def tmp_table(self) -> sql.Composable | None:
        if not self.query_source:
            return None
        *schema, name = self.query_source.split(".")
        return sql.Identifier(*schema, name + "_tmp")


@dataclass(frozen=True)
class ServerInfo:
    version_num: int
    in_recovery: bool
    extensions: frozenset[str]
    databases: tuple[str, ...]


@dataclass
class Staged:
    """One source's rows, fetched from a monitored server, not yet stored.

    ``spool`` holds the rows in COPY text format (srvid first), positioned at
    its end: ``spool.tell()`` is its size.
    """

    source: RegisteredSource
    spool: IO[bytes]


@dataclass
class SnapshotResult:
    alias: str
    srvid: int
    stored: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    failures: list[Failure] = field(default_factory=list)
    rows: int = 0
    # Stored sources left out as unchanged since the previous snapshot (see store()).
    unchanged: list[str] = field(default_factory=list)
    seconds: float = 0.0
    # Of which: querying the monitored server, and writing the repository.
    fetch_seconds: float = 0.0
    store_seconds: float = 0.0
    # Finer timings (seconds): "fetch <module>", "fetch @<db>", copy, take_snapshot...
    phases: dict[str, float] = field(default_factory=dict)

    def fail(self, source: str, kind: FailureKind, message: str) -> None:
        self.failures.append(Failure(source, kind, message))

    def summary(self) -> str:
        parts = [
            f"snapshot of {self.alias!r}: {len(self.stored)} source(s) stored, "
            f"{self.rows} row(s), {self.seconds * 1000:.0f} ms"
        ]
        if self.skipped:
            parts.append("skipped: " + "; ".join(f"{m} ({why})" for m, why in self.skipped))
        return "\n".join(parts)


class StreamTarget(Protocol):
    """Where :func:`~pgfleet.snapshot.fetch.fetch` sends the one source it
    streams (see :mod:`pgfleet.snapshot.stream`)."""

    source: RegisteredSource | None
    ready: asyncio.Event

    def open(self, src: RegisteredSource) -> IO[bytes]: ...


__all__ = [
    "CHUNK",
    "SPOOL_MEMORY",
    "ExportedColumn",
    "Failure",
    "FailureKind",
    "RegisteredSource",
    "ServerInfo",
    "SnapshotResult",
    "Staged",
    "StreamTarget",
    "new_spool",
]
