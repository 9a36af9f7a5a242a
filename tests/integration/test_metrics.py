"""Prometheus metrics at /metrics: request counters and the pool's live state, behind the admin token."""

from __future__ import annotations

import asyncio
import logging
import socket
from pathlib import Path

import aiohttp
import anthropic
import orjson
import pytest

from poolgate.config import AdminConfig, RoutingConfig, UpstreamConfig, UpstreamTimeouts
from poolgate.mock import Fault, MockServer
from tests.conftest import MOCK_KEYS, MODEL, gateway_config, start_gateway, user
from tests.integration.test_request_heads import connect

ADMIN_TOKEN = "admin-token-0123456789abcdef"


async def scrape(url: str, headers: dict[str, str] | None = None) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(f"{url}/metrics", headers=headers or {}) as response:
        return response.status, await response.text()


async def test_metrics_count_requests_tokens_and_show_each_accounts_state(tmp_path: Path, mock: MockServer) -> None:
    running = await start_gateway(gateway_config(tmp_path, mock.url))
    try:
        mock.set_fault(MOCK_KEYS[2], Fault(status=500))
        async with running.client() as client:
            for _ in range(4):
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
        status, text = await scrape(running.url)
    finally:
        await running.stop()
    assert status == 200
    served = [
        line for line in text.splitlines() if line.startswith("poolgate_requests_total{") and 'status="200"' in line
    ]
    assert sum(float(line.rsplit(" ", 1)[1]) for line in served) == 4
    assert f'model="{MODEL}"' in served[0] and 'endpoint="messages"' in served[0]
    assert 'poolgate_tokens_total{kind="output"' in text
    assert 'poolgate_upstream_usable{kind="anthropic_api_key",upstream="up-2"} 0.0' in text
    assert 'poolgate_upstream_usable{kind="anthropic_api_key",upstream="up-0"} 1.0' in text
    assert "poolgate_time_to_first_byte_seconds_bucket" in text and "poolgate_observer_errors_total 0.0" in text
    assert "# TYPE poolgate_observer_errors_total counter" in text  # a count, not a gauge
    assert MOCK_KEYS[0] not in text and running.key not in text


async def test_metrics_need_the_admin_token_once_one_is_configured(tmp_path: Path, mock: MockServer) -> None:
    running = await start_gateway(gateway_config(tmp_path, mock.url, admin=AdminConfig(token=ADMIN_TOKEN)))
    try:
        assert (await scrape(running.url))[0] == 401
        assert (await scrape(running.url, {"x-api-key": running.key}))[0] == 401
        status, text = await scrape(running.url, {"authorization": f"Bearer {ADMIN_TOKEN}"})
        assert status == 200 and "poolgate_upstream_usable" in text
        # Read as gateway keys are: blanks around the token are not part of it, and a blank header is none
        # (an empty x-admin-token beat a valid Bearer token).
        assert (await scrape(running.url, {"authorization": f"Bearer  {ADMIN_TOKEN} "}))[0] == 200
        assert (await scrape(running.url, {"x-admin-token": "", "authorization": f"Bearer {ADMIN_TOKEN}"}))[0] == 200
        assert (await scrape(running.url, {"x-admin-token": f" {ADMIN_TOKEN}"}))[0] == 200
    finally:
        await running.stop()


# Spellings of the admin API's and the metrics' paths: percent-encoded, with dot segments, empty segments, path
# parameters, a trailing dot, an absolute URI.
ADMIN_PATH_SPELLINGS = (
    b"/admin/upstreams",
    b"/%61dmin/upstreams",
    b"/admin%2Fupstreams",
    b"/admin/../admin/upstreams",
    b"/admin//upstreams",
    b"/admin/upstreams;x=1",
    b"/admin/upstreams.",
    b"/admin/routes/%2e%2e/upstreams",
    b"http://gateway/admin/upstreams",
    b"/metrics",
    b"/%6detrics",
    b"/metrics?format=json",
)


async def test_no_spelling_of_an_admin_path_or_method_answers_without_the_admin_token(
    tmp_path: Path, mock: MockServer
) -> None:
    """However a client spells the path (the server decodes it, the gateway does not normalise it) or whichever
    method it uses, a request for the admin API or the metrics that brings a gateway key instead of the admin
    token is refused (401; 405 for a method the path does not take), never answered with their data."""
    running = await start_gateway(gateway_config(tmp_path, mock.url, admin=AdminConfig(token=ADMIN_TOKEN)))
    answers: dict[tuple[bytes, bytes], bytes] = {}
    try:
        for target in ADMIN_PATH_SPELLINGS:
            for method in (b"GET", b"HEAD", b"OPTIONS"):
                reader, writer = await connect(running)
                key = running.key.encode()
                writer.write(
                    b"%s %s HTTP/1.1\r\nhost: gateway\r\nx-api-key: %s\r\nconnection: close\r\n\r\n"
                    % (method, target, key)
                )
                answers[method, target] = await asyncio.wait_for(reader.read(), 10)
                writer.close()
    finally:
        await running.stop()
    for (method, target), answer in answers.items():
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.split(b" ", 2)[1] in (b"401", b"405"), (method, target, answer)
        assert body == b"" if method == b"HEAD" else orjson.loads(body)["type"] == "error", (method, target, answer)


