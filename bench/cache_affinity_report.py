"""Cache-affinity numbers: cost at list prices, cache-read share, throughput, and the failover analysis."""

from __future__ import annotations

import itertools
import statistics
from collections import Counter
from dataclasses import dataclass, field

from cache_affinity_client import Turn

# prices.md, USD per million tokens = micro-dollars per token; kept ×1000 (nano-dollars) to stay integer.
NANO_PER_TOKEN = {
    "claude-sonnet-4-6": {"input": 3000, "write_5m": 3750, "write_1h": 6000, "read": 300, "output": 15000},
}


def cost_micro(turns: list[Turn], model: str) -> int:
    """Total cost in integer micro-dollars at list prices (rounded once, at the end)."""
    rate = NANO_PER_TOKEN[model]
    nano = sum(
        turn.input_tokens * rate["input"]
        + turn.creation_5m * rate["write_5m"]
        + turn.creation_1h * rate["write_1h"]
        + turn.read * rate["read"]
        + turn.output_tokens * rate["output"]
        for turn in turns
    )
    return (nano + 500) // 1000


def read_share(turns: list[Turn]) -> float:
    prompt = sum(turn.prompt_tokens for turn in turns)
    return sum(turn.read for turn in turns) / prompt if prompt else 0.0


def sequences(turns: list[Turn]) -> dict[int, list[Turn]]:
    by_session: dict[int, list[Turn]] = {}
    for turn in sorted(turns, key=lambda t: (t.session, t.turn)):
        by_session.setdefault(turn.session, []).append(turn)
    return by_session


def changes(upstreams: list[str]) -> int:
    return sum(1 for before, after in itertools.pairwise(upstreams) if before != after)


@dataclass
class Run:
    """One arm, one repeat: its turns and its wall time."""

    turns: list[Turn]
    wall: float
    gateway_cpu: float | None = None  # seconds of CPU the gateway's own process used during the run
    helper_cpu: float | None = None  # … and its child processes (the usage writer)

    @property
    def rps(self) -> float:
        return len(self.turns) / self.wall if self.wall else 0.0

    @property
    def cpu_per_request(self) -> float:
        return (self.gateway_cpu or 0.0) / len(self.turns) if self.turns else 0.0

    @property
    def helper_cpu_per_request(self) -> float:
        return (self.helper_cpu or 0.0) / len(self.turns) if self.turns else 0.0


@dataclass
class Arm:
    name: str
    what: str
    runs: list[Run] = field(default_factory=list)
    note: str = ""

    def turns(self) -> list[Turn]:
        return [turn for run in self.runs for turn in run.turns]

    def cost(self, model: str) -> float:
        """Micro-dollars per run (the mean over repeats)."""
        return cost_micro(self.turns(), model) / len(self.runs)

    def rps(self) -> float:
        return statistics.median(run.rps for run in self.runs)

    def cpu_per_request(self) -> float | None:
        measured = [run.cpu_per_request for run in self.runs if run.gateway_cpu is not None]
        return statistics.median(measured) if measured else None

    def helper_cpu_per_request(self) -> float | None:
        measured = [run.helper_cpu_per_request for run in self.runs if run.helper_cpu is not None]
        return statistics.median(measured) if measured else None

    def errors(self) -> int:
        return sum(turn.error is not None for turn in self.turns())

    def busiest_share(self) -> float:
        """The share of requests the busiest key served (mean over repeats); 1/K is an even spread."""
        shares = [
            max(Counter(turn.upstream for turn in run.turns).values()) / len(run.turns)
            for run in self.runs
            if run.turns
        ]
        return statistics.mean(shares) if shares else 0.0

    def key_changes(self) -> float:
        """Mean number of times a session's turns changed upstream."""
        counts = [
            changes([turn.upstream for turn in session])
            for run in self.runs
            for session in sequences(run.turns).values()
        ]
        return statistics.mean(counts) if counts else 0.0


