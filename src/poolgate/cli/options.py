"""The options and argument parsers every CLI command group shares (cli/main.py and cli/accounts.py, which
main imports to register it: here, neither needs the other for them)."""

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


def environment_variable_name(value: str) -> str:
    """An option naming an environment variable: an empty name (a script's unset `"$NAME"`) was taken for the
    option left out."""
    if not value.strip():
        raise typer.BadParameter("must name an environment variable (it is empty)")
    return value


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
