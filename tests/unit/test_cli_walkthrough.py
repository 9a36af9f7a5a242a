"""The README walkthrough's rough edges, run through the real CLI: mistakes are refused with one clear line
and a non-zero exit, never silently done (or not done)."""

from __future__ import annotations

import shlex
import socket
from collections.abc import Mapping
from pathlib import Path

import pytest
from msgspec.structs import astuple
from typer.testing import CliRunner, Result

from poolgate.cli import demo
from poolgate.cli import main as cli
from poolgate.cli.demo import DemoRun, instructions
from poolgate.cli.main import app
from poolgate.store import repo
from poolgate.store.db import migrate, open_engine
from poolgate.store.usage import RECORD_FIELDS
from poolgate.store.writer_process import insert_rows
from tests.unit.test_ledger_store import record

runner = CliRunner()


def invoke(*args: str, env: Mapping[str, str | None] | None = None, input: str | None = None) -> Result:
    return runner.invoke(app, list(args), env=env, input=input, catch_exceptions=False)


def refused(*args: str, env: Mapping[str, str | None] | None = None) -> str:
    """The error of a refused command: exit 1, no traceback, one line however long."""
    result = invoke(*args, env=env)
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output
    assert result.output.startswith("error: ") and result.output.count("\n") == 1, result.output
    return result.output.strip()


@pytest.mark.parametrize(
    ("text", "env", "says"),
    [
        (
            "server:\n  port: 8080\nupstreams:\n  - id: a\n    api_key: ${WALKTHROUGH_UNSET}\n",
            {},
            "gw.yaml:5: upstreams.0.api_key: environment variable WALKTHROUGH_UNSET is not set",
        ),
        ("server:\n  port: 8080\n  host: a: b\n", {}, "gw.yaml:3: not valid YAML: mapping values are not allowed"),
        (
            "server:\n  port: 8080\n",
            {"POOLGATE__SERVER__PORT": "abc"},
            "invalid configuration: environment variable POOLGATE__SERVER__PORT: server.port: Input should be",
        ),
    ],
)
def test_config_errors_say_where_they_come_from_in_one_line(
    tmp_path: Path, text: str, env: dict[str, str], says: str
) -> None:
    config = tmp_path / "gw.yaml"
    config.write_text(text)
    for command in (["config", "check", str(config)], ["serve", "--config", str(config), "--port", "0"]):
        error = refused(*command, env=env)
        assert says in error
        if "POOLGATE__" in says:
            assert "gw.yaml" not in error


def test_config_check_defaults_to_poolgate_config(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # not where README's walkthrough left a ./poolgate-data
    config = tmp_path / "g.yaml"
    config.write_text("routing:\n  strategy: random\n")
    result = invoke("config", "check", env={"POOLGATE_CONFIG": str(config)})
    assert result.exit_code == 0 and "ok" in result.output and "g.yaml" in result.output
    error = refused("config", "check", env={"POOLGATE_CONFIG": None})
    assert "poolgate config check FILE" in error and "POOLGATE_CONFIG" in error


def test_upstreams_add_refuses_an_id_the_config_file_defines_and_list_marks_a_shadowed_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli.console, "width", 200)  # one line per table row
    config = tmp_path / "g.yaml"
    config.write_text("upstreams:\n  - {id: team-a, api_key: sk-ant-api03-from-the-file}\n")
    d = str(tmp_path / "data")
    # Refused before the API key is asked for: no secret typed in vain.
    error = refused("upstreams", "add", "team-a", "--config", str(config), "--data-dir", d)
    assert "team-a" in error and "(it is defined in the config file: change it there)" in error
    # A shadow stored before the config file named team-a (or without --config) is shown as such.
    assert invoke("upstreams", "add", "team-a", "--api-key", "sk-x", "--data-dir", d).exit_code == 0
    assert invoke("upstreams", "add", "team-b", "--data-dir", d, input="sk-y\n").exit_code == 0
    listing = invoke("upstreams", "list", "--config", str(config), "--data-dir", d).output
    cells = [line.split("│") for line in listing.splitlines() if line.startswith("│")]
    rows = {f"{cell[1].strip()}/{cell[7].strip()}" for cell in cells}
    assert rows == {"team-a/config file", "team-a/store (shadowed)", "team-b/store"}, listing
    note = " ".join(listing.split())
    assert "stored upstream team-a is shadowed by the config file's team-a: it is not served" in note
    # Disabling (or enabling) it changed the shadow and said "disabled" of an account that went on serving.
    for action, enabled in (("disable", "false"), ("enable", "true")):
        error = refused("upstreams", action, "team-a", "--config", str(config), "--data-dir", d)
        assert "'team-a' is defined in the config file: change it there" in error and f"`enabled: {enabled}`" in error
    assert repo.list_upstreams(open_engine(f"sqlite:///{Path(d) / 'poolgate.db'}"))[0].upstream.enabled
    # Removing the shadow is tidying up, said as such.
    removed = invoke("upstreams", "remove", "team-a", "--config", str(config), "--data-dir", d)
    assert removed.exit_code == 0 and "the config file's team-a is still served" in " ".join(removed.output.split())


