"""Upstream timeouts: `first_byte_seconds` until the response headers, `idle_seconds` between chunks after."""

from __future__ import annotations

import logging
from pathlib import Path

import anthropic
import pytest

from poolgate.config import RoutingConfig, UpstreamTimeouts
from poolgate.mock import Fault, MockServer
from tests.conftest import MOCK_KEYS, MODEL, gateway_config, start_gateway, usage_rows, user
from tests.integration.test_gateway import stream_error

FIRST_PICK = RoutingConfig(strategy="first-pick")


async def answer_to_one_request(
    tmp_path: Path, mock: MockServer, timeouts: UpstreamTimeouts, slow_first_account: Fault
) -> tuple[str, dict[str, object]]:
    """Which account answered one non-streaming request, and its usage row, when the first one is slow."""
    running = await start_gateway(gateway_config(tmp_path, mock.url, routing=FIRST_PICK, timeouts=timeouts))
    try:
        mock.set_fault(MOCK_KEYS[0], slow_first_account)
        async with running.client() as client:
            raw = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
        [row] = await usage_rows(running)
        return raw.headers["x-poolgate-upstream"], row
    finally:
        await running.stop()


async def test_an_account_silent_past_the_first_byte_timeout_is_failed_over(tmp_path: Path, mock: MockServer) -> None:
    # up-0 would answer, but only after 20 s: the request must not wait for it.
    timeouts = UpstreamTimeouts(first_byte_seconds=0.5, idle_seconds=30)
    upstream, row = await answer_to_one_request(tmp_path, mock, timeouts, Fault(ttfb_ms=20_000))
    assert upstream == "up-1" and row["attempts"] == 2 and row["status"] == 200


async def test_a_slow_non_streaming_answer_within_the_first_byte_timeout_is_not_cut_by_the_idle_timeout(
    tmp_path: Path, mock: MockServer
) -> None:
    # A non-streaming answer sends nothing until it is complete: that wait is "first byte", not "idle".
    timeouts = UpstreamTimeouts(first_byte_seconds=30, idle_seconds=0.3)
    upstream, row = await answer_to_one_request(tmp_path, mock, timeouts, Fault(ttfb_ms=1_000))
    assert upstream == "up-0" and row["attempts"] == 1 and row["status"] == 200


async def test_a_stream_silent_past_the_idle_timeout_ends_with_an_error_event(tmp_path: Path, mock: MockServer) -> None:
    timeouts = UpstreamTimeouts(first_byte_seconds=30, idle_seconds=0.3)
    running = await start_gateway(gateway_config(tmp_path, mock.url, routing=FIRST_PICK, timeouts=timeouts))
    try:
        # One text delta a second: the headers and message_start come at once, then 1 s gaps.
        mock.set_fault(MOCK_KEYS[0], Fault(tokens_per_second=1))
        assert "The upstream sent nothing for 0.3 s mid-stream" in str(await stream_error(running))
        [row] = await usage_rows(running)
        assert row["outcome"] == "stream_error" and row["attempts"] == 1
    finally:
        await running.stop()


async def test_when_no_account_answers_in_time_the_client_is_told_so(tmp_path: Path, mock: MockServer) -> None:
    timeouts = UpstreamTimeouts(first_byte_seconds=0.3, idle_seconds=30)
    config = gateway_config(tmp_path, mock.url, keys=MOCK_KEYS[:1], timeouts=timeouts)
    running = await start_gateway(config)
    try:
        mock.set_fault(MOCK_KEYS[0], Fault(ttfb_ms=5_000))
        async with running.client() as client:
            with pytest.raises(anthropic.APIStatusError) as failed:
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
        assert failed.value.status_code == 529
        assert "did not answer within 0.3 s" in str(failed.value)
    finally:
        await running.stop()


@pytest.mark.parametrize(
    ("fault", "why"),
    [
        (Fault(ttfb_ms=5_000), "Upstream account did not answer within 0.3 s"),
        (Fault(reset_connection=True), "Upstream account closed the connection before its answer"),
    ],
    ids=["silent", "reset"],
)
async def test_an_account_out_for_giving_no_answer_is_logged_as_such_not_as_a_connection_problem(
    tmp_path: Path, mock: MockServer, fault: Fault, why: str, caplog: pytest.LogCaptureFixture
) -> None:
    """An account slower than `first_byte_seconds` (or resetting the connection it took) went out with
    "upstream up-0 is unhealthy after connect (3 in a row)": the operator looked for a network or address
    problem, while the account was reached and did not answer in time. The line says what happened, as the
    client's 529 and the attempts' own warnings say it."""
    caplog.set_level(logging.WARNING, logger="poolgate.relay")
    timeouts = UpstreamTimeouts(first_byte_seconds=0.3, idle_seconds=30)
    config = gateway_config(tmp_path, mock.url, keys=MOCK_KEYS[:1], timeouts=timeouts)
    running = await start_gateway(config)
    try:
        mock.set_fault(MOCK_KEYS[0], fault)
        async with running.client() as client:
            for _ in range(3):  # `health.failure_threshold`
                with pytest.raises(anthropic.APIStatusError):
                    await client.messages.create(model=MODEL, max_tokens=8, messages=user())
    finally:
        await running.stop()
    out = [r.getMessage() for r in caplog.records if r.name == "poolgate.relay" and "unhealthy" in r.getMessage()]
    assert out == [f"upstream up-0 is unhealthy after no answer ({why}) (3 in a row): no traffic for 30.0 s"], out
