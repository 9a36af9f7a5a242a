"""Configuration: YAML + ${ENV} + env overrides, and errors that point at the bad line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from poolgate import config as config_module
from poolgate.billing import config as billing_config_module
from poolgate.billing.config import (
    PATTERN_WORDS,
    FlatFeeChannelConfig,
    MeteredChannelConfig,
    PricingConfig,
    TierConfig,
)
from poolgate.config import ConfigError, load_config, parse_config

EXAMPLE = Path(__file__).resolve().parents[2] / "poolgate.example.yaml"
README = EXAMPLE.parent / "README.md"
# Described in the README's price sections (and a JWT issuer's claim mapping: every caller claim's name).
PRICE_FORMS = ("upstreams.billing", "prices.models", "prices.upstreams", "callers.jwt_issuers.claim_mapping")


def test_env_references_are_substituted_with_defaults() -> None:
    text = """
upstreams:
  - id: main
    api_key: ${KEY_A}
    base_url: ${BASE:-http://127.0.0.1:9000}
"""
    config = parse_config(text, environ={"KEY_A": "sk-ant-api03-xyz"})
    assert config.upstreams[0].api_key == "sk-ant-api03-xyz"
    assert config.upstreams[0].base_url == "http://127.0.0.1:9000"


def test_a_missing_env_variable_is_named() -> None:
    with pytest.raises(ConfigError, match="KEY_B is not set"):
        parse_config("upstreams: [{id: a, api_key: '${KEY_B}'}]", environ={})


def test_errors_name_the_field_and_the_line() -> None:
    text = "server:\n  port: 8080\nrouting:\n  strategy: fastest\n"
    with pytest.raises(ConfigError) as error:
        parse_config(text, source="gw.yaml", environ={})
    assert "gw.yaml:4: routing.strategy" in str(error.value)


def test_unknown_fields_are_rejected_not_ignored() -> None:
    with pytest.raises(ConfigError, match="sever"):
        parse_config("sever:\n  port: 1\n", environ={})


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("server:\n  prot: 9000\n", "gw.yaml:2: server.prot: unknown field (did you mean 'port'?)"),
        ("serverr:\n  port: 1\n", "gw.yaml:1: serverr: unknown field (did you mean 'server'?)"),
        (
            "routing:\n  score_weights:\n    cahce: 1\n",
            "routing.score_weights.cahce: unknown field (did you mean 'cache'?)",
        ),
        (
            "upstreams:\n  - {id: a, api_key: k, wieght: 2}\n",
            "upstreams.0.wieght: unknown field (did you mean 'weight'?)",
        ),
        (
            "upstreams:\n  - {id: a, api_key: k, billing: {billing: flat_fee, montly_fee: 1}}\n",
            "upstreams.0.billing.montly_fee: unknown field (did you mean 'monthly_fee'?)",
        ),
        ("prices:\n  models:\n    m: {inptu: 1}\n", "prices.models.m.inptu: unknown field (did you mean 'input'?)"),
        ("server:\n  zzz: 1\n", "gw.yaml:2: server.zzz: unknown field"),
        # Not indented under its section.
        ("server:\nport: 9000\n", "gw.yaml:2: port: unknown field (did you mean 'server.port'?)"),
        ("strategy: random\n", "gw.yaml:1: strategy: unknown field (did you mean 'routing.strategy'?)"),
    ],
)
def test_a_misspelt_field_is_called_unknown_with_the_field_it_likely_means(text: str, said: str) -> None:
    """pydantic's "Extra inputs are not permitted" did not say the field was unknown to poolgate, nor which
    one the typo stood for."""
    with pytest.raises(ConfigError) as error:
        parse_config(text, source="gw.yaml", environ={})
    assert said in str(error.value) and "Extra inputs" not in str(error.value)
    if said.endswith("unknown field"):
        assert "did you mean" not in str(error.value)


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("upstreams:\n  - {id: a b, api_key: k}\n", "upstreams.0.id: may hold only letters, digits and _ . : -"),
        ('keys:\n  - {name: a, key: "abcdefghijklmnop q"}\n', "keys.0.key: may hold only printable ASCII"),
        ('keys:\n  - {name: "a\\tb", key: abcdefghijklmnopq}\n', "keys.0.name: must not hold control characters"),
    ],
)
def test_a_value_outside_a_fields_pattern_is_said_in_words(text: str, said: str) -> None:
    """pydantic named the regular expression: `String should match pattern '^[\\x21-\\x7e]+$'`."""
    with pytest.raises(ConfigError) as error:
        parse_config(text, source="gw.yaml", environ={})
    assert said in str(error.value) and "pattern" not in str(error.value)


def test_every_pattern_a_configuration_field_must_match_has_words() -> None:
    patterns = {
        str(metadata.pattern)
        for module in (config_module, billing_config_module)
        for model in vars(module).values()
        if isinstance(model, type) and issubclass(model, BaseModel)
        for field in model.model_fields.values()
        for metadata in field.metadata
        if getattr(metadata, "pattern", None)
    }
    assert patterns and patterns <= PATTERN_WORDS.keys()


@pytest.mark.parametrize(
    "text",
    ["upstreams:\n  id: a\n  api_key: k\n", "upstreams:\n  - {id: a, api_key: k, models: claude-sonnet-*}\n"],
)
def test_a_mapping_or_a_value_where_a_list_belongs_is_told_a_list_is_needed(text: str) -> None:
    """pydantic called it "Input should be a valid tuple": no YAML file has tuples."""
    with pytest.raises(ConfigError) as error:
        parse_config(text, source="gw.yaml", environ={})
    assert "a list is needed (each entry on a line of its own starting with `- `" in str(error.value)
    assert "tuple" not in str(error.value)


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ("server: 9000\n", "gw.yaml:1: server: fields are needed here"),
        ("upstreams:\n  - team-a\n", "gw.yaml:2: upstreams.0: fields are needed here"),
    ],
)
def test_a_value_where_fields_belong_is_said_without_a_class_name(text: str, said: str) -> None:
    """pydantic's "Input should be a valid dictionary or instance of ServerConfig" named a Python class."""
    with pytest.raises(ConfigError) as error:
        parse_config(text, source="gw.yaml", environ={})
    assert said in str(error.value) and "instance of" not in str(error.value)


def test_a_check_of_poolgates_own_is_said_without_pydantics_value_error_prefix() -> None:
    with pytest.raises(ConfigError) as error:
        parse_config("data_dir: ''\n", source="gw.yaml", environ={})
    assert str(error.value).startswith("invalid configuration: gw.yaml:1: data_dir: must not be empty")


@pytest.mark.parametrize(
    ("text", "where"),
    [
        ("serverr:\n  port: 1\n", "gw.yaml:1: serverr: unknown field"),
        ("routing:\n  score_weight:\n    cache: 1\n", "gw.yaml:2: routing.score_weight: unknown field"),
        ("upstreams:\n  - id: a\n    api_key: k\n  -\n    id: b\n    kind: nope\n", "gw.yaml:6: upstreams.1.kind"),
        # A list with its entries commented out was "Input should be a valid tuple".
        ("upstreams:\n  - id: a\n    api_key: k\n    models:\n", "gw.yaml:4: upstreams.0.models: nothing under it"),
    ],
)
def test_an_error_in_a_block_mapping_names_the_line_of_its_key(text: str, where: str) -> None:
    """A section's error named the line of its first field (the value of a block mapping starts there)."""
    with pytest.raises(ConfigError) as error:
        parse_config(text, source="gw.yaml", environ={})
    assert where in str(error.value)


def test_duplicate_upstream_ids_are_rejected_at_the_line_of_the_second() -> None:
    text = "upstreams:\n  - {id: a, api_key: k1}\n  - {id: a, api_key: k2}\n"
    with pytest.raises(ConfigError, match=r"gw\.yaml:3: .*upstreams\.1\.id: duplicate upstream id 'a'"):
        parse_config(text, source="gw.yaml", environ={})


def test_environment_overrides_nested_settings() -> None:
    config = parse_config(
        "server:\n  port: 8080\n", environ={"POOLGATE__SERVER__PORT": "9999", "POOLGATE__ROUTING__STRATEGY": "random"}
    )
    assert config.server.port == 9999
    assert config.routing.strategy == "random"


def test_an_environment_override_sets_one_field_of_a_list_entry_by_its_index() -> None:
    """`POOLGATE__UPSTREAMS__0__API_KEY` replaced the whole list with a mapping, and the error blamed the
    file ("gw.yaml:1: upstreams: Input should be a valid tuple")."""
    text = "upstreams:\n  - {id: a, api_key: k1}\n  - {id: b, api_key: k2}\n"
    config = parse_config(text, source="gw.yaml", environ={"POOLGATE__UPSTREAMS__1__API_KEY": "sk-from-env"})
    assert [(u.id, u.api_key) for u in config.upstreams] == [("a", "k1"), ("b", "sk-from-env")]
    with pytest.raises(ConfigError, match=r"POOLGATE__UPSTREAMS__2__API_KEY: upstreams has 2 entries: there is no"):
        parse_config(text, source="gw.yaml", environ={"POOLGATE__UPSTREAMS__2__API_KEY": "x"})
    # Without upstreams in the file (or without a file): it has none, rather than "is not a list".
    with pytest.raises(ConfigError, match=r"POOLGATE__UPSTREAMS__0__BASE_URL: upstreams has 0 entries: there is no"):
        parse_config("{}", environ={"POOLGATE__UPSTREAMS__0__BASE_URL": "x"})
    with pytest.raises(ConfigError) as error:
        parse_config(text, source="gw.yaml", environ={"POOLGATE__UPSTREAMS__0__WEIGHT": "heavy"})
    assert str(error.value).startswith(
        "invalid configuration: environment variable POOLGATE__UPSTREAMS__0__WEIGHT: upstreams.0.weight: "
    )


def test_the_documented_example_config_is_valid() -> None:
    config = load_config(EXAMPLE, environ={"ANTHROPIC_KEY_TEAM_A": "sk-a", "ANTHROPIC_KEY_TEAM_B": "sk-b"})
    assert len(config.upstreams) == 2
    assert config.server.max_body_bytes == 32 * 1024 * 1024


def test_secrets_do_not_appear_in_the_config_repr() -> None:
    config = parse_config("upstreams: [{id: a, api_key: sk-ant-api03-supersecret}]", environ={})
    assert "supersecret" not in repr(config)


def test_a_missing_env_variable_names_the_file_the_line_and_the_field() -> None:
    text = "server:\n  port: 8080\nupstreams:\n  - id: a\n    api_key: ${KEY_B}\n"
    with pytest.raises(ConfigError) as error:
        parse_config(text, source="gw.yaml", environ={})
    assert str(error.value) == (
        "gw.yaml:5: upstreams.0.api_key: environment variable KEY_B is not set (referenced as ${KEY_B})"
    )


def test_yaml_syntax_errors_name_the_file_not_the_parsers_string() -> None:
    with pytest.raises(ConfigError) as error:
        parse_config("server:\n  port: 8080\n  host: a: b\n", source="gw.yaml", environ={})
    assert str(error.value) == "gw.yaml:3: not valid YAML: mapping values are not allowed here"
    with pytest.raises(ConfigError) as error:
        parse_config("server:\n  port: 8080\nrouting: [a, b\n", source="gw.yaml", environ={})
    assert str(error.value).startswith("gw.yaml:4: not valid YAML: expected ',' or ']'")
    assert "while parsing a flow sequence at line 3" in str(error.value) and "unicode" not in str(error.value)


def test_an_error_from_an_environment_override_is_blamed_on_the_variable_not_the_file() -> None:
    text = "server:\n  port: 8080\n"
    with pytest.raises(ConfigError) as error:
        parse_config(text, source="gw.yaml", environ={"POOLGATE__SERVER__PORT": "abc"})
    message = str(error.value)
    assert message.startswith("invalid configuration: environment variable POOLGATE__SERVER__PORT: server.port: ")
    assert "gw.yaml" not in message and "\n" not in message
    with pytest.raises(ConfigError, match="environment variable POOLGATE__SEVER__PORT: sever: unknown field"):
        parse_config(text, source="gw.yaml", environ={"POOLGATE__SEVER__PORT": "1"})
    with pytest.raises(ConfigError, match="environment variable POOLGATE__SERVER__HOST: not valid YAML"):
        parse_config(text, source="gw.yaml", environ={"POOLGATE__SERVER__HOST": "["})
    # The file's own mistakes are still the file's, next to a harmless override.
    with pytest.raises(ConfigError, match=r"gw\.yaml:2: server\.port"):
        parse_config("server:\n  port: abc\n", source="gw.yaml", environ={"POOLGATE__SERVER__HOST": "0.0.0.0"})


def test_a_credential_from_a_secret_file_loses_its_newline_and_one_with_a_control_character_is_refused() -> None:
    """A Kubernetes secret made from a file ends with a newline: `api_key: ${KEY}` passed every check, then
    every request to the account was a 500, and `admin.token: ${ADM}` could never be presented (incoming
    header values are stripped). One with a control character inside is refused, naming the field only."""
    text = 'upstreams: [{id: a, api_key: "${KEY}"}]\nadmin: {token: "${ADM}"}\nkeys: [{name: k, key: "${GW}"}]\n'
    secrets = {"KEY": "sk-ant-api03-key-a\n", "ADM": " admin-token-0123456789\r\n", "GW": "pg-static-0123456789\n"}
    config = parse_config(text, environ=secrets)
    assert config.upstreams[0].api_key == "sk-ant-api03-key-a"
    assert config.admin.token == "admin-token-0123456789" and config.keys[0].key == "pg-static-0123456789"
    for name, field in (("KEY", "upstreams.0.api_key"), ("ADM", "admin.token")):
        with pytest.raises(ConfigError) as refused:
            parse_config(text, source="gw.yaml", environ={**secrets, name: "secret-0123456789\r\nX-Injected: 1"})
        assert f"{field}: holds a control character" in str(refused.value)
        assert "secret-0123456789" not in str(refused.value)


def test_a_jwt_secret_too_short_from_an_environment_override_is_blamed_on_the_variable() -> None:
    """The length check was the issuer's: the error named the file's line of the issuer, not the variable."""
    text = "callers:\n  jwt_issuers:\n    - {name: idp, issuer: x, audience: pg, algorithms: [HS256], secret: '${S}'}\n"
    environ = {"S": "0123456789abcdef0123456789abcdef", "POOLGATE__CALLERS__JWT_ISSUERS__0__SECRET": "short"}
    with pytest.raises(ConfigError) as error:
        parse_config(text, source="gw.yaml", environ=environ)
    assert str(error.value) == (
        "invalid configuration: environment variable POOLGATE__CALLERS__JWT_ISSUERS__0__SECRET: "
        "callers.jwt_issuers.0.secret: must be at least 32 bytes for HS256"
    )
    with pytest.raises(ConfigError, match=r"gw\.yaml:3: callers\.jwt_issuers\.0\.secret: .*at least 32 bytes"):
        parse_config(text, source="gw.yaml", environ={"S": "short"})


def test_a_base_url_with_credentials_in_it_is_refused_without_showing_them() -> None:
    """Stored and shown in plain text: the upstream's credential belongs in api_key."""
    with pytest.raises(ConfigError) as error:
        parse_config(
            "upstreams: [{id: a, api_key: k, base_url: 'https://u:URLPASSWORD@proxy.example'}]\n", "gw.yaml", {}
        )
    assert "gw.yaml:1: upstreams.0.base_url: must not hold credentials" in str(error.value)
    assert "URLPASSWORD" not in str(error.value)


def test_a_static_key_must_be_sendable_as_a_header_and_its_name_printable(tmp_path: Path) -> None:
    for keys, needle in (
        ('[{name: svc, key: "pg-clé-secrète-0123456789"}]', "keys.0.key"),
        ('[{name: "svc\\nforged", key: "pg-static-0123456789abcdef"}]', "keys.0.name"),
    ):
        path = tmp_path / "bad.yaml"
        path.write_text(f"keys: {keys}\n")
        with pytest.raises(ConfigError) as error:
            load_config(path)
        assert needle in str(error.value)


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        # Every failure of an upstream was an IndexError, a 500 "internal error" to every caller.
        ("health: {cooldown_multipliers: []}\n", "health.cooldown_multipliers"),
        ("health: {cooldown_multipliers: [1, 0]}\n", "health.cooldown_multipliers"),
        # One key for two entries: requests with it were the second's, the first's limits silently ignored.
        (
            "keys:\n  - {name: a, key: aaaaaaaaaaaaaaaaaaaaaa, claims: {models: [claude-haiku-*]}}\n"
            "  - {name: b, key: aaaaaaaaaaaaaaaaaaaaaa}\n",
            "gw.yaml:3: keys.1.key: duplicate key value (the same as keys.0.key)",
        ),
        (
            "keys: [{name: a, key: aaaaaaaaaaaaaaaaaaaaaa}]\n"
            "callers: {internal_keys: [{name: svc, key: aaaaaaaaaaaaaaaaaaaaaa}]}\n",
            "gw.yaml:2: callers.internal_keys.0.key: duplicate key value",
        ),
        # The admin token as a caller's key: that caller opened the admin API and /metrics.
        (
            "admin: {token: aaaaaaaaaaaaaaaaaaaaaa}\nkeys: [{name: a, key: aaaaaaaaaaaaaaaaaaaaaa}]\n",
            "gw.yaml:2: keys.0.key: duplicate key value (the same as admin.token)",
        ),
        (
            "keys:\n  - {name: a, key: aaaaaaaaaaaaaaaaaaaaaa}\n  - {name: a, key: bbbbbbbbbbbbbbbbbbbbbb}\n",
            "gw.yaml:3: keys.1.name: duplicate key name 'a'",
        ),
        # Written but empty: it meant any model (a key's or a token's is refused too).
        ("keys: [{name: a, key: aaaaaaaaaaaaaaaaaaaaaa, claims: {models: []}}]\n", "no model glob given"),
        # The ring is allocated at start: `config check` said ok, and `serve` died of a MemoryError.
        (
            "routing: {trace_ring_size: 1000000000000}\n",
            "routing.trace_ring_size: Input should be less than or equal to 100000",
        ),
        # `config check` said ok, and `serve` died with a traceback: its driver is not even installed.
        ('store: {url: "postgresql://u:pw@localhost/db"}\n', "only SQLite is supported"),
    ],
)
def test_a_configuration_that_cannot_work_is_refused_by_config_check(text: str, needle: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_config(text, source="gw.yaml", environ={})
    assert needle in str(error.value)
    assert "aaaaaaaaaaaaaaaaaaaaaa" not in str(error.value) and "pw@" not in str(error.value)


@pytest.mark.parametrize(
    ("content", "needle"),
    [(b"\xff\xfe", "not UTF-8 text (byte 0 is 0xff)"), (b"a: &a [*a]\n", "an alias refers to the value it is in")],
)
def test_a_file_no_configuration_can_come_from_is_one_line_not_a_traceback(
    tmp_path: Path, content: bytes, needle: str
) -> None:
    path = tmp_path / "gw.yaml"
    path.write_bytes(content)
    with pytest.raises(ConfigError) as error:
        load_config(path, environ={})
    assert needle in str(error.value) and str(path) in str(error.value)


def test_the_example_configuration_shows_every_setting() -> None:
    """README: the example "documents every field with its default"; the oauth warm-up settings and an
    upstream's `enabled` and `cache_keepalive` were missing. (The pricing forms of `prices` and of a
    channel's `pricing` have their own README sections.)"""
    import typing

    from pydantic import BaseModel

    from poolgate.config import GatewayConfig

    text = EXAMPLE.read_text()
    missing: list[str] = []

    def models_in(annotation: object) -> list[type[BaseModel]]:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            return [annotation]
        return [model for arg in typing.get_args(annotation) for model in models_in(arg)]

    def walk(model: type[BaseModel], path: str) -> None:
        for name, field in model.model_fields.items():
            dotted = f"{path}{name}"
            if dotted in PRICE_FORMS:
                continue
            if not re.search(rf"(^|[\s{{,\[]){re.escape(name)}(:|\b.*\bor\b)", text, re.MULTILINE):
                missing.append(dotted)
            for sub in models_in(field.annotation):
                walk(sub, f"{dotted}.")

    walk(GatewayConfig, "")
    assert missing == []


def test_the_example_configuration_and_the_readme_name_every_kind_of_upstream_and_caller_key() -> None:
    """Both showed `kind: anthropic_api_key` alone for an upstream: a `claude setup-token` upstream
    (`anthropic_oauth`) was described only deep in the subscription section."""
    import typing

    from poolgate.config import CallerKeyConfig, UpstreamKind

    readme = (EXAMPLE.parent / "README.md").read_text()
    table_row = next(line for line in readme.splitlines() if line.startswith("| `upstreams` |"))
    caller_kinds = typing.get_args(CallerKeyConfig.model_fields["kind"].annotation)
    for kind in typing.get_args(UpstreamKind):
        assert kind in EXAMPLE.read_text() and kind in table_row, kind
    for kind in caller_kinds:
        assert kind in EXAMPLE.read_text(), kind


def test_the_readme_names_every_field_of_a_channels_billing() -> None:
    """README's prices sections named no field of a channel's pricing models but `credits`' (`per_million_chars`,
    `per_minute`, `meter`, `tiers` … were in the source only); and each `pricing:` example it shows is taken."""
    import typing

    text = README.read_text()
    prices = text.split("## Prices, spend and channel billing", 1)[1].split("\n## ", 1)[0]
    examples = re.findall(r"^pricing: (.*)$", prices, re.MULTILINE)
    channels = [MeteredChannelConfig.model_validate({"pricing": yaml.safe_load(example)}) for example in examples]
    kinds = {channel.pricing.kind for channel in channels if channel.pricing}
    assert kinds == {"per_token", "credits", "char", "per_unit", "tiered"}
    pricings = typing.get_args(typing.get_args(PricingConfig)[0])
    fields = {name for model in (*pricings, TierConfig, FlatFeeChannelConfig) for name in model.model_fields}
    named = "\n".join(re.findall(r"```yaml\n(.*?)```", prices, re.DOTALL) + re.findall(r"`([^`\n]+)`", prices))
    assert [name for name in sorted(fields) if not re.search(rf"\b{name}\b", named)] == []


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            "timeouts:\n  connect_seconds: .inf\n",
            "gw.yaml:2: timeouts.connect_seconds: Input should be a finite number",
        ),
        ("health: {cooldown_multipliers: [1, .nan]}\n", "health.cooldown_multipliers.1: Input should be a finite"),
        ("prices: {models: {m: {input: 1, output: .nan}}}\n", "prices.models.m.output: Input should be a finite"),
        ("server:\n  port: true\n", "gw.yaml:2: server.port: Input should be a number, not true"),
        (
            "upstreams: [{id: a, api_key: k, weight: false}]\n",
            "upstreams.0.weight: Input should be a number, not false",
        ),
    ],
)
def test_infinity_nan_and_flags_are_no_numbers(text: str, error: str) -> None:
    """`connect_seconds: .inf` passed `config check`, then every request was a 500 (aiohttp's OverflowError);
    `port: true` listened on port 1."""
    with pytest.raises(ConfigError) as raised:
        parse_config(text, source="gw.yaml", environ={})
    assert error in str(raised.value)


