"""What a goal is: its type, priority, state, target, and how progress toward the target is measured."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field, replace
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


class GoalNotFoundError(LookupError):
    """No goal has that id."""


class GoalEndedError(Exception):
    """The goal has ended already; it cannot change any more."""


# How a goal changes. Each rule takes the goal as stored and returns it changed; storage applies
# one atomically (`GoalRecords.change`), so that two changes never interleave.


def started(goal: Goal, initial: float | None, progress: float | None, now: float) -> Goal:
    """A pending goal becomes the one in progress, with its first measurement."""
    if goal.state is not GoalState.PENDING:
        raise GoalEndedError(f"goal {goal.id} is {goal.state.value}, not pending")
    return replace(
        goal,
        state=GoalState.IN_PROGRESS,
        started_at=now,
        initial_value=initial,
        last_value=initial,
        progress=progress,
        measured_at=now if initial is not None else None,
    )


def measured(goal: Goal, value: float | None, progress: float | None, now: float) -> Goal:
    """An open goal's latest measurement; the first value ever measured is where progress counts from."""
    if not goal.is_open:
        return goal
    initial = goal.initial_value if goal.initial_value is not None else value
    return replace(goal, last_value=value, progress=progress, measured_at=now, initial_value=initial)


def step_begun(goal: Goal, now: float) -> Goal:
    """The goal's next step starts now."""
    if goal.state is not GoalState.IN_PROGRESS:
        raise GoalEndedError(f"goal {goal.id} is {goal.state.value}")
    step = GoalStep(goal.plan[goal.next_step], now)
    return replace(goal, step_running=True, step_started_at=now, steps=[*goal.steps, step])


def step_ended(goal: Goal, result: str, detail: str, now: float) -> Goal:
    """The running step ended; the goal moves on to its next step after `settle`."""
    if not goal.is_open:
        return goal  # ending the goal closed its step already
    steps = list(goal.steps)
    if steps and steps[-1].finished_at is None:
        steps[-1] = replace(steps[-1], finished_at=now, result=result, detail=detail)
    return replace(goal, step_running=False, step_started_at=now, next_step=goal.next_step + 1, steps=steps)


def step_abandoned(goal: Goal) -> Goal:
    """The step that was about to run did not, so that it runs after all (after a restart)."""
    steps = goal.steps[:-1] if goal.steps and goal.steps[-1].finished_at is None else goal.steps
    return replace(goal, step_running=False, steps=list(steps))


def ended(goal: Goal, state: GoalState, detail: str, now: float) -> Goal:
    """An open goal ends completed, failed or cancelled; a step still running is closed as interrupted."""
    if state not in ENDED_STATES:
        raise ValueError(f"{state.value} is not a state a goal ends in")
    if not goal.is_open:
        raise GoalEndedError(f"goal {goal.id} is {goal.state.value} already")
    steps = [
        replace(step, finished_at=now, result="interrupted", detail=f"the goal ended {state.value}")
        if step.finished_at is None
        else step
        for step in goal.steps
    ]
    return replace(goal, state=state, detail=detail, ended_at=now, step_running=False, steps=steps)
