"""What a goal is: its type, priority, state, target, and how progress toward the target is measured."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

# Config names goal types and priorities, so they live in the config layer; re-exported here.
from healer.config.goals import GoalPriority as GoalPriority
from healer.config.goals import GoalType as GoalType
from healer.config.goals import parse_priority as parse_priority


class GoalState(enum.StrEnum):
    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


OPEN_STATES = (GoalState.PENDING, GoalState.IN_PROGRESS)
ENDED_STATES = (GoalState.COMPLETED, GoalState.FAILED, GoalState.CANCELLED)


@dataclass(frozen=True)
class Target:
    """The goal is reached when `query` is at or below `below`, or at or above `above` (exactly one is set)."""

    query: str
    below: float | None = None
    above: float | None = None

    @property
    def threshold(self) -> float:
        value = self.below if self.below is not None else self.above
        assert value is not None
        return value

    def reached(self, value: float) -> bool:
        """Tell whether a measured value satisfies the target."""
        if self.below is not None:
            return value <= self.below
        return value >= self.threshold

    def progress(self, initial: float | None, value: float | None) -> float | None:
        """The share 0.0-1.0 of the way from the first measurement to the threshold; None when unmeasured."""
        if value is None or not math.isfinite(value):
            return None
        if self.reached(value):
            return 1.0
        if initial is None or not math.isfinite(initial) or self.reached(initial):
            return 0.0  # no way measured yet, or it was reached once and has slipped back since
        share = (initial - value) / (initial - self.threshold)
        # 1.0 means reached, so a value short of the threshold stays under it even when rounding says 1.
        return min(max(share, 0.0), math.nextafter(1.0, 0.0))

    def describe(self) -> str:
        return f"{self.query} {'<=' if self.below is not None else '>='} {self.threshold:g}"


@dataclass(frozen=True)
class GoalStep:
    """One strategy of a goal's plan that ran, and how it ended."""

    strategy: str
    started_at: float
    finished_at: float | None = None
    result: str | None = None  # ok | failed | refused | interrupted
    detail: str = ""


@dataclass(frozen=True)
class NewGoal:
    """A goal to open: from a template's trend query or from an operator."""

    key: str
    name: str
    source: str  # the template's name, or "operator"
    type: GoalType
    priority: GoalPriority
    description: str
    labels: dict[str, str]
    target: Target
    plan: list[str]
    deadline: float
    settle: float
    trigger_value: float | None = None


@dataclass(frozen=True)
class Goal:
    """A goal as the store holds it."""

    id: int
    key: str
    name: str
    source: str
    type: GoalType
    priority: GoalPriority
    description: str
    labels: dict[str, str]
    target: Target
    plan: list[str]
    state: GoalState
    created_at: float
    deadline: float
    settle: float
    trigger_value: float | None
    started_at: float | None
    ended_at: float | None
    initial_value: float | None
    last_value: float | None
    progress: float | None
    measured_at: float | None
    next_step: int
    step_started_at: float | None
    step_running: bool
    detail: str
    steps: list[GoalStep] = field(default_factory=list)

    @property
    def is_open(self) -> bool:
        return self.state in OPEN_STATES

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "key": self.key,
            "source": self.source,
            "type": self.type.value,
            "priority": self.priority.name,
            "priority_level": int(self.priority),
            "description": self.description,
            "labels": self.labels,
            "target": {"query": self.target.query, "below": self.target.below, "above": self.target.above},
            "plan": self.plan,
            "state": self.state.value,
            "created_at": self.created_at,
            "started_at": self.started_at,
            "ended_at": self.ended_at,
            "deadline": self.deadline,
            "trigger_value": self.trigger_value,
            "initial_value": self.initial_value,
            "value": self.last_value,
            "progress": self.progress,
            "measured_at": self.measured_at,
            "next_step": self.next_step,
            "detail": self.detail,
            "steps": [step.__dict__ for step in self.steps],
        }


def goal_key(source: str, labels: dict[str, str]) -> str:
    """One open goal per key: the template and the trigger series' labels, in a stable order."""
    return source + "{" + ",".join(f"{k}={labels[k]!r}" for k in sorted(labels)) + "}"
