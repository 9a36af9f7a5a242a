"""Concurrent load while the upstream's faults change under it, many times a second, and some clients leave
their streams midway: every request gets a whole answer or an error in Anthropic's shape, every one is
accounted exactly once with what its client was told, and nothing is left in flight, in the gateway or
upstream."""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from sqlalchemy import select

from poolgate.config import GatewayConfig, HealthConfig
from poolgate.lifecycle.context import Upstream
from poolgate.mock import Fault, MockServer
from poolgate.store import repo
from poolgate.store.db import usage
from tests import claude_code
from tests.conftest import MOCK_KEYS, MODEL, RunningGateway, gateway_config, start_gateway, user
from tests.integration.test_oauth_accounts import add_account, oauth_config

# What an upstream account may do at any moment (None: behave). New Fault objects each time: `times` counts
# down in the one the mock holds.
FAULTS: tuple[dict[str, Any] | None, ...] = (
    {"status": 529},
    {"status": 500},
    {"status": 429, "retry_after": 1},
    {"reset_connection": True},
    {"midstream_error_after": 3},
    {"ttfb_ms": 30},
    {"status": 401, "times": 1},
    {"tokens_per_second": 400},
    # Slow enough (~1 s an answer) for a client that leaves to be noticed before the answer is out.
    {"tokens_per_second": 16},
    None,
    None,
)
CLIENTS, REQUESTS_EACH = 12, 25
# What a request may end with when the pool misbehaves: the upstream's own 429 and 500 passed through, 500
# for a credential the upstream rejected, 529 when no account could serve.
ERROR_STATUSES = {429, 500, 529}


@dataclass
class Answer:
    status: int
    stream: bool
    body: bytes
    # The client read the start of the stream and closed the connection.
    left: bool = False


def stream_events(body: bytes) -> list[tuple[str, dict[str, Any]]]:
    events = []
    for block in body.split(b"\n\n"):
        lines = dict(line.split(b": ", 1) for line in block.split(b"\n") if b": " in line)
        if b"event" in lines:
            events.append((lines[b"event"].decode(), orjson.loads(lines[b"data"])))
    return events


PROMPT_FIELDS = ("input_tokens", "cache_creation_input_tokens", "cache_read_input_tokens")


def check_answer(answer: Answer) -> tuple[str, tuple[int, ...], int | None]:
    """That the client got a whole answer, or an error in Anthropic's shape; the outcome, the prompt's
    tokens it was told (uncached, cache write, cache read) and the output tokens (None: cut short)."""
    if answer.status != 200:
        assert answer.status in ERROR_STATUSES, answer
        error = orjson.loads(answer.body)
        assert error["type"] == "error" and error["error"]["type"] and error["error"]["message"], answer
        return "error", (0, 0, 0), 0
    if not answer.stream:
        message = orjson.loads(answer.body)
        assert message["type"] == "message" and message["content"], answer
        usage = message["usage"]
        return "ok", tuple(usage[name] for name in PROMPT_FIELDS), usage["output_tokens"]
    events = stream_events(answer.body)
    names = [name for name, _ in events]
    assert names[0] == "message_start", names
    prompt = tuple(events[0][1]["message"]["usage"][name] for name in PROMPT_FIELDS)
    if names[-1] == "error":
        # Cut short after the first byte: told in-band, and the stream still ends cleanly.
        assert events[-1][1]["error"]["type"], events[-1]
        return "stream_error", prompt, None
    assert names[-2:] == ["message_delta", "message_stop"], names
    return "ok", prompt, events[-2][1]["usage"]["output_tokens"]


