"""sd_notify(3) without libsystemd: readiness, reloads, stopping, watchdog.

A datagram to the socket named by ``$NOTIFY_SOCKET``; nothing at all when
not run by systemd.  A name starting with ``@`` is in the abstract namespace.
"""

from __future__ import annotations

import os
import socket
import time


def notify(*states: str) -> bool:
    """Send ``READY=1``, ``STOPPING=1``...; return whether systemd was told."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address or not states:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall("\n".join(states).encode())
    except OSError:
        # Telling systemd is a courtesy; failing to must not stop collection.
        return False
    return True


def reloading() -> bool:
    # Type=notify-reload (systemd >= 253) wants the monotonic time with it.
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify("RELOADING=1", f"MONOTONIC_USEC={usec}")


def watchdog_interval() -> float | None:
    """Seconds between WATCHDOG=1 pings systemd expects (half its timeout), or None."""
    usec = os.environ.get("WATCHDOG_USEC")
    pid = os.environ.get("WATCHDOG_PID")
    if not usec or not usec.isdigit() or (pid and pid != str(os.getpid())):
        return None
    return int(usec) / 1e6 / 2
