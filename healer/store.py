"""The durable store: inbox, episodes, actions, cooldowns and the audit trail, in SQLite (WAL).

Every method of `SQLiteStore` is one transaction, so a crash leaves either all of a decision
on disk or none of it. `AsyncStore` runs them on one dedicated thread and commits concurrent
webhook deliveries together (group commit), so that durability does not cost a commit each.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydantic import ValidationError

from healer.healing.payload import WebhookAlert, WebhookPayload
from healer.logs import fields

T = TypeVar("T")
# The outcomes of a step that say whether its strategy heals: verified either way, or failed to act.
LEARNING_OUTCOMES = ("healed", "not_healed", "failed", "timeout")
log = logging.getLogger(__name__)

# One row per webhook delivery, its body as received; `done` counts the alerts the engine processed.
# A new id is the largest + 1, and purge always keeps the newest row, so an id is never used twice.
# (AUTOINCREMENT would too, at the price of one more page written per commit.)
INBOX_TABLE = """
CREATE TABLE IF NOT EXISTS inbox (
    id INTEGER PRIMARY KEY,
    received_at REAL NOT NULL,
    body TEXT NOT NULL,
    alerts INTEGER NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    processed_at REAL
)"""

SCHEMA = f"""
{INBOX_TABLE};
CREATE INDEX IF NOT EXISTS inbox_unprocessed ON inbox(id) WHERE processed_at IS NULL;
CREATE TABLE IF NOT EXISTS episodes (
    id INTEGER PRIMARY KEY,
    fingerprint TEXT NOT NULL,
    starts_at TEXT NOT NULL,
    starts_at_epoch REAL NOT NULL,
    alertname TEXT NOT NULL,
    labels TEXT NOT NULL,
    annotations TEXT NOT NULL,
    rule TEXT,
    state TEXT NOT NULL,
    created_at REAL NOT NULL,
    ended_at REAL,
    resolved_at REAL,
    silence_id TEXT,
    UNIQUE (fingerprint, starts_at)
);
CREATE INDEX IF NOT EXISTS episodes_state ON episodes(state);
CREATE TABLE IF NOT EXISTS actions (
    id INTEGER PRIMARY KEY,
    episode_id INTEGER NOT NULL REFERENCES episodes(id),
    attempt INTEGER NOT NULL,
    step INTEGER NOT NULL,
    rule TEXT NOT NULL,
    strategy TEXT NOT NULL,
    state TEXT NOT NULL,
    outcome TEXT,
    skip_reason TEXT,
    not_before REAL NOT NULL,
    approval_deadline REAL,
    approved INTEGER NOT NULL DEFAULT 0,
    created_at REAL NOT NULL,
    started_at REAL,
    finished_at REAL,
    plan TEXT,
    detail TEXT,
    exit_code INTEGER,
    output TEXT,
    UNIQUE (episode_id, attempt)
);
CREATE INDEX IF NOT EXISTS actions_state ON actions(state, not_before);
CREATE TABLE IF NOT EXISTS cooldowns (
    rule TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    until REAL NOT NULL,
    streak INTEGER NOT NULL,
    PRIMARY KEY (rule, fingerprint)
);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    ts REAL NOT NULL,
    episode_id INTEGER,
    action_id INTEGER,
    kind TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS events_episode ON events(episode_id);
