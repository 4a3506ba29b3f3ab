"""Goals in PostgreSQL: one row per goal, its plan's steps as JSON, at most one open goal per key."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence

from psycopg import sql

from healer.planner.model import (
    Goal,
    GoalNotFoundError,
    GoalPriority,
    GoalState,
    GoalStep,
    GoalType,
    NewGoal,
    Target,
)
from healer.storage.postgres.database import PostgresDatabase, Row, Transaction

_OPEN = sql.SQL("('pending', 'in_progress')")
# What a planner rule may change; the rest of a goal is fixed when it opens.
_MUTABLE = (
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
_UPDATE = sql.SQL("UPDATE goals SET {} WHERE id = %s").format(
    sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(name)) for name in _MUTABLE)
)


def _goal(row: Row) -> Goal:
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


def _mutable_values(goal: Goal) -> tuple[object, ...]:
    return (
        goal.state.value,
        goal.started_at,
        goal.ended_at,
        goal.initial_value,
        goal.last_value,
        goal.progress,
        goal.measured_at,
        goal.next_step,
        goal.step_started_at,
        goal.step_running,
        goal.detail,
        json.dumps([step.__dict__ for step in goal.steps]),
    )


class PostgresGoalRecords:
    """The goals table of one PostgreSQL database."""

    def __init__(self, database: PostgresDatabase) -> None:
        self._db = database

    async def get(self, goal_id: int) -> Goal:
        rows = await self._db.read("SELECT * FROM goals WHERE id = %s", (goal_id,))
        if not rows:
            raise GoalNotFoundError(goal_id)
        return _goal(rows[0])

    async def open_goals(self) -> list[Goal]:
        rows = await self._db.read(
            sql.SQL("SELECT * FROM goals WHERE state IN {} ORDER BY priority DESC, created_at, id").format(_OPEN)
        )
        return [_goal(row) for row in rows]

    async def open_summary(self) -> tuple[dict[GoalState, int], float | None]:
        rows = await self._db.read(
            sql.SQL(
                "SELECT state, count(*) AS n, max(progress) AS most FROM goals WHERE state IN {} GROUP BY state"
            ).format(_OPEN)
        )
        counts = {GoalState.PENDING: 0, GoalState.IN_PROGRESS: 0}
        progress = None
        for row in rows:
            counts[GoalState(row["state"])] = int(row["n"])
            if row["state"] == GoalState.IN_PROGRESS:
                progress = row["most"]
        return counts, progress

    async def ended_since(self, keys: Sequence[str], since: float) -> set[str]:
        rows = await self._db.read(
            "SELECT DISTINCT key FROM goals WHERE key = ANY(%s) AND ended_at >= %s", (list(keys), since)
        )
        return {row["key"] for row in rows}

    async def recent(self, state: GoalState | None = None, limit: int = 100) -> list[Goal]:
        if state is None:
            rows = await self._db.read("SELECT * FROM goals ORDER BY id DESC LIMIT %s", (limit,))
        else:
            rows = await self._db.read(
                "SELECT * FROM goals WHERE state = %s ORDER BY id DESC LIMIT %s", (state.value, limit)
            )
        return [_goal(row) for row in rows]

    async def create(self, goals: Sequence[NewGoal], now: float) -> list[Goal]:
        async def work(tx: Transaction) -> list[Goal]:
            opened = []
            for goal in goals:
                # The partial unique index decides: a replica opening the same key at the same moment
                # waits for the other's commit, then opens nothing.
                row = await tx.row(
                    "INSERT INTO goals (key, name, source, type, priority, description, labels, target_query,"
                    " target_below, target_above, plan, state, created_at, deadline, settle, trigger_value)"
                    " VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, 'pending', %s, %s, %s, %s)"
                    " ON CONFLICT DO NOTHING RETURNING *",
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
                if row is not None:
                    opened.append(_goal(row))
            return opened

        return await self._db.write(work)

    async def change(self, goal_id: int, change: Callable[[Goal], Goal]) -> Goal:
        async def work(tx: Transaction) -> Goal:
            # The row lock holds another replica's change back until this one is written.
            row = await tx.row("SELECT * FROM goals WHERE id = %s FOR UPDATE", (goal_id,))
            if row is None:
                raise GoalNotFoundError(goal_id)
            before = _goal(row)
            after = change(before)
            fixed = [name for name in Goal.__dataclass_fields__ if name not in _MUTABLE and name != "id"]
            moved = [name for name in fixed if getattr(after, name) != getattr(before, name)]
            if moved:
                raise ValueError(f"a goal's {', '.join(moved)} cannot change once it is open")
            if after != before:
                await tx.execute(_UPDATE, (*_mutable_values(after), goal_id))
            return after

        return await self._db.write(work)

    async def counts(self) -> dict[str, int]:
        rows = await self._db.read("SELECT state, count(*) AS n FROM goals GROUP BY state")
        found = {row["state"]: int(row["n"]) for row in rows}
        return {state.value: found.get(state.value, 0) for state in GoalState}

    async def purge(self, older_than: float) -> int:
        return await self._db.write(
            lambda tx: tx.execute(
                sql.SQL("DELETE FROM goals WHERE state NOT IN {} AND ended_at < %s").format(_OPEN), (older_than,)
            )
        )
