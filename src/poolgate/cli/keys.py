"""`poolgate keys`: gateway keys for callers — create, list, set, revoke; their limits given as options (the
claims a JWT or the config file gives) and shown as `keys list` shows them."""

from __future__ import annotations

import json
import re
import time
from typing import Annotated

import typer

from poolgate.cli.options import ConfigOption, DataDirOption
from poolgate.cli.output import console, err, fail, folding_table, local_time, shown
from poolgate.cli.store import IN_CONFIG_FILE, engine_for, load, records_engine, stored_rows
from poolgate.config import MAX_KEY_NAME, PRINTABLE_NAME, GatewayConfig
from poolgate.lifecycle.authn import unreadable_settings
from poolgate.store import repo

keys_app = typer.Typer(no_args_is_help=True, help="Gateway keys for callers (stored hashed; shown once).")


ModelsOption = Annotated[
    list[str] | None,
    typer.Option(
        "--models", "--model", help="Model globs the key may use (repeat or comma-separate).", show_default=False
    ),
]
QuotaOption = Annotated[
    list[str] | None,
    typer.Option(
        "--quota",
        help="METRIC=LIMIT/WINDOW, e.g. requests=60/min, output_tokens=100000/day (repeatable).",
        show_default=False,
    ),
]
BudgetOption = Annotated[
    str | None, typer.Option("--budget-usd", help="Budget in USD, e.g. 5 or 0.25.", show_default=False)
]
BudgetRangeOption = Annotated[
    str | None,
    typer.Option(
        "--budget-range", help="daily, weekly, monthly or total (UTC calendar; default total).", show_default=False
    ),
]
BudgetScopeOption = Annotated[
    str | None,
    typer.Option(
        "--budget-scope",
        help="per_account, or per_session (per Claude Code session; default per_account).",
        show_default=False,
    ),
]
ChainOption = Annotated[
    str | None, typer.Option("--chain", help="An opaque id passed on to observers.", show_default=False)
]


def key_claims(
    models: list[str] | None,
    quotas: list[str] | None,
    budget_usd: str | None,
    budget_range: str | None,
    budget_scope: str | None,
    chain: str | None,
) -> dict[str, object]:
    """The options of `keys create`/`keys set` as stored settings; a bad option fails before anything is stored."""
    from poolgate.lifecycle.claims import ClaimsError, parse_claims

    if budget_usd is None and (budget_range is not None or budget_scope is not None):
        # A range or scope without an amount limits nothing: the caller surely meant a budget.
        raise fail("--budget-range and --budget-scope need --budget-usd (the budget they apply to)")
    data: dict[str, object] = {
        "models": None if models is None else ",".join(models),
        "quotas": list(quotas or ()),
        "budget_usd": budget_usd,
        "budget_range": budget_range,
        "budget_scope": budget_scope,
        "chain": chain,
    }
    try:
        return parse_claims(data).as_settings()
    except ClaimsError as exc:
        raise fail(claim_problem_as_option(str(exc))) from None


# The options of `keys create`/`keys set` by the claim each one gives.
CLAIM_OPTIONS = {
    "models": "--models",
    "quotas": "--quota",
    "quota": "--quota",
    "budget_usd": "--budget-usd",
    "budget_range": "--budget-range",
    "budget_scope": "--budget-scope",
    "chain": "--chain",
}


def claim_problem_as_option(problem: str) -> str:
    """A claims error (worded for a JWT's or the config file's claims: `budget_usd: …`, `quota 'x': …`) by the
    option the user wrote: `--budget-usd: …`, `--quota 'x': …`."""
    named = re.match(r"(\w+)(?=:? )", problem)
    if named is None or named.group(1) not in CLAIM_OPTIONS:
        return problem
    return CLAIM_OPTIONS[named.group(1)] + problem[named.end() :]


def describe_claims(settings: str | None) -> str:
    if not settings:
        return "-"
    from poolgate.lifecycle.claims import format_usd

    data = json.loads(settings)
    parts = []
    if data.get("models"):
        parts.append("models " + ",".join(data["models"]))
    parts.extend(data.get("quotas", ()))
    if data.get("budget_micro_usd") is not None:
        scope = data.get("budget_scope", "per_account").replace("_", "-")
        parts.append(f"{format_usd(data['budget_micro_usd'])} {data.get('budget_range', 'total')} {scope}")
    if data.get("chain"):
        parts.append(f"chain {data['chain']}")
    return "; ".join(parts) or "-"


