"""sd_notify over a real datagram socket."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from pgfleet.collector import systemd


def test_notify(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        assert systemd.notify("READY=1", "STATUS=collecting")
        assert s.recv(1024) == b"READY=1\nSTATUS=collecting"
        assert systemd.reloading()
        msg = s.recv(1024).decode()
        assert msg.startswith("RELOADING=1\nMONOTONIC_USEC=")
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert not systemd.notify("STOPPING=1")  # never raises
    monkeypatch.delenv("NOTIFY_SOCKET")
    assert not systemd.notify("READY=1")


def test_abstract_socket_and_watchdog(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0pgfleet-test-notify")
        monkeypatch.setenv("NOTIFY_SOCKET", "@pgfleet-test-notify")
        assert systemd.notify("WATCHDOG=1")
        assert s.recv(64) == b"WATCHDOG=1"
    monkeypatch.setenv("WATCHDOG_USEC", "20000000")
    assert systemd.watchdog_interval() == 10.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert systemd.watchdog_interval() is None
