"""Configuration mistakes around callers and prices stop the CLI with a clear message, not a traceback."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from poolgate.cli.main import app

runner = CliRunner()


def test_serve_with_an_unusable_jwt_key_file_says_why(tmp_path: Path) -> None:
    key_file = tmp_path / "sso.pem"
    key_file.write_text("this is not a PEM public key\n")
    config = tmp_path / "gw.yaml"
    config.write_text(
        f"data_dir: {tmp_path / 'data'}\n"
        "server: {port: 0}\n"
        "callers:\n"
        "  jwt_issuers:\n"
        f"    - {{name: sso, issuer: https://sso.test, audience: poolgate, algorithms: [RS256], "
        f"public_key_file: {key_file}}}\n"
    )
    result = runner.invoke(app, ["serve", "--config", str(config)])
    output = " ".join(result.output.split())
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    assert "not a PEM public key or certificate" in output and "Traceback" not in output


def test_a_bad_price_override_is_a_config_error_naming_it(tmp_path: Path) -> None:
    config = tmp_path / "prices.yaml"
    config.write_text("prices:\n  models:\n    my-model: {input: '3'}\n")
    result = runner.invoke(app, ["config", "check", str(config)])
    output = " ".join(result.output.split())
    assert result.exit_code == 1 and "prices.yaml:3: prices:" in output  # the line of the model it names
    assert "prices.models.my-model: a model without a catalogue price needs at least `input` and `output`" in output
    config.write_text("prices:\n  models:\n    claude-sonnet-5: {input: '0.0000001'}\n")
    result = runner.invoke(app, ["config", "check", str(config)])
    output = " ".join(result.output.split())
    assert result.exit_code == 1 and "6 decimal places" in output and "prices.yaml:3: prices:" in output


def test_a_price_for_a_model_pattern_is_refused_not_silently_never_applied(tmp_path: Path) -> None:
    """`claude-custom-*` was accepted and matched no model: its requests were recorded at an unknown cost."""
    config = tmp_path / "prices.yaml"
    for prices in (
        "  models:\n    claude-custom-*: {input: '1', output: '2'}\n",
        "  upstreams:\n    up-0: {'claude-?': {input: '1', output: '2'}}\n",
    ):
        config.write_text("prices:\n" + prices)
        result = runner.invoke(app, ["config", "check", str(config)])
        output = " ".join(result.output.split())
        assert result.exit_code == 1 and "is a pattern, but prices name model ids" in output, output
    config.write_text("prices:\n  upstreams:\n    up-0: {'*': {input: '0', output: '0'}}\n")
    assert "is a pattern" not in runner.invoke(app, ["config", "check", str(config)]).output


def test_a_bad_price_file_is_a_config_error_naming_it_without_a_prices_section(tmp_path: Path) -> None:
    """The file was checked only with the `prices` overrides: without that section `config check` said ok and
    `serve` refused to start; a file that is not JSON was not named ("Expecting value: line 1 column 1")."""
    price_file = tmp_path / "acme-prices.json"
    config = tmp_path / "gw.yaml"
    config.write_text("billing:\n  price_file: acme-prices.json\n")
    for content, says in (
        ("not json\n", "not JSON"),
        ('{"version": "x", "as_of": "2026-01-01", "prices": [{"ids": ["m"], "input": "1", "output": "-2"}]}', "output"),
    ):
        price_file.write_text(content)
        result = runner.invoke(app, ["config", "check", str(config)])
        output = " ".join(result.output.split())
        assert result.exit_code == 1 and f"gw.yaml:2: billing.price_file: {price_file}:" in output
        assert says in output


def test_serve_on_a_store_it_cannot_open_says_so_in_one_line(tmp_path: Path) -> None:
    """A data_dir that is a file, or a database path that cannot be opened: one line naming the store."""
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    a_dir = tmp_path / "a-directory"
    a_dir.mkdir()
    for data_dir, store in ((not_a_dir, ""), (tmp_path / "data", f"store: {{url: 'sqlite:///{a_dir}'}}\n")):
        config = tmp_path / "gw.yaml"
        config.write_text(f"data_dir: {data_dir}\nserver: {{port: 0}}\n{store}")
        result = runner.invoke(app, ["serve", "--config", str(config)])
        output = " ".join(result.output.split())
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), output
        assert "cannot open the store" in output and "Traceback" not in output
