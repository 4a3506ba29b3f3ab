"""Operators' acts that belong to no episode, as the audit trail records them: who closed the circuit breaker,
opened or cancelled a goal, or acknowledged an optimisation's failed rollback.

They are events with no episode (the events table allows it), written in the same transaction as the change
they record, so a crash keeps both or neither; `by` is the authenticated name, as approvals record it.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from healer.planner.model import Goal


class OperatorAct(enum.StrEnum):
    """What an operator did that the audit trail records outside any episode."""

    CIRCUIT_CLOSED = "circuit_closed"
    GOAL_OPENED = "goal_opened"
    GOAL_CANCELLED = "goal_cancelled"
    OPTIMIZATION_ACKNOWLEDGED = "optimization_acknowledged"


@dataclass(frozen=True)
class AuditEntry:
    """One recorded act: when, what, who, and what it was done to (a goal's id and name, a candidate)."""

    id: int
    at: float
    act: OperatorAct
    by: str
    subject: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "at": self.at, "act": self.act.value, "by": self.by, "subject": self.subject}


def act_detail(by: str, subject: dict[str, Any] | None = None) -> dict[str, Any]:
    """The event's detail: `by` beside the subject, as an approval's event holds `by`."""
    return {"by": by, **(subject or {})}


def goal_subject(goal: Goal) -> dict[str, Any]:
    """What a goal's act names: its id, name and labels (the key of "the same goal")."""
    return {"goal": goal.id, "name": goal.name, "labels": dict(goal.labels)}


def audit_entry(row_id: int, ts: float, kind: str, detail: dict[str, Any]) -> AuditEntry:
    """An entry from a stored event's columns (its detail decoded)."""
    subject = {key: value for key, value in detail.items() if key != "by"}
    return AuditEntry(row_id, ts, OperatorAct(kind), str(detail.get("by", "")), subject)


# The stored kinds, for a query's `kind IN (...)`.
OPERATOR_ACT_KINDS: tuple[str, ...] = tuple(act.value for act in OperatorAct)
