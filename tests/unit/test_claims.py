"""Caller claims: one parser for key settings, the config file and JWTs; `keys create` options store them."""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from typer.testing import CliRunner

from poolgate.cli import main as cli
from poolgate.cli.main import app
from poolgate.config import ConfigError, parse_config
from poolgate.lifecycle.claims import (
    MAX_USD,
    NO_CLAIMS,
    CallerClaims,
    ClaimsError,
    QuotaRule,
    format_usd,
    parse_claims,
    parse_quota,
    usd_to_micro,
)
from poolgate.store import repo
from poolgate.store.db import open_engine

runner = CliRunner()


def test_quota_specs_in_their_written_forms() -> None:
    assert parse_quota("requests=60/min") == QuotaRule("requests", 60, "minute")
    assert parse_quota("output_tokens = 100_000 / day") == QuotaRule("output_tokens", 100_000, "day")
    assert parse_quota({"metric": "input_tokens", "limit": 5, "window": "h"}) == QuotaRule("input_tokens", 5, "hour")
    assert QuotaRule("output_tokens", 1, "day").name == "output-tokens-per-day"
    for bad, says in [
        ("requests=60", "METRIC=LIMIT/WINDOW"),
        ("bananas=1/min", "bananas"),
        ("requests=1/fortnight", "fortnight"),
        ("requests=-1/min", "METRIC=LIMIT/WINDOW"),
    ]:
        with pytest.raises(ClaimsError, match=says):
            parse_quota(bad)


def test_claims_from_a_mapping_and_back() -> None:
    claims = parse_claims(
        {
            "models": "claude-sonnet-*, claude-haiku-*",
            "quotas": {"requests": "60/min"},
            "budget_usd": "5.25",
            "budget_scope": "per_session",
            "budget_range": "daily",
            "chain": "team-a/ci",
            "email": "ignored@example.com",
        }
    )
    assert claims.models == ("claude-sonnet-*", "claude-haiku-*")
    assert claims.quotas == (QuotaRule("requests", 60, "minute"),)
    assert claims.budget_micro_usd == 5_250_000
    assert (claims.budget_scope, claims.budget_range, claims.chain) == ("per_session", "daily", "team-a/ci")
    assert claims.enforced
    assert parse_claims(orjson.loads(orjson.dumps(claims.as_settings()))) == claims
    assert not NO_CLAIMS.enforced and not parse_claims({}).enforced
    assert not CallerClaims(chain="x").enforced  # a chain id alone limits nothing


@pytest.mark.parametrize(
    ("data", "says"),
    [
        ({"models": 5}, "models"),
        # Given but empty: it allowed every model (`keys create --models ''`, a token's `models: []`).
        ({"models": []}, "no model glob given"),
        ({"models": " , "}, "no model glob given"),
        ({"budget_usd": "five"}, "budget_usd"),
        ({"budget_usd": -1}, "budget_usd"),
        ({"budget_usd": "0.0000004"}, "finer than a micro-dollar"),
        ({"budget_micro_usd": 1.5}, "budget_micro_usd"),
        ({"budget_scope": "per_team"}, "budget_scope"),
        ({"budget_range": "yearly"}, "budget_range"),
        # Given but empty read as absent: `total` and `per_account`, over an issuer's defaults, unseen.
        *(
            ({"budget_range": empty}, f"budget_range: {re.escape(repr(empty))} is not one of")
            for empty in ("", False, 0, [])
        ),
        *(({"budget_scope": empty}, f"budget_scope: {empty!r} is not one of") for empty in ("", False)),
        # `true` became the chain "True".
        ({"chain": True}, "chain: expected a string"),
        ({"chain": ["a"]}, "chain: expected a string"),
        ({"quotas": ["requests=1/min", "requests=2/minute"]}, "twice"),
    ],
)
def test_bad_claims_name_the_claim(data: dict[str, object], says: str) -> None:
    with pytest.raises(ClaimsError, match=says):
        parse_claims(data)


def test_usd_amounts_are_exact_micro_dollars() -> None:
    assert usd_to_micro(0.1) == 100_000
    assert usd_to_micro(MAX_USD) == MAX_USD * 1_000_000 < 2**63
    for huge in ("1e30", "1e999999", "1e99999999999"):  # the CLI and `config check` printed tracebacks
        with pytest.raises(ClaimsError, match="too large"):
            usd_to_micro(huge)
    assert usd_to_micro("$1.000001") == 1_000_001
    assert usd_to_micro(5) == 5_000_000
    assert [format_usd(v) for v in (5_000_000, 1500, 4_871_234, 0, 10)] == [
        "$5.00",
        "$0.0015",
        "$4.871234",
        "$0.00",
        "$0.00001",
    ]


