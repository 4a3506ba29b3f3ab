"""The console's sessions and CSRF secret in PostgreSQL, the same for every replica."""

from __future__ import annotations

from healer.auth.roles import Identity
from healer.auth.sessions import CLOSED_FOR_ROOM, SessionRecord
from healer.storage.postgres.database import PostgresDatabase, Transaction
from healer.storage.rows import roles_column, session

# The advisory lock key that serialises logins across replicas, so that MAX_SESSIONS holds exactly.
SESSIONS_LOCK = 0x686561736573  # "heases"


class PostgresSessionRecords:
    """The sessions and console_secret tables of one PostgreSQL database."""

    def __init__(self, database: PostgresDatabase) -> None:
        self._db = database

    async def open(
        self, digest: bytes, identity: Identity, now: float, expires: float, limit: int, credential: bytes = b""
    ) -> None:
        async def work(tx: Transaction) -> None:
            await tx.send("SELECT pg_advisory_xact_lock(%s)", (SESSIONS_LOCK,))
            opened = int(
                await tx.value("SELECT count(*) FROM sessions WHERE closed_at IS NULL AND expires_at > %s", (now,))
            )
            if opened >= limit:
                await tx.send("DELETE FROM sessions WHERE expires_at <= %s", (now,))
                await tx.send(
                    "UPDATE sessions SET closed_at = %s, closed_by = %s WHERE id IN"
                    " (SELECT id FROM sessions WHERE closed_at IS NULL AND expires_at > %s ORDER BY id LIMIT %s)",
                    (now, CLOSED_FOR_ROOM, now, opened - limit + 1),
                )
            await tx.send(
                "INSERT INTO sessions (digest, user_name, roles, kind, created_at, expires_at, credential)"
                " VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (digest, identity.name, roles_column(identity), identity.kind.value, now, expires, credential),
            )

        await self._db.write(work)

    async def lookup(self, digest: bytes, now: float) -> SessionRecord | None:
        # On every console request whose session this replica has not seen within a second: one round trip.
        rows = await self._db.read(
            "SELECT user_name, roles, kind, expires_at, credential FROM sessions"
            " WHERE digest = %s AND closed_at IS NULL AND expires_at > %s",
            (digest, now),
        )
        return session(rows[0]) if rows else None

    async def close(self, digest: bytes, by: str, now: float) -> Identity | None:
        async def work(tx: Transaction) -> Identity | None:
            row = await tx.row(
                "UPDATE sessions SET closed_at = %s, closed_by = %s"
                " WHERE digest = %s AND closed_at IS NULL AND expires_at > %s"
                " RETURNING user_name, roles, kind, expires_at",
                (now, by, digest, now),
            )
            return session(row).identity if row is not None else None

        return await self._db.write(work)

    async def purge(self, now: float) -> int:
        async def work(tx: Transaction) -> int:
            return await tx.execute("DELETE FROM sessions WHERE expires_at <= %s", (now,))

        return await self._db.write(work)

    async def csrf_secret(self, candidate: bytes) -> bytes:
        async def work(tx: Transaction) -> bytes:
            # Replicas starting together may both draw one: the first insert wins, and both read the same.
            await tx.send(
                "INSERT INTO console_secret (id, csrf, created_at) VALUES (1, %s, %s) ON CONFLICT (id) DO NOTHING",
                (candidate, self._db.clock()),
            )
            return bytes(await tx.value("SELECT csrf FROM console_secret WHERE id = 1"))

        return await self._db.write(work)
