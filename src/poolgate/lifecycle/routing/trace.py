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
