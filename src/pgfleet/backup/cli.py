"""``pgfleet backup ...``: the backup commands behind :mod:`pgfleet.cli`'s parser.

Only ``create`` and ``receive`` need the repository (the server's connection
settings are there); every other command reads the backup directory alone,
so that a restore works on a machine that has the backups and nothing else.
Errors are PgfleetError: one line, exit 1.

``create``, ``delete`` and ``retain`` change the catalog: when a repository
is configured they copy it there too, for the web UI (as the daemon does, see
:mod:`pgfleet.backup.mirror`).  A repository that cannot take it is a
warning, never a failure of the backup work done.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import shlex
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pgfleet.backup import retention
from pgfleet.backup.catalog import BackupInfo, Catalog, State
from pgfleet.backup.store import Codec, Compression, load_key
from pgfleet.config import Config
from pgfleet.errors import ConfigError, PgfleetError
from pgfleet.repository.usage import human_bytes

__all__ = ["codec_for", "max_rate_for", "run"]

ENCRYPTED = "aes-256-gcm"


def run(args: argparse.Namespace, cfg: Config, repo_dsn: str) -> int:
    catalog = Catalog(_directory(args, cfg), args.server)
    try:
        return _ACTIONS[args.backup_action](args, cfg, catalog, repo_dsn)
    except OSError as e:
        # What the store and catalog did not word themselves (a name too long...).
        where = f"{e.filename}: " if e.filename else ""
        raise PgfleetError(f"{where}{e.strerror or e}") from None


def _directory(args: argparse.Namespace, cfg: Config) -> Path:
    directory = getattr(args, "directory", None) or cfg.backup.directory
    if not directory:
        raise ConfigError("no backup directory: set [backup] directory, or pass --directory")
    return Path(directory).expanduser()


def _key_file(args: argparse.Namespace, cfg: Config) -> str:
    return str(getattr(args, "key_file", None) or cfg.backup.encryption_key_file)


def _read_key(args: argparse.Namespace, cfg: Config) -> bytes | None:
    """The key to read backups with, if one is given (an unencrypted backup needs none)."""
    path = _key_file(args, cfg)
    return load_key(path) if path else None


def codec_for(cfg: Config, alias: str, key_file: str = "") -> Codec:
    """How ``alias``'s new backups and WAL are stored, per [backup] and its overrides."""
    b = cfg.backup
    settings = b.for_server(alias)
    key = None
    if b.encryption == ENCRYPTED:
        path = key_file or b.encryption_key_file
        if not path:
            raise ConfigError(f"[backup] encryption {ENCRYPTED!r} needs encryption_key_file")
        key = load_key(path)
    return Codec(Compression(settings.compression), b.compression_level or None, key)


def max_rate_for(cfg: Config, alias: str, given: str | None) -> str | None:
    """The transfer limit of ``create``; None for none.

    ``--max-rate`` (``given``) when given, "" meaning none; else the configuration's:
    ``[backup] max_rate``, or ``alias``'s ``[[backup.servers]]`` override.
    """
    rate = cfg.backup.for_server(alias).max_rate if given is None else given
    return rate or None


def _server(repo_dsn: str, alias: str) -> Any:
    from pgfleet.connections import connect_repository
    from pgfleet.repository import schema, servers

    with connect_repository(repo_dsn) as conn:
        schema.require_current(conn)
        return servers.get(conn, alias)


def _mirror(cfg: Config, repo_dsn: str, catalog: Catalog) -> None:
    """Copy ``catalog`` into the repository, if one is configured; a warning if it fails."""
    if not repo_dsn:
        return
    from psycopg import Error as DatabaseError
    from psycopg.conninfo import conninfo_to_dict, make_conninfo

    from pgfleet.connections import connect_repository, first_line
    from pgfleet.repository import backups, schema, servers

    try:
        listed = catalog.list()
        dsn = repo_dsn
        with contextlib.suppress(DatabaseError):  # a bad DSN: connect_repository says so
            if "connect_timeout" not in conninfo_to_dict(dsn):
                # The backup is done: a repository that does not answer must
                # not hold the command for libpq's default (for ever).
                timeout = max(1, round(cfg.collector.connect_timeout))
                dsn = make_conninfo(dsn, connect_timeout=timeout)
        with connect_repository(dsn) as conn:
            schema.require_current(conn)
            try:
                server = servers.get(conn, catalog.server)
            except ConfigError:
                return  # not registered (any more): no rows to keep up to date
            backups.mirror(conn, server.srvid, listed)
    except (PgfleetError, DatabaseError, OSError) as e:
        reason = str(e) if isinstance(e, PgfleetError) else first_line(e)
        print(
            f"pgfleet: warning: the repository's list of the backups of server "
            f"{catalog.server!r} (for the web UI) is not updated: {reason}",
            file=sys.stderr,
        )


# -- actions


