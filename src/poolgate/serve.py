"""Running the gateway: uvicorn (uvloop + httptools) on a pre-bound socket, graceful on SIGTERM/Ctrl-C."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import signal
import socket
import sys
import threading
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sized
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any, cast

import httptools
import uvicorn
from uvicorn.protocols.http.flow_control import FlowControl
from uvicorn.protocols.http.httptools_impl import HEADER_RE, STATUS_LINE, HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from poolgate.api.cors import ANSWER_HEADERS, browser_request
from poolgate.api.errors import ApiError, error_body, error_type_for
from poolgate.api.http import DONE, HEAD_LINES, SERVER_ANSWER, Scope, fields_of, header_pairs
from poolgate.app import Gateway
from poolgate.config import GatewayConfig, ServerConfig
from poolgate.lifecycle.context import new_request_id
from poolgate.store.writer_process import STOP_SIGNALS
from poolgate.telemetry.logging import BoundedLog
from poolgate.upstreams.connections import raise_open_files_limit

if TYPE_CHECKING:
    from uvicorn._types import ASGI3Application

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is not available on Windows
    uvloop = None  # type: ignore[assignment]

if sys.platform == "linux":
    import fcntl
    import termios


# How long a forced stop waits for the requests it cancelled to answer their clients and be accounted.
FORCED_STOP_SECONDS = 5.0

# uvicorn's logger (its protocols' `self.logger`), for what a client's malformed or stalled request is told:
# bounded, as a client can send thousands a second.
_client_faults = BoundedLog(logging.getLogger("uvicorn.error"))
_FIGURES = re.compile(r"[0-9]+")


def bind(host: str, port: int) -> socket.socket:
    """Bind before serving so that port 0 works and the real port is known up front."""
    return listen(reserve(host, port))


def reserve(host: str, port: int) -> socket.socket:
    """A socket bound to host:port and not listening yet: a port in use is an error at once, and connections
    are refused (rather than accepted and left unanswered) until `listen`."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # Named TCP, not left 0: asyncio's event loop sets TCP_NODELAY only on connections whose socket says so
    # (uvloop on any), and without it an answer written in two sends (a stream's events) waited for the
    # client's delayed ACK, ~40 ms a time (the tests' loop, or one without uvloop: Windows).
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


def listen(sock: socket.socket) -> socket.socket:
    """A socket from `reserve`, listening (it fails when another socket bound to the port listens first)."""
    host, port = sock.getsockname()[:2]
    try:
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror}") from None
    sock.setblocking(False)
    return sock


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, gateway: Gateway) -> None:
        super().__init__(config)
        self._gateway = gateway

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        self._gateway.begin_stop()
        await super().shutdown(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Any second stop signal forces the stop (see `serve`), as a second Ctrl-C does in uvicorn: a second
        SIGTERM (a `kill` repeated, a stop sent again) or a SIGHUP (the terminal closed) during the drain
        waited out every request still running."""
        if self.should_exit:
            self.force_exit = True
        super().handle_exit(sig, frame)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        """SIGTERM/Ctrl-C start a graceful shutdown; unlike uvicorn's default, the signal is not re-raised
        afterwards, so a clean stop exits 0 (and the demo ends without a traceback). So does SIGHUP: the
        terminal or ssh session a `poolgate serve` ran in was closed, which killed it on the spot (streams
        cut mid-event, their usage records never written)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        if not _CAPTURING:
            # A signal ignored from the start stays so: `nohup poolgate serve` outlives its terminal.
            _BEFORE.clear()
            _BEFORE.update(
                {signum: handler for signum in STOP_SIGNALS if (handler := signal.getsignal(signum)) != signal.SIG_IGN}
            )
        _CAPTURING.append(self.handle_exit)
        for signum in _BEFORE:
            signal.signal(signum, self.handle_exit)
        try:
            yield
        finally:
            # The newest server still running takes the signals, else what had them before the first: servers
            # in one process (tests, a script of one's own) need not stop in the reverse order of their start
            # (put back as each found it, the handler of a server stopped first took every later SIGTERM and
            # Ctrl-C for itself, and nothing stopped the process).
            _CAPTURING.remove(self.handle_exit)
            for signum, before in _BEFORE.items():
                signal.signal(signum, _CAPTURING[-1] if _CAPTURING else before)


# The stop handlers of the servers of this process capturing signals, oldest first, and what handled the
# signals they capture before the first of them (see `_Server.capture_signals`).
_CAPTURING: list[Callable[[int, FrameType | None], None]] = []
_BEFORE: dict[int, Any] = {}

_REASONS = {400: b"Bad Request", 408: b"Request Timeout", 431: b"Request Header Fields Too Large"}
# The CORS headers of every answer to a browser that opted in (`api.cors`), as a head's lines.
_CORS_FIELDS = b"".join([b"%s: %s\r\n" % field for field in ANSWER_HEADERS])
# How long a connection refused for its head may go on sending before it is closed.
LINGER_SECONDS = 2.0


@dataclass(slots=True)
class _Refusal:
    """An answer the server gives itself, and closes the connection after: to a head it refused (`cycle`
    None), or to the request of `cycle`, whose body cannot be read."""

    status: int
    message: str
    cycle: RequestResponseCycle | None = None
    linger: bool = True  # see `_linger`
    request_id: str = field(default_factory=new_request_id)
    # The refused request's headers, as far as they were read: a browser's that opted in to CORS get the CORS
    # headers every other answer to it has, without which its page cannot read the answer (a stalled upload's
    # 408 was a network error to it, its message and request id unseen).
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)


