"""``ping`` round trips per second against a real collector, locally and over TLS.

Starts a repository (embedded PostgreSQL 18) and ``pgfleet collector`` as a
real process with its management socket and a TLS port (a CA and a
certificate made here, one admin in the admins file, a frame key), with no
server to collect: what is measured is the management path alone.  Then,
for ``--duration`` seconds each, from this process (an asyncio client: its
own cost is in the figures, as it would be in ``pgfleet ctl``'s):

- one local connection, a ping at a time: round trips/s, p50 and p99;
- the same with every frame zstd-compressed and AES-256-GCM encrypted;
- one TLS connection, logged in once (SCRAM-SHA-256-PLUS), a ping at a time;
- a new local connection per ping;
- a new TLS connection and login per ping.

Prints one line, with the collector's CPU over the whole run.

Usage: python bench/management.py [--duration S]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import ipaddress
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import psycopg
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pgfleet.cluster import Cluster, _free_port
from pgfleet.management import auth, frame, users
from pgfleet.management.client import Client, Unreachable
from pgfleet.repository import schema

PGFLEET = Path(sys.executable).parent / "pgfleet"
TICKS = os.sysconf("SC_CLK_TCK")
PASSWORD = "bench-password"


def self_signed(directory: Path) -> tuple[Path, Path]:
    """A certificate for localhost and 127.0.0.1 that is its own CA, and its key (0600)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = directory / "server.pem", directory / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return cert_file, key_file


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


async def timed(duration: float, once: Callable[[], Awaitable[None]]) -> tuple[float, list[float]]:
    """Run ``once`` back to back for ``duration`` s: the rate, and each run's seconds."""
    times = []
    end = time.perf_counter() + duration
    while (t := time.perf_counter()) < end:
        await once()
        times.append(time.perf_counter() - t)
    return len(times) / sum(times), times


def ms(times: list[float], q: float) -> str:
    return f"{sorted(times)[min(len(times) - 1, int(q * len(times)))] * 1000:.2f}"


async def measure(sock: Path, port: int, ca: Path, key: bytes, duration: float) -> str:
    def tls() -> Awaitable[Client]:
        return Client.remote(
            "localhost", port, user="bench", password=PASSWORD,
            ssl_context=auth.client_ssl_context(ca), require_tls=True, key=key,
        )  # fmt: skip

    out = []
    async with await Client.local(sock, key=key) as c:

        async def ping() -> None:
            await c.call("ping")

        async def sealed() -> None:
            await c.call("ping", compression=frame.Compression.ZSTD,
                         encryption=frame.Encryption.AES_256_GCM)  # fmt: skip

        await timed(0.5, ping)  # warm-up
        rate, t = await timed(duration, ping)
        out.append(f"local {rate:,.0f}/s (p50 {ms(t, 0.5)} ms, p99 {ms(t, 0.99)} ms)")
        rate, t = await timed(duration, sealed)
        out.append(f"local zstd+AES-256-GCM {rate:,.0f}/s (p50 {ms(t, 0.5)} ms)")
    async with await tls() as c:

        async def tls_ping() -> None:
            await c.call("ping")

        await timed(0.5, tls_ping)
        rate, t = await timed(duration, tls_ping)
        out.append(f"TLS {rate:,.0f}/s (p50 {ms(t, 0.5)} ms, p99 {ms(t, 0.99)} ms)")

    async def connect_ping() -> None:
        async with await Client.local(sock) as c:
            await c.call("ping")

    async def login_ping() -> None:
        async with await tls() as c:
            await c.call("ping")

    rate, t = await timed(duration, connect_ping)
    fresh = f"new connection per ping: local {rate:,.0f}/s (p50 {ms(t, 0.5)} ms)"
    rate, t = await timed(duration, login_ping)
    fresh += f", TLS + SCRAM login {rate:,.0f}/s (p50 {ms(t, 0.5)} ms)"
    return "one connection, a ping at a time: " + ", ".join(out) + "; " + fresh


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="pgf-bench-") as tmp:
        base = Path(tmp)
        base.chmod(0o755)
        repo = Cluster.embedded(base / "repository", name="repository")
        proc: subprocess.Popen[bytes] | None = None
        try:
            repo.init()
            repo.start()
            repo_dsn = repo.create_database("pgfleet")
            with psycopg.connect(repo_dsn, autocommit=True) as conn:
                schema.upgrade(conn)
            cert, key = self_signed(base)
            admins = base / "admins"
            users.add(admins, "bench", PASSWORD)
            key_file = base / "frames.key"
            frame.write_key(key_file)
            port = _free_port()
            sock_dir = base / "run"
            cfg = base / "pgfleet.toml"
            cfg.write_text(
                f'[repository]\ndsn = "{repo_dsn}"\n'
                f'[spool]\ndirectory = "{base / "spool"}"\n'
                f"[exporter]\nport = {_free_port()}\n"
                '[logging]\nformat = "json"\nlevel = "info"\n'
                f'[management]\nunix_socket_dir = "{sock_dir}"\nport = {port}\n'
                f'host = "127.0.0.1"\ntls_cert_file = "{cert}"\n'
                f'tls_key_file = "{key}"\nadmins_file = "{admins}"\n'
                f'encryption_key_file = "{key_file}"\n'
            )
            log_path = base / "collector.log"
            with log_path.open("wb") as log:
                proc = subprocess.Popen(
                    [str(PGFLEET), "collector", "-c", str(cfg)], stdout=log, stderr=log
                )
            sock = sock_dir / "pgfleet.sock"
            deadline = time.monotonic() + 30
            while True:
                if proc.poll() is not None:
                    raise SystemExit(f"the collector died: {log_path.read_text()[-2000:]}")
                try:
                    asyncio.run(_ping(sock))
                    break
                except Unreachable:
                    if time.monotonic() > deadline:
                        raise SystemExit("the collector's socket never answered") from None
                    time.sleep(0.2)
            c0, w0 = cpu_seconds(proc.pid), time.monotonic()
            line = asyncio.run(measure(sock, port, cert, frame.load_key(key_file), args.duration))
            cpu = 100 * (cpu_seconds(proc.pid) - c0) / (time.monotonic() - w0)
        finally:
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
            repo.stop(mode="immediate")
    print(
        f"management ping, {args.duration:g} s each: {line}; collector CPU {cpu:.0f}% of a core",
        flush=True,
    )


async def _ping(sock: Path) -> None:
    async with await Client.local(sock, timeout=2) as c:
        await c.call("ping")


if __name__ == "__main__":
    main()