def test_a_number_from_a_string_is_still_read() -> None:
    """Not strict numbers: `port: ${PORT}` is a string until it is validated."""
    config = parse_config("server: {port: '${PORT}', access_log: true}\n", environ={"PORT": "9001"})
    assert config.server.port == 9001 and config.server.access_log is True


@pytest.mark.parametrize(
    ("text", "error"),
    [
        (
            "routing:\n  pins:\n    - {model: 'claude-opus-*', upstreams: [a]}\n"
            "upstreams:\n  - {id: a, api_key: k1}\nrouting:\n  strategy: first-pick\n",
            "gw.yaml:6: not valid YAML: duplicate key 'routing' (first at line 1)",
        ),
        ("upstreams:\n  - {id: a, api_key: k1, api_key: k2}\n", "gw.yaml:2: not valid YAML: duplicate key 'api_key'"),
    ],
)
def test_a_key_written_twice_is_an_error_not_the_last_one_wins(text: str, error: str) -> None:
    """YAML kept the last of two keys silently: a second `routing:` section dropped the first's pins."""
    with pytest.raises(ConfigError) as raised:
        parse_config(text, source="gw.yaml", environ={})
    assert error in str(raised.value)


def test_a_key_may_override_one_merged_from_an_anchor() -> None:
    config = parse_config("timeouts:\n  <<: {connect_seconds: 5, idle_seconds: 9}\n  connect_seconds: 7\n", environ={})
    assert (config.timeouts.connect_seconds, config.timeouts.idle_seconds) == (7, 9)