class _HeadRefused(Exception):
    """Raised from a parser callback to stop parsing a head that is refused: answered `status`, and the
    connection closed."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _TrailersRefused(Exception):
    """Raised from a parser callback: a chunked body's trailer fields are over the bound."""


class _Trailers(list[tuple[bytes, bytes]]):
    """Where uvicorn's `on_header` puts a chunked body's trailer fields (it appended them to the request's
    headers, without bound): counted against the head bound and dropped (nothing reads them)."""

    __slots__ = ("left",)
    left: int  # bytes the trailer fields may still take: set as each request's head completes

    def append(self, field: tuple[bytes, bytes]) -> None:
        self.left -= len(field[0]) + len(field[1])
        if self.left < 0:
            raise _TrailersRefused


class _PipelineFlow(FlowControl):
    """uvicorn resumes reading on every answer and every `receive`, though requests are queued: a client
    pipelining tiny requests had them parsed and queued as fast as it sent them (150,000 on one connection,
    ~360 MiB). Reading stays paused while `MAX_QUEUED` or more are queued (the running one's body is whole by
    then): a connection queues at most that many plus one read's worth."""

    MAX_QUEUED = 32

    def __init__(self, transport: asyncio.Transport, pipeline: Sized) -> None:
        super().__init__(transport)
        self._pipeline = pipeline

    def resume_reading(self) -> None:
        if len(self._pipeline) < self.MAX_QUEUED:
            super().resume_reading()


def unacknowledged_bytes(transport: asyncio.Transport) -> int | None:
    """How much of what was written to `transport` its peer has not taken yet: what the transport still
    buffers and what the kernel has not had acknowledged (Linux's SIOCOUTQ). None where the kernel does not
    tell (not Linux, or the socket is gone)."""
    sock = transport.get_extra_info("socket")
    if sys.platform != "linux" or sock is None:
        return None
    try:
        queued = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, bytes(4))
    except OSError:
        return None
    return transport.get_write_buffer_size() + int.from_bytes(queued, sys.byteorder)


def host_refusal(headers: list[tuple[bytes, bytes]], http_version: str) -> str | None:
    """Why a head's Host headers are refused, if they are: RFC 9112 (3.2) has a server answer 400 to an
    HTTP/1.1 request without one, and to any with more than one (a proxy in front and the server behind
    may each read another of the two)."""
    hosts = sum(1 for name, _ in headers if name == b"host")
    if hosts > 1:
        return f"A request must carry one Host header; this one has {hosts}"
    if hosts == 0 and http_version != "1.0":
        return "A request must carry one Host header; this one has none"
    return None


def version_refusal(headers: list[tuple[bytes, bytes]], http_version: str) -> str | None:
    """Why a head of an HTTP version other than 1.1 is refused, if it is: poolgate speaks HTTP/1.1 and 1.0, and
    httptools let `HTTP/2.0` and `HTTP/0.9` request lines through, served as 1.1 (an HTTP/0.9 client reads no
    head). An HTTP/1.0 request framed with Transfer-Encoding is faulty (RFC 9112 6.1): a proxy in front that
    speaks 1.0 and reads its Content-Length would take its body's end elsewhere."""
    if http_version != "1.0":
        return f"poolgate speaks HTTP/1.1 (and 1.0), not HTTP/{http_version}: send the request as HTTP/1.1"
    if any(name == b"transfer-encoding" for name, _ in headers):
        return "An HTTP/1.0 request cannot be framed with Transfer-Encoding (RFC 9112 6.1): send a Content-Length"
    return None


