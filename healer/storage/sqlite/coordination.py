"""The shared rails in SQLite: the action budget and its circuit breaker, concurrency slots, claims, the leader.

One healer owns an SQLite file, so every answer here is also that healer's alone; keeping the rails
in the store all the same makes them survive a restart and behave as they do on PostgreSQL.
"""

from __future__ import annotations

import sqlite3

from healer.healing.model import BudgetScope, Charge
from healer.storage.audit import OperatorAct, act_detail
from healer.storage.sqlite.database import SQLiteDatabase


class SQLiteCoordination:
    """Budget, circuit breaker, slots, claims and leadership in one SQLite file."""

    def __init__(self, database: SQLiteDatabase) -> None:
        self._db = database

    @staticmethod
    def _open_until(db: sqlite3.Connection, now: float) -> float:
        """When the breaker closes (0 when closed); a breaker past its reset closes here, budget and all."""
        open_until = float(db.execute("SELECT open_until FROM circuit WHERE id = 1").fetchone()[0])
        if open_until and now >= open_until:
            db.execute("UPDATE circuit SET open_until = 0 WHERE id = 1")
            db.execute("DELETE FROM budget WHERE scope = ''")
            return 0.0
        return open_until

    async def charge_budget(
        self, now: float, limit: int, window: float, reset: float, scope: BudgetScope | None = None
    ) -> Charge:
        def work(db: sqlite3.Connection) -> Charge:
            if self._open_until(db, now):
                return Charge.CIRCUIT_OPEN
            db.execute("DELETE FROM budget WHERE scope = '' AND started_at < ?", (now - window,))
            if int(db.execute("SELECT count(*) FROM budget WHERE scope = ''").fetchone()[0]) >= limit:
                db.execute("UPDATE circuit SET open_until = ? WHERE id = 1", (now + reset,))
                return Charge.CIRCUIT_OPEN
            if scope is not None:
                db.execute("DELETE FROM budget WHERE scope = ? AND started_at < ?", (scope.key, now - scope.window))
                spent = int(db.execute("SELECT count(*) FROM budget WHERE scope = ?", (scope.key,)).fetchone()[0])
                if spent >= scope.limit:
                    return Charge.SCOPE_SPENT
                db.execute("INSERT INTO budget (started_at, scope) VALUES (?, ?)", (now, scope.key))
            db.execute("INSERT INTO budget (started_at) VALUES (?)", (now,))
            return Charge.CHARGED

        return await self._db.write(work)

    async def circuit_open(self, now: float) -> bool:
        return await self._db.write(lambda db: self._open_until(db, now) > 0)

    async def close_circuit(self, by: str) -> None:
        def work(db: sqlite3.Connection) -> None:
            db.execute("UPDATE circuit SET open_until = 0 WHERE id = 1")
            db.execute("DELETE FROM budget WHERE scope = ''")
            self._db.event(db, OperatorAct.CIRCUIT_CLOSED, act_detail(by))

        await self._db.write(work)

    async def take_slot(
        self, replica: str, strategy: str, now: float, until: float, limit: int, strategy_limit: int
    ) -> int | None:
        def work(db: sqlite3.Connection) -> int | None:
            db.execute("DELETE FROM slots WHERE lease_until < ?", (now,))
            total, same = db.execute(
                "SELECT count(*), coalesce(sum(strategy = ?), 0) FROM slots WHERE grp IS NULL", (strategy,)
            ).fetchone()
            if total >= limit or same >= strategy_limit:
                return None
            cursor = db.execute(
                "INSERT INTO slots (replica, strategy, lease_until) VALUES (?, ?, ?)", (replica, strategy, until)
            )
            return int(cursor.lastrowid or 0)

        return await self._db.write(work)

    async def take_group_slot(self, replica: str, group: str, now: float, until: float, limit: int) -> int | None:
        def work(db: sqlite3.Connection) -> int | None:
            db.execute("DELETE FROM slots WHERE lease_until < ?", (now,))
            if int(db.execute("SELECT count(*) FROM slots WHERE grp = ?", (group,)).fetchone()[0]) >= limit:
                return None
            cursor = db.execute(
                "INSERT INTO slots (replica, strategy, grp, lease_until) VALUES (?, '', ?, ?)", (replica, group, until)
            )
            return int(cursor.lastrowid or 0)

        return await self._db.write(work)

    async def take_share(self, group: str, episode_id: int, now: float, window: float, limit: int) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            db.execute("DELETE FROM shares WHERE grp = ? AND at < ?", (group, now - window))
            if db.execute("SELECT 1 FROM shares WHERE grp = ? AND episode_id = ?", (group, episode_id)).fetchone():
                return True
            if int(db.execute("SELECT count(*) FROM shares WHERE grp = ?", (group,)).fetchone()[0]) >= limit:
                return False
            db.execute("INSERT INTO shares (grp, episode_id, at) VALUES (?, ?, ?)", (group, episode_id, now))
            return True

        return await self._db.write(work)

    async def release_slot(self, slot: int) -> None:
        await self._db.write(lambda db: db.execute("DELETE FROM slots WHERE id = ?", (slot,)))

    async def forget(self, replica: str) -> None:
        def work(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM slots WHERE replica = ?", (replica,))
            db.execute(
                "UPDATE actions SET replica = NULL, lease_until = NULL WHERE replica = ? AND state = 'pending'",
                (replica,),
            )

        await self._db.write(work)

    async def renew(self, replica: str, until: float) -> None:
        def work(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE actions SET lease_until = ? WHERE replica = ? AND state IN ('pending', 'running', 'verifying')",
                (until, replica),
            )
            db.execute("UPDATE slots SET lease_until = ? WHERE replica = ?", (until, replica))

        await self._db.write(work)

    async def lead(self, replica: str, now: float, until: float) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "INSERT INTO leader (id, replica, until) VALUES (1, ?, ?) ON CONFLICT (id) DO UPDATE SET"
                " replica = excluded.replica, until = excluded.until WHERE leader.replica = excluded.replica"
                " OR leader.until < ?",
                (replica, until, now),
            )
            return cursor.rowcount == 1

        return await self._db.write(work)

    async def resign(self, replica: str) -> None:
        await self._db.write(lambda db: db.execute("DELETE FROM leader WHERE replica = ?", (replica,)))
