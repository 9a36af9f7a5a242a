"""Running the gateway: uvicorn (uvloop + httptools) on a pre-bound socket, graceful on SIGTERM/Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import threading
from collections.abc import Awaitable, Callable, Iterator

import uvicorn

from poolgate.app import Gateway
from poolgate.config import GatewayConfig

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is not available on Windows
    uvloop = None  # type: ignore[assignment]


# How long a forced stop waits for the requests it cancelled to answer their clients and be accounted.
FORCED_STOP_SECONDS = 5.0


def bind(host: str, port: int) -> socket.socket:
    """Bind before serving so that port 0 works and the real port is known up front."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, gateway: Gateway) -> None:
        super().__init__(config)
        self._gateway = gateway

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._gateway.stopping = True
        await super().shutdown(sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """SIGTERM/Ctrl-C start a graceful shutdown; unlike uvicorn's default, the signal is not re-raised
        afterwards, so a clean stop exits 0 (and the demo ends without a traceback)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        previous = {signum: signal.signal(signum, self.handle_exit) for signum in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)


def uvicorn_server(gateway: Gateway, config: GatewayConfig) -> uvicorn.Server:
    server_config = uvicorn.Config(
        gateway,
        loop="none",
        http="httptools",
        lifespan="on",
        log_config=None,
        access_log=config.server.access_log,
        server_header=False,
        proxy_headers=False,
        timeout_graceful_shutdown=config.server.shutdown_grace_seconds,
        timeout_keep_alive=75,
        backlog=2048,
    )
    return _Server(server_config, gateway)


def run(main: Callable[[], Awaitable[None]]) -> None:
    """Run a coroutine on uvloop when it is installed."""
    if uvloop is not None:
        uvloop.run(main())
    else:  # pragma: no cover
        asyncio.run(main())


async def serve(gateway: Gateway, config: GatewayConfig, sock: socket.socket) -> None:
    server = uvicorn_server(gateway, config)
    try:
        await server.serve(sockets=[sock])
    finally:
        lifespan = getattr(server, "lifespan", None)
        if server.force_exit and lifespan is not None and not lifespan.shutdown_event.is_set():
            # A second Ctrl-C makes uvicorn stop waiting for open requests and skip the application's
            # shutdown. End the requests still running (each answered and accounted, see
            # `Gateway._messages`), then drain the usage writer (nothing lost) and stop it: it ignores
            # signals, so an undrained one held the exit forever.
            running = list(server.server_state.tasks)
            for task in running:
                task.cancel()
            if running:
                await asyncio.wait(running, timeout=FORCED_STOP_SECONDS)
            await lifespan.shutdown()
