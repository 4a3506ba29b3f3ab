"""Optimisation trials in PostgreSQL: one row per application of a candidate."""

from __future__ import annotations

from psycopg import sql

from healer.optimizer.model import ENDED, IN_FLIGHT, CandidateRecord, Outcome, Trial
from healer.storage.audit import OperatorAct, act_detail
from healer.storage.postgres.database import PostgresDatabase, Query, Transaction
from healer.storage.rows import candidate_record
from healer.storage.rows import trial as _trial

_IN_FLIGHT = [o.value for o in IN_FLIGHT]


async def _write_trial(tx: Transaction, query: Query, params: tuple[object, ...]) -> Trial:
    """Run an INSERT or UPDATE of one trial that ends in RETURNING *; return the trial as written."""
    row = await tx.row(query, params)
    assert row is not None
    return _trial(row)


class PostgresTrialRecords:
    """The optimizations table of one PostgreSQL database."""

    def __init__(self, database: PostgresDatabase) -> None:
        self._db = database

    async def _set(self, trial_id: int, **columns: object) -> Trial:
        assignments = sql.SQL(", ").join(sql.SQL("{} = %s").format(sql.Identifier(name)) for name in columns)
        query = sql.SQL("UPDATE optimizations SET {} WHERE id = %s RETURNING *").format(assignments)
        return await self._db.write(lambda tx: _write_trial(tx, query, (*columns.values(), trial_id)))

    async def in_flight(self) -> Trial | None:
        rows = await self._db.read(
            "SELECT * FROM optimizations WHERE outcome = ANY(%s) ORDER BY id LIMIT 1", (_IN_FLIGHT,)
        )
        return _trial(rows[0]) if rows else None

    async def begin(
        self, candidate: str, component: str, confidence: float, score: float, before: float, now: float
    ) -> Trial:
        return await self._db.write(
            lambda tx: _write_trial(
                tx,
                "INSERT INTO optimizations (candidate, component, outcome, confidence, score, before, applied_at)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING *",
                (candidate, component, Outcome.APPLYING.value, confidence, score, before, now),
            )
        )

    async def measuring(self, trial_id: int, measure_at: float, detail: str) -> Trial:
        return await self._set(trial_id, outcome=Outcome.MEASURING.value, measure_at=measure_at, detail=detail)

    async def rolling_back(
        self, trial_id: int, verdict: Outcome, detail: str, after: float | None, improvement: float | None
    ) -> Trial:
        return await self._set(
            trial_id,
            outcome=Outcome.ROLLING_BACK.value,
            verdict=verdict.value,
            detail=detail,
            after=after,
            improvement=improvement,
        )

    async def end(
        self,
        trial_id: int,
        outcome: Outcome,
        detail: str,
        now: float,
        after: float | None = None,
        improvement: float | None = None,
    ) -> Trial:
        if outcome not in ENDED:
            raise ValueError(f"{outcome.value} is not an outcome a trial ends with")
        return await self._db.write(
            lambda tx: _write_trial(
                tx,
                "UPDATE optimizations SET outcome = %s, detail = %s, ended_at = %s,"
                " after = coalesce(%s, after), improvement = coalesce(%s, improvement) WHERE id = %s RETURNING *",
                (outcome.value, detail, now, after, improvement, trial_id),
            )
        )

    async def discard(self, trial_id: int) -> None:
        await self._db.write(lambda tx: tx.execute("DELETE FROM optimizations WHERE id = %s", (trial_id,)))

    async def acknowledge(self, candidate: str, now: float, by: str) -> bool:
        async def work(tx: Transaction) -> bool:
            acknowledged = await tx.execute(
                "UPDATE optimizations SET acknowledged_at = %s WHERE id = (SELECT max(id) FROM optimizations"
                " WHERE candidate = %s) AND outcome = 'rollback_failed' AND acknowledged_at IS NULL",
                (now, candidate),
            )
            if acknowledged:
                await tx.event(OperatorAct.OPTIMIZATION_ACKNOWLEDGED, act_detail(by, {"candidate": candidate}))
            return bool(acknowledged)

        return await self._db.write(work)

    async def history(self, limit: int = 100) -> list[Trial]:
        rows = await self._db.read("SELECT * FROM optimizations ORDER BY id DESC LIMIT %s", (limit,))
        return [_trial(row) for row in rows]

    async def records(self) -> dict[str, CandidateRecord]:
        # What taught something: kept, rolled back, or a failed rollback after a verdict.
        rows = await self._db.read(
            "SELECT o.*, c.trials, c.helped FROM optimizations o JOIN ("
            " SELECT candidate, max(id) AS last,"
            " count(*) FILTER (WHERE outcome IN ('kept', 'rolled_back')"
            " OR (outcome = 'rollback_failed' AND improvement IS NOT NULL)) AS trials,"
            " count(*) FILTER (WHERE outcome = 'kept') AS helped FROM optimizations GROUP BY candidate"
            ") c ON o.id = c.last"
        )
        return {row["candidate"]: candidate_record(row) for row in rows}

    async def last_ended(self) -> float | None:
        rows = await self._db.read("SELECT max(ended_at) AS last FROM optimizations")
        value = rows[0]["last"]
        return float(value) if value is not None else None

    async def purge(self, older_than: float) -> int:
        # Every candidate's last trial stays: it decides the candidate's state.
        return await self._db.write(
            lambda tx: tx.execute(
                "DELETE FROM optimizations WHERE ended_at < %s"
                " AND id NOT IN (SELECT max(id) FROM optimizations GROUP BY candidate)",
                (older_than,),
            )
        )
