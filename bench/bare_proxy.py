"""The baseline: the thinnest pass-through proxy on the gateway's own stack.

A raw ASGI callable with one aiohttp client pool, streaming chunks through as they arrive, swapping the
caller's x-api-key for a fixed upstream key. No auth, routing or accounting: what is left is the cost
of the stack itself, so "gateway / bare proxy" is the price of poolgate's features.

    python bench/bare_proxy.py --upstream http://127.0.0.1:9000 --port 8001 [--server uvicorn|h11|granian]

The remaining flags exist for the p99 investigation in run.py (see README.md): each switches one suspect
on or off so its effect can be measured against the default in the same run.
"""

from __future__ import annotations

import argparse
import gc
import os
import socket
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

UPSTREAM_KEY = "sk-ant-api03-mock-key-1"
# Hop-by-hop and credential headers are not forwarded; the upstream key replaces the caller's.
DROP = frozenset({b"host", b"content-length", b"x-api-key", b"authorization", b"connection", b"accept-encoding"})
ENV_PREFIX = "BARE_PROXY_"


class BareProxy:
    def __init__(self, upstream: str, force_close: bool = False) -> None:
        self.upstream = upstream.rstrip("/")
        self.force_close = force_close
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await self._proxy(scope, receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.session = self._new_session()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                if self.session is not None:
                    await self.session.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    def _new_session(self) -> aiohttp.ClientSession:
        # force_close: a new upstream connection per request, to measure what pool churn would cost.
        connector = aiohttp.TCPConnector(limit=0, force_close=self.force_close)
        return aiohttp.ClientSession(connector=connector, auto_decompress=False, skip_auto_headers=("User-Agent",))

    async def _proxy(self, scope: Scope, receive: Receive, send: Send) -> None:
        body = await _read_body(receive)
        headers = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"] if k not in DROP]
        headers += [("x-api-key", UPSTREAM_KEY), ("accept-encoding", "identity")]
        assert self.session is not None, "lifespan startup did not run"
        url = self.upstream + scope["path"]
        async with self.session.request(scope["method"], url, headers=headers, data=body) as response:
            out = [(b"content-type", response.headers.get("content-type", "application/json").encode("latin-1"))]
            if "content-length" in response.headers:
                out.append((b"content-length", response.headers["content-length"].encode("latin-1")))
            await send({"type": "http.response.start", "status": response.status, "headers": out})
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        chunks.append(message.get("body", b""))
        if not message.get("more_body"):
            return b"".join(chunks)


def set_nagle(sock: socket.socket | None) -> None:
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 0)


def patch_nagle_everywhere() -> None:
    """Experiment only: re-enable Nagle on every TCP transport this process opens, inbound and upstream.

    uvloop, asyncio and aiohttp all set TCP_NODELAY on their own; this undoes it after they do, to show
    what a missing TCP_NODELAY would cost (write-write-read meets the peer's delayed ACK).
    """
    from aiohttp import base_protocol, tcp_helpers

    def nodelay_off(transport: Any, value: bool) -> None:
        del value
        set_nagle(transport.get_extra_info("socket"))

    base_protocol.tcp_nodelay = nodelay_off  # type: ignore[assignment]
    tcp_helpers.tcp_nodelay = nodelay_off  # type: ignore[assignment]
    from uvicorn.protocols.http import h11_impl, httptools_impl

    for protocol in (httptools_impl.HttpToolsProtocol, h11_impl.H11Protocol):
        original = protocol.connection_made

        def connection_made(self: Any, transport: Any, _original: Any = original) -> None:
            _original(self, transport)
            set_nagle(transport.get_extra_info("socket"))

        protocol.connection_made = connection_made  # type: ignore[method-assign]


def install_gc_log() -> None:
    """Log every generation-2 collection with its pause, so outliers can be matched to collections."""
    started: list[float] = [0.0]

    def callback(phase: str, info: dict[str, int]) -> None:
        if info["generation"] != 2:
            return
        if phase == "start":
            started[0] = time.perf_counter()
        else:
            pause_ms = (time.perf_counter() - started[0]) * 1000
            # CLOCK_MONOTONIC is system-wide on Linux: tail.py matches this stamp to slow requests.
            at = time.monotonic() - pause_ms / 1000
            line = f"gc gen2 pause {pause_ms:.2f} ms at={at:.6f} collected={info['collected']}"
            print(line, file=sys.stderr, flush=True)

    gc.callbacks.append(callback)


def apply_gc_mode(mode: str) -> None:
    if mode == "freeze":
        # What the gateway does at startup: long-lived objects out of the collector's way.
        gc.collect()
        gc.freeze()
    elif mode == "off":
        gc.disable()


def app_from_env() -> BareProxy:
    """Factory for granian, which imports the application by name in its worker process."""
    apply_gc_mode(os.environ.get(ENV_PREFIX + "GC", "default"))
    if os.environ.get(ENV_PREFIX + "GC_LOG") == "1":
        install_gc_log()
    if os.environ.get(ENV_PREFIX + "NAGLE") == "1":
        patch_nagle_everywhere()
    return BareProxy(
        os.environ[ENV_PREFIX + "UPSTREAM"],
        force_close=os.environ.get(ENV_PREFIX + "FORCE_CLOSE") == "1",
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--upstream", required=True, help="base URL of the upstream, e.g. the mock")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--server", choices=("uvicorn", "h11", "granian"), default="uvicorn")
    parser.add_argument("--force-close", action="store_true", help="no upstream keep-alive (pool churn)")
    parser.add_argument("--nagle", action="store_true", help="re-enable Nagle on all sockets (experiment)")
    parser.add_argument("--gc", choices=("default", "freeze", "off"), default="default")
    parser.add_argument("--gc-log", action="store_true", help="log gen-2 collection pauses to stderr")
    return parser.parse_args(argv)


def export_env(args: argparse.Namespace) -> None:
    """The flags travel as environment variables so that granian's worker process sees them too."""
    os.environ[ENV_PREFIX + "UPSTREAM"] = args.upstream
    os.environ[ENV_PREFIX + "GC"] = args.gc
    os.environ[ENV_PREFIX + "GC_LOG"] = "1" if args.gc_log else "0"
    os.environ[ENV_PREFIX + "FORCE_CLOSE"] = "1" if args.force_close else "0"
    os.environ[ENV_PREFIX + "NAGLE"] = "1" if args.nagle else "0"


def serve_uvicorn(port: int, http: str) -> None:
    import uvicorn

    uvicorn.run(
        app_from_env(),
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http=http,
        lifespan="on",
        log_level="warning",
        access_log=False,
        server_header=False,
        date_header=False,
    )


def serve_granian(port: int) -> None:
    from granian import Granian
    from granian.constants import HTTPModes, Interfaces, Loops

    bench_dir = os.path.dirname(os.path.abspath(__file__))
    sys.path.insert(0, bench_dir)
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [bench_dir, os.environ.get("PYTHONPATH")]))
    Granian(
        "bare_proxy:app_from_env",
        factory=True,
        address="127.0.0.1",
        port=port,
        interface=Interfaces.ASGI,
        loop=Loops.uvloop,
        http=HTTPModes.http1,
        workers=1,
        websockets=False,
        log_level="warning",  # type: ignore[arg-type]
    ).serve()


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    export_env(args)
    if args.server == "granian":
        serve_granian(args.port)
    else:
        serve_uvicorn(args.port, "httptools" if args.server == "uvicorn" else "h11")


if __name__ == "__main__":
    main()
