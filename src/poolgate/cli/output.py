"""Where the CLI prints: rich consoles that fit tables to the terminal, and that do not fold them where there
is none (rich assumes 80 columns then: in a CI log, a cron mail or a subprocess's output, a usage report's
principal names and route traces came out folded over three or four lines)."""

from __future__ import annotations

import os

from rich.console import Console, ConsoleDimensions
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

from poolgate.telemetry.logging import visible

# Wide enough for any table the CLI prints; a table takes only the width its cells need.
UNFOLDED_WIDTH = 1000


def _any_terminal() -> bool:
    """Whether rich would find a terminal size to fit to (it asks stdin, stdout and stderr in turn)."""
    for descriptor in (0, 1, 2):
        try:
            if os.isatty(descriptor):
                return True
        except OSError:
            continue
    return False


class CliConsole(Console):
    @property  # type: ignore[override]
    def size(self) -> ConsoleDimensions:
        size = super().size
        if self._width is not None or self._environ.get("COLUMNS") or _any_terminal():
            return size
        return ConsoleDimensions(UNFOLDED_WIDTH, size.height)

    @size.setter
    def size(self, new_size: tuple[int, int]) -> None:
        self._width, self._height = new_size


# No emoji codes: rich turned `gw.yaml:100:` (a line number) and a key named `:fire:` into pictures.
console = CliConsole(emoji=False)
err = CliConsole(stderr=True, emoji=False)


def shown(text: str) -> str:
    """Text a caller chose (a model name, a JWT subject, a session id) as the CLI prints it: its control
    characters visible, as in the log, and never read as rich markup (`[link=…]`, `[blink]`). Printed raw,
    an escape sequence recoloured or rewrote the operator's terminal and a newline forged a report's row."""
    return escape(visible(text))


def folding_table(*headers: str) -> Table:
    """A table whose long cells fold onto more lines in a narrow terminal instead of losing their end to an
    ellipsis: the ids in it are what other commands take (`accounts remove ID`), whole."""
    table = Table(*headers)
    for column in table.columns:
        column.overflow = "fold"
    return table


# How narrow a report's folding column (its group names) may become before the table is printed wider.
FOLDED_MIN_WIDTH = 10


def print_whole(table: Table) -> None:
    """Print a report whose first column folds and whose other cells (numbers) must stay whole: in the
    terminal's width, or wider when those cells need more, for the terminal to wrap. rich cut a table that
    did not fit at the terminal's edge, and with it the digits there (a cost of 0.000176 read `0.000`, one
    of 6172.839450 lost its last digits)."""
    options = console.options.update_width(UNFOLDED_WIDTH)
    natural = Measurement.get(console, options, table).maximum
    first = table.columns[0]
    widest = max(Measurement.get(console, options, cell).maximum for cell in (first.header, *first.cells))
    needed = natural - max(0, widest - FOLDED_MIN_WIDTH)
    if needed <= console.width:
        console.print(table)
        return
    # A console of that width on the same output (rich prints no wider than its console's width).
    wide = CliConsole(
        file=console.file,
        width=needed,
        emoji=False,
        force_terminal=console.is_terminal,
        color_system=console.color_system,  # type: ignore[arg-type]
    )
    wide.print(table)


def counted(count: int, noun: str) -> str:
    """`1 upstream`, `2 upstreams`."""
    return f"{count} {noun}{'' if count == 1 else 's'}"
