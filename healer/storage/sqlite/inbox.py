"""The inbox in SQLite: deliveries stored as received, committed together when they arrive together."""

from __future__ import annotations

import functools
import logging
import sqlite3
from collections.abc import Sequence

from healer.healing.model import InboxItem, InboxPosition
from healer.healing.payload import InvalidPayloadError, WebhookAlert, decode_webhook
from healer.logs import fields
from healer.storage.errors import StoreUnavailableError
from healer.storage.group_commit import GroupCommit
from healer.storage.rows import inbox_items
from healer.storage.sqlite.database import SQLiteDatabase

log = logging.getLogger(__name__)


def advance(db: sqlite3.Connection, positions: Sequence[InboxPosition], now: float) -> None:
    """Mark alerts processed: each delivery's cursor moves past the last of its alerts given."""
    last: dict[int, int] = {}
    for position in positions:
        last[position.delivery] = max(last.get(position.delivery, -1), position.index)
    db.executemany(
        "UPDATE inbox SET done = ?1, processed_at = CASE WHEN ?1 >= alerts THEN ?2 END WHERE id = ?3 AND done < ?1",
        [(index + 1, now, delivery) for delivery, index in last.items()],
    )


class SQLiteInbox:
    """Webhook deliveries in the `inbox` table; `accept` commits concurrent deliveries in one transaction."""

    def __init__(self, database: SQLiteDatabase) -> None:
        self._db = database
        self._group = GroupCommit(self._commit)
        # The last delivery parsed, so that a delivery split into several batches is parsed once.
        self._parsed: tuple[int, list[WebhookAlert]] | None = None
        self._discarded = 0

    @property
    def discarded_alerts(self) -> int:
        return self._discarded

    async def accept(self, body: bytes, alerts: int) -> int:
        return await self._group.submit((body, alerts))

    async def _commit(self, deliveries: list[tuple[bytes, int]]) -> list[int]:
        """Store one batch of deliveries in one transaction; return their ids in order."""
        return await self._db.write(functools.partial(self._insert, deliveries=deliveries))

    def _insert(self, db: sqlite3.Connection, deliveries: Sequence[tuple[bytes, int]]) -> list[int]:
        now = self._db.clock()
        # A delivery is stored as it came: serialising each alert again cost more than all the rest of
        # the webhook. CAST keeps it TEXT, so SQLite's JSON functions can read it.
        db.executemany(
            "INSERT INTO inbox (received_at, body, alerts) VALUES (?, CAST(? AS TEXT), ?)",
            [(now, body, count) for body, count in deliveries],
        )
        # One writer, and each new id is the previous one + 1, so the ids of one batch are contiguous.
        last = int(db.execute("SELECT last_insert_rowid()").fetchone()[0])
        return list(range(last - len(deliveries) + 1, last + 1))

    async def unprocessed(self, limit: int = 500) -> list[InboxItem]:
        return await self._db.run(self._unprocessed, limit)

    def _unprocessed(self, limit: int) -> list[InboxItem]:
        items: list[InboxItem] = []
        try:
            cursor = self._db.db.execute(
                "SELECT id, received_at, body, done FROM inbox WHERE processed_at IS NULL ORDER BY id"
            )
            try:
                for row in cursor:
                    alerts = self._alerts_of(row["id"], row["body"])
                    if alerts is None:
                        continue
                    items += inbox_items(row, alerts, limit - len(items))
                    if len(items) >= limit:
                        break
            finally:
                cursor.close()
        except sqlite3.Error as exc:
            raise StoreUnavailableError(str(exc)) from exc
        return items

    def _alerts_of(self, delivery: int, body: str) -> list[WebhookAlert] | None:
        """The alerts of a stored delivery, parsed once however many batches it is split into."""
        if self._parsed is not None and self._parsed[0] == delivery:
            return self._parsed[1]
        try:
            alerts = decode_webhook(body).alerts
        except InvalidPayloadError as exc:
            # Only a stricter payload format after an upgrade can get here; skipping beats a stuck inbox.
            reason = exc.message
            self._db.tx(lambda db: self._discard_delivery(db, delivery, reason))
            log.error("inbox delivery unreadable; skipped", extra=fields(delivery=delivery, reason=reason[:500]))
            return None
        self._parsed = (delivery, alerts)
        return alerts

    def _discard_delivery(self, db: sqlite3.Connection, delivery: int, reason: str) -> None:
        left = db.execute("SELECT alerts - done FROM inbox WHERE id = ?", (delivery,)).fetchone()
        self._discarded += int(left[0]) if left else 0
        db.execute("UPDATE inbox SET processed_at = ? WHERE id = ?", (self._db.clock(), delivery))
        self._db.event(db, "delivery_unreadable", {"delivery": delivery, "reason": reason[:2000]})

    async def depth(self) -> int:
        rows = await self._db.read("SELECT coalesce(sum(alerts - done), 0) FROM inbox WHERE processed_at IS NULL")
        return int(rows[0][0])

    async def purge(self, older_than: float) -> int:
        def work(db: sqlite3.Connection) -> int:
            self._parsed = None
            # The newest row always stays, so that a new id (the largest + 1) is never one used before.
            return int(
                db.execute(
                    "DELETE FROM inbox WHERE processed_at IS NOT NULL AND processed_at < ?"
                    " AND id < (SELECT max(id) FROM inbox)",
                    (older_than,),
                ).rowcount
            )

        return await self._db.write(work)
