"""Observers through the HTTP surface: every finished request becomes a `RequestFinished` event, and an
observer that raises changes nothing for the caller, the ledger or the other observers."""

from __future__ import annotations

import asyncio
from pathlib import Path

import anthropic
import orjson
import pytest
from sqlalchemy import select

from poolgate.config import parse_config
from poolgate.lifecycle.context import Upstream
from poolgate.lifecycle.observe import RequestFinished
from poolgate.lifecycle.routing.trace import RoutingTrace
from poolgate.mock import Fault, MockServer
from poolgate.store import repo
from poolgate.store.db import usage
from poolgate.store.usage import find_route
from tests.conftest import MOCK_KEYS, MODEL, RunningGateway, gateway_config, start_gateway, user
from tests.integration.test_relay_details import until_in_flight


class Broken:
    def request_finished(self, event: RequestFinished) -> None:
        raise RuntimeError("this observer is broken")


class Recorder:
    def __init__(self) -> None:
        self.events: list[RequestFinished] = []

    def request_finished(self, event: RequestFinished) -> None:
        self.events.append(event)


class HooksNothing:
    """An observer may implement only the hooks it cares about: none here."""


async def test_a_failing_observer_never_breaks_serving(gw: RunningGateway, mock: MockServer) -> None:
    recorder = Recorder()
    gw.gateway.observers.add(Broken(), first=True)
    gw.gateway.observers.add(recorder)
    gw.gateway.observers.add(HooksNothing())  # type: ignore[arg-type]
    _, key = repo.create_key(gw.gateway.engine, "observed", {"chain": "team-a/ci", "models": ["claude-sonnet-*"]})
    gw.gateway.reload()
    async with anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0) as client:
        answered = await client.messages.create(model=MODEL, max_tokens=16, messages=user())
        async with client.messages.stream(model=MODEL, max_tokens=16, messages=user()) as stream:
            await stream.get_final_message()
        with pytest.raises(anthropic.PermissionDeniedError):
            await client.messages.create(model="claude-haiku-4-5", max_tokens=16, messages=user())
        for mock_key in MOCK_KEYS:
            mock.set_fault(mock_key, Fault(status=500))
        with pytest.raises(anthropic.InternalServerError):
            await client.messages.create(model=MODEL, max_tokens=16, messages=user())
    assert answered.content
    gw.gateway.account_now()  # events come in batches, right after the loop turn a request finished in
    observers = gw.gateway.observers
    assert observers.errors >= 4 and observers.errors_by_observer["Broken"] == observers.errors

    ok, streamed, denied, failed = recorder.events
    assert ok.ok and streamed.ok and not denied.ok and not failed.ok
    assert {event.chain for event in recorder.events} == {"team-a/ci"}
    assert ok.principal is not None and ok.principal.name == "observed"
    assert ok.provider == "anthropic_api_key" and ok.upstream_id in {"up-0", "up-1", "up-2"}
    assert ok.model == MODEL and ok.latency_ms > 0 and ok.usage.output_tokens == answered.usage.output_tokens
    assert ok.route is not None and ok.route.terminal is not None and ok.route.terminal.chosen == ok.upstream_id
    assert ok.cost_micro_usd and ok.record.stream is False and streamed.record.stream is True
    assert denied.error_type == "permission_error" and denied.record.status == 403 and denied.route is None
    assert denied.error_message is not None and "claude-haiku-4-5" in denied.error_message
    assert ok.error_message is None and failed.error_message
    assert failed.record.status == 500 and failed.error_type == "api_error" and failed.cost_micro_usd == 0

    # The usage writer, an observer after the broken one, still wrote every record.
    await gw.gateway.flush_usage()
    assert len(repo_rows(gw)) == 4


class Cancelled:
    """A plugin that reads the result of a task that was cancelled."""

    def request_finished(self, event: RequestFinished) -> None:
        raise asyncio.CancelledError


async def test_an_observer_raising_cancelled_error_is_contained_like_any_failing_observer(
    gw: RunningGateway, caplog: pytest.LogCaptureFixture
) -> None:
    recorder = Recorder()
    gw.gateway.observers.add(Cancelled(), first=True)
    gw.gateway.observers.add(recorder)
    async with gw.client() as client:
        await asyncio.gather(*(client.messages.create(model=MODEL, max_tokens=8, messages=user()) for _ in range(3)))
    await gw.gateway.flush_usage()
    assert len(recorder.events) == 3 and len(repo_rows(gw)) == 3
    assert gw.gateway.observers.errors_by_observer == {"Cancelled": 3}
    assert "observer Cancelled failed on request_finished" in caplog.text


def repo_rows(gw: RunningGateway) -> list[object]:
    with gw.gateway.engine.connect() as conn:
        return list(conn.execute(select(usage.c.request_id)).all())


def stored_record(gw: RunningGateway, request_id: str) -> dict[str, object]:
    """The usage record with its routing trace, as `poolgate route explain` reads it."""
    record = find_route(gw.gateway.engine, request_id)
    assert record is not None
    return record


