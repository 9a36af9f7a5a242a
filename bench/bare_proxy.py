"""The baseline: the thinnest pass-through proxy on the gateway's own stack (raw ASGI, uvicorn with
uvloop + httptools, one aiohttp client pool). No auth, routing or accounting: what is left is the cost
of the stack itself. Usage: python bench/bare_proxy.py UPSTREAM_URL PORT (uvicorn), or granian with app_from_env.
"""

from __future__ import annotations

import sys
from typing import Any

import aiohttp

UPSTREAM_KEY = "sk-ant-api03-mock-key-1"
DROP = {b"host", b"content-length", b"x-api-key", b"authorization", b"connection", b"accept-encoding"}


class BareProxy:
    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.session: aiohttp.ClientSession | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    self.session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
                    await send({"type": "lifespan.startup.complete"})
                else:
                    assert self.session is not None
                    await self.session.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        chunks = []
        while True:
            message = await receive()
            chunks.append(message.get("body", b""))
            if not message.get("more_body"):
                break
        headers = [(k.decode(), v.decode()) for k, v in scope["headers"] if k not in DROP]
        headers += [("x-api-key", UPSTREAM_KEY), ("accept-encoding", "identity")]
        assert self.session is not None
        async with self.session.request(
            scope["method"], self.upstream + scope["path"], headers=headers, data=b"".join(chunks)
        ) as response:
            out = [(b"content-type", response.headers.get("content-type", "application/json").encode())]
            if "content-length" in response.headers:
                out.append((b"content-length", response.headers["content-length"].encode()))
            await send({"type": "http.response.start", "status": response.status, "headers": out})
            async for chunk in response.content.iter_any():
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b""})


def main() -> None:
    import uvicorn

    upstream, port = sys.argv[1], int(sys.argv[2])
    uvicorn.run(
        BareProxy(upstream),
        host="127.0.0.1",
        port=port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


def app_from_env() -> BareProxy:
    """For granian, which imports the application by name: `--factory bench.bare_proxy:app_from_env`."""
    import os

    return BareProxy(os.environ["BARE_PROXY_UPSTREAM"])


if __name__ == "__main__":
    main()
