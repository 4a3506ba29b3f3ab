"""The inbox in PostgreSQL: deliveries stored as received, committed together when they arrive together."""

from __future__ import annotations

import logging
from collections.abc import Sequence

from healer.healing.model import InboxItem, InboxPosition
from healer.healing.payload import InvalidPayloadError, WebhookAlert, decode_webhook
from healer.logs import fields
from healer.storage.group_commit import GroupCommit
from healer.storage.postgres.database import PostgresDatabase, Row, Transaction
from healer.storage.rows import inbox_items

log = logging.getLogger(__name__)


async def advance(tx: Transaction, positions: Sequence[InboxPosition], now: float) -> None:
    """Mark alerts processed: each delivery's cursor moves past the last of its alerts given."""
    last: dict[int, int] = {}
    for position in positions:
        last[position.delivery] = max(last.get(position.delivery, -1), position.index)
    # In id order, so that two replicas advancing the same deliveries lock them in the same order; and
    # `done < new` keeps a cursor from moving back when another replica got further first.
    await tx.executemany(
        "UPDATE inbox SET done = %(done)s, processed_at = CASE WHEN %(done)s >= alerts THEN %(now)s END"
        " WHERE id = %(id)s AND done < %(done)s",
        [{"done": index + 1, "now": now, "id": delivery} for delivery, index in sorted(last.items())],
    )


class PostgresInbox:
    """Webhook deliveries in the `inbox` table; `accept` commits concurrent deliveries in one transaction."""

    def __init__(self, database: PostgresDatabase) -> None:
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
        """Store one batch of deliveries in one transaction, sent at once; return their ids in order."""
        now = self._db.clock()
        # A delivery is stored as the bytes that came, sent in binary: serialising or even decoding it
        # again costs more than the rest of the webhook. Ids come back per row, in order: other
        # replicas insert at the same time, so a batch's ids need not be contiguous.
        inserted = await self._db.batch(
            [
                ("INSERT INTO inbox (received_at, body, alerts) VALUES (%s, %b, %s) RETURNING id", (now, body, count))
                for body, count in deliveries
            ]
        )
        return [int(result.value()) for result in inserted]

    async def unprocessed(self, limit: int = 500) -> list[InboxItem]:
        items: list[InboxItem] = []
        after = 0
        while len(items) < limit:
            # Every unprocessed delivery has an alert left, so `limit` rows are enough unless some
            # turn out unreadable; then the next page follows.
            rows = await self._db.read(
                "SELECT id, received_at, body, done FROM inbox WHERE processed_at IS NULL AND id > %s"
                " ORDER BY id LIMIT %s",
                (after, limit),
            )
            for row in rows:
                alerts = await self._alerts_of(row)
                if alerts is None:
                    continue
                items += inbox_items(row, alerts, limit - len(items))
                if len(items) >= limit:
                    break
            if len(rows) < limit:
                break
            after = rows[-1]["id"]
        return items

    async def _alerts_of(self, row: Row) -> list[WebhookAlert] | None:
        """The alerts of a stored delivery, parsed once however many batches it is split into."""
        delivery = int(row["id"])
        if self._parsed is not None and self._parsed[0] == delivery:
            return self._parsed[1]
        try:
            alerts = decode_webhook(row["body"]).alerts
        except InvalidPayloadError as exc:
            # Only a stricter payload format after an upgrade can get here; skipping beats a stuck inbox.
            reason = exc.message
            self._discarded += await self._db.write(lambda tx: self._discard_delivery(tx, delivery, reason))
            log.error("inbox delivery unreadable; skipped", extra=fields(delivery=delivery, reason=reason[:500]))
            return None
        self._parsed = (delivery, alerts)
        return alerts

    async def _discard_delivery(self, tx: Transaction, delivery: int, reason: str) -> int:
        """Mark an unreadable delivery processed; return how many of its alerts this skipped."""
        # Only the replica that marks it processed counts it and records why.
        left = await tx.value(
            "UPDATE inbox SET processed_at = %s WHERE id = %s AND processed_at IS NULL RETURNING alerts - done",
            (self._db.clock(), delivery),
        )
        if left is None:
            return 0
        await tx.event("delivery_unreadable", {"delivery": delivery, "reason": reason[:2000]})
        return int(left)

    async def depth(self) -> int:
        rows = await self._db.read(
            "SELECT coalesce(sum(alerts - done), 0) AS depth FROM inbox WHERE processed_at IS NULL"
        )
        return int(rows[0]["depth"])

    async def purge(self, older_than: float) -> int:
        self._parsed = None
        # Ids come from a sequence and are never used twice, so (unlike SQLite) the newest row may go too.
        return await self._db.write(
            lambda tx: tx.execute(
                "DELETE FROM inbox WHERE processed_at IS NOT NULL AND processed_at < %s", (older_than,)
            )
        )
