"""`poolgate accounts`: Claude subscription (Pro/Max) accounts — import, login, list, remove."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import math
import os
import re
import sqlite3
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import orjson
import typer
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError

from poolgate.cli.options import ConfigOption, DataDirOption, environment_variable_name, model_glob
from poolgate.cli.output import console, err, fail, folding_table, shown
from poolgate.cli.store import (
    IN_CONFIG_FILE,
    configured_upstream,
    engine_for,
    existing_engine,
    in_config_file,
    load,
    records_engine,
    secret_box,
    store_problem,
    stored_rows,
)
from poolgate.config import GatewayConfig, OAuthConfig, upstream_base_url
from poolgate.lifecycle.context import Upstream
from poolgate.store import accounts as store
from poolgate.store.crypto import SecretBox
from poolgate.store.repo import RepoError
from poolgate.upstreams.oauth import (
    MAX_EXPIRY_AHEAD_SECONDS,
    OAuthClient,
    OAuthCredentials,
    PkcePair,
    TokenEndpointError,
    TokenResponse,
    another_subscription,
    authorize_url,
    credentials_document,
    credentials_from_document,
    new_pkce,
    new_state,
    parse_pasted_code,
)
from poolgate.upstreams.quota import (
    FIVE_HOUR,
    MODEL_WINDOWS,
    SEVEN_DAY,
    FamilyRejection,
    picture_from_json,
    quota_blocked_until_wall,
)
from poolgate.upstreams.tokens import REFRESH_FAILING

accounts_app = typer.Typer(
    no_args_is_help=True, help="Claude subscription (Pro/Max) accounts: OAuth tokens, encrypted at rest."
)

ID_PATTERN = re.compile(r"^[A-Za-z0-9_.:-]{1,64}$")
# Of a derived id's 64 characters, what `claude-` and `-` + 6 hex digits leave for the plan.
MAX_PLAN_IN_ID = 64 - len("claude-") - 7
IdOption = Annotated[
    str | None, typer.Option("--id", help="A short unique name for the account (default: derived from the token).")
]
# None unless given: with --replace, those given change the account's settings and the others keep them (all
# three were ignored, without a word); a new account takes these defaults.
DEFAULT_BASE_URL = "https://api.anthropic.com"
DEFAULT_WEIGHT = 1
BaseUrlOption = Annotated[
    str | None,
    typer.Option(
        help=f"The upstream API's base URL (default {DEFAULT_BASE_URL}; with --replace, the account's own).",
        show_default=False,
    ),
]
WeightOption = Annotated[
    int | None,
    typer.Option(
        min=1,
        max=1000,
        help=f"Routing weight (default {DEFAULT_WEIGHT}; with --replace, the account's own).",
        show_default=False,
    ),
]


ModelOption = Annotated[
    list[str] | None,
    typer.Option(
        "--model",
        help="Model glob it serves (repeatable; default any; with --replace, the account's own).",
        parser=model_glob,
    ),
]
ReplaceOption = Annotated[
    bool, typer.Option("--replace", help="Give an existing account new tokens (after `needs_reauth`).")
]
PlanOption = Annotated[str | None, typer.Option("--subscription-type", help="pro, max, … (shown in `list`).")]


def _checked_id(requested: str) -> str:
    if not ID_PATTERN.match(requested):
        raise fail("--id: letters, digits and _ . : - only, at most 64 characters")
    return requested


def _checked_base_url(base_url: str) -> str:
    try:
        return upstream_base_url(base_url)
    except ValueError as exc:
        raise fail(f"--base-url {exc}") from None


def _not_configured(config: GatewayConfig, upstream_id: str) -> None:
    if in_config_file(config, upstream_id):
        raise fail(f"{upstream_id!r} is an upstream of the config file; choose another --id")


def _tokens_not_configured(config: GatewayConfig, credentials: OAuthCredentials) -> None:
    """Refuses tokens one of the config file's upstreams holds (a `claude setup-token` token as its `api_key`):
    the stored accounts alone were looked at, and one subscription went into the pool twice, its quota counted
    as two."""
    tokens = {credentials.access_token, credentials.refresh_token}
    holder = next((upstream.id for upstream in config.upstreams if upstream.api_key in tokens), None)
    if holder is not None:
        raise fail(
            f"this subscription is already the config file's upstream {holder!r} (its token is that upstream's"
            " api_key): two accounts of one subscription would count its quota twice"
        )


def _account_id(requested: str | None, credentials: OAuthCredentials) -> str:
    if requested is not None:
        return _checked_id(requested)
    # Stable for the same grant, so importing one file twice finds the account that exists. The plan comes
    # from the credentials file, unchecked: only what an --id may hold is kept of it (markup, escape
    # sequences and line breaks made an id no command could take back, and forged `accounts list` rows).
    seed = (credentials.refresh_token or credentials.access_token).encode()
    plan = re.sub(r"[^A-Za-z0-9_.:-]+", "", credentials.subscription_type or "")[:MAX_PLAN_IN_ID] or "sub"
    return f"claude-{plan}-{hashlib.sha256(seed).hexdigest()[:6]}"


def _known(engine: Engine, box: SecretBox, upstream_id: str, credentials: OAuthCredentials) -> OAuthCredentials:
    """`credentials` with what the stored account knows and they do not name: a bare token pair names no
    plan or e-mail, and giving it to an account should not wipe them. Tokens of another subscription take
    nothing of the old one's (its plan was shown as theirs)."""
    if credentials.subscription_type is not None and credentials.label is not None:
        return credentials
    known = store.load_oauth_credentials(engine, box, upstream_id)
    if known is None or another_subscription(known, credentials):
        return credentials
    return dataclasses.replace(
        credentials,
        subscription_type=credentials.subscription_type or known.subscription_type,
        label=credentials.label or known.label,
        account_uuid=credentials.account_uuid or known.account_uuid,
        organization_uuid=credentials.organization_uuid or known.organization_uuid,
    )


