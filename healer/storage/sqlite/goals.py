"""Goals in SQLite: one row per goal, its plan's steps as JSON, at most one open goal per key."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Sequence

from healer.planner.model import (
    Goal,
    GoalNotFoundError,
    GoalState,
    NewGoal,
)
from healer.storage.audit import OperatorAct, act_detail, goal_subject
from healer.storage.rows import GOAL_MUTABLE, changed_goal, goal_mutable_values, new_goal_values
from healer.storage.rows import goal as _goal
from healer.storage.sqlite.database import SQLiteDatabase

_OPEN = "('pending', 'in_progress')"


class SQLiteGoalRecords:
    """The goals table of one SQLite file."""

    def __init__(self, database: SQLiteDatabase) -> None:
        self._db = database

    @staticmethod
    def _get(db: sqlite3.Connection, goal_id: int) -> Goal:
        row = db.execute("SELECT * FROM goals WHERE id = ?", (goal_id,)).fetchone()
        if row is None:
            raise GoalNotFoundError(goal_id)
        return _goal(row)

    async def get(self, goal_id: int) -> Goal:
        rows = await self._db.read("SELECT * FROM goals WHERE id = ?", (goal_id,))
        if not rows:
            raise GoalNotFoundError(goal_id)
        return _goal(rows[0])

    async def open_goals(self) -> list[Goal]:
        rows = await self._db.read(
            f"SELECT * FROM goals WHERE state IN {_OPEN} ORDER BY priority DESC, created_at, id"  # noqa: S608 - constant
        )
        return [_goal(row) for row in rows]

    async def open_summary(self) -> tuple[dict[GoalState, int], float | None]:
        rows = await self._db.read(
            f"SELECT state, count(*), max(progress) FROM goals WHERE state IN {_OPEN} GROUP BY state"  # noqa: S608
        )
        counts = {GoalState.PENDING: 0, GoalState.IN_PROGRESS: 0}
        progress = None
        for state, count, most in rows:
            counts[GoalState(state)] = int(count)
            if state == GoalState.IN_PROGRESS:
                progress = most
        return counts, progress

    async def ended_since(self, keys: Sequence[str], since: float) -> set[str]:
        def work() -> set[str]:
            found: set[str] = set()
            for start in range(0, len(keys), 500):  # SQLite's limit on bound parameters
                chunk = keys[start : start + 500]
                marks = ", ".join("?" * len(chunk))
                rows = self._db.rows(
                    f"SELECT DISTINCT key FROM goals WHERE key IN ({marks}) AND ended_at >= ?",  # noqa: S608 - marks only
                    (*chunk, since),
                )
                found |= {row[0] for row in rows}
            return found

        return await self._db.run(work)

    async def recent(self, state: GoalState | None = None, limit: int = 100) -> list[Goal]:
        if state is None:
            rows = await self._db.read("SELECT * FROM goals ORDER BY id DESC LIMIT ?", (limit,))
        else:
            rows = await self._db.read(
                "SELECT * FROM goals WHERE state = ? ORDER BY id DESC LIMIT ?", (state.value, limit)
            )
        return [_goal(row) for row in rows]

    async def create(self, goals: Sequence[NewGoal], now: float, by: str | None = None) -> list[Goal]:
        def work(db: sqlite3.Connection) -> list[Goal]:
            opened = []
            for goal in goals:
                cursor = db.execute(
                    "INSERT INTO goals (key, name, source, type, priority, description, labels, target_query,"
                    " target_below, target_above, plan, state, created_at, deadline, settle, trigger_value)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?)"
                    " ON CONFLICT DO NOTHING",
                    new_goal_values(goal, now),
                )
                if cursor.rowcount:
                    opened.append(self._get(db, int(cursor.lastrowid or 0)))
                    if by is not None:
                        self._db.event(db, OperatorAct.GOAL_OPENED, act_detail(by, goal_subject(opened[-1])))
            return opened

        return await self._db.write(work)

    async def change(
        self, goal_id: int, change: Callable[[Goal], Goal], act: tuple[OperatorAct, str] | None = None
    ) -> Goal:
        def work(db: sqlite3.Connection) -> Goal:
            before = self._get(db, goal_id)
            after = changed_goal(before, change)
            if after != before:
                assignments = ", ".join(f"{name} = ?" for name in GOAL_MUTABLE)
                db.execute(
                    f"UPDATE goals SET {assignments} WHERE id = ?",  # noqa: S608 - names are ours
                    (*goal_mutable_values(after), goal_id),
                )
            if act is not None and after != before:  # a second cancel changes nothing and is no act
                self._db.event(db, act[0], act_detail(act[1], goal_subject(after)))
            return after

        return await self._db.write(work)

    async def counts(self) -> dict[str, int]:
        rows = await self._db.read("SELECT state, count(*) AS n FROM goals GROUP BY state")
        found = {row["state"]: int(row["n"]) for row in rows}
        return {state.value: found.get(state.value, 0) for state in GoalState}

    async def purge(self, older_than: float) -> int:
        return await self._db.write(
            lambda db: int(
                db.execute(
                    f"DELETE FROM goals WHERE state NOT IN {_OPEN} AND ended_at < ?",  # noqa: S608 - constant
                    (older_than,),
                ).rowcount
            )
        )