async def test_events_come_in_batches_shortly_after_and_one_failing_request_loses_no_other(
    gw: RunningGateway, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Usage records and observer events are made in batches (warm code, less CPU per request), right after
    the event loop's turn a request finished in, in the order requests finished; accounting that fails for
    one request is logged, and the others of its batch are still delivered."""
    recorder = Recorder()
    gw.gateway.observers.add(recorder)
    price = gw.gateway._price
    calls = 0

    def price_failing_once(*args: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 1:
            raise RuntimeError("a broken price list")
        return price(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(gw.gateway, "_price", price_failing_once)
    async with gw.client() as client:
        first = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
        second = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
    for _ in range(200):  # a few turns of the loop at most; bounded all the same
        if recorder.events:
            break
        await asyncio.sleep(0.01)
    assert [event.request_id for event in recorder.events] == [second.headers["request-id"]]
    assert f"accounting request {first.headers['request-id']} failed" in caplog.text


class Meddler:
    """A plugin that scribbles on the trace it is handed."""

    def request_finished(self, event: RequestFinished) -> None:
        if event.route is not None and event.route.terminal is not None:
            event.route.terminal.chosen = "somewhere-else"
            event.route.stages.clear()


async def test_an_observer_that_changes_the_trace_changes_no_record_of_it(gw: RunningGateway) -> None:
    """The route written to the usage record and kept for `poolgate route explain` is what the router decided,
    whatever an observer (a plugin) later does to the trace object it was handed."""
    gw.gateway.observers.add(Meddler(), first=True)
    async with gw.client() as client:
        answered = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
    request_id, upstream_id = answered.headers["request-id"], answered.headers["x-poolgate-upstream"]
    await gw.gateway.flush_usage()
    stored = stored_record(gw, request_id)["route"]
    for route in (orjson.loads(stored), gw.gateway.traces.get(request_id)):  # type: ignore[arg-type]
        assert route is not None
        assert route["terminal"]["chosen"] == upstream_id
        assert [stage["name"] for stage in route["stages"]][:2] == ["model", "quota"]


class Rewriter:
    """A plugin that scribbles on the usage record it is handed."""

    def request_finished(self, event: RequestFinished) -> None:
        event.record.input_tokens = 0  # type: ignore[misc]


async def test_an_observer_cannot_rewrite_the_usage_record_the_ledger_stores(gw: RunningGateway) -> None:
    gw.gateway.observers.add(Rewriter())
    async with gw.client() as client:
        answered = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
    await gw.gateway.flush_usage()
    stored = stored_record(gw, answered.headers["request-id"])
    assert stored["input_tokens"] == (await answered.parse()).usage.input_tokens > 0
    assert gw.gateway.observers.errors_by_observer == {"Rewriter": 1}


async def test_a_trace_that_cannot_be_written_loses_no_usage_record(
    gw: RunningGateway, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def unwritable(self: RoutingTrace) -> bytes:
        raise TypeError("a stage a plugin filled with something JSON cannot hold")

    monkeypatch.setattr(RoutingTrace, "to_json", unwritable)
    async with gw.client() as client:
        answered = await client.messages.with_raw_response.create(model=MODEL, max_tokens=8, messages=user())
    request_id = answered.headers["request-id"]
    await gw.gateway.flush_usage()
    record = stored_record(gw, request_id)
    assert record["status"] == 200 and record["route"] is None
    assert f"writing the routing trace of request {request_id} failed" in caplog.text


async def test_a_request_whose_account_a_reload_removed_meanwhile_still_names_its_provider(
    tmp_path: Path, mock: MockServer
) -> None:
    """An observer was told `provider=None` for a request answered by an account that `upstreams remove`
    took out while it ran (an operator's change mid-soak), though its usage record names that account and
    its channel priced it: the kind was looked up in the pool after the answer, where the account was gone."""
    gw = await start_gateway(gateway_config(tmp_path, mock.url, keys=()))
    try:
        recorder = Recorder()
        gw.gateway.observers.add(recorder)
        upstream = Upstream("stored-b", "anthropic_api_key", mock.url)
        repo.add_upstream(gw.gateway.engine, gw.gateway.box, upstream, MOCK_KEYS[1])
        gw.gateway.reload()
        mock.set_fault(MOCK_KEYS[1], Fault(ttfb_ms=300, times=1))
        async with gw.client() as client:
            answer = asyncio.create_task(client.messages.create(model=MODEL, max_tokens=8, messages=user()))
            await until_in_flight(mock)
            repo.remove_upstream(gw.gateway.engine, "stored-b")
            gw.gateway.reload()
            await answer
        gw.gateway.account_now()
        [event] = recorder.events
        assert event.ok and event.upstream_id == "stored-b" and event.cost_micro_usd
        assert event.provider == "anthropic_api_key"
    finally:
        await gw.stop()


async def test_a_config_file_keys_numeric_chain_reaches_observers_as_a_tokens_does(
    tmp_path: Path, mock: MockServer
) -> None:
    """`chain` is a string or a number (a cost centre's), in a token as in the config file: `chain: 42` in
    YAML was refused ("Input should be a valid string") though a token's 42 was taken."""
    key = "pg-static-chain-key-0123456789"
    text = f"keys:\n  - {{name: billing, key: {key}, claims: {{chain: 42}}}}\n"
    base = gateway_config(tmp_path, mock.url)
    config = base.model_copy(update={"keys": parse_config(text, environ={}).keys})
    gw = await start_gateway(config, key)
    try:
        recorder = Recorder()
        gw.gateway.observers.add(recorder)
        async with gw.client() as client:
            await client.messages.create(model=MODEL, max_tokens=8, messages=user())
        gw.gateway.account_now()
        assert [event.chain for event in recorder.events] == ["42"]
    finally:
        await gw.stop()
