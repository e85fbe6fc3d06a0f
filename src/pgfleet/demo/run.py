"""``pgfleet demo`` (``make demo``): ``pgfleet run`` on embedded PostgreSQL, until Ctrl-C.

Everything lives in one work directory (``.demo`` by default), remade at each
start:

- ``repository``: the embedded repository (:mod:`pgfleet.embedded`, the one
  ``pgfleet run`` uses when no repository is configured, with the work
  directory as its state directory), fsync off;
- ``primary``: a monitored PostgreSQL 18 with pg_stat_statements (the one
  statistics extension the embedded build ships), under a light pgbench load;
- ``standby``: its hot standby, made with pg_basebackup, under a read-only
  pgbench load, so that replication shows on both;
- ``spool``: the collector's spool, name and management socket.

Both servers are registered with a short frequency, then the real daemon runs
in the foreground: the collector, its Prometheus exporter and the web UI, as
``pgfleet run`` does (:func:`pgfleet.collector.daemon.run`), until Ctrl-C or
SIGTERM, after which everything stops. The console shows the URLs once they
answer, and a line per snapshot, both made from the daemon's own log records
(:class:`_Console`); of its log lines proper only warnings and errors are
printed.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from pgfleet.cluster import Cluster
from pgfleet.config import (
    CollectorConfig,
    Config,
    ExporterConfig,
    LoggingConfig,
    RepositoryConfig,
    SpoolConfig,
    WebConfig,
)
from pgfleet.embedded import EmbeddedRepository
from pgfleet.errors import ClusterError, ConfigError
from pgfleet.repository import servers

# The work directory's lock, the one file a new start keeps: its presence
# also tells that the directory is a demo's, safe to empty.
_LOCK = "demo.lock"
_CLUSTERS = ("repository", "primary", "standby")
# The load: transactions per second, rate-limited (a light one).
_PRIMARY_TPS = 20
_STANDBY_TPS = 10
# The demo's admin role in the repository (for the web UI's live workers).
_ADMIN = "demo"


def _line(text: str = "") -> None:
    print(text, flush=True)


def run(
    *,
    frequency: int = 5,
    workdir: str = ".demo",
    seconds: int | None = None,
    web: bool = True,
) -> int:
    """Start everything, run the daemon until a signal (or `seconds`), stop everything."""
    t0 = time.monotonic()
    base = Path(workdir).absolute()
    with contextlib.ExitStack() as stack:
        stack.enter_context(_workdir(base))
        for name in ("primary", "standby"):
            stack.callback(Cluster.embedded(base / name, name=name).stop)
        # The monitored servers are made while the repository is: half the wait.
        pool = ThreadPoolExecutor(1, thread_name_prefix="demo-servers")
        stack.callback(pool.shutdown)  # before they stop, their making is over
        making = pool.submit(_monitored, base)
        repo = stack.enter_context(EmbeddedRepository(base, durable=False, say=None))
        from pgfleet.collector import daemon  # a second or so of imports, meanwhile

        primary, standby = making.result()
        token = secrets.token_urlsafe(12)
        password = secrets.token_urlsafe(9)
        _register(repo.dsn, primary, standby, frequency, password)
        stack.enter_context(_load(primary, "-R", str(_PRIMARY_TPS), clients=2))
        stack.enter_context(_load(standby, "-S", "-n", "-R", str(_STANDBY_TPS), clients=1))

        cfg = Config(
            repository=RepositoryConfig(dsn=repo.dsn),
            collector=CollectorConfig(shutdown_timeout=10.0),
            spool=SpoolConfig(directory=str(base / "spool")),
            logging=LoggingConfig(level="warning"),
            exporter=ExporterConfig(port=_port(9630)),
            web=WebConfig(enabled=web, port=_port(8080), token=token),
            source="pgfleet demo",
        )

        def ready(urls: dict[str, str]) -> None:
            _line(f"pgfleet demo: pgfleet run (the collector, its exporter and the web UI) on "
                  f"embedded PostgreSQL {primary.version_num // 10000}, "
                  f"a snapshot every {frequency} s")  # fmt: skip
            if "web" in urls:
                _line(f"  web UI      {urls['web']}")
                _line(f"              log in with the token {token} (read-only),")
                _line(f"              or as {_ADMIN!r}, password {password} (pgfleet_admin: live"
                      " workers, snapshot now)")  # fmt: skip
            if "exporter" in urls:
                _line(f"  metrics     {urls['exporter']}")
            _line(f"  repository  {repo.cluster.datadir} (embedded, on its Unix socket only)")
            _line(f"  primary     {primary.host}:{primary.port}, pgbench: 2 clients, "
                  f"{_PRIMARY_TPS} transactions/s")  # fmt: skip
            _line(f"  standby     {standby.host}:{standby.port}, hot standby of primary, "
                  f"pgbench --select-only: {_STANDBY_TPS} transactions/s")  # fmt: skip
            stop = (
                f"everything stops in {seconds} s, or at Ctrl-C"
                if seconds
                else "Ctrl-C stops everything"
            )
            _line(f"started in {time.monotonic() - t0:.1f} s; {stop}")
            if seconds:
                timer = threading.Timer(seconds, os.kill, (os.getpid(), signal.SIGTERM))
                timer.daemon = True
                timer.start()

        with _Console(ready):
            rc = daemon.run(cfg, config_path=None, dsn=repo.dsn, serve_web=web)
        _line("pgfleet demo: stopping the servers")
    _line("pgfleet demo: stopped")
    return rc


def _monitored(base: Path) -> tuple[Cluster, Cluster]:
    """The primary, with pgbench's tables in its database bench, and its hot standby."""
    primary = Cluster.embedded(
        base / "primary", name="primary", shared_preload_libraries="pg_stat_statements"
    )
    primary.init()
    primary.start()
    primary.create_database("bench")
    primary.create_extension("pg_stat_statements", "bench")
    primary.pgbench_init("bench", scale=1)
    standby = primary.standby(base / "standby", name="standby")
    return primary, standby


