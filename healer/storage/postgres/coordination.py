"""The shared rails in PostgreSQL: the action budget and its circuit breaker, concurrency slots, claims, the leader.

Every check that spans rows is serialised across replicas: the budget by a lock on the one `circuit`
row, the slots by a transaction-scoped advisory lock, the leader by one conditional upsert.
"""

from __future__ import annotations

from healer.storage.postgres.database import PostgresDatabase, Transaction

# The advisory lock key that serialises the counting of concurrency slots (fixed, healer's alone).
SLOTS_LOCK = 0x6865616C6573  # "heales"


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
            await tx.execute("DELETE FROM budget")
            return 0.0
        return open_until

    async def charge_budget(self, now: float, limit: int, window: float, reset: float) -> bool:
        async def work(tx: Transaction) -> bool:
            if await self._open_until(tx, now):
                return False
            await tx.execute("DELETE FROM budget WHERE started_at < %s", (now - window,))
            if int(await tx.value("SELECT count(*) FROM budget")) >= limit:
                await tx.execute("UPDATE circuit SET open_until = %s WHERE id = 1", (now + reset,))
                return False
            await tx.execute("INSERT INTO budget (started_at) VALUES (%s)", (now,))
            return True

        return await self._db.write(work)

    async def circuit_open(self, now: float) -> bool:
        async def work(tx: Transaction) -> bool:
            # Most calls find the breaker closed: only one that may close it takes the row's lock.
            if not float(await tx.value("SELECT open_until FROM circuit WHERE id = 1")):
                return False
            return await self._open_until(tx, now) > 0

        return await self._db.write(work)

    async def close_circuit(self) -> None:
        async def work(tx: Transaction) -> None:
            await tx.execute("UPDATE circuit SET open_until = 0 WHERE id = 1")
            await tx.execute("DELETE FROM budget")

        await self._db.write(work)

    async def take_slot(
        self, replica: str, strategy: str, now: float, until: float, limit: int, strategy_limit: int
    ) -> int | None:
        async def work(tx: Transaction) -> int | None:
            # Counting and inserting must be one step across replicas; rows not yet inserted cannot be
            # locked, so an advisory lock serialises the takers instead.
            await tx.execute("SELECT pg_advisory_xact_lock(%s)", (SLOTS_LOCK,))
            await tx.execute("DELETE FROM slots WHERE lease_until < %s", (now,))
            counts = await tx.row(
                "SELECT count(*) AS total, count(*) FILTER (WHERE strategy = %s) AS same FROM slots", (strategy,)
            )
            assert counts is not None
            if counts["total"] >= limit or counts["same"] >= strategy_limit:
                return None
            return int(
                await tx.value(
                    "INSERT INTO slots (replica, strategy, lease_until) VALUES (%s, %s, %s) RETURNING id",
                    (replica, strategy, until),
                )
            )

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
