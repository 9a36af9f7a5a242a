"""Markdown tables and the headline ratios, all from numbers measured in one run."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

from load import Ttfb, WrkResult
from results import median_with_spread
from tail import Attribution

Cell = tuple[str, int]  # (mode "json" | "sse", concurrency)

DIRECT, BARE, GRANIAN, GATEWAY, LITELLM = "direct", "bare-uvicorn", "bare-granian", "poolgate", "litellm"


@dataclass
class Measured:
    """Everything one target produced; note says why a target has no numbers."""

    name: str
    # Per cell: the round shown in the tables (the median-throughput one) ...
    cells: dict[Cell, WrkResult] = field(default_factory=dict)
    # ... and every round, in order: the targets of one cell ran back to back in each round.
    rounds: dict[Cell, list[WrkResult]] = field(default_factory=dict)
    ttfb: Ttfb | None = None
    rss_mb: float | None = None
    note: str = ""


def matrix_table(targets: list[Measured], cells: list[Cell]) -> list[str]:
    lines = [
        "| target | mode | c | RPS | p50 ms | p99 ms | p99.9 ms | max ms | errors |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for target in targets:
        if not target.cells:
            lines.append(f"| {target.name} | – | – | unavailable: {target.note} | | | | | |")
            continue
        for mode, c in cells:
            r = target.cells.get((mode, c))
            if r is None:
                continue
            lines.append(
                f"| {target.name} | {mode} | {c} | {r.rps:.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} "
                f"| {r.p999_ms:.2f} | {r.max_ms:.1f} | {r.errors} |"
            )
    return lines


def added_latency_table(targets: list[Measured], cells: list[Cell]) -> list[str]:
    """p50 minus direct-to-mock's p50 in the same cell: what each hop adds."""
    by_name = {t.name: t for t in targets}
    direct = by_name.get(DIRECT)
    hops = [t for t in targets if t.name != DIRECT and t.cells]
    if direct is None or not direct.cells or not hops:
        return []
    lines = ["| mode | c | " + " | ".join(f"{t.name} +p50 ms" for t in hops) + " |"]
    lines.append("|---|---|" + "---:|" * len(hops))
    for cell in cells:
        base = direct.cells.get(cell)
        if base is None:
            continue
        values = [f"{t.cells[cell].p50_ms - base.p50_ms:+.2f}" if cell in t.cells else "–" for t in hops]
        lines.append(f"| {cell[0]} | {cell[1]} | " + " | ".join(values) + " |")
    return lines


def ttfb_rss_table(targets: list[Measured]) -> list[str]:
    direct = next((t for t in targets if t.name == DIRECT), None)
    base = direct.ttfb.p50_ms if direct is not None and direct.ttfb is not None else None
    lines = [
        "| target | TTFB p50 ms | TTFB p90 ms | TTFB overhead vs direct ms | RSS MB after load |",
        "|---|---:|---:|---:|---:|",
    ]
    for t in targets:
        if t.ttfb is None:
            p50 = p90 = overhead = "–"
        else:
            p50, p90 = f"{t.ttfb.p50_ms:.2f}", f"{t.ttfb.p90_ms:.2f}"
            overhead = f"{t.ttfb.p50_ms - base:+.2f}" if base is not None and t.name != DIRECT else "–"
        rss = f"{t.rss_mb:.0f}" if t.rss_mb is not None else "–"
        lines.append(f"| {t.name} | {p50} | {p90} | {overhead} | {rss} |")
    return lines


def _rounds(top: Measured, bottom: Measured, cell: Cell) -> list[tuple[WrkResult, WrkResult]]:
    return [(a, b) for a, b in zip(top.rounds.get(cell, []), bottom.rounds.get(cell, []), strict=False)]


