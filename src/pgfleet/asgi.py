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
import functools
import socket
from typing import TYPE_CHECKING, Any, Literal

from pgfleet.errors import ConfigError

if TYPE_CHECKING:
    import uvicorn


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

    server = _server_class()(
        uvicorn.Config(app, log_level="warning", lifespan=lifespan, proxy_headers=False)
    )
    server.capture_signals = contextlib.nullcontext  # type: ignore[method-assign,assignment]
    serving = asyncio.ensure_future(server.serve(sockets=[sock]))
    try:
        await asyncio.shield(serving)
    except asyncio.CancelledError:
        server.should_exit = True
        server.wake.set()  # type: ignore[attr-defined]
        with contextlib.suppress(SystemExit):
            await serving
        raise
    except SystemExit:
        # The application's lifespan startup failed; it said why in the log.
        raise ConfigError("the web application did not start (see the log)") from None
    finally:
        sock.close()


# Seconds between two ticks of uvicorn's main loop (its own: 0.1).  A tick
# refreshes the Date header and looks whether to exit: ten a second were a
# third of an idle collector's CPU.  Exit is signalled at once (wake).
_TICK = 1.0


@functools.cache
def _server_class() -> type[uvicorn.Server]:
    import uvicorn  # imported when serving: the CLI's other commands start faster

    class Server(uvicorn.Server):
        def __init__(self, config: uvicorn.Config) -> None:
            super().__init__(config)
            self.wake = asyncio.Event()

        async def main_loop(self) -> None:
            counter = 0
            should_exit = await self.on_tick(counter)
            while not should_exit:
                # on_tick refreshes the Date header at multiples of 10.
                counter = (counter + 10) % 864000
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wake.wait(), _TICK)
                should_exit = await self.on_tick(counter)

    return Server