async def chaos(
    running: RunningGateway,
    mock: MockServer,
    key: str,
    upstream_keys: tuple[str, ...] = MOCK_KEYS,
    disturb: Callable[[random.Random], None] | None = None,
    sessions: bool = False,
    faults: tuple[dict[str, Any] | None, ...] = FAULTS,
) -> tuple[dict[str, Answer], dict[str, Any]]:
    """CLIENTS clients send REQUESTS_EACH requests each with `key` while the faults of `upstream_keys` change
    (and `disturb` does more, each time); with `sessions`, each client is a Claude Code session (its
    requests shaped and marked for caching as Claude Code's). What each client was told, and the usage
    records (flushed), by request id. Checks that nothing was left in flight."""
    rng = random.Random(7)
    answers: dict[str, Answer] = {}
    finished = asyncio.Event()

    async def change_faults() -> None:
        while not finished.is_set():
            spec = rng.choice(faults)
            upstream_key = rng.choice(upstream_keys)
            if spec is None:
                mock.state.faults.pop(upstream_key, None)
            else:
                mock.set_fault(upstream_key, Fault(**spec))
            if disturb is not None:
                disturb(rng)
            # Often: 300 requests take about half a second when nothing fails (the faults slow them down).
            await asyncio.sleep(0.005)

    async def client(session: aiohttp.ClientSession, index: int) -> None:
        for turn in range(REQUESTS_EACH):
            stream = (index + turn) % 2 == 0
            if sessions:
                session_id = f"chaos-session-{index}"
                data = claude_code.body(stream, session_id=session_id, prompt=f"Turn {turn}, please.")
                extra = claude_code.headers(key, session_id)
            else:
                data = orjson.dumps(
                    {"model": MODEL, "max_tokens": 24 + turn, "stream": stream, "messages": user("hello " * (turn + 1))}
                )
                extra = {"content-type": "application/json"}
            async with session.post(f"{running.url}/v1/messages", data=data, headers=extra) as response:
                request_id = response.headers["request-id"]
                if stream and turn % 5 == 4:
                    answers[request_id] = Answer(response.status, stream, await response.content.readany(), True)
                    response.close()
                else:
                    answers[request_id] = Answer(response.status, stream, await response.read())

    headers = {"x-api-key": key, "anthropic-version": "2023-06-01"}
    # The gateway's own tasks (its loops) and this test's: each request's, and its disconnect watcher's, end with it.
    tasks_before = len(gateway_tasks())
    changing = asyncio.create_task(change_faults())
    try:
        async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=60)) as session:
            await asyncio.gather(*[client(session, index) for index in range(CLIENTS)])
    finally:
        finished.set()
        await changing
        mock.clear_faults()
    # Nothing left in flight, in the gateway or upstream, once the streams the clients left have been noticed
    # (or have ended: the slowest answer takes about a second), nor any task of theirs left running. Bounded at
    # 10 s or more, for a busy machine.
    for _ in range(500):
        in_flight = {state.upstream.id: state.in_flight for state in running.gateway.pool.states()}
        tasks = len(gateway_tasks())
        if not any(in_flight.values()) and mock.stats.in_flight == 0 and tasks <= tasks_before:
            break
        await asyncio.sleep(0.02)
    assert not any(in_flight.values()) and mock.stats.in_flight == 0, (in_flight, mock.stats.in_flight)
    assert tasks <= tasks_before, sorted(task.get_coro().__qualname__ for task in gateway_tasks())  # type: ignore[union-attr]
    await running.gateway.flush_usage()
    with running.gateway.engine.connect() as conn:
        records = {row.request_id: row for row in conn.execute(select(usage))}
    return answers, records


def gateway_tasks() -> list[asyncio.Task[Any]]:
    """The event loop's tasks but the mock's: it serves each connection the gateway keeps open to it with one."""
    return [task for task in asyncio.all_tasks() if task.get_coro().__qualname__ != "RequestHandler.start"]  # type: ignore[union-attr]


def check_accounted(answers: dict[str, Answer], records: dict[str, Any], refusals: tuple[int, ...] = ()) -> None:
    """Every request accounted exactly once, with the status and tokens its client was told; `refusals`
    are the gateway's own policy answers that may also occur."""
    assert len(answers) == CLIENTS * REQUESTS_EACH, "every request id is unique"
    assert records.keys() == answers.keys(), "every request accounted, exactly once"
    outcomes: set[str] = set()
    for request_id, answer in answers.items():
        record = records[request_id]
        assert record.status == answer.status and record.outcome != "gateway_error", (record, answer)
        if answer.left:
            # Unless the whole answer had already gone out: the client's leaving is what the record says.
            assert answer.status != 200 or record.outcome in ("client_disconnected", "ok", "stream_error"), record
            outcomes.add("left" if record.outcome == "client_disconnected" else "left late")
            continue
        if answer.status in refusals and record.outcome == "client_error":  # not an upstream's 429 passed on
            error = orjson.loads(answer.body)["error"]
            assert error["type"] and error["message"], answer
            continue
        outcome, prompt, output = check_answer(answer)
        if outcome in ("ok", "stream_error"):
            assert record.outcome == outcome and tuple(getattr(record, name) for name in PROMPT_FIELDS) == prompt
            assert output is None or record.output_tokens == output
        else:
            assert record.outcome in ("upstream_error", "no_upstream"), record
        outcomes.add(outcome)
    # The faults were met: the run saw answers, errors and clients leaving (whether the gateway saw one leave
    # before the answer was out, or a stream meet its fault, depends on timing: quick answers are not watched).
    assert {"ok", "error"} <= outcomes and outcomes & {"left", "left late"}, outcomes


def chaos_config(tmp_path: Path, mock: MockServer) -> GatewayConfig:
    # Short cooldowns, so that accounts come back within the run and see every kind of fault.
    return gateway_config(tmp_path, mock.url, health=HealthConfig(cooldown_seconds=0.2))


