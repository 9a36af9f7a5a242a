"""The CLI a team lead uses: keys shown once and stored hashed, upstream secrets encrypted at rest."""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import socket
import sqlite3
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from importlib.machinery import EXTENSION_SUFFIXES
from pathlib import Path
from typing import Any

import pytest
import typer.main
from rich.console import Console
from typer.testing import CliRunner

from poolgate import compiled as compiled_module
from poolgate.cli import main as cli
from poolgate.cli import route as route_cli
from poolgate.cli.main import app
from poolgate.cli.route import print_route
from poolgate.compiled import compiled_modules
from poolgate.store import repo
from poolgate.store.crypto import SecretBox, load_master_key
from poolgate.store.db import MIGRATIONS, open_engine

runner = CliRunner()
NOBODY = 65534


def run(*args: str, input: str | None = None) -> str:
    result = runner.invoke(app, list(args), input=input, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def fails(*args: str) -> str:
    result = runner.invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code != 0
    return result.output


def test_keys_are_shown_once_and_stored_only_as_hashes(tmp_path: Path) -> None:
    key = run("keys", "create", "alice", "--data-dir", str(tmp_path), "--raw").strip()
    assert key.startswith("pg-") and len(key) > 40
    listing = run("keys", "list", "--data-dir", str(tmp_path))
    assert "alice" in listing and key[:10] in listing and key not in listing
    database = (tmp_path / "poolgate.db").read_bytes()
    assert key.encode() not in database
    assert "already exists" in fails("keys", "create", "alice", "--data-dir", str(tmp_path))
    assert run("keys", "revoke", "alice", "--data-dir", str(tmp_path)).startswith("revoked alice")
    assert "revoked" in run("keys", "list", "--data-dir", str(tmp_path))
    assert "no key named" in fails("keys", "revoke", "bob", "--data-dir", str(tmp_path))
    # Revoking again says so and keeps the time it was revoked (it used to move it to now).
    [revoked] = repo.list_keys(open_engine(f"sqlite:///{tmp_path / 'poolgate.db'}"))
    assert run("keys", "revoke", "alice", "--data-dir", str(tmp_path)).startswith("already revoked")
    [again] = repo.list_keys(open_engine(f"sqlite:///{tmp_path / 'poolgate.db'}"))
    assert again.revoked_at == revoked.revoked_at
    assert "already exists (revoked" in fails("keys", "create", "alice", "--data-dir", str(tmp_path))


def test_upstream_secrets_are_encrypted_at_rest_with_a_private_master_key(tmp_path: Path) -> None:
    secret = "sk-ant-api03-very-secret-value-123"
    d = str(tmp_path)
    run("upstreams", "add", "team-a", "--api-key", secret, "--weight", "3", "--model", "claude-*", "--data-dir", d)
    listing = run("upstreams", "list", "--data-dir", d)
    assert "team-a" in listing and "claude-*" in listing and secret not in listing
    with sqlite3.connect(tmp_path / "poolgate.db") as conn:
        stored = conn.execute("select secret from upstreams").fetchone()[0]
    assert secret.encode() not in stored
    assert secret.encode() not in (tmp_path / "poolgate.db").read_bytes()
    mode = stat.S_IMODE((tmp_path / "master.key").stat().st_mode)
    assert mode == 0o600
    run("upstreams", "disable", "team-a", "--data-dir", d)
    assert "no" in run("upstreams", "list", "--data-dir", d).split("team-a", 1)[1].splitlines()[0]
    run("upstreams", "enable", "team-a", "--data-dir", d)
    run("upstreams", "remove", "team-a", "--data-dir", d)
    assert "team-a" not in run("upstreams", "list", "--data-dir", d)
    assert "no stored upstream" in fails("upstreams", "remove", "team-a", "--data-dir", d)


def test_an_upstream_key_typed_on_the_command_line_is_warned_of_and_one_piped_or_from_the_environment_is_not(
    tmp_path: Path,
) -> None:
    """`--api-key K` leaves the key in the shell's history and, while the command runs, in its command line, which
    any user of the machine may read (`ps`, /proc/PID/cmdline): said (the key is stored all the same), with the
    ways that keep it out of both."""
    d = str(tmp_path)
    typed = runner.invoke(
        app, ["upstreams", "add", "typed", "--api-key", "sk-ant-api03-typed-0123456", "--data-dir", d]
    )
    assert typed.exit_code == 0
    assert "warning: --api-key" in typed.output
    assert "POOLGATE_UPSTREAM_API_KEY" in typed.output and "standard input" in typed.output
    piped = runner.invoke(app, ["upstreams", "add", "piped", "--data-dir", d], input="sk-ant-api03-piped-0123456\n")
    exported = runner.invoke(
        app, ["upstreams", "add", "env", "--data-dir", d], env={"POOLGATE_UPSTREAM_API_KEY": "sk-ant-api03-env-0123456"}
    )
    assert piped.exit_code == exported.exit_code == 0
    assert "warning" not in piped.output + exported.output
    assert all(name in run("upstreams", "list", "--data-dir", d) for name in ("typed", "piped", "env"))


def test_adding_a_stored_upstream_id_again_is_refused_before_its_key_is_asked_for(tmp_path: Path) -> None:
    """The key was asked for (typed in, or read from standard input) and only then the id refused: a secret given
    for nothing."""
    d = str(tmp_path)
    run("upstreams", "add", "team-a", "--api-key", "sk-ant-api03-first-0123456789", "--data-dir", d)
    result = runner.invoke(app, ["upstreams", "add", "team-a", "--data-dir", d], input="sk-ant-api03-second-0123\n")
    assert result.exit_code == 1
    assert "reading the API key" not in result.output
    assert "an upstream with id 'team-a' already exists (--replace to change it)" in result.output


def test_an_upstream_key_is_stored_without_its_trailing_newline_and_refused_with_a_control_character(
    tmp_path: Path,
) -> None:
    """A key with a CR in it was stored, then every request routed to its account failed in the gateway."""
    d = str(tmp_path)

    def add(upstream_id: str, key: str) -> str:
        return runner.invoke(
            app, ["upstreams", "add", upstream_id, "--data-dir", d], env={"POOLGATE_UPSTREAM_API_KEY": key}
        ).output

    add("nl", "sk-ant-api03-nl\n")
    refused = add("cr", "sk-ant-api03-cr\rX")
    assert "POOLGATE_UPSTREAM_API_KEY holds a control character" in refused and "sk-ant-api03-cr" not in refused
    [stored] = repo.list_upstreams(open_engine(f"sqlite:///{tmp_path / 'poolgate.db'}"))
    assert stored.upstream.id == "nl"
    assert SecretBox(load_master_key(tmp_path)).decrypt(stored.secret) == "sk-ant-api03-nl"


def test_a_base_url_with_credentials_in_it_is_refused_by_every_command_that_adds_an_upstream(tmp_path: Path) -> None:
    """`https://user:pass@host` was stored in plain text (only the secret is encrypted) and printed by
    `upstreams add` and `upstreams list`."""
    d, url = str(tmp_path), "https://user:URLPASSWORD@proxy.example"
    for command, env in (
        (["upstreams", "add", "u", "--api-key", "sk-ant-api03-x", "--base-url", url], {}),
        (
            ["accounts", "import", "--access-token-env", "AT", "--id", "sub", "--base-url", url],
            {"AT": "sk-ant-oat01-x"},
        ),
    ):
        result = runner.invoke(app, [*command, "--data-dir", d], env=env)
        assert result.exit_code != 0 and "credentials" in result.output and "api_key" in result.output
        assert "URLPASSWORD" not in result.output
    assert not (tmp_path / "poolgate.db").exists() or not repo.list_upstreams(
        open_engine(f"sqlite:///{tmp_path / 'poolgate.db'}")
    )


@pytest.mark.parametrize("url", ["http://127.0.0.1:9/v1", "https://proxy.example/anthropic/v1/"])
def test_a_base_url_ending_in_v1_is_refused_by_every_command_that_takes_one(tmp_path: Path, url: str) -> None:
    """Accepted, every request to the account went to `/v1/v1/messages`: the API's 404 relayed as the
    client's error, while the account stayed healthy and first in line."""
    config = tmp_path / "gw.yaml"
    config.write_text(f'upstreams: [{{id: a, base_url: "{url}", api_key: sk-ant-api03-x}}]\n')
    d = str(tmp_path / "data")
    for command, env in (
        (["config", "check", str(config)], {}),
        (["upstreams", "add", "u", "--api-key", "sk-ant-api03-x", "--base-url", url], {}),
        (["accounts", "import", "--access-token-env", "AT", "--id", "s", "--base-url", url], {"AT": "sk-ant-oat01-x"}),
        (["accounts", "login", "--id", "s", "--base-url", url], {}),
    ):
        result = runner.invoke(app, [*command, "--data-dir", d], env=env)
        assert result.exit_code != 0 and "must not end in /v1" in result.output, result.output
        assert "drop the /v1" in result.output
    assert not (tmp_path / "data").exists()


def test_an_upstream_with_a_bad_url_is_refused_with_the_reason(tmp_path: Path) -> None:
    output = fails("upstreams", "add", "x", "--api-key", "k", "--base-url", "ftp://nope", "--data-dir", str(tmp_path))
    assert "--base-url must start with http:// or https://" in output


def test_config_check_reports_ok_and_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # not where README's walkthrough left a ./poolgate-data
    good = tmp_path / "good.yaml"
    good.write_text("routing:\n  strategy: random\n")
    assert "ok" in run("config", "check", str(good))
    bad = tmp_path / "bad.yaml"
    bad.write_text("routing:\n  max_attempts: zero\n")
    output = fails("config", "check", str(bad))
    assert "bad.yaml:2" in output and "routing.max_attempts" in output


def test_config_check_names_every_unset_variable_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """README's walkthrough checks poolgate.example.yaml, which reads two keys from the environment: with
    neither exported, the check named only the first, and the second only once the first was set."""
    for name in ("ANTHROPIC_KEY_TEAM_A", "ANTHROPIC_KEY_TEAM_B"):
        monkeypatch.delenv(name, raising=False)
    example = Path(__file__).parents[2] / "poolgate.example.yaml"
    output = fails("config", "check", str(example), "--data-dir", str(tmp_path / "data"))
    lines = {number for number, line in enumerate(example.read_text().splitlines(), 1) if "${ANTHROPIC_KEY_" in line}
    first, second = sorted(lines)
    assert output == (
        "error: invalid configuration:\n"
        f"  {example}:{first}: upstreams.0.api_key: environment variable ANTHROPIC_KEY_TEAM_A is not set"
        " (referenced as ${ANTHROPIC_KEY_TEAM_A})\n"
        f"  {example}:{second}: upstreams.1.api_key: environment variable ANTHROPIC_KEY_TEAM_B is not set"
        " (referenced as ${ANTHROPIC_KEY_TEAM_B})\n"
    )


@pytest.mark.parametrize("name", ["static", "internal", "bearer"])
def test_config_check_refuses_a_jwt_issuer_named_like_the_ids_of_config_keys(tmp_path: Path, name: str) -> None:
    """Its callers' ids are `<name>:<subject>`: a token for `sub: victim` from an issuer named `static` was
    static key victim, spent its budget and merged with it in `poolgate usage`."""
    config = tmp_path / "gw.yaml"
    config.write_text(
        "callers:\n  jwt_issuers:\n"
        f"    - {{name: {name}, issuer: x, audience: pg, algorithms: [HS256], secret: {'s' * 32}}}\n"
    )
    output = fails("config", "check", str(config))
    assert "gw.yaml:3" in output and f"callers.jwt_issuers.0.name: {name!r} is reserved" in output


def test_version_says_the_store_schema_it_migrates_to_and_whether_it_runs_compiled() -> None:
    # Every build said "poolgate 0.1.0": an operator could not tell which one ran, nor which stores it takes.
    compiled = compiled_modules()
    build = f"{len(compiled)} modules compiled with mypyc" if compiled else "pure Python"
    assert f"poolgate 0.1.0 (store schema v{len(MIGRATIONS)}, {build})" in run("version")


def test_a_compiled_module_older_than_its_source_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # An editable install runs a compiled module, not its source: an edit made after the build does not run.
    package = tmp_path / "src" / "pkg"
    (package / "sub").mkdir(parents=True)
    (tmp_path / "pyproject.toml").write_text("")  # a working tree, as an editable install runs
    for name in ("fresh", "stale"):
        (package / "sub" / f"{name}.py").write_text("")
        (package / "sub" / f"{name}{EXTENSION_SUFFIXES[0]}").write_bytes(b"")
    os.utime(package / "sub" / "stale.py", (time.time() + 60, time.time() + 60))
    monkeypatch.setattr(compiled_module, "PACKAGE", package)
    assert compiled_module.compiled_modules() == ["pkg.sub.fresh", "pkg.sub.stale"]
    assert compiled_module.stale_modules() == ["pkg.sub.stale"]
    assert "older than their source run in place of it: pkg.sub.stale; build them again" in run("version")
    # Installed from a wheel (no working tree around it), each source is written after its compiled file: no warning.
    (tmp_path / "pyproject.toml").unlink()
    assert compiled_module.stale_modules() == []


def test_the_version_option_says_what_the_version_command_does() -> None:
    """`poolgate --version`, what most tools take, was refused as "No such option: --version"."""
    assert run("--version") == run("version")


def route_record(**fields: object) -> dict[str, object]:
    """A usage record as `route explain` reads it (its trace added by the test)."""
    base: dict[str, object] = {
        "request_id": "req_pg_1",
        "started_at": 0.0,
        "principal_name": "alice",
        "model": "m",
        "session_id": None,
        "status": 200,
    }
    return {**base, **fields}


def test_route_explain_shows_scores_of_new_and_older_traces(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trace's scores list (and the mapping by upstream id that traces were written with before) is shown
    as one row per scored account: its total, its non-zero terms and the predicted prompt-cache split."""
    monkeypatch.setattr(route_cli, "console", Console(width=200))  # one line per row
    record = route_record(upstream_id="a", attempts=1)
    stages = [{"name": "model", "kept": ["a", "b"], "dropped": {}, "us": 1.0}]
    terminal = {"strategy": "round-robin", "chosen": "a", "order": ["a", "b"], "sticky": False}
    prediction = {"read": 12000, "write": 800, "uncached": 10, "confidence": 1.0, "cost": 2000.0}
    new = [
        {"upstream_id": "b", "total": 2.5, "cache": 2.0, "latency": 0.5, "headroom_raw": 0.1},
        {"upstream_id": "a", "total": 0.25, "headroom": 0.25, "cache_prediction": prediction},
    ]
    old = {"a": {"total": 0.25, "headroom": 0.25, "cache": prediction}, "b": {"total": 2.5, "latency": 0.5}}
    for scores in (new, old):
        print_route({**record, "route": json.dumps({"stages": stages, "scores": scores, "terminal": terminal})})
        table = capsys.readouterr().out.split("┃ scored", 1)[1]
        rows = [line for line in table.splitlines() if line.startswith("│")]
        assert [row.split("│")[1].strip() for row in rows] == ["a", "b"]  # best first
        assert "headroom 0.250" in rows[0] and "read 12,000 / write 800" in rows[0]
        assert "latency 0.500" in rows[1]


def test_route_explain_says_a_refused_request_s_old_trace_was_dropped(capsys: pytest.CaptureFixture[str]) -> None:
    """A request the router refused (no account usable: `no_upstream`, served by none) was routed, and its
    trace dropped with the others past `store.trace_retention_days`: `route explain` said it "ended before
    routing", sending whoever asked why last month's requests were refused to look elsewhere."""
    refused = route_record(upstream_id=None, outcome="no_upstream", attempts=0, status=529, route=None)
    print_route(refused, retention_days=30)
    assert "its routing trace was dropped (older than store.trace_retention_days: 30)" in capsys.readouterr().out
    print_route({**refused, "outcome": "client_error", "status": 400})  # refused before routing: it had none
    assert "no routing trace (the request ended before routing)" in capsys.readouterr().out


def test_route_explain_takes_a_pasted_id_with_blanks_and_says_an_empty_one_is_empty(tmp_path: Path) -> None:
    """An id pasted with a line end was looked up as it came and not found; an empty one was "no usage record
    for  (…)", naming nothing."""
    run("keys", "create", "alice", "--data-dir", str(tmp_path))
    for blank in ("", "  ", "\n"):
        said = fails("route", "explain", blank, "--data-dir", str(tmp_path))
        assert "REQUEST_ID is empty" in said and "route last" in said, said
    assert "no usage record for req_0123 (" in fails("route", "explain", " req_0123\n", "--data-dir", str(tmp_path))


def test_an_error_line_shows_the_control_characters_it_quotes(tmp_path: Path) -> None:
    """An id or a path with an escape sequence in it was quoted raw by the error line (`no usage record for
    …`, `no store in …`): pasted into the terminal, it recoloured or rewrote it, where every table and note shows
    it as `\\x1b` (README: CLI). A configuration's problems keep one line each."""
    run("keys", "create", "alice", "--data-dir", str(tmp_path))
    said = fails("route", "explain", "req\x1b[2J\x07", "--data-dir", str(tmp_path))
    assert "\x1b" not in said and "\x07" not in said and r"no usage record for req\x1b[2J\x07 (" in said, said
    said = fails("usage", "--data-dir", str(tmp_path / "d\x1b[31m"))
    assert "\x1b" not in said and r"d\x1b[31m" in said, said
    config = tmp_path / "gw.yaml"
    config.write_text("server: {port: -1, host: ''}\n")
    said = fails("config", "check", str(config))
    assert said.count(f"\n  {config}:1: server.") == 2, said


def test_keys_list_shows_whole_names_in_a_narrow_terminal(tmp_path: Path) -> None:
    """`keys revoke NAME` needs the name as listed: never cut with an ellipsis, also at 80 columns."""
    name = "demo-20261202-153637-with-a-long-tail"
    run("keys", "create", name, "--data-dir", str(tmp_path), "--quota", "requests=100/minute")
    listing = run("keys", "list", "--data-dir", str(tmp_path))
    assert any(name in line for line in listing.splitlines())


def test_a_reset_days_away_names_its_date_not_only_a_weekday() -> None:
    from poolgate.cli.accounts import _window_cell

    now = time.time()
    week = {"windows": {"seven_day": {"utilization": 0.5, "resets_at": now + 6.9 * 86400}}}
    cell = _window_cell(week, "seven_day", now)
    assert time.strftime("%d %b", time.localtime(now + 6.9 * 86400)) in cell
    soon = {"windows": {"five_hour": {"utilization": 0.2, "resets_at": now + 3600}}}
    assert _window_cell(soon, "five_hour", now).endswith(time.strftime("%H:%M", time.localtime(now + 3600)))


def test_a_model_family_held_out_shows_in_the_week_also_when_its_answer_named_no_reset() -> None:
    """A family an aggregate-only rejection holds out shows beside the 7-day window; one whose answer named no
    reset holds for the default park from when it was seen (it showed nowhere)."""
    from poolgate.cli.accounts import _week_cell
    from poolgate.upstreams.quota import DEFAULT_REJECTED_PARK_SECONDS

    now = time.time()

    def shown_until(until: float) -> str:
        return "opus: rejected · resets " + time.strftime("%H:%M", time.localtime(until))

    named = {"rejected_families": {"opus": {"reset_at": now + 7200, "observed_at": now - 10}}}
    assert _week_cell(named, now).endswith(shown_until(now + 7200))
    unnamed = {"rejected_families": {"opus": {"reset_at": None, "observed_at": now - 10}}}
    assert _week_cell(unnamed, now).endswith(shown_until(now - 10 + DEFAULT_REJECTED_PARK_SECONDS))
    over = {"rejected_families": {"opus": {"reset_at": None, "observed_at": now - DEFAULT_REJECTED_PARK_SECONDS - 1}}}
    assert "opus" not in _week_cell(over, now)


def test_a_different_master_key_cannot_add_secrets_the_gateway_could_not_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unset POOLGATE_MASTER_KEY (a new key file would be made) or a wrong one is refused before it
    encrypts anything: the gateway would fail to start on the mix at its next start."""
    from cryptography.fernet import Fernet

    d = str(tmp_path)
    monkeypatch.setenv("POOLGATE_MASTER_KEY", Fernet.generate_key().decode())
    run("upstreams", "add", "first", "--api-key", "sk-ant-api03-first-0123456789", "--data-dir", d)
    monkeypatch.delenv("POOLGATE_MASTER_KEY")
    assert "there is no master key" in fails(
        "upstreams", "add", "second", "--api-key", "sk-ant-api03-second-012345", "--data-dir", d
    )
    assert not (tmp_path / "master.key").exists()
    monkeypatch.setenv("POOLGATE_MASTER_KEY", Fernet.generate_key().decode())
    assert "master key differs" in fails(
        "upstreams", "add", "second", "--api-key", "sk-ant-api03-second-012345", "--data-dir", d
    )


def test_a_new_store_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    fresh = tmp_path / "fresh"
    run("keys", "create", "alice", "--data-dir", str(fresh))
    run("upstreams", "add", "team-a", "--api-key", "sk-ant-api03-owner-only-012345", "--data-dir", str(fresh))
    assert stat.S_IMODE(fresh.stat().st_mode) == 0o700
    for name in ("poolgate.db", "master.key"):
        assert stat.S_IMODE((fresh / name).stat().st_mode) == 0o600, name
    for sidecar in (fresh / "poolgate.db-wal", fresh / "poolgate.db-shm"):
        if sidecar.exists():
            assert stat.S_IMODE(sidecar.stat().st_mode) == 0o600, sidecar.name


def test_commands_that_only_read_never_create_a_store(tmp_path: Path) -> None:
    # A mistyped --data-dir used to leave a new, empty store behind and report nothing at all.
    typo = tmp_path / "poolgate-dmeo"
    for report in (["usage"], ["route", "last"], ["route", "explain", "req_0123"]):
        assert "no store in" in fails(*report, "--data-dir", str(typo))
    config = tmp_path / "poolgate.yaml"
    config.write_text(
        f"data_dir: {typo}\n"
        "upstreams:\n  - {id: from-file, api_key: sk-ant-api03-x}\n"
        'keys:\n  - {name: file-key, key: "pg-file-key-0123456789abcdef"}\n'
    )
    # Listings show what the configuration defines, and say that nothing is stored yet.
    assert "from-file" in run("upstreams", "list", "--config", str(config))
    assert "file-key" in run("keys", "list", "--config", str(config))
    assert "no store in" in run("accounts", "list", "--config", str(config))
    assert not typo.exists()
    # Once something is stored there, the same commands read it.
    run("keys", "create", "alice", "--data-dir", str(typo), "--raw")
    assert "alice" in run("keys", "list", "--data-dir", str(typo))
    assert "total" in run("usage", "--data-dir", str(typo))


def test_each_command_is_summed_up_in_one_line_of_the_help_that_lists_it() -> None:
    """typer's listing keeps the line breaks of a summary's docstring: `poolgate --help` broke the demo's
    summary in the middle of a sentence, in a narrower column than the rest."""

    def summaries(group: Any, path: str) -> Iterator[tuple[str, str]]:
        # typer's groups are its own click's, not `click.Group`: a group is what has commands.
        for name, command in getattr(group, "commands", {}).items():
            yield f"{path} {name}", inspect.cleandoc(command.help or "").split("\n\n")[0]
            yield from summaries(command, f"{path} {name}")

    root = typer.main.get_command(app)
    broken = [name for name, summary in summaries(root, "poolgate") if not summary or "\n" in summary]
    assert broken == []
    listing = runner.invoke(app, ["--help"], env={"COLUMNS": "200"}).output
    assert "Run the gateway in front of the bundled mock upstream, in a store of its own. Ctrl-C stops it." in listing


def test_an_empty_listing_says_how_to_add_the_first_entry(tmp_path: Path) -> None:
    """`keys list` and `upstreams list` printed a bare table header and `route last` nothing at all, each
    exiting 0: a newcomer could not tell an empty store from a command that did nothing."""
    data_dir = str(tmp_path / "data")
    run("upstreams", "add", "team-a", "--api-key", "sk-ant-api03-x", "--data-dir", data_dir)
    assert "no gateway keys yet: `poolgate keys create NAME`" in run("keys", "list", "--data-dir", data_dir)
    assert "no requests recorded in the store yet" in run("route", "last", "--data-dir", data_dir)
    run("keys", "create", "alice", "--data-dir", data_dir)
    run("upstreams", "remove", "team-a", "--data-dir", data_dir)
    assert "no gateway keys yet" not in run("keys", "list", "--data-dir", data_dir)
    assert "no upstreams yet: `poolgate upstreams add ID`" in run("upstreams", "list", "--data-dir", data_dir)
    config = tmp_path / "gw.yaml"
    config.write_text(f"data_dir: {data_dir}\nupstreams:\n  - {{id: from-file, api_key: sk-ant-api03-x}}\n")
    assert "no upstreams yet" not in run("upstreams", "list", "--config", str(config))


@contextmanager
def unprivileged() -> Iterator[None]:
    """The block runs as a user who, unlike root, cannot read a file of mode 000 (root reads it, and
    `os.access` says it may): the real and effective uid are dropped, the saved one kept to come back with."""
    if os.geteuid() != 0:
        yield
        return
    # Imported while they can be read (the interpreter's own library may be root's alone).
    importlib.import_module("poolgate.app")
    importlib.import_module("poolgate.serve")
    importlib.import_module("poolgate.mock.config")
    os.setresuid(NOBODY, NOBODY, 0)
    try:
        yield
    finally:
        os.setresuid(0, 0, 0)


@pytest.mark.parametrize(
    "command",
    [
        ["config", "check"],
        ["serve", "--config"],
        ["keys", "list", "--config"],
        ["accounts", "list", "--config"],
        ["mock-upstream", "--config"],
    ],
)
def test_a_config_file_that_cannot_be_read_is_one_line_and_exit_1(command: list[str]) -> None:
    """typer's own check answered `chmod 000 gw.yaml` with its usage box and exit 2, where every other
    configuration error is one line and exit 1."""
    with tempfile.TemporaryDirectory() as directory:
        Path(directory).chmod(0o755)  # the file itself is what cannot be read
        config = Path(directory) / "gw.yaml"
        config.write_text("{}\n")
        config.chmod(0)
        with unprivileged():
            result = runner.invoke(app, [*command, str(config)])
    assert result.exit_code == 1, result.output
    assert result.output == f"error: cannot read {config}: Permission denied\n", result.output


def test_serve_refuses_connections_until_its_store_is_open(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`serve` listened before it opened the store: while it waited for a store another process held, a TCP
    health check found its port up, and the requests sent to it were not answered."""
    from poolgate.app import Gateway

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    seen: list[tuple[str, bool]] = []

    def connects() -> bool:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=10).close()
        except ConnectionRefusedError:
            return False
        return True

    class Opening(Gateway):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            seen.append(("opening the store", connects()))
            super().__init__(*args, **kwargs)

    monkeypatch.setattr("poolgate.app.Gateway", Opening)
    monkeypatch.setattr("poolgate.serve.run", lambda serving: seen.append(("serving", connects())))
    assert "listening on" in run("serve", "--data-dir", str(tmp_path), "--host", "127.0.0.1", "--port", str(port))
    assert seen == [("opening the store", False), ("serving", True)]


def test_serve_says_how_many_of_its_upstreams_are_disabled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text(
        f"data_dir: {tmp_path}\nupstreams: [{{id: a, api_key: k, enabled: false}}, {{id: b, api_key: k}}]\n"
    )
    monkeypatch.setattr("poolgate.serve.run", lambda serving: None)
    assert "(2 upstreams, 1 disabled, 0 gateway keys" in run("serve", "--config", str(config), "--port", "0")


def test_serve_on_a_port_in_use_says_so_before_opening_the_store(tmp_path: Path) -> None:
    """Said at once, however long the store would take to open (another process may hold it)."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        output = one_line_error(fails("serve", "--data-dir", str(tmp_path), "--host", "127.0.0.1", "--port", str(port)))
    assert output.startswith(f"error: cannot listen on 127.0.0.1:{port}: "), output
    assert not (tmp_path / "poolgate.db").exists()


def test_mock_upstream_on_a_port_in_use_says_so_without_a_traceback() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(app, ["mock-upstream", "--port", str(port)])
    assert result.exit_code == 1
    assert f"cannot listen on 127.0.0.1:{port}" in result.output and "--port 0" in result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, OSError)


@pytest.mark.parametrize(
    ("command", "says"),
    [
        (["serve", "--port", "99999"], "--port must be a whole number from 0 to 65535"),
        (["serve", "--port", "-1"], "--port must be a whole number from 0 to 65535"),
        (["demo", "--port", "99999"], "--port must be a whole number from 0 to 65535"),
        (["demo", "--mock-port", "http"], "--mock-port must be a whole number from 0 to 65535"),
        (["mock-upstream", "--port", "70000"], "--port must be a whole number from 0 to 65535"),
        (["upstreams", "add", "u1", "--weight", "0"], "--weight must be a whole number from 1 to 1000"),
        (["accounts", "import", "--weight", "5000"], "--weight must be a whole number from 1 to 1000"),
        (["accounts", "login", "--weight", "1.5"], "--weight must be a whole number from 1 to 1000"),
        (["accounts", "import", "--expires-in", "soon"], "--expires-in must be a number"),
        (["route", "last", "-n", "0"], "-n must be a whole number from 1 to 1000"),
        (["keys", "list", "--data-dir", ""], "--data-dir must not be empty"),
        # An empty --host was taken for the option left out: the configuration's host served, without a word.
        (["serve", "--host", ""], "--host must be an address or host name, not empty"),
        (["serve", "--host", " "], "--host must be an address or host name, not empty"),
        (["mock-upstream", "--host", ""], "--host must be an address or host name, not empty"),
        (["keys", "list", "--config", ""], "--config must not be empty"),
        (["accounts", "list", "-c", " "], "--config must not be empty"),
        (["config", "check", ""], "FILE must not be empty"),
        (["mock-upstream", "--config", ""], "--config must not be empty"),
        (["accounts", "import", "--access-token-env", ""], "--access-token-env must name an environment variable"),
        (
            ["accounts", "import", "--access-token-env", "AT", "--refresh-token-env", ""],
            "--refresh-token-env must name an environment variable",
        ),
        # An empty glob matches no model: the account served nothing, while `upstreams list` said "any".
        (["upstreams", "add", "u1", "--api-key", "k", "--model", "claude-*", "--model", ""], "--model must not be"),
        (["accounts", "login", "--model", ""], "--model must not be empty"),
        (["accounts", "import", "--model", ""], "--model must not be empty"),
    ],
)
def test_an_option_value_out_of_its_range_is_one_line_in_the_cli_s_words(command: list[str], says: str) -> None:
    """typer's usage box said pydantic's `Input should be less than or equal to 65535` (exit 2), where every
    other bad value (`--format xml`, `--id`) is one `error:` line and exit 1. Refused before anything runs."""
    result = runner.invoke(app, command)
    assert result.exit_code == 1, result.output
    assert result.output.startswith(f"error: {says}") and result.output.count("\n") == 1, result.output
    assert "Input should" not in result.output and "Traceback" not in result.output


def test_a_demo_mock_port_in_use_is_one_line_naming_it(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = runner.invoke(app, ["demo", "--port", "0", "--mock-port", str(port), "--data-dir", str(tmp_path)])
    assert result.exit_code == 1 and f"cannot listen on 127.0.0.1:{port}" in result.output, result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, OSError)


def test_a_host_that_cannot_be_listened_on_says_so_without_the_port_hint() -> None:
    result = runner.invoke(app, ["mock-upstream", "--host", "256.1.1.1", "--port", "0"])
    assert result.exit_code == 1 and "cannot listen on 256.1.1.1:0" in result.output, result.output
    assert "--port 0" not in result.output and "Traceback" not in result.output


def test_a_key_name_is_printable_and_not_one_the_config_file_has(tmp_path: Path) -> None:
    """Names are printed in every report: one with a newline or an escape sequence was stored as given. And a
    stored key named like a config-file key showed as two rows, of which `keys revoke` found only one."""
    config = tmp_path / "gw.yaml"
    config.write_text(f"data_dir: {tmp_path}\nkeys: [{{name: static1, key: static-key-0123456789abcdef}}]\n")
    assert "control character" in fails("keys", "create", "ev\x1b[31mil\nline2", "--config", str(config))
    assert "at most 64 characters" in fails("keys", "create", "x" * 65, "--config", str(config))
    # ' padded ' was stored so, and `keys set padded` found no key of that name.
    assert "begins or ends with a space" in fails("keys", "create", " padded ", "--config", str(config))
    assert "config file has a key named 'static1'" in fails("keys", "create", "static1", "--config", str(config))
    run("keys", "create", "static2", "--config", str(config), "--raw")
    assert run("keys", "list", "--config", str(config)).count("static1") == 2  # its id and its name, once
    # The file gaining a stored key's name later is warned of by `config check`.
    assert "static2" not in runner.invoke(app, ["config", "check", str(config)]).output
    config.write_text(f"data_dir: {tmp_path}\nkeys: [{{name: static2, key: static-key-0123456789abcdef}}]\n")
    result = runner.invoke(app, ["config", "check", str(config)])
    assert result.exit_code == 0 and "key name 'static2' is also a stored key's" in result.output, result.output


def test_config_check_warns_of_pins_and_prices_for_upstreams_that_do_not_exist(tmp_path: Path) -> None:
    """`routing.pins` naming an upstream neither in the file nor in the store passed the check, and every
    request the pin matched got a 529; a price for a mistyped upstream id passed too, and was never applied.
    A pinned or priced upstream stored with `upstreams add` is fine."""
    config = tmp_path / "gw.yaml"
    config.write_text(
        f"data_dir: {tmp_path}\nupstreams: [{{id: up1, api_key: sk-ant-api03-x}}]\n"
        "routing: {pins: [{model: 'claude-opus-*', upstreams: [up9]}, {caller: ci, upstreams: [up1, stored]}]}\n"
        "prices: {upstreams: {upl: {'*': {input: '1', output: '2'}}, stored: {'*': {input: '1', output: '2'}}}}\n"
    )
    result = runner.invoke(app, ["config", "check", str(config)])
    assert result.exit_code == 0 and "ok" in result.output
    assert "routing.pins[0] names up9: no such upstream is configured or stored, no request it matches" in result.output
    assert "routing.pins[1] names stored:" in result.output and "skipped" in result.output
    assert "prices.upstreams names upl: no such upstream is configured or stored" in result.output
    assert "prices.upstreams names stored" in result.output
    run("upstreams", "add", "stored", "--api-key", "sk-ant-api03-stored", "--config", str(config))
    result = runner.invoke(app, ["config", "check", str(config)])
    assert "pins[0]" in result.output and "pins[1]" not in result.output
    assert "names upl" in result.output and "names stored" not in result.output


def test_config_check_warns_of_warm_ups_that_never_run(tmp_path: Path) -> None:
    """`oauth.warmup_accounts` naming an account that does not exist, or naming accounts with no
    `warmup_at`, passed the check and warmed nothing up, silently. A stored account's id is fine."""
    config = tmp_path / "gw.yaml"
    config.write_text(
        f"data_dir: {tmp_path}\nupstreams: [{{id: up1, api_key: sk-ant-api03-x}}]\n"
        "oauth: {warmup_accounts: [up1, max-typo, stored]}\n"
    )
    run("upstreams", "add", "stored", "--api-key", "sk-ant-api03-stored", "--config", str(config))
    result = runner.invoke(app, ["config", "check", str(config)])
    assert result.exit_code == 0 and "ok" in result.output
    assert "oauth.warmup_accounts names max-typo: no such upstream is configured or stored" in result.output
    assert "names up1" not in result.output and "names stored" not in result.output
    assert "oauth.warmup_accounts is set but oauth.warmup_at is empty: no warm-up runs" in result.output
    config.write_text(
        f"data_dir: {tmp_path}\nupstreams: [{{id: up1, api_key: sk-ant-api03-x}}]\n"
        "oauth: {warmup_accounts: [up1], warmup_at: ['07:30']}\n"
    )
    assert "warm" not in runner.invoke(app, ["config", "check", str(config)]).output


def test_config_check_warns_of_a_pin_that_names_only_disabled_upstreams(tmp_path: Path) -> None:
    """A pin whose upstreams were all disabled passed the check, and every request it matched got a 529.
    A pin with an enabled upstream left is fine; so is a disabled upstream no pin names alone."""
    config = tmp_path / "gw.yaml"
    config.write_text(
        f"data_dir: {tmp_path}\n"
        "upstreams: [{id: up1, api_key: sk-ant-api03-x}, {id: up2, api_key: sk-ant-api03-y, enabled: false}]\n"
        "routing: {pins: [{model: 'claude-haiku-*', upstreams: [up2]}, {caller: ci, upstreams: [up1, up2]},"
        " {caller: bot, upstreams: [stored, up9]}]}\n"
    )
    run("upstreams", "add", "stored", "--api-key", "sk-ant-api03-stored", "--config", str(config))
    result = runner.invoke(app, ["config", "check", str(config)])
    assert result.exit_code == 0 and "ok" in result.output
    assert "routing.pins[0] names up2: disabled, and no upstream it names is enabled: no request it matches" in (
        result.output
    )
    assert "pins[1]" not in result.output
    assert "routing.pins[2] names up9: no such upstream is configured or stored, skipped" in result.output
    run("upstreams", "disable", "stored", "--config", str(config))
    result = runner.invoke(app, ["config", "check", str(config)])
    assert "routing.pins[2] names up9: no such upstream is configured or stored, no request it matches" in (
        result.output
    )
    assert "routing.pins[2] names stored: disabled" in result.output


def run_elsewhere(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, settings: str) -> tuple[Path, Path, Path]:
    """A config file (these settings and one upstream) in one directory, and the commands run from another:
    (the file's directory, the current one, the file)."""
    home, elsewhere = tmp_path / "etc", tmp_path / "elsewhere"
    home.mkdir()
    elsewhere.mkdir()
    config = home / "gw.yaml"
    config.write_text(settings + "upstreams: [{id: up1, api_key: sk-ant-api03-x}]\n")
    monkeypatch.chdir(elsewhere)
    return home, elsewhere, config


def test_relative_paths_in_a_config_file_are_the_files_not_the_shells(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`data_dir: ./poolgate-data` was taken from the current directory: `keys create --config` run elsewhere
    made a second, empty store there, and the key it printed was unknown to the gateway (401)."""
    home, elsewhere, config = run_elsewhere(tmp_path, monkeypatch, "data_dir: ./poolgate-data\n")
    run("keys", "create", "alice", "--config", str(config), "--raw")
    assert (home / "poolgate-data" / "poolgate.db").exists() and not list(elsewhere.iterdir())
    assert f"data in {home / 'poolgate-data'}" in run("config", "check", str(config))
    # So is a SQLite store URL's relative file; `--data-dir` stays the shell's, as command-line paths are.
    config.write_text("store: {url: 'sqlite:///db/gw.db'}\nupstreams: [{id: up1, api_key: sk-ant-api03-x}]\n")
    (home / "db").mkdir()
    assert f"store {home / 'db' / 'gw.db'}" in run("config", "check", str(config))
    run("keys", "create", "bob", "--data-dir", "here", "--raw")
    assert (elsewhere / "here" / "poolgate.db").exists()
    # `~` is the home directory, not a directory of that name.
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config.write_text("data_dir: ~/pg\nupstreams: [{id: up1, api_key: sk-ant-api03-x}]\n")
    assert f"data in {tmp_path / 'home' / 'pg'}" in run("config", "check", str(config))


def test_an_empty_data_dir_is_refused_not_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`data_dir: ${PGDATA:-}` with PGDATA unset put the store wherever the command ran."""
    monkeypatch.delenv("PGDATA", raising=False)
    _, elsewhere, config = run_elsewhere(tmp_path, monkeypatch, "data_dir: '${PGDATA:-}'\n")
    for command in (["keys", "create", "alice", "--config", str(config)], ["config", "check", str(config)]):
        assert f"{config}:1: data_dir: must not be empty" in fails(*command)
    assert not list(elsewhere.iterdir())


@pytest.mark.parametrize(
    ("command", "says"),
    [
        (("keys", "create"), "'caf\\udce9' is not UTF-8 text"),
        (("upstreams", "add"), "ID: Input should be a valid string"),
    ],
)
def test_a_name_holding_bytes_that_are_not_utf8_is_refused_in_words_not_with_a_traceback(
    tmp_path: Path, command: tuple[str, ...], says: str
) -> None:
    """A terminal in Latin-1 types `é` as the byte 0xE9, which Python hands over as half of a surrogate pair: the
    store could not encode it, and the command died with a traceback."""
    options = ["--api-key", "sk-ant-api03-" + "x" * 40] if command[1] == "add" else []
    done = subprocess.run(
        [sys.executable, "-m", "poolgate", *command, b"caf\xe9", *options, "--data-dir", str(tmp_path)],
        capture_output=True,
        timeout=60,
    )
    said = done.stderr.decode(errors="replace")
    assert done.returncode == 1 and "Traceback" not in said, said
    assert says in said


def test_output_a_latin1_terminal_cannot_show_is_shown_as_question_marks(tmp_path: Path) -> None:
    """The same terminal cannot show the `…` of a key's prefix in `keys list`: that was said as "'+---…' is not
    UTF-8 text: type it in UTF-8", the table's border quoted as if typed, and then the command died with a
    UnicodeEncodeError traceback, its table cut off. It lists the key, `?` for what the terminal lacks."""
    poolgate = [sys.executable, "-m", "poolgate", "keys"]
    subprocess.run(
        [*poolgate, "create", "bob", "--data-dir", str(tmp_path)], capture_output=True, timeout=60, check=True
    )
    done = subprocess.run(
        [*poolgate, "list", "--data-dir", str(tmp_path)],
        capture_output=True,
        timeout=60,
        env={**os.environ, "PYTHONIOENCODING": "latin-1"},
    )
    said = done.stderr.decode(errors="replace")
    assert done.returncode == 0 and "is not UTF-8 text" not in said and "Traceback" not in said, said
    assert "bob" in done.stdout.decode("latin-1")


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ('data_dir: "pg\\0data"', "data_dir"),
        ('billing: {price_file: "pg\\0prices.json"}', "billing.price_file"),
        ('store: {url: "sqlite:////tmp/pg\\0data.db"}', "store.url"),
    ],
)
def test_a_path_with_a_nul_in_it_is_refused_in_words_not_with_a_traceback(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str, where: str
) -> None:
    """YAML writes a NUL as `"\\0"`, and no file name holds one: every command met it with Python's "embedded null
    byte" under a traceback."""
    _, _, config = run_elsewhere(tmp_path, monkeypatch, text + "\n")
    for command in (["keys", "list", "--config", str(config)], ["config", "check", str(config)]):
        said = fails(*command)
        assert f"{config}:1: {where}: must not hold a NUL character" in said and "Traceback" not in said