# Answer header names already checked, each with its lower-case form: the gateway's own and the few it passes
# on from upstream, a vocabulary the configuration bounds (quota rule names); the bound is for safety only.
_HEADER_NAMES: dict[bytes, bytes] = {}
_HEADER_NAMES_MAX = 4096
_FRAMING = frozenset((b"content-length", b"transfer-encoding", b"connection"))
# What no header value may hold (uvicorn's HEADER_VALUE_RE: controls but tab), and CR and LF, which also end
# the head's lines (see `_check_values`).
_VALUE_CONTROLS = bytes(c for c in (*range(0x20), 0x7F) if c != 0x09)


def _header_name(name: bytes) -> bytes:
    """`name` lower-cased, once it is a valid field name (a token); uvicorn's RuntimeError if not."""
    if HEADER_RE.search(name):
        raise RuntimeError("Invalid HTTP header name.")
    lowered = name.lower()
    if len(_HEADER_NAMES) < _HEADER_NAMES_MAX:
        _HEADER_NAMES[name] = lowered
    return lowered


def _check_values(head: bytes, lines: int) -> None:
    """uvicorn's RuntimeError if a value in `head` (of `lines` CRLF-ended lines, names checked) holds a
    control character but tab: one pass over the head for all values rather than a search per value. The
    head's own CR LFs are all the controls it may hold."""
    if len(head) - len(head.translate(None, _VALUE_CONTROLS)) != 2 * lines:
        raise RuntimeError("Invalid HTTP header value.")


class _OneWriteCycle(RequestResponseCycle):
    """uvicorn's request cycle, but an answer's head goes out with the first of its body: uvicorn wrote the
    head at once, then the body, two sends (and two packets) for every quick answer, and for every stream
    (whose head the gateway sends with its first event, read already). The head is held for the rest of the
    event loop's turn at most: a body that is not sent in it finds the head gone out before it.

    `send` is a plain function handing back uvicorn's coroutine, or one already done: no coroutine of its own
    per message (a stream sends one per chunk).

    A start message's head lines rendered by the app (`api.http.HEAD_LINES`) go into the head as they are."""

    _held: bytes | None = None
    takes_head_lines = True

    def send(self, message: Any) -> Awaitable[None]:  # type: ignore[override]
        held = self._held
        if held is not None:
            self._held = None
            if self._sent_with_body(held, message):
                return DONE
            if not self.disconnected:
                self.transport.write(held)
        elif message["type"] == "http.response.start" and not self.response_started:
            if not self.flow.write_paused and not self.disconnected:
                self._held = self._head_of(message)
                asyncio.get_running_loop().call_soon(self._release_head)
                return DONE
            if HEAD_LINES in message:  # uvicorn's own send renders the head: as header pairs
                message = {**message, "headers": [*message.get("headers", ()), *header_pairs(message[HEAD_LINES])]}
        return super().send(message)

    def _head_of(self, message: Any) -> bytes:
        """The head uvicorn writes for a start `message`, with its checks and bookkeeping (framing from
        content-length / transfer-encoding / connection, `connection: close` on a connection not kept alive,
        chunked for a body of no stated length), not written. Rendered here rather than by uvicorn's `send`:
        its two regular-expression searches and `lower()` per header cost ~4,000 instructions a header (the
        policy's quota and budget headers doubled a head's fields). Names are checked and lower-cased once
        (`_header_name`) and the values all at once (`_check_values`); an invalid header raises uvicorn's
        RuntimeError."""
        self.response_started = True
        self.waiting_for_100_continue = False
        status = message["status"]
        if self.access_log:
            self.access_logger.info(
                '%s - "%s %s HTTP/%s" %d',
                get_client_addr(self.scope),
                self.scope["method"],
                get_path_with_query_string(self.scope),
                self.scope["http_version"],
                status,
            )
        content = [STATUS_LINE[status]]
        lines = 0
        close_said = False
        names = _HEADER_NAMES
        for headers in (self.default_headers, message.get("headers", ())):
            for name, value in headers:
                lowered = names.get(name) or _header_name(name)
                if lowered in _FRAMING:
                    close_said |= self._frame(lowered, value)
                content += (lowered, b": ", value, b"\r\n")
                lines += 1
        # An answer begun before the request's body came whole (a 401 before the body, a 413) ends the connection
        # (see `on_response_complete`): said, as the other answers that end it say it. (Not by `keep_alive`, which
        # would close it without the lingering that lets the client read the answer.)
        if (not self.keep_alive or self.more_body) and not close_said:
            content.append(b"connection: close\r\n")
            lines += 1
        if self.chunked_encoding is None and self.scope["method"] != "HEAD" and status not in (204, 304):
            self.chunked_encoding = True
            content.append(b"transfer-encoding: chunked\r\n")
            lines += 1
        rendered = message.get(HEAD_LINES)
        if not rendered:
            content.append(b"\r\n")  # the head's end, checked with the rest
        head = b"".join(content)
        _check_values(head, lines + (1 if rendered else 2))  # and the status line's end (and the head's)
        # The app's own lines (`api.http.HEAD_LINES`) last, as they are: names and figures of its making, not
        # scanned nor counted (~8,000 instructions for a caller's nine quota and budget headers).
        return head + rendered + b"\r\n" if rendered else head

    def _frame(self, name: bytes, value: bytes) -> bool:
        """What a framing header says of the body to come (as uvicorn reads it); True for `connection:
        close`."""
        if name == b"content-length":
            if self.chunked_encoding is None:
                self.expected_content_length = int(value.decode())
                self.chunked_encoding = False
        elif name == b"transfer-encoding":
            if value.lower() == b"chunked":
                self.expected_content_length = 0
                self.chunked_encoding = True
        elif b"close" in [token.lower().strip() for token in value.split(b",")]:
            self.keep_alive = False
            return True
        return False

    def _release_head(self) -> None:
        held, self._held = self._held, None
        if held is not None and not self.disconnected:
            self.transport.write(held)

    def _sent_with_body(self, head: bytes, message: Any) -> bool:
        """Write `head` and the body `message` brings in one, in the two usual cases: a stream's first event,
        and a whole answer of known length (ended as uvicorn ends one). False: uvicorn is to send it."""
        if message["type"] != "http.response.body" or self.disconnected:
            return False
        body = message.get("body", b"")
        more = message.get("more_body", False)
        if self.chunked_encoding:
            if not body or not (more or self.keep_alive):
                return False
            self.transport.write(b"%s%x\r\n%s\r\n%s" % (head, len(body), body, b"" if more else b"0\r\n\r\n"))
        elif more or not self.keep_alive or len(body) != self.expected_content_length or self.scope["method"] == "HEAD":
            return False
        else:
            self.transport.write(head + body)
            self.expected_content_length = 0
        if not more:  # the answer's end, as uvicorn ends one
            self.response_complete = True
            self.message_event.set()
            self.on_response()
        return True


