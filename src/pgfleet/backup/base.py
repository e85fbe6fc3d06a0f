"""Base backups: ``pg_basebackup`` streamed into the store, checked as it is written.

One backup is one run of::

    pg_basebackup -d CONNINFO -D - -Ft -X fetch --manifest-checksums=SHA256 \\
        -c fast -l LABEL [--incremental=PARENT_MANIFEST] [-r RATE]

whose standard output (one tar: the data directory, the WAL it needs, and
``backup_manifest`` as its last member) goes through :func:`store.open_write`
as ``base.tar<suffix>`` in pieces of 1 MiB, never whole in memory nor
unpacked on disk.  The same bytes feed a tar reader that hashes every file,
so that when pg_basebackup is done, every file is checked against the
manifest it wrote, before the backup may be VALID.  The manifest is then
stored on its own too (``backup_manifest<suffix>``): an incremental backup
needs its parent's, and verify reads it first.

Why ``-X fetch``: every backup restores by itself, whether or not a WAL
receiver was streaming (``pgfleet backup create`` needs nothing but
``[backup] directory``), at the price of the WAL written during the backup
stored twice when one was.  The WAL a backup needs stays on the server until
pg_basebackup fetches it: a temporary physical replication slot, reserved
before the backup starts and gone with the session that made it, holds it
(``-X fetch`` alone would fail on a busy server whose WAL was recycled
meanwhile).  ``-X stream`` cannot write to standard output.

Tablespaces other than pg_default and pg_global are refused: pg_basebackup
writes one tar per tablespace and cannot send several to standard output, and
a restore would need to be told where each goes.  ``run()`` refuses before it
begins a backup (one line naming them); a tablespace created after that check
makes pg_basebackup refuse, and the backup is INVALID with a line saying so.

The server going away mid-backup (a restart, a crash, a fast or immediate
shutdown, the backup's session terminated) ends pg_basebackup: the backup is
INVALID, and its error says the connection was lost, with pg_basebackup's
reason.  A BaseBackup does not retry: a backup interrupted half-way is of no
use, and the next one starts afresh once the server is back.

Invariants: a backup is VALID only once ``finish()`` says so, after both files
are fsynced and renamed into place and every file of the tar matched the
manifest; any error, cancel or interrupt on the way makes it INVALID (its
partial files removed) before the error goes on; a crash leaves it
IN_PROGRESS until ``Catalog.cleanup()`` turns it INVALID.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import os
import re
import secrets
import select
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg

from pgfleet.backup import manifest as manifests
from pgfleet.backup.catalog import BackupInfo, Catalog, Kind, NotFound, parse_lsn
from pgfleet.backup.catalog import segment_name as wal_segment_name
from pgfleet.backup.store import CHUNK_SIZE, Codec, StorageError, StoredFile, copy_out, open_write
from pgfleet.backup.tarstream import Digests, TarError
from pgfleet.backup.tools import (
    Program,
    ReplicationTarget,
    ToolError,
    find_program,
    lost_connection,
    replication_target,
    worst_line,
)
from pgfleet.config import CollectorConfig
from pgfleet.connections import first_line, server_conninfo
from pgfleet.errors import PgfleetError
from pgfleet.repository.servers import Server

__all__ = ["BackupError", "BaseBackup", "ServerFacts", "parse_max_rate", "server_facts"]

# PostgreSQL 17 brought incremental backups, WAL summaries and pg_combinebackup.
INCREMENTAL_MAJOR = 17
BASE_TAR = "base.tar"
MANIFEST = "backup_manifest"
# pg_basebackup's --max-rate bounds, in kB/s: 32 kB/s to 1 GB/s.
MAX_RATE_MIN = 32
MAX_RATE_MAX = 1024 * 1024
_RATE_RE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?)\s*([kM]?)\s*")
# Said by the check before a backup and by pg_basebackup's refusal alike.
_NO_TABLESPACES = (
    "pgfleet backs up only servers whose data is all in pg_default and pg_global "
    "(tablespaces are not supported yet)"
)

_FACTS_SQL = """\
SELECT current_setting('server_version_num')::int,
       pg_is_in_recovery(),
       (SELECT setting::bigint FROM pg_settings WHERE name = 'wal_segment_size'),
       current_setting('summarize_wal', true),
       ARRAY(SELECT spcname::text FROM pg_tablespace
             WHERE spcname NOT IN ('pg_default', 'pg_global') ORDER BY 1),
       (SELECT rolreplication OR rolsuper FROM pg_roles WHERE rolname = current_user),
       current_setting('wal_level')