async def test_every_request_under_changing_faults_is_answered_whole_and_accounted_once(
    tmp_path: Path, mock: MockServer
) -> None:
    running = await start_gateway(chaos_config(tmp_path, mock))
    try:
        answers, records = await chaos(running, mock, running.key)
    finally:
        await running.stop()
    check_accounted(answers, records)


@pytest.mark.one_window(seconds=20)
async def test_under_changing_faults_a_callers_budget_and_quotas_add_up_to_its_ledger(
    tmp_path: Path, mock: MockServer
) -> None:
    """Failed, cut-short and abandoned requests settle their reservations like answered ones: afterwards
    nothing is reserved, the budget spent is the ledger's sum, and the quotas counted every admitted request
    and the output tokens the ledger records."""
    running = await start_gateway(chaos_config(tmp_path, mock))
    try:
        row, key = repo.create_key(
            running.gateway.engine,
            "chaos",
            {
                "budget_usd": "1000",
                "budget_range": "daily",
                "budget_scope": "per_account",
                "quotas": ["requests=100000/hour", "output_tokens=100000000/day"],
            },
        )
        running.gateway.reload()
        answers, records = await chaos(running, mock, key)
        principal = running.gateway.authn.authenticate({b"x-api-key": key.encode()})
        now = time.time()
        budget = running.gateway.policy.budget_status(principal, None, now)
        windows = running.gateway.policy.quotas.check(principal, now).windows
    finally:
        await running.stop()
    check_accounted(answers, records)
    assert budget is not None and budget.reserved_micro_usd == 0 and budget.in_flight == 0
    ledger = [record.cost_micro_usd or 0 for record in records.values()]
    assert budget.spent_micro_usd == sum(ledger) > 0
    requests, output_tokens = windows
    assert requests.used == len(records)
    assert output_tokens.used == sum(record.output_tokens for record in records.values())
    assert all(record.principal_id == row.id for record in records.values())


async def test_subscription_accounts_under_changing_faults_expiring_tokens_and_a_failing_token_endpoint(
    tmp_path: Path, mock: MockServer
) -> None:
    """Subscription accounts whose access tokens the upstream expires at any moment (a 401, answered by one
    refresh and a retry) and whose token endpoint sometimes fails, on top of the faults: every request is
    still answered whole or refused in Anthropic's shape and accounted once, a stampede of 401s costs one
    refresh per expiry, and every account ends usable (nothing was revoked)."""
    accounts = ("acct-0", "acct-1", "acct-2")
    config = gateway_config(
        tmp_path, mock.url, keys=(), oauth=oauth_config(mock), health=HealthConfig(cooldown_seconds=0.2)
    )
    for index, account in enumerate(accounts):
        add_account(config, mock, account, f"sub-{index}")
    running = await start_gateway(config)
    expiries = token_faults = 0

    def disturb(rng: random.Random) -> None:
        nonlocal expiries, token_faults
        if rng.random() < 0.15:
            mock.state.oauth.expire(rng.choice(accounts))
            expiries += 1
        if rng.random() < 0.05:
            mock.state.oauth.token_faults.append(rng.choice((500, 503, 429)))
            token_faults += 1

    try:
        # Without the upstream's 401 fault: the expiries are the 401s here, each to be cured by a refresh.
        without_401 = tuple(spec for spec in FAULTS if spec is None or spec.get("status") != 401)
        answers, records = await chaos(
            running, mock, running.key, tuple(f"oauth:{account}" for account in accounts), disturb, faults=without_401
        )
        mock.state.oauth.token_faults = []
        # Refreshes still retrying in the background (a failed token call) end on their own, and an account
        # whose refresh gave up for now (`refresh_failing`) is back in routing once its back-off (a fraction of
        # a second here) has passed: both are waited for, not read at one instant.
        signer = running.gateway.signer
        for _ in range(500):  # 10 s or more: a bound for a busy machine
            states = [
                (signer.account_state(f"sub-{i}"), signer.unusable_reason(f"sub-{i}")) for i in range(len(accounts))
            ]
            if states == [("active", None)] * len(accounts):
                break
            await asyncio.sleep(0.02)
        assert states == [("active", None)] * len(accounts)
    finally:
        await running.stop()
    check_accounted(answers, records)
    # No stampede: a successful refresh per expiry at most, and a failed one per fault injected at most.
    assert expiries > 0 and 0 < mock.stats.oauth_token_calls <= expiries + token_faults


async def test_claude_code_sessions_under_changing_faults_are_answered_and_accounted_with_their_cache_tokens(
    tmp_path: Path, mock: MockServer
) -> None:
    """Claude Code-shaped sessions (each client one session, its prompt marked for caching) through the
    session affinity and cache-aware routing while the accounts fail under them: every answer whole or
    refused in shape, and each record holds the cache writes and reads its client was told."""
    running = await start_gateway(chaos_config(tmp_path, mock))
    try:
        answers, records = await chaos(running, mock, running.key, sessions=True)
    finally:
        await running.stop()
    check_accounted(answers, records)
    assert {record.session_id for record in records.values()} == {f"chaos-session-{i}" for i in range(CLIENTS)}
    assert sum(record.cache_read_input_tokens for record in records.values()) > 0