@keys_app.command("create")
def keys_create(
    name: Annotated[str, typer.Argument(metavar="NAME", help="A name for the caller, e.g. a person or a service.")],
    config_path: ConfigOption = None,
    data_dir: DataDirOption = None,
    raw: Annotated[bool, typer.Option("--raw", help="Print only the key (for scripts).")] = False,
    models: ModelsOption = None,
    quota: QuotaOption = None,
    budget_usd: BudgetOption = None,
    budget_range: BudgetRangeOption = None,
    budget_scope: BudgetScopeOption = None,
    chain: ChainOption = None,
) -> None:
    """Create a gateway key, optionally with limits. The key is shown once; only its hash is stored."""
    if not name.strip():
        # A blank name cannot be told apart in `keys list` or given to `keys set`/`revoke`.
        raise fail("a key needs a name that is not blank: poolgate keys create NAME")
    if name != name.strip():
        # Stored so, it was found by no `keys set` or `revoke` of the name as anyone reads it.
        raise fail(f"the key name {name!r} begins or ends with a space: poolgate keys create {name.strip()!r}")
    if len(name) > MAX_KEY_NAME or not re.fullmatch(PRINTABLE_NAME, name):
        # As for the config file's keys: the name is printed in reports and logs.
        raise fail(f"a key name is at most {MAX_KEY_NAME} characters, none of them a control character")
    settings = key_claims(models, quota, budget_usd, budget_range, budget_scope, chain)
    config = load(config_path, data_dir)
    if any(key.name == name for key in config.keys):
        # Two keys of one name: `keys list` shows both, and `keys revoke` finds only the stored one.
        raise fail(f"the config file has a key named {name!r}: choose another name")
    try:
        row, plain = repo.create_key(engine_for(config), name, settings)
    except repo.RepoError as exc:
        raise fail(str(exc)) from None
    if raw:
        print(plain)
        return
    console.print(
        f"created key [bold]{shown(row.name)}[/bold] ({row.id}). It is shown only this once:", highlight=False
    )
    print(plain)


@keys_app.command("list")
def keys_list(config_path: ConfigOption = None, data_dir: DataDirOption = None) -> None:
    """List gateway keys (prefixes only)."""
    config = load(config_path, data_dir)
    rows = [
        (row.id, row.name, row.prefix + "…", local_time(row.created_at), *key_state_and_limits(row))
        for row in stored_rows(repo.list_keys, config)
    ]
    rows += [
        (
            "static:" + key.name,
            key.name,
            repo.display_prefix(key.key) + "…",
            "config file",
            "active",
            describe_claims(json.dumps(key.claims.caller_claims().as_settings())),
        )
        for key in config.keys
    ]
    table = folding_table("id", "name", "prefix", "created", "state", "limits")
    # A key id (`key_` + 12 hex digits) is what `keys revoke` and `keys set` take: on one line, to copy it.
    table.columns[0].no_wrap = True
    for row in rows:
        table.add_row(*map(shown, row))
    console.print(table)
    if not rows:
        # An empty table alone left a newcomer guessing whether the listing had failed.
        err.print("no gateway keys yet: `poolgate keys create NAME` (or `keys:` in the config file)", highlight=False)


def key_state_and_limits(row: repo.KeyRow) -> tuple[str, str]:
    """A stored key's state and limits as `keys list` shows them: one whose limits the gateway cannot read (an
    older build accepted them) is unusable, every request with it a 401, and its limits are shown as stored."""
    if row.revoked_at:
        return f"revoked {local_time(row.revoked_at)}", describe_claims(row.settings)
    problem = unreadable_settings(row.settings)
    if problem is not None:
        return f"unusable: {problem}", row.settings or "-"
    return "active", describe_claims(row.settings)


@keys_app.command("set")
def keys_set(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The key's name or id.")],
    config_path: ConfigOption = None,
    data_dir: DataDirOption = None,
    models: ModelsOption = None,
    quota: QuotaOption = None,
    budget_usd: BudgetOption = None,
    budget_range: BudgetRangeOption = None,
    budget_scope: BudgetScopeOption = None,
    chain: ChainOption = None,
) -> None:
    """Replace a key's limits with the ones given (none given = no limits).

    Running gateways apply them within seconds; quota counts and spend so far are kept."""
    settings = key_claims(models, quota, budget_usd, budget_range, budget_scope, chain)
    config = load(config_path, data_dir)
    try:
        row = repo.set_key_settings(records_engine(config, configured_name(config, name)), name, settings)
    except repo.RepoError as exc:
        raise fail(str(exc) + (IN_CONFIG_FILE if configured_key(config, name) else "")) from None
    # "-" alone read as if nothing had changed: none given, the key's limits are all gone.
    limits = shown(describe_claims(row.settings)) if row.settings else "no limits (any model, no quota, no budget)"
    console.print(f"{shown(row.name)} ({row.id}): {limits}", highlight=False)


@keys_app.command("revoke")
def keys_revoke(
    name: Annotated[str, typer.Argument(metavar="NAME", help="The key's name or id.")],
    config_path: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Revoke a gateway key; running gateways stop accepting it within seconds."""
    config = load(config_path, data_dir)
    try:
        before = time.time()
        row = repo.revoke_key(records_engine(config, configured_name(config, name)), name)
    except repo.RepoError as exc:
        raise fail(str(exc) + (IN_CONFIG_FILE if configured_key(config, name) else "")) from None
    assert row.revoked_at is not None
    done = "revoked" if row.revoked_at >= before else f"already revoked {local_time(row.revoked_at)}:"
    console.print(f"{done} {shown(row.name)} ({row.id})", highlight=False)


def configured_key(config: GatewayConfig, name: str) -> bool:
    """Whether `name` (or `static:name`, as `keys list` shows it) is a key of the config file's."""
    return any(name in (key.name, "static:" + key.name) for key in config.keys)


def configured_name(config: GatewayConfig, name: str) -> str | None:
    """`name` when it is a key of the config file's (see `records_engine`), else None."""
    return name if configured_key(config, name) else None
