"""What an optimisation is: its outcome, how a change is judged, and how confidence is learned."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass
from typing import Any


class Outcome(enum.StrEnum):
    """How one trial of a candidate ended; `measuring` while it has not."""

    APPLYING = "applying"
    MEASURING = "measuring"
    ROLLING_BACK = "rolling_back"
    KEPT = "kept"
    ROLLED_BACK = "rolled_back"
    APPLY_FAILED = "apply_failed"
    ROLLBACK_FAILED = "rollback_failed"
    UNMEASURED = "unmeasured"


IN_FLIGHT = (Outcome.APPLYING, Outcome.MEASURING, Outcome.ROLLING_BACK)
ENDED = tuple(o for o in Outcome if o not in IN_FLIGHT)


def improvement(before: float, after: float, direction: str) -> float:
    """The relative change in the good direction: 0.2 means 20 % better, negative means worse."""
    change = (before - after) if direction == "decrease" else (after - before)
    if before == 0:
        return math.copysign(math.inf, change) if change else 0.0
    return change / abs(before)


def score(expected_improvement: float, cost: float, confidence: float) -> float:
    """Expected improvement per unit of cost, discounted by the confidence that it materialises."""
    return expected_improvement / cost * confidence


@dataclass(frozen=True)
class Trial:
    """One application of a candidate, as the store holds it."""

    id: int
    candidate: str
    component: str
    outcome: Outcome
    confidence: float
    score: float
    before: float | None
    after: float | None
    improvement: float | None
    applied_at: float
    measure_at: float | None
    ended_at: float | None
    detail: str
    # While rolling back: how the trial ends once the rollback has run (rolled_back or unmeasured).
    verdict: Outcome | None = None
    acknowledged_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        improvement_value = self.improvement if self.improvement is None or math.isfinite(self.improvement) else None
        return {
            "id": self.id,
            "candidate": self.candidate,
            "component": self.component,
            "outcome": self.outcome.value,
            "confidence": self.confidence,
            "score": self.score,
            "before": self.before,
            "after": self.after,
            "improvement": improvement_value,
            "applied_at": self.applied_at,
            "measure_at": self.measure_at,
            "ended_at": self.ended_at,
            "detail": self.detail,
            "acknowledged_at": self.acknowledged_at,
        }


@dataclass(frozen=True)
class CandidateRecord:
    """What a candidate's trials add up to."""

    trials: int  # those that taught something
    helped: int
    last: Trial
