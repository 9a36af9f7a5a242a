"""The real Claude Code CLI, offline, pointed at the gateway in front of the mock upstream."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from msgspec.structs import astuple
from sqlalchemy import select

from poolgate.config import OAuthConfig, RoutingConfig, UpstreamConfig
from poolgate.lifecycle.context import Upstream
from poolgate.mock import MockServer
from poolgate.mock.config import Fault
from poolgate.store import accounts, repo
from poolgate.store.crypto import SecretBox, load_master_key
from poolgate.store.db import open_engine, sqlite_file_url, usage
from poolgate.store.usage import RECORD_FIELDS
from poolgate.store.writer_process import insert_rows
from poolgate.upstreams.oauth import credentials_from_document
from tests.conftest import MOCK_KEYS, RunningGateway, gateway_config, start_gateway, usage_record, usage_rows
from tests.e2e.subprocesses import communicate_within

LOCAL_CLI = Path(__file__).parent / "node_modules" / ".bin" / "claude"


def claude_cli() -> str | None:
    if LOCAL_CLI.exists():
        return str(LOCAL_CLI)
    return shutil.which("claude")


async def run_claude(
    cli: str, home: Path, env_extra: dict[str, str], prompt: str, *options: str
) -> tuple[int, str, str]:
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "DISABLE_AUTOUPDATER": "1",
        "DISABLE_TELEMETRY": "1",
        "DISABLE_ERROR_REPORTING": "1",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        **env_extra,
    }
    process = await asyncio.create_subprocess_exec(
        cli, *options, "-p", prompt, env=env, cwd=home, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await communicate_within(process, 120)
    return process.returncode or 0, out.decode(errors="replace"), err.decode(errors="replace")


def installed_cli() -> str:
    cli = claude_cli()
    if cli is None:
        pytest.skip("the Claude Code CLI is not installed (cd tests/e2e && npm install @anthropic-ai/claude-code)")
    return cli


async def claude_says(
    url: str, key: str, tmp_path: Path, *options: str, prompt: str = "say hi", env: dict[str, str] | None = None
) -> tuple[int, str]:
    """`claude -p` with a new HOME, through the gateway at `url` with gateway key `key` (and `env` set): its exit
    code and all it printed (an API error goes to stdout)."""
    cli = installed_cli()
    home = tmp_path / f"home-{len(list(tmp_path.glob('home-*')))}"
    home.mkdir()
    code, out, err = await run_claude(
        cli, home, {"ANTHROPIC_BASE_URL": url, "ANTHROPIC_API_KEY": key, **(env or {})}, prompt, *options
    )
    return code, out + err


MOCK_ANSWER = "poolgate mock upstream"


@pytest.mark.parametrize("credential", ["ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"])
async def test_claude_code_answers_through_the_gateway(gw: RunningGateway, tmp_path: Path, credential: str) -> None:
    cli = installed_cli()
    home = tmp_path / "home"
    home.mkdir()
    code, out, err = await run_claude(cli, home, {"ANTHROPIC_BASE_URL": gw.url, credential: gw.key}, "say hi")
    assert code == 0, f"claude exited {code}: {err[-2000:]}"
    assert "poolgate mock upstream" in out, out
    await gw.gateway.flush_usage()
    with gw.gateway.engine.connect() as conn:
        rows = conn.execute(select(usage).where(usage.c.endpoint == "messages")).all()
    assert rows and all(row.status == 200 for row in rows)
    assert any(row.session_id for row in rows), "Claude Code's session id is recorded"


async def test_later_claude_code_sessions_read_the_prompt_earlier_ones_cached(
    gw: RunningGateway, tmp_path: Path
) -> None:
    """Each `claude -p` is a new session with its own attribution block; the first three spread over the
    mock's three accounts (each writes the tools and system prompt), the ones after read them from cache."""
    cli = installed_cli()
    home = tmp_path / "home"
    home.mkdir()
    env = {"ANTHROPIC_BASE_URL": gw.url, "ANTHROPIC_API_KEY": gw.key}
    # Different prompts: the attribution block's suffix is derived from the first prompt's text.
    for prompt in ("say hi", "list the files", "what is 2+2", "tell me a joke", "name a colour"):
        code, _, err = await run_claude(cli, home, env, prompt)
        assert code == 0, f"claude exited {code}: {err[-2000:]}"
    await gw.gateway.flush_usage()
    with gw.gateway.engine.connect() as conn:
        rows = conn.execute(
            select(usage)
            .where(
                usage.c.endpoint == "messages",
                usage.c.cache_creation_input_tokens + usage.c.cache_read_input_tokens > 0,
            )
            .order_by(usage.c.started_at)
        ).all()
    assert len(rows) == 5, rows  # one cached prompt per session
    assert [row.cache_read_input_tokens > 0 for row in rows] == [False, False, False, True, True], rows