"""


class BackupError(PgfleetError):
    """A base backup could not be taken; one line naming the server."""


@dataclass(frozen=True)
class ServerFacts:
    """What a backup needs to know of its server before it starts."""

    version_num: int
    in_recovery: bool
    wal_segment_size: int
    summarize_wal: bool | None  # None before PostgreSQL 17
    tablespaces: tuple[str, ...]
    can_replicate: bool
    wal_level: str
    system_identifier: int | None

    @property
    def major(self) -> int:
        return self.version_num // 10000


def server_facts(conn: psycopg.Connection[Any]) -> ServerFacts:
    row = conn.execute(_FACTS_SQL).fetchone()
    assert row is not None
    system_identifier = None
    # pg_control_system() may be revoked from the role: the manifest (v2) says it too.
    with contextlib.suppress(psycopg.Error):
        ident = conn.execute("SELECT system_identifier FROM pg_control_system()").fetchone()
        system_identifier = int(ident[0]) if ident else None
    summarize = None if row[3] is None else row[3] == "on"
    return ServerFacts(
        version_num=row[0],
        in_recovery=row[1],
        wal_segment_size=int(row[2]),
        summarize_wal=summarize,
        tablespaces=tuple(row[4]),
        can_replicate=bool(row[5]),
        wal_level=row[6],
        system_identifier=system_identifier,
    )


def parse_max_rate(text: str) -> int:
    """A transfer rate as pg_basebackup's ``--max-rate`` reads it, in kB/s.

    ``500`` and ``500k`` are kB/s, ``20M`` MB/s; from 32 kB/s to 1 GB/s.
    ValueError, saying what is expected, for what pg_basebackup would refuse.
    """
    m = _RATE_RE.fullmatch(text)
    if m is None:
        raise ValueError(
            f"invalid transfer rate {text!r}: kB/s, or with a k or M suffix (e.g. 500k, 20M)"
        )
    rate = float(m[1]) * (1024 if m[2] == "M" else 1)
    if not MAX_RATE_MIN <= rate <= MAX_RATE_MAX:
        raise ValueError(f"transfer rate {text!r} is out of range (32k to 1024M)")
    return int(rate)


class BaseBackup:
    """One base backup of ``server`` into ``catalog``; ``run()`` it (in a thread, if async).

    ``cancel()``, from any thread, stops pg_basebackup; ``run()`` then raises
    BackupError and the backup is INVALID.

    :param incremental: an incremental backup against the latest valid one
        (PostgreSQL 17+, ``summarize_wal = on``).
    :param label: the backup's label (in its ``backup_label`` too); by default
        ``pgfleet <alias> <ID>``.
    :param bin_dir: where pg_basebackup is (``[backup] bin_dir``); by default
        it is looked for (see :mod:`pgfleet.backup.tools`).
    :param max_rate: the most the server sends per second, as pg_basebackup's
        ``--max-rate`` reads it (``500k``, ``20M``; a bare number is kB/s;
        32 kB/s to 1 GB/s); None or empty for no limit.  The server throttles
        itself, so that a backup does not take the disk and network bandwidth
        its clients need, at the price of a longer backup (and more WAL kept
        for it meanwhile).  An invalid rate is refused before anything begins.
    :param application_name: what the server's ``pg_stat_activity`` and
        ``pg_stat_replication`` show for the backup's connections.
    """

    def __init__(
        self,
        catalog: Catalog,
        server: Server,
        collector: CollectorConfig,
        codec: Codec,
        *,
        incremental: bool = False,
        label: str = "",
        bin_dir: str = "",
        max_rate: str | None = None,
        application_name: str = "pgfleet backup",
    ) -> None:
        self.catalog = catalog
        self.server = server
        self.collector = collector
        self.codec = codec
        self.incremental = incremental
        self.label = label
        self.bin_dir = bin_dir
        self.max_rate = max_rate
        self.application_name = application_name
        self.info: BackupInfo | None = None  # once begun
        self._proc: subprocess.Popen[bytes] | None = None
        self._cancelled = threading.Event()
        self._lock = threading.Lock()

    def cancel(self) -> None:
        """Stop the backup in progress (pg_basebackup gets SIGTERM)."""
        self._cancelled.set()
        with self._lock:
            if self._proc is not None and self._proc.poll() is None:
                self._proc.terminate()

    def _error(self, message: str) -> BackupError:
        return BackupError(f"server {self.server.alias!r}: {message}")

    def run(self) -> BackupInfo:
        """Take the backup; the VALID BackupInfo, or BackupError (and an INVALID backup)."""
        try:
            rate = parse_max_rate(self.max_rate) if self.max_rate else None
        except ValueError as e:
            raise self._error(f"max_rate: {e}") from None
        try:
            conn = psycopg.connect(server_conninfo(self.server, self.collector), autocommit=True)
        except psycopg.OperationalError as e:
            raise self._error(f"cannot connect: {first_line(e)}") from None
        with conn:
            try:
                if conn.info.server_version >= 140000:
                    # This session holds the backup's temporary slot, and is
                    # idle throughout (from here: checks, pg_basebackup's
                    # version, the catalog's fsyncs); a server's
                    # idle_session_timeout shorter than that would end it, and
                    # the slot with it, letting the WAL it needs be recycled.
                    conn.execute("SET idle_session_timeout = 0")
                facts = server_facts(conn)
            except psycopg.Error as e:
                raise self._error(first_line(e)) from None
            self._check(facts)
            parent = self._parent(facts) if self.incremental else None
            target = replication_target(
                self.server, self.collector, application_name=self.application_name
            )
            try:
                program = find_program(
                    "pg_basebackup",
                    facts.major,
                    bin_dir=self.bin_dir,
                    minimum=INCREMENTAL_MAJOR if self.incremental else 0,
                )
            except ToolError as e:
                raise self._error(str(e)) from None
            self.catalog.cleanup()
            info = self.catalog.begin(
                Kind.INCREMENTAL if parent else Kind.FULL,
                parent=parent.id if parent else None,
                label=self.label,
                compression=self.codec.compression,
                encrypted=self.codec.encrypted,
            )
            info = dataclasses.replace(
                info, pg_version=facts.version_num, system_identifier=facts.system_identifier
            )
            self.info = info
            try:
                with self._slot(conn):
                    info = self._take(info, program, target, facts, parent, rate, conn)
                self.info = self.catalog.finish(info)
                return self.info
            except BaseException as e:
                message = str(e) if isinstance(e, PgfleetError) else _describe(e)
                with contextlib.suppress(PgfleetError, OSError):
                    self.info = self.catalog.fail(info.id, message)
                if isinstance(e, Exception) and not isinstance(e, PgfleetError):
                    raise self._error(f"backup {info.id} failed: {message}") from e
                raise

    # -- before

    def _check(self, facts: ServerFacts) -> None:
        if facts.tablespaces:
            raise self._error(
                f"has tablespaces ({', '.join(facts.tablespaces)}): {_NO_TABLESPACES}"
            )
        if not facts.can_replicate:
            raise self._error(
                f"role {self.server.username or '(default)'!r} may not replicate: "
                "ALTER ROLE ... REPLICATION, and a 'replication' line in pg_hba.conf"
            )
        if facts.wal_level == "minimal":
            raise self._error("wal_level is minimal: base backups need replica or logical")
        if self.incremental:
            if facts.major < INCREMENTAL_MAJOR:
                raise self._error(
                    f"incremental backups need PostgreSQL {INCREMENTAL_MAJOR} or later "
                    f"(this server is {facts.major})"
                )
            if not facts.summarize_wal:
                raise self._error(
                    "incremental backups need summarize_wal = on (ALTER SYSTEM SET "
                    "summarize_wal = on; SELECT pg_reload_conf()), then a full backup"
                )

    def _parent(self, facts: ServerFacts) -> BackupInfo:
        try:
            parent = self.catalog.get("latest")
        except NotFound:
            raise self._error(
                "no valid backup to take an incremental one against: take a full backup first"
            ) from None
        known = parent.system_identifier, facts.system_identifier
        if None not in known and known[0] != known[1]:
            raise self._error(
                f"the latest backup ({parent.id}) is of another cluster (system identifier "
                f"{known[0]}, the server's is {known[1]}): take a full backup"
            )
        if parent.pg_version and parent.pg_version // 10000 != facts.major:
            raise self._error(
                f"the latest backup ({parent.id}) is of PostgreSQL {parent.pg_version // 10000}, "
                f"the server runs {facts.major}: take a full backup"
            )
        return parent

    @contextlib.contextmanager
    def _slot(self, conn: psycopg.Connection[Any]) -> Iterator[None]:
        """Hold the server's WAL from now on with a temporary slot, for -X fetch."""
        name = f"pgfleet_backup_{os.getpid()}_{secrets.token_hex(4)}"
        try:
            conn.execute("SELECT pg_create_physical_replication_slot(%s, true, true)", (name,))
        except psycopg.Error as e:
            raise self._error(
                f"cannot create a temporary replication slot: {first_line(e)}"
            ) from None
        try:
            yield
        finally:
            # Temporary: it goes with the session anyway; dropped now to say so.
            with contextlib.suppress(psycopg.Error):
                conn.execute("SELECT pg_drop_replication_slot(%s)", (name,))

    # -- during

    def _take(
        self,
        info: BackupInfo,
        program: Program,
        target: ReplicationTarget,
        facts: ServerFacts,
        parent: BackupInfo | None,
        rate: int | None,
        control: psycopg.Connection[Any],
    ) -> BackupInfo:
        d = self.catalog.backup_dir(info.id)
        args = [
            *target.args(),
            "-D", "-", "-Ft", "-X", "fetch",
            "--manifest-checksums=SHA256",
            "-c", "fast",
            "-l", info.label or f"pgfleet {self.server.alias} {info.id}",
            "-v",
        ]  # fmt: skip
        if rate is not None:
            args += ["-r", str(rate)]  # kB/s, as parsed: no locale or unit left to read
        with contextlib.ExitStack() as stack:
            if parent is not None:
                old = stack.enter_context(self._parent_manifest(parent))
                args.append(f"--incremental={old}")
            dest = d / f"{BASE_TAR}{self.codec.suffix}"
            stored, digests = self._stream(program, args, target.env, dest, control)
        info = info.with_file(stored)
        data = bytes(digests.kept.get(MANIFEST, b""))
        if not data:
            raise self._error("pg_basebackup's output has no backup_manifest")
        manifest = manifests.parse(data, name=f"{MANIFEST} of backup {info.id}")
        problem = _compare(manifest, digests)
        if problem is not None:
            raise self._error(f"backup {info.id} does not match its manifest: {problem}")
        with open_write(d / f"{MANIFEST}{self.codec.suffix}", self.codec) as w:
            w.write(data)
        info = info.with_file(StoredFile(w.path, w.raw_bytes, w.stored_bytes, w.sha256))
        return _with_wal(info, manifest, facts.wal_segment_size)

    @contextlib.contextmanager
    def _parent_manifest(self, parent: BackupInfo) -> Iterator[Path]:
        """The parent's manifest as a plain file, for --incremental, removed afterwards."""
        src = _stored(self.catalog, parent, MANIFEST)
        fd, name = tempfile.mkstemp(prefix=".tmp-manifest-", dir=self.catalog.root)
        try:
            with os.fdopen(fd, "wb") as f:
                copy_out(src, f, self.codec.key)
            yield Path(name)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(name)

    def _stream(
        self,
        program: Program,
        args: list[str],
        env: dict[str, str],
        dest: Path,
        control: psycopg.Connection[Any],
    ) -> tuple[StoredFile, Digests]:
        """Run pg_basebackup, its output into ``dest`` and through the digests.

        ``control`` is our own session with the server, idle meanwhile: when
        pg_basebackup fails, whether the server ended it too tells a server
        that went away from a backup that failed on its own.
        """
        errors: collections.deque[str] = collections.deque(maxlen=40)
        with self._lock:
            if self._cancelled.is_set():
                raise self._error("cancelled")
            try:
                proc = subprocess.Popen(
                    [str(program.path), *args],
                    stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    env=env,
                )
            except OSError as e:
                raise self._error(f"cannot run {program.path}: {e.strerror or e}") from None
            self._proc = proc
        assert proc.stdout is not None and proc.stderr is not None
        stderr = proc.stderr

        def drain() -> None:
            for line in stderr:
                errors.append(line.decode(errors="replace").rstrip())

        reader = threading.Thread(target=drain, name="pg_basebackup stderr", daemon=True)
        reader.start()
        digests = Digests()
        try:
            with open_write(dest, self.codec) as out:
                while chunk := proc.stdout.read(CHUNK_SIZE):
                    out.write(chunk)
                    try:
                        digests.feed(chunk)
                    except TarError as e:
                        raise self._error(f"pg_basebackup's output is not a tar: {e}") from None
                rc = proc.wait()
                reader.join(timeout=10)
                if self._cancelled.is_set():
                    raise self._error("cancelled")
                if rc != 0:
                    output = "\n".join(errors)
                    why = worst_line(output) if errors else f"exit code {rc}"
                    # One line, without the program's name said twice.
                    why = " ".join(why.removeprefix(f"{program.path.name}: error: ").split())
                    # pg_basebackup does not always say its server went away:
                    # when the server's FATAL ends the stream, it reports
                    # "COPY stream ended before last file was finished" only.
                    lost = lost_connection(output) or _session_ended(control)
                    raise self._error(f"{program.path.name} failed: {_hint(why, lost)}")
                try:
                    digests.close()
                except TarError as e:
                    raise self._error(f"pg_basebackup's output is cut short: {e}") from None
        finally:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            proc.stdout.close()
            reader.join(timeout=10)
            stderr.close()
            with self._lock:
                self._proc = None
        return StoredFile(out.path, out.raw_bytes, out.stored_bytes, out.sha256), digests


