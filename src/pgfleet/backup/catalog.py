"""The backups of one server on disk: what there is, in what state, and its WAL.

Layout (see the package docstring for the whole tree)::

    <directory>/<server>/.lock                 the catalog lock
    <directory>/<server>/backups/<ID>/         backup.json and the backup's files
    <directory>/<server>/wal/                  archived WAL segments, <segment><suffix>
    <directory>/<server>/wal/incoming/         pg_receivewal's working directory

``<ID>`` is the backup's start in UTC, ``YYYYMMDDTHHMMSSZ``: unique within a
server and sortable, each new one greater than every existing one (the clock
going back or two backups in one second bump it by a second).

A backup's life, each step one atomic write of ``backup.json``::

    begin()  -> IN_PROGRESS -> finish() -> VALID
                            -> fail()   -> INVALID (its partial files removed)
    delete() -> DELETING -> files removed, backup.json removed, directory removed

Invariants:

- Only ``finish()`` writes VALID, after every file it lists is in place
  (each fsynced and renamed by store.open_write) and the directory fsynced.
  A crash anywhere before leaves IN_PROGRESS; a crash during a deletion
  leaves DELETING or no backup.json; neither looks valid.
- A backup's directory appears complete with its IN_PROGRESS metadata: it is
  made under a temporary name and renamed into place.
- Who is alive is known by flock, not by guesses on pids or clocks: the
  process taking a backup holds an flock on its directory until finish() or
  fail(), and store.open_write holds one on each temporary file.  The kernel
  drops them when that process dies, however it dies, so ``cleanup()`` turns
  an IN_PROGRESS backup INVALID, or removes a temporary file, exactly when
  its writer is gone, be it in another process (``pgfleet backup create``
  beside the daemon) or this one.
- Changes to the catalog (begin, finish, fail, delete, cleanup, retention)
  take the server's catalog lock, an flock on ``<server>/.lock``, so two
  processes, or two threads, never interleave them; it is re-entrant within
  one Catalog object and held only for the metadata work (and deletions),
  never for the length of a backup.  Reading (list, get) takes no lock: every
  file it reads is replaced atomically.  ``exclusive(name)`` gives a
  non-blocking named lock for work there must be only one of (a server's
  WAL receiver).  flock works on local file systems; NFS is not supported.
- ``list()`` never fails because of one backup: unreadable metadata is listed
  as an INVALID entry saying why.
"""

from __future__ import annotations

import builtins
import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path
from typing import Any

from pgfleet.backup.store import (
    SUFFIXES,
    Compression,
    StorageError,
    StoredFile,
    atomic_write_bytes,
    fsync_dir,
    is_abandoned,
    strip_suffix,
)

__all__ = [
    "ID_FORMAT",
    "METADATA",
    "BackupInfo",
    "Catalog",
    "Kind",
    "NotFound",
    "State",
    "format_lsn",
    "parse_lsn",
    "segment_name",
]

ID_FORMAT = "%Y%m%dT%H%M%SZ"
METADATA = "backup.json"
LOCK_FILE = ".lock"
TMP_PREFIX = ".tmp-"
WAL_SEGMENT_SIZE = 16 << 20  # PostgreSQL's default

_ID_RE = re.compile(r"\d{8}T\d{6}Z")
_SEGMENT_RE = re.compile(r"[0-9A-F]{24}")
_HISTORY_RE = re.compile(r"[0-9A-F]{8}\.history")
_FORMAT = 1


class State(StrEnum):
    IN_PROGRESS = "in_progress"
    VALID = "valid"
    INVALID = "invalid"
    DELETING = "deleting"


class Kind(StrEnum):
    FULL = "full"
    INCREMENTAL = "incremental"


class NotFound(StorageError):
    """No such backup (or no valid one, for ``latest``)."""