def _throughput_ratios(top: Measured, bottom: Measured, cells: list[Cell]) -> str:
    """Per cell: the ratio within each round (the two ran back to back), median over rounds."""
    parts = []
    for mode, c in cells:
        ratios = [a.rps / b.rps for a, b in _rounds(top, bottom, (mode, c)) if b.rps > 0]
        if ratios:
            parts.append(f"{mode} c={c}: {median_with_spread(ratios, '{:.2f}'.format)}")
    return ", ".join(parts) if parts else "–"


def headline(targets: list[Measured], cells: list[Cell]) -> list[str]:
    by_name = {t.name: t for t in targets if t.cells}
    lines: list[str] = []
    gateway, bare = by_name.get(GATEWAY), by_name.get(BARE)
    if gateway and bare:
        lines.append(f"- **poolgate / bare-proxy throughput**: {_throughput_ratios(gateway, bare, cells)}")
    if gateway and (litellm := by_name.get(LITELLM)):
        lines.append(f"- **poolgate / LiteLLM throughput**: {_throughput_ratios(gateway, litellm, cells)}")
    elif gateway:
        note = next((t.note for t in targets if t.name == LITELLM), "not run")
        lines.append(f"- **poolgate / LiteLLM throughput**: LiteLLM unavailable ({note or 'no results'})")
    if gateway and bare:
        for mode in ("json", "sse"):
            added = [g.p50_ms - b.p50_ms for g, b in _rounds(gateway, bare, (mode, 1))]
            if added:
                paired = median_with_spread(added, "{:+.2f} ms".format)
                lines.append(f"- **p50 added latency at c=1 ({mode}), poolgate minus bare proxy**: {paired}")
        if gateway.ttfb and bare.ttfb:
            delta = gateway.ttfb.p50_ms - bare.ttfb.p50_ms
            lines.append(f"- **streaming TTFB p50, poolgate minus bare proxy**: {delta:+.2f} ms")
    if (granian := by_name.get(GRANIAN)) and bare:
        lines.append(f"- **bare proxy, granian / uvicorn throughput**: {_throughput_ratios(granian, bare, cells)}")
    if gateway and bare:
        lines.append(
            "- Ratios and added latencies are paired: the targets of a cell ran back to back within each round, "
            "and the figure is the median over rounds of the per-round value, the middle half of the rounds in "
            "brackets (with 4 rounds or more). The tables below show each cell's median-throughput round."
        )
    return lines


@dataclass(frozen=True)
class VariantRow:
    name: str
    why: str
    result: WrkResult
    gc_pauses: list[float]


def p99_table(rows: Iterable[VariantRow]) -> list[str]:
    lines = [
        "| variant | what it tests | RPS | p50 ms | p99 ms | p99.9 ms | max ms | gen-2 GCs (max pause ms) |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        r = row.result
        gcs = f"{len(row.gc_pauses)} ({max(row.gc_pauses):.1f})" if row.gc_pauses else "0"
        lines.append(
            f"| {row.name} | {row.why} | {r.rps:.0f} | {r.p50_ms:.2f} | {r.p99_ms:.2f} | {r.p999_ms:.2f} "
            f"| {r.max_ms:.1f} | {gcs} |"
        )
    return lines


def tail_table(rows: Iterable[tuple[str, Attribution]]) -> list[str]:
    lines = [
        "| server | requests | p50 ms | p99 ms | max ms | slow (> ms) | its gen-2 GC | mock's gen-2 GC "
        "| server off-CPU | load side off-CPU | unexplained | longest server run-queue wait in one request, ms |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, a in rows:
        lines.append(
            f"| {name} | {a.requests} | {a.p50_ms:.2f} | {a.p99_ms:.2f} | {a.max_ms:.1f} "
            f"| {a.slow} (> {a.threshold_ms:.1f}) | {a.gc} | {a.mock_gc} | {a.server_wait} | {a.load_wait} "
            f"| {a.unexplained} "
            f"| {a.worst_server_wait_ms:.1f} |"
        )
    return lines
