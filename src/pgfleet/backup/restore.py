"""Restore a backup into a data directory ready to start, or into a tar.zst.

``restore()`` writes the backup's files into an empty (or new) directory:
each stored tar is read back through :mod:`store` (authenticated,
decompressed) and unpacked as it comes, every file hashed as it is written
and compared with the manifest; an incremental backup's chain (the full
backup, then each incremental one) is unpacked into temporary directories
beside the target and merged by ``pg_combinebackup`` (PostgreSQL 17+).  Then
the directory gets what recovery needs:

- ``recovery.signal``;
- in ``postgresql.auto.conf``: ``restore_command`` (``pgfleet backup wal-get``,
  which reads pgfleet's WAL store), and the target when one is given:
  ``recovery_target_time`` or ``recovery_target_lsn`` with
  ``recovery_target_action = 'promote'``.  Without a target, recovery replays
  every WAL segment the store has (and the segment pg_receivewal is still
  writing, up to where it got), then promotes.

Invariants: nothing is written into a directory that was not empty; on any
error (a damaged file, a wrong key, a full disk) what was written is
removed, the directory left as it was found, and the error names the file.
A restore never needs the server, nor the repository.

The files are not fsynced one by one: PostgreSQL syncs the whole data
directory when it starts from a backup (its ``pg_control`` says it was not
shut down).  The tar.zst of ``restore_archive()`` is fsynced and renamed into
place like any stored file.

``wal_get()`` is the other half: what ``restore_command`` runs, a WAL segment
or timeline history file from the store (or pg_receivewal's incoming
directory) into the path PostgreSQL asks for.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shlex
import shutil
import sys
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import zstandard

from pgfleet.backup import manifest as manifests
from pgfleet.backup.catalog import BackupInfo, Catalog, Kind, NotFound, State, parse_lsn
from pgfleet.backup.store import CHUNK_SIZE, StorageError, fsync_dir, open_read
from pgfleet.backup.tarstream import Member, Sink, TarError, TarReader
from pgfleet.backup.tools import ToolError, find_program, run
from pgfleet.backup.verify import BASE_TAR, HashingReader, read_manifest, stored_file
from pgfleet.errors import PgfleetError

__all__ = [
    "RestoreError",
    "RestoreResult",
    "choose",
    "pgfleet_command",
    "restore",
    "restore_archive",
    "wal_get",
    "wal_get_command",
]

COMBINE_MAJOR = 17
_HASHES = frozenset({"SHA224", "SHA256", "SHA384", "SHA512"})
_LSN_RE = re.compile(r"[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}")
_CONF = "postgresql.auto.conf"


class RestoreError(PgfleetError):
    """A restore was refused or failed; what it wrote is gone."""


@dataclass(frozen=True)
class RestoreResult:
    backup: BackupInfo
    chain: list[BackupInfo]  # the full backup first
    directory: Path | None
    archive: Path | None
    files: int
    raw_bytes: int


def choose(
    catalog: Catalog,
    which: str,
    *,
    target_time: datetime | None = None,
    target_lsn: str | None = None,
) -> BackupInfo:
    """The backup to restore: an ID, ``oldest`` or ``latest``.

    With a target, ``latest`` is the newest valid backup that ended before it
    (a backup cannot be rolled back to a time before its end).
    """
    if which == "latest" and (target_time is not None or target_lsn is not None):
        valid = [b for b in catalog.list() if b.state is State.VALID]
        if target_time is not None:
            fits = [b for b in valid if b.finished is not None and b.finished <= target_time]
            what = f"ended before {target_time.isoformat()}"
        else:
            assert target_lsn is not None
            lsn = parse_lsn(target_lsn)
            fits = [b for b in valid if b.end_lsn is not None and parse_lsn(b.end_lsn) <= lsn]
            what = f"ended before LSN {target_lsn}"
        if not fits:
            raise NotFound(f"server {catalog.server!r} has no valid backup that {what}")
        return fits[-1]
    info = catalog.get(which)
    if info.state is not State.VALID:
        why = f" ({info.error})" if info.error else ""
        raise RestoreError(f"backup {info.id} of server {catalog.server!r} is {info.state}{why}")
    if target_time is not None and target_time < info.started:
        raise RestoreError(
            f"backup {info.id} of server {catalog.server!r} started after "
            f"{target_time.isoformat()}: restore an older one"
        )
    if target_lsn is not None and info.end_lsn and parse_lsn(target_lsn) < parse_lsn(info.end_lsn):
        raise RestoreError(
            f"backup {info.id} of server {catalog.server!r} ends at {info.end_lsn}, "
            f"after {target_lsn}: restore an older one"
        )
    return info


def chain_of(catalog: Catalog, info: BackupInfo) -> list[BackupInfo]:
    """The backups a restore of ``info`` needs, the full one first."""
    chain = [info]
    while chain[0].kind is Kind.INCREMENTAL:
        parent = chain[0].parent
        if parent is None:
            raise RestoreError(f"incremental backup {chain[0].id} names no parent")
        try:
            p = catalog.get(parent)
        except NotFound:
            raise RestoreError(
                f"backup {info.id} of server {catalog.server!r} needs {parent}, which is gone"
            ) from None
        if p.state is not State.VALID:
            raise RestoreError(
                f"backup {info.id} of server {catalog.server!r} needs {p.id}, which is {p.state}"
            )
        if len(chain) > 1000 or p in chain:
            raise RestoreError(f"backup {info.id}: its chain of parents loops")
        chain.insert(0, p)
    return chain


def pgfleet_command() -> list[str]:
    """How to run this pgfleet from a shell (PostgreSQL's restore_command)."""
    script = Path(sys.executable).with_name("pgfleet")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "pgfleet.cli"]


