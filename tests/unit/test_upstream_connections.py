"""Which request errors say the connection was dead before a byte of an answer (see `closed_while_idle`)."""

from __future__ import annotations

import errno
import resource

import aiohttp
import pytest
from aiohttp.client_reqrep import ConnectionKey

from poolgate.upstreams.connections import dead_before_answer, raise_open_files_limit


def wrapped(cause: BaseException) -> aiohttp.ClientOSError:
    """As aiohttp raises a failure to write a request body: a ClientOSError without an errno, caused by it."""
    error = aiohttp.ClientOSError(None, "Can not write request body for http://127.0.0.1/v1/messages")
    error.__cause__ = cause
    return error


KEY = ConnectionKey("127.0.0.1", 443, True, True, None, None, None)


@pytest.mark.parametrize(
    ("error", "dead"),
    [
        (aiohttp.ServerDisconnectedError(), True),
        (aiohttp.ClientOSError(errno.ECONNRESET, "Connection reset by peer"), True),
        (aiohttp.ClientOSError(errno.EPIPE, "Broken pipe"), True),
        # The connection was found closing as the request went out on it.
        (wrapped(aiohttp.ClientConnectionResetError("Cannot write to closing transport")), True),
        # The upstream began an answer: what aiohttp parsed of its head comes with the error.
        (aiohttp.ServerDisconnectedError(object()), False),  # type: ignore[arg-type]
        # No connection could be made: the account's failure, whatever the cause.
        (aiohttp.ClientConnectorError(KEY, ConnectionResetError(errno.ECONNRESET, "reset")), False),
        (aiohttp.SocketTimeoutError("Timeout on reading data from socket"), False),
        (aiohttp.ClientOSError(errno.EHOSTUNREACH, "No route to host"), False),
    ],
)
def test_only_a_close_or_reset_before_any_answer_is_a_dead_connection(error: BaseException, dead: bool) -> None:
    assert dead_before_answer(error) is dead


@pytest.mark.parametrize(
    ("limits", "kernel_cap", "raised"),
    [
        ((1024, 524_288), None, 524_288),  # Linux's usual: the hard limit
        ((256, resource.RLIM_INFINITY), 10_240, 10_240),  # macOS's: no hard limit, the kernel's cap
        ((256, resource.RLIM_INFINITY), None, 1 << 20),
        ((65_536, 65_536), None, 65_536),  # nothing to raise
        ((256, 512), 300, 256),  # a sandbox that refuses: left as it was (and warned about)
    ],
)
def test_serve_raises_its_open_files_limit_as_far_as_the_system_lets_it(
    monkeypatch: pytest.MonkeyPatch, limits: tuple[int, int], kernel_cap: int | None, raised: int
) -> None:
    current = list(limits)

    def setrlimit(which: int, wanted: tuple[int, int]) -> None:
        if kernel_cap is not None and wanted[0] > kernel_cap:
            raise ValueError("not allowed to raise maximum limit")
        current[:] = wanted

    monkeypatch.setattr(resource, "getrlimit", lambda which: tuple(current))
    monkeypatch.setattr(resource, "setrlimit", setrlimit)
    assert raise_open_files_limit() == raised == current[0]
