"""Goals in the store: one row per goal, its plan's steps as JSON, at most one open goal per key."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from healer.planner.model import (
    ENDED_STATES,
    Goal,
    GoalPriority,
    GoalState,
    GoalStep,
    GoalType,
    NewGoal,
    Target,
)
from healer.store import SQLiteStore

GOALS_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS goals (
        id INTEGER PRIMARY KEY,
        key TEXT NOT NULL,
        name TEXT NOT NULL,
        source TEXT NOT NULL,
        type TEXT NOT NULL,
        priority INTEGER NOT NULL,
        description TEXT NOT NULL,
        labels TEXT NOT NULL,
        target_query TEXT NOT NULL,
        target_below REAL,
        target_above REAL,
        plan TEXT NOT NULL,
        state TEXT NOT NULL,
        created_at REAL NOT NULL,
        deadline REAL NOT NULL,
        settle REAL NOT NULL,
        trigger_value REAL,
        started_at REAL,
        ended_at REAL,
        initial_value REAL,
        last_value REAL,
        progress REAL,
        measured_at REAL,
        next_step INTEGER NOT NULL DEFAULT 0,
        step_started_at REAL,
        step_running INTEGER NOT NULL DEFAULT 0,
        detail TEXT NOT NULL DEFAULT '',
        steps TEXT NOT NULL DEFAULT '[]'
    )""",
    # The database itself keeps "one open goal per key", so two cycles can never open the same goal twice.
    "CREATE UNIQUE INDEX IF NOT EXISTS goals_open_key ON goals(key) WHERE state IN ('pending', 'in_progress')",
    "CREATE INDEX IF NOT EXISTS goals_open ON goals(state) WHERE state IN ('pending', 'in_progress')",
    "CREATE INDEX IF NOT EXISTS goals_key_ended ON goals(key, ended_at)",
)
_OPEN = "('pending', 'in_progress')"


class GoalNotFoundError(LookupError):
    """No goal has that id."""


class GoalEndedError(Exception):
    """The goal has ended already; it cannot change any more."""


def _goal(row: sqlite3.Row) -> Goal:
    return Goal(
        id=row["id"],
        key=row["key"],
        name=row["name"],
        source=row["source"],
        type=GoalType(row["type"]),
        priority=GoalPriority(row["priority"]),
        description=row["description"],
        labels=json.loads(row["labels"]),
        target=Target(row["target_query"], row["target_below"], row["target_above"]),
        plan=json.loads(row["plan"]),
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
        steps=[GoalStep(**step) for step in json.loads(row["steps"])],
    )


def _steps_json(steps: Sequence[GoalStep]) -> str:
    return json.dumps([step.__dict__ for step in steps])


