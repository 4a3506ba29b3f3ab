"""The shared rails in PostgreSQL: the action budget and its circuit breaker, concurrency slots, claims, the leader.

Every check that spans rows is serialised across replicas: the budget by a lock on the one `circuit`
row, the slots by a transaction-scoped advisory lock, the leader by one conditional upsert.
"""

from __future__ import annotations

from healer.healing.model import BudgetScope, Charge
from healer.storage.audit import OperatorAct, act_detail
from healer.storage.postgres.database import PostgresDatabase, Transaction

# The advisory lock key that serialises the counting of concurrency slots (fixed, healer's alone).
SLOTS_LOCK = 0x6865616C6573  # "heales"
# The advisory lock key that serialises the counting of a label group's share of a fleet.
SHARES_LOCK = 0x686561736872  # "heashr"


class PostgresCoordination:
    """Budget, circuit breaker, slots, claims and leadership in one PostgreSQL database, for every replica."""

    def __init__(self, database: PostgresDatabase) -> None:
        self._db = database

    @staticmethod
    async def _open_until(tx: Transaction, now: float) -> float:
        """When the breaker closes (0 when closed); a breaker past its reset closes here, budget and all.

        Locks the circuit row until the transaction ends, so that replicas charge the budget one at a time.
        """
        open_until = float(await tx.value("SELECT open_until FROM circuit WHERE id = 1 FOR UPDATE"))
        if open_until and now >= open_until:
            await tx.execute("UPDATE circuit SET open_until = 0 WHERE id = 1")
            await tx.execute("DELETE FROM budget WHERE scope = ''")
            return 0.0
        return open_until

    async def charge_budget(
        self, now: float, limit: int, window: float, reset: float, scope: BudgetScope | None = None
    ) -> Charge:
        if scope is not None:
            return await self._charge_scoped(now, limit, window, reset, scope)
        # Sent at once, one round trip. Under the circuit row's lock, each statement (with a snapshot
        # of its own, taken after the lock) sees the commits of the replicas charged before, and the
        # effects of the statements before it: a breaker past its reset closes with its budget spent,
        # the window drops its old charges, a spent budget opens the breaker, and only a closed
        # breaker takes the charge.
        # Not durable (see PostgresDatabase.batch): the charge of a step that ran is made durable by
        # the step's claim, whose durable commit comes after it and flushes the WAL up to there. A
        # server crash can lose only charges of steps that never started, which spent nothing.
        _, _, _, _, charged = await self._db.batch(
            [
                ("SELECT 1 FROM circuit WHERE id = 1 FOR UPDATE", ()),
                (
                    "DELETE FROM budget WHERE scope = '' AND (started_at < %s OR EXISTS (SELECT 1 FROM circuit"
                    " WHERE id = 1 AND open_until > 0 AND open_until <= %s))",
                    (now - window, now),
                ),
                ("UPDATE circuit SET open_until = 0 WHERE id = 1 AND open_until > 0 AND open_until <= %s", (now,)),
                (
                    "UPDATE circuit SET open_until = %s WHERE id = 1 AND open_until = 0"
                    " AND (SELECT count(*) FROM budget WHERE scope = '') >= %s",
                    (now + reset, limit),
                ),
                (
                    "INSERT INTO budget (started_at) SELECT %s WHERE (SELECT open_until FROM circuit WHERE id = 1) = 0",
                    (now,),
                ),
            ],
            durable=False,
        )
        return Charge.CHARGED if charged.rowcount == 1 else Charge.CIRCUIT_OPEN

    async def _charge_scoped(self, now: float, limit: int, window: float, reset: float, scope: BudgetScope) -> Charge:
        """Charge the global budget and a scope's, both or neither, under the circuit row's lock."""

        async def work(tx: Transaction) -> Charge:
            if await self._open_until(tx, now):
                return Charge.CIRCUIT_OPEN
            await tx.execute("DELETE FROM budget WHERE scope = '' AND started_at < %s", (now - window,))
            if int(await tx.value("SELECT count(*) FROM budget WHERE scope = ''")) >= limit:
                await tx.execute("UPDATE circuit SET open_until = %s WHERE id = 1", (now + reset,))
                return Charge.CIRCUIT_OPEN
            await tx.execute(
                "DELETE FROM budget WHERE scope = %s AND started_at < %s", (scope.key, now - scope.window)
            )
            if int(await tx.value("SELECT count(*) FROM budget WHERE scope = %s", (scope.key,))) >= scope.limit:
                return Charge.SCOPE_SPENT
            await tx.execute("INSERT INTO budget (started_at, scope) VALUES (%s, %s), (%s, '')", (now, scope.key, now))
            return Charge.CHARGED

        return await self._db.write(work)

    async def circuit_open(self, now: float) -> bool:
        async def work(tx: Transaction) -> bool:
            # Most calls find the breaker closed: only one that may close it takes the row's lock.
            if not float(await tx.value("SELECT open_until FROM circuit WHERE id = 1")):
                return False
            return await self._open_until(tx, now) > 0

        return await self._db.write(work)

    async def close_circuit(self, by: str) -> None:
        async def work(tx: Transaction) -> None:
            await tx.execute("UPDATE circuit SET open_until = 0 WHERE id = 1")
            await tx.execute("DELETE FROM budget WHERE scope = ''")
            await tx.event(OperatorAct.CIRCUIT_CLOSED, act_detail(by))

        await self._db.write(work)

    async def take_slot(
        self, replica: str, strategy: str, now: float, until: float, limit: int, strategy_limit: int
    ) -> int | None:
        # Counting and inserting must be one step across replicas; rows not yet inserted cannot be
        # locked, so an advisory lock serialises the takers instead. Sent at once, one round trip: the
        # statements after the lock see the slots of the takers before (and their own deletion).
        # Not durable (see PostgresDatabase.batch): a slot lost in a server crash frees its place early,
        # as a lapsed one does; the step that holds it made it durable with its claim.
        *_, taken = await self._db.batch(
            [
                ("SELECT pg_advisory_xact_lock(%s)", (SLOTS_LOCK,)),
                ("DELETE FROM slots WHERE lease_until < %s", (now,)),
                (
                    "INSERT INTO slots (replica, strategy, lease_until) SELECT %s, %s, %s"
                    " FROM (SELECT count(*) AS total, count(*) FILTER (WHERE strategy = %s) AS same FROM slots"
                    " WHERE grp IS NULL) c"
                    " WHERE c.total < %s AND c.same < %s RETURNING id",
                    (replica, strategy, until, strategy, limit, strategy_limit),
                ),
            ],
            durable=False,
        )
        slot = taken.value()
        return int(slot) if slot is not None else None

    async def take_group_slot(self, replica: str, group: str, now: float, until: float, limit: int) -> int | None:
        async def work(tx: Transaction) -> int | None:
            # The same advisory lock as the strategy slots: counting and inserting are one step across replicas.
            await tx.execute("SELECT pg_advisory_xact_lock(%s)", (SLOTS_LOCK,))
            await tx.execute("DELETE FROM slots WHERE lease_until < %s", (now,))
            slot = await tx.value(
                "INSERT INTO slots (replica, strategy, grp, lease_until) SELECT %s, '', %s, %s"
                " WHERE (SELECT count(*) FROM slots WHERE grp = %s) < %s RETURNING id",
                (replica, group, until, group, limit),
            )
            return int(slot) if slot is not None else None

        return await self._db.write(work)

    async def take_share(self, group: str, episode_id: int, now: float, window: float, limit: int) -> bool:
        async def work(tx: Transaction) -> bool:
            await tx.execute("SELECT pg_advisory_xact_lock(%s)", (SHARES_LOCK,))
            await tx.execute("DELETE FROM shares WHERE grp = %s AND at < %s", (group, now - window))
            if await tx.value("SELECT 1 FROM shares WHERE grp = %s AND episode_id = %s", (group, episode_id)):
                return True
            if int(await tx.value("SELECT count(*) FROM shares WHERE grp = %s", (group,))) >= limit:
                return False
            await tx.execute("INSERT INTO shares (grp, episode_id, at) VALUES (%s, %s, %s)", (group, episode_id, now))
            return True

        return await self._db.write(work)

    async def release_slot(self, slot: int) -> None:
        await self._db.write(lambda tx: tx.execute("DELETE FROM slots WHERE id = %s", (slot,)))

    async def forget(self, replica: str) -> None:
        async def work(tx: Transaction) -> None:
            await tx.execute("DELETE FROM slots WHERE replica = %s", (replica,))
            # Running and verifying steps stay: they ran, so they are settled once their claim lapses.
            await tx.execute(
                "UPDATE actions SET replica = NULL, lease_until = NULL WHERE id IN (SELECT id FROM actions"
                " WHERE replica = %s AND state = 'pending' ORDER BY id FOR UPDATE)",
                (replica,),
            )

        await self._db.lease_write(work)

    async def renew(self, replica: str, until: float) -> None:
        async def work(tx: Transaction) -> None:
            # Rows locked in id order, as a resolved alert's cancellation locks them, so neither deadlocks.
            await tx.execute(
                "UPDATE actions SET lease_until = %s WHERE id IN (SELECT id FROM actions WHERE replica = %s"
                " AND state IN ('pending', 'running', 'verifying') ORDER BY id FOR UPDATE)",
                (until, replica),
            )
            await tx.execute("UPDATE slots SET lease_until = %s WHERE replica = %s", (until, replica))

        await self._db.lease_write(work)

    async def lead(self, replica: str, now: float, until: float) -> bool:
        # One upsert: replicas racing for an empty or lapsed leadership queue on the row, and each
        # re-checks the condition against the winner's write.
        return (
            await self._db.lease_write(
                lambda tx: tx.execute(
                    "INSERT INTO leader (id, replica, until) VALUES (1, %s, %s) ON CONFLICT (id) DO UPDATE SET"
                    " replica = excluded.replica, until = excluded.until WHERE leader.replica = excluded.replica"
                    " OR leader.until < %s",
                    (replica, until, now),
                )
            )
            == 1
        )

    async def resign(self, replica: str) -> None:
        await self._db.lease_write(lambda tx: tx.execute("DELETE FROM leader WHERE replica = %s", (replica,)))