@pytest.mark.parametrize("token", ["s3cretAdminToken1234 #tail", '"s3cretAdminToken1234"', "12345678901234567890"])
def test_an_environment_override_of_a_credential_is_taken_as_written(token: str) -> None:
    """It was read as YAML: a token lost what followed ` #`, its quotes, or was a number and refused."""
    config = parse_config(
        "upstreams: [{id: a, api_key: k}]\n",
        environ={"POOLGATE__ADMIN__TOKEN": token, "POOLGATE__UPSTREAMS__0__API_KEY": "*EnvSecretValue123"},
    )
    assert config.admin.token == token and config.upstreams[0].api_key == "*EnvSecretValue123"


def test_an_override_of_null_does_not_turn_the_admin_api_off() -> None:
    with pytest.raises(ConfigError, match=r"POOLGATE__ADMIN__TOKEN: admin\.token: String should have at least 16"):
        parse_config("admin: {token: s3cretAdminToken1234}\n", environ={"POOLGATE__ADMIN__TOKEN": "null"})


@pytest.mark.parametrize(
    ("text", "environ", "where"),
    [
        ("upstreams:\n  - id: a\n    api_key: *FileSecretValue789\n", {}, "gw.yaml:3: not valid YAML: found undefined"),
        ("upstreams:\n  - id: a\n    api_key: !FileSecretValue789\n", {}, "gw.yaml:3: not valid YAML: could not"),
        ("{}", {"POOLGATE__SERVER__HOST": "*FileSecretValue789"}, "POOLGATE__SERVER__HOST: not valid YAML: found"),
    ],
)
def test_a_yaml_error_never_shows_the_text_of_an_alias_or_tag(text: str, environ: dict[str, str], where: str) -> None:
    """An unquoted secret starting with * or ! is an alias or a tag to YAML, whose error quoted it whole."""
    with pytest.raises(ConfigError) as raised:
        parse_config(text, source="gw.yaml", environ=environ)
    assert where in str(raised.value) and "quote it" in str(raised.value)
    assert "FileSecretValue789" not in str(raised.value)