class GoalRecords:
    """The goals table, on the healing store's file and thread (call it through `AsyncStore.call`)."""

    def __init__(self, store: SQLiteStore) -> None:
        self._store = store

        def create(db: sqlite3.Connection) -> None:
            for statement in GOALS_SCHEMA:
                db.execute(statement)

        store.transaction(create)

    def _get(self, db: sqlite3.Connection, goal_id: int) -> Goal:
        row = db.execute("SELECT * FROM goals WHERE id = ?", (goal_id,)).fetchone()
        if row is None:
            raise GoalNotFoundError(goal_id)
        return _goal(row)

    def _update(self, db: sqlite3.Connection, goal_id: int, **columns: Any) -> Goal:
        assignments = ", ".join(f"{name} = ?" for name in columns)
        db.execute(f"UPDATE goals SET {assignments} WHERE id = ?", (*columns.values(), goal_id))  # noqa: S608 - names are ours
        return self._get(db, goal_id)

    def get(self, goal_id: int) -> Goal:
        """The goal with that id; raises GoalNotFoundError."""
        rows = self._store.read("SELECT * FROM goals WHERE id = ?", (goal_id,))
        if not rows:
            raise GoalNotFoundError(goal_id)
        return _goal(rows[0])

    def open_goals(self) -> list[Goal]:
        """Every pending or in-progress goal, in the order the planner takes them: priority, then age."""
        rows = self._store.read(
            f"SELECT * FROM goals WHERE state IN {_OPEN} ORDER BY priority DESC, created_at, id"  # noqa: S608 - constant
        )
        return [_goal(row) for row in rows]

    def open_summary(self) -> tuple[dict[GoalState, int], float | None]:
        """How many goals are pending and in progress, and the progress of the one in progress."""
        rows = self._store.read(
            f"SELECT state, count(*), max(progress) FROM goals WHERE state IN {_OPEN} GROUP BY state"  # noqa: S608
        )
        counts = {GoalState.PENDING: 0, GoalState.IN_PROGRESS: 0}
        progress = None
        for state, count, most in rows:
            counts[GoalState(state)] = int(count)
            if state == GoalState.IN_PROGRESS:
                progress = most
        return counts, progress

    def ended_since(self, keys: Sequence[str], since: float) -> set[str]:
        """Those of `keys` that had a goal end at or after `since`."""
        found: set[str] = set()
        for start in range(0, len(keys), 500):  # SQLite's limit on bound parameters
            chunk = keys[start : start + 500]
            marks = ", ".join("?" * len(chunk))
            rows = self._store.read(
                f"SELECT DISTINCT key FROM goals WHERE key IN ({marks}) AND ended_at >= ?",  # noqa: S608 - marks only
                (*chunk, since),
            )
            found |= {row[0] for row in rows}
        return found

    def recent(self, state: GoalState | None = None, limit: int = 100) -> list[Goal]:
        """Goals newest first, optionally of one state."""
        if state is None:
            rows = self._store.read("SELECT * FROM goals ORDER BY id DESC LIMIT ?", (limit,))
        else:
            rows = self._store.read("SELECT * FROM goals WHERE state = ? ORDER BY id DESC LIMIT ?", (state, limit))
        return [_goal(row) for row in rows]

    def create(self, goals: Sequence[NewGoal], now: float) -> list[Goal]:
        """Open each goal whose key has no open goal yet; return the ones opened."""

        def work(db: sqlite3.Connection) -> list[Goal]:
            opened = []
            for goal in goals:
                cursor = db.execute(
                    "INSERT INTO goals (key, name, source, type, priority, description, labels, target_query,"
                    " target_below, target_above, plan, state, created_at, deadline, settle, trigger_value)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?)"
                    " ON CONFLICT DO NOTHING",
                    (
                        goal.key,
                        goal.name,
                        goal.source,
                        goal.type.value,
                        int(goal.priority),
                        goal.description,
                        json.dumps(goal.labels, sort_keys=True),
                        goal.target.query,
                        goal.target.below,
                        goal.target.above,
                        json.dumps(goal.plan),
                        now,
                        goal.deadline,
                        goal.settle,
                        goal.trigger_value,
                    ),
                )
                if cursor.rowcount:
                    opened.append(self._get(db, int(cursor.lastrowid or 0)))
            return opened

        return self._store.transaction(work)

    def start(self, goal_id: int, initial: float | None, progress: float | None, now: float) -> Goal:
        """Make a pending goal the one in progress, with its first measurement."""

        def work(db: sqlite3.Connection) -> Goal:
            goal = self._get(db, goal_id)
            if goal.state is not GoalState.PENDING:
                raise GoalEndedError(f"goal {goal_id} is {goal.state.value}, not pending")
            return self._update(
                db,
                goal_id,
                state=GoalState.IN_PROGRESS.value,
                started_at=now,
                initial_value=initial,
                last_value=initial,
                progress=progress,
                measured_at=now if initial is not None else None,
            )

        return self._store.transaction(work)

    def measured(self, goal_id: int, value: float | None, progress: float | None, now: float) -> None:
        """Record the latest measurement of an open goal's target."""
        self._store.transaction(
            lambda db: db.execute(
                # The first value ever measured is where progress counts from, even when the start had none.
                "UPDATE goals SET last_value = ?, progress = ?, measured_at = ?,"  # noqa: S608 - constants
                f" initial_value = coalesce(initial_value, ?) WHERE id = ? AND state IN {_OPEN}",
                (value, progress, now, value, goal_id),
            )
        )

    def begin_step(self, goal_id: int, now: float) -> Goal:
        """Record that the goal's next step starts now."""

        def work(db: sqlite3.Connection) -> Goal:
            goal = self._get(db, goal_id)
            if goal.state is not GoalState.IN_PROGRESS:
                raise GoalEndedError(f"goal {goal_id} is {goal.state.value}")
            step = GoalStep(goal.plan[goal.next_step], now)
            steps = [*goal.steps, step]
            return self._update(db, goal_id, step_running=1, step_started_at=now, steps=_steps_json(steps))

        return self._store.transaction(work)

    def end_step(self, goal_id: int, result: str, detail: str, now: float) -> Goal:
        """Record how the running step ended; the goal moves on to its next step after `settle`."""

        def work(db: sqlite3.Connection) -> Goal:
            goal = self._get(db, goal_id)
            if not goal.is_open:
                return goal  # ending the goal closed its step already
            steps = list(goal.steps)
            if steps and steps[-1].finished_at is None:
                steps[-1] = replace(steps[-1], finished_at=now, result=result, detail=detail)
            return self._update(
                db,
                goal_id,
                step_running=0,
                step_started_at=now,
                next_step=goal.next_step + 1,
                steps=_steps_json(steps),
            )

        return self._store.transaction(work)

    def abandon_step(self, goal_id: int) -> Goal:
        """Forget the step that was about to run and did not, so that it runs after all (after a restart)."""

        def work(db: sqlite3.Connection) -> Goal:
            goal = self._get(db, goal_id)
            steps = goal.steps[:-1] if goal.steps and goal.steps[-1].finished_at is None else goal.steps
            return self._update(db, goal_id, step_running=0, steps=_steps_json(steps))

        return self._store.transaction(work)

    def end(self, goal_id: int, state: GoalState, detail: str, now: float) -> Goal:
        """End an open goal as completed, failed or cancelled; raises GoalEndedError if it had ended.

        A step still recorded as running is closed as interrupted, so no ended goal keeps a running step.
        """
        assert state in ENDED_STATES

        def work(db: sqlite3.Connection) -> Goal:
            goal = self._get(db, goal_id)
            if not goal.is_open:
                raise GoalEndedError(f"goal {goal_id} is {goal.state.value} already")
            steps = [
                replace(step, finished_at=now, result="interrupted", detail=f"the goal ended {state.value}")
                if step.finished_at is None
                else step
                for step in goal.steps
            ]
            return self._update(
                db, goal_id, state=state.value, detail=detail, ended_at=now, step_running=0, steps=_steps_json(steps)
            )

        return self._store.transaction(work)

    def counts(self) -> dict[str, int]:
        """How many goals the store holds in each state."""
        rows = self._store.read("SELECT state, count(*) AS n FROM goals GROUP BY state")
        found = {row["state"]: int(row["n"]) for row in rows}
        return {state.value: found.get(state.value, 0) for state in GoalState}

    def purge(self, older_than: float) -> int:
        """Delete goals that ended before `older_than`."""
        return int(
            self._store.transaction(
                lambda db: (
                    db.execute(
                        f"DELETE FROM goals WHERE state NOT IN {_OPEN} AND ended_at < ?",  # noqa: S608 - constant
                        (older_than,),
                    ).rowcount
                )
            )
        )
