"""pgfleet's daemon against PoWA's collector: one server, one workload, one run.

What a user switching from PoWA runs, side by side on the same machine:

- a monitored PostgreSQL 15 (Debian's) with pg_stat_statements,
  pg_stat_kcache, pg_qualstats and pg_wait_sampling preloaded and installed
  in ONE database, ``bench`` (as PoWA's documentation tells users to), whose
  500 tables are written every few seconds by ~2,050 distinct statements,
  every one of them run between two snapshots (all entries changing);
- a repository PostgreSQL 15 holding both products' repositories, in two
  databases: ``powa`` (PoWA 4.1.4, Debian's postgresql-15-powa) and
  ``pgfleet``;
- PoWA's collector (powa-collector 1.3.2 from PyPI, in its own venv) in
  remote mode, then a real ``pgfleet collector`` process (exporter on,
  /metrics scraped every 15 s as Prometheus would), each snapshotting the
  server every ``--frequency`` seconds with coalesce ``--coalesce``;
- a "physical limit" line: the same source queries pgfleet runs, COPYed out
  of the server and into unlogged tables of the repository, nothing else,
  on connections kept open.

Each round runs the three, one after the other; the figures are medians of
the rounds.  Per snapshot: wall median and p95 (PoWA: its take_snapshot,
timed from inside its own process by a wrapper that changes nothing else;
pgfleet: fetch + store from its debug log), collector CPU in steady state
(from /proc, start-up excluded), repository growth raw and after VACUUM
FULL, and bytes per statement-point of statements history.

Usage: python bench/powa.py [--rounds 3] [--snapshots N] [--frequency 5]
                            [--coalesce 5] [--tables 500] [--only pgfleet|powa]

--snapshots defaults to 12, or to --coalesce when that is more, so that the
measured snapshots hold a whole aggregation cycle of both collectors (each
aggregates every ``coalesce`` snapshots, PoWA's coalesce being at least 5):
``--coalesce 100`` measures 100 snapshots per collector and round, ~8.5 min
each at 5 s, ~25 min a round with the physical-limit line.

Installs what it needs: Debian's postgresql-15 packages and PoWA as root,
powa-collector in ~/.cache/pgfleet-bench/powa-venv.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gzip
import json
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from pgfleet.cluster import Cluster, _free_port
from pgfleet.config import CollectorConfig
from pgfleet.datasources import builtin
from pgfleet.repository import schema
from pgfleet.repository.servers import Server
from pgfleet.snapshot.fetch import ServerSession, extension_schemas, plan_builtin, qualify

PGFLEET = Path(sys.executable).parent / "pgfleet"
TICKS = os.sysconf("SC_CLK_TCK")
EXTENSIONS = ("pg_stat_statements", "pg_stat_kcache", "pg_qualstats", "pg_wait_sampling")
DEBIAN = ["postgresql-15", "postgresql-15-powa"] + [
    f"postgresql-15-{e.replace('_', '-')}"
    for e in ("pg_stat_kcache", "pg_qualstats", "pg_wait_sampling")
]
POWA_VENV = Path.home() / ".cache" / "pgfleet-bench" / "powa-venv"
# py-spy for --profile, in a venv of its own: not a dependency of pgfleet's.
SPY_VENV = Path.home() / ".cache" / "pgfleet-bench" / "py-spy-venv"
PY_SPY = SPY_VENV / "bin" / "py-spy"

# PoWA's own code, unchanged: its worker's take_snapshot is wrapped to write
# each snapshot's end time and duration to a file, then the collector runs
# as its own script does.
POWA_WRAPPER = """
import runpy, sys, time
from powa_collector import powa_worker
out = open(sys.argv[1], "a", buffering=1)
take = powa_worker.PowaThread._PowaThread__take_snapshot
def timed(self):
    t0 = time.perf_counter()
    take(self)
    out.write(f"{time.time()} {time.perf_counter() - t0}\\n")