def test_a_yaml_error_still_shows_the_character_or_token_it_is_about() -> None:
    with pytest.raises(ConfigError, match=r"gw\.yaml:2: not valid YAML: found character '\\t' that cannot start"):
        parse_config("server:\n\tport: 1\n", source="gw.yaml", environ={})
    with pytest.raises(ConfigError, match="expected ',' or ']', but got '<stream end>'"):
        parse_config("server: [1\n", source="gw.yaml", environ={})


def test_an_environment_override_stands_in_for_an_unset_reference_at_its_place() -> None:
    """`api_key: ${ANTHROPIC_KEY_TEAM_A}` with the key in POOLGATE__UPSTREAMS__0__API_KEY failed with
    "ANTHROPIC_KEY_TEAM_A is not set"."""
    text = "upstreams:\n  - id: team-a\n    api_key: ${ANTHROPIC_KEY_TEAM_A}\n"
    config = parse_config(text, environ={"POOLGATE__UPSTREAMS__0__API_KEY": "sk-ant-api03-xyz"})
    assert config.upstreams[0].api_key == "sk-ant-api03-xyz"
    # Elsewhere it is still missing.
    with pytest.raises(ConfigError, match="ANTHROPIC_KEY_TEAM_A is not set"):
        parse_config(text, environ={"POOLGATE__UPSTREAMS__0__BASE_URL": "http://127.0.0.1:9"})