@given(st.integers(min_value=0, max_value=10**15))
def test_format_usd_round_trips(micro: int) -> None:
    assert usd_to_micro(format_usd(micro)) == micro


def test_config_sections_for_callers(tmp_path: Path) -> None:
    pem = tmp_path / "k.pem"
    pem.write_text("placeholder")
    config = parse_config(
        f"""
keys:
  - name: ci
    key: pg-static-key-0123456789
    claims: {{models: ['claude-haiku-*'], quotas: ['requests=10/min'], budget_usd: 2.5}}
callers:
  internal_keys:
    - {{name: billing-svc, key: internal-key-0123456789, claims: {{budget_usd: 1, budget_range: monthly}}}}
  jwt_issuers:
    - name: sso
      issuer: https://sso.example.com
      audience: poolgate
      algorithms: [RS256]
      public_key_file: {pem}
      defaults: {{budget_usd: 5, budget_scope: per_session, budget_range: daily}}
""",
        environ={},
    )
    assert config.keys[0].claims.caller_claims().budget_micro_usd == 2_500_000
    assert config.callers.internal_keys[0].claims.caller_claims().budget_range == "monthly"
    issuer = config.callers.jwt_issuers[0]
    assert issuer.audience == ("poolgate",) and issuer.kind == "oauth_subject" and issuer.leeway_seconds == 30


@pytest.mark.parametrize(
    ("issuer", "says"),
    [
        ("{algorithms: [HS256], secret: short}", "at least 32 bytes"),
        ("{algorithms: [RS256], secret: 0123456789012345678901234567890123}", "only with HS256"),
        ("{algorithms: [HS256, RS256], secret: 0123456789012345678901234567890123}", "only with HS256"),
        ("{algorithms: [HS256], public_key_file: /nonexistent.pem}", "HS\\* algorithms need a secret"),
        ("{algorithms: [RS256], public_key_file: /nonexistent.pem}", "no such file"),
        ("{algorithms: [RS256]}", "exactly one of"),
        ("{algorithms: [none], secret: 0123456789012345678901234567890123}", "algorithms"),
    ],
)
def test_bad_issuer_configs_are_refused_at_load(issuer: str, says: str) -> None:
    base = "name: sso, issuer: 'https://sso', audience: poolgate, "
    text = "callers:\n  jwt_issuers:\n    - {" + base + issuer.strip("{}") + "}\n"
    with pytest.raises(ConfigError, match=says):
        parse_config(text, environ={})


def test_duplicate_issuers_and_bad_claims_in_config_are_refused() -> None:
    issuer = "{name: a, issuer: x, audience: p, algorithms: [HS256], secret: 0123456789012345678901234567890123}"
    with pytest.raises(ConfigError, match="duplicate jwt issuer"):
        parse_config(f"callers:\n  jwt_issuers: [{issuer}, {issuer.replace('name: a', 'name: b')}]\n", environ={})
    with pytest.raises(ConfigError, match="window 'week'"):
        parse_config("keys: [{name: a, key: 0123456789abcdef, claims: {quotas: [requests=1/week]}}]", environ={})


