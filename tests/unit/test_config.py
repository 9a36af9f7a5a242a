"""Configuration: YAML + ${ENV} + env overrides, and errors that point at the bad line."""

from __future__ import annotations

from pathlib import Path

import pytest

from poolgate.config import ConfigError, load_config, parse_config

EXAMPLE = Path(__file__).resolve().parents[2] / "poolgate.example.yaml"


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


def test_duplicate_upstream_ids_are_rejected() -> None:
    text = "upstreams:\n  - {id: a, api_key: k1}\n  - {id: a, api_key: k2}\n"
    with pytest.raises(ConfigError, match="duplicate upstream id 'a'"):
        parse_config(text, environ={})


def test_environment_overrides_nested_settings() -> None:
    config = parse_config(
        "server:\n  port: 8080\n", environ={"POOLGATE__SERVER__PORT": "9999", "POOLGATE__ROUTING__STRATEGY": "random"}
    )
    assert config.server.port == 9999
    assert config.routing.strategy == "random"


def test_the_documented_example_config_is_valid() -> None:
    config = load_config(EXAMPLE, environ={"ANTHROPIC_KEY_TEAM_A": "sk-a", "ANTHROPIC_KEY_TEAM_B": "sk-b"})
    assert len(config.upstreams) == 2
    assert config.server.max_body_bytes == 32 * 1024 * 1024


def test_secrets_do_not_appear_in_the_config_repr() -> None:
    config = parse_config("upstreams: [{id: a, api_key: sk-ant-api03-supersecret}]", environ={})
    assert "supersecret" not in repr(config)