def arm_table(arms: list[Arm], model: str) -> list[str]:
    lines = [
        "| arm | what | requests | errors (retried) | prompt tokens | cache read | cache write | uncached | "
        "read share | cost USD | key changes / session | busiest key's share | req/s (each repeat) | p50 ms | "
        "gateway CPU ms/req (+ usage writer) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for arm in arms:
        if not arm.runs:
            empty = " – |" * 11
            lines.append(f"| {arm.name} | {arm.what} |{empty} {arm.note or 'not run'} | – | – |")
            continue
        turns, count = arm.turns(), len(arm.runs)
        prompt = sum(turn.prompt_tokens for turn in turns) // count
        read = sum(turn.read for turn in turns) // count
        write = sum(turn.creation_5m + turn.creation_1h for turn in turns) // count
        uncached = sum(turn.input_tokens for turn in turns) // count
        retried = sum(turn.attempts > 1 for turn in turns)
        rps = f"{arm.rps():.1f} ({', '.join(f'{run.rps:.1f}' for run in arm.runs)})"
        p50 = statistics.median((turn.finished - turn.started) * 1000 for turn in turns)
        cpu, helper = arm.cpu_per_request(), arm.helper_cpu_per_request()
        cpu_ms = "–" if cpu is None or helper is None else f"{cpu * 1e3:.2f} (+ {helper * 1e3:.2f})"
        lines.append(
            f"| {arm.name} | {arm.what} | {len(turns) // count} | {arm.errors()} ({retried}) | {prompt:,} | {read:,} | "
            f"{write:,} | {uncached:,} | {read_share(turns):.1%} | {arm.cost(model) / 1e6:.4f} | "
            f"{arm.key_changes():.2f} | {arm.busiest_share():.0%} | {rps} | {p50:.1f} | {cpu_ms} |"
        )
    return lines


def headline(rr: Arm, pg: Arm, ideal: Arm, model: str) -> list[str]:
    if not (rr.runs and pg.runs and ideal.runs):
        return ["- not every arm ran: no headline ratios"]
    cost_rr, cost_pg, cost_ideal = rr.cost(model), pg.cost(model), ideal.cost(model)
    lines = []
    if cost_rr > cost_ideal:
        recovered = (cost_rr - cost_pg) / (cost_rr - cost_ideal)
        verdict = "meets" if recovered >= 0.9 else "misses"
        lines.append(
            f"- **recovered saving** (cost_rr − cost_poolgate) / (cost_rr − cost_ideal): **{recovered:.1%}** "
            f"({verdict} the ≥ 90 % target); the ideal saves {1 - cost_ideal / cost_rr:.1%} of round-robin's cost, "
            f"poolgate {1 - cost_pg / cost_rr:.1%}"
        )
    else:
        lines.append("- the ideal is not cheaper than round-robin here: recovered saving undefined")
    # Runs i of both arms ran back to back (ABBA order): the ratio within a pair cancels the machine's drift.
    ratios = [p.rps / r.rps for p, r in zip(pg.runs, rr.runs, strict=False) if r.rps]
    loss = 1 - statistics.median(ratios)
    verdict = "meets" if loss <= 0.05 else "misses"
    lines.append(
        f"- **throughput loss** 1 − rps_poolgate / rps_round_robin: **{loss:+.1%}** ({verdict} the ≤ 5 % target; "
        f"median of {len(ratios)} back-to-back pairs, each run through a fresh gateway; pairs: "
        f"{', '.join(f'{1 - ratio:+.0%}' for ratio in ratios)})"
    )
    cpu_rr, cpu_pg = rr.cpu_per_request(), pg.cpu_per_request()
    helper_rr, helper_pg = rr.helper_cpu_per_request(), pg.helper_cpu_per_request()
    if cpu_rr and cpu_pg and helper_rr is not None and helper_pg is not None:
        lines.append(
            f"- **gateway CPU per request** (its own process; medians): round-robin {cpu_rr * 1e3:.2f} ms, poolgate "
            f"{cpu_pg * 1e3:.2f} ms: capacity loss 1 − cpu_rr / cpu_poolgate **{1 - cpu_rr / cpu_pg:+.1%}** (pairs: "
            + ", ".join(
                f"{1 - r.cpu_per_request / p.cpu_per_request:+.0%}"
                for p, r in zip(pg.runs, rr.runs, strict=False)
                if p.cpu_per_request
            )
            + "), what bounds a saturated one-core gateway; CPU time also swells when neighbours share the core's "
            "caches, so read the pairs. Its usage "
            f"writer process adds {helper_rr * 1e3:.2f} ms (round-robin) and {helper_pg * 1e3:.2f} ms (poolgate) "
            f"per request on the same core here; both together: capacity loss "
            f"{1 - (cpu_rr + helper_rr) / (cpu_pg + helper_pg):+.1%}"
        )
    lines.append(
        f"- **cache-read share of prompt tokens**: round-robin {read_share(rr.turns()):.1%}, "
        f"poolgate {read_share(pg.turns()):.1%}, ideal {read_share(ideal.turns()):.1%}"
    )
    return lines


def concentration(arm: Arm, keys: int) -> list[str]:
    """A router that piles sessions onto few keys looks cheap on an unlimited mock and runs out of rate limit
    (and loses its failover margin) in production."""
    share = arm.busiest_share()
    if keys < 2 or share <= 2 / keys:
        return []
    return [
        f"{arm.name} sent {share:.0%} of its requests to one key (an even spread is {1 / keys:.0%}): sessions pile "
        "onto the key that already holds the shared tools + system prefix; with tighter rate limits that key "
        "runs out first, and when it fails every session on it moves at once"
    ]


@dataclass
class Failover:
    """The failover scenario: the turns, when the fault went in, and on which upstream."""

    turns: list[Turn]
    wall: float
    fault_at: float
    failed: str
    fault: str
    met_fault: int  # requests the failed key received after the fault: each a failover before the first byte


def _before(turn: Turn, fault_at: float) -> bool:
    """Answered before the fault went in. A turn in flight at that moment may still reach the failed key
    after it: it belongs to "after"."""
    return turn.finished < fault_at


def _compact(session: list[Turn], fault_at: float) -> str:
    parts = []
    marked = False
    for turn in session:
        if not marked and not _before(turn, fault_at):
            parts.append("|")
            marked = True
        parts.append(turn.upstream + ("!" if turn.error else ""))
    return " ".join(parts)


def upstream_lines(turns: list[Turn]) -> list[str]:
    return [
        f"session {session[0].session:>3}: {' '.join(turn.upstream + ('!' if turn.error else '') for turn in session)}"
        for session in sequences(turns).values()
    ]


def failover_report(run: Failover) -> tuple[list[str], list[str]]:
    """The report lines, and what looked wrong (empty when the scenario went as it should)."""
    affected, others = [], []
    for session in sequences(run.turns).values():
        before = [turn for turn in session if _before(turn, run.fault_at)]
        if not before:
            continue
        (affected if before[-1].upstream == run.failed else others).append(session)
    moves = {}
    first_after, later_after, reference_first, reference_later = [], [], [], []
    for session in affected:
        before = [turn for turn in session if _before(turn, run.fault_at)]
        after = [turn for turn in session if not _before(turn, run.fault_at)]
        moves[session[0].session] = changes([before[-1].upstream] + [turn.upstream for turn in after])
        moved = [index for index, turn in enumerate(after) if turn.upstream != run.failed]
        if moved:
            first_after.append(after[moved[0]])
            later_after.extend(after[moved[0] + 1 :])
    for session in others:
        after = [turn for turn in session if not _before(turn, run.fault_at)]
        reference_first.extend(after[:1])
        reference_later.extend(after[1:])
    moved_others = [session for session in others if changes([turn.upstream for turn in session])]
    counts = {n: sum(1 for m in moves.values() if m == n) for n in sorted(set(moves.values()))}
    errors = [turn for turn in run.turns if turn.error]
    began = min(turn.started for turn in run.turns)
    lines = [
        f"Fault: `{run.fault}` on upstream `{run.failed}` once half the turns had finished "
        f"({run.fault_at - began:.1f} s into the run of {run.wall:.1f} s); client-visible errors: {len(errors)}, "
        f"turns that needed a client retry: {sum(turn.attempts > 1 for turn in run.turns)}.",
        "",
        "| what | value |",
        "|---|---:|",
        f"| sessions on `{run.failed}` when it failed | {len(affected)} |",
        f"| … that moved to another upstream | {sum(1 for m in moves.values() if m)} |",
        "| … moves per session after the fault (count of sessions) | "
        + (", ".join(f"{n} move{'s' if n != 1 else ''}: {c}" for n, c in counts.items()) or "–")
        + " |",
        f"| other sessions that changed upstream at any time | {len(moved_others)} of {len(others)} |",
        f"| requests that met the fault on `{run.failed}` (each failed over before the first byte) | {run.met_fault} |",
        f"| cache-read share, first turn on the new upstream | {read_share(first_after):.1%} |",
        f"| cache-read share, later turns on the new upstream | {read_share(later_after):.1%} |",
        "| reference: other sessions' first / later turns after the fault | "
        + (f"{read_share(reference_first):.1%} / {read_share(reference_later):.1%} |" if others else "– (none) |"),
        "",
        "Upstream per turn (`|` = the fault: turns after it were answered after it went in; `!` = the turn "
        "failed) of the sessions that were on the failed upstream"
        + (" and of the others that moved" if moved_others else "")
        + ":",
        "",
        "```",
        *(f"session {s[0].session:>3}: {_compact(s, run.fault_at)}" for s in [*affected, *moved_others]),
        "```",
    ]
    wrong = []
    if not affected:
        wrong.append("no session was on the failed upstream when the fault went in")
    if any(m != 1 for m in moves.values()):
        wrong.append(f"sessions on the failed upstream did not all move exactly once: {counts}")
    if moved_others:
        wrong.append(f"{len(moved_others)} sessions that were not on the failed upstream changed upstream")
    if errors:
        wrong.append(f"{len(errors)} turns failed for the client")
    return lines, wrong