async def test_upstreams_added_removed_and_toggled_while_serving_never_fail_a_request_in_the_gateway(
    tmp_path: Path, mock: MockServer
) -> None:
    """Operators add, remove, disable and enable accounts (`poolgate upstreams …`) while traffic flows, and
    every running gateway reloads them from the store: no request fails in the gateway for it (a request
    routed to an account that was removed meanwhile goes to another), and every one is accounted. (Reloaded
    as often as the store changes: the run takes about half a second.)"""
    config = chaos_config(tmp_path, mock)
    running = await start_gateway(
        config.model_copy(update={"store": config.store.model_copy(update={"reload_interval_seconds": 0.02})})
    )
    engine, box = running.gateway.engine, running.gateway.box
    extra = [f"extra-{index}" for index in range(4)]
    present: set[str] = set()

    def disturb(rng: random.Random) -> None:
        upstream_id = rng.choice(extra)
        if upstream_id not in present:
            upstream = Upstream(upstream_id, "anthropic_api_key", mock.url)
            repo.add_upstream(engine, box, upstream, rng.choice(MOCK_KEYS))
            present.add(upstream_id)
        elif rng.random() < 0.5:
            repo.remove_upstream(engine, upstream_id)
            present.discard(upstream_id)
        else:
            repo.set_upstream_enabled(engine, upstream_id, rng.random() < 0.5)

    try:
        answers, records = await chaos(running, mock, running.key, disturb=disturb)
    finally:
        await running.stop()
    check_accounted(answers, records)
    assert {record.upstream_id for record in records.values()} & set(extra), "the added accounts served"
    assert not [answer for answer in answers.values() if b"was removed" in answer.body], "passed over, not refused"


@pytest.mark.one_window(seconds=20)
async def test_keys_created_revoked_and_limited_while_serving_leave_other_callers_alone(
    tmp_path: Path, mock: MockServer
) -> None:
    """Gateway keys come and go (`poolgate keys …`) while traffic flows and every running gateway reloads
    them: a caller whose key stays is never refused for it."""
    running = await start_gateway(chaos_config(tmp_path, mock))
    engine = running.gateway.engine
    others: list[str] = []
    created = itertools.count()

    def disturb(rng: random.Random) -> None:
        action = rng.random()
        if action < 0.4 or not others:
            row, _ = repo.create_key(engine, f"other-{next(created)}", {"quotas": ["requests=10/minute"]})
            others.append(row.id)
        elif action < 0.7:
            repo.revoke_key(engine, others.pop(rng.randrange(len(others))))
        else:
            repo.set_key_settings(engine, rng.choice(others), {"budget_usd": str(rng.randint(1, 9))})

    try:
        answers, records = await chaos(running, mock, running.key, disturb=disturb)
    finally:
        await running.stop()
    check_accounted(answers, records)


@pytest.mark.one_window(seconds=20)
async def test_claude_code_sessions_under_changing_faults_never_overspend_their_session_budgets(
    tmp_path: Path, mock: MockServer
) -> None:
    """Per-session budgets too small for the whole session ($0.60, and Claude Code asks for 32,000 output
    tokens, so each request reserves ~$0.5 at list price): admitted requests, failed over, cut short or not,
    settle their reservations; refused ones get a 402 in Anthropic's shape (a 429 while a request the
    client left still holds the session's budget); no session spends past its budget, and what each spent is
    its ledger."""
    running = await start_gateway(chaos_config(tmp_path, mock))
    try:
        _, key = repo.create_key(
            running.gateway.engine,
            "sessions",
            {"budget_usd": "0.6", "budget_range": "daily", "budget_scope": "per_session"},
        )
        running.gateway.reload()
        answers, records = await chaos(running, mock, key, sessions=True)
        principal = running.gateway.authn.authenticate({b"x-api-key": key.encode()})
        now = time.time()
        budgets = {
            f"chaos-session-{index}": running.gateway.policy.budget_status(principal, f"chaos-session-{index}", now)
            for index in range(CLIENTS)
        }
    finally:
        await running.stop()
    check_accounted(answers, records, refusals=(402, 429))
    assert any(answer.status == 402 for answer in answers.values()), "the budgets ran out"
    for session_id, budget in budgets.items():
        ledger = sum(r.cost_micro_usd or 0 for r in records.values() if r.session_id == session_id)
        assert budget is not None and budget.reserved_micro_usd == 0 and budget.in_flight == 0, budget
        assert budget.spent_micro_usd == ledger <= budget.limit_micro_usd, (session_id, budget, ledger)
