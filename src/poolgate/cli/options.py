"""The options and argument parsers every CLI command group shares (each group's module imports them from here,
needing no other group's), and how the CLI says a bad value of one (`bad_value`, `option_problem`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def config_file(value: str | Path) -> Path:
    """A configuration file's path as given: an empty one is refused (Path('') is the current directory, which
    was then `cannot read .: Is a directory`; a blank one `cannot read    : No such file`)."""
    if isinstance(value, str) and not value.strip():
        raise typer.BadParameter("must not be empty: name a YAML file, or leave it out")
    return Path(value)


def model_glob(value: str) -> str:
    """An account's `--model`: an empty glob matches no model (the account served nothing, while `upstreams
    list` said "any")."""
    if not value:
        raise typer.BadParameter("must not be empty: leave it out for an account that serves every model")
    return value


def listen_address(value: str) -> str:
    """A `--host`: an empty one was taken for the option left out (the configuration's host served), and a blank
    one could not be listened on; refused as `server.host` is."""
    if not value or any(character.isspace() for character in value):
        raise typer.BadParameter(
            "must be an address or host name, not empty and without whitespace (`0.0.0.0` for every interface)"
        )
    return value


def environment_variable_name(value: str) -> str:
    """An option naming an environment variable: an empty name (a script's unset `"$NAME"`) was taken for the
    option left out."""
    if not value.strip():
        raise typer.BadParameter("must name an environment variable (it is empty)")
    return value


def typed_on_the_command_line(ctx: typer.Context, name: str) -> bool:
    """Whether the option whose parameter is `name` was written on the command line (not taken from its environment
    variable, nor left to its default)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "COMMANDLINE"


# `readable=False` on every configuration file's path: typer's own check answered a file that cannot be read
# with its usage box and exit 2; loading it says so in the one line (and exit 1) of any configuration error.
ConfigOption = Annotated[
    Path | None,
    typer.Option(
        "--config",
        "-c",
        envvar="POOLGATE_CONFIG",
        help="YAML configuration file.",
        show_default=False,
        readable=False,
        parser=config_file,
    ),
]


def data_directory(value: str | Path) -> Path:
    """--data-dir as given (a default comes as a Path): an empty one is refused (Path('') is the current
    directory, where `--data-dir ''` made a store and the demo its master.key), as an empty data_dir in the
    file is."""
    if isinstance(value, str) and not value.strip():
        raise typer.BadParameter("must not be empty: leave it out for the configuration's (or the default)")
    return Path(value)


DataDirOption = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        envvar="POOLGATE_DATA_DIR",
        help="Data directory (overrides the config file's).",
        parser=data_directory,
    ),
]


def option_problem(name: str, problem: str) -> str:
    """`--data-dir must not be empty`, `ID may hold only …`: a problem said in our words follows the name; one
    in another's (a sentence of typer's or pydantic's) after a colon."""
    return f"{name} {problem}" if problem[:1].islower() else f"{name}: {problem}"


# How an option's numbers are spoken of, by the type it is declared with.
NUMBER_KINDS: dict[object, str] = {int: "a whole number", float: "a number"}


def bad_value(exc: typer.BadParameter) -> str:
    """An option's value that typer refused, as the CLI's other refusals are: one line naming the option and
    what it takes. typer's usage box gave pydantic's wording (`Input should be less than or equal to 65535`,
    `unable to parse string as a number`) for a port of 99999 or a weight of `abc`."""
    param = exc.param
    if param is None:
        return exc.format_message()
    opts = getattr(param, "opts", None)
    name = max(opts, key=len) if opts and param.param_type_name == "option" else param.get_error_hint().strip("'")
    source = exc.ctx.get_parameter_source(param.name) if exc.ctx is not None and param.name else None
    if source is not None and source.name == "ENVIRONMENT" and isinstance(param.envvar, str):
        # Not typed on the command line: `--data-dir must not be empty` sent the reader looking for an option.
        name = f"{param.envvar} (for {name})"
    low, high = getattr(param, "min", None), getattr(param, "max", None)
    declared = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    kind = NUMBER_KINDS.get(declared)
    if kind is None and (low is not None or high is not None):
        kind = NUMBER_KINDS[int if isinstance(low if low is not None else high, int) else float]
    if kind is None:
        return option_problem(name, exc.message)
    if low is not None and high is not None:
        return f"{name} must be {kind} from {low} to {high}"
    if low is not None:
        return f"{name} must be {kind}, at least {low}"
    if high is not None:
        return f"{name} must be {kind}, at most {high}"
    return f"{name} must be {kind}"