powa_worker.PowaThread._PowaThread__take_snapshot = timed
sys.argv = [sys.argv[2]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def install() -> Path:
    """Debian's packages (as root) and powa-collector's venv; its python."""
    missing = [
        p for p in DEBIAN if subprocess.run(["dpkg", "-s", p], capture_output=True).returncode != 0
    ]
    if missing:
        if os.geteuid() != 0:
            raise SystemExit(f"bench/powa.py needs the Debian packages {' '.join(missing)}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(
            ["apt-get", "install", "-y", "-q", *missing],
            check=True,
            env=env,
            stdout=subprocess.DEVNULL,
        )
    python = POWA_VENV / "bin" / "python"
    if not (POWA_VENV / "bin" / "powa-collector.py").exists():
        subprocess.run([sys.executable, "-m", "venv", str(POWA_VENV)], check=True)
        subprocess.run(
            [str(python), "-m", "pip", "install", "-q", "powa-collector==1.3.2", "psycopg2-binary"],
            check=True,
        )
    return python


def install_py_spy() -> None:
    if not PY_SPY.exists():
        subprocess.run([sys.executable, "-m", "venv", str(SPY_VENV)], check=True)
        subprocess.run(
            [str(SPY_VENV / "bin" / "python"), "-m", "pip", "install", "-q", "py-spy==0.4.3"],
            check=True,
        )


def profile_summary(path: Path, top: int = 25) -> str:
    """Where the sampled time went: each function's share of the samples it is on
    the stack of (inclusive), and of those it is on top of (self)."""
    inclusive: dict[str, int] = {}
    own: dict[str, int] = {}
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        count = int(n)
        total += count
        # "frame;frame...": a frame is "function (file:line)"; lines apart.
        frames = [re.sub(r":\d+\)$", ")", f) for f in stack.split(";")]
        for f in set(frames):
            inclusive[f] = inclusive.get(f, 0) + count
        if frames:
            own[frames[-1]] = own.get(frames[-1], 0) + count
    if not total:
        return f"{path}: no samples"
    out = [f"{path}: {total} samples"]
    for title, d in (("inclusive", inclusive), ("self", own)):
        out.append(f"  {title}:")
        for f, c in sorted(d.items(), key=lambda kv: -kv[1])[:top]:
            out.append(f"    {100 * c / total:5.1f}%  {f}")
    return "\n".join(out)


# -- The workload


def shapes(i: int) -> list[str]:
    t = f"t{i:03d}"
    return [
        f"SELECT v, w FROM {t} WHERE id = %s",
        f"UPDATE {t} SET v = v + 1, w = md5(w) WHERE id = %s",
        f"SELECT count(*) FROM {t} WHERE v > %s AND w LIKE 'a%%'",
        f"INSERT INTO {t} (id, v, w) VALUES (%s, 0, 'x')"
        f" ON CONFLICT (id) DO UPDATE SET v = {t}.v + 1",
    ]


def build(mon: Cluster, tables: int) -> list[str]:
    mon.create_database("bench")
    with mon.connect("bench", autocommit=True) as conn:
        for e in (*EXTENSIONS, "btree_gist", "powa"):
            conn.execute(sql.SQL("CREATE EXTENSION {}").format(sql.Identifier(e)))
        for i in range(tables):
            t = f"t{i:03d}"
            conn.execute(f"CREATE TABLE {t} (id int PRIMARY KEY, v int NOT NULL, w text NOT NULL)")
            conn.execute(f"CREATE INDEX ON {t} (v)")
            conn.execute(
                f"INSERT INTO {t} SELECT g, g, md5(g::text) FROM generate_series(1, 200) g"
            )
        conn.execute("VACUUM ANALYZE")
        conn.execute("CHECKPOINT")
        # The set-up's 1,500 DDL statements are not the workload.
        conn.execute("SELECT pg_stat_statements_reset()")
    stmts = [s for i in range(tables) for s in shapes(i)]
    # Joins of neighbouring tables: ~2,050 distinct statements in all.
    stmts += [
        f"SELECT count(*) FROM t{i:03d} a JOIN t{i + 1:03d} b USING (id) WHERE a.v < %s"
        for i in range(0, min(tables - 1, 100), 2)
    ]
    return stmts


def load(dsn: str, stmts: list[str], every: float, stop: threading.Event) -> None:
    """Run every statement once per ``every`` seconds, in a pipeline."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        while not stop.is_set():
            t0 = time.monotonic()
            with conn.pipeline():
                for s in stmts:
                    conn.execute(s, (random.randint(1, 220),), prepare=False)
            stop.wait(max(0.0, every - (time.monotonic() - t0)))


# -- Measures of one phase


def one(conn: psycopg.Connection[Any], query: str) -> tuple[Any, ...]:
    row = conn.execute(query).fetchone()
    assert row is not None
    return tuple(row)


def db_size(conn: psycopg.Connection[Any]) -> int:
    return int(one(conn, "SELECT pg_database_size(current_database())")[0])


def compact(dsn: str) -> int:
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute("VACUUM FULL")
        return db_size(conn)


def powa_points(dsn: str) -> tuple[int, int]:
    """Bytes of statements history, and statement-points in it (PoWA)."""
    with psycopg.connect(dsn) as conn:
        row = one(
            conn,
            "SELECT pg_total_relation_size('powa_statements_history'),"
            " (SELECT coalesce(sum(cardinality(records)), 0) FROM powa_statements_history)",
        )
    return int(row[0]), int(row[1])


def pgfleet_points(dsn: str) -> tuple[int, int]:
    """Bytes of statements history, and statement-points in it (pgfleet).

    A history row's points are the set bits of ``at``.  History from before
    the compact form (``_history_v1``, in a repository kept with --keep and
    not yet converted) is counted too, one point per composite."""
    with psycopg.connect(dsn) as conn:
        parts = [("pgfleet.pg_stat_statements_history", "length(replace(at::text, '0', ''))")]
        if one(conn, "SELECT to_regclass('pgfleet.pg_stat_statements_history_v1') IS NOT NULL")[0]:
            parts.append(("pgfleet.pg_stat_statements_history_v1", "cardinality(points)"))
        total = [0, 0]
        for table, points in parts:
            row = one(
                conn,
                f"SELECT (SELECT coalesce(sum(pg_total_relation_size(relid)), 0)"
                f"          FROM pg_partition_tree('{table}')),"
                f" (SELECT coalesce(sum({points}), 0) FROM {table})",
            )
            total[0] += int(row[0])
            total[1] += int(row[1])
    return total[0], total[1]


def scrape_loop(port: int, every: float, stop: threading.Event) -> None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/metrics",
        headers={"Accept": "application/openmetrics-text;version=1.0.0", "Accept-Encoding": "gzip"},
    )
    while not stop.wait(every):
        with contextlib.suppress(OSError), urllib.request.urlopen(request, timeout=30) as r:
            gzip.decompress(r.read()) if r.headers.get("Content-Encoding") == "gzip" else r.read()


class Phase:
    """One collector's run: wall per snapshot, CPU per snapshot, growth."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.walls: list[float] = []
        self.cpu: float = float("nan")
        self.raw: float = float("nan")
        self.compacted: float = float("nan")
        self.per_point: float = float("nan")

    def growth(
        self,
        dsn: str,
        size0: int,
        snapshots: int,
        before: tuple[int, int],
        points: Callable[[str], tuple[int, int]],
    ) -> None:
        """Repository growth per snapshot since ``size0`` (compacted then), raw and
        compacted; bytes per statement-point of the history written meanwhile
        (``points``: its bytes and points), compacted."""
        with psycopg.connect(dsn) as conn:
            self.raw = (db_size(conn) - size0) / snapshots
        self.compacted = (compact(dsn) - size0) / snapshots
        after = points(dsn)
        if after[1] > before[1]:
            self.per_point = (after[0] - before[0]) / (after[1] - before[1])


def terminate(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()


def steady(
    proc: subprocess.Popen[bytes],
    count: Any,
    warm: int,
    measured: int,
    timeout: float,
    on_warm: Callable[[], None] | None = None,
) -> tuple[float, int]:
    """CPU seconds and snapshots between the ``warm``-th and the (warm+measured)-th snapshot."""
    deadline = time.monotonic() + timeout
    while count() < warm:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the collector stopped or took no snapshot")
        time.sleep(0.05)
    if on_warm is not None:
        on_warm()
    n0, c0 = count(), cpu_seconds(proc.pid)
    while count() < n0 + measured:
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit("the collector stopped or fell behind")
        time.sleep(0.05)
    return cpu_seconds(proc.pid) - c0, count() - n0


def run_powa(base: Path, python: Path, repo_dsn: str, args: argparse.Namespace) -> Phase:
    ph = Phase("PoWA")
    times = base / "powa-times"
    times.write_text("")
    wrapper = base / "powa-wrapper.py"
    wrapper.write_text(POWA_WRAPPER)
    (base / "powa-collector.conf").write_text(
        json.dumps({"repository": {"dsn": repo_dsn}, "use_server_alias": False, "debug": False})
    )
    size0 = compact(repo_dsn)
    bytes0, points0 = powa_points(repo_dsn)
    script = python.parent / "powa-collector.py"
    with (base / "powa.log").open("ab") as log:
        proc = subprocess.Popen(
            [str(python), str(wrapper), str(times), str(script)], cwd=base, stdout=log, stderr=log
        )

    def count() -> int:
        return len(times.read_text().splitlines())

    try:
        warm = 2
        cpu, n = steady(
            proc, count, warm, args.snapshots, args.frequency * (args.snapshots + 8) + 60
        )
        ph.cpu = cpu / n
        ph.walls = [float(x.split()[1]) for x in times.read_text().splitlines()[warm : warm + n]]
    finally:
        terminate(proc)
    ph.growth(repo_dsn, size0, count(), (bytes0, points0), powa_points)
    return ph


def run_pgfleet(base: Path, repo_dsn: str, args: argparse.Namespace) -> Phase:
    ph = Phase("pgfleet")
    port = _free_port()
    cfg = base / "pgfleet.toml"
    cfg.write_text(
        f"[exporter]\nport = {port}\n"
        f'[repository]\ndsn = "{repo_dsn}"\n'
        f'[spool]\ndirectory = "{base / "spool"}"\n'
        '[logging]\nformat = "json"\nlevel = "debug"\n'
    )
    log_path = base / "pgfleet.log"
    log_path.write_text("")
    size0 = compact(repo_dsn)
    bytes0, points0 = pgfleet_points(repo_dsn)

    def events() -> list[dict[str, Any]]:
        with log_path.open("rb") as f:
            return [
                e
                for e in (json.loads(line) for line in f if line.startswith(b"{"))
                if e.get("msg", "").startswith("snapshot ") and "store_ms" in e
            ]

    stop = threading.Event()
    scraper = threading.Thread(target=scrape_loop, args=(port, 15.0, stop), daemon=True)
    with log_path.open("ab") as log:
        proc = subprocess.Popen([str(PGFLEET), "collector", "-c", str(cfg)], stdout=log, stderr=log)
    scraper.start()
    profiler: subprocess.Popen[bytes] | None = None

    def profile() -> None:
        # Sampled from outside, without stopping the daemon (--nonblocking):
        # the figures measured alongside stay the daemon's own.
        nonlocal profiler
        out = Path(args.profile) / f"pgfleet-{time.strftime('%H%M%S')}.txt"
        profiler = subprocess.Popen(
            [str(PY_SPY), "record", "--pid", str(proc.pid), "--nonblocking", "--rate", "250",
             "--format", "raw", "--output", str(out),
             "--duration", str(args.frequency * args.snapshots)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    try:
        warm = 2
        cpu, n = steady(
            proc,
            lambda: len(events()),
            warm,
            args.snapshots,
            args.frequency * (args.snapshots + 8) + 60,
            profile if args.profile else None,
        )
        ph.cpu = cpu / n
        done = events()[warm : warm + n]
        ph.walls = [(e["fetch_ms"] + e["store_ms"]) / 1000 for e in done]
        bad = [e for e in done if e.get("errors")]
        if bad:
            print(f"pgfleet: {len(bad)} snapshots with errors: see {log_path}", file=sys.stderr)
    finally:
        stop.set()
        if profiler is not None:
            profiler.wait(60)
            for f in sorted(Path(args.profile).glob("pgfleet-*.txt"))[-1:]:
                print(profile_summary(f), file=sys.stderr)
        terminate(proc)
    ph.growth(repo_dsn, size0, len(events()), (bytes0, points0), pgfleet_points)
    return ph


def physical(mon: Cluster, repo_dsn: str, args: argparse.Namespace) -> Phase:
    """The same source queries as pgfleet's, COPYed out and into unlogged tables."""
    ph = Phase("physical")
    server = Server(
        srvid=1, alias="mon", host=mon.host, port=mon.port, username="postgres", dbname="bench"
    )
    cfg = CollectorConfig()

    async def plan() -> list[tuple[str, str, str]]:
        # (tmp table, database, query) of each source, on each database it runs on
        session = ServerSession(server, cfg)
        try:
            info = await session.info()
            schemas = {}
            for db in info.databases:
                conn = await session.open(db)
                try:
                    schemas[db] = await extension_schemas(conn)
                finally:
                    await session.release(conn)
        finally:
            await session.close()
        out = []
        for ds in builtin().values():
            query, _ = plan_builtin(ds, info)
            if query is None:
                continue
            for db in info.databases if ds.per_database else ("bench",):
                q = qualify(query, schemas[db])
                if q is not None:
                    out.append((ds.tmp_table, db, q))
        return out

    jobs = asyncio.run(plan())
    with contextlib.ExitStack() as stack:
        conns = {db: stack.enter_context(mon.connect(db, autocommit=True)) for _, db, _ in jobs}
        repo = stack.enter_context(psycopg.connect(repo_dsn, autocommit=True))
        repo.execute("CREATE SCHEMA IF NOT EXISTS physical")
        tables = {tmp: "physical." + tmp.rsplit(".", 1)[-1] for tmp, _, _ in jobs}
        for tmp, table in tables.items():
            repo.execute(f"CREATE UNLOGGED TABLE IF NOT EXISTS {table} (LIKE {tmp})")
        for _ in range(args.snapshots):
            time.sleep(args.frequency)
            repo.execute("TRUNCATE " + ", ".join(tables.values()))
            t0 = time.perf_counter()
            for tmp, db, q in jobs:
                out = sql.SQL("COPY (SELECT 1::integer AS srvid, * FROM ({}) s) TO STDOUT").format(
                    sql.SQL(q)
                )
                with (
                    conns[db].cursor().copy(out) as src,
                    repo.cursor().copy(f"COPY {tables[tmp]} FROM STDIN") as dst,
                ):
                    for block in src:
                        dst.write(block)
            ph.walls.append(time.perf_counter() - t0)
    return ph


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument(
        "--snapshots",
        type=int,
        help="snapshots measured per collector and round (default: 12, or --coalesce if more)",
    )
    ap.add_argument("--frequency", type=int, default=5)
    ap.add_argument("--coalesce", type=int, default=5)
    ap.add_argument("--tables", type=int, default=500)
    ap.add_argument("--only", choices=("powa", "pgfleet"))
    ap.add_argument("--keep", help="use this directory, and leave it (clusters stopped)")
    ap.add_argument(
        "--profile",
        metavar="DIR",
        help="sample the daemon with py-spy over the measured snapshots; write the stacks"
        " (py-spy's raw format) to DIR and print the functions where its time goes",
    )
    args = ap.parse_args()
    # Fewer measured snapshots than --coalesce would leave the aggregation
    # (the p95, most of the CPU and all the history written) out of the
    # figures: measure at least one whole cycle.
    if args.snapshots is None:
        args.snapshots = max(12, args.coalesce)
    elif args.snapshots < args.coalesce:
        print(
            f"warning: {args.snapshots} snapshots at coalesce {args.coalesce} may measure no"
            " aggregation (no history written: no B/statement-point); use"
            f" --snapshots {args.coalesce} or more",
            file=sys.stderr,
        )
    python = install()
    if args.profile:
        install_py_spy()
        Path(args.profile).mkdir(parents=True, exist_ok=True)

    with contextlib.ExitStack() as stack:
        if args.keep:
            base = Path(args.keep)
            base.mkdir(parents=True, exist_ok=True)
        else:
            base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pgfleet-powa-")))
        base.chmod(0o755)
        preload = ",".join(EXTENSIONS)
        mon = Cluster.debian(
            15,
            base / "mon",
            name="mon",
            shared_preload_libraries=preload,
            settings={"pg_qualstats.sample_rate": 1, "track_io_timing": "on"},
        )
        repo = Cluster.debian(
            15,
            base / "repo",
            name="repo",
            shared_preload_libraries=preload,
            settings={"shared_buffers": "256MB", "max_wal_size": "4GB"},
        )
        for c in (mon, repo):
            stack.callback(c.stop, mode="immediate")
            c.init()
            c.start()
        stmts = build(mon, args.tables)
        powa_dsn = repo.create_database("powa")
        with psycopg.connect(powa_dsn, autocommit=True) as conn:
            for e in (*EXTENSIONS, "btree_gist", "powa"):
                conn.execute(sql.SQL("CREATE EXTENSION {}").format(sql.Identifier(e)))
            conn.execute(
                "SELECT powa_register_server(hostname => %s, port => %s, alias => 'mon',"
                " username => 'postgres', dbname => 'bench', frequency => %s,"
                " powa_coalesce => %s, extensions => %s)",
                (mon.host, mon.port, args.frequency, max(5, args.coalesce), list(EXTENSIONS[1:])),
            )
        fleet_dsn = repo.create_database("pgfleet")
        with psycopg.connect(fleet_dsn, autocommit=True) as conn:
            schema.upgrade(conn)
            conn.execute(
                "INSERT INTO pgfleet.servers"
                " (alias, host, port, username, dbname, frequency, coalesce)"
                " VALUES ('mon', %s, %s, 'postgres', 'bench', %s, %s)",
                (mon.host, mon.port, args.frequency, args.coalesce),
            )
            # The daemon spreads a new server's aggregations over its cycle
            # (a fleet added at once would aggregate on the same snapshot);
            # starting this one's at 0, as PoWA's is, makes both phases end
            # at the same point of their cycles: the growth measured is
            # that of whole cycles, not of one product mid-cycle.
            conn.execute(
                "INSERT INTO pgfleet.snapshot_state (srvid, coalesce_seq, aggregates)"
                " SELECT srvid, 0, 0 FROM pgfleet.servers WHERE alias = 'mon'"
            )
        stop = threading.Event()
        loader = threading.Thread(
            target=load,
            args=(mon.dsn("bench"), stmts, min(4.0, args.frequency * 0.8), stop),
            daemon=True,
        )
        loader.start()
        stack.callback(stop.set)
        time.sleep(args.frequency)
        with mon.connect("bench") as conn:
            entries = one(conn, "SELECT count(*) FROM pg_stat_statements")[0]
        print(
            f"workload: {args.tables} tables, {len(stmts)} statements, {entries} pg_stat_statements"
            f" entries; every {args.frequency} s, coalesce {args.coalesce}",
            flush=True,
        )

        results: dict[str, list[Phase]] = {"PoWA": [], "pgfleet": [], "physical": []}
        for r in range(args.rounds):
            if args.only != "pgfleet":
                results["PoWA"].append(run_powa(base, python, powa_dsn, args))
            if args.only != "powa":
                results["pgfleet"].append(run_pgfleet(base, fleet_dsn, args))
            results["physical"].append(physical(mon, fleet_dsn, args))
            for name, phases in results.items():
                if phases:
                    p = phases[-1]
                    print(
                        f"  round {r + 1} {name}: wall median"
                        f" {statistics.median(p.walls) * 1000:.1f} ms"
                        f" p95 {percentile(p.walls, 0.95) * 1000:.1f} ms,"
                        f" CPU {p.cpu * 1000:.1f} ms,"
                        f" raw {p.raw / 1e3:.0f} kB, compacted {p.compacted / 1e3:.0f} kB,"
                        f" {p.per_point:.0f} B/statement-point",
                        flush=True,
                    )
        report(results, args)


def med(phases: list[Phase], f: Any) -> float:
    return statistics.median(f(p) for p in phases) if phases else float("nan")


def report(results: dict[str, list[Phase]], args: argparse.Namespace) -> None:
    def line(p: list[Phase]) -> dict[str, float]:
        return {
            "wall": med(p, lambda x: statistics.median(x.walls)) * 1000,
            "p95": med(p, lambda x: percentile(x.walls, 0.95)) * 1000,
            "cpu": med(p, lambda x: x.cpu) * 1000,
            "raw": med(p, lambda x: x.raw) / 1e3,
            "compacted": med(p, lambda x: x.compacted) / 1e3,
            "point": med(p, lambda x: x.per_point),
        }

    powa, fleet, phys = (line(results[k]) for k in ("PoWA", "pgfleet", "physical"))
    ratio = {k: fleet[k] / powa[k] if powa[k] else float("nan") for k in fleet}
    ok = ratio["wall"] <= 0.5 and fleet["wall"] <= 2 * phys["wall"] and ratio["cpu"] <= 0.5
    print(
        f"powa: {len(results['pgfleet'])} rounds x {args.snapshots} snapshots @ {args.frequency} s,"
        f" coalesce {args.coalesce}; per snapshot, PoWA | pgfleet | ratio:"
        f" wall median {powa['wall']:.1f} | {fleet['wall']:.1f} ms | {ratio['wall']:.2f},"
        f" p95 {powa['p95']:.1f} | {fleet['p95']:.1f} ms | {ratio['p95']:.2f};"
        f" CPU {powa['cpu']:.1f} | {fleet['cpu']:.1f} ms | {ratio['cpu']:.2f};"
        f" repository raw {powa['raw']:.0f} | {fleet['raw']:.0f} kB | {ratio['raw']:.2f},"
        f" compacted {powa['compacted']:.0f} | {fleet['compacted']:.0f} kB"
        f" | {ratio['compacted']:.2f};"
        f" statements history {powa['point']:.0f} | {fleet['point']:.0f} B/point;"
        f" physical limit {phys['wall']:.1f} ms (pgfleet {fleet['wall'] / phys['wall']:.2f}x);"
        f" bars {'met' if ok else 'MISSED'}",
        flush=True,
    )


if __name__ == "__main__":
    main()