# An HTTP/1.0 answer of no stated length: its body runs to the connection's close (see `_Http10Cycle`).
_TO_THE_CLOSE = sys.maxsize


class _Http10Cycle(_OneWriteCycle):
    """An HTTP/1.0 request's cycle. HTTP/1.0 has no chunked transfer coding, and RFC 9112 (6.1) has a server
    send none to it: uvicorn sent every answer of no stated length (a stream) chunked all the same, and an
    HTTP/1.0 client (`ab`, a proxy speaking 1.0 upstream) took the chunk sizes for part of the events. Such an
    answer goes as it is instead, ended by the connection's close (an HTTP/1.0 connection closes after its
    answer: uvicorn keeps none alive)."""

    def send(self, message: Any) -> Awaitable[None]:  # type: ignore[override]
        if message["type"] == "http.response.start":
            headers = message.get("headers", ())
            if not self.response_started and all(name.lower() != b"content-length" for name, _ in headers):
                # uvicorn frames a body without a length chunked unless it knows it is not to be: it writes one
                # told no more than "as long as it turns out to be", the length settled by its last part.
                self.chunked_encoding = False
                self.expected_content_length = _TO_THE_CLOSE
        elif self.expected_content_length == _TO_THE_CLOSE and not message.get("more_body", False):
            self.expected_content_length = len(message.get("body", b""))
        return super().send(message)


class BoundedHeadProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the bounds on requests it lacks: it buffers a head (and a chunked
    body's trailers) of any size, data trickling in keeps a connection open for ever (each byte cancels the
    keep-alive timer), and it waits for a body for ever. A head larger than `max_head_bytes` is answered
    431, one not complete `head_timeout` seconds after its first byte 408, both in Anthropic's error shape
    and after the answers to the requests before it on the connection, which is then closed (so is a head
    without its one Host header, answered 400); trailers over
    the bound close the connection, and so does a new connection on which no request begins within
    `head_timeout`. A body of which nothing has come for `body_timeout` seconds while the request waits for
    it is answered 408 and its connection closed. And a client that takes nothing of its answer for
    `send_timeout` seconds while the answer waits on it (uvicorn waits for ever, holding the request and its
    upstream connection; off Linux, whose kernel tells what the client took: one for which writing did not
    resume in that time) loses its connection: the request sees its client gone (also with requests
    pipelined behind it, which uvicorn told alone), and reading pauses while 32 requests are queued on a
    connection (uvicorn read and queued all a client sent). A request that arrives in
    one read (every real client's usual one) costs no timer of its own (there is one per connection), and
    its head's size is only added up when the read was larger than the bound or the head came in more than one
    read; an answer costs a timer only
    when the client falls behind it."""

    max_head_bytes = 64 * 1024
    head_timeout = 30.0
    body_timeout = 30.0
    send_timeout = 60.0

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        # Bytes of the head being read, in the reads before the current one; None outside heads (between
        # requests, and while a body is read).
        self._head_bytes: int | None = None
        # Whether a head began in the current read (the read may also hold the request before it), and its size.
        self._head_began = False
        self._read_size = 0
        self._head_timer: asyncio.TimerHandle | None = None
        # While a body is incomplete after a read: a timer, and when the body last advanced.
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_at = 0.0
        # While the transport's write buffer is over its high-water mark: the client is not keeping up.
        self._send_timer: asyncio.TimerHandle | None = None
        self._trailers = _Trailers()
        # A refusal waiting for the answers to the requests before it (the input is dropped meanwhile): of a
        # head, or of a request queued behind them whose body cannot be read (`_answer_unread`).
        self._refusal: _Refusal | None = None
        self._discarding = False
        # The request whose task runs (with requests pipelined behind it, `self.cycle` is the newest of those).
        self._running: RequestResponseCycle | None = None

    @classmethod
    def bounded(cls, server: ServerConfig) -> type[BoundedHeadProtocol]:
        limits = {
            "max_head_bytes": server.max_head_bytes,
            "head_timeout": server.head_timeout_seconds,
            "body_timeout": server.body_timeout_seconds,
            "send_timeout": server.send_timeout_seconds,
        }
        return type(cls.__name__, (cls,), limits)

    def data_received(self, data: bytes) -> None:
        # A loop, not recursion: what follows a request that asked to upgrade is parsed anew (see
        # `_upgrade_ignored`), and one read may hold hundreds of them.
        while data:
            data = self._parse(data)

    def _parse(self, data: bytes) -> bytes:
        """uvicorn's `data_received`, but for telling a head refused by a callback from a malformed request.
        Returns what is left to parse anew."""
        if self._discarding:
            return b""
        # uvicorn cancels its keep-alive timer on any byte: here only a request beginning does (see
        # `on_message_begin`), so that blank lines cannot hold a connection open.
        self._head_began, self._read_size = False, len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _HeadRefused):
                self._refuse(exc.__context__.status, str(exc.__context__))
            elif isinstance(exc.__context__, _TrailersRefused):
                # Its request can never be read whole: answered 431 and closed, and accounted as refused (it was
                # recorded as the client's disconnect).
                self._refuse(431, f"Trailer fields over {self.max_head_bytes} bytes")
            else:
                self._invalid()
            return b""
        except httptools.HttpParserError:
            self._invalid()
            return b""
        except httptools.HttpParserUpgrade as upgrade:
            return self._upgrade_ignored(data[upgrade.args[0] :])
        if self._head_bytes is None:
            cycle = self.cycle
            if cycle is not None and cycle.more_body and not cycle.response_complete:
                self._body_advanced()
            return b""
        if self.transport.is_closing():
            return b""
        # In a head after this read. A read in which it began may hold the request before it too: not
        # counted (a head gets at most one read more than its bound).
        if not self._head_began:
            self._head_bytes += len(data)
        if self._head_bytes > self.max_head_bytes:
            self._refuse(431, self._too_large())
        elif self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)
        return b""

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self.flow = _PipelineFlow(transport, self.pipeline)
        # The first request must begin in time too (uvicorn times out only connections that were answered).
        self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)

    def on_message_begin(self) -> None:
        self._unset_keepalive_if_required()
        super().on_message_begin()
        self._head_bytes, self._head_began = 0, True

    def on_headers_complete(self) -> None:
        # A head that began in this read is no larger than the read; one that began in an earlier read, whose
        # share of it was not added up (it may hold the request before it too, and uvloop reads up to 250 KB at
        # a time), is measured: a 140 KB head sent at once passed the 64 KiB bound in two reads.
        if (not self._head_began or self._read_size > self.max_head_bytes) and self._head_size() > self.max_head_bytes:
            raise _HeadRefused(431, self._too_large())
        if (version := self.parser.get_http_version()) != "1.1":
            if refused := version_refusal(self.headers, version):
                raise _HeadRefused(400, refused)
            # RFC 9110 (15.2): no 1xx to an HTTP/1.0 client, which takes one for its answer; it sends its
            # body without waiting for a `100 Continue` (uvicorn wrote one to any client that asked).
            self.expect_100_continue = False
        # One Host header, the usual case, is all this costs per request (a count).
        if [name for name, _ in self.headers].count(b"host") != 1 and (hosts := host_refusal(self.headers, version)):
            raise _HeadRefused(400, hosts)
        self._head_bytes = None
        self._cancel_head_timer()
        super().on_headers_complete()
        # `keep_alive` first: it is set for every HTTP/1.1 request but those asking to close.
        cycle = self.cycle
        cycle.__class__ = _OneWriteCycle if cycle.keep_alive or cycle.scope["http_version"] != "1.0" else _Http10Cycle
        # From here on `on_header` sees trailers only: bounded, and kept out of the request's headers.
        self._trailers.left = self.max_head_bytes
        self.headers = self._trailers

    def on_response_complete(self) -> None:
        if self.pipeline:  # a pipelined request begins now: its body's silence counts from here
            self._body_at = self.loop.time()
        # Answered before its body was read whole (a 401 before the body, a 413): uvicorn would read and drop
        # the rest to reach the next request, for as long as the client sends it, up to the keep-alive
        # timeout (75 s): gigabytes, from a client without a key. The connection ends instead. (With a request
        # pipelined behind it, `self.cycle` is that one; the answered one's body was whole, or the parser would
        # not have reached the next head.)
        unread = not self.pipeline and self.cycle.more_body and not self.transport.is_closing()
        super().on_response_complete()
        if unread:
            self._discarding = True
            self._linger()
        elif self._refusal is not None and (
            self.cycle.response_complete  # a head's: no request left before it
            if self._refusal.cycle is None
            else not self._queued(self._refusal.cycle)  # its request's turn came
        ):
            self._write_refusal(self._refusal)

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: ASGI3Application) -> None:
        self._running = cycle
        super()._start_asgi_task(cycle, app)

    def connection_lost(self, exc: Exception | None) -> None:
        # uvicorn tells only `self.cycle`: with requests pipelined behind it, the running one went on to the
        # end of its upstream answer, written into a closed socket and accounted as delivered.
        running = self._running
        if running is not None and running is not self.cycle and not running.response_complete:
            running.disconnected = True
            running.message_event.set()
        self._cancel_head_timer()
        for timer in (self._body_timer, self._send_timer):
            if timer is not None:
                timer.cancel()
        self._body_timer = self._send_timer = None
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self._send_timer is None:
            self._arm_send_timer(unacknowledged_bytes(self.transport))

    def _arm_send_timer(self, unacknowledged: int | None) -> None:
        self._send_timer = self.loop.call_later(self.send_timeout, self._send_timed_out, unacknowledged)

    def resume_writing(self) -> None:
        super().resume_writing()
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _send_timed_out(self, unacknowledged_then: int | None) -> None:
        self._send_timer = None
        # The kernel makes room for more only once about a third of the socket's send buffer (up to 4 MB) is
        # free, and writing resumes only then: a client reading steadily, but less than that per timeout, was
        # cut off. Where the kernel tells how much the client has taken, one that took anything keeps its
        # connection for another timeout (while paused the application writes nothing more, bar the rest of
        # the message that filled the buffer: only the client's reading makes the count go down).
        unacknowledged = unacknowledged_bytes(self.transport)
        if unacknowledged is not None and unacknowledged_then is not None and unacknowledged < unacknowledged_then:
            self._arm_send_timer(unacknowledged)
            return
        self._warn(f"A client took nothing of its answer for {self.send_timeout:g} s: connection closed")
        for cycle in (self._running, self.cycle):
            if cycle is not None:
                # Its answer is cut off, also when it was all handed over already (uvicorn tells only a request
                # whose answer is incomplete): the gateway records it as the client's disconnect.
                cycle.disconnected = True
        # Not a lingering close: what is buffered for the client is not going anywhere.
        self.transport.abort()

    def _head_size(self) -> int:
        """The parsed head's size, give or take its request line's method and version."""
        return len(self.url) + sum([len(name) + len(value) + 4 for name, value in self.headers])

    def _too_large(self) -> str:
        limit = self.max_head_bytes
        return f"The request head exceeds {f'{limit // 1024} KiB' if limit % 1024 == 0 else f'{limit} bytes'}"

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if self.flow.read_paused and self.pipeline:  # not reading (`_PipelineFlow`): not the client's slowness
            self._head_timer = self.loop.call_later(self.head_timeout, self._head_timed_out)
            return
        if self._head_bytes is not None:
            self._refuse(408, f"The request head was not complete within {self.head_timeout:g} s")
        elif self.cycle is None:  # nothing (or blank lines) since the connection opened: no request to answer
            self.transport.close()

    def _body_advanced(self) -> None:
        """A read left the body incomplete: it has `body_timeout` seconds from now to go on. One timer per
        body, moved on lazily when it fires."""
        self._body_at = self.loop.time()
        if self._body_timer is None:
            self._body_timer = self.loop.call_at(self._body_at + self.body_timeout, self._body_timed_out)

    def _body_timed_out(self) -> None:
        self._body_timer = None
        cycle = self.cycle
        if cycle is None or not cycle.more_body or cycle.response_complete or self.transport.is_closing():
            return
        now = self.loop.time()
        # The request has not taken what came yet, or has not even begun (queued behind the answers before
        # it on the connection, which a 408 would cut into): not the client's silence.
        if self.flow.read_paused or self.pipeline:
            self._body_at = now
        if now < self._body_at + self.body_timeout:
            self._body_timer = self.loop.call_at(self._body_at + self.body_timeout, self._body_timed_out)
            return
        if cycle.response_started:  # answered without its whole body, and still answering: nothing to say
            self.transport.close()
            return
        message = f"The request body stopped arriving: nothing of it for {self.body_timeout:g} s"
        self._stop_reading(message)
        self._answer_unread(cycle, 408, message)

    def _answer_unread(self, cycle: RequestResponseCycle, status: int, message: str, linger: bool = True) -> None:
        """Answer a request whose body can never be read whole: the request waiting for it sees its client gone,
        and accounts for the answer given here, under its request id. A request queued behind answers still
        being written is answered in its turn (HTTP/1.1 answers in order)."""
        refusal = _Refusal(status, message, cycle, linger, headers=list(cycle.scope["headers"]))
        # uvicorn types the scope as a TypedDict of ASGI's keys only; the gateway reads it as any ASGI scope.
        scope = cast("Scope", cycle.scope)
        scope[SERVER_ANSWER] = (refusal.request_id, ApiError(status, message))
        # Its first `receive` would write `100 Continue` after this answer (and after `write_eof`: a RuntimeError).
        cycle.waiting_for_100_continue = False
        cycle.disconnected = True
        cycle.message_event.set()
        if self._queued(cycle):
            self._refusal = refusal
        else:
            self._write_refusal(refusal)

    def _queued(self, cycle: RequestResponseCycle) -> bool:
        """Is the request still waiting behind answers not yet written (pipelined), its task not started?"""
        return any(queued is cycle for queued, _ in self.pipeline)

    def _upgrade_ignored(self, rest: bytes) -> bytes:
        """httptools hands whatever follows a head with `Connection: upgrade` (`curl --http2` asks for h2c) to
        the new protocol: a body was lost, and read as requests of its own when it came in a later read. No
        upgrade is supported here, so none is made (RFC 9110 lets a server ignore the header): a request
        without a body is served as HTTP/1.1 and what follows it (returned) is read as the next request; one
        with a body is refused, as that body cannot be read."""
        cycle = self.cycle
        assert cycle is not None
        bodiless = all(
            name != b"transfer-encoding" and not value.strip(b"0")  # content-length 0 (or 00…)
            for name, value in cycle.scope["headers"]
            if name in (b"content-length", b"transfer-encoding")
        )
        if bodiless:
            return rest
        message = (
            "A request with a body cannot ask to switch protocols (Connection: upgrade): poolgate speaks HTTP/1.1"
            " only; send it without the Upgrade header"
        )
        self._stop_reading(message)
        self._answer_unread(cycle, 400, message)  # lingering: the client may still be sending its body
        return b""

    def _warn(self, message: str) -> None:
        # The message, its figures taken out, is the line's format, so that each kind of fault is bounded on its
        # own: a figure may be the client's to choose (a head's Host header count), and one kind per figure let
        # a client write the lines of as many kinds as the bound tracks.
        figures = _FIGURES.findall(message)
        kind = _FIGURES.sub("%s", message.replace("%", "%%"))
        _client_faults.warning(kind + " (from %s)", *figures, self.client[0] if self.client else "?")

    def _stop_reading(self, why: str) -> None:
        """Nothing more the client sends is parsed (it is read and dropped); `why` is logged."""
        self._discarding = True
        self._warn(why)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _invalid(self) -> None:
        self._refuse(400, "Invalid HTTP request received")

    def _refuse(self, status: int, message: str) -> None:
        """Answer a refused head (or a malformed request) once the requests before it on the connection are
        answered (HTTP/1.1 answers in order), in Anthropic's error shape; nothing more is read."""
        self._cancel_head_timer()
        self._stop_reading(message)
        # The head's headers read so far (none before the first head; outside a head, a finished request's
        # trailers, which tell nothing).
        head = [] if self.headers is None or isinstance(self.headers, _Trailers) else self.headers
        if self.cycle is None or self.cycle.response_complete:
            self._write_refusal(_Refusal(status, message, headers=head))
        elif self._head_bytes is not None:  # a new head behind answers still being written
            self._refusal = _Refusal(status, message, headers=head)
        else:
            # The body of the request being served is malformed: it can never be read. Say so and close, as
            # uvicorn does.
            self._answer_unread(self.cycle, status, message, linger=False)

    def _write_refusal(self, refusal: _Refusal) -> None:
        self._refusal = None
        body = error_body(error_type_for(refusal.status), refusal.message, refusal.request_id)
        cors = _CORS_FIELDS if browser_request(fields_of(refusal.headers)) else b""
        # The server's `date` (RFC 9110 6.6.1: in every 4xx of a server with a clock), as its other answers have.
        default = b"".join([b"%s: %s\r\n" % field for field in self.server_state.default_headers])
        self.transport.write(
            b"HTTP/1.1 %d %s\r\n%scontent-type: application/json\r\ncontent-length: %d\r\nrequest-id: %s\r\n"
            b"%sconnection: close\r\n\r\n%s"
            % (refusal.status, _REASONS[refusal.status], default, len(body), refusal.request_id.encode(), cors, body)
        )
        if refusal.linger:
            self._linger()
        else:
            self.transport.close()

    def _linger(self) -> None:
        """A lingering close (with `_discarding` set): closing with the client's data unread would reset the
        connection, and the client could lose the answer. Stop writing, drop what still comes, close when
        the client does (or after `LINGER_SECONDS`)."""
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.loop.call_later(LINGER_SECONDS, self.transport.close)


class _GraceOver(logging.Filter):
    """uvicorn logs the end of the shutdown grace at ERROR, as if something had gone wrong: it is the
    documented end of a graceful stop (`server.shutdown_grace_seconds`), so a warning that says what
    happens to the requests."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg == "Cancel %s running task(s), timeout graceful shutdown exceeded":
            record.levelno, record.levelname = logging.WARNING, "WARNING"
            record.msg = (
                "shutdown grace over: ending %s request(s) still running (each is answered 503, or an in-band"
                " error mid-stream, and recorded as interrupted)"
            )
        return True


_GRACE_OVER = _GraceOver()


def uvicorn_server(gateway: Gateway, config: GatewayConfig) -> uvicorn.Server:
    if _GRACE_OVER not in logging.getLogger("uvicorn.error").filters:
        logging.getLogger("uvicorn.error").addFilter(_GRACE_OVER)
    server_config = uvicorn.Config(
        gateway.asgi,
        loop="none",
        http=BoundedHeadProtocol.bounded(config.server),
        interface="asgi3",  # a plain function handing back the coroutine (see `Gateway.asgi`)
        ws="none",
        lifespan="on",
        log_config=None,
        access_log=False,  # the gateway writes its own (`server.access_log`), which says more
        server_header=False,
        proxy_headers=False,
        # uvicorn annotates whole seconds, but hands them to `asyncio.timeout`, which takes a float.
        timeout_graceful_shutdown=config.server.shutdown_grace_seconds,  # type: ignore[arg-type]
        timeout_keep_alive=75,
        backlog=2048,
    )
    return _Server(server_config, gateway)


def run(main: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run a coroutine on uvloop when it is installed."""
    if uvloop is not None:
        uvloop.run(main())
    else:  # pragma: no cover
        asyncio.run(main())


async def serve(gateway: Gateway, config: GatewayConfig, sock: socket.socket) -> None:
    raise_open_files_limit()
    server = uvicorn_server(gateway, config)
    try:
        await server.serve(sockets=[sock])
    finally:
        lifespan = getattr(server, "lifespan", None)
        if server.force_exit and lifespan is not None and not lifespan.shutdown_event.is_set():
            # A second Ctrl-C (or any second stop signal, see `_Server.handle_exit`) makes uvicorn stop waiting
            # for open requests and skip the application's shutdown. End the requests still running (each
            # answered and accounted, see `Gateway._messages`), then drain the usage writer (nothing lost) and
            # stop it: it ignores signals, so an undrained one held the exit forever.
            running = list(server.server_state.tasks)
            for task in running:
                task.cancel()
            if running:
                await asyncio.wait(running, timeout=FORCED_STOP_SECONDS)
            await lifespan.shutdown()