def test_upstreams_add_checks_the_id_and_base_url_before_it_reads_the_key_and_names_where_the_key_came_from(
    tmp_path: Path,
) -> None:
    d = str(tmp_path)
    for args, says in (
        (("bad id",), "ID may hold only letters"),
        (("okid", "--base-url", "ftp://x"), "--base-url must start with http:// or https://"),
    ):
        result = invoke("upstreams", "add", *args, "--data-dir", d, input="sk-ant-api03-typed-in-vain\n")
        assert result.exit_code == 1 and says in result.output, result.output
        assert "reading the API key" not in result.output  # refused before it was asked for
    bad_key = "sk-ant-api03-abc\x01def"
    from_stdin = invoke("upstreams", "add", "tq", "--data-dir", d, input=bad_key + "\n").output
    assert "the API key read from standard input" in from_stdin and "--api-key" not in from_stdin, from_stdin
    from_env = invoke("upstreams", "add", "tq", "--data-dir", d, env={"POOLGATE_UPSTREAM_API_KEY": bad_key}).output
    assert "POOLGATE_UPSTREAM_API_KEY" in from_env and "--api-key" not in from_env, from_env


def test_keys_create_and_set_refuse_a_blank_name_and_a_budget_range_or_scope_without_a_budget(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli.console, "width", 200)  # one line per table row
    d = str(tmp_path)
    for blank in ("", "  "):
        assert "a key needs a name" in refused("keys", "create", blank, "--data-dir", d)
    for command in ("create", "set"):
        for option, value in (("--budget-range", "daily"), ("--budget-scope", "per_session")):
            error = refused("keys", command, "dave", option, value, "--data-dir", d)
            assert "--budget-range and --budget-scope need --budget-usd" in error
    assert not (tmp_path / "poolgate.db").exists()  # refused before anything was stored
    created = invoke("keys", "create", "dave", "--budget-usd", "5", "--budget-range", "daily", "--data-dir", d)
    assert created.exit_code == 0
    assert "$5.00 daily per-account" in invoke("keys", "list", "--data-dir", d).output


def test_usage_refuses_a_since_later_than_its_until(tmp_path: Path) -> None:
    d = str(tmp_path)
    error = refused("usage", "--since", "2026-12-01", "--until", "2026-11-01", "--data-dir", d)
    assert "--since (2026-12-01T00:00:00Z) must be before --until (2026-11-01T00:00:00Z)" in error
    assert "must be before" in refused("usage", "--since", "1d", "--until", "2d", "--data-dir", d)
    assert invoke("keys", "create", "erin", "--data-dir", d).exit_code == 0  # a store to report on
    assert invoke("usage", "--since", "2026-11-01", "--until", "2026-12-01", "--data-dir", d).exit_code == 0


