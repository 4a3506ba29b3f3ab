"""Optimisation trials in SQLite: one row per application of a candidate."""

from __future__ import annotations

import sqlite3

from healer.optimizer.model import ENDED, IN_FLIGHT, CandidateRecord, Outcome, Trial
from healer.storage.audit import OperatorAct, act_detail
from healer.storage.rows import candidate_record
from healer.storage.rows import trial as _trial
from healer.storage.sqlite.database import SQLiteDatabase

_IN_FLIGHT = "(" + ", ".join(f"'{o.value}'" for o in IN_FLIGHT) + ")"


def _read_trial(db: sqlite3.Connection, trial_id: int) -> Trial:
    return _trial(db.execute("SELECT * FROM optimizations WHERE id = ?", (trial_id,)).fetchone())


class SQLiteTrialRecords:
    """The optimizations table of one SQLite file."""

    def __init__(self, database: SQLiteDatabase) -> None:
        self._db = database

    async def _set(self, trial_id: int, **columns: object) -> Trial:
        def work(db: sqlite3.Connection) -> Trial:
            assignments = ", ".join(f"{name} = ?" for name in columns)
            db.execute(f"UPDATE optimizations SET {assignments} WHERE id = ?", (*columns.values(), trial_id))  # noqa: S608 - names are ours
            return _read_trial(db, trial_id)

        return await self._db.write(work)

    async def in_flight(self) -> Trial | None:
        rows = await self._db.read(
            f"SELECT * FROM optimizations WHERE outcome IN {_IN_FLIGHT} ORDER BY id LIMIT 1"  # noqa: S608 - constant
        )
        return _trial(rows[0]) if rows else None

    async def begin(
        self, candidate: str, component: str, confidence: float, score: float, before: float, now: float
    ) -> Trial:
        def work(db: sqlite3.Connection) -> Trial:
            cursor = db.execute(
                "INSERT INTO optimizations (candidate, component, outcome, confidence, score, before, applied_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (candidate, component, Outcome.APPLYING.value, confidence, score, before, now),
            )
            return _read_trial(db, int(cursor.lastrowid or 0))

        return await self._db.write(work)

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

        def work(db: sqlite3.Connection) -> Trial:
            db.execute(
                "UPDATE optimizations SET outcome = ?, detail = ?, ended_at = ?, after = coalesce(?, after),"
                " improvement = coalesce(?, improvement) WHERE id = ?",
                (outcome.value, detail, now, after, improvement, trial_id),
            )
            return _read_trial(db, trial_id)

        return await self._db.write(work)

    async def discard(self, trial_id: int) -> None:
        await self._db.write(lambda db: db.execute("DELETE FROM optimizations WHERE id = ?", (trial_id,)))

    async def acknowledge(self, candidate: str, now: float, by: str) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            acknowledged = db.execute(
                "UPDATE optimizations SET acknowledged_at = ? WHERE id = (SELECT max(id) FROM optimizations"
                " WHERE candidate = ?) AND outcome = 'rollback_failed' AND acknowledged_at IS NULL",
                (now, candidate),
            ).rowcount
            if acknowledged:
                self._db.event(db, OperatorAct.OPTIMIZATION_ACKNOWLEDGED, act_detail(by, {"candidate": candidate}))
            return bool(acknowledged)

        return await self._db.write(work)

    async def history(self, limit: int = 100) -> list[Trial]:
        rows = await self._db.read("SELECT * FROM optimizations ORDER BY id DESC LIMIT ?", (limit,))
        return [_trial(row) for row in rows]

    async def records(self) -> dict[str, CandidateRecord]:
        # What taught something: kept, rolled back, or a failed rollback after a verdict.
        rows = await self._db.read(
            "SELECT o.*, c.trials, c.helped FROM optimizations o JOIN ("
            " SELECT candidate, max(id) AS last,"
            " sum(outcome IN ('kept', 'rolled_back') OR (outcome = 'rollback_failed' AND improvement IS NOT NULL))"
            " AS trials, sum(outcome = 'kept') AS helped FROM optimizations GROUP BY candidate"
            ") c ON o.id = c.last"
        )
        return {row["candidate"]: candidate_record(row) for row in rows}

    async def last_ended(self) -> float | None:
        rows = await self._db.read("SELECT max(ended_at) FROM optimizations")
        value = rows[0][0]
        return float(value) if value is not None else None

    async def purge(self, older_than: float) -> int:
        # Every candidate's last trial stays: it decides the candidate's state.
        return await self._db.write(
            lambda db: int(
                db.execute(
                    "DELETE FROM optimizations WHERE ended_at < ?"
                    " AND id NOT IN (SELECT max(id) FROM optimizations GROUP BY candidate)",
                    (older_than,),
                ).rowcount
            )
        )