def _store(
    config_path: Path | None,
    data_dir: Path | None,
    credentials: OAuthCredentials,
    account_id: str | None,
    base_url: str | None,
    weight: int | None,
    models: list[str] | None,
    replace: bool,
    logged_in: bool = False,
) -> str:
    """Store the account; `logged_in`: its tokens come from a login's code exchange, not a file. Raises
    RepoError when the store refuses it. Of `base_url`, `weight` and `models`, those given (not None) are the
    account's settings, also for an account that `replace` gives new tokens."""
    given = {
        name for name, value in (("base_url", base_url), ("weight", weight), ("models", models)) if value is not None
    }
    base_url = _checked_base_url(DEFAULT_BASE_URL if base_url is None else base_url)
    config = load(config_path, data_dir)
    engine, box = engine_for(config), secret_box(config)
    upstream_id = _account_id(account_id, credentials)
    holder = store.holder_of(engine, box, credentials)
    if holder is not None:
        # One subscription under two ids: each login or refresh rotates the grant and kills the other's.
        if not (replace and (holder == upstream_id or account_id is None)):
            who = credentials.label or "this subscription"
            if logged_in:
                # The exchange has rotated the grant already: the stored account's refresh token may be dead
                # now, and these tokens are what it can live on (thrown away, it needed a new login).
                store.save_oauth_credentials(engine, box, holder, _known(engine, box, holder, credentials))
                raise fail(
                    f"{who} is already account {holder!r}: it was given this login's tokens (a login rotates "
                    "the subscription's tokens) and no other account was added"
                )
            if holder != upstream_id:
                raise fail(
                    f"{who} is already account {holder!r}: `--id {holder} --replace` gives it these tokens "
                    "(two accounts of one subscription would revoke each other's tokens)"
                )
        upstream_id = holder
    if replace:
        credentials = _known(engine, box, upstream_id, credentials)
    _not_configured(config, upstream_id)
    _tokens_not_configured(config, credentials)
    upstream = Upstream(
        id=upstream_id, kind=store.KIND, base_url=base_url, weight=weight or DEFAULT_WEIGHT, models=tuple(models or ())
    )
    store.add_oauth_account(engine, box, upstream, credentials, replace=replace, settings=given)
    return upstream_id