def test_a_section_with_every_entry_commented_out_is_its_default() -> None:
    """`upstreams:` or `server:` with nothing under it was refused: "Input should be a valid tuple"."""
    text = "server:\n#  port: 9000\nupstreams:\n#  - {id: a, api_key: k}\nrouting:\n  keepalive:\n  pins:\n"
    config = parse_config(text + "prices:\n  models:\ncallers:\n  jwt_issuers:\n", environ={})
    assert (config.server.port, config.upstreams, config.routing.pins, config.prices.models) == (8080, (), (), {})
    # A list of names left empty is no default: a key's `models:` absent is any model, empty is refused.
    with pytest.raises(ConfigError, match=r"keys\.0\.claims\.models: nothing under it: a list is needed"):
        parse_config("keys:\n  - {name: a, key: abcdefghijklmnopqrstu, claims: {models: }}\n", environ={})


@pytest.mark.parametrize(
    ("text", "environ", "where"),
    [
        (
            "admin:\n  token: !!int sk-ant-api03-TaggedSecret\n",
            {},
            "gw.yaml:2: not valid YAML: the value is not a valid int",
        ),
        ("admin:\n  token: !!float sk-ant-api03-TaggedSecret\n", {}, "gw.yaml:2: not valid YAML: the value is not a"),
        ("admin:\n  token: !!bool sk-ant-api03-TaggedSecret\n", {}, "gw.yaml:2: not valid YAML: the value is not a"),
        ("admin:\n  token: !!timestamp sk-ant-api03-TaggedSecret\n", {}, "gw.yaml:2: not valid YAML: the value is not"),
        ("admin:\n  token: !!set sk-ant-api03-TaggedSecret\n", {}, "gw.yaml:2: not valid YAML: expected a mapping"),
        ("admin:\n  token: !!map sk-ant-api03-TaggedSecret\n", {}, "gw.yaml:2: not valid YAML: expected a mapping"),
        ("admin:\n  {!!set sk-ant-api03-TaggedSecret: 1}\n", {}, "gw.yaml:2: not valid YAML: found unhashable key"),
        ("{}", {"POOLGATE__SERVER__PORT": "!!int TaggedSecret"}, "POOLGATE__SERVER__PORT: not valid YAML: the value"),
    ],
)
def test_a_value_its_yaml_tag_does_not_fit_is_a_yaml_error_that_never_shows_it(
    text: str, environ: dict[str, str], where: str
) -> None:
    """PyYAML's constructors raise ValueError, KeyError, AttributeError… quoting the value: `config check`
    and `serve` died with a traceback ending in the secret."""
    with pytest.raises(ConfigError) as raised:
        parse_config(text, source="gw.yaml", environ=environ)
    assert where in str(raised.value) and "TaggedSecret" not in str(raised.value)