@pytest.mark.parametrize(
    "url",
    [
        "sqlite://",
        "sqlite:///:memory:",
        "sqlite:///file:x?mode=memory&uri=true",
        "sqlite:///file::memory:?cache=shared&uri=true",
    ],
)
def test_an_in_memory_store_is_refused(tmp_path: Path, url: str) -> None:
    """Each process (the gateway, its usage writer, every CLI command) had a different, empty database: the
    gateway logged a failed reload every 2 s and its usage records were lost."""
    config = tmp_path / "gw.yaml"
    config.write_text(f"store: {{url: '{url}'}}\n")
    assert "the store must be a file" in fails("config", "check", str(config))


def test_a_gateway_without_upstreams_is_warned_of(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It passed `config check` and started without a word, then answered every request with a 529 (now a 503)."""
    config = tmp_path / "gw.yaml"
    config.write_text(f"data_dir: {tmp_path}\n")
    assert "warning: no enabled upstreams: every request is refused" in run("config", "check", str(config))
    run("upstreams", "add", "stored", "--api-key", "sk-ant-api03-stored", "--config", str(config))
    assert "no enabled upstreams" not in run("config", "check", str(config))
    # Every one disabled is the same 503 (it passed without a word).
    run("upstreams", "disable", "stored", "--config", str(config))
    config.write_text(f"data_dir: {tmp_path}\nupstreams: [{{id: a, api_key: k, enabled: false}}]\n")
    assert "warning: no enabled upstreams: every request is refused" in run("config", "check", str(config))
    monkeypatch.setattr("poolgate.serve.run", lambda serving: None)  # started, not served
    assert "warning: no enabled upstreams" in run("serve", "--config", str(config), "--port", "0")
    config.write_text(f"data_dir: {tmp_path}\nupstreams: [{{id: a, api_key: k}}]\n")
    assert "no enabled upstreams" not in run("serve", "--config", str(config), "--port", "0")


def test_commands_that_never_use_upstream_secrets_run_without_them(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`keys list` and `usage --config` refused to run unless every upstream API key was in the environment:
    an operator listing keys or reading spend had to load production keys into the shell."""
    monkeypatch.delenv("TEAM_A_KEY", raising=False)
    config = tmp_path / "gw.yaml"
    config.write_text(
        f"data_dir: {tmp_path}\nupstreams: [{{id: a, api_key: '${{TEAM_A_KEY}}'}}]\n"
        "admin: {token: '${ADMIN_TOKEN_UNSET}'}\n"
    )
    run("keys", "create", "alice", "--config", str(config), "--raw")
    assert "alice" in run("keys", "list", "--config", str(config))
    run("usage", "--config", str(config))
    # What needs them says which is missing.
    assert "TEAM_A_KEY is not set" in fails("config", "check", str(config))
    assert "TEAM_A_KEY is not set" in fails("serve", "--config", str(config), "--port", "0")
    # Any other unset variable is still an error everywhere: it may be where the store is.
    config.write_text("data_dir: '${WHERE_UNSET}'\n")
    assert "WHERE_UNSET is not set" in fails("keys", "list", "--config", str(config))


def test_upstreams_add_reads_the_key_from_standard_input_without_a_terminal(tmp_path: Path) -> None:
    """Without a terminal (a script, CI) getpass warned about echoing and the command said only "Aborted."."""
    d = str(tmp_path)
    result = runner.invoke(app, ["upstreams", "add", "team-e", "--data-dir", d], input="")
    assert result.exit_code == 1 and "no API key: give --api-key" in result.output, result.output
    run("upstreams", "add", "team-e", "--data-dir", d, input="sk-ant-api03-from-stdin\n")
    assert "team-e" in run("upstreams", "list", "--data-dir", d)


def test_list_tables_fold_to_a_narrow_terminal_rather_than_cut(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On an 80-column terminal `keys list` lost its limits column past the right edge, and `accounts list`
    cut account ids to `alice…`, the id `accounts remove` needs."""
    d = str(tmp_path)
    run("keys", "create", "bob", "--data-dir", d, "--budget-usd", "20", "--budget-range", "monthly", "--raw")
    run("keys", "create", "alice-with-a-rather-long-name", "--data-dir", d, "--quota", "requests=60/min", "--raw")
    run("upstreams", "add", "team-with-a-long-identifier", "--api-key", "sk-ant-api03-x", "--data-dir", d)
    for command, wholes in (
        (["keys", "list"], ["alice-with-a-rather-long-name", "$20.00"]),
        (["upstreams", "list"], ["team-with-a-long-identifier"]),
    ):
        monkeypatch.setattr(cli.console, "_width", 60)
        result = runner.invoke(app, [*command, "--data-dir", d])
        lines = result.output.rstrip("\n").splitlines()
        assert lines and all(len(line) <= 60 and line[-1] in "┓┃┩│┘" for line in lines), result.output
        # Each column's text, its folded lines joined: every value is there whole.
        cells = [line.split("│")[1:-1] for line in lines if line.startswith("│")]
        columns = ["".join(cell.strip() for cell in column) for column in zip(*cells, strict=True)]
        for whole in wholes:
            assert any(whole in column for column in columns), columns


def test_counts_in_messages_agree_with_their_number(tmp_path: Path) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text(f"data_dir: {tmp_path}\nupstreams: [{{id: up1, api_key: sk-ant-api03-x}}]\n")
    assert "— 1 upstream, strategy" in run("config", "check", str(config))
    assert cli.counted(0, "gateway key") == "0 gateway keys" and cli.counted(1, "gateway key") == "1 gateway key"


def test_config_check_counts_the_stored_upstreams_serve_serves(tmp_path: Path) -> None:
    """After `upstreams add`, the check said "0 upstreams" (the file's only) while `serve` on the same store
    said "1 upstream" and served it."""
    config = tmp_path / "gw.yaml"
    config.write_text(f"data_dir: {tmp_path}\n")
    run("upstreams", "add", "stored", "--api-key", "sk-ant-api03-stored", "--config", str(config))
    assert f"ok: {config} — 1 upstream (1 stored), strategy" in run("config", "check", str(config))
    # One of the file's id shadows the stored one: the gateway serves the file's, and counts it once.
    config.write_text(f"data_dir: {tmp_path}\nupstreams: [{{id: stored, api_key: k}}, {{id: b, api_key: k}}]\n")
    assert f"ok: {config} — 2 upstreams, strategy" in run("config", "check", str(config))
    # Disabled ones are counted too, and said: "2 upstreams" of which none is served looked fine.
    config.write_text(
        f"data_dir: {tmp_path}\nupstreams: [{{id: a, api_key: k, enabled: false}}, {{id: b, api_key: k}}]\n"
    )
    run("upstreams", "disable", "stored", "--config", str(config))
    assert f"ok: {config} — 3 upstreams (1 stored), 2 disabled, strategy" in run("config", "check", str(config))


def test_a_store_made_when_data_dir_was_the_shells_is_not_replaced_by_an_empty_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Upgrading moved a relative data_dir from the current directory to the file's: the gateway started on a
    new, empty store (every key refused, stored upstreams gone) without a word."""
    home, run_dir = tmp_path / "etc", tmp_path / "run"
    home.mkdir()
    config = home / "gw.yaml"
    config.write_text("upstreams: [{id: up1, api_key: sk-ant-api03-x}]\n")  # the default data_dir
    open_engine(f"sqlite:///{run_dir / 'poolgate-data' / 'poolgate.db'}")  # where it used to be
    monkeypatch.chdir(run_dir)
    refused = " ".join(fails("keys", "list", "--config", str(config)).split())
    assert f"{run_dir / 'poolgate-data'} (from the current directory) holds one" in refused
    assert f"move it to {home / 'poolgate-data'}" in refused and "another configuration's" in refused
    # A mistake in the file comes first: the store's whereabouts are worth nothing for a file that is wrong.
    config.write_text("sever: {port: 1}\nupstreams: [{id: up1, api_key: sk-ant-api03-x}]\n")
    assert "sever" in fails("keys", "list", "--config", str(config))
    config.write_text("upstreams: [{id: up1, api_key: sk-ant-api03-x}]\n")
    # A data directory given on the command line or by the environment is not the file's: nothing to refuse.
    run("keys", "list", "--config", str(config), "--data-dir", "poolgate-data")
    monkeypatch.setenv("POOLGATE__DATA_DIR", "poolgate-data")
    run("keys", "list", "--config", str(config))
    monkeypatch.delenv("POOLGATE__DATA_DIR")
    (run_dir / "poolgate-data").rename(home / "poolgate-data")
    run("keys", "list", "--config", str(config))


def test_a_store_url_with_a_query_is_anchored_and_its_file_private(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`?timeout=30` left the URL cwd-relative, and the store made an empty file named `gw.db?timeout=30`
    private while SQLite created the real one world-readable."""
    home, elsewhere, config = run_elsewhere(tmp_path, monkeypatch, "store: {url: 'sqlite:///gw.db?timeout=30'}\n")
    run("keys", "create", "alice", "--config", str(config), "--raw")
    assert sorted(path.name for path in home.iterdir() if path.name.startswith("gw.db")) == [
        "gw.db",
        "gw.db-shm",
        "gw.db-wal",
    ]
    assert stat.S_IMODE((home / "gw.db").stat().st_mode) == 0o600 and not list(elsewhere.iterdir())


def test_config_check_fails_with_serves_line_on_a_store_serve_cannot_open(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """It said ok (exit 0) for a store `serve` then refused: a damaged or missing master key, a file that is
    not a database (only a warning), an emptied one, damaged pages: a deploy gate passed what could not start."""
    monkeypatch.setattr("poolgate.serve.run", lambda serving: None)  # started, not served
    original = tmp_path / "original"
    run("upstreams", "add", "u1", "--api-key", "sk-ant-api03-x", "--data-dir", str(original))
    key = (original / "master.key").read_bytes()

    def damaged_key(store: Path) -> None:
        (store / "master.key").write_bytes(key[:20])

    def no_key(store: Path) -> None:
        (store / "master.key").unlink()

    def not_a_database(store: Path) -> None:
        (store / "poolgate.db").write_bytes(b"not a database, " * 400)

    def emptied(store: Path) -> None:
        (store / "poolgate.db").write_bytes(b"")

    for damage in (damaged_key, no_key, not_a_database, emptied):
        store = tmp_path / damage.__name__
        store.mkdir(mode=0o700)
        source = sqlite3.connect(original / "poolgate.db")
        source.execute("VACUUM INTO ?", (str(store / "poolgate.db"),))  # the store whole, in one file
        source.close()
        (store / "poolgate.db").chmod(0o600)  # as the store was: its mode is warned of otherwise
        (store / "master.key").write_bytes(key)
        (store / "master.key").chmod(0o600)
        damage(store)
        config = tmp_path / f"{damage.__name__}.yaml"
        config.write_text(f"data_dir: {store}\n")
        checked = one_line_error(fails("config", "check", str(config)))
        assert checked == one_line_error(fails("serve", "--config", str(config), "--port", "0")), damage.__name__
        assert "ok" not in checked


def test_config_check_fails_on_damaged_pages_of_the_store(tmp_path: Path) -> None:
    run("keys", "create", "alice", "--data-dir", str(tmp_path), "--raw")
    add_usage_rows(tmp_path / "poolgate.db")
    config = tmp_path / "gw.yaml"
    config.write_text(f"data_dir: {tmp_path}\n")
    assert "ok:" in run("config", "check", str(config))
    damage_the_middle(tmp_path / "poolgate.db")
    checked = one_line_error(fails("config", "check", str(config)))
    assert checked.startswith(f"error: cannot open the store ({tmp_path}): "), checked


def test_config_check_says_in_one_line_what_damage_it_found(tmp_path: Path) -> None:
    """SQLite's findings for a page whose header is damaged came as lines under a heading ("*** in database
    main ***", "Page N: btreeInitPage() returns error code 11", "Page M is never used" for each page below it):
    the error was a hundred lines, and a deploy gate's log kept the heading alone."""
    run("keys", "create", "alice", "--data-dir", str(tmp_path), "--raw")
    database = tmp_path / "poolgate.db"
    add_usage_rows(database)
    with sqlite3.connect(database) as store:
        (root,) = store.execute("SELECT rootpage FROM sqlite_master WHERE name = 'usage'").fetchone()
        page_size = store.execute("PRAGMA page_size").fetchone()[0]
    with database.open("r+b") as damaged:  # the header of the usage table's first page
        damaged.seek((root - 1) * page_size)
        damaged.write(b"\xff" * 16)
    config = tmp_path / "gw.yaml"
    config.write_text(f"data_dir: {tmp_path}\n")
    checked = one_line_error(fails("config", "check", str(config)))
    assert checked.startswith(
        f"error: cannot open the store ({tmp_path}): its file is damaged: Page {root}: btreeInitPage() returns error"
    ), checked
    assert checked.rstrip().endswith("more)"), checked


def test_config_check_creates_no_master_key(tmp_path: Path) -> None:
    """A store without secrets has no master key yet: the check leaves its making to the gateway."""
    run("keys", "create", "alice", "--data-dir", str(tmp_path), "--raw")
    config = tmp_path / "gw.yaml"
    config.write_text(f"data_dir: {tmp_path}\n")
    assert "ok:" in run("config", "check", str(config))
    assert not (tmp_path / "master.key").exists()


def test_config_check_leaves_the_store_as_it_is(tmp_path: Path) -> None:
    """It migrated a live store's schema (and switched its journal), as a check should not."""
    run("keys", "create", "alice", "--data-dir", str(tmp_path), "--raw")
    store = sqlite3.connect(tmp_path / "poolgate.db")
    store.execute("UPDATE meta SET value = '6' WHERE key = 'schema_version'")
    store.commit()
    store.close()
    config = tmp_path / "gw.yaml"
    config.write_text(f"data_dir: {tmp_path}\nupstreams: [{{id: up1, api_key: sk-ant-api03-x}}]\n")
    run("config", "check", str(config))
    store = sqlite3.connect(tmp_path / "poolgate.db")
    assert store.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == ("6",)
    store.close()


def test_config_check_reads_a_store_from_before_keys_had_limits(tmp_path: Path) -> None:
    """A store of schema v2 has no limits on its keys (the column comes with v3, at the upgrade `serve` runs):
    `config check` failed it with `cannot open the store (…): no such column`, where `serve` starts on it."""
    run("keys", "create", "alice", "--data-dir", str(tmp_path), "--raw")
    store = sqlite3.connect(tmp_path / "poolgate.db")
    store.execute("ALTER TABLE gateway_keys DROP COLUMN settings")
    store.execute("UPDATE meta SET value = '2' WHERE key = 'schema_version'")
    store.commit()
    store.close()
    config = tmp_path / "gw.yaml"
    config.write_text(f"data_dir: {tmp_path}\nupstreams: [{{id: up1, api_key: sk-ant-api03-x}}]\n")
    assert "ok:" in run("config", "check", str(config))


def test_store_paths_are_taken_as_written_whatever_they_hold(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A `file:` URI lost its prefix when anchored (SQLite then made `u.db?mode=rwc` world-readable); a `?`
    or `%` in a data directory's name was read as a URL's query or escape; `~` from the environment made a
    directory named `~`."""
    home, elsewhere, config = run_elsewhere(
        tmp_path, monkeypatch, "store: {url: 'sqlite:///file:u.db?mode=rwc&uri=true'}\n"
    )
    run("keys", "create", "a", "--config", str(config), "--raw")
    assert stat.S_IMODE((home / "u.db").stat().st_mode) == 0o600 and not (home / "u.db?mode=rwc").exists()
    odd = tmp_path / "q?x%41"
    run("keys", "create", "b", "--data-dir", str(odd), "--raw")
    assert (odd / "poolgate.db").exists() and "b" in run("keys", "list", "--data-dir", str(odd))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("POOLGATE__STORE__URL", "sqlite:///~/env.db")
    run("keys", "create", "c", "--config", str(config), "--raw")
    monkeypatch.delenv("POOLGATE__STORE__URL")
    run("keys", "create", "d", "--data-dir", "~/pg", "--raw")
    assert (tmp_path / "home" / "env.db").exists() and (tmp_path / "home" / "pg" / "poolgate.db").exists()
    assert not (elsewhere / "~").exists()


def test_commands_that_change_stored_records_need_a_store_to_change(tmp_path: Path) -> None:
    """`keys revoke x --data-dir typo` made an empty store there and said "no key named 'x'": the operator
    took the key for gone while it still worked."""
    typo = tmp_path / "poolgate-dmeo"
    for change in (
        ["keys", "revoke", "alice"],
        ["keys", "set", "alice", "--budget-usd", "5"],
        ["upstreams", "remove", "team-a"],
        ["upstreams", "disable", "team-a"],
        ["upstreams", "enable", "team-a"],
        ["accounts", "remove", "max-1"],
    ):
        assert "no store in" in fails(*change, "--data-dir", str(typo)), change
    assert not typo.exists()


def test_what_the_cli_prints_is_shown_as_written(tmp_path: Path) -> None:
    """rich read `:100:` as an emoji code (a config error's line number became 💯, a key named `:fire:` a
    picture) and a key name as markup (`[bold]x[/bold]` was confirmed as `x`)."""
    config = tmp_path / "gw.yaml"
    config.write_text("\n" * 99 + "bogus: 1\n")
    assert f"{config}:100:" in fails("config", "check", str(config))
    for name in (":fire:", "[bold]x[/bold]"):
        assert f"created key {name} (" in run("keys", "create", name, "--data-dir", str(tmp_path))
        assert name in run("keys", "list", "--data-dir", str(tmp_path))
    run(
        "upstreams",
        "add",
        "team-a",
        "--api-key",
        "sk-ant-api03-x",
        "--model",
        "claude-[opus]*",
        "--data-dir",
        str(tmp_path),
    )
    assert "claude-[opus]*" in run("upstreams", "list", "--data-dir", str(tmp_path))


def test_keys_set_says_what_it_did(tmp_path: Path) -> None:
    """`keys set` on a revoked key printed its new limits and exited 0, as if the key worked again; with no
    limits given it printed "-", which read as if nothing had changed."""
    run("keys", "create", "dave", "--budget-usd", "5", "--data-dir", str(tmp_path), "--raw")
    assert "dave (key_" in run("keys", "set", "dave", "--budget-usd", "3", "--data-dir", str(tmp_path))
    assert "no limits (any model, no quota, no budget)" in run("keys", "set", "dave", "--data-dir", str(tmp_path))
    run("keys", "revoke", "dave", "--data-dir", str(tmp_path))
    assert "the key 'dave' is revoked" in fails("keys", "set", "dave", "--budget-usd", "3", "--data-dir", str(tmp_path))


def test_a_key_id_names_one_key_whatever_other_keys_are_named(tmp_path: Path) -> None:
    """`keys set` and `keys revoke` take a name or an id, and changed every key matching either: with one key
    named as another's id, revoking that id revoked both callers (and `set` gave both the limits), while
    saying it had changed one. A new key may no longer take a name of an id's form."""
    first = run("keys", "create", "first", "--data-dir", str(tmp_path))
    first_id = re.search(r"\((key_[0-9a-f]{12})\)", first).group(1)  # type: ignore[union-attr]
    assert "is how a key id is written" in fails("keys", "create", first_id, "--data-dir", str(tmp_path))
    run("keys", "create", "second", "--data-dir", str(tmp_path), "--raw")
    with sqlite3.connect(tmp_path / "poolgate.db") as db:  # as an older build let it be named
        db.execute("UPDATE gateway_keys SET name = ? WHERE name = 'second'", (first_id,))
    run("keys", "set", first_id, "--quota", "requests=7/min", "--data-dir", str(tmp_path))
    run("keys", "revoke", first_id, "--data-dir", str(tmp_path))
    rows = {row.name: row for row in repo.list_keys(open_engine(f"sqlite:///{tmp_path / 'poolgate.db'}"))}
    assert rows["first"].revoked_at is not None and "requests=7" in (rows["first"].settings or "")
    assert rows[first_id].revoked_at is None and rows[first_id].settings is None


def test_an_empty_model_list_is_refused_not_taken_for_any_model(tmp_path: Path) -> None:
    """`keys create x --models ''` made a key that may use every model."""
    assert "no model glob given" in fails("keys", "create", "x", "--models", "", "--data-dir", str(tmp_path))
    run("keys", "create", "x", "--models", "claude-haiku-*", "--data-dir", str(tmp_path), "--raw")
    assert "no model glob given" in fails("keys", "set", "x", "--models", " ", "--data-dir", str(tmp_path))


def test_every_command_on_a_store_it_cannot_open_says_so_in_one_line(tmp_path: Path) -> None:
    """Only `serve` said so; every other command showed a page of traceback for a data_dir that is a file,
    a damaged database or a master.key that is a directory."""
    a_file = tmp_path / "afile"
    a_file.write_text("")
    damaged = tmp_path / "damaged"
    damaged.mkdir()
    (damaged / "poolgate.db").write_bytes(b"not a database, " * 400)
    keyless = tmp_path / "keyless"
    run("keys", "create", "alice", "--data-dir", str(keyless), "--raw")
    (keyless / "master.key").mkdir()
    for data_dir, command in (
        (a_file, ["keys", "create", "bob"]),
        (a_file, ["upstreams", "add", "u1", "--api-key", "sk-x"]),
        (damaged, ["keys", "list"]),
        (damaged, ["keys", "revoke", "alice"]),
        (damaged, ["usage"]),
        (damaged, ["route", "last"]),
        (damaged, ["accounts", "list"]),
        (damaged, ["upstreams", "list"]),
        (keyless, ["upstreams", "add", "u2", "--api-key", "sk-x"]),
    ):
        output = fails(*command, "--data-dir", str(data_dir))
        assert output.startswith(f"error: cannot open the store ({data_dir}): "), (command, output)
        assert len(output.strip().splitlines()) == 1, (command, output)
    assert "file is not a database" in fails("keys", "list", "--data-dir", str(damaged))
    assert "Is a directory" in fails("upstreams", "add", "u2", "--api-key", "sk-x", "--data-dir", str(keyless))


def one_line_error(output: str) -> str:
    """The one error line a command printed about its store; never SQL, its parameters or a traceback."""
    assert len(output.strip().splitlines()) == 1, output
    assert "Traceback" not in output and "[SQL" not in output and "parameters" not in output, output
    return output


def test_a_data_dir_that_is_a_file_is_the_same_one_line_for_every_command(tmp_path: Path) -> None:
    """`demo` printed the OSError of the lock file it made there (`[Errno 17] File exists: 'afile'`), `config
    check` said ok for a data directory `serve` then refused, and the commands that read the store printed
    empty tables (or "no store") and exited 0."""
    a_file = tmp_path / "afile"
    a_file.write_text("")
    config = tmp_path / "gw.yaml"
    config.write_text("server: {port: 0}\n")
    for data_dir in (a_file, a_file / "sub"):
        said = {
            one_line_error(fails(*command, "--data-dir", str(data_dir)))
            for command in (
                ["demo", "--port", "0"],
                ["serve", "--port", "0"],
                ["config", "check", str(config)],
                ["keys", "list"],
                ["upstreams", "list"],
                ["accounts", "list"],
                ["usage"],
                ["route", "last"],
            )
        }
        assert said == {f"error: cannot open the store ({data_dir}): {a_file} is a file, not a directory\n"}, said


# Every command that makes a store when there is none, and every one that only reads or changes one.
MAKING_A_STORE = (
    ["demo", "--port", "0"],
    ["serve", "--port", "0"],
    ["keys", "create", "alice"],
    ["upstreams", "add", "u1", "--api-key", "sk-ant-api03-x"],
    ["accounts", "import", "--access-token-env", "TEST_ACCESS_TOKEN"],
    ["accounts", "login"],
)
USING_A_STORE = (
    ["keys", "list"],
    ["keys", "set", "alice"],
    ["keys", "revoke", "alice"],
    ["upstreams", "list"],
    ["upstreams", "remove", "u1"],
    ["upstreams", "disable", "u1"],
    ["upstreams", "enable", "u1"],
    ["usage"],
    ["route", "last"],
    ["route", "explain", "req_1"],
    ["accounts", "list"],
    ["accounts", "remove", "a1"],
)


def test_a_data_dir_that_cannot_be_made_or_read_is_one_line_naming_the_path_and_why() -> None:
    """Every command said the OSError as Python prints it: `[Errno 13] Permission denied: '/srv/x'`, and for a
    directory /proc will not make, a bare `[Errno 2] No such file or directory` of the path it was asked to make."""
    importlib.import_module("poolgate.cli.demo")  # read while it can be (see `unprivileged`)
    env = {"TEST_ACCESS_TOKEN": "sk-ant-oat01-test"}

    def said(data_dir: Path, commands: tuple[list[str], ...]) -> set[str]:
        results = [runner.invoke(app, [*command, "--data-dir", str(data_dir)], env=env) for command in commands]
        assert all(result.exit_code == 1 for result in results), [result.output for result in results]
        return {one_line_error(result.output) for result in results}

    with tempfile.TemporaryDirectory() as directory:
        base = Path(directory)
        base.chmod(0o755)  # the unprivileged user reaches the config file, and the directories below
        config = base / "gw.yaml"
        config.write_text("server: {port: 0}\n")
        read_only, closed = base / "read-only", base / "closed"
        read_only.mkdir(mode=0o555)
        closed.mkdir(mode=0)
        making = (*MAKING_A_STORE, ["config", "check", str(config)])
        in_proc = Path("/proc/poolgate-data")
        assert said(in_proc, making) == {
            f"error: cannot open the store ({in_proc}): {in_proc} cannot be made in /proc (No such file or directory)\n"
        }
        # A symlink loop on the way was a traceback (Python 3.11's RuntimeError, from resolving the store's path).
        loop = base / "loop"
        loop.symlink_to(loop)
        assert said(loop, making + USING_A_STORE) == {
            f"error: cannot open the store ({loop}): {loop / 'poolgate.db'}: Too many levels of symbolic links\n"
        }
        with unprivileged():
            assert said(read_only / "data", making) == {
                f"error: cannot open the store ({read_only / 'data'}): {read_only / 'data'}: Permission denied\n"
            }
            assert said(closed / "data", making + USING_A_STORE) == {
                f"error: cannot open the store ({closed / 'data'}): {closed / 'data'}: Permission denied\n"
            }
        assert list(read_only.iterdir()) == []


def test_the_demo_on_a_damaged_master_key_says_so_in_one_line(tmp_path: Path) -> None:
    """It was a page of traceback ending in SecretBoxError, after the mock upstream had started."""
    run("keys", "create", "alice", "--data-dir", str(tmp_path), "--raw")  # a store (none: the key's is missing)
    (tmp_path / "master.key").write_text("not a key")
    (tmp_path / "master.key").chmod(0o600)
    output = one_line_error(fails("demo", "--port", "0", "--data-dir", str(tmp_path)))
    assert output.startswith(f"error: {tmp_path / 'master.key'} is not a valid master key"), output


def test_a_change_to_a_store_another_process_holds_locked_says_it_is_busy_in_one_line(tmp_path: Path) -> None:
    """The writes ran outside the store's error handling: a page of traceback ending with the INSERT and its
    parameters, the new key's prefix and hash among them."""
    run("keys", "create", "alice", "--data-dir", str(tmp_path), "--raw")
    run("upstreams", "add", "u1", "--api-key", "sk-ant-api03-x", "--data-dir", str(tmp_path))
    holder = sqlite3.connect(tmp_path / "poolgate.db", isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")
        for command in (["keys", "create", "bob"], ["upstreams", "disable", "u1"]):
            output = one_line_error(fails(*command, "--data-dir", str(tmp_path)))
            assert output.startswith(f"error: cannot open the store ({tmp_path}): it is busy: another process"), output
    finally:
        holder.close()
    assert "bob" not in run("keys", "list", "--data-dir", str(tmp_path))


# A process holding a SQLite file (argv[1]) in exclusive locking mode, for argv[2] seconds.
HOLD_EXCLUSIVELY = """
import sqlite3, sys, time
holder = sqlite3.connect(sys.argv[1], isolation_level=None)
holder.execute("PRAGMA locking_mode=EXCLUSIVE")
holder.execute("BEGIN EXCLUSIVE")
holder.execute("INSERT INTO meta VALUES ('held', '1')")
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_a_store_another_process_holds_exclusively_fails_each_command_after_the_busy_timeout(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A process holding the store in SQLite's exclusive locking mode locks its readers out too: every command
    waited a minute (switching the store to WAL, again, as a new store's opening does while another process
    migrates it) before saying "another process has held it locked for over 5 s"."""
    import poolgate.store.db as db

    store = open_engine(db.sqlite_file_url(tmp_path / "poolgate.db"))
    repo.create_key(store, "alice")
    store.dispose()  # closed, as a command that has ended is
    monkeypatch.setattr(db, "BUSY_TIMEOUT_SECONDS", 0.05)
    # Let go of after 10 s, well within the minute: a command still waiting for it then goes on, and succeeds.
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_EXCLUSIVELY, str(tmp_path / "poolgate.db"), "10"], stdout=subprocess.PIPE
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"held\n"
        for command in (["keys", "list"], ["usage"], ["keys", "create", "bob"]):
            output = one_line_error(fails(*command, "--data-dir", str(tmp_path)))
            assert output.startswith(f"error: cannot open the store ({tmp_path}): it is busy: another process"), output
    finally:
        holder.kill()
        holder.wait()
    assert "bob" not in run("keys", "list", "--data-dir", str(tmp_path))


def test_a_change_to_a_read_only_store_is_one_line(tmp_path: Path) -> None:
    run("keys", "create", "alice", "--data-dir", str(tmp_path), "--raw")
    config = tmp_path / "ro.yaml"
    config.write_text(f"store: {{url: 'sqlite:///file:{tmp_path}/poolgate.db?mode=ro&uri=true'}}\n")
    for command in (["keys", "create", "bob"], ["keys", "revoke", "alice"]):
        output = one_line_error(fails(*command, "--config", str(config)))
        assert output.startswith("error: cannot open the store (") and "readonly database" in output, output


def add_usage_rows(database: Path) -> None:
    """A thousand usage rows of 2 KB each, in the database file itself (not only its write-ahead log)."""
    store = sqlite3.connect(database)
    store.executemany(
        "INSERT INTO usage (request_id, started_at, endpoint, stream, status, outcome, input_tokens, output_tokens,"
        " cache_creation_input_tokens, cache_read_input_tokens, duration_ms, attempts, route)"
        " VALUES (?, 0, 'messages', 0, 200, 'ok', 1, 1, 0, 0, 1, 1, ?)",
        [(f"req_{n:06}", "x" * 2000) for n in range(1000)],
    )
    store.commit()
    store.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    store.close()


def damage_the_middle(database: Path) -> None:
    """8 KB overwritten mid-file: usage pages (the keys' and the schema's come first)."""
    size = database.stat().st_size
    with database.open("r+b") as damaged:
        damaged.seek(size // 2)
        damaged.write(b"\xde\xad\xbe\xef" * 2048)


def test_a_report_on_damaged_usage_pages_is_one_line(tmp_path: Path) -> None:
    run("keys", "create", "alice", "--data-dir", str(tmp_path), "--raw")
    add_usage_rows(tmp_path / "poolgate.db")
    damage_the_middle(tmp_path / "poolgate.db")
    assert "alice" in run("keys", "list", "--data-dir", str(tmp_path))
    output = one_line_error(fails("usage", "--data-dir", str(tmp_path)))
    assert output.startswith(f"error: cannot open the store ({tmp_path}): database disk image is malformed"), output


def test_an_emptied_store_file_is_refused_not_made_a_new_empty_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 0-byte poolgate.db (a failed restore, a crash) next to its master.key: `usage` wrote a new schema into
    it and reported no usage, and `serve` started with no keys and no upstreams (every caller a 401)."""
    monkeypatch.setattr("poolgate.serve.run", lambda serving: None)  # started, not served
    original = tmp_path / "original"
    run("upstreams", "add", "u1", "--api-key", "sk-ant-api03-x", "--data-dir", str(original))
    store = tmp_path / "store"  # as a restore that failed leaves it
    store.mkdir(mode=0o700)
    (store / "master.key").write_bytes((original / "master.key").read_bytes())
    (store / "poolgate.db").write_bytes(b"")
    for command in (["usage"], ["keys", "list"], ["accounts", "list"], ["keys", "create", "bob"], ["serve"], ["demo"]):
        listen = ["--port", "0"] if command[0] in ("serve", "demo") else []
        output = one_line_error(fails(*command, "--data-dir", str(store), *listen))
        assert (
            output.startswith(f"error: cannot open the store ({store}): ") and "is empty, next to an existing" in output
        )
    assert (store / "poolgate.db").stat().st_size == 0
    # Without a master key beside it, a command that only reads still refuses it; one that makes a store makes it.
    (store / "master.key").unlink()
    assert "poolgate.db is empty: restore it" in one_line_error(fails("usage", "--data-dir", str(store)))
    assert (store / "poolgate.db").stat().st_size == 0
    assert "listening on" in run("serve", "--data-dir", str(store), "--port", "0")
    assert "listening on" in run("serve", "--data-dir", str(tmp_path / "brand-new"), "--port", "0")


def test_a_store_file_missing_next_to_its_master_key_is_refused_not_made_anew(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """poolgate.db deleted (or a restore that brought back master.key alone): `serve` started a new, empty store
    (no upstreams, no keys: every caller a 401) and `keys list` said nothing was stored yet."""
    monkeypatch.setattr("poolgate.serve.run", lambda serving: None)  # started, not served
    store = tmp_path / "store"
    run("upstreams", "add", "u1", "--api-key", "sk-ant-api03-x", "--data-dir", str(store))
    for lost in ("poolgate.db", "poolgate.db-wal", "poolgate.db-shm"):
        (store / lost).unlink(missing_ok=True)
    config = tmp_path / "gw.yaml"
    config.write_text(f"data_dir: {store}\n")
    commands = (["usage"], ["keys", "list"], ["accounts", "list"], ["keys", "create", "bob"], ["serve"], ["demo"])
    for command in commands:
        listen = ["--port", "0"] if command[0] in ("serve", "demo") else []
        output = one_line_error(fails(*command, "--data-dir", str(store), *listen))
        assert output == (
            f"error: cannot open the store ({store}): {store / 'poolgate.db'} is missing, next to an existing "
            f"{store / 'master.key'}: restore the store from its backup, or remove the key file to start afresh\n"
        ), output
    assert "is missing, next to an existing" in one_line_error(fails("config", "check", str(config)))
    assert not (store / "poolgate.db").exists()
    # Started afresh on purpose: the key file removed, a new store is made.
    (store / "master.key").unlink()
    assert "listening on" in run("serve", "--data-dir", str(store), "--port", "0")
    assert (store / "poolgate.db").exists()


def test_an_empty_listen_address_is_refused_not_every_interface(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`host: ${PGHOST}` with PGHOST empty passed `config check` and `serve` listened on every interface."""
    monkeypatch.setenv("PGHOST_EMPTY", "")
    config = tmp_path / "gw.yaml"
    config.write_text(f"data_dir: {tmp_path}\nserver:\n  host: '${{PGHOST_EMPTY}}'\n  port: 0\n")
    for command in (["config", "check", str(config)], ["serve", "--config", str(config)]):
        output = fails(*command)
        assert f"{config}:3: server.host: String should have at least 1 character" in output, output


def test_an_imported_accounts_id_and_plan_are_shown_as_written(tmp_path: Path) -> None:
    """The id was derived from the credentials file's plan unchecked (markup, an escape sequence and a line
    break in it made an id that `accounts remove` could not be given), and `accounts list` printed the id,
    label and plan raw: the escape sequence recoloured the terminal and the line break forged a row."""
    expires = int((time.time() + 3 * 86400) * 1000)
    plan, email = "[red]max\x1b[31m\r\nfake-row", "a\n[bold]b@c"
    oauth = {"accessToken": "sk-ant-oat01-A", "refreshToken": "sk-ant-ort01-R", "expiresAt": expires}
    credentials = tmp_path / "cred.json"
    credentials.write_text(
        json.dumps({"claudeAiOauth": {**oauth, "subscriptionType": plan, "account": {"email": email}}})
    )
    d = str(tmp_path / "data")
    imported = run("accounts", "import", str(credentials), "--data-dir", d)
    [account_id] = [word for word in imported.split() if word.startswith("claude-")]
    assert re.fullmatch(r"claude-redmax31mfake-row-[0-9a-f]{6}", account_id), imported
    assert "\x1b" not in imported and r"\x1b[31m\x0d\x0afake-row" in imported and "\\[" not in imported
    listing = run("accounts", "list", "--data-dir", d)
    assert "\x1b" not in listing and "\r" not in listing
    assert r"a\x0a[bold]b@c" in listing and r"[red]max\x1b[31m\x0d\x0afake-row" in listing
    assert not any(line.lstrip("│ ").startswith("fake-row") for line in listing.splitlines())
    run("accounts", "remove", account_id, "--data-dir", d)


def test_an_account_left_refreshing_by_a_killed_gateway_shows_how_long_it_has_been(tmp_path: Path) -> None:
    """A gateway killed mid-refresh left `refreshing` in the store, shown as if a refresh were under way (a
    start cannot reset it: with several gateways on the store, it may be another live one's refresh)."""
    expires = int((time.time() + 3 * 86400) * 1000)
    credentials = tmp_path / "cred.json"
    credentials.write_text(
        json.dumps(
            {"claudeAiOauth": {"accessToken": "sk-ant-oat01-A", "refreshToken": "sk-ant-ort01-R", "expiresAt": expires}}
        )
    )
    data = tmp_path / "data"
    run("accounts", "import", str(credentials), "--id", "sub-1", "--data-dir", str(data))
    store = sqlite3.connect(data / "poolgate.db")
    store.execute("UPDATE oauth_accounts SET state = 'refreshing', updated_at = ?", (time.time() - 3 * 3600 - 60,))
    store.commit()
    store.close()
    listing = " ".join(run("accounts", "list", "--data-dir", str(data)).split())
    assert "refreshing for 3h0" in listing, listing
    assert "sub-1 has been `refreshing` for 3h" in listing and "a gateway stopped in the middle" in listing, listing
    [row] = json.loads(run("accounts", "list", "--json", "--data-dir", str(data)).splitlines()[0])
    assert row["state"] == "refreshing" and time.time() - row["state_since"] > 3 * 3600


def test_route_shows_upstream_ids_as_written(capsys: pytest.CaptureFixture[str]) -> None:
    """A stored id may predate the checks on ids: printed raw, its markup was read and its escapes sent."""
    odd = "[red]x\x1b[31m"
    record = route_record(upstream_id=odd, attempts=2)
    route = {
        "stages": [{"name": "model", "kept": [odd], "dropped": {"b": "not_pinned"}, "us": 1.0}],
        "scores": [{"upstream_id": odd, "total": 0.5}],
        "terminal": {"strategy": "round-robin", "chosen": odd, "order": [odd], "sticky": False},
        "failed": [{"upstream_id": odd, "status": 529, "error_type": "overloaded_error", "message": "busy"}],
    }
    print_route({**record, "route": json.dumps(route)})
    out = capsys.readouterr().out
    assert "\x1b" not in out
    assert out.count(r"[red]x\x1b[31m") >= 5, out  # the record, a stage, a score, the choice, the failure


def test_a_master_key_others_can_read_is_warned_of_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A master.key of mode 0644 (copied, restored from a backup) was taken without a word."""
    run("upstreams", "add", "a", "--api-key", "sk-ant-api03-a", "--data-dir", str(tmp_path))
    assert not caplog.records  # made 0600
    (tmp_path / "master.key").chmod(0o644)
    for upstream in ("b", "c"):
        run("upstreams", "add", upstream, "--api-key", "sk-ant-api03-b", "--data-dir", str(tmp_path))
    [warning] = [record.getMessage() for record in caplog.records if "master.key" in record.getMessage()]
    assert f"{tmp_path / 'master.key'} is accessible by group or others (mode 0644)" in warning
    assert f"chmod 600 {tmp_path / 'master.key'}" in warning


@pytest.mark.parametrize(
    "command", [("keys", "create", "x"), ("keys", "list"), ("accounts", "list"), ("accounts", "remove", "a1")]
)
def test_an_empty_data_dir_on_the_command_line_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, command: tuple[str, ...]
) -> None:
    """`--data-dir ''` was the current directory: a store (and the demo's master.key) made wherever the
    command ran, unlike an empty POOLGATE_DATA_DIR or data_dir in the file."""
    monkeypatch.chdir(tmp_path)
    refused = " ".join(fails(*command, "--data-dir", "").replace("│", " ").split())  # out of click's box
    assert "--data-dir" in refused and "must not be empty" in refused
    assert list(tmp_path.iterdir()) == []


def test_an_empty_config_path_is_refused_not_read_as_the_current_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--config ''` (a script's unset variable) was Path(''), the current directory: `cannot read .: Is a
    directory`; a blank POOLGATE_CONFIG was `cannot read    : No such file`. Both are said as the empty
    `--data-dir` is, naming where the value came from."""
    monkeypatch.setenv("POOLGATE_CONFIG", "  ")
    for command in (["keys", "list"], ["config", "check"]):
        said = fails(*command, "--data-dir", str(tmp_path))
        assert said.startswith("error: POOLGATE_CONFIG (for ") and "must not be empty" in said, said


def test_a_config_file_upstream_with_an_empty_model_glob_is_refused(tmp_path: Path) -> None:
    """`models: ['']` (a template's unset variable) passed `config check`: the account served no model, and
    `upstreams list` showed it serving any."""
    config = tmp_path / "gw.yaml"
    config.write_text(f"data_dir: {tmp_path}\nupstreams: [{{id: a, api_key: k, models: ['']}}]\n")
    said = fails("config", "check", str(config))
    assert f"{config}:2: upstreams.0.models.0:" in said, said


def test_an_empty_refresh_token_variable_name_is_not_taken_for_none(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`--refresh-token-env "$NAME"` with NAME unset imported the account without its refresh token (it stops
    serving when the access token expires), as if the option had been left out."""
    monkeypatch.setenv("AT", "sk-ant-oat01-A")
    said = fails(
        "accounts", "import", "--access-token-env", "AT", "--refresh-token-env", "", "--data-dir", str(tmp_path)
    )
    assert "--refresh-token-env must name an environment variable" in said, said
    assert not (tmp_path / "poolgate.db").exists()


def test_config_check_reads_the_store_serve_would_use(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """It ignored POOLGATE_DATA_DIR: "no enabled upstreams" of a store `serve` would not use, while the one it
    would use held an enabled upstream."""
    store = tmp_path / "store"
    run("upstreams", "add", "stored", "--api-key", "sk-ant-api03-stored", "--data-dir", str(store))
    config = tmp_path / "gw.yaml"
    config.write_text("routing: {strategy: first-pick}\n")
    monkeypatch.setenv("POOLGATE_DATA_DIR", str(store))
    checked = run("config", "check", str(config))
    assert f"data in {store}" in checked and "no enabled upstream" not in checked


def test_changing_a_config_file_key_from_the_cli_says_where_to_change_it(tmp_path: Path) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text(f"data_dir: {tmp_path}\nkeys:\n  - {{name: cfgkey, key: pg-config-file-key-0123456789abcdef}}\n")
    run("keys", "create", "stored", "--config", str(config))
    for command in (("keys", "revoke", "cfgkey"), ("keys", "set", "static:cfgkey")):
        refused = " ".join(fails(*command, "--config", str(config)).split())
        assert "defined in the config file: change it there" in refused


def test_removing_a_config_file_subscription_account_says_where_to_change_it(tmp_path: Path) -> None:
    """`accounts remove cc-setup` said only "no stored subscription account", while `upstreams remove` says it
    is the config file's."""
    config = tmp_path / "gw.yaml"
    config.write_text(
        f"data_dir: {tmp_path}\nupstreams:\n"
        "  - {id: cc-setup, kind: anthropic_oauth, api_key: sk-ant-oat01-config-file-token}\n"
    )
    run("keys", "create", "someone", "--config", str(config))  # a store there
    refused = " ".join(fails("accounts", "remove", "cc-setup", "--config", str(config)).split())
    assert "defined in the config file: change it there" in refused


@pytest.mark.parametrize(
    "command",
    [
        ("keys", "revoke", "cfgkey"),
        ("keys", "set", "static:cfgkey"),
        ("upstreams", "remove", "cfgup"),
        ("upstreams", "disable", "cfgup"),
        ("accounts", "remove", "cc-setup"),
    ],
)
def test_changing_what_the_config_file_defines_says_where_before_any_store_exists(
    tmp_path: Path, command: tuple[str, ...]
) -> None:
    """With nothing stored yet (a config-only setup), these said "no store in DIR: … check --data-dir, --config",
    sending the operator after a data directory that was right, not to the file."""
    config = tmp_path / "gw.yaml"
    config.write_text(
        f"data_dir: {tmp_path / 'data'}\nkeys:\n  - {{name: cfgkey, key: pg-config-file-key-0123456789abcdef}}\n"
        "upstreams:\n  - {id: cfgup, api_key: sk-ant-api03-config-file-key}\n"
        "  - {id: cc-setup, kind: anthropic_oauth, api_key: sk-ant-oat01-config-file-token}\n"
    )
    refused = " ".join(fails(*command, "--config", str(config)).split())
    assert f"'{command[-1]}' is defined in the config file: change it there" in refused
    assert "no store in" not in refused
    assert not (tmp_path / "data").exists()
    # Something the file does not define is still a data directory to check.
    assert "no store in" in fails(*command[:-1], "other", "--config", str(config))


@pytest.mark.parametrize("command", ["config-check", "serve"])
def test_a_yaml_tag_that_does_not_fit_its_value_is_one_line_without_the_value(tmp_path: Path, command: str) -> None:
    """`token: !!int sk-ant-…` ended `config check` and `serve` with a ValueError traceback quoting the key."""
    config = tmp_path / "gw.yaml"
    config.write_text("admin:\n  token: !!int sk-ant-api03-TaggedSecret\n")
    args = ["config", "check", str(config)] if command == "config-check" else ["serve", "--config", str(config)]
    output = fails(*args, "--data-dir", str(tmp_path / "data"))
    assert output.splitlines() == [
        f"error: {config}:2: not valid YAML: the value is not a valid int (its YAML tag, or its form, says it is one)"
    ]
    assert "TaggedSecret" not in output


def test_config_check_without_a_store_refuses_what_serve_would_refuse_making_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With no store yet the check passed an invalid POOLGATE_MASTER_KEY and a data directory that cannot be
    made, and `serve` then refused to start."""
    config = tmp_path / "gw.yaml"
    config.write_text("upstreams: [{id: a, api_key: sk-ant-api03-x}]\n")
    data = tmp_path / "data"
    monkeypatch.setenv("POOLGATE_MASTER_KEY", "not-a-fernet-key")
    assert "error: POOLGATE_MASTER_KEY is not a valid key" in fails(
        "config", "check", str(config), "--data-dir", str(data)
    )
    assert not data.exists()  # checked without making a store or a key file
    monkeypatch.delenv("POOLGATE_MASTER_KEY")
    (tmp_path / "a-file").write_text("")
    under_a_file = tmp_path / "a-file" / "data"
    output = fails("config", "check", str(config), "--data-dir", str(under_a_file))
    assert f"error: cannot open the store ({under_a_file}): {tmp_path / 'a-file'} is a file, not a directory" in output
    # /proc takes no directory from anyone, root included (as the tests may run).
    output = fails("config", "check", str(config), "--data-dir", "/proc/poolgate-data")
    assert "error: cannot open the store (/proc/poolgate-data): /proc/poolgate-data cannot be made in /proc" in output
    # A directory that can be made passes, and is not made by the check.
    assert "ok:" in run("config", "check", str(config), "--data-dir", str(data))
    assert not data.exists()


@pytest.mark.parametrize(
    ("source", "error"),
    [("public_key_file", "not a PEM public key or certificate"), ("jwks_file", "not a usable JWKS")],
)
def test_config_check_reads_a_jwt_key_file_as_serve_does(tmp_path: Path, source: str, error: str) -> None:
    """A key file that exists but holds no key passed the check (it looked only for the file); `serve` refused."""
    (tmp_path / "key").write_text("not a key\n")
    config = tmp_path / "gw.yaml"
    config.write_text(
        "callers:\n  jwt_issuers:\n"
        f"    - {{name: sso, issuer: https://sso.example, audience: pg, algorithms: [RS256], {source}: key}}\n"
    )
    output = fails("config", "check", str(config), "--data-dir", str(tmp_path / "data"))
    assert f"error: callers.jwt_issuers[sso].{source} {tmp_path / 'key'}: {error}" in output


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("https://", "must name a host"),
        ("http://ho st:1", "must not hold whitespace"),
        ("http://127.0.0.1:99999", "has a port that is not a number from 1 to 65535"),
        ("http://127.0.0.1:0", "has a port that is not a number from 1 to 65535"),
        ("http://127.0.0.1:9/?x=1", "must not hold a query (?…) or a fragment (#…)"),
        ("http://127.0.0.1:9#frag", "must not hold a query (?…) or a fragment (#…)"),
    ],
)
def test_a_base_url_requests_cannot_reach_is_refused_naming_the_field(tmp_path: Path, url: str, reason: str) -> None:
    """Each passed `config check` and `upstreams add`; the upstream was then answered 529 without a word in the
    log, or asked on a path that is not the API's."""
    config = tmp_path / "gw.yaml"
    config.write_text(f'upstreams: [{{id: a, base_url: "{url}", api_key: sk-ant-api03-x}}]\n')
    output = fails("config", "check", str(config), "--data-dir", str(tmp_path / "data"))
    assert f"{config}:1: upstreams.0.base_url: {reason}" in output
    d = str(tmp_path / "data")
    assert f"--base-url {reason}" in fails(
        "upstreams", "add", "b", "--api-key", "sk-ant-api03-x", "--base-url", url, "--data-dir", d
    )
    assert not (tmp_path / "data").exists()


def test_a_blank_listen_address_or_data_dir_is_refused(tmp_path: Path) -> None:
    """`host: " "` passed the check and `serve` could not listen; `data_dir: "  "` made a directory so named."""
    config = tmp_path / "gw.yaml"
    config.write_text(f"data_dir: {tmp_path / 'data'}\nserver: {{host: ' '}}\n")
    assert f"{config}:2: server.host: must be an address or host name, without whitespace" in fails(
        "config", "check", str(config)
    )
    config.write_text("data_dir: '  '\n")
    assert f"{config}:1: data_dir: must not be empty" in fails("config", "check", str(config))
    assert not (tmp_path / "  ").exists()


def test_config_check_calls_a_misspelt_field_unknown_and_names_the_one_it_likely_means(tmp_path: Path) -> None:
    """A newcomer's typo got pydantic's "Extra inputs are not permitted", and a check of poolgate's own came
    after pydantic's "Value error, "."""
    config = tmp_path / "gw.yaml"
    config.write_text(f"data_dir: {tmp_path / 'data'}\nserver:\n  prot: 9000\n")
    result = runner.invoke(app, ["config", "check", str(config)], catch_exceptions=False)
    assert result.exit_code == 1
    assert (
        result.output
        == f"error: invalid configuration: {config}:3: server.prot: unknown field (did you mean 'port'?)\n"
    )
    d = str(tmp_path / "data")
    url = "https://api.anthropic.com/v1"
    said = fails("upstreams", "add", "b", "--api-key", "sk-ant-api03-x", "--base-url", url, "--data-dir", d)
    assert said.startswith("error: --base-url must not end in /v1") and "Value error" not in said


def test_a_price_file_error_is_one_line_naming_the_fields(tmp_path: Path) -> None:
    """It was pydantic's dump: a line per field with the input quoted whole and a link per error."""
    (tmp_path / "prices.json").write_text('{"version": "x", "prices": [{"ids": ["m"], "input": "abc"}]}')
    config = tmp_path / "gw.yaml"
    config.write_text("billing: {price_file: prices.json}\n")
    output = fails("config", "check", str(config), "--data-dir", str(tmp_path / "data"))
    assert output.splitlines() == [
        f"error: invalid configuration: {config}:1: billing.price_file: {tmp_path / 'prices.json'}: "
        "invalid price file: as_of: Field required; prices.0.input: Input should be a valid decimal"
    ]


@pytest.mark.parametrize(
    ("stored", "said"),
    [
        ("99", "it was migrated by a newer poolgate (schema v99; this build knows up to v"),
        ("7a", "its schema version '7a' is not a number"),
    ],
)
def test_a_store_of_an_unknown_schema_is_refused_in_one_line_by_every_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stored: str, said: str
) -> None:
    """A newer build's store was opened without a word (older builds then ignored every key's limits), and a
    schema version that is not a number was a ValueError's traceback: a downgrade is not supported."""
    monkeypatch.setattr("poolgate.serve.run", lambda serving: None)  # started, not served
    run("keys", "create", "alice", "--data-dir", str(tmp_path), "--raw")
    store = sqlite3.connect(tmp_path / "poolgate.db")
    store.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (stored,))
    store.commit()
    store.close()
    config = tmp_path / "gw.yaml"
    config.write_text(f"data_dir: {tmp_path}\n")
    for command in (["keys", "list", "-c"], ["usage", "-c"], ["serve", "--port", "0", "-c"], ["config", "check"]):
        output = one_line_error(fails(*command, str(config)))
        assert output.startswith(f"error: cannot open the store ({tmp_path}): {said}"), output


def test_serve_logs_the_migration_an_upgrade_makes_and_other_commands_print_nothing_of_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An upgrade changed the store's schema, one way (see the refusal of a newer store), with nothing said."""
    monkeypatch.setattr("poolgate.serve.run", lambda serving: None)  # started, not served
    run("keys", "create", "alice", "--data-dir", str(tmp_path), "--raw")
    older = len(MIGRATIONS) - 1

    def make_it_older() -> None:
        store = sqlite3.connect(tmp_path / "poolgate.db")
        store.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(older),))
        store.commit()
        store.close()

    make_it_older()
    assert "migrated" not in run("keys", "list", "--data-dir", str(tmp_path))
    make_it_older()
    served = run("serve", "--data-dir", str(tmp_path), "--port", "0")
    assert f"migrated the store from schema v{older} to v{len(MIGRATIONS)}" in served, served
    assert "migrated" not in run("serve", "--data-dir", str(tmp_path), "--port", "0")


def test_a_stored_key_whose_limits_the_gateway_cannot_read_is_shown_unusable_and_warned_of(tmp_path: Path) -> None:
    """Older builds stored limits this one refuses (`requests=0/min`): the gateway answers every request with
    the key 401 "unusable", while `keys list` showed it active and `config check` said ok."""
    run("keys", "create", "ops", "--data-dir", str(tmp_path), "--raw", "--quota", "requests=5/min")
    run("keys", "create", "fine", "--data-dir", str(tmp_path), "--raw", "--quota", "requests=5/min")
    store = sqlite3.connect(tmp_path / "poolgate.db")
    store.execute("""UPDATE gateway_keys SET settings = '{"quotas": ["requests=0/min"]}' WHERE name = 'ops'""")
    store.commit()
    store.close()
    rows = [line.split("│")[1:-1] for line in run("keys", "list", "--data-dir", str(tmp_path)).splitlines()]
    state = {cells[1].strip(): cells[4].strip() for cells in rows if cells}
    assert state["ops"].startswith("unusable: quota requests: limit must be a whole number"), state
    assert state["fine"] == "active", state
    config = tmp_path / "gw.yaml"
    config.write_text(f"data_dir: {tmp_path}\nupstreams: [{{id: up1, api_key: sk-ant-api03-x}}]\n")
    checked = run("config", "check", str(config))  # exit 0: the gateway serves every other caller
    warnings = [line for line in checked.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: stored key ops (key_"), checked
    assert "is unusable, every request with it a 401" in warnings[0] and "poolgate keys set key_" in warnings[0]


def test_a_store_others_can_read_is_warned_of_once(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Older builds made poolgate.db 0644, which an upgrade kept without a word: the store holds the gateway
    keys' hashes, the usage records and the encrypted secrets. (A directory others may enter is no warning:
    what it lets them reach is the files, as their own modes allow.)"""
    data = tmp_path / "data"
    run("keys", "create", "alice", "--data-dir", str(data), "--raw")
    assert not caplog.records  # made 0700 and 0600
    data.chmod(0o755)
    (data / "poolgate.db").chmod(0o644)
    for _ in range(2):
        run("keys", "list", "--data-dir", str(data))
    # SQLite gives -wal and -shm the database file's mode: they are warned of too when they outlive a command
    # (a connection the garbage collector has not closed yet keeps them), once each as well.
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == len(set(messages)), messages
    warnings = [message for message in messages if message.startswith(f"{data / 'poolgate.db'} ")]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"{data / 'poolgate.db'} is accessible by group or others (mode 0644)")
    assert warnings[0].endswith(f"run `chmod 600 {data / 'poolgate.db'}`")
    assert (data / "poolgate.db").stat().st_mode & 0o777 == 0o644  # warned of, not changed
