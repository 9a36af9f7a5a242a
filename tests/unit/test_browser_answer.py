"""A browser caller's `send` (CORS headers added) still shows the gateway what uvicorn's request cycle knows:
that the client is gone, and its flow control."""

from __future__ import annotations

from poolgate.api.cors import BrowserAnswer
from poolgate.api.http import Message, connection_lost, server_flow


class Cycle:
    """uvicorn's request cycle as the gateway reads it: `send` is its method."""

    def __init__(self) -> None:
        self.disconnected = False
        self.flow = object()
        self.sent: list[Message] = []

    async def send(self, message: Message) -> None:
        self.sent.append(message)


async def test_a_browser_answer_shows_its_cycles_disconnect_and_flow() -> None:
    cycle = Cycle()
    send = BrowserAnswer(cycle.send).send
    assert (connection_lost(send), server_flow(send)) == (False, cycle.flow)
    cycle.disconnected = True
    assert connection_lost(send)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    assert (b"access-control-allow-origin", b"*") in cycle.sent[0]["headers"]


async def test_under_another_server_nothing_is_known_of_the_connection() -> None:
    async def send(message: Message) -> None:
        return None

    browser_send = BrowserAnswer(send).send
    assert (connection_lost(send), server_flow(send)) == (False, None)
    assert (connection_lost(browser_send), server_flow(browser_send)) == (False, None)