def wal_get_command(
    catalog: Catalog, *, key_file: str | None = None, program: Sequence[str] | None = None
) -> str:
    """The restore_command that fetches WAL from ``catalog``'s store."""
    parts = [*(program or pgfleet_command()), "backup", "wal-get"]
    parts += ["--directory", str(catalog.directory.absolute())]
    if key_file:
        parts += ["--key-file", str(Path(key_file).absolute())]
    parts.append(catalog.server)
    # PostgreSQL replaces %f and %p, and reads %% as one %.
    return " ".join(shlex.quote(p).replace("%", "%%") for p in parts) + " %f %p"


# -- restore ---------------------------------------------------------------------


def restore(
    catalog: Catalog,
    info: BackupInfo,
    directory: Path,
    *,
    key: bytes | None,
    restore_command: str | None,
    target_time: datetime | None = None,
    target_lsn: str | None = None,
    bin_dir: str = "",
) -> RestoreResult:
    """Restore ``info`` into ``directory`` (new or empty), ready for ``pg_ctl start``."""
    if target_time is not None and target_lsn is not None:
        raise RestoreError("give a target time or a target LSN, not both")
    if target_lsn is not None and not _LSN_RE.fullmatch(target_lsn):
        raise RestoreError(f"invalid LSN {target_lsn!r}: expected e.g. 0/3000060")
    directory = Path(directory).absolute()
    chain = chain_of(catalog, info)
    with _fresh_directory(directory):
        files, raw = _write_data(catalog, chain, directory, key=key, bin_dir=bin_dir)
        _write_recovery(
            directory,
            info,
            restore_command=restore_command,
            target_time=target_time,
            target_lsn=target_lsn,
        )
    return RestoreResult(info, chain, directory, None, files, raw)


def restore_archive(
    catalog: Catalog,
    info: BackupInfo,
    archive: Path,
    *,
    key: bytes | None,
    restore_command: str | None,
    target_time: datetime | None = None,
    target_lsn: str | None = None,
    bin_dir: str = "",
) -> RestoreResult:
    """As :func:`restore`, into a tar compressed with zstd (the data directory at its root)."""
    archive = Path(archive).absolute()
    if archive.exists():
        raise RestoreError(f"{archive} exists: refusing to overwrite it")
    work = archive.parent / f".tmp-restore-{archive.name}-{secrets.token_hex(4)}"
    try:
        result = restore(
            catalog,
            info,
            work,
            key=key,
            restore_command=restore_command,
            target_time=target_time,
            target_lsn=target_lsn,
            bin_dir=bin_dir,
        )
        _write_tar_zst(work, archive)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return RestoreResult(info, result.chain, None, archive, result.files, result.raw_bytes)


@contextlib.contextmanager
def _fresh_directory(directory: Path) -> Iterator[None]:
    """An empty ``directory`` to fill; emptied again (or removed, if made) on error."""
    made = False
    if directory.exists() or directory.is_symlink():
        if not directory.is_dir():
            raise RestoreError(f"{directory} exists and is not a directory")
        try:
            if any(directory.iterdir()):
                raise RestoreError(f"{directory} is not empty: refusing to restore over it")
        except OSError as e:
            raise RestoreError(f"cannot read {directory}: {e.strerror}") from None
    else:
        try:
            directory.mkdir(mode=0o700, parents=True)
        except OSError as e:
            raise RestoreError(f"cannot create {directory}: {e.strerror}") from None
        made = True
    try:
        directory.chmod(0o700)
        yield
    except BaseException:
        if made:
            shutil.rmtree(directory, ignore_errors=True)
        else:
            _empty(directory)
        raise


