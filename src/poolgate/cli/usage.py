"""`poolgate usage`: usage and spend from the ledger, grouped, with totals, as a table, JSON or CSV (whose
caller-chosen labels a spreadsheet shows as text: `spreadsheet_safe`). A command of the app's own, not a group:
cli/main.py registers it."""

from __future__ import annotations

import csv
import json
import re
import sys
import time
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from poolgate.cli.options import ConfigOption, DataDirOption
from poolgate.cli.output import console, counted, fail, print_whole, shown
from poolgate.cli.store import load, records_engine
from poolgate.telemetry.logging import visible

USAGE_FORMATS = ("table", "json", "csv")
USAGE_COLUMNS = (
    ("requests", "requests"),
    ("errors", "errors"),
    ("input_tokens", "input"),
    ("output_tokens", "output"),
    ("cache_creation_input_tokens", "cache write"),
    ("cache_read_input_tokens", "cache read"),
    ("web_search_requests", "searches"),
)


def usage(
    by: Annotated[
        str, typer.Option(help="Group by: principal (alias: key), session, upstream, model, day (UTC) or endpoint.")
    ] = "principal",
    since: Annotated[
        str | None,
        typer.Option(help="From: an ISO date or date-time (UTC), or a span before now: 30m, 24h, 7d, 2w."),
    ] = None,
    until: Annotated[str | None, typer.Option(help="Up to (not including); same forms as --since.")] = None,
    output: Annotated[str, typer.Option("--format", help="table, json or csv.")] = "table",
    since_hours: Annotated[float | None, typer.Option("--since-hours", hidden=True)] = None,
    as_json: Annotated[bool, typer.Option("--json", hidden=True, help="Same as --format json.")] = False,
    config_path: ConfigOption = None,
    data_dir: DataDirOption = None,
) -> None:
    """Usage and spend from the ledger, grouped, with totals.

    Costs are in USD (6 decimals); a request whose model has no price counts as `unknown`, never as free."""
    from poolgate.lifecycle.quotas import rfc3339
    from poolgate.store.reports import ReportError, format_cost, parse_when, summarize, usd

    if output not in USAGE_FORMATS:
        # One line and exit 1, as a bad --by is: typer's usage box said "Value error, 'xml' is not one of …".
        raise fail(f"--format must be one of {', '.join(USAGE_FORMATS)}")
    config = load(config_path, data_dir)
    now = time.time()

    def when(option: str, text: str) -> float:
        """The option's time, or its refusal naming the option (of two, which one was not a time)."""
        try:
            return parse_when(text, now)
        except ReportError as exc:
            raise ReportError(f"{option}: {exc}") from None

    try:
        start = when("--since", since) if since is not None else None
        end = when("--until", until) if until is not None else None
        if since_hours is not None:  # the old spelling of `--since {H}h`, checked as that is (inf printed -Infinity)
            if since is not None:  # one of the two was ignored
                raise ReportError("--since-hours is the old spelling of --since: give one of them")
            start = when("--since-hours", f"{since_hours:f}h")
        if start is not None and end is not None and start >= end:
            # An empty window would print an all-zero table, which reads as "no usage", not as a typo.
            raise ReportError(f"--since ({rfc3339(start)}) must be before --until ({rfc3339(end)})")
        summary = summarize(records_engine(config), by, start, end)
    except ReportError as exc:
        raise fail(str(exc)) from None
    by = "principal" if by == "key" else by
    if as_json:
        output = "json"
    # CSV and JSON keep numbers apart (a spreadsheet sums `cost_usd`; `unpriced` counts the unknown ones).
    for row in (*summary.groups, summary.total):
        row["cost_usd"] = usd(row["cost_micro_usd"]) if output in ("json", "csv") else format_cost(row)
    if output == "json":
        window = {"since": start, "until": end}
        print(json.dumps({"by": by, **window, "groups": summary.groups, "total": summary.total}, default=str))
        return
    if output == "csv":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        fields = [name for name, _ in USAGE_COLUMNS] + ["cost_micro_usd", "cost_usd", "unpriced", "avg_ttfb_ms"]
        # Amounts priced in other currencies (credits, say): a column each, as numbers a spreadsheet can sum.
        currencies = list(summary.total["other_costs"])
        currency_fields = [f"other_cost_{spreadsheet_safe(visible(currency))}" for currency in currencies]
        named = by in ("principal", "session")
        # A session is its caller's, and callers' names repeat (two issuers' `alice`, a key created again after
        # a revocation): the caller's id tells their rows apart, as in JSON.
        owned = by == "session"
        labels = [by, *(["name"] if named else []), *(["principal"] if owned else [])]
        writer.writerow([*labels, *fields, *currency_fields])
        for row in [*summary.groups, {**summary.total, "group": "total", "name": "", "principal": ""}]:
            label = [spreadsheet_safe(visible(str(row["group"]))) if row["group"] is not None else ""]
            if named:
                label.append(spreadsheet_safe(visible(row.get("name") or "")))
            if owned:
                label.append(spreadsheet_safe(visible(row["principal"] or "")))
            others = [usd(row["other_costs"].get(currency, 0)) for currency in currencies]
            writer.writerow([*label, *(row[name] if row[name] is not None else "" for name in fields), *others])
        return
    # Time to first byte is in the JSON and CSV forms; the table keeps to what fits 80 columns (web searches
    # only when there were any).
    columns = [(name, title) for name, title in USAGE_COLUMNS if name != "web_search_requests" or summary.total[name]]
    # Two-word titles on two lines: the numbers under them are what sets the columns' widths.
    titles = [title.replace(" ", "\n") for _, title in columns]
    table = Table(by, *titles, "cost\nUSD", box=box.SIMPLE_HEAD, pad_edge=False)
    table.columns[0].overflow = "fold"
    for column in table.columns[1:]:  # numbers whole, on one line: only the group's name folds
        column.justify = "right"
        column.no_wrap = True
    # Names callers share (two JWT issuers' `alice`, a static key and a token's subject of one name): their sessions are
    # told apart by the caller's id too.
    callers_named: dict[str, set[str]] = {}
    if by == "session":
        for row in summary.groups:
            callers_named.setdefault(row.get("name") or "", set()).add(row["principal"] or "")
    for row in summary.groups:
        group = str(row["group"]) if row["group"] not in (None, "") else "-"
        if by == "principal" and row.get("name") and row["name"] != row["group"]:
            group = f"{row['name']} ({group})"
        elif by == "session" and row.get("name"):
            shared = len(callers_named[row["name"]]) > 1
            # a session is its caller's
            group = f"{group} ({row['name']}, {row['principal']})" if shared else f"{group} ({row['name']})"
        table.add_row(shown(group), *(f"{row[name]:,}" for name, _ in columns), row["cost_usd"])
    total = summary.total
    table.add_row(
        "[bold]total[/bold]",
        *(f"[bold]{total[name]:,}[/bold]" for name, _ in columns),
        f"[bold]{total['cost_usd']}[/bold]",
    )
    print_whole(table)
    if total["other_currency"]:
        amounts = ", ".join(f"{usd(micro)} {shown(currency)}" for currency, micro in total["other_costs"].items())
        console.print(
            f"not in the USD totals: {counted(total['other_currency'], 'request')} priced in another currency "
            f"({amounts})",
            highlight=False,
        )


# Where a spreadsheet may start a cell of a label: at its start, or after a character it may split a line at.
# Besides the comma, Excel splits a .csv at its list separator, the semicolon where the decimal mark is a comma
# (Germany, France): `s1;=cmd|…`, nothing a comma-separated file quotes, opened there as a second cell, a formula.
_CELL_STARTS_LIKE_A_FORMULA = re.compile(r"(^|[,;\t])(?=[=+\-@\t\r])")


def spreadsheet_safe(text: str) -> str:
    """A caller-chosen label (a model name, a session id) as a CSV cell a spreadsheet shows as text: wherever
    a cell may start in it, one starting like a formula (`=HYPERLINK(…)`) gets a leading apostrophe (OWASP's
    advice on CSV injection)."""
    return _CELL_STARTS_LIKE_A_FORMULA.sub(r"\1'", text)