def test_usage_refuses_a_time_outside_the_years_1_to_9999_in_one_line(tmp_path: Path) -> None:
    """A span reaching before year 1 crashed the "must be before" message with a traceback, and one too long
    for a float printed `"since": -Infinity`, which is not JSON."""
    d = str(tmp_path)
    for option, value in (("--until", "99999999999999w"), ("--since", "9" * 400 + "w")):
        error = refused("usage", "--since", "1h", option, value, "--format", "json", "--data-dir", d)
        assert f"{value!r} is out of range" in error
    assert "is out of range" in refused("usage", "--until", "0001-01-01T00:00+01:00", "--data-dir", d)
    # Years before 1000 in four digits, as RFC 3339 writes them.
    error = refused("usage", "--since", "1h", "--until", "0001-01-01", "--data-dir", d)
    assert "must be before --until (0001-01-01T00:00:00Z)" in error
    # The old spelling `--since-hours H` is checked as `--since {H}h` is (inf printed `"since": -Infinity`).
    error = refused("usage", "--since-hours", "inf", "--format", "json", "--data-dir", d)
    assert "--since-hours: 'infh' is not a time" in error
    # Given with `--since`, one of them was ignored.
    error = refused("usage", "--since-hours", "2", "--since", "1h", "--data-dir", d)
    assert "--since-hours is the old spelling of --since: give one of them" in error


def test_a_usage_time_that_is_no_time_is_refused_naming_its_option(tmp_path: Path) -> None:
    """With both --since and --until given, "'x' is not a time" left the reader to guess which."""
    d = str(tmp_path)
    assert "--since: 'yesterdayish' is not a time" in refused("usage", "--since", "yesterdayish", "--data-dir", d)
    error = refused("usage", "--since", "1d", "--until", "2026-13-01", "--data-dir", d)
    assert "--until: '2026-13-01' is not a time" in error


def test_usage_takes_times_up_to_the_last_whole_second_of_9999_and_no_fraction_of_it(tmp_path: Path) -> None:
    """README: a time after 9999-12-31T23:59:59 is refused, its fractions included; `23:59:59.5` was taken (only
    the last ~15 µs, which a float reads as the year 10000, were refused)."""
    d = str(tmp_path)
    assert invoke("keys", "create", "erin", "--data-dir", d).exit_code == 0  # a store to report on
    for fraction in ("9999-12-31T23:59:59.5", "9999-12-31T23:59:59.000001"):
        error = refused("usage", "--since", "1h", "--until", fraction, "--data-dir", d)
        assert f"{fraction!r} is out of range" in error
    assert invoke("usage", "--since", "1h", "--until", "9999-12-31T23:59:59", "--data-dir", d).exit_code == 0