-- HealingFailed of an escalated episode, kept until Alertmanager has it and, later, its resolution.
CREATE TABLE IF NOT EXISTS escalations (
    episode_id INTEGER PRIMARY KEY REFERENCES episodes(id),
    rule TEXT NOT NULL,
    reason TEXT NOT NULL,
    created_at REAL NOT NULL,
    next_send REAL,
    sent_at REAL,
    failures INTEGER NOT NULL DEFAULT 0,
    resolved_at REAL
);
CREATE INDEX IF NOT EXISTS escalations_due ON escalations(next_send) WHERE next_send IS NOT NULL;
"""

# Action states: pending → running → done, or pending → awaiting_approval → pending / done.
OPEN_ACTION_STATES = ("pending", "awaiting_approval")
# Episode states; all but "open" are final.
EPISODE_FINAL = ("healed", "escalated", "resolved", "unmatched", "dry_run", "unverified")


class StoreUnavailableError(Exception):
    """The store cannot take writes (disk full, locked, I/O error)."""


@dataclass(frozen=True)
class NewAction:
    """A step to schedule: which strategy, which attempt, and not before when."""

    attempt: int
    step: int
    rule: str
    strategy: str
    not_before: float


@dataclass(frozen=True, order=True)
class InboxPosition:
    """Where an alert sits in the inbox: its delivery (one webhook request) and its index there."""

    delivery: int
    index: int


@dataclass(frozen=True)
class OpenRequest:
    """A firing alert from the inbox and what the engine decided for it."""

    position: InboxPosition
    alert: WebhookAlert
    rule: str | None
    state: str
    first: NewAction | None
    events: Sequence[tuple[str, dict[str, Any]]] = ()


@dataclass(frozen=True)
class Opened:
    episode: Episode
    created: bool
    deferred_until: float | None


@dataclass(frozen=True)
class Escalation:
    """The HealingFailed alert of an escalated episode and where its delivery stands.

    `next_send` is when to post it next (None once nothing is left to send); `resolved_at` is when
    the escalated alert stopped firing, so that the next post resolves HealingFailed.
    """

    episode_id: int
    rule: str
    reason: str
    created_at: float
    next_send: float | None
    sent_at: float | None
    failures: int
    resolved_at: float | None


@dataclass(frozen=True)
class Agenda:
    due: list[Action]
    expired_approvals: list[Action]
    escalations: list[Escalation]
    next_wake: float | None


@dataclass(frozen=True)
class InboxItem:
    position: InboxPosition
    received_at: float
    alert: WebhookAlert


@dataclass(frozen=True)
class Episode:
    id: int
    fingerprint: str
    starts_at: str
    starts_at_epoch: float
    alertname: str
    labels: dict[str, str]
    annotations: dict[str, str]
    rule: str | None
    state: str
    created_at: float
    ended_at: float | None
    resolved_at: float | None
    silence_id: str | None


@dataclass(frozen=True)
class Action:
    id: int
    episode_id: int
    attempt: int
    step: int
    rule: str
    strategy: str
    state: str
    outcome: str | None
    skip_reason: str | None
    not_before: float
    approval_deadline: float | None
    approved: bool
    created_at: float
    started_at: float | None
    finished_at: float | None
    plan: dict[str, Any] | None
    detail: str | None
    exit_code: int | None
    output: str | None

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class ActionFilter:
    alertname: str | None = None
    fingerprint: str | None = None
    episode_id: int | None = None
    rule: str | None = None
    strategy: str | None = None
    outcome: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int = 100


@dataclass(frozen=True)
class Finish:
    """How a step ended, and what follows from it, written in one transaction."""

    outcome: str
    detail: str = ""
    skip_reason: str | None = None
    exit_code: int | None = None
    output: str | None = None
    plan: dict[str, Any] | None = None
    started_at: float | None = None
    next_action: NewAction | None = None
    episode_state: str | None = None
    # Why the episode goes to people; with episode_state "escalated" it queues HealingFailed.
    escalation: str | None = None
    cooldown: tuple[float, int] | None = None
    events: Sequence[tuple[str, dict[str, Any]]] = field(default_factory=tuple)


def _episode(row: sqlite3.Row) -> Episode:
    return Episode(
        row["id"],
        row["fingerprint"],
        row["starts_at"],
        row["starts_at_epoch"],
        row["alertname"],
        json.loads(row["labels"]),
        json.loads(row["annotations"]),
        row["rule"],
        row["state"],
        row["created_at"],
        row["ended_at"],
        row["resolved_at"],
        row["silence_id"],
    )


def _action(row: sqlite3.Row) -> Action:
    return Action(
        row["id"],
        row["episode_id"],
        row["attempt"],
        row["step"],
        row["rule"],
        row["strategy"],
        row["state"],
        row["outcome"],
        row["skip_reason"],
        row["not_before"],
        row["approval_deadline"],
        bool(row["approved"]),
        row["created_at"],
        row["started_at"],
        row["finished_at"],
        json.loads(row["plan"]) if row["plan"] else None,
        row["detail"],
        row["exit_code"],
        row["output"],
    )


class SQLiteStore:
    """Synchronous SQLite store; use it from one thread (AsyncStore does that)."""

    def __init__(self, path: Path | str, clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path)
        self._clock = clock
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_file = None
        if str(path) != ":memory:":
            # Two healers on one store would each recover the other's running steps and run them twice.
            self._lock_file = open(f"{path}.lock", "w")  # noqa: SIM115 - held for the store's lifetime
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._lock_file.close()
                raise StoreUnavailableError(f"another healer is using the store {path}") from None
        self._db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=10)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL with WAL survives a killed process; FULL would also survive power loss at a cost per commit.
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._migrate()
        self._db.executescript(SCHEMA)
        self._parsed: tuple[int, list[WebhookAlert]] | None = None
        # Alerts of deliveries the payload model no longer accepts; the engine subtracts them from its gauge.
        self.discarded_alerts = 0

    def _migrate(self) -> None:
        """Turn an inbox of one row per alert (the layout of earlier builds) into deliveries of one."""
        columns = {row["name"] for row in self._db.execute("PRAGMA table_info(inbox)")}
        if "alert" not in columns:
            return

        def work(db: sqlite3.Connection) -> None:
            db.execute("DROP INDEX IF EXISTS inbox_unprocessed")
            db.execute("ALTER TABLE inbox RENAME TO inbox_per_alert")
            db.execute(INBOX_TABLE)
            db.execute(
                "INSERT INTO inbox (received_at, body, alerts) SELECT received_at,"
                " json_object('version', '4', 'status', status, 'alerts', json_array(json(alert))), 1"
                " FROM inbox_per_alert WHERE processed_at IS NULL ORDER BY id"
            )
            db.execute("DROP TABLE inbox_per_alert")

        self._tx(work)

    def close(self) -> None:
        self._db.close()
        if self._lock_file is not None:
            self._lock_file.close()

    def _tx(self, work: Callable[[sqlite3.Connection], T]) -> T:
        try:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                result = work(self._db)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
            return result
        except sqlite3.OperationalError as exc:
            raise StoreUnavailableError(str(exc)) from exc

    def transaction(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` in one write transaction; other subsystems' records use it to share this file."""
        return self._tx(work)

    def read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """Run one read-only query."""
        return self._db.execute(sql, params).fetchall()

    def _event(
        self,
        db: sqlite3.Connection,
        kind: str,
        detail: dict[str, Any],
        episode_id: int | None = None,
        action_id: int | None = None,
    ) -> None:
        db.execute(
            "INSERT INTO events (ts, episode_id, action_id, kind, detail) VALUES (?, ?, ?, ?, ?)",
            (self._clock(), episode_id, action_id, kind, json.dumps(detail)),
        )

    # -- inbox ---------------------------------------------------------------------------------

    def accept(self, deliveries: Sequence[tuple[bytes, int]]) -> list[int]:
        """Write validated webhook bodies, each with its alert count, in one transaction; return their ids."""
        now = self._clock()

        def work(db: sqlite3.Connection) -> list[int]:
            # A delivery is stored as it came: serialising each alert again cost more than all the rest of
            # the webhook. CAST keeps it TEXT, so SQLite's JSON functions can read it.
            db.executemany(
                "INSERT INTO inbox (received_at, body, alerts) VALUES (?, CAST(? AS TEXT), ?)",
                [(now, body, count) for body, count in deliveries],
            )
            # One writer, and each new id is the previous one + 1, so the ids of one batch are contiguous.
            last = int(db.execute("SELECT last_insert_rowid()").fetchone()[0])
            return list(range(last - len(deliveries) + 1, last + 1))

        return self._tx(work)

    def unprocessed(self, limit: int = 500) -> list[InboxItem]:
        """The next alerts that the engine has not processed, in order; a delivery may span several calls."""
        items: list[InboxItem] = []
        cursor = self._db.execute(
            "SELECT id, received_at, body, done FROM inbox WHERE processed_at IS NULL ORDER BY id"
        )
        try:
            for row in cursor:
                alerts = self._alerts_of(row["id"], row["body"])
                if alerts is None:
                    continue
                for index in range(row["done"], min(len(alerts), row["done"] + limit - len(items))):
                    items.append(InboxItem(InboxPosition(row["id"], index), row["received_at"], alerts[index]))
                if len(items) >= limit:
                    break
        finally:
            cursor.close()
        return items

    def _alerts_of(self, delivery: int, body: str) -> list[WebhookAlert] | None:
        """The alerts of a stored delivery, parsed once however many batches it is split into."""
        if self._parsed is not None and self._parsed[0] == delivery:
            return self._parsed[1]
        try:
            alerts = WebhookPayload.model_validate_json(body).alerts
        except ValidationError as exc:
            # Only a stricter payload model after an upgrade can get here; skipping beats a stuck inbox.
            reason = str(exc)
            self._tx(lambda db: self._discard_delivery(db, delivery, reason))
            log.error("inbox delivery unreadable; skipped", extra=fields(delivery=delivery, reason=reason[:500]))
            return None
        self._parsed = (delivery, alerts)
        return alerts

    def _discard_delivery(self, db: sqlite3.Connection, delivery: int, reason: str) -> None:
        left = db.execute("SELECT alerts - done FROM inbox WHERE id = ?", (delivery,)).fetchone()
        self.discarded_alerts += int(left[0]) if left else 0
        db.execute("UPDATE inbox SET processed_at = ? WHERE id = ?", (self._clock(), delivery))
        self._event(db, "delivery_unreadable", {"delivery": delivery, "reason": reason[:2000]})

    @staticmethod
    def _advance(db: sqlite3.Connection, positions: Sequence[InboxPosition], now: float) -> None:
        """Mark alerts processed: each delivery's cursor moves past the last of its alerts given."""
        last: dict[int, int] = {}
        for position in positions:
            last[position.delivery] = max(last.get(position.delivery, -1), position.index)
        db.executemany(
            "UPDATE inbox SET done = ?1, processed_at = CASE WHEN ?1 >= alerts THEN ?2 END WHERE id = ?3 AND done < ?1",
            [(index + 1, now, delivery) for delivery, index in last.items()],
        )

    def inbox_depth(self) -> int:
        """Alerts accepted and not yet processed."""
        row = self._db.execute("SELECT coalesce(sum(alerts - done), 0) FROM inbox WHERE processed_at IS NULL")
        return int(row.fetchone()[0])

    # -- episodes ------------------------------------------------------------------------------

    def find_episode(self, fingerprint: str, starts_at: str) -> Episode | None:
        row = self._db.execute(
            "SELECT * FROM episodes WHERE fingerprint = ? AND starts_at = ?", (fingerprint, starts_at)
        ).fetchone()
        return _episode(row) if row else None

    def get_episode(self, episode_id: int) -> Episode | None:
        row = self._db.execute("SELECT * FROM episodes WHERE id = ?", (episode_id,)).fetchone()
        return _episode(row) if row else None

    def open_episodes(self, requests: Sequence[OpenRequest]) -> list[Opened]:
        """Create the episodes of firing alerts with their first steps, in one transaction.

        An episode that exists already is left alone (Alertmanager re-sends). A first step waits
        out the rule's cooldown for that alert. The inbox cursor moves past every alert given.
        """
        now = self._clock()

        def work(db: sqlite3.Connection) -> list[Opened]:
            opened = [self._open_episode(db, request, now) for request in requests]
            self._advance(db, [request.position for request in requests], now)
            return opened

        return self._tx(work)

    def _open_episode(self, db: sqlite3.Connection, request: OpenRequest, now: float) -> Opened:
        alert = request.alert
        starts_at = alert.starts_at
        ended_at = None if request.state == "open" else now
        cursor = db.execute(
            "INSERT OR IGNORE INTO episodes (fingerprint, starts_at, starts_at_epoch, alertname, labels,"
            " annotations, rule, state, created_at, ended_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                alert.fingerprint,
                starts_at,
                alert.starts_at_epoch,
                alert.alertname,
                json.dumps(alert.labels),
                json.dumps(alert.annotations),
                request.rule,
                request.state,
                now,
                ended_at,
            ),
        )
        created = cursor.rowcount == 1
        if created:
            # Everything is known; reading the row back would only parse the JSON just written.
            episode = Episode(
                int(cursor.lastrowid or 0), alert.fingerprint, starts_at, alert.starts_at_epoch, alert.alertname,
                dict(alert.labels), dict(alert.annotations), request.rule, request.state, now, ended_at, None, None,
            )  # fmt: skip
        else:
            row = db.execute(
                "SELECT * FROM episodes WHERE fingerprint = ? AND starts_at = ?", (alert.fingerprint, starts_at)
            ).fetchone()
            episode = _episode(row)
        deferred_until = None
        if created:
            for kind, detail in request.events:
                self._event(db, kind, detail, episode.id)
            first = request.first
            if first is not None:
                cooldown = db.execute(
                    "SELECT until FROM cooldowns WHERE rule = ? AND fingerprint = ?", (first.rule, alert.fingerprint)
                ).fetchone()
                if cooldown is not None and cooldown[0] > first.not_before:
                    deferred_until = float(cooldown[0])
                    first = NewAction(first.attempt, first.step, first.rule, first.strategy, deferred_until)
                    self._event(db, "deferred", {"reason": "cooldown", "until": deferred_until}, episode.id)
                self._insert_action(db, episode.id, first, now)
        return Opened(episode, created, deferred_until)

    def resolve_episode(
        self, position: InboxPosition, alert: WebhookAlert
    ) -> tuple[Episode | None, list[Action], list[Action]]:
        """Record a resolved notification: cancel the episode's open steps, report its running ones."""
        now = self._clock()

        def work(db: sqlite3.Connection) -> tuple[Episode | None, list[Action], list[Action]]:
            self._advance(db, [position], now)
            row = db.execute(
                "SELECT * FROM episodes WHERE fingerprint = ? AND starts_at = ?", (alert.fingerprint, alert.starts_at)
            ).fetchone()
            if row is None:
                return None, [], []
            episode_id = row["id"]
            if row["resolved_at"] is None:
                db.execute("UPDATE episodes SET resolved_at = ? WHERE id = ?", (now, episode_id))
                self._event(db, "resolved", {"fingerprint": alert.fingerprint}, episode_id)
            self._resolve_escalation(db, episode_id, now)
            cancelled = [
                _action(r)
                for r in db.execute(
                    "SELECT * FROM actions WHERE episode_id = ? AND state IN ('pending', 'awaiting_approval')",
                    (episode_id,),
                ).fetchall()
            ]
            for action in cancelled:
                db.execute(
                    "UPDATE actions SET state = 'done', outcome = 'cancelled', skip_reason = 'resolved',"
                    " finished_at = ?, detail = 'alert resolved before the step ran' WHERE id = ?",
                    (now, action.id),
                )
                self._event(db, "cancelled", {"reason": "resolved"}, episode_id, action.id)
            cancelled = [
                _action(db.execute("SELECT * FROM actions WHERE id = ?", (a.id,)).fetchone()) for a in cancelled
            ]
            running = [
                _action(r)
                for r in db.execute(
                    "SELECT * FROM actions WHERE episode_id = ? AND state IN ('running', 'verifying')", (episode_id,)
                ).fetchall()
            ]
            if not running and row["state"] == "open":
                db.execute("UPDATE episodes SET state = 'resolved', ended_at = ? WHERE id = ?", (now, episode_id))
            refreshed = db.execute("SELECT * FROM episodes WHERE id = ?", (episode_id,)).fetchone()
            return _episode(refreshed), cancelled, running

        return self._tx(work)

    def set_silence(self, episode_id: int, silence_id: str | None) -> None:
        self._tx(lambda db: db.execute("UPDATE episodes SET silence_id = ? WHERE id = ?", (silence_id, episode_id)))

    def end_episode(self, episode_id: int, state: str, events: Sequence[tuple[str, dict[str, Any]]] = ()) -> None:
        now = self._clock()

        def work(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE episodes SET state = ?, ended_at = ? WHERE id = ? AND state = 'open'", (state, now, episode_id)
            )
            for kind, detail in events:
                self._event(db, kind, detail, episode_id)

        self._tx(work)

    def episodes_with_silences(self) -> list[Episode]:
        """Episodes that ended while their silence was still recorded (expire it after a restart)."""
        rows = self._db.execute("SELECT * FROM episodes WHERE silence_id IS NOT NULL AND state != 'open'").fetchall()
        return [_episode(r) for r in rows]

    def get_escalation(self, episode_id: int) -> Escalation | None:
        row = self._db.execute("SELECT * FROM escalations WHERE episode_id = ?", (episode_id,)).fetchone()
        return Escalation(**row) if row else None

    def escalation_sent(self, episode_id: int, next_send: float | None) -> None:
        """Record that Alertmanager took HealingFailed; `next_send` None means it was the resolving post.

        A resolution recorded while a firing post was in flight makes the next post due at once.
        """
        now = self._clock()

        def work(db: sqlite3.Connection) -> None:
            first = db.execute("SELECT sent_at FROM escalations WHERE episode_id = ?", (episode_id,)).fetchone()
            db.execute(
                "UPDATE escalations SET sent_at = ?, failures = 0,"
                " next_send = CASE WHEN ?2 IS NOT NULL AND resolved_at IS NOT NULL THEN ?1 ELSE ?2 END"
                " WHERE episode_id = ?3",
                (now, next_send, episode_id),
            )
            # Re-sends keep HealingFailed firing; only the first delivery and the resolution are news.
            if first is not None and first["sent_at"] is None:
                self._event(db, "escalation_delivered", {}, episode_id)
            if next_send is None:
                self._event(db, "escalation_resolved", {}, episode_id)

        self._tx(work)

    def escalation_failed(self, episode_id: int, next_send: float | None, reason: str) -> None:
        """Record a failed post of HealingFailed; with `next_send` None healer gives up on it."""

        def work(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE escalations SET failures = failures + 1, next_send = ? WHERE episode_id = ?",
                (next_send, episode_id),
            )
            if next_send is None:
                self._event(db, "escalation_refused", {"reason": reason[:2000]}, episode_id)

        self._tx(work)

    def escalation_withdrawn(self, episode_id: int) -> None:
        """The alert resolved before HealingFailed ever reached Alertmanager: nobody needs paging."""

        def work(db: sqlite3.Connection) -> None:
            db.execute("UPDATE escalations SET next_send = NULL WHERE episode_id = ?", (episode_id,))
            self._event(
                db, "escalation_withdrawn", {"reason": "the alert resolved before it was delivered"}, episode_id
            )

        self._tx(work)

    def escalation_stopped_firing(self, episode_id: int) -> None:
        """The escalated alert no longer fires: resolve HealingFailed with the next send, which is now."""
        now = self._clock()
        self._tx(lambda db: self._resolve_escalation(db, episode_id, now))

    @staticmethod
    def _resolve_escalation(db: sqlite3.Connection, episode_id: int, now: float) -> None:
        db.execute(
            "UPDATE escalations SET resolved_at = ?, next_send = ? WHERE episode_id = ? AND resolved_at IS NULL"
            " AND next_send IS NOT NULL",
            (now, now, episode_id),
        )

    # -- actions -------------------------------------------------------------------------------

    def _insert_action(self, db: sqlite3.Connection, episode_id: int, spec: NewAction, now: float) -> int:
        cursor = db.execute(
            "INSERT INTO actions (episode_id, attempt, step, rule, strategy, state, not_before, created_at)"
            " VALUES (?, ?, ?, ?, ?, 'pending', ?, ?)",
            (episode_id, spec.attempt, spec.step, spec.rule, spec.strategy, spec.not_before, now),
        )
        action_id = int(cursor.lastrowid or 0)
        self._event(
            db,
            "scheduled",
            {"strategy": spec.strategy, "attempt": spec.attempt, "not_before": spec.not_before},
            episode_id,
            action_id,
        )
        return action_id

    def get_action(self, action_id: int) -> Action | None:
        row = self._db.execute("SELECT * FROM actions WHERE id = ?", (action_id,)).fetchone()
        return _action(row) if row else None

    def due_actions(self, now: float) -> list[Action]:
        """Pending steps whose time has come, of episodes still open, oldest first."""
        rows = self._db.execute(
            "SELECT a.* FROM actions a JOIN episodes e ON e.id = a.episode_id WHERE a.state = 'pending'"
            " AND a.not_before <= ? AND e.state = 'open' ORDER BY a.not_before, a.id",
            (now,),
        ).fetchall()
        return [_action(r) for r in rows]

    def agenda(self, now: float) -> Agenda:
        """What the engine must do now, and when it must look again, in one read."""
        expired = [
            _action(r)
            for r in self._db.execute(
                "SELECT * FROM actions WHERE state = 'awaiting_approval' AND approval_deadline <= ?", (now,)
            ).fetchall()
        ]
        later = self._db.execute(
            "SELECT min(CASE WHEN state = 'pending' THEN not_before ELSE approval_deadline END) FROM actions"
            " WHERE (state = 'pending' AND not_before > ?) OR (state = 'awaiting_approval' AND approval_deadline > ?)",
            (now, now),
        ).fetchone()[0]
        escalations = [
            Escalation(**r)
            for r in self._db.execute("SELECT * FROM escalations WHERE next_send <= ? ORDER BY next_send", (now,))
        ]
        next_send = self._db.execute("SELECT min(next_send) FROM escalations WHERE next_send > ?", (now,)).fetchone()[0]
        wakes = [float(t) for t in (later, next_send) if t is not None]
        return Agenda(self.due_actions(now), expired, escalations, min(wakes, default=None))

    def mark_verifying(self, action_id: int, detail: str) -> None:
        """Record that a step's strategy has run and only its verification is left."""
        self._tx(
            lambda db: db.execute(
                "UPDATE actions SET state = 'verifying', detail = ? WHERE id = ? AND state = 'running'",
                (detail, action_id),
            )
        )

    def verifying_actions(self) -> list[Action]:
        return [_action(r) for r in self._db.execute("SELECT * FROM actions WHERE state = 'verifying'").fetchall()]

    def running_actions(self) -> list[Action]:
        return [_action(r) for r in self._db.execute("SELECT * FROM actions WHERE state = 'running'").fetchall()]

    def claim(self, action_id: int, plan: dict[str, Any] | None) -> bool:
        """Move a pending step to running; False when another claim or a cancellation won."""
        now = self._clock()

        def work(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "UPDATE actions SET state = 'running', started_at = ?, plan = ? WHERE id = ? AND state = 'pending'",
                (now, json.dumps(plan) if plan is not None else None, action_id),
            )
            if cursor.rowcount != 1:
                return False
            row = db.execute("SELECT episode_id, strategy FROM actions WHERE id = ?", (action_id,)).fetchone()
            self._event(db, "started", {"strategy": row["strategy"]}, row["episode_id"], action_id)
            return True

        return self._tx(work)

    def await_approval(self, action_id: int, deadline: float, plan: dict[str, Any] | None) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "UPDATE actions SET state = 'awaiting_approval', approval_deadline = ?, plan = ?"
                " WHERE id = ? AND state = 'pending'",
                (deadline, json.dumps(plan) if plan is not None else None, action_id),
            )
            if cursor.rowcount == 1:
                row = db.execute("SELECT episode_id FROM actions WHERE id = ?", (action_id,)).fetchone()
                self._event(db, "awaiting_approval", {"deadline": deadline}, row["episode_id"], action_id)
            return cursor.rowcount == 1

        return self._tx(work)

    def approve(self, action_id: int, approver: str) -> bool:
        """Return an awaiting step to pending with its approval recorded."""

        def work(db: sqlite3.Connection) -> bool:
            cursor = db.execute(
                "UPDATE actions SET state = 'pending', approved = 1, not_before = ?"
                " WHERE id = ? AND state = 'awaiting_approval'",
                (self._clock(), action_id),
            )
            if cursor.rowcount == 1:
                row = db.execute("SELECT episode_id FROM actions WHERE id = ?", (action_id,)).fetchone()
                self._event(db, "approved", {"by": approver}, row["episode_id"], action_id)
            return cursor.rowcount == 1

        return self._tx(work)

    def finish(self, action_id: int, finish: Finish) -> bool:
        """Record how a step ended and apply its consequences; False if it had already ended."""
        now = self._clock()

        def work(db: sqlite3.Connection) -> bool:
            row = db.execute("SELECT * FROM actions WHERE id = ?", (action_id,)).fetchone()
            if row is None or row["state"] == "done":
                return False
            action = _action(row)
            db.execute(
                "UPDATE actions SET state = 'done', outcome = ?, skip_reason = ?, detail = ?, exit_code = ?,"
                " output = ?, finished_at = ?, started_at = coalesce(started_at, ?),"
                " plan = coalesce(?, plan) WHERE id = ?",
                (
                    finish.outcome,
                    finish.skip_reason,
                    finish.detail,
                    finish.exit_code,
                    finish.output,
                    now,
                    finish.started_at,
                    json.dumps(finish.plan) if finish.plan is not None else None,
                    action_id,
                ),
            )
            self._event(
                db,
                "finished",
                {"outcome": finish.outcome, "skip_reason": finish.skip_reason, "detail": finish.detail},
                action.episode_id,
                action_id,
            )
            for kind, detail in finish.events:
                self._event(db, kind, detail, action.episode_id, action_id)
            if finish.cooldown is not None:
                until, streak = finish.cooldown
                db.execute(
                    "INSERT INTO cooldowns (rule, fingerprint, until, streak) SELECT ?, fingerprint, ?, ?"
                    " FROM episodes WHERE id = ? ON CONFLICT (rule, fingerprint) DO UPDATE SET"
                    " until = excluded.until, streak = excluded.streak",
                    (action.rule, until, streak, action.episode_id),
                )
            episode_state = db.execute(
                "SELECT state, resolved_at FROM episodes WHERE id = ?", (action.episode_id,)
            ).fetchone()
            if (
                finish.next_action is not None
                and episode_state["state"] == "open"
                and episode_state["resolved_at"] is None
            ):
                self._insert_action(db, action.episode_id, finish.next_action, now)
            elif finish.episode_state == "escalated" and episode_state["resolved_at"] is not None:
                db.execute(
                    "UPDATE episodes SET state = 'resolved', ended_at = ? WHERE id = ? AND state = 'open'",
                    (now, action.episode_id),
                )
            elif finish.episode_state is not None:
                ended = db.execute(
                    "UPDATE episodes SET state = ?, ended_at = ? WHERE id = ? AND state = 'open'",
                    (finish.episode_state, now, action.episode_id),
                ).rowcount
                if ended and finish.episode_state == "escalated" and finish.escalation is not None:
                    db.execute(
                        "INSERT OR IGNORE INTO escalations (episode_id, rule, reason, created_at, next_send)"
                        " VALUES (?, ?, ?, ?, ?)",
                        (action.episode_id, action.rule, finish.escalation, now, now),
                    )
            elif episode_state["resolved_at"] is not None:
                db.execute(
                    "UPDATE episodes SET state = 'resolved', ended_at = ? WHERE id = ? AND state = 'open'",
                    (now, action.episode_id),
                )
            return True

        return self._tx(work)

    def action_starts_since(self, horizon: float) -> list[float]:
        """Start times of steps that really ran since `horizon`, to restore the action budget."""
        rows = self._db.execute(
            "SELECT started_at FROM actions WHERE started_at >= ? AND coalesce(outcome, '') != 'dry_run'", (horizon,)
        ).fetchall()
        return [float(r[0]) for r in rows]

    def cooldown(self, rule: str, fingerprint: str) -> tuple[float, int]:
        """Return (until, streak) of a rule and alert; (0, 0) when none was recorded."""
        row = self._db.execute(
            "SELECT until, streak FROM cooldowns WHERE rule = ? AND fingerprint = ?", (rule, fingerprint)
        ).fetchone()
        return (float(row[0]), int(row[1])) if row else (0.0, 0)

    def strategy_outcomes(self) -> dict[tuple[str, str], tuple[int, int]]:
        """Per (rule, strategy): steps that healed, and steps whose outcome says whether they healed."""
        rows = self._db.execute(
            "SELECT rule, strategy, sum(outcome = 'healed'), sum(outcome IN (?, ?, ?, ?))"
            " FROM actions GROUP BY rule, strategy",
            LEARNING_OUTCOMES,
        ).fetchall()
        return {(row[0], row[1]): (int(row[2] or 0), int(row[3] or 0)) for row in rows}

    def tried_strategies(self, episode_id: int) -> set[str]:
        """The strategies an episode has had steps of."""
        rows = self._db.execute("SELECT DISTINCT strategy FROM actions WHERE episode_id = ?", (episode_id,))
        return {row[0] for row in rows}

    def attempts(self, episode_id: int) -> int:
        return int(
            self._db.execute(
                "SELECT coalesce(max(attempt), 0) FROM actions WHERE episode_id = ?", (episode_id,)
            ).fetchone()[0]
        )

    # -- audit ---------------------------------------------------------------------------------

    def list_actions(self, query: ActionFilter) -> list[tuple[Action, Episode]]:
        """Steps newest first, filtered by alert, rule, strategy, outcome and time."""
        clauses: list[str] = []
        params: list[object] = []
        for column, value in (
            ("e.alertname", query.alertname),
            ("e.fingerprint", query.fingerprint),
            ("a.episode_id", query.episode_id),
            ("a.rule", query.rule),
            ("a.strategy", query.strategy),
            ("a.outcome", query.outcome),
        ):
            if value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if query.since is not None:
            clauses.append("a.created_at >= ?")
            params.append(query.since)
        if query.until is not None:
            clauses.append("a.created_at <= ?")
            params.append(query.until)
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        # The clauses name fixed columns; every value is a bound parameter.
        sql = f"SELECT a.* FROM actions a JOIN episodes e ON e.id = a.episode_id {where} ORDER BY a.id DESC LIMIT ?"  # noqa: S608
        rows = self._db.execute(sql, (*params, query.limit)).fetchall()
        episodes: dict[int, Episode] = {}
        result = []
        for row in rows:
            if row["episode_id"] not in episodes:
                episode = self.get_episode(row["episode_id"])
                assert episode is not None
                episodes[row["episode_id"]] = episode
            result.append((_action(row), episodes[row["episode_id"]]))
        return result

    def events(self, episode_id: int) -> list[dict[str, Any]]:
        rows = self._db.execute(
            "SELECT ts, action_id, kind, detail FROM events WHERE episode_id = ? ORDER BY id", (episode_id,)
        ).fetchall()
        return [
            {"ts": r["ts"], "action_id": r["action_id"], "kind": r["kind"], **json.loads(r["detail"])} for r in rows
        ]

    def counts(self) -> dict[str, Any]:
        """Totals for the status report: alerts received, episodes by state, steps by outcome."""
        received = int(self._db.execute("SELECT coalesce(sum(alerts), 0) FROM inbox").fetchone()[0])
        episodes = dict(self._db.execute("SELECT state, count(*) FROM episodes GROUP BY state").fetchall())
        outcomes = dict(
            self._db.execute(
                "SELECT outcome, count(*) FROM actions WHERE outcome IS NOT NULL GROUP BY outcome"
            ).fetchall()
        )
        heal_times = [
            r[0]
            for r in self._db.execute(
                "SELECT a.finished_at - e.starts_at_epoch FROM actions a JOIN episodes e ON e.id = a.episode_id"
                " WHERE a.outcome = 'healed' ORDER BY 1"
            ).fetchall()
        ]
        return {"alerts_received": received, "episodes": episodes, "actions": outcomes, "heal_seconds": heal_times}

    def purge(self, older_than: float) -> int:
        """Delete finished episodes, their steps and events, and processed inbox items older than a time."""

        def work(db: sqlite3.Connection) -> int:
            # An episode whose silence could not be expired yet, or whose HealingFailed still has to be
            # sent or resolved, is kept, so neither is forgotten.
            ended = (
                "state != 'open' AND silence_id IS NULL AND coalesce(ended_at, created_at) < ?"
                " AND id NOT IN (SELECT episode_id FROM escalations WHERE next_send IS NOT NULL)"
            )
            old = f"SELECT id FROM episodes WHERE {ended}"  # noqa: S608 - constant
            db.execute(f"DELETE FROM events WHERE episode_id IN ({old})", (older_than,))  # noqa: S608 - constant
            db.execute(f"DELETE FROM escalations WHERE episode_id IN ({old})", (older_than,))  # noqa: S608 - constant
            db.execute(f"DELETE FROM actions WHERE episode_id IN ({old})", (older_than,))  # noqa: S608 - constant
            removed = db.execute(f"DELETE FROM episodes WHERE {ended}", (older_than,)).rowcount  # noqa: S608 - constant
            db.execute(
                "DELETE FROM inbox WHERE processed_at IS NOT NULL AND processed_at < ?"
                " AND id < (SELECT max(id) FROM inbox)",
                (older_than,),
            )
            return int(removed)

        self._parsed = None

        return self._tx(work)


class AsyncStore:
    """Runs SQLiteStore methods on one thread; `accept` commits concurrent deliveries together."""

    def __init__(self, store: SQLiteStore) -> None:
        self.sync = store
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="healer-store")
        self._pending: list[tuple[tuple[bytes, int], asyncio.Future[int]]] = []
        self._flushing = False

    async def call(self, method: Callable[..., T], *args: Any) -> T:
        """Run a store method on the store thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, method, *args)

    async def accept(self, body: bytes, alerts: int) -> int:
        """Commit one validated delivery to the inbox, batched with concurrent deliveries; return its id."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append(((body, alerts), future))
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    ids = await self.call(self.sync.accept, [delivery for delivery, _ in batch])
                except Exception as exc:  # every waiter learns that its delivery was not stored
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(
                                exc if isinstance(exc, StoreUnavailableError) else StoreUnavailableError(str(exc))
                            )
                    continue
                for (_, future), delivery_id in zip(batch, ids, strict=True):
                    if not future.done():
                        future.set_result(delivery_id)
        finally:
            self._flushing = False

    async def close(self) -> None:
        await self.call(self.sync.close)
        self._executor.shutdown(wait=True)
