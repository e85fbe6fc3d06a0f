"""Serving an ASGI application with uvicorn inside an event loop we own.

Both the web UI and the collector's Prometheus endpoint run this way, the
latter next to the collector's workers in one loop.  We bind the socket
ourselves: uvicorn reports a failed bind with ``sys.exit()`` from inside its
task, which would take the whole collector down with a bare exit status
instead of saying which address is busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from typing import Any, Literal

from pgfleet.errors import ConfigError


def bind(host: str, port: int, what: str) -> socket.socket:
    """A listening socket on host:port; ConfigError naming `what` if impossible."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[
            0
        ][0]
        return socket.create_server((host, port), family=family, backlog=128)
    except OSError as e:
        reason = e.strerror or str(e)
        raise ConfigError(f"{what} cannot listen on {host}:{port}: {reason}") from None


async def serve(
    app: Any,
    sock: socket.socket,
    *,
    lifespan: Literal["on", "off"] = "off",
) -> None:
    """Serve `app` on `sock` until cancelled, then shut down cleanly (requests
    in progress finish).  Signals stay the caller's."""
    import uvicorn

    server = uvicorn.Server(
        uvicorn.Config(app, log_level="warning", lifespan=lifespan, proxy_headers=False)
    )
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        await asyncio.shield(serving)
    except asyncio.CancelledError:
        server.should_exit = True
        with contextlib.suppress(SystemExit):
            await serving
        raise
    except SystemExit:
        # The application's lifespan startup failed; it said why in the log.
        raise ConfigError("the web application did not start (see the log)") from None
    finally:
        sock.close()
