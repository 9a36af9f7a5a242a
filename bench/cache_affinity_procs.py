"""Processes and admin calls for cache_affinity.py: gateway configs, the gateway's CPU time and usage
records, the mock's admin API, and which poolgate is being measured."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import aiohttp

from cache_affinity_mock import gateway_key

BENCH = Path(__file__).resolve().parent
GATEWAY_KEY = "pg-bench-cache-affinity-0123456789"


def routing_fields() -> set[str]:
    """The routing switches this checkout's GatewayConfig knows (the round-robin arm needs two of them)."""
    from poolgate.config import RoutingConfig

    return set(RoutingConfig.model_fields)


def gateway_config(path: Path, port: int, mock_url: str, keys: int, routing: str, health: str) -> Path:
    upstreams = "".join(
        f'  - {{id: k{index}, base_url: "{mock_url}", api_key: {gateway_key(index)}}}\n' for index in range(keys)
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"data_dir: {path.parent / 'poolgate-data'}\n"
        f"server: {{host: 127.0.0.1, port: {port}, log_level: warning}}\n"
        f"routing: {routing}\n"
        f"health: {health}\n"
        f"upstreams:\n{upstreams}"
        f'keys:\n  - {{name: bench, key: "{GATEWAY_KEY}"}}\n'
    )
    return path


async def mock_admin(mock_url: str, method: str, path: str, json: object | None = None) -> Any:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
        http.request(method, mock_url + path, json=json) as response,
    ):
        if response.status != 200:
            raise RuntimeError(f"mock admin {method} {path}: HTTP {response.status}")
        return await response.json()


async def requests_on(mock_url: str, key: str) -> int:
    """How many requests the mock has seen for one key (faulted ones included)."""
    stats = await mock_admin(mock_url, "GET", "/_mock/stats")
    return int(stats["requests_by_key"].get(key, 0))


async def cold_mock(mock_url: str) -> None:
    """No faults, empty caches, fresh counters."""
    await mock_admin(mock_url, "DELETE", "/_mock/faults")
    await mock_admin(mock_url, "POST", "/_mock/reset")


def usage_records(data_dir: Path) -> int:
    """Usage records in a stopped gateway's SQLite database."""
    with closing(sqlite3.connect(data_dir / "poolgate.db")) as db:
        return int(db.execute("SELECT count(*) FROM usage").fetchone()[0])