@pytest.mark.parametrize("text", ["[]\n", "false\n", "0\n", "''\n"])
def test_only_an_empty_file_is_an_empty_configuration(text: str) -> None:
    """A file of `[]`, `false`, `0` or `''` was taken for one with nothing in it."""
    with pytest.raises(ConfigError, match=r"gw\.yaml: the top level must be a mapping of sections"):
        parse_config(text, source="gw.yaml", environ={})
    assert parse_config("# every line commented out\n", source="gw.yaml", environ={}).server.port == 8080
    assert parse_config("", source="gw.yaml", environ={}).server.port == 8080


@pytest.mark.parametrize(
    ("text", "environ", "error"),
    [
        ("server: " + "[" * 600 + "]" * 600 + "\n", {}, "gw.yaml: not valid YAML: nested too deeply"),
        ("{}", {"POOLGATE__SERVER__PORT": "[" * 600}, "POOLGATE__SERVER__PORT: not valid YAML: nested too deeply"),
    ],
)
def test_yaml_nested_too_deeply_to_read_is_a_configuration_error(
    text: str, environ: dict[str, str], error: str
) -> None:
    """Some 500 levels of `[` were a RecursionError inside the YAML parser, a traceback."""
    with pytest.raises(ConfigError, match=error):
        parse_config(text, source="gw.yaml", environ=environ)