def _describe(credentials: OAuthCredentials) -> str:
    """What the tokens say of the account, in parentheses; what they do not say is left out (placeholders
    read as data)."""
    parts = [part for part in (credentials.label, credentials.subscription_type) if part]
    if credentials.expires_at is not None:
        now = time.time()
        valid = _until(credentials.expires_at, now)
        parts.append(f"token {valid}" if credentials.expires_at <= now else f"token valid {valid}")
    if credentials.refresh_token is None:
        parts.append("no refresh token: it stops working when the access token expires")
    return f" ({shown(', '.join(parts))})" if parts else ""


@accounts_app.command("import")
def accounts_import(
    file: Annotated[
        Path | None,
        typer.Argument(
            metavar="FILE",
            help="Claude Code's credentials file (~/.claude/.credentials.json) or a JSON token pair; - = stdin.",
            show_default=False,
        ),
    ] = None,
    access_token_env: Annotated[
        str | None,
        typer.Option(
            help="Read the access token from this environment variable instead of a file.",
            parser=environment_variable_name,
        ),
    ] = None,
    refresh_token_env: Annotated[
        str | None,
        typer.Option(help="Read the refresh token from this environment variable.", parser=environment_variable_name),
    ] = None,
    expires_in: Annotated[
        float | None, typer.Option(help="Seconds the env-given access token stays valid (unknown if not given).")
    ] = None,
    account_id: IdOption = None,
    subscription_type: PlanOption = None,
    base_url: BaseUrlOption = None,
    weight: WeightOption = None,
    model: ModelOption = None,
    replace: ReplaceOption = False,
    config_path: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Add a subscription account from tokens Claude Code (or a login elsewhere) already holds."""
    now = time.time()
    if access_token_env is not None:
        if file is not None:
            raise fail("give a FILE or --access-token-env, not both")
        access = os.environ.get(access_token_env, "").strip()
        if not access:
            raise fail(f"environment variable {access_token_env} is empty or not set")
        refresh = os.environ.get(refresh_token_env, "").strip() if refresh_token_env else ""
        if refresh_token_env and not refresh:
            raise fail(f"environment variable {refresh_token_env} is empty or not set")
        if expires_in is not None and not (math.isfinite(expires_in) and expires_in <= MAX_EXPIRY_AHEAD_SECONDS):
            # Said of the option given, not of the token document's `expires_in` it is passed on as.
            raise fail("--expires-in must be a number of seconds, at most five years (a token's lifetime)")
        document: Any = {"access_token": access, "refresh_token": refresh or None, "expires_in": expires_in}
    elif file is not None:
        if expires_in is not None or refresh_token_env is not None:
            raise fail("--expires-in and --refresh-token-env go with --access-token-env: a FILE names its own")
        source = "standard input" if str(file) == "-" else str(file)
        try:
            raw = sys.stdin.buffer.read() if str(file) == "-" else file.read_bytes()
            # A file Windows wrote (PowerShell's `Out-File`, `>`) starts with a byte order mark, in UTF-16 or
            # UTF-8: the JSON standard library's detection reads it, where it was refused as "not JSON".
            document = orjson.loads(raw.decode(json.detect_encoding(raw)))
        except OSError as exc:
            raise fail(f"cannot read {file}: {exc.strerror}") from None
        except (orjson.JSONDecodeError, UnicodeDecodeError):
            # An empty one is most often a wrong path (/dev/null) or a pipe whose writer failed.
            raise fail(f"{source} is {'empty' if not raw.strip() else 'not JSON'}") from None
    else:
        raise fail("give a credentials FILE, or --access-token-env (and --refresh-token-env)")
    try:
        credentials = credentials_from_document(document, now)
    except ValueError as exc:
        raise fail(f"no usable tokens: {exc}") from None
    if credentials.refresh_token is None and credentials.expired(now):
        raise fail("the access token has expired and there is no refresh token: this account can never serve")
    if subscription_type:
        credentials = OAuthCredentials(**{**_fields(credentials), "subscription_type": subscription_type})
    try:
        upstream_id = _store(config_path, data_dir, credentials, account_id, base_url, weight, model, replace)
    except RepoError as exc:
        raise fail(str(exc)) from None
    console.print(f"imported subscription account [bold]{shown(upstream_id)}[/bold]{_describe(credentials)}")


def _fields(credentials: OAuthCredentials) -> dict[str, Any]:
    return {name: getattr(credentials, name) for name in OAuthCredentials.__slots__}


async def _exchange(config: OAuthConfig, code: str, pkce: PkcePair, state: str) -> TokenResponse:
    client = OAuthClient(config)
    try:
        return await client.exchange_code(code, pkce, state)
    finally:
        await client.aclose()


@accounts_app.command("login")
def accounts_login(
    account_id: IdOption = None,
    subscription_type: PlanOption = None,
    base_url: BaseUrlOption = None,
    weight: WeightOption = None,
    model: ModelOption = None,
    replace: ReplaceOption = False,
    config_path: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Log a subscription account in (OAuth with PKCE): open the URL, paste back the code it shows."""
    config = load(config_path, data_dir)
    # Everything that can refuse the account is checked before the login: its code exchange rotates the
    # subscription's tokens, and the stored account's refresh token is dead from then on.
    _checked_base_url(DEFAULT_BASE_URL if base_url is None else base_url)
    engine = engine_for(config)
    secret_box(config)  # a master key that does not match the store's refuses it now, not after the login
    if account_id is not None:
        _not_configured(config, _checked_id(account_id))
        try:
            store.check_account_id(engine, account_id, replace)
        except RepoError as exc:
            raise fail(str(exc)) from None
    pkce, state = new_pkce(), new_state()
    err.print("Open this URL in a browser, log in with the Claude account to add, and approve:", highlight=False)
    print(authorize_url(config.oauth, pkce, state), flush=True)
    try:
        code = parse_pasted_code(_pasted_line("Paste the code shown after login (code#state): "), state)
    except ValueError as exc:
        raise fail(str(exc)) from None
    try:
        response = asyncio.run(_exchange(config.oauth, code, pkce, state))
    except TokenEndpointError as exc:
        raise fail(f"the code exchange failed: {exc}") from None
    credentials = response.credentials(time.time(), subscription_type)
    try:
        upstream_id = _store(
            config_path, data_dir, credentials, account_id, base_url, weight, model, replace, logged_in=True
        )
    except (RepoError, SQLAlchemyError, sqlite3.Error) as exc:
        problem = str(exc) if isinstance(exc, RepoError) else f"cannot write the store: {store_problem(exc)}"
        raise fail(f"{problem}; {_kept_aside(config.data_dir, credentials)}") from None
    console.print(f"logged in subscription account [bold]{shown(upstream_id)}[/bold]{_describe(credentials)}")


# What `accounts login` says when standard input ends before a code was pasted.
NOTHING_PASTED = (
    "no code was pasted (standard input ended): a login waits at its prompt for the code#state (or the callback "
    "URL) the browser shows once you approve, and it cannot be given beforehand (it belongs to the URL this run "
    "printed); without a terminal, add the account with `poolgate accounts import FILE` (Claude Code's "
    "~/.claude/.credentials.json) or `poolgate accounts import --access-token-env VAR`"
)


def _pasted_line(prompt: str) -> str:
    """A line typed at `prompt`. Standard input closed (`</dev/null`, a script, CI) is the refusal that says
    what was expected and what to do instead: typer's prompt said only "Aborted."."""
    err.print(prompt, end="", highlight=False)
    try:
        return input()
    except EOFError:
        err.print(highlight=False)  # the prompt's line ended
        raise fail(NOTHING_PASTED) from None


def _kept_aside(data_dir: Path, credentials: OAuthCredentials) -> str:
    """Save a login's tokens that the store did not take to a file only its owner can read, and say how to
    store them: the code exchange has rotated the subscription's tokens, so the stored account's are dead."""
    path = data_dir / f"login-tokens-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.json"
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(orjson.dumps(credentials_document(credentials)))
    except OSError as exc:
        return f"this login's tokens could not be saved either ({exc.strerror}): log in again"
    return (
        f"this login's tokens are saved in {path} (readable by you only): `poolgate accounts import {path}` with "
        "this login's options stores them (its --replace too: the login rotated the subscription's tokens, the "
        "stored ones are dead), then delete the file"
    )


def _until(timestamp: float, now: float) -> str:
    seconds = timestamp - now
    # The year only when it is not this one (a token from a file years old).
    same_year = time.localtime(timestamp).tm_year == time.localtime(now).tm_year
    clock = time.strftime("%m-%d %H:%M" if same_year else "%Y-%m-%d %H:%M", time.localtime(timestamp))
    if seconds <= 0:
        return f"expired ({clock})"
    hours, rest = divmod(int(seconds), 3600)
    if hours >= 48:
        return f"for {hours // 24}d ({clock})"
    return f"for {hours}h{rest // 60:02d}m ({clock})"


def _window_cell(quota: dict[str, Any] | None, name: str, now: float) -> str:
    windows = (quota or {}).get("windows") or {}
    window = windows.get(name)
    if not isinstance(window, dict):
        return "-"
    used = window.get("utilization")
    text = f"{used * 100:.0f}%" if isinstance(used, int | float) else "?"
    if window.get("status") in ("allowed_warning", "rejected"):
        text += f" {window['status']}"
    resets = window.get("resets_at")
    if isinstance(resets, int | float):
        text += _resets_text(resets, now)
    return text


def _resets_text(resets: float, now: float) -> str:
    # A weekday alone reads like today when the reset is a week away: name the date then.
    pattern = "%H:%M" if resets - now < 20 * 3600 else "%a %d %b %H:%M"
    return " · resets " + (time.strftime(pattern, time.localtime(resets)) if resets > now else "(passed)")


def _week_cell(quota: dict[str, Any] | None, now: float) -> str:
    """The 7-day window, and a per-model week that is used up (its model's requests go elsewhere meanwhile,
    the account is not parked: without it, an Opus week used up showed nowhere), or a model family an
    aggregate rejection alone holds out (answers that report no per-model window)."""
    text = _window_cell(quota, SEVEN_DAY, now)
    windows = (quota or {}).get("windows") or {}
    shown = set()
    for name, family in MODEL_WINDOWS.items():
        window = windows.get(name)
        if isinstance(window, dict) and window.get("status") == "rejected":
            text += f"; {family}: " + _window_cell(quota, name, now)
            shown.add(family)
    held = (quota or {}).get("rejected_families")
    for family, rejection in held.items() if isinstance(held, dict) else ():
        if family in shown or not isinstance(rejection, dict):
            continue
        reset_at, seen = rejection.get("reset_at"), rejection.get("observed_at")
        if not isinstance(seen, int | float):
            continue
        # One whose answer named no reset holds for the default park from when it was seen.
        resets = FamilyRejection(reset_at if isinstance(reset_at, int | float) else None, 0.0, seen).until_wall()
        if resets > now:
            text += f"; {family}: rejected" + _resets_text(resets, now)
    return text


# Longer than a refresh runs, its retries and their backoff included: a `refreshing` this old was left by a
# gateway that stopped in the middle (a kill). It is not reset at a start: with several gateways on one store,
# a start cannot tell that from another live gateway's refresh (the stored state is only shown; routing
# keeps each gateway's own, and the next refresh of the account sets it).
STALE_REFRESH_SECONDS = 600.0


def _age(seconds: float) -> str:
    seconds = max(0, int(seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 2 * 3600:
        return f"{seconds // 60}m"
    if seconds < 2 * 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d"


def _state(row: store.OAuthAccountRow, now: float) -> tuple[str, float | None]:
    """What the table and the JSON say of an account: needs_reauth, parked (and until when: a quota window
    was rejected), disabled, or its stored state."""
    if row.state == "needs_reauth":
        return row.state, None
    picture = picture_from_json(row.quota, time.monotonic(), now) if row.quota else None
    parked = quota_blocked_until_wall(picture, now)
    if parked is not None:
        return "parked", parked
    if not row.upstream.enabled:
        return "disabled", None
    # Out of routing while its refresh fails (the gateway's `refresh_failing`, also while it retries with a dead
    # token): "active" or "refreshing" said otherwise.
    failing = row.state in ("active", "refreshing") and (row.state_reason or "").startswith(REFRESH_FAILING)
    return ("refresh_failing" if failing else row.state), None


def _json_row(row: store.OAuthAccountRow, now: float) -> dict[str, object]:
    state, parked = _state(row, now)
    return {
        "id": row.upstream.id,
        "source": "config file" if row.upstream.source == "config" else "store",
        "label": row.label,
        "subscription_type": row.subscription_type,
        "state": state,
        "parked_until": parked,
        "state_reason": "insufficient_quota" if parked is not None else row.state_reason,
        "state_since": row.state_since,
        "enabled": row.upstream.enabled,
        "expires_at": row.expires_at,
        "scopes": list(row.scopes),
        "quota": row.quota,
    }


def _state_cell(row: store.OAuthAccountRow, now: float) -> str:
    state, parked = _state(row, now)
    if state == "needs_reauth":
        return "[red]needs_reauth[/red]"
    if parked is not None:
        return f"[yellow]parked[/yellow] until {time.strftime('%m-%d %H:%M', time.localtime(parked))}"
    if state == "refreshing" and row.state_since is not None:
        return f"refreshing for {_age(now - row.state_since)}"
    return state


@accounts_app.command("list")
def accounts_list(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")] = False,
    config_path: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Subscription accounts: state, plan, token expiry, and the last known 5-hour / 7-day quota."""
    config = load(config_path, data_dir)
    stored = stored_rows(store.list_oauth_accounts, config)
    engine = existing_engine(config)
    rows = stored + [
        store.configured_account_row(upstream.upstream(), engine)
        for upstream in config.upstreams
        if upstream.kind == store.KIND
    ]
    now = time.time()
    if as_json:
        print(json.dumps([_json_row(row, now) for row in rows]))
        return
    table = folding_table("id", "account", "plan")
    # The state is what a reader looks for first: never wrapped or cut.
    table.add_column("state", no_wrap=True)
    for column in ("access token", "5h", "7d", "quota seen"):
        table.add_column(column, overflow="fold")
    for row in rows:
        seen = "-"
        if row.quota and isinstance(row.quota.get("observed_at"), int | float):
            age = max(0, int(now - row.quota["observed_at"]))
            seen = f"{age // 60}m ago ({row.quota.get('source', '?')})"
        if row.upstream.source == "config":
            token = "long-lived (config file)"
        else:
            token = _until(row.expires_at, now) if row.expires_at is not None else "no expiry known"
        table.add_row(
            # As written: an id, label or plan from a credentials file may hold markup or escape sequences.
            *map(shown, (row.upstream.id, row.label or "-", row.subscription_type or "-")),
            _state_cell(row, now),
            token,
            _window_cell(row.quota, FIVE_HOUR, now),
            _week_cell(row.quota, now),
            shown(seen),
        )
    console.print(table)
    for row in rows:
        if row.state == "needs_reauth":
            account = shown(row.upstream.id)
            err.print(
                f"{account} needs re-authentication ({shown(row.state_reason or 'login again')}): "
                f"`poolgate accounts login --id {account} --replace` or re-import with --replace",
                highlight=False,
            )
        elif row.state_reason:
            err.print(f"{shown(row.upstream.id)}: {shown(row.state_reason)}", highlight=False)
        elif (
            row.state == "refreshing" and row.state_since is not None and now - row.state_since > STALE_REFRESH_SECONDS
        ):
            err.print(
                f"{shown(row.upstream.id)} has been `refreshing` for {_age(now - row.state_since)}: a gateway stopped"
                " in the middle of its token refresh left that; gateways use the account as usual, and its next"
                " refresh sets its state",
                highlight=False,
            )
    if not rows:
        err.print("no subscription accounts yet: `poolgate accounts import` or `poolgate accounts login`")


@accounts_app.command("remove")
def accounts_remove(
    upstream_id: Annotated[str, typer.Argument(metavar="ID")],
    config_path: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Remove a subscription account (its tokens are deleted from the store)."""
    config = load(config_path, data_dir)
    try:
        store.remove_oauth_account(records_engine(config, configured_upstream(config, upstream_id)), upstream_id)
    except RepoError as exc:
        raise fail(f"{exc}{IN_CONFIG_FILE if in_config_file(config, upstream_id) else ''}") from None
    console.print(f"removed subscription account {shown(upstream_id)}", highlight=False)