def test_the_demo_does_not_start_on_a_store_holding_real_upstreams(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def started(main: object) -> None:
        raise AssertionError("the demo started serving")  # instead of serving here until killed

    monkeypatch.setattr(demo, "run", started)
    d = str(tmp_path / "demo")
    assert invoke("upstreams", "add", "paid", "--api-key", "sk-ant-api03-real", "--data-dir", d).exit_code == 0
    error = refused("demo", "--data-dir", d, "--port", "0")
    assert f"{d} holds stored upstreams (paid)" in error and "the demo serves only its mock" in error


def test_the_demo_does_not_start_on_a_real_gateways_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real gateway with its upstreams in its config file stores none: the demo started on its store,
    and the demo's key opened the real gateway (and real accounts), its keys the demo, and demo traffic
    went into its ledger. A store with keys or traffic other than the demo's is not the demo's."""

    def started(main: object) -> None:
        raise AssertionError("the demo started serving")

    monkeypatch.setattr(demo, "run", started)
    keyed = str(tmp_path / "keyed")
    assert invoke("keys", "create", "alice", "--data-dir", keyed).exit_code == 0
    assert "is not a demo store (it holds gateway keys (alice)" in refused("demo", "--data-dir", keyed, "--port", "0")
    served = tmp_path / "served"
    engine = open_engine(f"sqlite:///{served / 'poolgate.db'}")
    migrate(engine)
    insert_rows(engine, RECORD_FIELDS, [astuple(record("req_real", 1.0, 10, upstream_id="team-a"))])
    assert "holds usage records of a real gateway" in refused("demo", "--data-dir", str(served), "--port", "0")
    # The demo's own store, as a demo run leaves it, is taken again.
    own = tmp_path / "own"
    engine = open_engine(f"sqlite:///{own / 'poolgate.db'}")
    migrate(engine)
    repo.create_key(engine, "demo-20261203-120000")
    insert_rows(engine, RECORD_FIELDS, [astuple(record("req_demo", 1.0, 10, upstream_id="mock-1"))])
    with pytest.raises(AssertionError, match="the demo started serving"):
        invoke("demo", "--data-dir", str(own), "--port", "0")


@pytest.mark.parametrize("option", ["--port", "--mock-port"])
def test_a_demo_port_in_use_names_the_option_that_frees_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, option: str
) -> None:
    """The mock's port taken (`--mock-port 9000`, a mock-upstream already there) said "try --port 0", which
    left the mock's port as it was: the same error again."""

    def started(main: object) -> None:
        raise AssertionError("the demo started serving")

    monkeypatch.setattr(demo, "run", started)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        ports = {"--port": "0", "--mock-port": "0", option: port}
        error = refused(
            "demo", "--data-dir", str(tmp_path / "demo"), *(part for pair in ports.items() for part in pair)
        )
    assert (
        error == f"error: cannot listen on 127.0.0.1:{port}: Address already in use (try {option} 0 for any free port)"
    )


DEMO_RUN = DemoRun("http://gw", "pg-k", "admin-token", "http://mock", ("key-1", "key-2"), Path("poolgate-demo"))


def test_the_demo_shows_the_sdk_for_this_python_and_how_to_install_it() -> None:
    python = "/opt/my venv/bin/python"
    shown = instructions(DEMO_RUN, python, sdk_installed=True)
    assert f'  {shlex.quote(python)} -c "import anthropic;' in shown and "pip install" not in shown
    missing = instructions(DEMO_RUN, python, False)
    install = f"  {shlex.quote(python)} -m pip install anthropic\n"
    assert install in missing and missing.index(install) < missing.index("import anthropic")


def test_the_demo_names_poolgate_by_its_path_when_it_is_not_on_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After the README's install into .venv, the demo's `poolgate usage …` line was "command not found"; and
    its data directory was relative: the line worked only in the directory the demo was started in."""
    bin_dir = tmp_path / "venv dir" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "poolgate").write_text("#!/bin/sh\n")
    (bin_dir / "poolgate").chmod(0o755)
    python = str(bin_dir / "python")
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    monkeypatch.chdir(tmp_path)
    data = shlex.quote(str(tmp_path / "poolgate-demo"))
    shown = instructions(DEMO_RUN, python, True)
    assert f"Usage so far: {shlex.quote(str(bin_dir / 'poolgate'))} usage --data-dir {data}" in shown
    monkeypatch.setenv("PATH", f"{bin_dir}:/usr/bin:/bin")
    shown = instructions(DEMO_RUN, python, True)
    assert f"Usage so far: poolgate usage --data-dir {data}" in shown


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["u1", "--api-key", ""], "error: --api-key must not be empty"),
        (["u1", "--api-key", "   "], "error: --api-key must not be empty"),
        (["", "--api-key", "sk-x"], "error: ID must not be empty"),
        (["u" * 65, "--api-key", "sk-x"], "error: ID must be at most 64 characters long"),
        (["u 1", "--api-key", "sk-x"], "error: ID may hold only letters, digits and _ . : -"),
        (["u1", "--api-key", "sk-x", "--base-url", "ftp://x"], "error: --base-url must start with http:// or https://"),
    ],
)
def test_upstreams_add_names_the_option_a_refused_value_came_from(tmp_path: Path, args: list[str], says: str) -> None:
    """It said the model's field in pydantic's words: `api_key: String should have at least 1 character`."""
    assert refused("upstreams", "add", *args, "--data-dir", str(tmp_path)) == says
    assert not (tmp_path / "poolgate.db").exists()


@pytest.mark.parametrize(
    ("limits", "says"),
    [
        (["--budget-usd", "x"], "error: --budget-usd: 'x' is not an amount in USD"),
        (["--budget-usd", "-1"], "error: --budget-usd: must be a finite amount ≥ 0"),
        (["--budget-usd", "1", "--budget-range", "hourly"], "error: --budget-range: 'hourly' is not one of"),
        (["--budget-usd", "1", "--budget-scope", "team"], "error: --budget-scope: 'team' is not one of"),
        (["--models", ""], "error: --models: no model glob given"),
        (["--quota", "foo"], "error: --quota 'foo': expected METRIC=LIMIT/WINDOW"),
        (["--quota", "requests=1/min", "--quota", "requests=2/min"], "error: --quota: the same metric and window"),
    ],
)
def test_keys_create_and_set_name_the_option_a_refused_limit_came_from(
    tmp_path: Path, limits: list[str], says: str
) -> None:
    """They said the claim's name, as a JWT or the config file spells it (`budget_usd: …`), not the option."""
    for command in ("create", "set"):
        assert refused("keys", command, "dave", *limits, "--data-dir", str(tmp_path)).startswith(says)
    assert not (tmp_path / "poolgate.db").exists()


def test_accounts_import_says_an_empty_file_or_standard_input_is_empty_and_an_unusable_expires_in(
    tmp_path: Path,
) -> None:
    """`/dev/null is not JSON` and `- is not JSON` for an empty pipe; `--expires-in inf` was refused as the token
    document's `expires_in: expected seconds, got inf`."""
    d = str(tmp_path / "data")
    empty = tmp_path / "empty.json"
    empty.write_text("")
    assert refused("accounts", "import", str(empty), "--data-dir", d) == f"error: {empty} is empty"
    piped = invoke("accounts", "import", "-", "--data-dir", d, input="")
    assert piped.exit_code == 1 and piped.output == "error: standard input is empty\n", piped.output
    piped = invoke("accounts", "import", "-", "--data-dir", d, input="not json\n")
    assert piped.exit_code == 1 and piped.output == "error: standard input is not JSON\n", piped.output
    # Past a token's lifetime too: it was said as the token document's field (`no usable tokens: expires_in: …`).
    for seconds in ("inf", "nan", "1e300"):
        said = refused(
            "accounts",
            "import",
            "--access-token-env",
            "AT",
            "--expires-in",
            seconds,
            "--data-dir",
            d,
            env={"AT": "sk-ant-oat01-x"},
        )
        assert said == "error: --expires-in must be a number of seconds, at most five years (a token's lifetime)"
    assert not (tmp_path / "data").exists()


def test_a_bad_value_from_the_environment_names_the_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A blank POOLGATE_DATA_DIR was refused as `--data-dir must not be empty`, an option nobody had typed."""
    monkeypatch.chdir(tmp_path)
    said = refused("keys", "list", env={"POOLGATE_DATA_DIR": "  "})
    assert said.startswith("error: POOLGATE_DATA_DIR (for --data-dir) must not be empty"), said
    assert refused("keys", "list", "--data-dir", " ").startswith("error: --data-dir must not be empty")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    ("section", "field"),
    [
        ("billing: {{price_file: {path}}}", "billing.price_file"),
        (
            "callers: {{jwt_issuers: [{{name: sso, issuer: x, audience: a, algorithms: [RS256], jwks_file: {path}}}]}}",
            "callers.jwt_issuers.0",
        ),
    ],
)
def test_a_file_setting_naming_a_directory_says_it_is_one(tmp_path: Path, section: str, field: str) -> None:
    """It said `no such file` of a directory that was there, as of a path that was not."""
    config = tmp_path / "gw.yaml"
    for path, says in ((tmp_path, "a directory, not a file"), (tmp_path / "none.json", "no such file")):
        config.write_text(section.format(path=path) + "\n")
        said = refused("config", "check", str(config), "--data-dir", str(tmp_path / "data"))
        assert said == f"error: invalid configuration: {config}:1: {field}: {path}: {says}"


@pytest.mark.parametrize(
    ("command", "argument"),
    [
        (["keys", "create"], "NAME"),
        (["keys", "set"], "NAME"),
        (["keys", "revoke"], "NAME"),
        (["route", "explain"], "REQUEST_ID"),
        (["upstreams", "add"], "ID"),
    ],
)
def test_a_missing_argument_is_named_as_the_readme_names_it(command: list[str], argument: str) -> None:
    """`Missing argument 'name'` and `keys create [OPTIONS] {name}`, where the README (and `upstreams add`'s
    `{ID}`) has `keys create NAME`."""
    result = invoke(*command)
    assert result.exit_code == 2 and f"Missing argument '{argument}'" in result.output, result.output
    assert f"{{{argument}}}" in result.output and "Traceback" not in result.output