@dataclass(frozen=True, kw_only=True)
class BackupInfo:
    """A backup's metadata, as ``backup.json`` holds it."""

    id: str
    server: str
    state: State
    kind: Kind = Kind.FULL
    parent: str | None = None  # the backup an incremental one is taken against
    label: str = ""
    started: datetime
    finished: datetime | None = None
    start_lsn: str | None = None
    end_lsn: str | None = None
    timeline: int | None = None
    start_wal: str | None = None  # the segment holding start_lsn
    end_wal: str | None = None
    raw_bytes: int = 0  # of every stored file, uncompressed
    stored_bytes: int = 0  # on disk
    compression: Compression = Compression.ZSTD
    encrypted: bool = False
    pg_version: int | None = None  # server_version_num
    system_identifier: int | None = None
    files: tuple[str, ...] = ()  # stored names, suffix included, in the backup's directory
    checksums: dict[str, str] = field(default_factory=dict)  # file -> SHA-256 of its raw bytes
    error: str | None = None

    @property
    def duration(self) -> timedelta | None:
        return None if self.finished is None else self.finished - self.started

    def with_file(self, stored: StoredFile) -> BackupInfo:
        """This backup with one more stored file counted (name, sizes, checksum)."""
        name = stored.path.name
        files = self.files if name in self.files else (*self.files, name)
        return dataclasses.replace(
            self,
            files=files,
            raw_bytes=self.raw_bytes + stored.raw_bytes,
            stored_bytes=self.stored_bytes + stored.stored_bytes,
            checksums={**self.checksums, name: stored.sha256},
        )

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"format": _FORMAT}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, datetime):
                value = value.isoformat()
            elif isinstance(value, tuple):
                value = list(value)
            elif isinstance(value, StrEnum):
                value = value.value
            out[f.name] = value
        return out

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=1) + "\n").encode()

    @classmethod
    def from_dict(cls, doc: dict[str, Any]) -> BackupInfo:
        """Raise ValueError, TypeError or KeyError on a document that is not one."""
        if doc.get("format") != _FORMAT:
            raise ValueError(f"unknown format {doc.get('format')!r}")
        names = {f.name for f in dataclasses.fields(cls)}
        kw = {k: v for k, v in doc.items() if k in names}  # newer fields: ignored
        kw["state"] = State(kw["state"])
        kw["kind"] = Kind(kw.get("kind", "full"))
        kw["compression"] = Compression(kw.get("compression", "zstd"))
        kw["started"] = _aware(datetime.fromisoformat(kw["started"]))
        if kw.get("finished") is not None:
            kw["finished"] = _aware(datetime.fromisoformat(kw["finished"]))
        kw["files"] = tuple(kw.get("files", ()))
        kw["checksums"] = dict(kw.get("checksums", {}))
        info = cls(**kw)
        for name, kind in (("id", str), ("server", str), ("raw_bytes", int), ("stored_bytes", int)):
            if not isinstance(getattr(info, name), kind):
                raise TypeError(f"{name} is not a {kind.__name__}")
        if not all(isinstance(f, str) for f in info.files):
            raise TypeError("files is not a list of names")
        return info

    @classmethod
    def from_json(cls, data: bytes) -> BackupInfo:
        doc = json.loads(data)
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        return cls.from_dict(doc)


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


def _id_time(backup_id: str) -> datetime:
    return datetime.strptime(backup_id, ID_FORMAT).replace(tzinfo=UTC)


