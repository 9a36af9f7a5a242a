"""What the router decided and why, stage by stage: the explanation behind every choice."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

PerCandidateReason = Literal[
    "unhealthy", "rate_limited", "insufficient_quota", "rejected_by_plugin", "model_not_supported"
]

MAX_STAGES = 100
MAX_NAME = 256


@dataclass(frozen=True, slots=True)
class StageDecision:
    name: str
    kept: tuple[str, ...]
    dropped: tuple[tuple[str, PerCandidateReason], ...]
    duration_us: float


@dataclass(frozen=True, slots=True)
class TerminalDecision:
    strategy: str
    chosen: str | None
    order: tuple[str, ...]
    # The session's account was put first (it holds the conversation's prompt cache).
    sticky: bool = False


@dataclass(slots=True)
class RoutingTrace:
    stages: list[StageDecision]
    terminal: TerminalDecision | None = None

    def add(self, stage: StageDecision) -> None:
        if len(self.stages) < MAX_STAGES:
            self.stages.append(stage)

    def dropped(self) -> dict[str, PerCandidateReason]:
        """The last reason each upstream was dropped for."""
        return {upstream: reason for stage in self.stages for upstream, reason in stage.dropped}

    def as_dict(self) -> dict[str, object]:
        """The trace as plain data, for the usage record, a response header and `poolgate route explain`."""
        terminal = self.terminal
        return {
            "stages": [
                {
                    "name": stage.name[:MAX_NAME],
                    "kept": list(stage.kept),
                    "dropped": dict(stage.dropped),
                    "us": round(stage.duration_us, 1),
                }
                for stage in self.stages
            ],
            "terminal": None
            if terminal is None
            else {
                "strategy": terminal.strategy,
                "chosen": terminal.chosen,
                "order": list(terminal.order),
                "sticky": terminal.sticky,
            },
        }