async def test_a_claude_code_tool_loop_goes_through_the_gateway_on_one_account(
    gw: RunningGateway, tmp_path: Path
) -> None:
    """The mock calls a tool a prompt asks for by name: Claude Code runs Read and sends its result, the mock
    answers it in words. Both turns go to the session's account, the second reading the prompt the first cached."""
    code, said = await claude_says(gw.url, gw.key, tmp_path, prompt="use the Read tool on README.md")
    assert code == 0 and MOCK_ANSWER in said, said
    await gw.gateway.flush_usage()
    with gw.gateway.engine.connect() as conn:
        turns = conn.execute(
            select(usage)
            .where(usage.c.endpoint == "messages", usage.c.session_id.is_not(None))
            .order_by(usage.c.started_at)
        ).all()
    main_loop = [row for row in turns if row.cache_creation_input_tokens + row.cache_read_input_tokens > 0]
    assert len(main_loop) == 2 and all(row.status == 200 for row in main_loop), turns
    assert main_loop[0].upstream_id == main_loop[1].upstream_id
    assert main_loop[1].cache_read_input_tokens > 0


@pytest.mark.parametrize("server_review", [True, False], ids=["server-review", "own-classifier"])
async def test_claude_code_in_auto_mode_runs_a_tool_call_through_the_gateway(
    gw: RunningGateway, mock: MockServer, tmp_path: Path, server_review: bool
) -> None:
    """Auto mode asks the API to review each tool call of its answers (`safeguards`); an answer without the review
    (`safeguard_results`) made `claude -p` refuse every action that needs a check ("Auto mode can't check actions in
    this session … your requests go through 127.0.0.1:…, which doesn't pass it through", exit code 1), and an
    interactive session ask about each one. With `CLAUDE_CODE_AUTO_MODE_SERVER=0` it asks its own classifier instead,
    which failed closed on the mock's words. The mock's Bash call runs its placeholder command, `mock`: not found."""
    debug = tmp_path / "debug.txt"
    options = ("--permission-mode", "auto", "--debug-file", str(debug))
    env = {} if server_review else {"CLAUDE_CODE_AUTO_MODE_SERVER": "0"}
    code, printed = await claude_says(gw.url, gw.key, tmp_path, *options, prompt="use the Bash tool", env=env)
    assert code == 0 and MOCK_ANSWER in printed and "auto mode" not in printed.lower(), printed[-2000:]
    # What Claude Code notes of a session whose answers came without the review.
    assert "[server-classifier]" not in debug.read_text(), debug.read_text()[-4000:]
    [result] = orjson.loads(mock.stats.last_request_body)["messages"][-1]["content"]
    assert result["type"] == "tool_result", result
    assert "mock" in result["content"] and "auto mode" not in result["content"].lower(), result  # the shell's words
    assert all(row["status"] == 200 for row in await usage_rows(gw))


