"""Connections to upstreams: the pool of keep-alive connections every account's requests share, and how to
tell a request that failed because the pooled connection it went on was already dead from one the upstream
may have begun to answer."""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import socket
import weakref
from collections.abc import Awaitable
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, cast

import aiohttp

if TYPE_CHECKING:
    from aiohappyeyeballs import AddrInfoType
    from aiohttp.client_proto import ResponseHandler
    from aiohttp.client_reqrep import ClientRequest
    from aiohttp.connector import Connection
    from aiohttp.tracing import Trace

# Whether the connection the current task's latest upstream request went on had carried a request before.
log = logging.getLogger("poolgate")
_reused: ContextVar[bool] = ContextVar("poolgate_upstream_connection_reused", default=False)
_RESET = (errno.ECONNRESET, errno.EPIPE)
# What a connection cannot be made for on this host, whichever upstream it is for: no file descriptor left
# (the process's or the system's) or no buffer memory for another socket.
_LOCAL_SHORTAGE = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)
# Below this limit of open files the gateway warns at start (the usual default soft limit is 1,024).
LOW_OPEN_FILES_LIMIT = 4096
# What is asked for, in turn, when there is no hard limit.
UNBOUNDED_TRIES = (1 << 20, 10_240)

# TCP keepalive on upstream connections. An upstream gone without a word (a NAT or firewall that dropped the
# connection, a host that died) sends nothing, and a request waiting on it waited out `first_byte_seconds` (10
# minutes by default) before it failed over. Probed after 15 s of silence, 3 probes 5 s apart, such a
# connection is found dead 30 s into the silence, and one a request was written to is given up after 30 s
# without an acknowledgement (TCP_USER_TIMEOUT); a live upstream's kernel answers the probes however long its
# answer takes. The probes also keep a NAT's entry for the connection alive. (An upstream whose TCP is alive
# but which never answers still waits out the timeouts.)
KEEPALIVE_IDLE_SECONDS = 15
KEEPALIVE_INTERVAL_SECONDS = 5
KEEPALIVE_PROBES = 3
_DEAD_AFTER_SECONDS = KEEPALIVE_IDLE_SECONDS + KEEPALIVE_INTERVAL_SECONDS * KEEPALIVE_PROBES
# The options this platform has (Linux has all; macOS no TCP_USER_TIMEOUT).
_TCP_OPTIONS = tuple(
    (getattr(socket, name), value)
    for name, value in (
        ("TCP_KEEPIDLE", KEEPALIVE_IDLE_SECONDS),
        ("TCP_KEEPINTVL", KEEPALIVE_INTERVAL_SECONDS),
        ("TCP_KEEPCNT", KEEPALIVE_PROBES),
        ("TCP_USER_TIMEOUT", _DEAD_AFTER_SECONDS * 1000),
    )
    if hasattr(socket, name)
)