def _stored(catalog: Catalog, info: BackupInfo, name: str) -> Path:
    """The stored file ``name`` (suffix whatever it is) of a backup."""
    for f in info.files:
        if f == name or f.startswith(name + "."):
            return catalog.backup_dir(info.id) / f
    raise StorageError(f"backup {info.id} of server {catalog.server!r} has no {name}")


def _compare(manifest: manifests.Manifest, digests: Digests) -> str | None:
    """The first difference between the manifest and the tar's files, or None."""
    for entry in manifest.files:
        got = digests.files.get(entry.path)
        if got is None:
            return f"{entry.path}: in the manifest but not in the backup"
        if got[0] != entry.size:
            return f"{entry.path}: {got[0]} bytes, the manifest says {entry.size}"
        if entry.algorithm != "SHA256":
            return f"{entry.path}: {entry.algorithm} checksum, pgfleet asked for SHA256"
        if got[1] != entry.checksum:
            return f"{entry.path}: SHA256 checksum mismatch"
    listed = {e.path for e in manifest.files}
    # The WAL of -X fetch is not in the manifest (PostgreSQL checks its
    # records' CRCs as it replays them).
    extra = sorted(
        p for p in set(digests.files) - listed - {MANIFEST} if not p.startswith("pg_wal/")
    )
    if extra:
        return f"{extra[0]}: in the backup but not in the manifest"
    return None