async def test_failed_attempts_are_counted_per_upstream_and_named_in_the_access_log(
    tmp_path: Path, mock: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    """A request failed over from an account answered 200 and its record names the account that answered:
    without these, which account failed, and how, was nowhere but in the stored routing trace."""
    caplog.set_level(logging.INFO, logger="poolgate.access")
    config = gateway_config(tmp_path, mock.url, routing=RoutingConfig(strategy="first-pick", max_attempts=2))
    running = await start_gateway(config)
    try:
        mock.set_fault(MOCK_KEYS[0], Fault(status=529))
        mock.set_fault(MOCK_KEYS[1], Fault(status=429, retry_after=30))
        async with running.client() as client:
            with pytest.raises(anthropic.RateLimitError):
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
            await client.messages.create(model=MODEL, max_tokens=8, messages=user())  # up-2 answers
        await running.gateway.flush_usage()
        status, text = await scrape(running.url)
    finally:
        await running.stop()
    assert status == 200
    counted = {line for line in text.splitlines() if line.startswith("poolgate_upstream_failed_attempts_total{")}
    assert counted == {
        'poolgate_upstream_failed_attempts_total{error_type="overloaded_error",status="529",upstream="up-0"} 1.0',
        'poolgate_upstream_failed_attempts_total{error_type="rate_limit_error",status="429",upstream="up-1"} 1.0',
    }
    refused, answered = [r.getMessage() for r in caplog.records if r.name == "poolgate.access"]
    assert "status=429" in refused and refused.endswith(
        "attempts=2 error=rate_limit_error failed=up-0:529:overloaded_error,up-1:429:rate_limit_error"
    )
    assert "upstream=up-2" in answered and "status=200" in answered and answered.endswith("attempts=1")


def unreachable_url() -> str:
    """The URL of a port nothing listens on (bound, then let go)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{sock.getsockname()[1]}"


async def test_an_account_that_gave_no_answer_is_not_counted_as_overloaded(
    tmp_path: Path, mock: MockServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Not reachable or out of time, an account's failed attempt says so (trace, access log, metric) rather
    than pass for the account's own 529 overload; the client still gets the pool's 529."""
    caplog.set_level(logging.INFO, logger="poolgate.access")
    upstreams = (
        UpstreamConfig(id="up-0", base_url=unreachable_url(), api_key=MOCK_KEYS[0]),
        UpstreamConfig(id="up-1", base_url=mock.url, api_key=MOCK_KEYS[1]),
    )
    config = gateway_config(
        tmp_path,
        mock.url,
        upstreams=upstreams,
        routing=RoutingConfig(strategy="first-pick"),
        timeouts=UpstreamTimeouts(first_byte_seconds=0.3),
    )
    running = await start_gateway(config)
    try:
        mock.set_fault(MOCK_KEYS[1], Fault(ttfb_ms=5_000))
        async with running.client() as client:
            with pytest.raises(anthropic.APIStatusError) as failed:
                await client.messages.create(model=MODEL, max_tokens=8, messages=user())
        request_id = failed.value.response.headers["request-id"]
        await running.gateway.flush_usage()
        _, text = await scrape(running.url)
        route = running.gateway.traces.get(request_id)
    finally:
        await running.stop()
    assert failed.value.status_code == 529 and failed.value.body["error"]["type"] == "overloaded_error"  # type: ignore[index]
    assert route is not None
    assert [(f["upstream_id"], f["status"], f["error_type"]) for f in route["failed"]] == [  # type: ignore[attr-defined]
        ("up-0", 529, "connection_error"),
        ("up-1", 529, "timeout_error"),
    ]
    counted = {line for line in text.splitlines() if line.startswith("poolgate_upstream_failed_attempts_total{")}
    assert counted == {
        'poolgate_upstream_failed_attempts_total{error_type="connection_error",status="529",upstream="up-0"} 1.0',
        'poolgate_upstream_failed_attempts_total{error_type="timeout_error",status="529",upstream="up-1"} 1.0',
    }
    [logged] = [r.getMessage() for r in caplog.records if r.name == "poolgate.access"]
    assert logged.endswith("error=overloaded_error failed=up-0:529:connection_error,up-1:529:timeout_error")


async def test_an_account_held_out_as_rate_limited_shows_no_headroom(tmp_path: Path, mock: MockServer) -> None:
    """The router held an account out as `rate_limited` while the admin API and the metrics showed it with
    room left (the estimate refills windows between answers; a 429 parks it whatever its windows say):
    dashboards told of capacity no request could use."""
    config = gateway_config(
        tmp_path, mock.url, admin=AdminConfig(token=ADMIN_TOKEN), routing=RoutingConfig(strategy="first-pick")
    )
    running = await start_gateway(config)
    auth = {"x-admin-token": ADMIN_TOKEN}
    try:
        mock.set_fault(MOCK_KEYS[0], Fault(status=429, retry_after=30, times=1))
        async with running.client() as client:
            await client.messages.create(model=MODEL, max_tokens=8, messages=user())
        async with aiohttp.ClientSession() as http, http.get(f"{running.url}/admin/upstreams", headers=auth) as answer:
            states = {state["id"]: state for state in (await answer.json())["upstreams"]}
        _, text = await scrape(running.url, auth)
    finally:
        await running.stop()
    assert (states["up-0"]["unusable_reason"], states["up-0"]["headroom"]) == ("rate_limited", 0.0)
    assert states["up-1"]["headroom"] > 0.0
    assert 'poolgate_upstream_headroom{kind="anthropic_api_key",upstream="up-0"} 0.0' in text