@contextlib.contextmanager
def _workdir(base: Path) -> Iterator[None]:
    """Lock the work directory, and empty it of a previous demo's files."""
    if base.exists() and any(base.iterdir()) and not (base / _LOCK).exists():
        raise ConfigError(f"{base} is not empty and not a pgfleet demo's: give another --workdir")
    # When we are root the servers' OS user must get through it: search only.
    base.mkdir(mode=0o711 if os.geteuid() == 0 else 0o700, parents=True, exist_ok=True)
    with (base / _LOCK).open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ConfigError(f"another pgfleet demo runs in {base}") from None
        # A demo killed (SIGKILL) left its servers running: stop them first.
        for name in _CLUSTERS:
            leftover = Cluster.embedded(base / name, name=name)
            if leftover.is_running():
                leftover.stop(mode="immediate")
        for entry in base.iterdir():
            if entry.name == _LOCK:
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
        yield


def _register(
    repo_dsn: str, primary: Cluster, standby: Cluster, frequency: int, password: str
) -> None:
    """Register both servers, and the admin role of the web UI's logins."""
    with psycopg.connect(repo_dsn, autocommit=True) as conn:
        for alias, c in (("primary", primary), ("standby", standby)):
            # Aggregated every minute or so: the history (and 'repo size')
            # fills within the demo too.
            servers.add(
                conn,
                alias,
                host=c.host,
                port=c.port,
                username="postgres",
                frequency=frequency,
                coalesce=max(2, 60 // frequency),
            )
        conn.execute(
            sql.SQL("CREATE ROLE {} LOGIN PASSWORD {} IN ROLE pgfleet_admin").format(
                sql.Identifier(_ADMIN), sql.Literal(password)
            )
        )


@contextlib.contextmanager
def _load(cluster: Cluster, *args: str, clients: int) -> Iterator[None]:
    """pgbench on `cluster`'s bench database, rate-limited, for as long as the demo runs."""
    proc = cluster.pgbench_start("bench", seconds=7 * 86400, clients=clients, extra_args=args)
    try:
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def _port(preferred: int) -> int:
    """`preferred` if free on the loopback, else any free port."""
    for port in (preferred, 0):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            bound: int = s.getsockname()[1]
            return bound
    raise ClusterError("no free port on 127.0.0.1")


class _Console(logging.Filter):
    """The daemon's log records, as the demo's console shows them.

    The daemon logs its URLs and each snapshot at the info and debug levels;
    at the demo's level (warning) its handler prints neither. This filter, on
    the loggers of the daemon and of its workers (their levels lowered so the
    records are made at all), turns those into the demo's lines and lets only
    warnings and errors go on to the daemon's handler.
    """

    _LOGGERS = (("pgfleet.daemon", logging.INFO), ("pgfleet.worker", logging.DEBUG))

    def __init__(self, ready: Callable[[dict[str, str]], None]) -> None:
        super().__init__()
        self._ready = ready
        self._urls: dict[str, str] = {}
        self._levels: list[tuple[logging.Logger, int]] = []

    def __enter__(self) -> _Console:
        for name, level in self._LOGGERS:
            logger = logging.getLogger(name)
            self._levels.append((logger, logger.level))
            logger.setLevel(level)
            logger.addFilter(self)
        return self

    def __exit__(self, *exc: object) -> None:
        for logger, level in self._levels:
            logger.removeFilter(self)
            logger.setLevel(level)
        self._levels.clear()

    def filter(self, record: logging.LogRecord) -> bool:
        fields: dict[str, Any] = getattr(record, "fields", None) or {}
        message = record.getMessage()
        if record.name == "pgfleet.daemon":
            if message == "exporter listening":
                self._urls["exporter"] = str(fields.get("url"))
            elif message == "web UI listening":
                self._urls["web"] = str(fields.get("url"))
            elif message == "collector starting":
                # Logged once both listen: what is printed now answers.
                self._ready(self._urls)
        elif record.levelno == logging.DEBUG and message.startswith("snapshot "):
            _line(_snapshot_line(message.removeprefix("snapshot "), fields))
        return record.levelno >= logging.WARNING


def _snapshot_line(outcome: str, f: dict[str, Any]) -> str:
    """``04:31:05 snapshot primary: 16 sources, 7821 rows, 45 ms``."""
    ms = int(f.get("fetch_ms") or 0) + int(f.get("store_ms") or 0)
    text = (
        f"{time.strftime('%H:%M:%S')} snapshot {f.get('server')}: {f.get('sources')} sources, "
        f"{f.get('rows')} rows, {ms} ms"
    )
    if f.get("errors"):
        text += f", {f['errors']} failed (see the warnings)"
    if outcome != "stored":
        text += f" ({outcome})"
    return text