def _with_wal(info: BackupInfo, manifest: manifests.Manifest, segment_size: int) -> BackupInfo:
    """The backup's LSNs, timeline and WAL segments, from its manifest."""
    ranges = manifest.wal_ranges
    if not ranges:
        return info
    first = min(ranges, key=lambda r: parse_lsn(r.start_lsn))
    last = max(ranges, key=lambda r: parse_lsn(r.end_lsn))
    end = parse_lsn(last.end_lsn)
    return dataclasses.replace(
        info,
        start_lsn=first.start_lsn,
        end_lsn=last.end_lsn,
        timeline=last.timeline,
        start_wal=wal_segment_name(first.timeline, first.start_lsn, segment_size),
        # The segment of the last byte the backup needs.
        end_wal=wal_segment_name(last.timeline, max(end - 1, 0), segment_size),
        system_identifier=manifest.system_identifier or info.system_identifier,
    )


def _session_ended(conn: psycopg.Connection[Any], wait: float = 1.0) -> bool:
    """Whether the server ends ``conn`` (idle, ours) within ``wait`` seconds.

    Watched, not queried: a query to a server that vanished from the network
    could wait for TCP to give up, minutes later.  Its FATAL, then the end of
    the stream, arrive at once when the server shuts down or crashes; the
    wait only matters to a backup that failed for another reason.
    """
    deadline = time.monotonic() + wait
    try:
        fd = conn.fileno()
        while (left := deadline - time.monotonic()) > 0:
            if not select.select([fd], [], [], left)[0]:
                return False
            # Reads what came (libpq parses it later); raises once it is the end.
            conn.pgconn.consume_input()
    except (psycopg.OperationalError, OSError, ValueError):
        return True
    return False


def _hint(why: str, lost: bool = False) -> str:
    """pg_basebackup's complaint, with what to do about the usual ones.

    ``lost``: the server ended the connection (shut down, restarted, crashed).
    """
    if lost:
        return (
            "the connection to the server was lost (was the server shut down, restarted "
            f"or crashed during the backup?): {why}"
        )
    if "can only write single tablespace to stdout" in why:
        return f"{why} (the server has tablespaces: {_NO_TABLESPACES})"
    if "WAL summaries" in why or "summaries" in why:
        return (
            f"{why} (the parent backup predates the WAL summaries the server keeps: "
            "take a full backup)"
        )
    if "no pg_hba.conf entry for replication" in why:
        return f"{why} (add a 'replication' line to the server's pg_hba.conf)"
    if "number of requested standby connections exceeds" in why or "max_wal_senders" in why:
        return f"{why} (raise max_wal_senders on the server)"
    return why


def _describe(e: BaseException) -> str:
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    if isinstance(e, OSError):
        return f"{e.filename or ''}: {e.strerror or e}".lstrip(": ")
    return f"{type(e).__name__}: {e}"