@pytest.mark.parametrize(
    ("value", "error"),
    [
        ('"${KEY-A}"', "holds a `${` that starts no ${NAME} or ${NAME:-default}"),
        ('"${TEAM_A:-${TEAM_B}}"', "holds a `${` that starts no ${NAME} or ${NAME:-default}"),
        ('"${TEAM_B}${"', "holds a `${` that starts no ${NAME} or ${NAME:-default}"),
        ("$TEAM_B", "reads like a shell variable ($NAME), which is not replaced: write ${NAME}"),
    ],
)
def test_a_reference_not_written_as_documented_is_an_error_not_kept_as_written(value: str, error: str) -> None:
    """`${KEY-A}`, `${A:-${B}}` and `$KEY` were kept as those characters, and sent upstream as the API key."""
    with pytest.raises(ConfigError) as raised:
        parse_config(f"upstreams:\n  - id: a\n    api_key: {value}\n", source="gw.yaml", environ={"TEAM_B": "b"})
    assert f"gw.yaml:3: upstreams.0.api_key: {error}" in str(raised.value)


def test_a_dollar_outside_a_credential_and_in_a_variables_value_is_kept() -> None:
    text = "upstreams:\n  - {id: a, api_key: '${TEAM_A}', base_url: 'https://proxy.example/$v1'}\n"
    [upstream] = parse_config(text, environ={"TEAM_A": "sk-${not-a-reference}"}).upstreams
    assert (upstream.api_key, upstream.base_url) == ("sk-${not-a-reference}", "https://proxy.example/$v1")


def test_a_credential_typed_without_its_colon_is_not_shown_in_the_error() -> None:
    """In a flow mapping `api_key sk-ant-…` is a key, and "Extra inputs are not permitted" printed it whole,
    from the file and from an override alike."""
    text = 'upstreams:\n  - {id: a, base_url: "http://x", api_key sk-ant-api03-TypedSecret}\n'
    with pytest.raises(ConfigError) as raised:
        parse_config(text, source="gw.yaml", environ={})
    assert "upstreams.0.api_key …: unknown field" in str(raised.value) and "TypedSecret" not in str(raised.value)
    override = {"POOLGATE__UPSTREAMS": '[{id: a, base_url: "http://x", api_key sk-ant-api03-TypedSecret}]'}
    with pytest.raises(ConfigError) as raised:
        parse_config("{}", source="gw.yaml", environ=override)
    assert "TypedSecret" not in str(raised.value)


@pytest.mark.parametrize(
    ("billing", "error"),
    [
        ("{monthly_fee: 20}", "upstreams.0.billing: billing is needed, one of: metered, flat_fee"),
        ("{billing: metered, pricing: {input: 3}}", "upstreams.0.billing.pricing: kind is needed, one of: per_token,"),
    ],
)
def test_a_missing_billing_tag_is_named_with_the_ones_it_may_be(billing: str, error: str) -> None:
    """pydantic's words were "Unable to extract tag using discriminator 'billing'"."""
    with pytest.raises(ConfigError) as raised:
        parse_config(f"upstreams: [{{id: a, api_key: k, billing: {billing}}}]\n", source="gw.yaml", environ={})
    assert f"gw.yaml:1: {error}" in str(raised.value)


def test_an_error_in_a_price_names_the_fields_as_the_file_writes_them_without_pydantics_tags() -> None:
    """The path said `billing.metered.pricing.tiered.tiers.0.up_to`: `metered` and `tiered` are the values of
    `billing` and `kind`, in no path a file has."""
    text = (
        "upstreams:\n  - id: a\n    api_key: k\n    billing:\n      billing: metered\n      pricing:\n"
        "        kind: tiered\n        tiers:\n          - {up_to: 0, rate: '3'}\n          - {rate: '2'}\n"
    )
    with pytest.raises(ConfigError) as raised:
        parse_config(text, source="gw.yaml", environ={})
    assert str(raised.value) == (
        "invalid configuration: gw.yaml:9: upstreams.0.billing.pricing.tiers.0.up_to: Input should be greater than"
        " or equal to 1"
    )


@pytest.mark.parametrize(
    ("billing", "error"),
    [
        (
            "{billing: sk-ant-api03-PastedSecret}",
            "upstreams.0.billing: billing must be one of: metered, flat_fee",
        ),
        (
            "{billing: metered, pricing: {kind: sk-ant-api03-PastedSecret}}",
            "upstreams.0.billing.pricing: kind must be one of: per_token, credits,",
        ),
    ],
)
def test_an_unknown_billing_tag_is_refused_naming_the_known_ones_not_the_value(billing: str, error: str) -> None:
    """pydantic's message quoted the tag written: `Input tag 'sk-ant-api03-…' found using 'billing'…`."""
    with pytest.raises(ConfigError) as raised:
        parse_config(f"upstreams: [{{id: a, api_key: k, billing: {billing}}}]\n", source="gw.yaml", environ={})
    assert f"gw.yaml:1: {error}" in str(raised.value) and "PastedSecret" not in str(raised.value)