def _empty(directory: Path) -> None:
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory):
            if entry.is_dir(follow_symlinks=False):
                shutil.rmtree(entry.path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)


def _write_data(
    catalog: Catalog, chain: list[BackupInfo], directory: Path, *, key: bytes | None, bin_dir: str
) -> tuple[int, int]:
    if len(chain) == 1:
        return _unpack(catalog, chain[0], directory, key)
    info = chain[-1]
    major = (info.pg_version or 0) // 10000
    try:
        combine = find_program(
            "pg_combinebackup",
            major,
            bin_dir=bin_dir,
            minimum=COMBINE_MAJOR,
            connects=False,
        )
    except ToolError as e:
        raise RestoreError(f"backup {info.id} is incremental: {e}") from None
    parts: list[Path] = []
    files = raw = 0
    try:
        for b in chain:
            part = directory.parent / f".tmp-restore-{b.id}-{secrets.token_hex(4)}"
            part.mkdir(mode=0o700)
            parts.append(part)
            n, size = _unpack(catalog, b, part, key)
            files, raw = files + n, raw + size
        try:
            # Into the target, empty: pg_combinebackup takes an empty directory.
            run(combine, ["-o", str(directory), *map(str, parts)])
        except ToolError as e:
            raise RestoreError(f"combining backups {chain[0].id}..{info.id}: {e}") from None
    finally:
        for part in parts:
            shutil.rmtree(part, ignore_errors=True)
    return files, raw


class _FileSink:
    """A restored file: written, hashed, compared with the manifest at its end."""

    def __init__(
        self, path: Path, name: str, entry: manifests.FileEntry | None, mode: int, where: str
    ) -> None:
        self._name = name
        self._entry = entry
        self._where = where
        self._hasher = hashlib.new(entry.algorithm.lower()) if entry and entry.checksum else None
        self._size = 0
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, mode)
        except OSError as e:
            raise RestoreError(f"cannot write {path}: {e.strerror}") from None
        self._f = os.fdopen(fd, "wb", buffering=CHUNK_SIZE)

    def write(self, data: memoryview) -> None:
        if self._hasher is not None:
            self._hasher.update(data)
        self._size += len(data)
        try:
            self._f.write(data)
        except OSError as e:
            raise RestoreError(f"cannot write {self._f.name}: {e.strerror}") from None

    def close(self) -> None:
        try:
            self._f.close()
        except OSError as e:
            raise RestoreError(f"cannot write {self._name}: {e.strerror}") from None
        entry = self._entry
        if entry is None:
            return
        if self._size != entry.size:
            raise RestoreError(
                f"{self._where}: {entry.path}: {self._size} bytes, the manifest says {entry.size}"
            )
        if self._hasher is not None and self._hasher.hexdigest() != entry.checksum:
            raise RestoreError(f"{self._where}: {entry.path}: {entry.algorithm} checksum mismatch")


def _unpack(
    catalog: Catalog, info: BackupInfo, directory: Path, key: bytes | None
) -> tuple[int, int]:
    """Unpack one backup's base.tar into ``directory``, every file checked; (files, bytes)."""
    try:
        manifest = read_manifest(catalog, info, key)
    except StorageError as e:
        raise RestoreError(f"backup {info.id}: {e}") from None
    expected = {e.path: e for e in manifest.files}
    for entry in expected.values():
        if entry.checksum is not None and entry.algorithm not in _HASHES:
            raise RestoreError(
                f"backup {info.id}: {entry.path}: {entry.algorithm} checksums are not supported"
            )
    seen: set[str] = set()
    path = stored_file(catalog, info, BASE_TAR)
    where = f"backup {info.id}, {path.name}"
    root = directory.resolve()

    def opener(member: Member) -> Sink | None:
        name = _safe_name(member.name, where)
        if not name:
            return None
        target = root / name
        if member.kind == "dir":
            target.mkdir(mode=0o700, parents=True, exist_ok=True)
            return None
        if member.kind != "file":
            raise RestoreError(
                f"{where}: {member.name}: a {member.kind} (tablespaces are not supported)"
            )
        target.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        entry = expected.get(name)
        if entry is not None:
            seen.add(name)
        return _FileSink(target, name, entry, 0o600, where)

    reader = TarReader(opener)
    try:
        with open_read(path, key) as r:
            hashing = HashingReader(r)
            while data := hashing.read(CHUNK_SIZE):
                reader.feed(data)
            reader.close()
        expected_sha = info.checksums.get(path.name)
        if expected_sha is not None and hashing.hash.hexdigest() != expected_sha:
            raise RestoreError(f"{path}: its content is not what was stored (SHA-256 differs)")
    except StorageError as e:
        raise RestoreError(str(e)) from None
    except TarError as e:
        raise RestoreError(f"{where}: {e}") from None
    missing = sorted(set(expected) - seen)
    if missing:
        raise RestoreError(f"{where}: {missing[0]}: in the manifest but not in the backup")
    return reader.members, r.raw_bytes


