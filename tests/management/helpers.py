"""What the management tests share: certificates made here, and a real daemon to talk to.

Not a fixture plugin: the tests import what they use.  :func:`make_pki` serves
both the handshake tests (test_auth.py), which need no daemon, and
:func:`start_daemon`, which starts a ``pgfleet collector`` with its local
socket, TLS port, admins file and frame key, and hands back a :class:`Mgmt`
whose clients log in as :data:`USER`.
"""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import os
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from pgfleet.cluster import _free_port
from pgfleet.management import auth, frame, users
from pgfleet.management.client import Client, Unreachable
from tests.fix_daemon import DaemonFactory, DaemonProcess, wait_until

PASSWORD = "Tr0ub4dor&3-management"  # must never reach the daemon's log
USER = "admin"


# -- A CA and a server certificate


@dataclass(frozen=True)
class Pki:
    ca: Path
    cert: Path
    key: Path


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def make_pki(
    directory: Path,
    host: str = "localhost",
    *,
    ca_name: str = "pgfleet test CA",
    signed_with: type[hashes.SHA256 | hashes.SHA384] = hashes.SHA256,
    curve: type[ec.EllipticCurve] = ec.SECP256R1,
) -> Pki:
    """A CA and a certificate it signed for ``host`` and 127.0.0.1, as PEM files (key 0600).

    ``signed_with`` and ``curve`` are the server certificate's (the CA's are
    SHA-256 and P-256): channel binding hashes with the certificate's own
    algorithm, which only a choice other than SHA-256 puts to the test.
    """
    directory.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name(ca_name))
        .issuer_name(_name(ca_name))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(curve())
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(host))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName(host), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
            critical=False,
        )
        .sign(ca_key, signed_with())
    )
    pki = Pki(directory / "ca.pem", directory / "server.pem", directory / "server.key")
    pki.ca.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    pki.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    # Created 0600, never chmod-ed after: the server refuses a key others could read.
    fd = os.open(pki.key, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return pki


# -- A running daemon and its clients


@dataclass
class Mgmt:
    """A running daemon with its management socket and TLS port."""

    d: DaemonProcess
    socket: Path
    port: int
    pki: Pki
    key: bytes
    key_file: Path
    admins: Path

    def metrics(self) -> dict[str, float]:
        """The daemon's management families from /metrics: 'name{labels}' -> value."""
        with urllib.request.urlopen(self.d.exporter_url + "/metrics", timeout=10) as r:
            text = r.read().decode()
        out = {}
        for line in text.splitlines():
            if line.startswith("pgfleet_management_"):
                series, _, value = line.rpartition(" ")
                out[series] = float(value)
        return out

    def refusals(self, interface: str, reason: str) -> float:
        series = f'pgfleet_management_refusals_total{{interface="{interface}",reason="{reason}"}}'
        return self.metrics().get(series, 0.0)

    async def local(self, timeout: float = 10.0) -> Client:
        return await Client.local(self.socket, key=self.key, timeout=timeout)

    async def remote(
        self,
        user: str = USER,
        password: str = PASSWORD,
        *,
        tls: bool = True,
        timeout: float = 10.0,
    ) -> Client:
        return await Client.remote(
            "localhost",
            self.port,
            user=user,
            password=password,
            ssl_context=auth.client_ssl_context(self.pki.ca) if tls else None,
            require_tls=tls,
            key=self.key,
            timeout=timeout,
        )


def start_daemon(
    daemon: DaemonFactory,
    repo: str,
    directory: Path,
    sockdir: Path,
    name: str = "d",
    *,
    env: dict[str, str] | None = None,
    sections: dict[str, dict[str, Any]] | None = None,
    **management: Any,
) -> Mgmt:
    """A collector with its socket (in ``sockdir``), TLS port, admins and frame key (in
    ``directory``), once it answers a ping.  ``management`` overrides its
    [management] settings; ``sections`` adds others.

    The admins file and the key are kept if there: a second daemon in the same
    ``directory`` shares them.
    """
    pki = make_pki(directory / "pki")
    admins = directory / "admins"
    if not admins.exists():
        users.add(admins, USER, PASSWORD)
    key_file = directory / "frames.key"
    if not key_file.exists():
        frame.write_key(key_file)
    port = _free_port()
    settings: dict[str, Any] = {
        "unix_socket_dir": str(sockdir),
        "host": "127.0.0.1",
        "port": port,
        "tls_cert_file": str(pki.cert),
        "tls_key_file": str(pki.key),
        "admins_file": str(admins),
        "encryption_key_file": str(key_file),
        "timeout": 5,
        **management,
    }
    config: dict[str, Any] = {"management": settings, **(sections or {})}
    d = daemon(repo, name=name, env=env, **config)
    m = Mgmt(d, sockdir / "pgfleet.sock", port, pki, frame.load_key(key_file), key_file, admins)
    wait_for(m)
    return m


def wait_for(m: Mgmt) -> None:
    """Until the daemon answers a ping on its socket."""

    def ping() -> bool:
        assert m.d.alive(), m.d.text()[-3000:]
        if not m.socket.exists():
            return False
        try:
            return asyncio.run(call(m, "ping")) == {}
        except Unreachable:
            return False

    wait_until(ping, 20, "the management socket")


async def call(
    m: Mgmt, command: str, args: dict[str, Any] | None = None, *, remote: bool = False
) -> dict[str, Any]:
    """One command on a connection of its own, over the socket or (``remote``) TLS."""
    async with await (m.remote() if remote else m.local()) as c:
        return await c.call(command, args)
