"""Which request errors say the connection was dead before a byte of an answer (see `closed_while_idle`)."""

from __future__ import annotations

import errno

import aiohttp
import pytest
from aiohttp.client_reqrep import ConnectionKey

from poolgate.upstreams.connections import dead_before_answer


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