def _safe_name(name: str, where: str) -> str:
    """A member's name as a relative path inside the target, or RestoreError."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if name.startswith("/") or ".." in parts or "\0" in name:
        raise RestoreError(f"{where}: {name!r}: a path outside the data directory")
    return "/".join(parts)


def _conf_quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _write_recovery(
    directory: Path,
    info: BackupInfo,
    *,
    restore_command: str | None,
    target_time: datetime | None,
    target_lsn: str | None,
) -> None:
    if not restore_command:
        # No WAL store to recover from: the backup's own WAL (-X fetch) makes
        # it consistent by crash recovery, which a recovery.signal without a
        # restore_command would stop (PostgreSQL refuses to start).
        if target_time is not None or target_lsn is not None:
            raise RestoreError("a recovery target needs a restore_command (the WAL store)")
        return
    lines = [
        "",
        f"# Added by 'pgfleet backup restore': backup {info.id} of server {info.server!r}",
    ]
    if restore_command:
        lines.append(f"restore_command = {_conf_quote(restore_command)}")
    if target_time is not None:
        lines.append(f"recovery_target_time = {_conf_quote(target_time.isoformat(sep=' '))}")
    if target_lsn is not None:
        lines.append(f"recovery_target_lsn = {_conf_quote(target_lsn)}")
    if target_time is not None or target_lsn is not None:
        lines.append("recovery_target_action = 'promote'")
    lines.append("recovery_target_timeline = 'latest'")
    try:
        with open(directory / _CONF, "a", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
        (directory / "recovery.signal").touch(mode=0o600)
    except OSError as e:
        raise RestoreError(f"cannot write {e.filename}: {e.strerror}") from None


def _write_tar_zst(source: Path, archive: Path) -> None:
    """Pack ``source``'s contents into ``archive``, a zstd-compressed tar: whole or not at all."""
    tmp = archive.with_name(f".tmp-{archive.name}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "xb") as raw:
            os.chmod(tmp, 0o600)
            cctx = zstandard.ZstdCompressor(level=3, write_checksum=True, threads=0)
            with (
                cctx.stream_writer(raw, closefd=False) as z,
                tarfile.open(fileobj=z, mode="w|", format=tarfile.PAX_FORMAT) as tar,
            ):
                for entry in sorted(source.iterdir()):
                    tar.add(entry, arcname=entry.name)
            raw.flush()
            os.fsync(raw.fileno())
        os.rename(tmp, archive)
        fsync_dir(archive.parent)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise RestoreError(f"cannot write {archive}: {e.strerror or e}") from None
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


# -- wal-get ---------------------------------------------------------------------


def wal_get(catalog: Catalog, name: str, dest: Path, key: bytes | None) -> Path:
    """Copy WAL file ``name`` (a segment or a timeline history file) to ``dest``.

    From the store; or, not there yet, from pg_receivewal's directory: a
    completed segment not moved yet, or the one it is still writing
    (``.partial``, zero-filled past what it received, where recovery stops).
    Return where it came from; NotFound when nowhere.
    """
    stored = catalog.wal_file(name)  # checks the name
    dest = Path(dest)
    tmp = dest.with_name(f".tmp-{dest.name}-{secrets.token_hex(4)}")
    try:
        if stored is not None:
            with open(tmp, "wb") as out, open_read(stored, key) as r:
                while data := r.read(CHUNK_SIZE):
                    out.write(data)
            source = stored
        else:
            for candidate in (
                catalog.incoming_dir / name,
                catalog.incoming_dir / f"{name}.partial",
            ):
                if candidate.is_file():
                    shutil.copyfile(candidate, tmp)
                    source = candidate
                    break
            else:
                raise NotFound(f"server {catalog.server!r}: no WAL file {name} in the store")
        os.replace(tmp, dest)
    except OSError as e:
        raise StorageError(f"cannot write {dest}: {e.strerror or e}") from None
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()
    return source
