"""Operators' pauses in SQLite."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence

from healer.healing.model import Pause
from healer.storage.rows import pause
from healer.storage.sqlite.database import SQLiteDatabase


class SQLitePauseRecords:
    """The pauses table of one SQLite file."""

    def __init__(self, database: SQLiteDatabase) -> None:
        self._db = database

    async def create(self, matchers: Sequence[str], reason: str, created_by: str, now: float, ends_at: float) -> Pause:
        def work(db: sqlite3.Connection) -> Pause:
            row = db.execute(
                "INSERT INTO pauses (matchers, reason, created_by, created_at, ends_at) VALUES (?, ?, ?, ?, ?)"
                " RETURNING *",
                (json.dumps(list(matchers)), reason, created_by, now, ends_at),
            ).fetchone()
            return pause(row)

        return await self._db.write(work)

    async def active(self, now: float) -> list[Pause]:
        rows = await self._db.read("SELECT * FROM pauses WHERE ended_at IS NULL AND ends_at > ? ORDER BY id", (now,))
        return [pause(row) for row in rows]

    async def recent(self, limit: int = 100) -> list[Pause]:
        rows = await self._db.read("SELECT * FROM pauses ORDER BY id DESC LIMIT ?", (limit,))
        return [pause(row) for row in rows]

    async def end(self, pause_id: int, ended_by: str, now: float) -> Pause | None:
        def work(db: sqlite3.Connection) -> Pause | None:
            row = db.execute(
                "UPDATE pauses SET ended_at = ?, ended_by = ? WHERE id = ? AND ended_at IS NULL AND ends_at > ?"
                " RETURNING *",
                (now, ended_by, pause_id, now),
            ).fetchone()
            return pause(row) if row is not None else None

        return await self._db.write(work)
