"""LiteLLM's proxy as a comparison target: its own virtualenv, offline, pointed at the same mock.

It lives apart from the project's venv so that its several hundred dependencies never meet poolgate's.
Everything here reports "unavailable, because …" instead of raising: LiteLLM is a comparison, and a run
without it still measures the gateway against the bare proxy.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

VENV = Path(__file__).resolve().parent / ".work" / "litellm-venv"
MASTER_KEY = "sk-bench-0123456789abcdef"
INSTALL_SECONDS = 900


def install(log: Path) -> str | None:
    """Create the venv and pip install 'litellm[proxy]' once; the reason it failed, or None when ready."""
    binary = VENV / "bin" / "litellm"
    if binary.exists():
        return None
    print("installing LiteLLM into bench/.work/litellm-venv (first run only, a few minutes)…", flush=True)
    try:
        with log.open("wb") as out:
            subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True, timeout=120, stdout=out, stderr=out)
            subprocess.run(
                [str(VENV / "bin" / "pip"), "install", "litellm[proxy]"],
                check=True,
                timeout=INSTALL_SECONDS,
                stdout=out,
                stderr=out,
            )
    except (subprocess.SubprocessError, OSError) as exc:
        return f"pip install 'litellm[proxy]' failed ({exc}); see {log}"
    return None if binary.exists() else "the litellm entry point is missing after install"


def write_config(path: Path, mock_url: str, model: str) -> None:
    # api_base without /v1/messages: LiteLLM appends it for the anthropic provider.
    path.write_text(
        "model_list:\n"
        f"  - model_name: {model}\n"
        "    litellm_params:\n"
        f"      model: anthropic/{model}\n"
        f"      api_base: {mock_url}\n"
        "      api_key: sk-ant-api03-mock-key-1\n"
        "general_settings:\n"
        f"  master_key: {MASTER_KEY}\n"
        "litellm_settings:\n"
        "  set_verbose: false\n"
        "  telemetry: false\n"
    )


def command(config: Path, port: int) -> list[str]:
    """One uvicorn worker, like every other target."""
    return [
        str(VENV / "bin" / "litellm"),
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]


ENV = {
    # Offline: the price map ships inside the package instead of being fetched at startup.
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_LOG": "ERROR",
    "LITELLM_TELEMETRY": "False",
    "DISABLE_ADMIN_UI": "True",
}
