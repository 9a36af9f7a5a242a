"""The benchmarks the README documents keep running. They reach into the gateway's internals (a pool made busy by
hand, the stages timed one by one outside a server), so a rename in src/ can break one without any test noticing:
`route_decision.py` ran into an AttributeError before timing anything for a while (`UpstreamStats.prompt` had
become `counted_input`). These run each harness's own code on a tiny scale; they time nothing."""

from __future__ import annotations

import asyncio
import importlib
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
SCRIPTS = sorted(path.stem for path in BENCH.glob("*.py"))


@pytest.fixture
def bench(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """The bench scripts importable as they import each other (from their own directory), their work files in
    `tmp_path` rather than bench/.work."""
    monkeypatch.syspath_prepend(str(BENCH))
    procs = importlib.import_module("procs")
    monkeypatch.setattr(procs, "WORK", tmp_path)
    yield
    for name in SCRIPTS:
        sys.modules.pop(name, None)


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.usefixtures("bench")
def test_every_bench_script_imports(script: str) -> None:
    assert isinstance(importlib.import_module(script), ModuleType)


@pytest.mark.usefixtures("bench")
def test_route_decision_routes_each_shape_through_its_busy_pool() -> None:
    route_decision = importlib.import_module("route_decision")
    body = route_decision.claude_code_body
    others = [route_decision.prefix_of(body(f"other-{i}", 1 + i % 6)) for i in range(8)]
    cold, warm = (route_decision.prefix_of(body(name, 6)) for name in ("cold", "warm"))
    calls = route_decision.routers(3, others, cold, warm)
    assert set(calls) == {"cold", "warm", "sticky"}
    for call in calls.values():
        assert call().order  # a decision with accounts to try
    assert route_decision.analysis_times(2)


@pytest.mark.usefixtures("bench")
def test_stage_costs_times_every_stage_in_a_loop() -> None:
    stage_costs = importlib.import_module("stage_costs")

    async def in_a_running_loop() -> dict[str, float]:  # as its main() runs it: _finish arms a timer on the loop
        return stage_costs.in_a_loop(3)

    timed = asyncio.run(in_a_running_loop())
    assert set(stage_costs.TOTALLED) <= set(timed)
    assert all(microseconds > 0 for microseconds in timed.values())
