"""`poolgate upstreams`: Anthropic API-key upstreams kept in the store — add (or change with --replace), list,
remove, disable, enable; and what the CLI says of the pool's upstreams elsewhere (none enabled, an account
that needs a new login)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import ValidationError

from poolgate.cli.accounts import DEFAULT_BASE_URL, DEFAULT_WEIGHT, BaseUrlOption, ModelOption, WeightOption
from poolgate.cli.options import ConfigOption, DataDirOption, option_problem, typed_on_the_command_line
from poolgate.cli.output import console, err, fail, folding_table, shown, warn
from poolgate.cli.store import (
    IN_CONFIG_FILE,
    configured_upstream,
    engine_for,
    existing_engine,
    in_config_file,
    load,
    records_engine,
    secret_box,
    stored_rows,
)
from poolgate.config import GatewayConfig, UpstreamConfig
from poolgate.lifecycle.context import Upstream
from poolgate.store import repo
from poolgate.store.accounts import list_oauth_accounts

upstreams_app = typer.Typer(no_args_is_help=True, help="Upstream accounts kept in the store (secrets encrypted).")


# Also when every upstream is disabled: the gateway refuses every request then just as without any.
NO_UPSTREAMS = (
    "no enabled upstreams: every request is refused until one is added or enabled (in the file's"
    " `upstreams`, or with `poolgate upstreams add|enable` or `poolgate accounts import`; a running gateway"
    " picks stored ones up)"
)


def needs_login(upstream_id: str) -> str:
    """What `serve`, `config check` and `upstreams list` say of a subscription account out of routing until
    someone logs in again (`needs_reauth`): "enabled", it looked fine everywhere but in `accounts list`. As
    written: print it `shown`."""
    return (
        f"subscription account {upstream_id} needs a new login: it is not served until `poolgate accounts login "
        f"--id {upstream_id} --replace` or a re-import with --replace (`accounts list` says why)"
    )


# The argument and options of `upstreams add` by the field of UpstreamConfig each one sets.
UPSTREAMS_ADD_OPTIONS = {"id": "ID", "api_key": "--api-key", "base_url": "--base-url", "weight": "--weight"}


def option_problems(exc: ValidationError, options: dict[str, str]) -> str:
    """A model's refusal of what options gave it, as the CLI says a bad option value (see `bad_value`): each
    problem by the option the user wrote, not the model's field (`api_key: String should have at least 1
    character` for `--api-key ''`)."""
    from poolgate.billing.config import problem_text

    problems = []
    for error in exc.errors():
        field = str(error["loc"][0]) if error["loc"] else ""
        limit = error.get("ctx", {}).get("min_length" if error["type"] == "string_too_short" else "max_length")
        if error["type"] == "string_too_short":
            problem = "must not be empty" if limit == 1 else f"must be at least {limit} characters long"
        elif error["type"] == "string_too_long":
            problem = f"must be at most {limit} characters long"
        else:
            problem = problem_text(error)
        problems.append(option_problem(options.get(field, field), problem))
    return "; ".join(problems)


@upstreams_app.command("add")
def upstreams_add(
    ctx: typer.Context,
    upstream_id: Annotated[str, typer.Argument(metavar="ID", help="A short unique name for this account.")],
    api_key: Annotated[
        str | None,
        typer.Option(
            envvar="POOLGATE_UPSTREAM_API_KEY",
            help="The Anthropic API key (prompted for when not given; or set POOLGATE_UPSTREAM_API_KEY).",
            show_default=False,
        ),
    ] = None,
    base_url: BaseUrlOption = None,
    weight: WeightOption = None,
    model: ModelOption = None,
    replace: Annotated[
        bool,
        typer.Option(
            "--replace",
            help="Change a stored upstream in one step (its weight, models, base URL, or --api-key to rotate its key):"
            " the options given replace its own, the others stay.",
        ),
    ] = False,
    config_path: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Add an Anthropic API-key upstream; its key is encrypted at rest."""
    config = load(config_path, data_dir)
    if in_config_file(config, upstream_id):
        # A stored copy would be shadowed by the config file's: listed, "disabled", never served.
        raise fail(f"an upstream with id {upstream_id!r} already exists{IN_CONFIG_FILE}")
    # With --replace, what is not given is the stored upstream's own (its key too unless --api-key is given).
    stored = Upstream(id=upstream_id, kind="anthropic_api_key", base_url=DEFAULT_BASE_URL, weight=DEFAULT_WEIGHT)
    # Where the key comes from, as a refusal of it names it.
    key_from = "--api-key" if typed_on_the_command_line(ctx, "api_key") else "POOLGATE_UPSTREAM_API_KEY"
    if replace:
        stored, stored_key = _stored_api_key_upstream(config, upstream_id)
        if api_key is None:
            api_key, key_from = stored_key, "the stored key"
    elif (engine := existing_engine(config)) is not None and repo.upstream_stored(engine, upstream_id):
        # Before the key is asked for: typed in (or read from standard input) for nothing otherwise.
        raise fail(repo.already_stored(upstream_id))
    fields = {
        "id": upstream_id,
        "base_url": stored.base_url if base_url is None else base_url,
        "weight": stored.weight if weight is None else weight,
        "models": stored.models if model is None else tuple(model),
    }
    if api_key is None:
        # The id, base URL, weight and models checked before the key is asked for (with a stand-in key), as a
        # stored id is: a key typed in for a refused id or URL was typed in vain. Asked here, not by the option,
        # for the same reason. Without a terminal (a script, CI), the first line of standard input: getpass
        # warned and gave up there.
        _checked_upstream(fields, "sk-stand-in", key_from)
        if sys.stdin.isatty():
            api_key, key_from = typer.prompt("Api key", hide_input=True), "the API key typed in"
        else:
            err.print("reading the API key from standard input (one line)…", highlight=False)
            api_key, key_from = sys.stdin.readline().strip(), "the API key read from standard input"
        if not api_key:
            raise fail("no API key: give --api-key, set POOLGATE_UPSTREAM_API_KEY, or pipe it on standard input")
    checked = _checked_upstream(fields, api_key, key_from)
    upstream = Upstream(
        id=checked.id, kind=checked.kind, base_url=checked.base_url, weight=checked.weight, models=checked.models
    )
    try:
        store = repo.replace_upstream if replace else repo.add_upstream
        store(engine_for(config), secret_box(config), upstream, checked.api_key)
    except repo.RepoError as exc:
        raise fail(str(exc)) from None
    done = "changed" if replace else "added"
    console.print(f"{done} upstream {shown(upstream.id)} → {shown(upstream.base_url)}", highlight=False)
    if typed_on_the_command_line(ctx, "api_key"):
        # After the outcome (a refusal stays the one line every command's is): the key is stored all the same, and
        # the user learns how to keep the next one out of sight.
        warn(
            "--api-key puts the key in your shell's history and, while the command runs, in its command line, which"
            " any user of this machine can read (ps): pipe it on standard input or set POOLGATE_UPSTREAM_API_KEY"
            " instead"
        )


@upstreams_app.command("list")
def upstreams_list(config_path: ConfigOption = None, data_dir: DataDirOption = None) -> None:
    """List upstreams from the config file and the store (never their secrets)."""
    config = load(config_path, data_dir)
    table = folding_table("id", "kind", "base url", "weight", "models", "enabled", "source")
    # Cells as written: a model glob `claude-[opus]*` is no markup.
    for configured in config.upstreams:
        table.add_row(
            *map(shown, (configured.id, configured.kind, configured.base_url)),
            str(configured.weight),
            shown(", ".join(configured.models)) or "any",
            "yes" if configured.enabled else "no",
            "config file",
        )
    shadowed = []
    stored_upstreams = stored_rows(repo.list_upstreams, config)
    for stored in stored_upstreams:
        upstream = stored.upstream
        if in_config_file(config, upstream.id):
            shadowed.append(upstream.id)
        table.add_row(
            *map(shown, (upstream.id, upstream.kind, upstream.base_url)),
            str(upstream.weight),
            shown(", ".join(upstream.models)) or "any",
            "yes" if upstream.enabled else "no",
            "store (shadowed)" if upstream.id in shadowed else "store",
        )
    console.print(table)
    if not config.upstreams and not stored_upstreams:
        err.print(
            "no upstreams yet: `poolgate upstreams add ID`, `poolgate accounts import` (or `upstreams:` in the"
            " config file)",
            highlight=False,
        )
    for upstream_id in shadowed:
        # The gateway serves the config file's upstream of that id and skips the stored one.
        err.print(
            f"stored upstream {upstream_id} is shadowed by the config file's {upstream_id}: it is not served "
            f"(`poolgate upstreams remove {upstream_id}` removes the stored one)",
            highlight=False,
        )
    engine = existing_engine(config) if stored_upstreams else None
    for account in list_oauth_accounts(engine) if engine is not None else ():
        if account.state == "needs_reauth" and account.upstream.id not in shadowed:
            err.print(shown(needs_login(account.upstream.id)), highlight=False)


def _checked_upstream(fields: dict[str, Any], api_key: str, key_from: str) -> UpstreamConfig:
    """`upstreams add`'s upstream as the config file's would be checked; refused naming each option (and the key
    by where it came from: `key_from`)."""
    try:
        return UpstreamConfig(api_key=api_key, **fields)
    except ValidationError as exc:
        raise fail(option_problems(exc, {**UPSTREAMS_ADD_OPTIONS, "api_key": key_from})) from None


def _stored_api_key_upstream(config: GatewayConfig, upstream_id: str) -> tuple[Upstream, str]:
    """The stored API-key upstream `upstreams add --replace` changes, and its key."""
    row = next((row for row in repo.list_upstreams(records_engine(config)) if row.upstream.id == upstream_id), None)
    if row is None:
        raise fail(f"no stored upstream with id {upstream_id!r}")
    if row.upstream.kind != "anthropic_api_key":
        raise fail(repo.subscription_account_replaced(upstream_id))
    return row.upstream, secret_box(config).decrypt(row.secret)


def _change_upstream(upstream_id: str, config_path: Path | None, data_dir: Path | None, action: str) -> None:
    config = load(config_path, data_dir)
    in_file = in_config_file(config, upstream_id)
    if in_file and action != "remove":
        # The gateway serves the config file's upstream of that id: a stored one (a shadow) is never served, and
        # changing it said "disabled" of an account that went on serving (a leaked key pulled in an incident).
        raise fail(
            f"upstream {upstream_id!r} is defined in the config file: change it there (`enabled:"
            f" {'true' if action == 'enable' else 'false'}`), which is what the gateway serves; a stored upstream of"
            " that id is shadowed by it, never served"
        )
    # A mistyped --data-dir: no new, empty store, and no "no upstream named".
    engine = records_engine(config, configured_upstream(config, upstream_id))
    try:
        if action == "remove":
            repo.remove_upstream(engine, upstream_id)
        else:
            repo.set_upstream_enabled(engine, upstream_id, action == "enable")
    except repo.RepoError as exc:
        raise fail(f"{exc}{IN_CONFIG_FILE if in_file else ''}") from None
    console.print(f"{action}d upstream {shown(upstream_id)}", highlight=False)
    if in_file:
        warn(
            f"the stored upstream {shown(upstream_id)} was shadowed: the config file's {shown(upstream_id)} is still"
            " served (remove it there)"
        )


UpstreamId = Annotated[str, typer.Argument(metavar="ID")]


@upstreams_app.command("remove")
def upstreams_remove(upstream_id: UpstreamId, config_path: ConfigOption = None, data_dir: DataDirOption = None) -> None:
    """Remove a stored upstream."""
    _change_upstream(upstream_id, config_path, data_dir, "remove")


@upstreams_app.command("disable")
def upstreams_disable(
    upstream_id: UpstreamId, config_path: ConfigOption = None, data_dir: DataDirOption = None
) -> None:
    """Stop routing to a stored upstream (kept, can be enabled again)."""
    _change_upstream(upstream_id, config_path, data_dir, "disable")


@upstreams_app.command("enable")
def upstreams_enable(upstream_id: UpstreamId, config_path: ConfigOption = None, data_dir: DataDirOption = None) -> None:
    """Route to a disabled stored upstream again."""
    _change_upstream(upstream_id, config_path, data_dir, "enable")
