"""Optimisation trials in the store: one row per application of a candidate."""

from __future__ import annotations

import sqlite3
from typing import Any

from healer.optimizer.model import ENDED, IN_FLIGHT, LEARNED_FROM, Outcome, Trial
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
        detail TEXT NOT NULL DEFAULT ''
    )""",
    "CREATE INDEX IF NOT EXISTS optimizations_candidate ON optimizations(candidate, id)",
)


def _in(values: tuple[Outcome, ...]) -> str:
    return "(" + ", ".join(f"'{v.value}'" for v in values) + ")"


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
    )


class TrialRecords:
    """The optimizations table, on the healing store's file and thread (call it through `AsyncStore.call`)."""

    def __init__(self, store: SQLiteStore) -> None:
        self._store = store

        def create(db: sqlite3.Connection) -> None:
            for statement in TRIALS_SCHEMA:
                db.execute(statement)

        store.transaction(create)

    def _get(self, db: sqlite3.Connection, trial_id: int) -> Trial:
        return _trial(db.execute("SELECT * FROM optimizations WHERE id = ?", (trial_id,)).fetchone())

    def in_flight(self) -> Trial | None:
        """The trial being applied or measured, if any (there is at most one)."""
        rows = self._store.read(f"SELECT * FROM optimizations WHERE outcome IN {_in(IN_FLIGHT)} ORDER BY id LIMIT 1")  # noqa: S608
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
            return self._get(db, int(cursor.lastrowid or 0))

        return self._store.transaction(work)

    def measuring(self, trial_id: int, measure_at: float, detail: str) -> Trial:
        """The change is applied; it is measured again at `measure_at`."""

        def work(db: sqlite3.Connection) -> Trial:
            db.execute(
                "UPDATE optimizations SET outcome = ?, measure_at = ?, detail = ? WHERE id = ?",
                (Outcome.MEASURING.value, measure_at, detail, trial_id),
            )
            return self._get(db, trial_id)

        return self._store.transaction(work)

    def end(
        self,
        trial_id: int,
        outcome: Outcome,
        detail: str,
        now: float,
        after: float | None = None,
        improvement: float | None = None,
    ) -> Trial:
        """Record how the trial ended."""
        assert outcome in ENDED

        def work(db: sqlite3.Connection) -> Trial:
            db.execute(
                "UPDATE optimizations SET outcome = ?, detail = ?, ended_at = ?, after = ?, improvement = ?"
                " WHERE id = ?",
                (outcome.value, detail, now, after, improvement, trial_id),
            )
            return self._get(db, trial_id)

        return self._store.transaction(work)

    def history(self, limit: int = 100) -> list[Trial]:
        """Trials newest first."""
        rows = self._store.read("SELECT * FROM optimizations ORDER BY id DESC LIMIT ?", (limit,))
        return [_trial(row) for row in rows]

    def summary(self) -> dict[str, dict[str, Any]]:
        """Per candidate: trials that taught something, how many helped, the last outcome and when it ended."""
        last = "SELECT o.outcome FROM optimizations o WHERE o.candidate = t.candidate ORDER BY o.id DESC LIMIT 1"
        rows = self._store.read(
            f"SELECT candidate, sum(outcome IN {_in(LEARNED_FROM)}) AS trials, sum(outcome = 'kept') AS helped,"  # noqa: S608 - constants
            f" ({last}) AS last, max(ended_at) AS ended_at FROM optimizations t GROUP BY candidate"
        )
        return {
            row["candidate"]: {
                "trials": int(row["trials"] or 0),
                "helped": int(row["helped"] or 0),
                "last": Outcome(row["last"]),
                "ended_at": row["ended_at"],
            }
            for row in rows
        }

    def purge(self, older_than: float) -> int:
        """Delete ended trials older than `older_than`, keeping every candidate's last one (it decides cooldowns)."""
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