_SECRET_RE = re.compile(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)|(://[^:/@\s]*:)[^@\s]*@", re.I)


def _scrub(text: str) -> str:
    """One line, no password (a conninfo's or a URI's), at most 2000 characters."""

    def blank(m: re.Match[str]) -> str:
        return f"{m.group(1)}***" if m.group(1) else f"{m.group(3)}***@"

    return _SECRET_RE.sub(blank, " ".join(text.split()))[:2000]


def _check_name(server: str) -> None:
    if not server or server in (".", "..") or "/" in server or "\0" in server:
        raise StorageError(f"{server!r} cannot name a server's backup directory")
    if server.startswith("."):
        raise StorageError(f"{server!r} cannot name a server's backup directory (leading dot)")


class Catalog:
    """The backups and the WAL of one server, under ``directory/server``."""

    LOCK_TIMEOUT = 60.0

    def __init__(self, directory: Path, server: str) -> None:
        _check_name(server)
        self.directory = Path(directory)
        self.server = server
        self.root = self.directory / server
        self.backups_dir = self.root / "backups"
        self.wal_dir = self.root / "wal"
        self.incoming_dir = self.wal_dir / "incoming"
        self._owned: dict[str, int] = {}  # backup id -> its directory, flocked
        self._mutex = threading.RLock()
        self._lock_fd: int | None = None
        self._depth = 0

    def __repr__(self) -> str:
        return f"<Catalog {self.server!r} in {self.directory}>"

    # -- directories and locks

    def create(self) -> None:
        """Make the server's directories (mode 0700) if they are not there."""
        try:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            for d in (self.root, self.backups_dir, self.wal_dir, self.incoming_dir):
                d.mkdir(mode=0o700, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create {e.filename or self.root}: {e.strerror}") from None

    @contextlib.contextmanager
    def lock(self, timeout: float | None = None) -> Iterator[None]:
        """Hold the server's catalog lock (re-entrant in this object); StorageError on timeout."""
        with self._mutex:
            if self._depth == 0:
                self.create()
                self._lock_fd = _flock(
                    self.root / LOCK_FILE,
                    self.LOCK_TIMEOUT if timeout is None else timeout,
                    f"server {self.server!r}: its backup catalog",
                )
            self._depth += 1
            try:
                yield
            finally:
                self._depth -= 1
                if self._depth == 0 and self._lock_fd is not None:
                    os.close(self._lock_fd)
                    self._lock_fd = None

    @contextlib.contextmanager
    def exclusive(self, name: str) -> Iterator[None]:
        """Hold ``<server>/<name>.lock`` or raise StorageError at once: work to run once only."""
        if not re.fullmatch(r"[a-z][a-z0-9_-]*", name):
            raise ValueError(f"bad lock name {name!r}")
        self.create()
        fd = _flock(self.root / f"{name}.lock", 0.0, f"server {self.server!r}: its {name}")
        try:
            yield
        finally:
            os.close(fd)

    # -- backups

    def backup_dir(self, backup_id: str) -> Path:
        """Where a backup's files go (the ID checked: it becomes a path)."""
        if not _ID_RE.fullmatch(backup_id):
            raise StorageError(
                f"{backup_id!r} is not a backup ID (YYYYMMDDTHHMMSSZ, latest or oldest)"
            )
        return self.backups_dir / backup_id

    def begin(
        self,
        kind: str = Kind.FULL,
        parent: str | None = None,
        label: str = "",
        *,
        compression: str = Compression.ZSTD,
        encrypted: bool = False,
        started: datetime | None = None,
    ) -> BackupInfo:
        """Start a backup: its directory, with IN_PROGRESS metadata, owned by this object."""
        try:
            kind = Kind(kind)
            compression = Compression(compression)
        except ValueError as e:
            raise StorageError(str(e)) from None
        if kind is Kind.INCREMENTAL and parent is None:
            raise StorageError("an incremental backup needs a parent backup")
        if kind is Kind.FULL and parent is not None:
            raise StorageError("a full backup has no parent")
        with self.lock():
            if parent is not None:
                p = self.get(parent)
                if p.state is not State.VALID:
                    raise StorageError(
                        f"backup {p.id} of server {self.server!r} is {p.state}: cannot be a parent"
                    )
                parent = p.id
            when = _aware(started or datetime.now(UTC)).astimezone(UTC).replace(microsecond=0)
            ids = self._ids()
            if ids and when <= _id_time(ids[-1]):
                when = _id_time(ids[-1]) + timedelta(seconds=1)
            backup_id = when.strftime(ID_FORMAT)
            info = BackupInfo(
                id=backup_id,
                server=self.server,
                state=State.IN_PROGRESS,
                kind=kind,
                parent=parent,
                label=label,
                started=when,
                compression=compression,
                encrypted=encrypted,
            )
            tmp = self.backups_dir / f"{TMP_PREFIX}{backup_id}-{secrets.token_hex(4)}"
            fd = None
            try:
                tmp.mkdir(mode=0o700)
                fd = os.open(tmp, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                atomic_write_bytes(tmp / METADATA, info.to_json())
                os.rename(tmp, self.backups_dir / backup_id)
                fsync_dir(self.backups_dir)
            except (OSError, StorageError) as e:
                if fd is not None:
                    os.close(fd)
                shutil.rmtree(tmp, ignore_errors=True)
                if isinstance(e, StorageError):
                    raise
                raise StorageError(f"cannot create a backup in {self.backups_dir}: {e}") from None
            self._owned[backup_id] = fd
            return info

    def update(self, info: BackupInfo) -> BackupInfo:
        """Record what is known so far of a backup in progress (its start LSN, say)."""
        with self.lock():
            self._expect_in_progress(info.id)
            if info.state is not State.IN_PROGRESS:
                raise StorageError(f"update() keeps a backup in progress, not {info.state}")
            atomic_write_bytes(self.backup_dir(info.id) / METADATA, info.to_json())
            return info

    def finish(self, info: BackupInfo) -> BackupInfo:
        """Mark a backup VALID: every file in ``info.files`` must be in its directory."""
        with self.lock():
            self._expect_in_progress(info.id)
            d = self.backup_dir(info.id)
            if not info.files:
                raise StorageError(f"backup {info.id} of server {self.server!r} has no files")
            for name in info.files:
                if "/" in name or not (d / name).is_file():
                    raise StorageError(f"backup {info.id} of server {self.server!r}: no {d / name}")
            fsync_dir(d)
            done = dataclasses.replace(
                info,
                state=State.VALID,
                finished=info.finished or datetime.now(UTC),
                error=None,
            )
            atomic_write_bytes(d / METADATA, done.to_json())
            self._release(info.id)
            return done

    def fail(self, backup: str | BackupInfo, error: str) -> BackupInfo:
        """Mark a backup INVALID with ``error`` (one line, passwords blanked).

        A backup that was in progress loses its files (they are partial, and a
        full disk should get its space back); a VALID one found bad keeps them.
        """
        backup_id = backup if isinstance(backup, str) else backup.id
        with self.lock():
            if not self.backup_dir(backup_id).is_dir():
                raise NotFound(f"server {self.server!r} has no backup {backup_id}")
            current = self._read(backup_id)
            if current.state is State.DELETING:
                raise StorageError(f"backup {backup_id} of server {self.server!r} is being deleted")
            if (
                current.state is State.IN_PROGRESS
                and backup_id not in self._owned
                and _dir_locked(self.backup_dir(backup_id))
            ):
                raise StorageError(
                    f"backup {backup_id} of server {self.server!r} is being taken"
                    " by another process"
                )
            base = current if isinstance(backup, str) else backup
            failed = dataclasses.replace(
                base,
                state=State.INVALID,
                finished=base.finished or datetime.now(UTC),
                error=_scrub(error),
            )
            if current.state is State.IN_PROGRESS:
                self._remove_contents(self.backup_dir(backup_id))
                failed = dataclasses.replace(failed, files=(), checksums={})
            atomic_write_bytes(self.backup_dir(backup_id) / METADATA, failed.to_json())
            self._release(backup_id)
            return failed

    def list(self) -> builtins.list[BackupInfo]:
        """Every backup, oldest first; unreadable metadata is an INVALID entry, not an error."""
        return [self._read(backup_id) for backup_id in self._ids()]

    def get(self, backup_id: str) -> BackupInfo:
        """One backup by ID, or ``latest`` (the newest VALID one), or ``oldest`` (VALID too)."""
        if backup_id in ("latest", "newest", "oldest"):
            valid = [b for b in self.list() if b.state is State.VALID]
            if not valid:
                raise NotFound(f"server {self.server!r} has no valid backup")
            return valid[0] if backup_id == "oldest" else valid[-1]
        if not self.backup_dir(backup_id).is_dir():
            raise NotFound(f"server {self.server!r} has no backup {backup_id}")
        return self._read(backup_id)

    def delete(self, backup_id: str, *, force: bool = False) -> None:
        """Delete a backup: DELETING first, then its files, then its directory.

        Refused for a backup being taken, and, unless ``force``, for the parent
        of a valid or running incremental backup.
        """
        with self.lock():
            info = self.get(backup_id)
            if info.state is State.IN_PROGRESS and self._alive(info.id):
                raise StorageError(f"backup {info.id} of server {self.server!r} is in progress")
            if not force:
                children = [
                    b.id
                    for b in self.list()
                    if b.parent == info.id and b.state in (State.VALID, State.IN_PROGRESS)
                ]
                if children:
                    raise StorageError(
                        f"backup {info.id} of server {self.server!r} is the parent of"
                        f" {', '.join(children)}: delete those first"
                    )
            self._delete(info)

    def cleanup(self, *, grace: float = 60.0) -> builtins.list[str]:
        """Settle what dead processes left behind; say what was done, one line each.

        - a backup IN_PROGRESS whose owner is gone: INVALID, its files removed;
        - a backup DELETING, or a directory without backup.json: deletion finished;
        - a half-made backup directory (``.tmp-...``) nobody holds: removed;
        - temporary files nobody writes, untouched for ``grace`` seconds: removed.
        """
        done: builtins.list[str] = []
        if not self.root.is_dir():
            return done
        with self.lock():
            for name in _listdir(self.backups_dir):
                path = self.backups_dir / name
                if name.startswith(TMP_PREFIX):
                    if path.is_dir() and not _dir_locked(path):
                        shutil.rmtree(path, ignore_errors=True)
                        done.append(f"{name}: removed (a backup interrupted while starting)")
                    continue
                if not _ID_RE.fullmatch(name) or not path.is_dir():
                    continue
                info = self._read(name)
                if info.state is State.IN_PROGRESS and not self._alive(name):
                    self.fail(name, "interrupted: the process taking it ended before it finished")
                    done.append(f"{name}: interrupted backup marked invalid, its files removed")
                elif info.state is State.DELETING or (
                    # What a deletion leaves when it dies after its last step but one.
                    not _listdir(path) and not self._alive(name)
                ):
                    self._delete(info)
                    done.append(f"{name}: interrupted deletion finished")
                else:
                    done += self._remove_temporaries(path, grace)
            if self.wal_dir.is_dir():
                done += self._remove_temporaries(self.wal_dir, grace)
        return done

    # -- WAL

    def wal_segments(self) -> builtins.list[str]:
        """The archived WAL segments' names (no suffix), sorted (timeline, then position)."""
        names = {strip_suffix(n) for n in _listdir(self.wal_dir) if not n.startswith(TMP_PREFIX)}
        return sorted(n for n in names if _SEGMENT_RE.fullmatch(n))

    def wal_file(self, name: str) -> Path | None:
        """The stored file of a WAL segment or timeline history file, whatever its suffix."""
        if not (_SEGMENT_RE.fullmatch(name) or _HISTORY_RE.fullmatch(name)):
            raise StorageError(f"{name!r} is not a WAL segment or timeline history file name")
        for suffix in SUFFIXES:
            path = self.wal_dir / (name + suffix)
            if path.is_file():
                return path
        return None

    # -- internals

    def _ids(self) -> builtins.list[str]:
        return sorted(
            n
            for n in _listdir(self.backups_dir)
            if _ID_RE.fullmatch(n) and (self.backups_dir / n).is_dir()
        )

    def _read(self, backup_id: str) -> BackupInfo:
        path = self.backup_dir(backup_id) / METADATA
        try:
            info = BackupInfo.from_json(path.read_bytes())
            if info.id != backup_id or info.server != self.server:
                raise ValueError(f"it describes backup {info.id} of server {info.server!r}")
            return info
        except FileNotFoundError:
            why = f"no {METADATA} (deletion interrupted?)"
        except OSError as e:
            why = f"cannot read {path}: {e.strerror}"
        except (ValueError, TypeError, KeyError) as e:
            why = f"unreadable {path}: {type(e).__name__}: {e}"
        return BackupInfo(
            id=backup_id,
            server=self.server,
            state=State.INVALID,
            started=_id_time(backup_id),
            error=_scrub(why),
        )

    def _expect_in_progress(self, backup_id: str) -> None:
        current = self._read(backup_id)
        if current.state is not State.IN_PROGRESS:
            raise StorageError(
                f"backup {backup_id} of server {self.server!r} is {current.state}, not in progress"
            )

    def _alive(self, backup_id: str) -> bool:
        """Whether some process (this one included) is still taking this backup."""
        if backup_id in self._owned:
            return True
        return _dir_locked(self.backup_dir(backup_id))

    def _release(self, backup_id: str) -> None:
        fd = self._owned.pop(backup_id, None)
        if fd is not None:
            os.close(fd)

    def _delete(self, info: BackupInfo) -> None:
        d = self.backup_dir(info.id)
        self._release(info.id)
        try:
            if d.joinpath(METADATA).exists() or any(True for _ in d.iterdir()):
                deleting = dataclasses.replace(info, state=State.DELETING)
                atomic_write_bytes(d / METADATA, deleting.to_json())
            self._remove_contents(d)
            (d / METADATA).unlink(missing_ok=True)
            d.rmdir()
            fsync_dir(self.backups_dir)
        except OSError as e:
            raise StorageError(f"cannot delete {d}: {e.strerror or e}") from None

    def _remove_contents(self, d: Path) -> None:
        """Remove everything in a backup's directory but its metadata."""
        try:
            for entry in os.scandir(d):
                if entry.name == METADATA:
                    continue
                if entry.is_dir(follow_symlinks=False):
                    shutil.rmtree(entry.path)
                else:
                    os.unlink(entry.path)
            fsync_dir(d)
        except OSError as e:
            raise StorageError(f"cannot remove the files of {d}: {e.strerror or e}") from None

    def _remove_temporaries(self, d: Path, grace: float) -> builtins.list[str]:
        done = []
        limit = time.time() - grace
        for name in _listdir(d):
            if not name.startswith(TMP_PREFIX):
                continue
            path = d / name
            try:
                if path.is_file() and path.stat().st_mtime <= limit and is_abandoned(path):
                    path.unlink()
                    done.append(f"{path.relative_to(self.root)}: removed (an interrupted write)")
            except FileNotFoundError:
                pass
            except OSError as e:
                done.append(f"{path}: cannot remove: {e.strerror}")
        return done


def _listdir(d: Path) -> builtins.list[str]:
    try:
        return sorted(os.listdir(d))
    except FileNotFoundError:
        return []
    except OSError as e:
        raise StorageError(f"cannot read {d}: {e.strerror}") from None


def _flock(path: Path, timeout: float, what: str) -> int:
    """An fd of ``path`` (created if need be) holding its exclusive flock."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    except OSError as e:
        raise StorageError(f"cannot open {path}: {e.strerror}") from None
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise StorageError(f"cannot lock {path}: {e.strerror}") from None
        else:
            # Who holds it, for the message the next one to wait will print.
            with contextlib.suppress(OSError):
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            return fd
        if time.monotonic() >= deadline:
            holder = ""
            with contextlib.suppress(OSError, ValueError, IndexError):
                holder = f" (pid {int(os.pread(fd, 32, 0).split()[0])})"
            os.close(fd)
            raise StorageError(f"{what} is locked by another process{holder}")
        time.sleep(0.05)


def _dir_locked(path: Path) -> bool:
    """Whether someone holds the flock of a directory (its backup is being taken)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return True
        raise
    finally:
        os.close(fd)
    return False


# -- LSNs and segment names ---------------------------------------------------------------


def parse_lsn(text: str) -> int:
    """``"16/B374D848"`` -> its 64-bit position; ValueError if it is not an LSN."""
    high, sep, low = text.partition("/")
    if (
        not sep
        or not re.fullmatch(r"[0-9A-Fa-f]{1,8}", high)
        or not re.fullmatch(r"[0-9A-Fa-f]{1,8}", low)
    ):
        raise ValueError(f"{text!r} is not an LSN")
    return (int(high, 16) << 32) | int(low, 16)


def format_lsn(lsn: int) -> str:
    return f"{lsn >> 32:X}/{lsn & 0xFFFFFFFF:X}"


def segment_name(timeline: int, lsn: str | int, segment_size: int = WAL_SEGMENT_SIZE) -> str:
    """The name of the WAL segment holding ``lsn`` on ``timeline`` (as pg_walfile_name)."""
    position = parse_lsn(lsn) if isinstance(lsn, str) else lsn
    segno = position // segment_size
    per_id = 0x1_0000_0000 // segment_size
    return f"{timeline:08X}{segno // per_id:08X}{segno % per_id:08X}"
