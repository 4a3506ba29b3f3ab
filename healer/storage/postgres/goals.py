"""Goals in PostgreSQL: one row per goal, its plan's steps as JSON, at most one open goal per key."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from psycopg import sql

from healer.planner.model import (
    Goal,
    GoalNotFoundError,
    GoalState,
    NewGoal,
)
from healer.storage.audit import OperatorAct, act_detail, goal_subject
from healer.storage.postgres.database import PostgresDatabase, Transaction
from healer.storage.rows import GOAL_MUTABLE, changed_goal, goal_mutable_values, new_goal_values
from healer.storage.rows import goal as _goal

_OPEN = sql.SQL("('pending', 'in_progress')")
_UPDATE = sql.SQL("UPDATE goals SET {} WHERE id = %s").format(
    sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(name)) for name in GOAL_MUTABLE)
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

    async def create(self, goals: Sequence[NewGoal], now: float, by: str | None = None) -> list[Goal]:
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
                    new_goal_values(goal, now),
                )
                if row is not None:
                    opened.append(_goal(row))
                    if by is not None:
                        await tx.event(OperatorAct.GOAL_OPENED, act_detail(by, goal_subject(opened[-1])))
            return opened

        return await self._db.write(work)

    async def change(
        self, goal_id: int, change: Callable[[Goal], Goal], act: tuple[OperatorAct, str] | None = None
    ) -> Goal:
        async def work(tx: Transaction) -> Goal:
            # The row lock holds another replica's change back until this one is written.
            row = await tx.row("SELECT * FROM goals WHERE id = %s FOR UPDATE", (goal_id,))
            if row is None:
                raise GoalNotFoundError(goal_id)
            before = _goal(row)
            after = changed_goal(before, change)
            if after != before:
                await tx.execute(_UPDATE, (*goal_mutable_values(after), goal_id))
            if act is not None and after != before:  # a second cancel changes nothing and is no act
                await tx.event(act[0], act_detail(act[1], goal_subject(after)))
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
