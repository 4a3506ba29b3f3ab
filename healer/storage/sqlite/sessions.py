"""The console's sessions and CSRF secret in SQLite."""

from __future__ import annotations

import sqlite3

from healer.auth.roles import Identity
from healer.auth.sessions import CLOSED_FOR_ROOM, SessionRecord
from healer.storage.rows import roles_column, session
from healer.storage.sqlite.database import SQLiteDatabase


class SQLiteSessionRecords:
    """The sessions and console_secret tables of one SQLite file."""

    def __init__(self, database: SQLiteDatabase) -> None:
        self._db = database

    async def open(
        self, digest: bytes, identity: Identity, now: float, expires: float, limit: int, credential: bytes = b""
    ) -> None:
        def work(db: sqlite3.Connection) -> None:
            opened = int(
                db.execute(
                    "SELECT count(*) FROM sessions WHERE closed_at IS NULL AND expires_at > ?", (now,)
                ).fetchone()[0]
            )
            if opened >= limit:
                db.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,))
                db.execute(
                    "UPDATE sessions SET closed_at = ?, closed_by = ? WHERE id IN"
                    " (SELECT id FROM sessions WHERE closed_at IS NULL AND expires_at > ? ORDER BY id LIMIT ?)",
                    (now, CLOSED_FOR_ROOM, now, opened - limit + 1),
                )
            db.execute(
                "INSERT INTO sessions (digest, user_name, roles, kind, created_at, expires_at, credential)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (digest, identity.name, roles_column(identity), identity.kind.value, now, expires, credential),
            )

        await self._db.write(work)

    async def lookup(self, digest: bytes, now: float) -> SessionRecord | None:
        rows = await self._db.read(
            "SELECT user_name, roles, kind, expires_at, credential FROM sessions"
            " WHERE digest = ? AND closed_at IS NULL AND expires_at > ?",
            (digest, now),
        )
        return session(rows[0]) if rows else None

    async def close(self, digest: bytes, by: str, now: float) -> Identity | None:
        def work(db: sqlite3.Connection) -> Identity | None:
            row = db.execute(
                "UPDATE sessions SET closed_at = ?, closed_by = ?"
                " WHERE digest = ? AND closed_at IS NULL AND expires_at > ?"
                " RETURNING user_name, roles, kind, expires_at",
                (now, by, digest, now),
            ).fetchone()
            return session(row).identity if row is not None else None

        return await self._db.write(work)

    async def purge(self, now: float) -> int:
        def work(db: sqlite3.Connection) -> int:
            return db.execute("DELETE FROM sessions WHERE expires_at <= ?", (now,)).rowcount

        return await self._db.write(work)

    async def csrf_secret(self, candidate: bytes) -> bytes:
        def work(db: sqlite3.Connection) -> bytes:
            db.execute(
                "INSERT OR IGNORE INTO console_secret (id, csrf, created_at) VALUES (1, ?, ?)",
                (candidate, self._db.clock()),
            )
            return bytes(db.execute("SELECT csrf FROM console_secret WHERE id = 1").fetchone()[0])

        return await self._db.write(work)