async def test_claude_code_gives_up_at_once_on_a_wrong_gateway_key(
    gw: RunningGateway, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Claude Code retries a 401 ten times over three minutes, silently, unless the answer says
    `x-should-retry: false`: a mistyped or revoked gateway key looked like a hang."""
    cli = installed_cli()
    home = tmp_path / "home"
    home.mkdir()
    env = {"ANTHROPIC_BASE_URL": gw.url, "ANTHROPIC_API_KEY": "pg-mistyped-0123456789"}
    code, out, err = await run_claude(cli, home, env, "say hi")
    said = (
        "401 Invalid gateway key (unknown): set ANTHROPIC_API_KEY or ANTHROPIC_AUTH_TOKEN to the gateway key you were "
        "given (a Claude /login is no gateway key)"
    )
    assert code != 0 and said in out + err, (out + err)[-2000:]
    refusals = [r for r in caplog.records if r.name == "poolgate.authn" and "rejected unknown" in r.getMessage()]
    assert len(refusals) == 1, [r.getMessage() for r in refusals]  # one request, no retries


async def test_claude_code_answers_through_a_pool_of_subscription_accounts_only(
    tmp_path: Path, mock: MockServer
) -> None:
    """Claude Code in API-key mode (no OAuth beta, its own identity block) through a pool of one Claude subscription
    account whose access token has expired: the gateway refreshes it once, signs with the bearer token and the
    OAuth beta, and forwards Claude Code's system prompt as it is (the mock, like the API, refuses a subscription
    request without the beta or not shaped as Claude Code's)."""
    tokens = mock.state.oauth.create_account("acct-cc", expires_in=-60)
    config = gateway_config(tmp_path, mock.url, keys=(), oauth=OAuthConfig(token_url=f"{mock.url}/v1/oauth/token"))
    engine = open_engine(config.store_url())
    box = SecretBox(load_master_key(config.data_dir))
    accounts.add_oauth_account(
        engine, box, Upstream("sub-cc", accounts.KIND, mock.url), credentials_from_document(tokens)
    )
    engine.dispose()
    gw = await start_gateway(config)
    try:
        code, printed = await claude_says(gw.url, gw.key, tmp_path)
        assert code == 0 and MOCK_ANSWER in printed, printed[-2000:]
        rows = await usage_rows(gw)
        assert rows and all((row["upstream_id"], row["status"]) == ("sub-cc", 200) for row in rows), rows
        assert mock.stats.oauth_token_calls_by_grant == {"refresh_token": 1}
        assert mock.state.oauth.accounts["acct-cc"].requests == len(rows)
    finally:
        await gw.stop()


@pytest.fixture
async def first_pick_gw(tmp_path: Path, mock: MockServer) -> AsyncIterator[RunningGateway]:
    """The gateway trying its accounts in order, up-0 first: the account a fault is set on is the one tried."""
    running = await start_gateway(gateway_config(tmp_path, mock.url, routing=RoutingConfig(strategy="first-pick")))
    yield running
    await running.stop()


@pytest.mark.parametrize(
    ("faults", "failed"),
    [
        ({0: Fault(status=529)}, [("up-0", 529, "overloaded_error")]),
        ({0: Fault(reset_connection=True)}, [("up-0", 529, "connection_error")]),
        ({0: Fault(status=429, retry_after=30)}, [("up-0", 429, "rate_limit_error")]),
        # How the API reports overload on a stream: a 200 whose first event is an `error`.
        ({0: Fault(midstream_error_after=0)}, [("up-0", 529, "overloaded_error")]),
        (
            {0: Fault(status=529), 1: Fault(reset_connection=True)},
            [("up-0", 529, "overloaded_error"), ("up-1", 529, "connection_error")],
        ),
    ],
    ids=["529", "connection-reset", "429-retry-after", "stream-opening-with-overload", "529-then-reset"],
)
async def test_claude_code_does_not_see_a_failover(
    first_pick_gw: RunningGateway,
    mock: MockServer,
    tmp_path: Path,
    faults: dict[int, Fault],
    failed: list[tuple[str, int, str]],
) -> None:
    """Accounts that fail before the first byte are failed over from: Claude Code gets the next one's answer,
    and only the usage record and the routing trace tell that other accounts were tried."""
    for index, fault in faults.items():
        mock.set_fault(MOCK_KEYS[index], fault)
    code, printed = await claude_says(first_pick_gw.url, first_pick_gw.key, tmp_path)
    assert code == 0 and MOCK_ANSWER in printed, printed[-2000:]
    [row] = await usage_rows(first_pick_gw)
    assert (row["status"], row["outcome"], row["attempts"]) == (200, "ok", len(failed) + 1), row
    assert row["upstream_id"] == f"up-{len(failed)}"
    route = first_pick_gw.gateway.traces.get(str(row["request_id"]))
    assert route is not None
    assert [(f["upstream_id"], f["status"], f["error_type"]) for f in route["failed"]] == failed  # type: ignore[attr-defined]


async def test_a_429s_retry_after_keeps_the_next_claude_code_session_off_that_account(
    first_pick_gw: RunningGateway, mock: MockServer, tmp_path: Path
) -> None:
    mock.set_fault(MOCK_KEYS[0], Fault(status=429, retry_after=30))
    for _ in range(2):
        code, printed = await claude_says(first_pick_gw.url, first_pick_gw.key, tmp_path)
        assert code == 0 and MOCK_ANSWER in printed, printed[-2000:]
    rows = await usage_rows(first_pick_gw)
    assert [row["attempts"] for row in rows] == [2, 1] and "up-0" not in {row["upstream_id"] for row in rows}
    assert mock.stats.requests_by_key[MOCK_KEYS[0]] == 1  # parked: though first in line, it got nothing more


async def test_claude_code_shows_that_a_key_may_not_use_a_model_and_that_the_key_is_valid(
    gw: RunningGateway, tmp_path: Path
) -> None:
    """A 403 Claude Code does not retry: `claude -p` prints "Failed to authenticate" before the message (the
    interactive `claude`, "Please run /login"), so the message has to say that the key is fine. (What the CLI
    adds around poolgate's message is its own, and may change with its releases: only ours is checked.)"""
    _, key = repo.create_key(gw.gateway.engine, "haiku-only", {"models": ["claude-haiku-*"]})
    gw.gateway.reload()
    code, printed = await claude_says(gw.url, key, tmp_path, "--model", "claude-sonnet-5")
    assert code != 0 and "403" in printed, printed
    assert (
        "Model 'claude-sonnet-5' is not allowed for 'haiku-only' (allowed: claude-haiku-*); the key is valid: "
        "choose an allowed model (in Claude Code: /model or --model)"
    ) in printed, printed
    code, printed = await claude_says(gw.url, key, tmp_path, "--model", "claude-haiku-5-5")
    assert code == 0 and MOCK_ANSWER in printed, printed[-2000:]
    rows = await usage_rows(gw)
    answered = [(row["model"], row["status"]) for row in rows]
    assert answered.count(("claude-sonnet-5", 403)) == 1 and ("claude-haiku-5-5", 200) in answered, answered


@pytest.mark.one_window
async def test_claude_code_shows_a_spent_budget_at_once(tmp_path: Path, mock: MockServer) -> None:
    """A 402 with `x-should-retry: false`: Claude Code prints the budget's message after one request. The spend
    is the ledger's, read when the gateway starts, as after a restart."""
    engine = open_engine(sqlite_file_url(tmp_path / "poolgate.db"))
    spender, key = repo.create_key(engine, "spender", {"budget_usd": "5", "budget_range": "total"})
    spent = usage_record("req_spent", time.time(), 5_000_000, principal_id=spender.id, principal_name="spender")
    insert_rows(engine, RECORD_FIELDS, [astuple(spent)])
    engine.dispose()
    running = await start_gateway(gateway_config(tmp_path, mock.url), key=key)
    try:
        code, printed = await claude_says(running.url, key, tmp_path)
        rows = await usage_rows(running)
    finally:
        await running.stop()
    assert code != 0 and "402" in printed, printed
    assert (
        "Budget exhausted: the total per-account budget of $5.00 for 'spender' has $5.00 spent. "
        "It does not reset: ask for a larger budget."
    ) in printed, printed
    refused = [(row["status"], row["error_type"]) for row in rows if row["request_id"] != "req_spent"]
    assert refused and set(refused) == {(402, "billing_error")} and len(refused) < 3, refused  # no retries


@pytest.mark.one_window
async def test_claude_code_shows_a_request_larger_than_the_whole_budget_at_once(
    gw: RunningGateway, tmp_path: Path
) -> None:
    """Claude Code asks for `max_tokens: 128000` on its main-loop requests: at Opus 5.5's list price one may cost
    $2.64 or so, more than a $1 budget, however little is spent."""
    _, key = repo.create_key(gw.gateway.engine, "one-dollar", {"budget_usd": "1", "budget_range": "daily"})
    gw.gateway.reload()
    code, printed = await claude_says(gw.url, key, tmp_path, "--model", "claude-opus-5-5")
    assert code != 0 and "402" in printed, printed
    assert "Request too large for the daily per-account budget of $1.00 for 'one-dollar'" in printed, printed
    assert "more than the whole budget. Send a smaller prompt or max_tokens" in printed, printed
    refused = [(row["status"], row["error_type"], row["attempts"]) for row in await usage_rows(gw)]
    assert refused and set(refused) == {(402, "billing_error", 0)} and len(refused) < 3, refused  # no retries


async def test_claude_code_sends_a_turn_again_without_streaming_after_an_error_mid_stream(
    gw: RunningGateway, mock: MockServer, tmp_path: Path
) -> None:
    """After the first event nothing is failed over: the stream ends with the error event. Claude Code (2.1.332)
    then asks for the same turn as JSON (which the fault leaves alone) and prints that answer, once. How it
    retries is the CLI's own: what is checked is that the broken stream is recorded as such and a later
    request of the turn answered."""
    for key in MOCK_KEYS:
        mock.set_fault(key, Fault(midstream_error_after=3))
    code, printed = await claude_says(gw.url, gw.key, tmp_path)
    assert code == 0 and printed.count(MOCK_ANSWER) == 1, printed[-2000:]
    rows = await usage_rows(gw)
    told = [(row["stream"], row["outcome"], row["error_type"], row["attempts"]) for row in rows]
    stream_broken = (True, "stream_error", "overloaded_error", 1)
    assert stream_broken in told, told
    assert any(outcome == "ok" for _, outcome, _, _ in told[told.index(stream_broken) + 1 :]), told


async def test_claude_code_is_told_to_drop_the_path_of_a_base_url_with_one(gw: RunningGateway, tmp_path: Path) -> None:
    """`ANTHROPIC_BASE_URL=http://host:port/anthropic` (as other gateways serve Anthropic's API, under a path)
    sends `/anthropic/v1/messages`: its 404 Claude Code showed as "There's an issue with the selected model
    (claude-opus-5-5). It may not exist or you may not have access to it", sending the user to change models."""
    code, printed = await claude_says(f"{gw.url}/anthropic", gw.key, tmp_path)
    assert code != 0 and "400" in printed, printed
    assert (
        "POST /anthropic/v1/messages: poolgate serves its API at the root, not under /anthropic. Set "
        "ANTHROPIC_BASE_URL (or the SDK's base_url) to http://host:port, without a path"
    ) in printed, printed
    assert "selected model" not in printed, printed


async def test_claude_code_shows_at_once_that_the_accounts_for_its_model_are_disabled(
    tmp_path: Path, mock: MockServer
) -> None:
    """Every account that serves the model disabled by the operator: the gateway's 529 naming them, Claude Code
    retried three times over some ten seconds and then printed "Repeated 529 Overloaded errors. The API is at
    capacity — this is usually temporary", never the message; nothing was at capacity, and the haiku account
    would have served it. It is a 503 not to be retried, as when every account needs a new login."""
    upstreams = (
        UpstreamConfig(id="any-model", base_url=mock.url, api_key=MOCK_KEYS[0], enabled=False),
        UpstreamConfig(id="haiku", base_url=mock.url, api_key=MOCK_KEYS[1], models=("claude-haiku-*",)),
    )
    running = await start_gateway(gateway_config(tmp_path, mock.url, upstreams=upstreams))
    try:
        code, printed = await claude_says(running.url, running.key, tmp_path, "--model", "claude-opus-5-5")
        rows = await usage_rows(running)
    finally:
        await running.stop()
    assert code != 0 and "503" in printed and "Repeated 529" not in printed, printed
    assert (
        "No upstream account can serve this request (any-model: disabled, haiku: model_not_supported); no retry "
        "helps until the gateway's operator enables an account, or use another model (in Claude Code: /model or "
        "--model)"
    ) in printed, printed
    assert [(row["status"], row["outcome"]) for row in rows] == [(503, "no_upstream")], rows  # not retried


async def test_claude_code_shows_that_the_pools_keys_were_rejected_and_the_callers_key_is_fine(
    first_pick_gw: RunningGateway, mock: MockServer, tmp_path: Path
) -> None:
    """Every account's key revoked: Claude Code printed "API Error: 500 An upstream account rejected the gateway's
    credential. This is a server-side issue, usually temporary — try again in a moment": nothing told the user
    that their own key was fine, nor who could fix it."""
    for key in MOCK_KEYS:
        mock.set_fault(key, Fault(status=401))
    code, printed = await claude_says(first_pick_gw.url, first_pick_gw.key, tmp_path)
    assert code != 0 and "500" in printed, printed
    assert (
        "Upstream account up-2 rejected the gateway's credential (HTTP 401): your gateway key or token is fine; "
        "the gateway's operator has to give that account a valid key or token"
    ) in printed, printed
    rows = await usage_rows(first_pick_gw)
    assert [(row["status"], row["attempts"]) for row in rows] == [(500, 3)], rows  # told at once, not retried


@pytest.mark.parametrize("with_a_right_account", [False, True], ids=["alone", "beside-a-right-one"])
async def test_claude_code_is_not_sent_to_change_models_by_an_account_whose_base_url_has_a_wrong_path(
    tmp_path: Path, mock: MockServer, caplog: pytest.LogCaptureFixture, with_a_right_account: bool
) -> None:
    """An account whose base_url has a path the API does not have (`http://host/anthropic`): the API's 404 "Not
    Found" for that path was passed on as the request's own, which Claude Code showed as "There's an issue with the
    selected model (claude-opus-5-5)", never failed over, and the operator's log said nothing. The account is
    misconfigured, as one that redirects: another account serves the request, the log names the account."""
    upstreams = (
        UpstreamConfig(id="wrong-path", base_url=f"{mock.url}/anthropic", api_key=MOCK_KEYS[0]),
        UpstreamConfig(id="right", base_url=mock.url, api_key=MOCK_KEYS[1]),
    )[: 1 + with_a_right_account]
    routing = RoutingConfig(strategy="first-pick")
    running = await start_gateway(gateway_config(tmp_path, mock.url, upstreams=upstreams, routing=routing))
    try:
        code, printed = await claude_says(running.url, running.key, tmp_path)
    finally:
        await running.stop()
    if with_a_right_account:
        assert code == 0 and MOCK_ANSWER in printed, printed[-2000:]
    else:
        assert code != 0 and "selected model" not in printed, printed
        said = (
            "502 Upstream account wrong-path answered HTTP 404, Not Found (a path the API does not have); its base_url "
            "is misconfigured: your gateway key or token is fine; the gateway's operator has to fix that account's "
            "base_url"
        )
        assert said in printed, printed
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("upstream wrong-path answered HTTP 404" in line and "not the API's" in line for line in warned), warned


@pytest.mark.parametrize("credential", ["claude.ai login", "ANTHROPIC_API_KEY"])
async def test_claude_code_is_told_that_an_anthropic_credential_is_not_a_gateway_key(
    gw: RunningGateway, tmp_path: Path, credential: str
) -> None:
    """Only ANTHROPIC_BASE_URL set, by a user logged in to Claude Code with their subscription (it sends that
    login's token) or with their own Anthropic key in ANTHROPIC_API_KEY: "Invalid gateway key (unknown)" did not
    say that what was sent is no gateway key at all, nor where the gateway key goes."""
    cli = installed_cli()
    home = tmp_path / "home"
    (home / ".claude").mkdir(parents=True)
    env = {"ANTHROPIC_BASE_URL": gw.url}
    if credential == "ANTHROPIC_API_KEY":
        env["ANTHROPIC_API_KEY"] = "sk-ant-api03-the-users-own-key-0123456789"
        sent = "an Anthropic API key"
    else:
        login = {
            "accessToken": "sk-ant-oat01-the-users-login-0123456789",
            "refreshToken": "sk-ant-ort01-the-users-login-0123456789",
            "expiresAt": 4102444800000,
            "scopes": ["user:inference", "user:profile"],
            "subscriptionType": "max",
        }
        (home / ".claude" / ".credentials.json").write_text(json.dumps({"claudeAiOauth": login}))
        sent = "a Claude login's token"
    code, out, err = await run_claude(cli, home, env, "say hi")
    assert code != 0, out + err
    assert (
        f"401 Invalid gateway key (unknown): {sent} was sent, not a key of this gateway; set ANTHROPIC_API_KEY or "
        "ANTHROPIC_AUTH_TOKEN to the gateway key you were given"
    ) in out + err, out + err


@pytest.mark.parametrize("credential", ["ANTHROPIC_API_KEY", "ANTHROPIC_AUTH_TOKEN"])
async def test_claude_code_shows_that_a_gateway_key_goes_without_bearer_before_it(
    gw: RunningGateway, tmp_path: Path, credential: str
) -> None:
    """`ANTHROPIC_API_KEY="Bearer pg-…"` (the header's form copied into the variable): Claude Code replaces any
    error whose message names the x-api-key header with its own words, so the gateway's advice never showed: "Invalid
    API key · Fix external API key", and for ANTHROPIC_AUTH_TOKEN "Not logged in · Please run /login", which sent
    the developer to a login the gateway has no use for."""
    cli = installed_cli()
    home = tmp_path / "home"
    home.mkdir()
    env = {"ANTHROPIC_BASE_URL": gw.url, credential: f"Bearer {gw.key}"}
    code, out, err = await run_claude(cli, home, env, "say hi")
    printed = out + err
    assert code != 0 and "/login" not in printed, printed
    assert (
        "401 Invalid gateway key (unknown): the key came with 'Bearer ' before it: set ANTHROPIC_API_KEY or "
        "ANTHROPIC_AUTH_TOKEN to the key alone (the client adds 'Bearer ' where it belongs)"
    ) in printed, printed


async def test_claude_code_shows_at_once_that_the_gateway_has_no_account(tmp_path: Path, mock: MockServer) -> None:
    """A gateway with no account at all answers the pool's 529 (issue 3's contract) with `x-should-retry: false`:
    Claude Code shows its message after one request, where the plain 529 it retried and called the API "at
    capacity"."""
    running = await start_gateway(gateway_config(tmp_path, mock.url, upstreams=()))
    try:
        code, printed = await claude_says(running.url, running.key, tmp_path)
        rows = await usage_rows(running)
    finally:
        await running.stop()
    assert code != 0 and "Repeated 529" not in printed, printed
    assert "No upstream accounts are configured or enabled" in printed, printed
    assert [(row["status"], row["outcome"]) for row in rows] == [(529, "no_upstream")], rows  # not retried
