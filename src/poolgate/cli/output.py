"""Where the CLI prints: rich consoles that fit tables to the terminal, and that do not fold them where there
is none (rich assumes 80 columns then: in a CI log, a cron mail or a subprocess's output, a usage report's
principal names and route traces came out folded over three or four lines); and what every command prints
alike: its error and warning lines (`fail`, `warn`), counts and times."""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterator
from copy import copy
from dataclasses import replace

import typer
from rich.cells import cell_len
from rich.console import Console, ConsoleDimensions, ConsoleOptions, JustifyMethod, RenderableType
from rich.markup import escape
from rich.measure import Measurement
from rich.segment import Segment, Segments
from rich.table import Column, Table

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
    an escape sequence recoloured or rewrote the operator's terminal and a newline forged a report's row. A tab
    too (which the log keeps): a table expanded it into spaces, and `x\t=cmd` read as `x       =cmd`."""
    return escape(visible(text).replace("\t", "\\x09"))


def shown_lines(message: str) -> str:
    """A message of the CLI's own that quotes what the user wrote (an id, a path, a file's value), as `shown`
    but for its own line breaks: a configuration's problems are one a line."""
    return "\n".join([shown(line) for line in message.split("\n")])


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
    of 6172.839450 lost its last digits). Its rows are text without styles, but for the last (a total)."""
    options = console.options.update_width(UNFOLDED_WIDTH)
    # rich measured every cell three times and rendered it once more, each cell apart: 35 s and 400 MB for
    # 50,000 sessions. A column is as wide as its widest line, measured on all of them at once; the frame
    # (header, last row, edges) is rich's, in those widths, and the body rows are laid in it as text.
    widths = [_widest(options, column) for column in table.columns]
    frame = copy(table)
    frame.columns = [replace(column.copy(), width=width) for column, width in zip(table.columns, widths, strict=True)]
    natural = Measurement.get(console, options, frame).maximum
    needed = natural - max(0, widths[0] - FOLDED_MIN_WIDTH)
    # A console of that width on the same output (rich prints no wider than its console's width).
    out = (
        console
        if needed <= console.width
        else CliConsole(
            file=console.file,
            width=needed,
            emoji=False,
            force_terminal=console.is_terminal,
            color_system=console.color_system,  # type: ignore[arg-type]
        )
    )
    # The first column gives up what the table lacks of its natural width, as rich has it.
    widths[0] -= max(0, natural - out.width)
    frame.columns[0].width = widths[0]
    rows = list(zip(*(column.cells for column in table.columns), strict=True))
    frame.rows = []
    frame.add_row(*(_BODY * width for width in widths))
    if rows:
        frame.add_row(*rows[-1])
    out.print(Segments(_laid_out(out, frame, widths, rows[:-1])))


# Marks the row of the frame rich renders where the body rows go: a private-use character, and the frame
# holds no caller's text (only the headers and the last row, a total).
_BODY = "\ue000"


def _laid_out(
    out: Console, frame: Table, widths: list[int], body: list[tuple[RenderableType, ...]]
) -> Iterator[Segment]:
    """The frame as rich renders it, with the body rows' lines in place of its marked row."""
    for line in Segment.split_lines(out.render(frame, out.options)):
        text = "".join(segment.text for segment in line)
        if _BODY not in text:
            yield from line
            yield Segment.line()
            continue
        # What rich puts around a row's cells: edges, padding and the lines between columns.
        *between, end = re.split(f"{_BODY}+", text)
        for row in body:
            for cells in _row_lines(out, frame.columns, widths, row):
                yield Segment("".join(gap + cell for gap, cell in zip(between, cells, strict=True)) + end)
                yield Segment.line()


def _widest(options: ConsoleOptions, column: Column) -> int:
    """The width of a column's widest line, its header's included."""
    cells = "\n".join(map(str, column.cells))
    return max(Measurement.get(console, options, cell).maximum for cell in (column.header, cells))


def _row_lines(
    out: Console, columns: list[Column], widths: list[int], row: tuple[RenderableType, ...]
) -> list[list[str]]:
    """A body row's lines, as the text of each cell in its column's width: the first cell folded as rich
    folds it, the others on the first line."""
    texts = [out.render_str(str(cell), highlight=False) for cell in row]
    first = columns[0]
    # A tab is measured as nothing and laid out to the next tab stop, as rich's wrapping does it.
    folded = (
        [texts[0].plain]
        if texts[0].cell_len <= widths[0] and "\t" not in texts[0].plain
        else [
            line.plain
            for line in texts[0].wrap(out, widths[0], justify=first.justify, overflow=first.overflow, no_wrap=False)
        ]
    )
    cells = [folded, *([text.plain] for text in texts[1:])]
    return [
        [
            _justified(cell[index] if index < len(cell) else "", width, column.justify)
            for cell, width, column in zip(cells, widths, columns, strict=True)
        ]
        for index in range(len(folded))
    ]


def _justified(text: str, width: int, justify: JustifyMethod) -> str:
    room = width - cell_len(text)
    if justify == "right":
        return " " * room + text
    if justify == "center":
        return " " * (room // 2) + text + " " * (room - room // 2)
    return text + " " * room


def counted(count: int, noun: str) -> str:
    """`1 upstream`, `2 upstreams`."""
    return f"{count} {noun}{'' if count == 1 else 's'}"


def fail(message: str, code: int = 1) -> typer.Exit:
    # Messages quote what the user wrote (YAML, names, paths): never read as markup nor sent to the terminal as
    # its control characters (an id pasted with an escape sequence), and one line however narrow the terminal,
    # so that a file:line stays whole.
    err.print(f"[red]error:[/red] {shown_lines(message)}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


def warn(message: str) -> None:
    """A warning line, written as `fail` writes an error."""
    err.print(f"[yellow]warning:[/yellow] {shown_lines(message)}", highlight=False, soft_wrap=True)


def local_time(timestamp: float | None) -> str:
    """A moment as the machine's local date and time (`2026-12-06 22:10:09`); `-` for none."""
    if timestamp is None:
        return "-"
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(timestamp))
