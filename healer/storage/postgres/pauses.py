"""Operators' pauses in PostgreSQL, the same for every replica."""

from __future__ import annotations

import json
from collections.abc import Sequence

from healer.healing.model import Pause
from healer.storage.postgres.database import PostgresDatabase, Transaction
from healer.storage.rows import pause


class PostgresPauseRecords:
    """The pauses table of one PostgreSQL database."""

    def __init__(self, database: PostgresDatabase) -> None:
        self._db = database

    async def create(self, matchers: Sequence[str], reason: str, created_by: str, now: float, ends_at: float) -> Pause:
        async def work(tx: Transaction) -> Pause:
            row = await tx.row(
                "INSERT INTO pauses (matchers, reason, created_by, created_at, ends_at) VALUES (%s, %s, %s, %s, %s)"
                " RETURNING *",
                (json.dumps(list(matchers)), reason, created_by, now, ends_at),
            )
            assert row is not None
            return pause(row)

        return await self._db.write(work)

    async def active(self, now: float) -> list[Pause]:
        rows = await self._db.read(
            "SELECT * FROM pauses WHERE ended_at IS NULL AND ends_at > %s ORDER BY id", (now,)
        )
        return [pause(row) for row in rows]

    async def recent(self, limit: int = 100) -> list[Pause]:
        rows = await self._db.read("SELECT * FROM pauses ORDER BY id DESC LIMIT %s", (limit,))
        return [pause(row) for row in rows]

    async def end(self, pause_id: int, ended_by: str, now: float) -> Pause | None:
        async def work(tx: Transaction) -> Pause | None:
            row = await tx.row(
                "UPDATE pauses SET ended_at = %s, ended_by = %s WHERE id = %s AND ended_at IS NULL AND ends_at > %s"
                " RETURNING *",
                (now, ended_by, pause_id, now),
            )
            return pause(row) if row is not None else None

        return await self._db.write(work)
