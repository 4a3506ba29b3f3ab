"""Optimisation trials in the store: one row per application of a candidate."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from healer.optimizer.model import ENDED, IN_FLIGHT, Outcome, Trial
from healer.store import SQLiteStore

TRIALS_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS optimizations (
        id INTEGER PRIMARY KEY,
        candidate TEXT NOT NULL,
        component TEXT NOT NULL,
        outcome TEXT NOT NULL,
        confidence REAL NOT NULL,
        score REAL NOT NULL,
        before REAL,
        after REAL,
        improvement REAL,
        applied_at REAL NOT NULL,
        measure_at REAL,
        ended_at REAL,
        detail TEXT NOT NULL DEFAULT '',
        verdict TEXT,
        acknowledged_at REAL
    )""",
    "CREATE INDEX IF NOT EXISTS optimizations_candidate ON optimizations(candidate, id)",
)
_IN_FLIGHT = "(" + ", ".join(f"'{o.value}'" for o in IN_FLIGHT) + ")"


@dataclass(frozen=True)
class Record:
    """What a candidate's trials add up to."""

    trials: int  # those that taught something
    helped: int
    last: Trial


def _trial(row: sqlite3.Row) -> Trial:
    return Trial(
        id=row["id"],
        candidate=row["candidate"],
        component=row["component"],
        outcome=Outcome(row["outcome"]),
        confidence=row["confidence"],
        score=row["score"],
        before=row["before"],
        after=row["after"],
        improvement=row["improvement"],
        applied_at=row["applied_at"],
        measure_at=row["measure_at"],
        ended_at=row["ended_at"],
        detail=row["detail"],
        verdict=Outcome(row["verdict"]) if row["verdict"] else None,
        acknowledged_at=row["acknowledged_at"],
    )


class TrialRecords:
    """The optimizations table, on the healing store's file and thread (call it through `AsyncStore.call`)."""

    def __init__(self, store: SQLiteStore) -> None:
        self._store = store

        def create(db: sqlite3.Connection) -> None:
            for statement in TRIALS_SCHEMA:
                db.execute(statement)

        store.transaction(create)

    def _set(self, trial_id: int, **columns: object) -> Trial:
        def work(db: sqlite3.Connection) -> Trial:
            assignments = ", ".join(f"{name} = ?" for name in columns)
            db.execute(f"UPDATE optimizations SET {assignments} WHERE id = ?", (*columns.values(), trial_id))  # noqa: S608 - names are ours
            return _trial(db.execute("SELECT * FROM optimizations WHERE id = ?", (trial_id,)).fetchone())

        return self._store.transaction(work)

    def in_flight(self) -> Trial | None:
        """The trial being applied, measured or rolled back, if any (there is at most one)."""
        rows = self._store.read(f"SELECT * FROM optimizations WHERE outcome IN {_IN_FLIGHT} ORDER BY id LIMIT 1")  # noqa: S608
        return _trial(rows[0]) if rows else None

    def begin(
        self, candidate: str, component: str, confidence: float, score: float, before: float, now: float
    ) -> Trial:
        """Record that a candidate is being applied, with the value measured before."""

        def work(db: sqlite3.Connection) -> Trial:
            cursor = db.execute(
                "INSERT INTO optimizations (candidate, component, outcome, confidence, score, before, applied_at)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (candidate, component, Outcome.APPLYING.value, confidence, score, before, now),
            )
            return _trial(db.execute("SELECT * FROM optimizations WHERE id = ?", (cursor.lastrowid,)).fetchone())

        return self._store.transaction(work)

    def measuring(self, trial_id: int, measure_at: float, detail: str) -> Trial:
        """The change is applied; it is measured again at `measure_at`."""
        return self._set(trial_id, outcome=Outcome.MEASURING.value, measure_at=measure_at, detail=detail)

    def rolling_back(
        self, trial_id: int, verdict: Outcome, detail: str, after: float | None, improvement: float | None
    ) -> Trial:
        """Record the verdict before the rollback runs, so that a trial cut off here is never judged again."""
        return self._set(
            trial_id,
            outcome=Outcome.ROLLING_BACK.value,
            verdict=verdict.value,
            detail=detail,
            after=after,
            improvement=improvement,
        )

    def end(
        self,
        trial_id: int,
        outcome: Outcome,
        detail: str,
        now: float,
        after: float | None = None,
        improvement: float | None = None,
    ) -> Trial:
        """Record how the trial ended; `after` and `improvement` stay as recorded when not given."""
        assert outcome in ENDED

        def work(db: sqlite3.Connection) -> Trial:
            db.execute(
                "UPDATE optimizations SET outcome = ?, detail = ?, ended_at = ?, after = coalesce(?, after),"
                " improvement = coalesce(?, improvement) WHERE id = ?",
                (outcome.value, detail, now, after, improvement, trial_id),
            )
            return _trial(db.execute("SELECT * FROM optimizations WHERE id = ?", (trial_id,)).fetchone())

        return self._store.transaction(work)

    def discard(self, trial_id: int) -> None:
        """Forget a trial whose change never ran (healer began stopping just before)."""
        self._store.transaction(lambda db: db.execute("DELETE FROM optimizations WHERE id = ?", (trial_id,)))

    def acknowledge(self, candidate: str, now: float) -> bool:
        """Mark the candidate's failed rollback as dealt with by a person; False if its last trial is not one."""

        def work(db: sqlite3.Connection) -> bool:
            return bool(
                db.execute(
                    "UPDATE optimizations SET acknowledged_at = ? WHERE id = (SELECT max(id) FROM optimizations"
                    " WHERE candidate = ?) AND outcome = 'rollback_failed' AND acknowledged_at IS NULL",
                    (now, candidate),
                ).rowcount
            )

        return self._store.transaction(work)

    def history(self, limit: int = 100) -> list[Trial]:
        """Trials newest first."""
        rows = self._store.read("SELECT * FROM optimizations ORDER BY id DESC LIMIT ?", (limit,))
        return [_trial(row) for row in rows]

    def records(self) -> dict[str, Record]:
        """Per candidate: the trials that taught something, how many helped, and the last trial."""
        # What taught something: kept, rolled back, or a failed rollback after a verdict.
        rows = self._store.read(
            "SELECT o.*, c.trials, c.helped FROM optimizations o JOIN ("
            " SELECT candidate, max(id) AS last,"
            " sum(outcome IN ('kept', 'rolled_back') OR (outcome = 'rollback_failed' AND improvement IS NOT NULL))"
            " AS trials, sum(outcome = 'kept') AS helped FROM optimizations GROUP BY candidate"
            ") c ON o.id = c.last"
        )
        return {row["candidate"]: Record(int(row["trials"] or 0), int(row["helped"] or 0), _trial(row)) for row in rows}

    def last_ended(self) -> float | None:
        """When the most recent trial of any candidate ended."""
        return self._store.read("SELECT max(ended_at) FROM optimizations")[0][0]  # type: ignore[no-any-return]

    def purge(self, older_than: float) -> int:
        """Delete ended trials older than `older_than`, keeping every candidate's last one (it decides its state)."""
        return int(
            self._store.transaction(
                lambda db: (
                    db.execute(
                        "DELETE FROM optimizations WHERE ended_at < ?"
                        " AND id NOT IN (SELECT max(id) FROM optimizations GROUP BY candidate)",
                        (older_than,),
                    ).rowcount
                )
            )
        )