def test_keys_create_stores_claims_and_keys_set_replaces_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli.console, "width", 300)
    d = str(tmp_path)
    result = runner.invoke(
        app,
        [
            *("keys", "create", "alice", "--data-dir", d, "--raw"),
            *("--models", "claude-sonnet-*", "--budget-usd", "5", "--budget-range", "daily"),
            *("--budget-scope", "per_session", "--quota", "requests=60/min", "--quota", "output_tokens=100000/day"),
        ],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    (row,) = repo.list_keys(open_engine(f"sqlite:///{tmp_path / 'poolgate.db'}"))
    claims = parse_claims(orjson.loads(row.settings or "{}"))
    assert claims == CallerClaims(
        models=("claude-sonnet-*",),
        quotas=(QuotaRule("requests", 60, "minute"), QuotaRule("output_tokens", 100_000, "day")),
        budget_micro_usd=5_000_000,
        budget_scope="per_session",
        budget_range="daily",
    )
    listing = runner.invoke(app, ["keys", "list", "--data-dir", d]).output
    assert "$5.00 daily per-session" in listing and "requests=60/minute" in listing

    assert runner.invoke(app, ["keys", "set", "alice", "--data-dir", d, "--quota", "requests=5/h"]).exit_code == 0
    (row,) = repo.list_keys(open_engine(f"sqlite:///{tmp_path / 'poolgate.db'}"))
    assert parse_claims(orjson.loads(row.settings or "{}")) == CallerClaims(quotas=(QuotaRule("requests", 5, "hour"),))

    bad = runner.invoke(
        app, ["keys", "create", "bob", "--data-dir", d, "--budget-range", "yearly", "--budget-usd", "1"]
    )
    assert bad.exit_code != 0 and "--budget-range" in bad.output
    assert "bob" not in runner.invoke(app, ["keys", "list", "--data-dir", d]).output


def test_a_version_2_database_gains_key_settings_and_keeps_its_keys(tmp_path: Path) -> None:
    from sqlalchemy import create_engine, text

    url = f"sqlite:///{tmp_path / 'v2.db'}"
    with create_engine(url).begin() as conn:
        conn.execute(text("CREATE TABLE meta (key VARCHAR(64) PRIMARY KEY, value VARCHAR(256) NOT NULL)"))
        conn.execute(text("INSERT INTO meta VALUES ('schema_version', '2')"))
        conn.execute(
            text(
                "CREATE TABLE gateway_keys (id VARCHAR(32) PRIMARY KEY, name VARCHAR(64) NOT NULL UNIQUE, "
                "prefix VARCHAR(16) NOT NULL, key_hash VARCHAR(64) NOT NULL UNIQUE, created_at FLOAT NOT NULL, "
                "revoked_at FLOAT)"
            )
        )
        conn.execute(text("INSERT INTO gateway_keys VALUES ('key_1', 'old', 'pg-abc', 'hash', 1.0, NULL)"))
    engine = open_engine(url)
    (row,) = repo.list_keys(engine)
    assert (row.name, row.settings) == ("old", None)
    assert repo.set_key_settings(engine, "old", {"budget_micro_usd": 5}).settings == '{"budget_micro_usd":5}'


def test_a_quota_of_nothing_is_refused() -> None:
    """A limit of 0 refused every request with a retry-after that never helps: clients retried for ever."""
    with pytest.raises(ClaimsError, match="≥ 1"):
        parse_quota("requests=0/min")


@pytest.mark.parametrize("limit", ["9" * 5000, "1" + "0" * 18 + "1", "1_000_000_000_000_000_001"])
def test_a_quota_limit_past_10_to_the_18_is_refused_by_the_parser_the_cli_and_config_check(
    tmp_path: Path, limit: str
) -> None:
    """A limit of over 4,300 digits made `int()` raise: a token carrying it got a 500, `keys create` printed a
    traceback and `config check` Python's own words."""
    too_large = "quota requests: limit too large"
    with pytest.raises(ClaimsError, match=too_large):
        parse_quota(f"requests={limit}/min")
    created = runner.invoke(
        app, ["keys", "create", "x", "--data-dir", str(tmp_path), "--quota", f"requests={limit}/min"]
    )
    assert created.exit_code == 1 and created.output.strip().splitlines() == [
        f"error: --{too_large} (at most 1,000,000,000,000,000,000)"
    ]
    config = tmp_path / "gw.yaml"
    config.write_text(f"keys:\n  - {{name: a, key: 0123456789abcdef, claims: {{quotas: ['requests={limit}/min']}}}}\n")
    checked = runner.invoke(app, ["config", "check", str(config), "--data-dir", str(tmp_path)])
    assert checked.exit_code == 1 and f"gw.yaml:2: keys.0.claims: {too_large}" in checked.output


def test_the_largest_quota_limit_is_taken_however_it_is_written() -> None:
    assert parse_quota("requests=1_000_000_000_000_000_000/min").limit == 10**18
    assert parse_quota("requests=" + "0" * 5000 + "7/min").limit == 7
    assert parse_quota({"metric": "requests", "limit": 10**18, "window": "min"}).limit == 10**18
    with pytest.raises(ClaimsError, match="limit too large"):
        parse_quota({"metric": "requests", "limit": 10**5000, "window": "min"})
