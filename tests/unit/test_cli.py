"""The CLI a team lead uses: keys shown once and stored hashed, upstream secrets encrypted at rest."""

from __future__ import annotations

import sqlite3
import stat
from pathlib import Path

from typer.testing import CliRunner

from poolgate.cli.main import app

runner = CliRunner()


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
    run("keys", "revoke", "alice", "--data-dir", str(tmp_path))
    assert "revoked" in run("keys", "list", "--data-dir", str(tmp_path))
    assert "no key named" in fails("keys", "revoke", "bob", "--data-dir", str(tmp_path))


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


def test_an_upstream_with_a_bad_url_is_refused_with_the_reason(tmp_path: Path) -> None:
    output = fails("upstreams", "add", "x", "--api-key", "k", "--base-url", "ftp://nope", "--data-dir", str(tmp_path))
    assert "base_url" in output and "http" in output


def test_config_check_reports_ok_and_errors(tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text("routing:\n  strategy: random\n")
    assert "ok" in run("config", "check", str(good))
    bad = tmp_path / "bad.yaml"
    bad.write_text("routing:\n  max_attempts: zero\n")
    output = fails("config", "check", str(bad))
    assert "bad.yaml:2" in output and "routing.max_attempts" in output


def test_version() -> None:
    assert "poolgate 0.1.0" in run("version")
