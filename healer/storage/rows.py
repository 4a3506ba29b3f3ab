"""Rows to domain values and back, the same for every backend: each backend keeps only its SQL.

A row is anything read by column name: `sqlite3.Row` and psycopg's dict rows both are.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

from healer.auth.roles import CredentialKind, Identity, Role
from healer.auth.sessions import SessionRecord
from healer.healing.model import (
    Action,
    ActionFilter,
    ActionState,
    Episode,
    EpisodeState,
    Escalation,
    Event,
    Finish,
    InboxItem,
    InboxPosition,
    NewAction,
    OpenRequest,
    Outcome,
    Pause,
    Suspension,
)
from healer.healing.payload import WebhookAlert
from healer.optimizer.model import CandidateRecord, Trial
from healer.optimizer.model import Outcome as TrialOutcome
from healer.planner.model import Goal, GoalPriority, GoalState, GoalStep, GoalType, NewGoal, Target


class Row(Protocol):
    """A row read by column name, with its column names (`sqlite3.Row`, psycopg's `DictRow`)."""

    def keys(self) -> Iterable[str]: ...

    def __getitem__(self, key: str, /) -> Any: ...


# -- JSON columns ------------------------------------------------------------------------------


def json_column(value: Any) -> Any:
    """A JSON column's value: decoded when the driver hands over its text, as it is when it decoded it."""
    # Both schemas keep JSON as TEXT today; a json/jsonb column would arrive already decoded from psycopg.
    if isinstance(value, str | bytes | bytearray):
        return json.loads(value)
    return value


def optional_json_column(value: Any) -> Any:
    """A nullable JSON column's value; None for NULL or empty text."""
    return None if value is None or value in ("", b"") else json_column(value)


def plan_json(plan: dict[str, Any] | None) -> str | None:
    """A step's plan as stored (NULL for none)."""
    return json.dumps(plan) if plan is not None else None


# -- healing -----------------------------------------------------------------------------------


def suspensions(ended: Iterable[Sequence[Any]], held: Iterable[Sequence[Any]]) -> list[Suspension]:
    """Merge (reason, rule, count) rows of episodes ended suspended and of steps held now, by reason and rule."""
    counts: dict[tuple[str, str], list[int]] = {}
    for reason, rule, count in ended:
        counts.setdefault((reason, rule), [0, 0])[0] += int(count)
    for reason, rule, count in held:
        counts.setdefault((reason, rule), [0, 0])[1] += int(count)
    return [
        Suspension(reason, rule, ended_count, held_count)
        for (reason, rule), (ended_count, held_count) in sorted(counts.items())
    ]


def pause(row: Row) -> Pause:
    """The pause of a `pauses` row."""
    return Pause(
        row["id"], list(json_column(row["matchers"])), row["reason"], row["created_by"], row["created_at"],
        row["ends_at"], row["ended_at"], row["ended_by"],
    )  # fmt: skip


def episode(row: Row) -> Episode:
    """The episode of an `episodes` row."""
    return Episode(
        row["id"],
        row["fingerprint"],
        row["starts_at"],
        row["starts_at_epoch"],
        row["alertname"],
        json_column(row["labels"]),
        json_column(row["annotations"]),
        row["rule"],
        EpisodeState(row["state"]),
        row["created_at"],
        row["ended_at"],
        row["resolved_at"],
        row["silence_id"],
    )


def new_episode(episode_id: int, request: OpenRequest, now: float) -> Episode:
    """The episode a request has just opened, as inserted."""
    # Everything is known; reading the row back would only parse the JSON just written.
    alert = request.alert
    return Episode(
        episode_id, alert.fingerprint, alert.starts_at, alert.starts_at_epoch, alert.alertname,
        dict(alert.labels), dict(alert.annotations), request.rule, request.state, now,
        None if request.state is EpisodeState.OPEN else now, None, None,
    )  # fmt: skip


def new_action(
    action_id: int, episode_id: int, spec: NewAction, now: float, replica: str | None, until: float | None
) -> Action:
    """The pending step a spec has just inserted (taken by `replica` until `until`, when given)."""
    return Action(
        action_id, episode_id, spec.attempt, spec.step, spec.rule, spec.strategy, ActionState.PENDING, None, None,
        spec.not_before, None, False, now, None, None, None, None, None, None, replica, until,
    )  # fmt: skip


def action(row: Row) -> Action:
    """The step of an `actions` row."""
    return Action(
        row["id"],
        row["episode_id"],
        row["attempt"],
        row["step"],
        row["rule"],
        row["strategy"],
        ActionState(row["state"]),
        Outcome(row["outcome"]) if row["outcome"] else None,
        row["skip_reason"],
        row["not_before"],
        row["approval_deadline"],
        bool(row["approved"]),
        row["created_at"],
        row["started_at"],
        row["finished_at"],
        optional_json_column(row["plan"]),
        row["detail"],
        row["exit_code"],
        row["output"],
        row["replica"],
        row["lease_until"],
    )


def escalation(row: Row) -> Escalation:
    """The escalation of an `escalations` row."""
    return Escalation(**dict(row))


def event(row: Row) -> dict[str, Any]:
    """An audit event of an `events` row read as (ts, action_id, kind, detail), its detail spread out."""
    return {"ts": row["ts"], "action_id": row["action_id"], "kind": row["kind"], **json_column(row["detail"])}


def inbox_items(row: Row, alerts: Sequence[WebhookAlert], room: int) -> list[InboxItem]:
    """Up to `room` unprocessed alerts of an `inbox` row (id, received_at, done), given its parsed alerts."""
    done = row["done"]
    return [
        InboxItem(InboxPosition(row["id"], index), row["received_at"], alerts[index])
        for index in range(done, min(len(alerts), done + room))
    ]


def action_filter_terms(query: ActionFilter) -> list[tuple[str, str, object]]:
    """The (column, operator, value) terms of a query of the audit trail, over `actions a JOIN episodes e`."""
    terms: list[tuple[str, str, object]] = [
        (column, "=", value)
        for column, value in (
            ("e.alertname", query.alertname),
            ("e.fingerprint", query.fingerprint),
            ("a.episode_id", query.episode_id),
            ("a.rule", query.rule),
            ("a.strategy", query.strategy),
            ("a.outcome", query.outcome),
        )
        if value is not None
    ]
    if query.since is not None:
        terms.append(("a.created_at", ">=", query.since))
    if query.until is not None:
        terms.append(("a.created_at", "<=", query.until))
    return terms


def finish_refused(action: Action, replica: str | None, abandoned_before: float | None) -> bool:
    """Whether `HealingRecords.finish` must leave a step as it is (see there).

    A claim that merely lapsed (the store was out and nobody settled the step) is still its replica's:
    settling is itself a finish, so whichever of the two commits first wins and the other is refused.
    """
    if action.state is ActionState.DONE:
        return True
    running = action.state in (ActionState.RUNNING, ActionState.VERIFYING)
    if replica is not None and running and action.replica != replica:
        return True  # another replica holds it now: this one lost its claim
    # Its replica renewed the claim: it is not abandoned.
    return abandoned_before is not None and (action.lease_until or 0.0) >= abandoned_before


def finish_values(finish: Finish, now: float, action_id: int) -> tuple[object, ...]:
    """The values of the UPDATE that finishes a step: outcome, skip_reason, detail, exit_code, output,
    finished_at, started_at, plan, and the step's id."""
    return (
        finish.outcome.value,
        finish.skip_reason,
        finish.detail,
        finish.exit_code,
        finish.output,
        now,
        finish.started_at,
        plan_json(finish.plan),
        action_id,
    )


def finished(finish: Finish) -> Event:
    """The audit event of a step finished."""
    return "finished", {"outcome": finish.outcome.value, "skip_reason": finish.skip_reason, "detail": finish.detail}


def scheduled(spec: NewAction) -> Event:
    """The audit event of a step scheduled."""
    return "scheduled", {"strategy": spec.strategy, "attempt": spec.attempt, "not_before": spec.not_before}


# -- goals -------------------------------------------------------------------------------------

# What a planner rule may change; the rest of a goal is fixed when it opens.
GOAL_MUTABLE = (
    "state",
    "started_at",
    "ended_at",
    "initial_value",
    "last_value",
    "progress",
    "measured_at",
    "next_step",
    "step_started_at",
    "step_running",
    "detail",
    "steps",
)


def goal(row: Row) -> Goal:
    """The goal of a `goals` row."""
    return Goal(
        id=row["id"],
        key=row["key"],
        name=row["name"],
        source=row["source"],
        type=GoalType(row["type"]),
        priority=GoalPriority(row["priority"]),
        description=row["description"],
        labels=json_column(row["labels"]),
        target=Target(row["target_query"], row["target_below"], row["target_above"]),
        plan=json_column(row["plan"]),
        state=GoalState(row["state"]),
        created_at=row["created_at"],
        deadline=row["deadline"],
        settle=row["settle"],
        trigger_value=row["trigger_value"],
        started_at=row["started_at"],
        ended_at=row["ended_at"],
        initial_value=row["initial_value"],
        last_value=row["last_value"],
        progress=row["progress"],
        measured_at=row["measured_at"],
        next_step=row["next_step"],
        step_started_at=row["step_started_at"],
        step_running=bool(row["step_running"]),
        detail=row["detail"],
        steps=[GoalStep(**step) for step in json_column(row["steps"])],
    )


def new_goal_values(new: NewGoal, now: float) -> tuple[object, ...]:
    """A new goal's values for the INSERT of both backends: key, name, source, type, priority, description,
    labels, target_query, target_below, target_above, plan, created_at, deadline, settle, trigger_value."""
    return (
        new.key,
        new.name,
        new.source,
        new.type.value,
        int(new.priority),
        new.description,
        json.dumps(new.labels, sort_keys=True),
        new.target.query,
        new.target.below,
        new.target.above,
        json.dumps(new.plan),
        now,
        new.deadline,
        new.settle,
        new.trigger_value,
    )


def goal_mutable_values(changed: Goal) -> tuple[object, ...]:
    """The values of a goal's GOAL_MUTABLE columns, in that order, as stored."""
    # SQLite binds the bool `step_running` as the integer 1 or 0, PostgreSQL as a BOOLEAN.
    return (
        changed.state.value,
        changed.started_at,
        changed.ended_at,
        changed.initial_value,
        changed.last_value,
        changed.progress,
        changed.measured_at,
        changed.next_step,
        changed.step_started_at,
        changed.step_running,
        changed.detail,
        json.dumps([step.__dict__ for step in changed.steps]),
    )


def changed_goal(before: Goal, change: Callable[[Goal], Goal]) -> Goal:
    """Apply a planner rule to a goal; raises ValueError when the rule changes a fixed field."""
    after = change(before)
    fixed = [name for name in Goal.__dataclass_fields__ if name not in GOAL_MUTABLE and name != "id"]
    moved = [name for name in fixed if getattr(after, name) != getattr(before, name)]
    if moved:
        raise ValueError(f"a goal's {', '.join(moved)} cannot change once it is open")
    return after


# -- trials ------------------------------------------------------------------------------------


def trial(row: Row) -> Trial:
    """The trial of an `optimizations` row."""
    return Trial(
        id=row["id"],
        candidate=row["candidate"],
        component=row["component"],
        outcome=TrialOutcome(row["outcome"]),
        confidence=row["confidence"],
        score=row["score"],
        before=row["before"],
        after=row["after"],
        improvement=row["improvement"],
        applied_at=row["applied_at"],
        measure_at=row["measure_at"],
        ended_at=row["ended_at"],
        detail=row["detail"],
        verdict=TrialOutcome(row["verdict"]) if row["verdict"] else None,
        acknowledged_at=row["acknowledged_at"],
    )


def candidate_record(row: Row) -> CandidateRecord:
    """A candidate's record, of its last `optimizations` row joined with its `trials` and `helped` counts."""
    # SQLite's sum() of no rows is NULL where PostgreSQL's count() is 0.
    return CandidateRecord(int(row["trials"] or 0), int(row["helped"] or 0), trial(row))


def roles_column(identity: Identity) -> str:
    """An identity's roles as one column: their names, sorted, comma-separated."""
    return ",".join(sorted(identity.roles))


def session(row: Row) -> SessionRecord:
    """An open session from its row (user_name, roles, kind, expires_at, and credential when selected)."""
    roles = frozenset(Role(name) for name in row["roles"].split(",") if name)
    identity = Identity(row["user_name"], roles, CredentialKind(row["kind"]))
    credential = bytes(row["credential"]) if "credential" in row.keys() else b""  # noqa: SIM118 - sqlite3.Row
    return SessionRecord(identity, float(row["expires_at"]), credential)