def test_a_file_path_from_an_override_takes_tilde_for_the_home_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`~` was the home directory in POOLGATE__DATA_DIR but a directory named ~ in a price file or a JWT key
    file given by an override: "no such file"."""
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "prices.json").write_text((Path(__file__).parents[2] / "src/poolgate/billing/prices.json").read_text())
    (tmp_path / "sso.pem").write_text("")
    text = "callers:\n  jwt_issuers:\n    - {name: sso, issuer: x, audience: pg, algorithms: [RS256]}\n"
    config = parse_config(
        text,
        environ={
            "POOLGATE__BILLING__PRICE_FILE": "~/prices.json",
            "POOLGATE__CALLERS__JWT_ISSUERS__0__PUBLIC_KEY_FILE": "~/sso.pem",
        },
    )
    assert config.billing.price_file == tmp_path / "prices.json"
    assert config.callers.jwt_issuers[0].public_key_file == tmp_path / "sso.pem"


def test_a_keepalive_lead_as_long_as_the_cache_ttl_is_refused() -> None:
    """A lead of five minutes or more found every paused session due at once: `max_per_session` keepalives
    went out in a row right after each turn, each paying for a read that kept nothing warmer."""
    with pytest.raises(ConfigError, match=r"routing\.keepalive\.lead_seconds: Input should be less than 300"):
        parse_config("routing:\n  keepalive: {enabled: true, lead_seconds: 300}\n", environ={})
    config = parse_config("routing:\n  keepalive: {lead_seconds: 299}\n", environ={})
    assert config.routing.keepalive.lead_seconds == 299


def test_a_claims_chain_is_a_string_or_a_number_in_the_file_as_in_a_token_and_never_a_flag() -> None:
    keys = "keys:\n  - {name: ci, key: pg-static-chain-key-0123456789, claims: {chain: %s}}\n"
    assert parse_config(keys % "42", environ={}).keys[0].claims.caller_claims().chain == "42"
    assert parse_config(keys % "team-a/ci", environ={}).keys[0].claims.caller_claims().chain == "team-a/ci"
    with pytest.raises(ConfigError, match=r"keys\.0\.claims\.chain"):
        parse_config(keys % "true", environ={})


@pytest.mark.parametrize(
    ("billing", "error"),
    [
        (
            '{billing: metered, pricing: {kind: tiered, tiers: [{up_to: 10, rate: "3"}, {up_to: 20, rate: "2"}]}}',
            "upstreams.0.billing.pricing: tiers: the last tier takes every unit past the others: it has no up_to",
        ),
        (
            '{billing: metered, pricing: {kind: tiered, tiers: [{up_to: 20, rate: "3"}, {up_to: 10, rate: "2"}, '
            '{rate: "1"}]}}',
            "upstreams.0.billing.pricing: tiers: each up_to must be positive and over the one before it",
        ),
        (
            '{billing: metered, pricing: {kind: per_unit, per_minute: "1", increment_seconds: "0.0005"}}',
            "upstreams.0.billing.pricing: increment_seconds must be a whole number of milliseconds",
        ),
        (
            '{billing: metered, pricing: {kind: char, per_million_chars: "0.0000001"}}',
            "upstreams.0.billing.pricing: price 1E-7 has more than 6 decimal places",
        ),
        (
            '{billing: flat_fee, monthly_fee: "0.0000001"}',
            "upstreams.0.billing: monthly_fee 1E-7 has more than 6 decimal places",
        ),
    ],
)
def test_a_channel_price_its_pricing_model_cannot_take_stops_config_check_naming_the_upstream(
    billing: str, error: str
) -> None:
    """README: a bad price stops `config check` and `serve` with the entry named. These passed `config check`
    and `serve` died with a traceback when it built the upstream's channel."""
    with pytest.raises(ConfigError) as raised:
        parse_config(f"upstreams: [{{id: a, api_key: k, billing: {billing}}}]\n", source="gw.yaml", environ={})
    assert error in str(raised.value)


@pytest.mark.parametrize(
    ("text", "port"),
    [
        # YAML 1.1 (PyYAML) read a leading zero as octal: `port: 017` listened on port 15, silently.
        ("server: {port: 017}\n", 17),
        ("server: {port: 08080}\n", 8080),
        ("server: {port: '017'}\n", 17),
        ("server: {port: 0}\n", 0),
        ("server: {port: 0x1F91}\n", 8081),
    ],
)
def test_a_number_with_a_leading_zero_is_decimal_not_octal(text: str, port: int) -> None:
    assert parse_config(text, environ={}).server.port == port


@pytest.mark.parametrize("value", ["1:30", "1:30:00", "1:30.5"])
def test_a_time_of_day_is_no_number_of_seconds(value: str) -> None:
    """YAML 1.1 read `1:30` as base 60 (90): `first_byte_seconds: 1:30` was ninety seconds, or 1.5 minutes,
    or 1:30 o'clock, silently. It is refused, naming the field."""
    with pytest.raises(ConfigError) as raised:
        parse_config(f"timeouts: {{first_byte_seconds: {value}}}\n", source="gw.yaml", environ={})
    assert "gw.yaml:1: timeouts.first_byte_seconds" in str(raised.value)