def _create(args: argparse.Namespace, cfg: Config, catalog: Catalog, repo_dsn: str) -> int:
    from pgfleet.backup.base import BaseBackup

    server = _server(repo_dsn, args.server)
    job = BaseBackup(
        catalog,
        server,
        cfg.collector,
        codec_for(cfg, server.alias, getattr(args, "key_file", None) or ""),
        incremental=args.incremental,
        label=args.label,
        bin_dir=cfg.backup.bin_dir,
        max_rate=max_rate_for(cfg, server.alias, args.max_rate),
    )
    try:
        info = job.run()
    finally:
        _mirror(cfg, repo_dsn, catalog)  # a failed backup too: INVALID, and why
    if args.json:
        print(json.dumps(_as_json(info), indent=2))
    else:
        print(
            f"backup {info.id} of server {info.server!r}: {info.kind}, "
            f"{human_bytes(info.raw_bytes)} raw, {human_bytes(info.stored_bytes)} stored, "
            f"{_duration(info)}, {info.start_lsn}..{info.end_lsn} (timeline {info.timeline})"
        )
    return 0


def _ls(args: argparse.Namespace, cfg: Config, catalog: Catalog, repo_dsn: str) -> int:
    backups = catalog.list()
    if args.json:
        print(json.dumps([_as_json(b) for b in backups], indent=2))
        return 0
    if not backups:
        print(f"server {catalog.server!r} has no backups in {catalog.directory}")
        return 0
    rows = [
        [
            b.id,
            b.state,
            b.kind if b.parent is None else f"{b.kind} of {b.parent}",
            _duration(b),
            human_bytes(b.raw_bytes),
            human_bytes(b.stored_bytes),
            f"{b.start_lsn or '-'}..{b.end_lsn or '-'}",
            b.timeline or "-",
            f"{b.start_wal or '-'}..{b.end_wal or '-'}",
        ]
        for b in backups
    ]
    _table(["id", "state", "kind", "duration", "raw", "stored", "lsn", "tli", "wal"], rows)
    return 0


def _info(args: argparse.Namespace, cfg: Config, catalog: Catalog, repo_dsn: str) -> int:
    b = catalog.get(args.id)
    if args.json:
        print(json.dumps(_as_json(b), indent=2))
        return 0
    fields: list[tuple[str, Any]] = [
        ("id", b.id),
        ("server", b.server),
        ("state", b.state),
        ("kind", b.kind),
        ("parent", b.parent or "-"),
        ("label", b.label or "-"),
        ("started", b.started.isoformat()),
        ("finished", b.finished.isoformat() if b.finished else "-"),
        ("duration", _duration(b)),
        ("raw", f"{human_bytes(b.raw_bytes)} ({b.raw_bytes} bytes)"),
        ("stored", f"{human_bytes(b.stored_bytes)} ({b.stored_bytes} bytes)"),
        ("compression", b.compression),
        ("encrypted", "yes" if b.encrypted else "no"),
        ("start lsn", b.start_lsn or "-"),
        ("end lsn", b.end_lsn or "-"),
        ("timeline", b.timeline or "-"),
        ("wal", f"{b.start_wal or '-'}..{b.end_wal or '-'}"),
        ("postgresql", _version(b.pg_version)),
        ("system identifier", b.system_identifier or "-"),
        ("files", ", ".join(b.files) or "-"),
    ]
    if b.error:
        fields.append(("error", b.error))
    width = max(len(k) for k, _ in fields)
    for k, v in fields:
        print(f"{k.ljust(width)}  {v}")
    return 0


def _verify(args: argparse.Namespace, cfg: Config, catalog: Catalog, repo_dsn: str) -> int:
    from pgfleet.backup.verify import verify

    result = verify(catalog, args.id, _read_key(args, cfg))
    b = result.backup
    if not result.ok:
        raise PgfleetError(
            f"backup {b.id} of server {catalog.server!r} is damaged: {result.problems[0]}"
        )
    print(
        f"backup {b.id} of server {catalog.server!r} is intact: {result.files_checked} files "
        f"read back, every file of the data directory matches its manifest"
    )
    return 0


def _restore(args: argparse.Namespace, cfg: Config, catalog: Catalog, repo_dsn: str) -> int:
    from pgfleet.backup import restore

    if (args.dir is None) == (args.archive is None):
        raise ConfigError("give a directory to restore into, or --archive FILE (not both)")
    if args.target_lsn is not None:
        from pgfleet.backup.catalog import parse_lsn

        try:
            parse_lsn(args.target_lsn)
        except ValueError:
            raise ConfigError(f"invalid LSN {args.target_lsn!r}: expected e.g. 0/3000060") from None
    key = _read_key(args, cfg)
    info = restore.choose(
        catalog, args.id, target_time=args.target_time, target_lsn=args.target_lsn
    )
    program = None
    if args.pgfleet_command:
        try:
            program = shlex.split(args.pgfleet_command)
        except ValueError as e:
            raise ConfigError(f"invalid --pgfleet-command: {e}") from None
        if not program:
            raise ConfigError("invalid --pgfleet-command: empty")
    # The key goes into restore_command only if the WAL may be encrypted: the
    # server's OS user would have to read it for nothing otherwise.
    may_be_encrypted = info.encrypted or cfg.backup.encryption != "none"
    key_file = _key_file(args, cfg) if may_be_encrypted else ""
    command = restore.wal_get_command(catalog, key_file=key_file or None, program=program)
    options: dict[str, Any] = {
        "key": key,
        "restore_command": command,
        "target_time": args.target_time,
        "target_lsn": args.target_lsn,
        "bin_dir": cfg.backup.bin_dir,
    }
    if args.archive:
        result = restore.restore_archive(catalog, info, Path(args.archive), **options)
        where = f"into {result.archive} (extract it into an empty directory)"
    else:
        result = restore.restore(catalog, info, Path(args.dir), **options)
        where = f"into {result.directory}"
    chain = " + ".join(b.id for b in result.chain)
    target = ""
    if args.target_time is not None:
        target = f", recovering to {args.target_time.isoformat()}"
    elif args.target_lsn is not None:
        target = f", recovering to {args.target_lsn}"
    print(
        f"backup {chain} of server {catalog.server!r} restored {where}{target}: "
        f"{human_bytes(result.raw_bytes)}; start it with pg_ctl (as the OS user that owns it)"
    )
    return 0