def keepalive_socket(addr_info: AddrInfoType) -> socket.socket:
    """A socket for an upstream connection, with TCP keepalive (see `KEEPALIVE_IDLE_SECONDS`)."""
    family, kind, proto, _, _ = addr_info
    sock = socket.socket(family=family, type=kind, proto=proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in _TCP_OPTIONS:
        sock.setsockopt(socket.IPPROTO_TCP, option, value)
    return sock


class UpstreamConnector(aiohttp.TCPConnector):
    """A TCPConnector that tells whether the connection it hands out carried a request before (aiohttp tells
    only trace configs, whose signals cost every request a dozen awaits)."""

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self._used: weakref.WeakSet[ResponseHandler] = weakref.WeakSet()

    async def connect(self, req: ClientRequest, traces: list[Trace], timeout: aiohttp.ClientTimeout) -> Connection:
        connection = await super().connect(req, traces, timeout)
        # None only once the connection is released: the one just handed out has its protocol.
        protocol = cast("ResponseHandler", connection.protocol)
        _reused.set(protocol in self._used)
        self._used.add(protocol)
        return connection


def upstream_session(fresh: bool = False) -> aiohttp.ClientSession:
    """A session for upstream requests; `fresh`: each request on a new connection, closed after it."""
    connector = UpstreamConnector(
        limit=0, ttl_dns_cache=300, enable_cleanup_closed=True, force_close=fresh, socket_factory=keepalive_socket
    )
    return aiohttp.ClientSession(connector=connector, auto_decompress=True, trust_env=False)


# A request's `skip_auto_headers` when it carries no User-Agent of the client's: none is sent rather than
# aiohttp's own. Per request, not the session's: a session's list makes every request build a multidict of
# the names to skip (from a generator: multidict's `.items()` of it, an AttributeError raised and swallowed) and a
# copy of its headers, ~11 k instructions, though a client's User-Agent (Claude Code's, the SDKs') makes aiohttp
# add none anyway.
NO_AGENT = ("User-Agent",)


def send(
    session: aiohttp.ClientSession,
    method: str,
    url: str,
    headers: Any,
    body: bytes,
    timeout: aiohttp.ClientTimeout,
    agent: bool,
) -> Awaitable[aiohttp.ClientResponse]:
    """An upstream request, never following a redirect (aiohttp would send the account's credential wherever it
    points); `agent`: its headers hold the client's User-Agent (else none is sent, see `NO_AGENT`). Awaited, not
    used as `async with` (see `release_response`): `_request`, the coroutine `session.request` wraps in a
    `_RequestContextManager`, a generic alias's instance whose construction tries to set `__orig_class__` on it
    (slots: an AttributeError raised and swallowed, ~12 k instructions a request with what goes with it)."""
    return session._request(
        method,
        url,
        headers=headers,
        data=body,
        timeout=timeout,
        allow_redirects=False,
        skip_auto_headers=None if agent else NO_AGENT,
    )


async def release_response(response: aiohttp.ClientResponse) -> None:
    """What leaving `async with response` does, unless the response is over already: read to its end, its
    connection back in the pool (aiohttp does that at the body's end). Leaving `async with` then still marks
    its body stream closed, by an `asyncio.isfuture` of the stream (an AttributeError raised and swallowed)
    and an exception set on the ended stream, which nothing reads again."""
    if response.closed and response.connection is None:
        return
    await response.__aexit__(None, None, None)


PRIMING_TIMEOUT = aiohttp.ClientTimeout(total=5)


async def prime(session: aiohttp.ClientSession) -> None:
    """One request through `session` to a throwaway server on loopback, before any upstream request. CPython 3.11
    stops sharing the keys of a class's instance dicts once a few instances are made before the first has set
    all its attributes: a gateway whose first upstream requests came at once (a burst at startup, a benchmark's
    warm-up) gave every aiohttp request and response after a dict of its own (1.5 KB, not 0.3) and ~10k
    instructions a request more, for the life of the process (one start in two, at random). One request alone
    sets them in order. Where loopback cannot be used, nothing is primed."""

    async def answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok")
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            writer.close()

    try:
        server = await asyncio.start_server(answer, "127.0.0.1", 0)
    except OSError:
        return
    try:
        port = server.sockets[0].getsockname()[1]
        # As the relay sends a request and reads its answer.
        url, headers = f"http://127.0.0.1:{port}/v1/messages", {"content-type": "application/json"}
        response = await send(session, "POST", url, headers, b"{}", PRIMING_TIMEOUT, False)
        await response.read()
        await release_response(response)
    except (aiohttp.ClientError, OSError, TimeoutError):
        pass
    finally:
        server.close()
        await server.wait_closed()


# How soon after a request went out an idle close can cross it: within a round trip. A pooled connection that
# broke later (a load balancer dropping a long generation) may have carried a request the upstream worked on,
# and billed: sent again, it was generated and billed twice.
CROSSED_WITHIN_SECONDS = 0.5


def closed_while_idle(exc: BaseException, waited: float) -> bool:
    """Whether a request failed before any answer, `waited` seconds after it went out, because the pooled
    connection it went on had been closed by the upstream while it sat idle: its keep-alive timeout ran out
    as the request went out (its FIN or reset crossed the request; Node and uvicorn servers close after 5 s
    idle), so the request was never taken up. On a new connection the same errors mean the upstream read the
    request and hung up: it may have begun on it (and billed it), so that is not one; nor is a failure that
    came later than an idle close could (`CROSSED_WITHIN_SECONDS`)."""
    return waited < CROSSED_WITHIN_SECONDS and _reused.get() and dead_before_answer(exc)


def dead_before_answer(exc: BaseException) -> bool:
    """Whether a request's error says its connection closed or reset before a byte of the answer: not one
    a new connection could not be made with (that is the account's), nor a timeout."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        return False
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return isinstance(exc.message, str)  # else the head of an answer: aiohttp gives what it parsed of it
    # Writing to a connection found closing is wrapped: "Can not write request body", its cause the reset.
    return _reset(exc) or _reset(exc.__cause__)


def _reset(exc: BaseException | None) -> bool:
    return isinstance(exc, ConnectionResetError | BrokenPipeError) or (isinstance(exc, OSError) and exc.errno in _RESET)


def out_of_local_resources(exc: BaseException) -> bool:
    """Whether a connection failed for want of this host's resources (file descriptors, socket buffers): not
    the account's failure, and another account's connection would fail alike."""
    return isinstance(exc, OSError) and exc.errno in _LOCAL_SHORTAGE  # aiohttp's connect errors carry it too


def open_files_limit() -> int:
    """The process's limit of open files (its sockets included): each request in flight holds two."""
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def raise_open_files_limit() -> int:
    """Raise the limit of open files to the most this process may have, and return it. The usual default is
    1,024 (the soft limit; the hard one is far higher, often 524,288): some 500 requests at once, a busy team's
    Claude Code sessions with their subagents, used them up. A warning when even the most is low."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # No hard limit (macOS's default): the most a process may open is the kernel's, which refuses more than
    # its own cap (10,240 on macOS) whatever is asked; the first figure it takes.
    wanted = (hard,) if hard != resource.RLIM_INFINITY else UNBOUNDED_TRIES
    for limit in wanted:
        if soft >= limit:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
        except (ValueError, OSError) as exc:  # a sandbox that does not allow it, a kernel's cap
            log.info("could not raise the open files limit from %d to %d: %s", soft, limit, exc)
        else:
            soft = limit
            break
    if soft < LOW_OPEN_FILES_LIMIT:
        log.warning(
            "the open files limit is %d: at most some %d requests at once (raise its hard limit: `ulimit -Hn`, "
            "systemd's LimitNOFILE=)",
            soft,
            soft // 2,
        )
    return soft


async def read_up_to(content: aiohttp.StreamReader, cap: int, chunks: list[bytes] | None = None) -> tuple[bytes, bool]:
    """The body to its end, or its first `cap` bytes; and whether that is all of it. (`read(n)` returns
    as soon as some bytes are there, not n of them.) `chunks`: where what arrives goes, for a caller that
    wants what came before a read failed."""
    chunks = [] if chunks is None else chunks
    size = 0
    while size <= cap:
        chunk = await content.readany()
        if not chunk:
            return b"".join(chunks), True
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)[:cap], False
