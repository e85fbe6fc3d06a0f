"""The ``pgfleet`` command line.

Every failure a user can cause (bad argument, bad config, unreachable server
or repository, a repository role without the privilege a command needs, a
read-only repository) ends as one ``pgfleet: error: ...`` line on stderr and
a non-zero exit: 2 for the command line itself, 1 otherwise; tracebacks are
for bugs only.
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
from typing import Any, NoReturn

import psycopg

from pgfleet import __version__
from pgfleet.collector import commands
from pgfleet.config import ENV_CONFIG, Config, load
from pgfleet.connections import connect_repository, connect_repository_async, first_line
from pgfleet.errors import ConfigError, PgfleetError, RepositoryError
from pgfleet.log import escape
from pgfleet.repository import schema, servers, usage

EXIT_ERROR = 1
EXIT_USAGE = 2  # the command line itself
EXIT_PARTIAL = 3  # a snapshot was stored but some sources failed

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

    demo = sub.add_parser("demo", help="run a self-contained demo on embedded PostgreSQL")
    demo.add_argument("--seconds", type=_positive_int, default=60)
    demo.add_argument("--frequency", type=_positive_int, default=5)
    demo.add_argument("--workdir", default=".demo")
    return parser


def _repo_dsn(args: argparse.Namespace, cfg: Config) -> str:
    return str(args.repository or cfg.repository.dsn)


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


def _server_dict(s: servers.Server) -> dict[str, Any]:
    return {
        "srvid": s.srvid,
        "alias": s.alias,
        "host": s.host,
        "port": s.port,
        "username": s.username,
        "dbname": s.dbname,
        "password_ref": s.password_ref,
        "options": s.options,
        "frequency": s.frequency,
        "coalesce": s.coalesce,
        "retention_seconds": int(s.retention.total_seconds()),
        "enabled": s.enabled,
    }


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
                print(json.dumps([_server_dict(s) for s in rows], indent=2))
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
    return daemon.run(cfg, config_path=config_path, dsn=_repo_dsn(args, cfg), serve_web=serve_web)


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


def cmd_demo(args: argparse.Namespace, cfg: Config) -> int:
    from pgfleet.demo import run

    return run.run(seconds=args.seconds, frequency=args.frequency, workdir=args.workdir)


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
}


@functools.cache
def _parser() -> argparse.ArgumentParser:
    # Parsing leaves a parser as it was: one serves every call of main()
    # (tests call it thousands of times in-process).
    return build_parser()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
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