def _retain(args: argparse.Namespace, cfg: Config, catalog: Catalog, repo_dsn: str) -> int:
    policy = retention.parse(cfg.backup.for_server(catalog.server).retention)
    for line in catalog.cleanup():
        print(line)
    done = retention.retain(catalog, policy)
    _mirror(cfg, repo_dsn, catalog)
    deleted = ", ".join(b.id for b in done.deleted) or "none"
    print(
        f"server {catalog.server!r}, retention {policy}: kept {len(done.kept)} backups, "
        f"deleted {deleted}; removed {len(done.wal_removed)} WAL files"
    )
    return 0


def _expunge(args: argparse.Namespace, cfg: Config, catalog: Catalog, repo_dsn: str) -> int:
    oldest = retention.wal_to_keep(catalog.list())
    removed = retention.expunge_wal(catalog, oldest)
    if oldest is None:
        print(f"server {catalog.server!r}: no valid backup says which WAL it needs; all kept")
    else:
        print(f"server {catalog.server!r}: removed {len(removed)} WAL files before {oldest}")
    return 0


def _delete(args: argparse.Namespace, cfg: Config, catalog: Catalog, repo_dsn: str) -> int:
    info = catalog.get(args.id)
    valid = [b for b in catalog.list() if b.state is State.VALID]
    if not args.force and info.state is State.VALID and len(valid) == 1:
        raise PgfleetError(
            f"backup {info.id} is the only valid backup of server {catalog.server!r}: "
            "--force to delete it all the same"
        )
    catalog.delete(info.id, force=args.force)
    _mirror(cfg, repo_dsn, catalog)
    print(f"backup {info.id} of server {catalog.server!r} deleted")
    return 0


def _wal_get(args: argparse.Namespace, cfg: Config, catalog: Catalog, repo_dsn: str) -> int:
    from pgfleet.backup.restore import wal_get

    wal_get(catalog, args.file, Path(args.dest), _read_key(args, cfg))
    return 0


def _receive(args: argparse.Namespace, cfg: Config, catalog: Catalog, repo_dsn: str) -> int:
    from pgfleet import log
    from pgfleet.backup.wal import WalReceiver

    server = _server(repo_dsn, args.server)
    log.setup(cfg.logging.level, cfg.logging.format)
    receiver = WalReceiver(
        catalog,
        server,
        cfg.collector,
        codec_for(cfg, server.alias, getattr(args, "key_file", None) or ""),
        bin_dir=cfg.backup.bin_dir,
    )

    async def main() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(sig, receiver.stop)
        await receiver.run()

    asyncio.run(main())
    status = receiver.status()
    print(
        f"server {server.alias!r}: {status.segments_stored} WAL segments stored"
        + (f", the last {status.last_segment}" if status.last_segment else ""),
        file=sys.stderr,
    )
    return 0


_ACTIONS = {
    "create": _create,
    "ls": _ls,
    "info": _info,
    "verify": _verify,
    "restore": _restore,
    "retain": _retain,
    "expunge": _expunge,
    "delete": _delete,
    "wal-get": _wal_get,
    "receive": _receive,
}


# -- formatting


def _as_json(b: BackupInfo) -> dict[str, Any]:
    out = b.to_dict()
    out.pop("format", None)
    duration = b.duration
    # An ID bumped past a backup of the same second starts a little late: never below 0.
    seconds = None if duration is None else max(round(duration.total_seconds(), 3), 0.0)
    out["duration_seconds"] = seconds
    return out


def _duration(b: BackupInfo) -> str:
    d = b.duration
    if d is None:
        if b.state is State.IN_PROGRESS:
            return f"{(datetime.now(UTC) - b.started).total_seconds():.0f} s so far"
        return "-"
    s = max(d.total_seconds(), 0.0)
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60)} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60)} min"


def _version(num: int | None) -> str:
    if not num:
        return "-"
    return f"{num // 10000}.{num % 10000}"


def _table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [headers, *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
