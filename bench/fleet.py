"""One collector process keeping up with a fleet of 1,000 servers.

Starts a repository and a few monitored clusters (embedded PostgreSQL 18),
registers ``--servers`` servers spread over the monitored clusters (every
entry is its own server to pgfleet: its own connection, schedule, lease and
data), runs ``pgfleet collector`` as a real process at ``--frequency``, lets
it warm up for one period (scraped from the start, as Prometheus would), then
measures for ``--duration`` seconds and prints one line:

  achieved snapshots/s (and the expected rate), the collector's CPU as a
  percentage of one core, its peak RSS, and the p50 and p99 lag of
  snapshots behind their scheduled slot; and, with the collector's
  /metrics scraped every ``--scrape`` seconds as Prometheus would (asking
  for OpenMetrics, gzip), the median scrape time and body size.

Bars: keeps up (p99 lag < 5 s) at <= 50% of one core and <= 300 MB RSS.

The entries point at each cluster's ``postgres`` database, the only one it
has: per-database sources visit every database of a server, so distinct
databases per entry would multiply connections by the fleet size.

Usage: python bench/fleet.py [--servers N] [--clusters N] [--frequency S]
                             [--duration S] [--warmup S]
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import psycopg

from pgfleet.cluster import Cluster, _free_port
from pgfleet.repository import schema

PGFLEET = Path(sys.executable).parent / "pgfleet"
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def scrape_loop(
    port: int, every: float, stop: threading.Event, out: list[tuple[float, int]]
) -> None:
    """Scrape /metrics as Prometheus does; (wall ms, uncompressed bytes) per scrape."""
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/metrics",
        headers={
            "Accept": "application/openmetrics-text;version=1.0.0;q=0.5,"
            "text/plain;version=0.0.4;q=0.3",
            "Accept-Encoding": "gzip",
        },
    )
    while not stop.wait(every):
        t0 = time.perf_counter()
        try:
            with urllib.request.urlopen(request, timeout=60) as r:
                body = r.read()
                if r.headers.get("Content-Encoding") == "gzip":
                    body = gzip.decompress(body)
        except OSError as e:  # counted as a warning, and the next scrape goes on
            print(f"scrape failed: {e}", file=sys.stderr, flush=True)
            out.append((math.nan, 0))
            continue
        out.append(((time.perf_counter() - t0) * 1000, len(body)))


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--servers", type=int, default=1000)
    ap.add_argument("--clusters", type=int, default=4)
    ap.add_argument("--frequency", type=int, default=60)
    ap.add_argument("--duration", type=int, default=180, help="seconds measured")
    ap.add_argument("--warmup", type=int, help="seconds before measuring (default: a period)")
    ap.add_argument("--max-in-flight", type=int, default=10)
    ap.add_argument("--scrape", type=float, default=15, help="seconds between scrapes (0: none)")
    args = ap.parse_args()
    warmup = args.frequency if args.warmup is None else args.warmup
    per_cluster = -(-args.servers // args.clusters)

    with tempfile.TemporaryDirectory(prefix="pgfleet-bench-") as tmp:
        base = Path(tmp)
        base.chmod(0o755)
        repo = Cluster.embedded(
            base / "repository",
            name="repository",
            settings={"shared_buffers": "256MB", "max_wal_size": "4GB"},
        )
        mons = [
            Cluster.embedded(
                base / f"mon{i}",
                name=f"mon{i}",
                settings={"max_connections": per_cluster + 20},
            )
            for i in range(args.clusters)
        ]
        proc: subprocess.Popen[bytes] | None = None
        try:
            for c in (repo, *mons):
                c.init()
                c.start()
            repo_dsn = repo.create_database("pgfleet")
            with psycopg.connect(repo_dsn, autocommit=True) as conn:
                schema.upgrade(conn)
                with conn.cursor() as cur:
                    cur.executemany(
                        "INSERT INTO pgfleet.servers (alias, host, port, username, frequency)"
                        " VALUES (%s, %s, %s, 'postgres', %s)",
                        [
                            (f"s{i:04d}", mons[i % len(mons)].host, mons[i % len(mons)].port,
                             args.frequency)
                            for i in range(args.servers)
                        ],
                    )  # fmt: skip
            cfg = base / "pgfleet.toml"
            port = _free_port()
            cfg.write_text(
                f"[exporter]\nport = {port}\n"
                f'[repository]\ndsn = "{repo_dsn}"\n'
                f"[collector]\nmax_in_flight = {args.max_in_flight}\n"
                f'[spool]\ndirectory = "{base / "spool"}"\n'
                # Debug: one line per snapshot, with its lag behind schedule.
                '[logging]\nformat = "json"\nlevel = "debug"\n'
            )
            log_path = base / "collector.log"
            with log_path.open("wb") as log:
                proc = subprocess.Popen(
                    [str(PGFLEET), "collector", "-c", str(cfg)], stdout=log, stderr=log
                )
            # Scraped from the start, as Prometheus does: the first scrape
            # renders the whole fleet (start-up, like the first snapshots),
            # the measured ones what changed since the last.
            scrapes: list[tuple[float, int]] = []
            stop = threading.Event()
            scraper = threading.Thread(
                target=scrape_loop, args=(port, args.scrape, stop, scrapes), daemon=True
            )
            if args.scrape:
                scraper.start()
            time.sleep(warmup)
            if proc.poll() is not None:
                raise SystemExit(f"the collector died: {log_path.read_text()[-2000:]}")
            offset = log_path.stat().st_size
            c0, w0 = cpu_seconds(proc.pid), time.monotonic()
            warm = len(scrapes)
            time.sleep(args.duration)
            stop.set()
            c1, w1 = cpu_seconds(proc.pid), time.monotonic()
            rss = peak_rss_mb(proc.pid)
            del scrapes[:warm]
            with log_path.open("rb") as f:
                f.seek(offset)
                events = [json.loads(line) for line in f if line.startswith(b"{")]
        finally:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
            for c in (*mons, repo):
                c.stop(mode="immediate")

    done = [e for e in events if e.get("msg", "").startswith("snapshot ")]
    lags = [e["lag"] for e in done if "lag" in e]
    problems = sum(1 for e in events if e.get("level") in ("warning", "error"))
    problems += sum(1 for ms, _ in scrapes if math.isnan(ms))
    scrapes = [s for s in scrapes if not math.isnan(s[0])]
    rate = len(done) / (w1 - w0)
    cpu = 100 * (c1 - c0) / (w1 - w0)
    p50, p99 = percentile(lags, 0.50), percentile(lags, 0.99)
    ok = p99 < 5 and cpu <= 50 and rss <= 300
    print(
        f"fleet: {args.servers} servers @ {args.frequency} s on {args.clusters} clusters, "
        f"{args.duration} s measured: {rate:.1f} snapshots/s "
        f"(schedule {args.servers / args.frequency:.1f}), "
        f"collector CPU {cpu:.1f}% of a core, peak RSS {rss:.0f} MB, "
        f"lag p50 {p50:.3f} s p99 {p99:.3f} s (mean {statistics.fmean(lags or [0]):.3f}), "
        f"{problems} warnings/errors; "
        + (
            f"scrape every {args.scrape:g} s: median {statistics.median(s[0] for s in scrapes):.0f}"
            f" ms, {statistics.median(s[1] for s in scrapes) / 1e6:.1f} MB; "
            if scrapes
            else ""
        )
        + f"bars {'met' if ok else 'MISSED'}",
        flush=True,
    )


if __name__ == "__main__":
    main()
