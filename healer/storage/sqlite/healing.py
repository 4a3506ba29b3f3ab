"""Healing's records in SQLite: episodes, steps, cooldowns, escalations and the audit trail."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from healer.healing.model import (
    LEARNING_OUTCOMES,
    Action,
    ActionFilter,
    ActionState,
    Agenda,
    Episode,
    EpisodeState,
    Escalation,
    Event,
    Finish,
    Flap,
    FlapPolicy,
    HealingCounts,
    InboxPosition,
    NewAction,
    Opened,
    OpenRequest,
    Outcome,
    Resolution,
    Suspension,
)
from healer.healing.payload import WebhookAlert
from healer.healing.rules import (
    FLAPPING_REASON_PREFIX,
    after_resolved,
    after_step,
    defer_for_cooldown,
    flapping,
    flapping_reason,
)
from healer.storage.audit import OPERATOR_ACT_KINDS, AuditEntry, audit_entry
from healer.storage.rows import action as _action
from healer.storage.rows import (
    action_filter_terms,
    finish_refused,
    finish_values,
    finished,
    new_action,
    new_episode,
    plan_json,
    scheduled,
    suspensions,
)
from healer.storage.rows import episode as _episode
from healer.storage.rows import escalation as _escalation
from healer.storage.rows import event as _event
from healer.storage.sqlite.database import SQLiteDatabase
from healer.storage.sqlite.inbox import advance


class SQLiteHealingRecords:
    """The healing tables of one SQLite file."""

    def __init__(self, database: SQLiteDatabase) -> None:
        self._db = database

    # -- episodes ------------------------------------------------------------------------------

    async def open_episodes(
        self, requests: Sequence[OpenRequest], replica: str | None = None, until: float = 0.0
    ) -> list[Opened]:
        def work(db: sqlite3.Connection) -> list[Opened]:
            now = self._db.clock()
            opened = [self._open_episode(db, request, now, replica, until) for request in requests]
            advance(db, [request.position for request in requests], now)
            return opened

        return await self._db.write(work)

    def _open_episode(
        self, db: sqlite3.Connection, request: OpenRequest, now: float, replica: str | None, until: float
    ) -> Opened:
        alert = request.alert
        starts_at = alert.starts_at
        ended_at = None if request.state is EpisodeState.OPEN else now
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
                request.state.value,
                now,
                ended_at,
            ),
        )
        if cursor.rowcount != 1:
            row = db.execute(
                "SELECT * FROM episodes WHERE fingerprint = ? AND starts_at = ?", (alert.fingerprint, starts_at)
            ).fetchone()
            return Opened(_episode(row), False, None)
        episode = new_episode(int(cursor.lastrowid or 0), request, now)
        for kind, detail in request.events:
            self._db.event(db, kind, detail, episode.id)
        if request.first is not None and request.flapping is not None:
            flapped = self._flapping(db, episode, request.first.rule, request.flapping, now)
            if flapped is not None:
                return flapped
        deferred_until = None
        if request.first is not None:
            cooldown = db.execute(
                "SELECT until FROM cooldowns WHERE rule = ? AND fingerprint = ?",
                (request.first.rule, alert.fingerprint),
            ).fetchone()
            deferral = defer_for_cooldown(request.first, float(cooldown[0]) if cooldown else None)
            deferred_until = deferral.deferred_until
            if deferred_until is not None:
                self._db.event(db, "deferred", {"reason": "cooldown", "until": deferred_until}, episode.id)
            if replica is not None and deferral.first.not_before <= now:
                action_id = self._insert_action(db, episode.id, deferral.first, now, replica, until)
                first = new_action(action_id, episode.id, deferral.first, now, replica, until)
                return Opened(episode, True, deferred_until, first=first)
            self._insert_action(db, episode.id, deferral.first, now)
        return Opened(episode, True, deferred_until)

    def _flapping(
        self, db: sqlite3.Connection, episode: Episode, rule: str, policy: FlapPolicy, now: float
    ) -> Opened | None:
        """End a new episode unacted on when its alert flaps (`healing.rules.flapping`); None when it does not."""
        earlier = int(
            db.execute(
                "SELECT count(*) FROM episodes WHERE fingerprint = ? AND rule = ? AND created_at >= ? AND id != ?",
                (episode.fingerprint, rule, now - policy.window, episode.id),
            ).fetchone()[0]
        )
        row = db.execute(
            "SELECT until FROM flapping WHERE rule = ? AND fingerprint = ?", (rule, episode.fingerprint)
        ).fetchone()
        judged = flapping(policy, earlier, float(row[0]) if row else None, now)
        if judged.flap is None:
            return None
        db.execute(
            "INSERT INTO flapping (rule, fingerprint, until) VALUES (?, ?, ?)"
            " ON CONFLICT (rule, fingerprint) DO UPDATE SET until = excluded.until",
            (rule, episode.fingerprint, judged.until),
        )
        state = EpisodeState.ESCALATED if judged.flap is Flap.ESCALATE else EpisodeState.FLAPPING
        db.execute("UPDATE episodes SET state = ?, ended_at = ? WHERE id = ?", (state.value, now, episode.id))
        reason = flapping_reason(policy)
        self._db.event(db, "flapping", {"episodes": earlier + 1, "until": judged.until}, episode.id)
        if judged.flap is Flap.ESCALATE:
            self._db.event(db, "escalated", {"reason": reason}, episode.id)
            db.execute(
                "INSERT OR IGNORE INTO escalations (episode_id, rule, reason, created_at, next_send)"
                " VALUES (?, ?, ?, ?, ?)",
                (episode.id, rule, reason, now, now),
            )
        return Opened(replace(episode, state=state, ended_at=now), True, None, judged.flap)

    async def resolve_episode(self, position: InboxPosition, alert: WebhookAlert) -> Resolution:
        def work(db: sqlite3.Connection) -> Resolution:
            now = self._db.clock()
            advance(db, [position], now)
            row = db.execute(
                "SELECT * FROM episodes WHERE fingerprint = ? AND starts_at = ?", (alert.fingerprint, alert.starts_at)
            ).fetchone()
            if row is None:
                return Resolution(None, [], [])
            episode_id = row["id"]
            if row["resolved_at"] is None:
                db.execute("UPDATE episodes SET resolved_at = ? WHERE id = ?", (now, episode_id))
                self._db.event(db, "resolved", {"fingerprint": alert.fingerprint}, episode_id)
            self._resolve_escalation(db, episode_id, now, alert_resolved=True)
            open_ids = [
                r[0]
                for r in db.execute(
                    "SELECT id FROM actions WHERE episode_id = ? AND state IN ('pending', 'awaiting_approval')",
                    (episode_id,),
                )
            ]
            for action_id in open_ids:
                db.execute(
                    "UPDATE actions SET state = 'done', outcome = 'cancelled', skip_reason = 'resolved',"
                    " finished_at = ?, detail = 'alert resolved before the step ran' WHERE id = ?",
                    (now, action_id),
                )
                self._db.event(db, "cancelled", {"reason": "resolved"}, episode_id, action_id)
            cancelled = [self._get_action(db, action_id) for action_id in open_ids]
            running = [
                _action(r)
                for r in db.execute(
                    "SELECT * FROM actions WHERE episode_id = ? AND state IN ('running', 'verifying')", (episode_id,)
                ).fetchall()
            ]
            end_as = after_resolved(EpisodeState(row["state"]), bool(running))
            if end_as is not None:
                db.execute("UPDATE episodes SET state = ?, ended_at = ? WHERE id = ?", (end_as.value, now, episode_id))
            refreshed = db.execute("SELECT * FROM episodes WHERE id = ?", (episode_id,)).fetchone()
            return Resolution(_episode(refreshed), [a for a in cancelled if a is not None], running)

        return await self._db.write(work)

    async def get_episode(self, episode_id: int) -> Episode | None:
        rows = await self._db.read("SELECT * FROM episodes WHERE id = ?", (episode_id,))
        return _episode(rows[0]) if rows else None

    async def set_silence(self, episode_id: int, silence_id: str | None) -> None:
        await self._db.write(
            lambda db: db.execute("UPDATE episodes SET silence_id = ? WHERE id = ?", (silence_id, episode_id))
        )

    async def episodes_with_silences(self) -> list[Episode]:
        rows = await self._db.read("SELECT * FROM episodes WHERE silence_id IS NOT NULL AND state != 'open'")
        return [_episode(r) for r in rows]

    # -- steps ---------------------------------------------------------------------------------

    def _insert_action(
        self,
        db: sqlite3.Connection,
        episode_id: int,
        spec: NewAction,
        now: float,
        replica: str | None = None,
        until: float | None = None,
    ) -> int:
        cursor = db.execute(
            "INSERT INTO actions (episode_id, attempt, step, rule, strategy, state, not_before, created_at, replica,"
            " lease_until) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?)",
            (episode_id, spec.attempt, spec.step, spec.rule, spec.strategy, spec.not_before, now, replica, until),
        )
        action_id = int(cursor.lastrowid or 0)
        self._db.event(db, *scheduled(spec), episode_id, action_id)
        return action_id

    @staticmethod
    def _get_action(db: sqlite3.Connection, action_id: int) -> Action | None:
        row = db.execute("SELECT * FROM actions WHERE id = ?", (action_id,)).fetchone()
        return _action(row) if row else None

    async def get_action(self, action_id: int) -> Action | None:
        rows = await self._db.read("SELECT * FROM actions WHERE id = ?", (action_id,))
        return _action(rows[0]) if rows else None

    async def agenda(self, now: float, replica: str) -> Agenda:
        return await self._db.run(self._agenda, now, replica)

    def _agenda(self, now: float, replica: str) -> Agenda:
        rows = self._db.rows
        due = [
            _action(r)
            for r in rows(
                "SELECT a.* FROM actions a JOIN episodes e ON e.id = a.episode_id WHERE a.state = 'pending'"
                " AND a.not_before <= ? AND e.state = 'open'"
                " AND (a.replica IS NULL OR a.replica = ? OR a.lease_until < ?) ORDER BY a.not_before, a.id",
                (now, replica, now),
            )
        ]
        expired = [
            _action(r)
            for r in rows("SELECT * FROM actions WHERE state = 'awaiting_approval' AND approval_deadline <= ?", (now,))
        ]
        later = rows(
            "SELECT min(CASE WHEN state = 'pending' THEN not_before ELSE approval_deadline END) FROM actions"
            " WHERE (state = 'pending' AND not_before > ?) OR (state = 'awaiting_approval' AND approval_deadline > ?)",
            (now, now),
        )[0][0]
        escalations = [
            _escalation(r) for r in rows("SELECT * FROM escalations WHERE next_send <= ? ORDER BY next_send", (now,))
        ]
        next_send = rows("SELECT min(next_send) FROM escalations WHERE next_send > ?", (now,))[0][0]
        wakes = [float(t) for t in (later, next_send) if t is not None]
        return Agenda(due, expired, escalations, min(wakes, default=None))

    async def take(self, action_id: int, replica: str, now: float, until: float) -> Episode | None:
        def work(db: sqlite3.Connection) -> Episode | None:
            taken = db.execute(
                "UPDATE actions SET replica = ?, lease_until = ? WHERE id = ? AND state = 'pending'"
                " AND (replica IS NULL OR replica = ? OR lease_until < ?)",
                (replica, until, action_id, replica, now),
            ).rowcount
            if taken != 1:
                return None
            row = db.execute(
                "SELECT e.* FROM episodes e JOIN actions a ON a.episode_id = e.id WHERE a.id = ?", (action_id,)
            ).fetchone()
            return _episode(row) if row is not None else None

        return await self._db.write(work)

    async def give_back(self, action_id: int, replica: str) -> None:
        await self._db.write(
            lambda db: db.execute(
                "UPDATE actions SET replica = NULL, lease_until = NULL WHERE id = ? AND replica = ?"
                " AND state = 'pending'",
                (action_id, replica),
            )
        )

    async def mark_verifying(
        self, action_id: int, detail: str, replica: str, failed: Outcome | None = None
    ) -> bool:
        return await self._db.write(
            lambda db: db.execute(
                "UPDATE actions SET state = 'verifying', detail = ?, outcome = ? WHERE id = ?"
                " AND state IN ('running', 'verifying') AND replica = ?",
                (detail, failed.value if failed else None, action_id, replica),
            ).rowcount
            == 1
        )

    async def adopt(self, action_id: int, replica: str, until: float, abandoned_before: float) -> Action | None:
        def work(db: sqlite3.Connection) -> Action | None:
            row = db.execute(
                "UPDATE actions SET replica = ?, lease_until = ? WHERE id = ? AND state = 'verifying'"
                " AND (replica = ? OR coalesce(lease_until, 0) < ?) RETURNING *",
                (replica, until, action_id, replica, abandoned_before),
            ).fetchone()
            return _action(row) if row is not None else None

        return await self._db.write(work)

    async def abandoned(self, now: float) -> list[Action]:
        rows = await self._db.read(
            "SELECT * FROM actions WHERE state IN ('running', 'verifying') AND coalesce(lease_until, 0) < ?"
            " ORDER BY id",
            (now,),
        )
        return [_action(r) for r in rows]

    async def running_actions(self) -> list[Action]:
        return [_action(r) for r in await self._db.read("SELECT * FROM actions WHERE state = 'running'")]

    def _move(
        self,
        db: sqlite3.Connection,
        action_id: int,
        assignments: str,
        params: Sequence[Any],
        from_state: ActionState,
        event: Event,
        replica: str | None = None,
    ) -> bool:
        """Move a step out of `from_state` with an audit event; False when it was not in that state
        (or, with `replica`, not held by that replica)."""
        # A step that nobody took may be claimed straight away; one another replica took may not.
        held = " AND (replica IS NULL OR replica = ?)" if replica is not None else ""
        cursor = db.execute(
            f"UPDATE actions SET {assignments} WHERE id = ? AND state = ?{held}",  # noqa: S608 - ours
            (*params, action_id, from_state.value, *([replica] if replica is not None else [])),
        )
        if cursor.rowcount != 1:
            return False
        row = db.execute("SELECT episode_id FROM actions WHERE id = ?", (action_id,)).fetchone()
        self._db.event(db, event[0], event[1], row["episode_id"], action_id)
        return True

    async def claim(self, action_id: int, plan: dict[str, Any] | None, replica: str) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            strategy = db.execute("SELECT strategy FROM actions WHERE id = ?", (action_id,)).fetchone()
            return self._move(
                db,
                action_id,
                "state = 'running', started_at = ?, plan = ?, replica = ?, skip_reason = NULL",
                (self._db.clock(), plan_json(plan), replica),
                ActionState.PENDING,
                ("started", {"strategy": strategy[0] if strategy else None, "replica": replica}),
                replica,
            )

        return await self._db.write(work)

    async def hold(self, action_id: int, replica: str, reason: str, detail: str) -> None:
        await self._db.write(
            lambda db: self._move(
                db,
                action_id,
                "skip_reason = ?, detail = ?",
                (reason, detail),
                ActionState.PENDING,
                ("held", {"reason": reason, "detail": detail, "replica": replica}),
                replica,
            )
        )

    async def suspensions(self, since: float) -> list[Suspension]:
        def work(db: sqlite3.Connection) -> list[Suspension]:
            ended = db.execute(
                "SELECT a.skip_reason, a.rule, count(*) FROM actions a JOIN episodes e ON e.id = a.episode_id"
                " WHERE e.state = 'suspended' AND e.resolved_at IS NULL AND a.state = 'done' AND a.finished_at >= ?"
                " AND a.skip_reason IS NOT NULL"
                " GROUP BY a.skip_reason, a.rule",
                (since,),
            ).fetchall()
            held = db.execute(
                "SELECT skip_reason, rule, count(*) FROM actions WHERE state = 'pending' AND skip_reason IS NOT NULL"
                " GROUP BY skip_reason, rule"
            ).fetchall()
            return suspensions(ended, held)

        return await self._db.write(work)

    async def await_approval(self, action_id: int, deadline: float, plan: dict[str, Any] | None) -> bool:
        return await self._db.write(
            lambda db: self._move(
                db,
                action_id,
                "state = 'awaiting_approval', approval_deadline = ?, plan = ?",
                (deadline, plan_json(plan)),
                ActionState.PENDING,
                ("awaiting_approval", {"deadline": deadline}),
            )
        )

    async def approve(self, action_id: int, approver: str) -> bool:
        return await self._db.write(
            lambda db: self._move(
                db,
                action_id,
                "state = 'pending', approved = 1, not_before = ?",
                (self._db.clock(),),
                ActionState.AWAITING_APPROVAL,
                ("approved", {"by": approver}),
            )
        )

    async def finish(
        self, action_id: int, finish: Finish, replica: str | None = None, abandoned_before: float | None = None
    ) -> bool:
        return await self._db.write(lambda db: self._finish(db, action_id, finish, replica, abandoned_before))

    def _finish(
        self,
        db: sqlite3.Connection,
        action_id: int,
        finish: Finish,
        replica: str | None,
        abandoned_before: float | None,
    ) -> bool:
        now = self._db.clock()
        action = self._get_action(db, action_id)
        if action is None or finish_refused(action, replica, abandoned_before):
            return False
        db.execute(
            "UPDATE actions SET state = 'done', outcome = ?, skip_reason = ?, detail = ?, exit_code = ?,"
            " output = ?, finished_at = ?, started_at = coalesce(started_at, ?),"
            " plan = coalesce(?, plan) WHERE id = ?",
            finish_values(finish, now, action_id),
        )
        self._db.event(db, *finished(finish), action.episode_id, action_id)
        for kind, detail in finish.events:
            self._db.event(db, kind, detail, action.episode_id, action_id)
        if finish.cooldown is not None:
            until, streak = finish.cooldown
            db.execute(
                "INSERT INTO cooldowns (rule, fingerprint, until, streak) SELECT ?, fingerprint, ?, ?"
                " FROM episodes WHERE id = ? ON CONFLICT (rule, fingerprint) DO UPDATE SET"
                " until = excluded.until, streak = excluded.streak",
                (action.rule, until, streak, action.episode_id),
            )
        episode = db.execute("SELECT state, resolved_at FROM episodes WHERE id = ?", (action.episode_id,)).fetchone()
        then = after_step(EpisodeState(episode["state"]), episode["resolved_at"] is not None, finish)
        if then.schedule is not None:
            self._insert_action(db, action.episode_id, then.schedule, now)
        if then.end_as is not None:
            db.execute(
                "UPDATE episodes SET state = ?, ended_at = ? WHERE id = ? AND state = 'open'",
                (then.end_as.value, now, action.episode_id),
            )
        if then.queue_escalation:
            db.execute(
                "INSERT OR IGNORE INTO escalations (episode_id, rule, reason, created_at, next_send)"
                " VALUES (?, ?, ?, ?, ?)",
                (action.episode_id, action.rule, finish.escalation, now, now),
            )
        return True

    async def strategy_outcomes(self) -> dict[tuple[str, str], tuple[int, int]]:
        marks = ", ".join("?" * len(LEARNING_OUTCOMES))
        rows = await self._db.read(
            f"SELECT rule, strategy, sum(outcome = 'healed'), sum(outcome IN ({marks}))"  # noqa: S608 - marks only
            " FROM actions GROUP BY rule, strategy",
            [o.value for o in LEARNING_OUTCOMES],
        )
        return {(row[0], row[1]): (int(row[2] or 0), int(row[3] or 0)) for row in rows}

    async def tried_strategies(self, episode_id: int) -> set[str]:
        rows = await self._db.read("SELECT DISTINCT strategy FROM actions WHERE episode_id = ?", (episode_id,))
        return {row[0] for row in rows}

    # -- escalations ---------------------------------------------------------------------------

    async def get_escalation(self, episode_id: int) -> Escalation | None:
        rows = await self._db.read("SELECT * FROM escalations WHERE episode_id = ?", (episode_id,))
        return _escalation(rows[0]) if rows else None

    async def escalation_sent(self, episode_id: int, next_send: float | None) -> None:
        def work(db: sqlite3.Connection) -> None:
            first = db.execute("SELECT sent_at FROM escalations WHERE episode_id = ?", (episode_id,)).fetchone()
            # A resolution recorded while a firing post was in flight makes the next post due at once.
            db.execute(
                "UPDATE escalations SET sent_at = ?1, failures = 0,"
                " next_send = CASE WHEN ?2 IS NOT NULL AND resolved_at IS NOT NULL THEN ?1 ELSE ?2 END"
                " WHERE episode_id = ?3",
                (self._db.clock(), next_send, episode_id),
            )
            # Re-sends keep HealingFailed firing; only the first delivery and the resolution are news.
            if first is not None and first["sent_at"] is None:
                self._db.event(db, "escalation_delivered", {}, episode_id)
            if next_send is None:
                self._db.event(db, "escalation_resolved", {}, episode_id)

        await self._db.write(work)

    async def escalation_failed(self, episode_id: int, next_send: float | None, reason: str) -> None:
        def work(db: sqlite3.Connection) -> None:
            db.execute(
                "UPDATE escalations SET failures = failures + 1, next_send = ? WHERE episode_id = ?",
                (next_send, episode_id),
            )
            if next_send is None:
                self._db.event(db, "escalation_refused", {"reason": reason[:2000]}, episode_id)

        await self._db.write(work)

    async def escalation_withdrawn(self, episode_id: int) -> None:
        def work(db: sqlite3.Connection) -> None:
            db.execute("UPDATE escalations SET next_send = NULL WHERE episode_id = ?", (episode_id,))
            reason = {"reason": "the alert resolved before it was delivered"}
            self._db.event(db, "escalation_withdrawn", reason, episode_id)

        await self._db.write(work)

    async def escalation_stopped_firing(self, episode_id: int) -> None:
        await self._db.write(lambda db: self._resolve_escalation(db, episode_id, self._db.clock()))

    @staticmethod
    def _resolve_escalation(db: sqlite3.Connection, episode_id: int, now: float, alert_resolved: bool = False) -> None:
        # A flapping alert's resolution is no news: its HealingFailed stays until Prometheus says it stopped.
        db.execute(
            "UPDATE escalations SET resolved_at = ?, next_send = ? WHERE episode_id = ? AND resolved_at IS NULL"
            " AND next_send IS NOT NULL AND NOT (? AND reason LIKE ?)",
            (now, now, episode_id, alert_resolved, FLAPPING_REASON_PREFIX + "%"),
        )

    # -- audit ---------------------------------------------------------------------------------

    async def list_actions(self, query: ActionFilter) -> list[tuple[Action, Episode]]:
        return await self._db.run(self._list_actions, query)

    def _list_actions(self, query: ActionFilter) -> list[tuple[Action, Episode]]:
        terms = action_filter_terms(query)
        clauses = [f"{column} {operator} ?" for column, operator, _ in terms]
        params = [value for _, _, value in terms]
        where = f"WHERE {' AND '.join(clauses)}" if clauses else ""
        # The clauses name fixed columns; every value is a bound parameter.
        sql = f"SELECT a.* FROM actions a JOIN episodes e ON e.id = a.episode_id {where} ORDER BY a.id DESC LIMIT ?"  # noqa: S608
        rows = self._db.rows(sql, (*params, query.limit))
        episodes: dict[int, Episode] = {}
        for episode_id in {row["episode_id"] for row in rows}:
            [episode_row] = self._db.rows("SELECT * FROM episodes WHERE id = ?", (episode_id,))
            episodes[episode_id] = _episode(episode_row)
        return [(_action(row), episodes[row["episode_id"]]) for row in rows]

    async def events(self, episode_id: int) -> list[dict[str, Any]]:
        rows = await self._db.read(
            "SELECT ts, action_id, kind, detail FROM events WHERE episode_id = ? ORDER BY id", (episode_id,)
        )
        return [_event(r) for r in rows]

    async def operator_acts(self, limit: int = 100) -> list[AuditEntry]:
        kinds = ", ".join("?" for _ in OPERATOR_ACT_KINDS)
        rows = await self._db.read(
            f"SELECT id, ts, kind, detail FROM events WHERE episode_id IS NULL AND kind IN ({kinds})"  # noqa: S608
            " ORDER BY id DESC LIMIT ?",
            (*OPERATOR_ACT_KINDS, limit),
        )
        return [audit_entry(int(r["id"]), float(r["ts"]), r["kind"], json.loads(r["detail"])) for r in rows]

    async def counts(self) -> HealingCounts:
        return await self._db.run(self._counts)

    def _counts(self) -> HealingCounts:
        rows = self._db.rows
        received = int(rows("SELECT coalesce(sum(alerts), 0) FROM inbox")[0][0])
        episodes = {r[0]: int(r[1]) for r in rows("SELECT state, count(*) FROM episodes GROUP BY state")}
        outcomes = {
            r[0]: int(r[1])
            for r in rows("SELECT outcome, count(*) FROM actions WHERE outcome IS NOT NULL GROUP BY outcome")
        }
        heal_times = [
            float(r[0])
            for r in rows(
                "SELECT a.finished_at - e.starts_at_epoch FROM actions a JOIN episodes e ON e.id = a.episode_id"
                " WHERE a.outcome = 'healed' ORDER BY 1"
            )
        ]
        return HealingCounts(received, episodes, outcomes, heal_times)

    async def purge(self, older_than: float) -> int:
        def work(db: sqlite3.Connection) -> int:
            # An episode whose silence could not be expired yet, or whose HealingFailed still has to be
            # sent or resolved, is kept, so neither is forgotten.
            ended = (
                "state != 'open' AND silence_id IS NULL AND coalesce(ended_at, created_at) < ?"
                " AND id NOT IN (SELECT episode_id FROM escalations WHERE next_send IS NOT NULL)"
            )
            old = f"SELECT id FROM episodes WHERE {ended}"  # noqa: S608 - constant
            for table in ("events", "escalations", "actions"):
                db.execute(f"DELETE FROM {table} WHERE episode_id IN ({old})", (older_than,))  # noqa: S608 - constant
            # Operators' acts belong to no episode: they age out by their own time, as the episodes do.
            kinds = ", ".join("?" for _ in OPERATOR_ACT_KINDS)
            db.execute(
                f"DELETE FROM events WHERE episode_id IS NULL AND kind IN ({kinds}) AND ts < ?",  # noqa: S608
                (*OPERATOR_ACT_KINDS, older_than),
            )
            return int(db.execute(f"DELETE FROM episodes WHERE {ended}", (older_than,)).rowcount)  # noqa: S608

        return await self._db.write(work)
