"""Healing's records in PostgreSQL: episodes, steps, cooldowns, escalations and the audit trail, shared by replicas.

Transactions that touch several of these rows lock them in one order (episode, then its steps, then
the inbox), so that replicas wait for each other instead of deadlocking.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import psycopg
from psycopg import sql

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
from healer.storage.postgres.database import PostgresDatabase, Row, Transaction
from healer.storage.postgres.inbox import advance
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


def _episode_key(request: OpenRequest) -> tuple[str, str]:
    return request.alert.fingerprint, request.alert.starts_at


@dataclass(frozen=True)
class _Flapped:
    """A new episode whose alert flaps: what follows, how many came before it in the window, until when."""

    flap: Flap
    earlier: int
    until: float
    reason: str


@dataclass(frozen=True)
class _Opening:
    """What opening a batch of episodes did, before the COMMIT's answer brings the first steps' ids."""

    opened: list[Opened]
    # Per episode, the first step created taken by the replica that opened it.
    taken: dict[int, NewAction]
    inserted: psycopg.AsyncCursor[Row] | None
    now: float


def _first(request: OpenRequest) -> NewAction:
    assert request.first is not None
    return request.first


def _policy(request: OpenRequest) -> FlapPolicy:
    assert request.flapping is not None
    return request.flapping


class PostgresHealingRecords:
    """The healing tables of one PostgreSQL database."""

    def __init__(self, database: PostgresDatabase) -> None:
        self._db = database

    # -- episodes ------------------------------------------------------------------------------

    async def open_episodes(
        self, requests: Sequence[OpenRequest], replica: str | None = None, until: float = 0.0
    ) -> list[Opened]:
        async def with_first_steps(opening: _Opening) -> list[Opened]:
            # The ids of the steps created taken come back with the COMMIT's round trip, not one of their own.
            if opening.inserted is None or not opening.taken:
                return opening.opened
            ids = {int(row["episode_id"]): int(row["action_id"]) for row in await opening.inserted.fetchall()}
            return [
                replace(o, first=new_action(ids[o.episode.id], o.episode.id, spec, opening.now, replica, until))
                if o.created and (spec := opening.taken.get(o.episode.id)) is not None and o.episode.id in ids
                else o
                for o in opening.opened
            ]

        return await self._db.transaction_then(
            lambda tx: self._open_episodes(tx, requests, replica, until), with_first_steps
        )

    async def _open_episodes(
        self, tx: Transaction, requests: Sequence[OpenRequest], replica: str | None, lease_until: float
    ) -> _Opening:
        # A statement per kind of row for the whole batch, not per alert: a round trip to the server
        # costs more than SQLite's whole insert.
        now = self._db.clock()
        # Replicas given the same alerts in another order would lock each other's new episodes
        # crosswise; in key order they queue instead. The sort is stable, so of two requests for one
        # episode the first still opens it.
        order = sorted(range(len(requests)), key=lambda i: _episode_key(requests[i]))
        batch = [requests[i] for i in order]
        # Sent ahead with the insert, so that both come back in one round trip: the cooldowns of every
        # first step asked for, of which those of the episodes created are used.
        cooldowns = await self._cooldowns(tx, requests)
        # A replica opening the same episode at the same moment waits here for the other's commit,
        # then does nothing: each episode, and so its first step, is created once.
        inserted = await tx.rows(
            "INSERT INTO episodes (fingerprint, starts_at, starts_at_epoch, alertname, labels, annotations, rule,"
            " state, created_at, ended_at) SELECT f, s, e, n, l, a, r, st, %s, ended FROM unnest(%s::text[],"
            " %s::text[], %s::float8[], %s::text[], %s::text[], %s::text[], %s::text[], %s::text[], %s::float8[])"
            " WITH ORDINALITY AS u(f, s, e, n, l, a, r, st, ended, i) ORDER BY i"
            " ON CONFLICT (fingerprint, starts_at) DO NOTHING RETURNING id, fingerprint, starts_at",
            (
                now,
                [r.alert.fingerprint for r in batch],
                [r.alert.starts_at for r in batch],
                [r.alert.starts_at_epoch for r in batch],
                [r.alert.alertname for r in batch],
                [json.dumps(r.alert.labels) for r in batch],
                [json.dumps(r.alert.annotations) for r in batch],
                [r.rule for r in batch],
                [r.state.value for r in batch],
                [None if r.state is EpisodeState.OPEN else now for r in batch],
            ),
        )
        new_ids = {(row["fingerprint"], row["starts_at"]): int(row["id"]) for row in inserted}
        created: dict[int, int] = {}  # request index -> the id of the episode it opened
        for i in order:
            key = _episode_key(requests[i])
            if key in new_ids:
                created[i] = new_ids.pop(key)
        found = await self._existing_episodes(tx, [requests[i] for i in range(len(requests)) if i not in created])
        until = await cooldowns()
        deferrals = {
            i: defer_for_cooldown(first, until.get((first.rule, requests[i].alert.fingerprint)))
            for i in created
            if (first := requests[i].first) is not None
        }
        events: list[tuple[str, dict[str, Any], int, int | None]] = []
        flaps = await self._flapping(tx, requests, created, now)
        opened: list[Opened] = []
        for i, request in enumerate(requests):
            if i not in created:
                opened.append(Opened(found[_episode_key(request)], False, None))
                continue
            episode_id = created[i]
            events += [(kind, detail, episode_id, None) for kind, detail in request.events]
            if (flap := flaps.get(i)) is not None:
                deferrals.pop(i, None)
                state = EpisodeState.ESCALATED if flap.flap is Flap.ESCALATE else EpisodeState.FLAPPING
                events.append(("flapping", {"episodes": flap.earlier + 1, "until": flap.until}, episode_id, None))
                if flap.flap is Flap.ESCALATE:
                    events.append(("escalated", {"reason": flap.reason}, episode_id, None))
                episode = replace(new_episode(episode_id, request, now), state=state, ended_at=now)
                opened.append(Opened(episode, True, None, flap.flap))
                continue
            deferred_until = None
            if (deferral := deferrals.get(i)) is not None:
                deferred_until = deferral.deferred_until
                if deferred_until is not None:
                    events.append(("deferred", {"reason": "cooldown", "until": deferred_until}, episode_id, None))
            opened.append(Opened(new_episode(episode_id, request, now), True, deferred_until))
        # Only queued: the COMMIT's round trip carries them. Each step's "scheduled" event comes after
        # its episode's other events, as it would one by one.
        await tx.events(events)
        firsts = {created[i]: d.first for i, d in deferrals.items()}
        # The replica that opened an episode takes its first step when it is due at once.
        taken = {} if replica is None else {e: spec for e, spec in firsts.items() if spec.not_before <= now}
        first_steps = await self._insert_first_steps(tx, firsts, now, taken, replica, lease_until)
        await advance(tx, [request.position for request in requests], now)
        return _Opening(opened, taken, first_steps, now)

    @staticmethod
    async def _flapping(
        tx: Transaction, requests: Sequence[OpenRequest], created: dict[int, int], now: float
    ) -> dict[int, _Flapped]:
        """Judge the new episodes whose alert flaps (`healing.rules.flapping`), end them, and return them by
        request index. Episodes of one alert in the batch are judged in the order they were inserted."""
        asked = sorted(
            (created[i], i) for i, r in enumerate(requests) if i in created and r.first is not None and r.flapping
        )
        if not asked:
            return {}
        # Replicas opening episodes of one alert at once count them one after another (SQLite has one
        # writer); queued, so the lock costs no wait of its own. In key order: no deadlock.
        keys = sorted({f"{_first(requests[i]).rule}:{requests[i].alert.fingerprint}" for _, i in asked})
        await tx.send(
            "SELECT pg_advisory_xact_lock(hashtextextended(k, 0)) FROM unnest(%s::text[]) WITH ORDINALITY AS u(k, n)"
            " ORDER BY n",
            (keys,),
        )
        rows = await tx.rows(
            "SELECT u.i, (SELECT count(*) FROM episodes e WHERE e.fingerprint = u.f AND e.rule = u.r"
            " AND e.created_at >= u.since AND e.id < u.id) AS earlier,"
            " (SELECT until FROM flapping fl WHERE fl.rule = u.r AND fl.fingerprint = u.f) AS until"
            " FROM unnest(%s::bigint[], %s::text[], %s::text[], %s::float8[], %s::int[]) AS u(id, f, r, since, i)",
            (
                [episode_id for episode_id, _ in asked],
                [requests[i].alert.fingerprint for _, i in asked],
                [_first(requests[i]).rule for _, i in asked],
                [now - _policy(requests[i]).window for _, i in asked],
                [i for _, i in asked],
            ),
        )
        found = {int(row["i"]): (int(row["earlier"]), row["until"]) for row in rows}
        spells: dict[tuple[str, str], float | None] = {}  # as the batch leaves them
        flapped: dict[int, _Flapped] = {}
        for _, i in asked:
            request, policy = requests[i], _policy(requests[i])
            key = (_first(request).rule, request.alert.fingerprint)
            earlier, stored_until = found[i]
            judged = flapping(policy, earlier, spells.get(key, stored_until), now)
            if judged.flap is None or judged.until is None:
                continue
            spells[key] = judged.until
            flapped[i] = _Flapped(judged.flap, earlier, judged.until, flapping_reason(policy))
        if not flapped:
            return {}
        ids = [created[i] for i in flapped]
        ends = {Flap.ESCALATE: EpisodeState.ESCALATED.value, Flap.SUPPRESS: EpisodeState.FLAPPING.value}
        states = [ends[f.flap] for f in flapped.values()]
        await tx.send(
            "UPDATE episodes SET state = u.st, ended_at = %s FROM unnest(%s::bigint[], %s::text[]) AS u(id, st)"
            " WHERE episodes.id = u.id",
            (now, ids, states),
        )
        await tx.send(
            "INSERT INTO flapping (rule, fingerprint, until) SELECT * FROM unnest(%s::text[], %s::text[], %s::float8[])"
            " ON CONFLICT (rule, fingerprint) DO UPDATE SET until = excluded.until",
            ([rule for rule, _ in spells], [fingerprint for _, fingerprint in spells], list(spells.values())),
        )
        escalating = [
            (created[i], _first(requests[i]).rule, f.reason) for i, f in flapped.items() if f.flap is Flap.ESCALATE
        ]
        if escalating:
            await tx.send(
                "INSERT INTO escalations (episode_id, rule, reason, created_at, next_send)"
                " SELECT ep, r, why, %s, %s FROM unnest(%s::bigint[], %s::text[], %s::text[]) AS u(ep, r, why)"
                " ON CONFLICT (episode_id) DO NOTHING",
                (now, now, [e[0] for e in escalating], [e[1] for e in escalating], [e[2] for e in escalating]),
            )
        return flapped

    @staticmethod
    async def _existing_episodes(tx: Transaction, requests: Sequence[OpenRequest]) -> dict[tuple[str, str], Episode]:
        if not requests:
            return {}
        rows = await tx.rows(
            "SELECT * FROM episodes WHERE (fingerprint, starts_at) IN (SELECT * FROM unnest(%s::text[], %s::text[]))",
            ([r.alert.fingerprint for r in requests], [r.alert.starts_at for r in requests]),
        )
        return {(row["fingerprint"], row["starts_at"]): _episode(row) for row in rows}

    @staticmethod
    async def _cooldowns(
        tx: Transaction, requests: Sequence[OpenRequest]
    ) -> Callable[[], Awaitable[dict[tuple[str, str], float]]]:
        """Queue the query of the cooldowns that the first steps' rules left on these alerts; the
        function returned waits for them, by (rule, fingerprint)."""
        keys = [(r.first.rule, r.alert.fingerprint) for r in requests if r.first is not None]
        pending = await tx.query(
            "SELECT rule, fingerprint, until FROM cooldowns"
            " WHERE (rule, fingerprint) IN (SELECT * FROM unnest(%s::text[], %s::text[]))",
            ([rule for rule, _ in keys], [fingerprint for _, fingerprint in keys]),
        )

        async def rows() -> dict[tuple[str, str], float]:
            return {(row["rule"], row["fingerprint"]): float(row["until"]) for row in await pending.fetchall()}

        return rows

    @staticmethod
    async def _insert_first_steps(
        tx: Transaction,
        steps: dict[int, NewAction],
        now: float,
        taken: dict[int, NewAction],
        replica: str | None,
        until: float,
    ) -> psycopg.AsyncCursor[Row] | None:
        """Queue the insert of one pending step per episode, each with its "scheduled" event, those of
        `taken` held by `replica` until `until`; the cursor returned yields (episode_id, action_id) of each."""
        if not steps:
            return None
        specs = list(steps.items())
        events = [scheduled(spec) for spec in steps.values()]
        # One statement, whose result nobody waits for: the event takes its step's id inside it.
        return await tx.query(
            "WITH specs AS (SELECT * FROM unnest(%s::bigint[], %s::int[], %s::int[], %s::text[], %s::text[],"
            " %s::float8[], %s::text[], %s::text[], %s::text[], %s::float8[])"
            " WITH ORDINALITY AS u(ep, at, st, r, s, nb, kind, detail, rep, lease, i)),"
            " steps AS (INSERT INTO actions (episode_id, attempt, step, rule, strategy, state, not_before, created_at,"
            " replica, lease_until) SELECT ep, at, st, r, s, 'pending', nb, %s, rep, lease FROM specs ORDER BY i"
            " RETURNING id, episode_id)"
            " INSERT INTO events (ts, episode_id, action_id, kind, detail)"
            " SELECT %s, specs.ep, steps.id, specs.kind, specs.detail FROM specs"
            " JOIN steps ON steps.episode_id = specs.ep ORDER BY specs.i RETURNING episode_id, action_id",
            (
                [episode_id for episode_id, _ in specs],
                [spec.attempt for _, spec in specs],
                [spec.step for _, spec in specs],
                [spec.rule for _, spec in specs],
                [spec.strategy for _, spec in specs],
                [spec.not_before for _, spec in specs],
                [kind for kind, _ in events],
                [json.dumps(detail) for _, detail in events],
                [replica if episode_id in taken else None for episode_id, _ in specs],
                [until if episode_id in taken else None for episode_id, _ in specs],
                now,
                now,
            ),
        )

    async def resolve_episode(self, position: InboxPosition, alert: WebhookAlert) -> Resolution:
        async def work(tx: Transaction) -> Resolution:
            now = self._db.clock()
            # The episode's row lock orders this against a step of it finishing on another replica,
            # so that one of the two sees the other's effect (the alert resolved, or the step ended).
            row = await tx.row(
                "SELECT * FROM episodes WHERE fingerprint = %s AND starts_at = %s FOR UPDATE",
                (alert.fingerprint, alert.starts_at),
            )
            if row is None:
                await advance(tx, [position], now)
                return Resolution(None, [], [])
            episode_id = row["id"]
            if row["resolved_at"] is None:
                await tx.execute("UPDATE episodes SET resolved_at = %s WHERE id = %s", (now, episode_id))
                await tx.event("resolved", {"fingerprint": alert.fingerprint}, episode_id)
            await self._resolve_escalation(tx, episode_id, now, alert_resolved=True)
            cancelled = [
                _action(r)
                for r in await tx.rows(
                    "UPDATE actions SET state = 'done', outcome = 'cancelled', skip_reason = 'resolved',"
                    " finished_at = %s, detail = 'alert resolved before the step ran' WHERE id IN (SELECT id"
                    " FROM actions WHERE episode_id = %s AND state IN ('pending', 'awaiting_approval')"
                    " ORDER BY id FOR UPDATE) RETURNING *",
                    (now, episode_id),
                )
            ]
            cancelled.sort(key=lambda action: action.id)
            for action in cancelled:
                await tx.event("cancelled", {"reason": "resolved"}, episode_id, action.id)
            running = [
                _action(r)
                for r in await tx.rows(
                    "SELECT * FROM actions WHERE episode_id = %s AND state IN ('running', 'verifying') ORDER BY id",
                    (episode_id,),
                )
            ]
            end_as = after_resolved(EpisodeState(row["state"]), bool(running))
            if end_as is not None:
                await tx.execute(
                    "UPDATE episodes SET state = %s, ended_at = %s WHERE id = %s", (end_as.value, now, episode_id)
                )
            refreshed = await tx.row("SELECT * FROM episodes WHERE id = %s", (episode_id,))
            assert refreshed is not None
            # The inbox last, as in every transaction that touches it (see the module's docstring).
            await advance(tx, [position], now)
            return Resolution(_episode(refreshed), cancelled, running)

        return await self._db.write(work)

    async def get_episode(self, episode_id: int) -> Episode | None:
        rows = await self._db.read("SELECT * FROM episodes WHERE id = %s", (episode_id,))
        return _episode(rows[0]) if rows else None

    async def set_silence(self, episode_id: int, silence_id: str | None) -> None:
        await self._db.write(
            lambda tx: tx.execute("UPDATE episodes SET silence_id = %s WHERE id = %s", (silence_id, episode_id))
        )

    async def episodes_with_silences(self) -> list[Episode]:
        rows = await self._db.read("SELECT * FROM episodes WHERE silence_id IS NOT NULL AND state != 'open'")
        return [_episode(r) for r in rows]

    # -- steps ---------------------------------------------------------------------------------

    async def _insert_action(self, tx: Transaction, episode_id: int, spec: NewAction, now: float) -> int:
        action_id = int(
            await tx.value(
                "INSERT INTO actions (episode_id, attempt, step, rule, strategy, state, not_before, created_at)"
                " VALUES (%s, %s, %s, %s, %s, 'pending', %s, %s) RETURNING id",
                (episode_id, spec.attempt, spec.step, spec.rule, spec.strategy, spec.not_before, now),
            )
        )
        await tx.event(*scheduled(spec), episode_id, action_id)
        return action_id

    async def get_action(self, action_id: int) -> Action | None:
        rows = await self._db.read("SELECT * FROM actions WHERE id = %s", (action_id,))
        return _action(rows[0]) if rows else None

    async def agenda(self, now: float, replica: str) -> Agenda:
        # Five reads sent together: one round trip on every turn of the work loop.
        due, expired, later, escalations, next_send = await self._db.batch(
            [
                (
                    "SELECT a.* FROM actions a JOIN episodes e ON e.id = a.episode_id WHERE a.state = 'pending'"
                    " AND a.not_before <= %s AND e.state = 'open'"
                    " AND (a.replica IS NULL OR a.replica = %s OR a.lease_until < %s) ORDER BY a.not_before, a.id",
                    (now, replica, now),
                ),
                (
                    "SELECT * FROM actions WHERE state = 'awaiting_approval' AND approval_deadline <= %s ORDER BY id",
                    (now,),
                ),
                (
                    "SELECT min(CASE WHEN state = 'pending' THEN not_before ELSE approval_deadline END) FROM actions"
                    " WHERE (state = 'pending' AND not_before > %s)"
                    " OR (state = 'awaiting_approval' AND approval_deadline > %s)",
                    (now, now),
                ),
                ("SELECT * FROM escalations WHERE next_send <= %s ORDER BY next_send, episode_id", (now,)),
                ("SELECT min(next_send) FROM escalations WHERE next_send > %s", (now,)),
            ]
        )
        wakes = [float(t) for t in (later.value(), next_send.value()) if t is not None]
        return Agenda(
            [_action(r) for r in due.rows],
            [_action(r) for r in expired.rows],
            [_escalation(r) for r in escalations.rows],
            min(wakes, default=None),
        )

    async def take(self, action_id: int, replica: str, now: float, until: float) -> Episode | None:
        # One conditional UPDATE: of replicas taking the same step at once, the row lock lets one
        # through and the others re-check the condition against its result, and fail. The episode
        # comes back in the same round trip.
        # Not durable (see PostgresDatabase.batch): a reservation lost in a server crash leaves the step
        # pending and free, as a lapsed one would; the claim that runs the step is durable, and its
        # commit flushes this one with it.
        taken, episode = await self._db.batch(
            [
                (
                    "UPDATE actions SET replica = %s, lease_until = %s WHERE id = %s AND state = 'pending'"
                    " AND (replica IS NULL OR replica = %s OR lease_until < %s)",
                    (replica, until, action_id, replica, now),
                ),
                ("SELECT e.* FROM episodes e JOIN actions a ON a.episode_id = e.id WHERE a.id = %s", (action_id,)),
            ],
            durable=False,
        )
        return _episode(episode.rows[0]) if taken.rowcount == 1 and episode.rows else None

    async def give_back(self, action_id: int, replica: str) -> None:
        await self._db.write(
            lambda tx: tx.execute(
                "UPDATE actions SET replica = NULL, lease_until = NULL WHERE id = %s AND replica = %s"
                " AND state = 'pending'",
                (action_id, replica),
            )
        )

    async def mark_verifying(
        self, action_id: int, detail: str, replica: str, failed: Outcome | None = None
    ) -> bool:
        # A replica whose claim another replica settled finds the step done (or not its own): refused.
        # A claim that only lapsed (the store was out, nobody settled it) is still its own.
        return (
            await self._db.write(
                lambda tx: tx.execute(
                    "UPDATE actions SET state = 'verifying', detail = %s, outcome = %s WHERE id = %s"
                    " AND state IN ('running', 'verifying') AND replica = %s",
                    (detail, failed.value if failed else None, action_id, replica),
                )
            )
            == 1
        )

    async def adopt(self, action_id: int, replica: str, until: float, abandoned_before: float) -> Action | None:
        row = await self._db.write(
            lambda tx: tx.row(
                "UPDATE actions SET replica = %s, lease_until = %s WHERE id = %s AND state = 'verifying'"
                " AND (replica = %s OR coalesce(lease_until, 0) < %s) RETURNING *",
                (replica, until, action_id, replica, abandoned_before),
            )
        )
        return _action(row) if row is not None else None

    async def abandoned(self, now: float) -> list[Action]:
        rows = await self._db.read(
            "SELECT * FROM actions WHERE state IN ('running', 'verifying') AND coalesce(lease_until, 0) < %s"
            " ORDER BY id",
            (now,),
        )
        return [_action(r) for r in rows]

    async def running_actions(self) -> list[Action]:
        return [_action(r) for r in await self._db.read("SELECT * FROM actions WHERE state = 'running' ORDER BY id")]

    async def _move(
        self,
        tx: Transaction,
        action_id: int,
        assignments: sql.Composable,
        params: Sequence[Any],
        from_state: ActionState,
        event: Event,
        replica: str | None = None,
    ) -> bool:
        """Move a step out of `from_state` with an audit event; False when it was not in that state
        (or, with `replica`, not held by that replica)."""
        # A step that nobody took may be claimed straight away; one another replica took may not.
        held = sql.SQL(" AND (replica IS NULL OR replica = %s)") if replica is not None else sql.SQL("")
        episode_id = await tx.value(
            sql.SQL("UPDATE actions SET {} WHERE id = %s AND state = %s{} RETURNING episode_id").format(
                assignments, held
            ),
            (*params, action_id, from_state.value, *([replica] if replica is not None else [])),
        )
        if episode_id is None:
            return False
        await tx.event(event[0], event[1], episode_id, action_id)
        return True

    async def claim(self, action_id: int, plan: dict[str, Any] | None, replica: str) -> bool:
        # The move and its "started" event in one statement: the step's last wait before it runs.
        [claimed] = await self._db.batch(
            [
                (
                    "WITH moved AS (UPDATE actions SET state = 'running', started_at = %(now)s, plan = %(plan)s,"
                    " replica = %(replica)s, skip_reason = NULL WHERE id = %(id)s AND state = 'pending'"
                    " AND (replica IS NULL OR replica = %(replica)s) RETURNING id, episode_id, strategy)"
                    " INSERT INTO events (ts, episode_id, action_id, kind, detail)"
                    " SELECT %(now)s, episode_id, id, 'started',"
                    " json_build_object('strategy', strategy, 'replica', %(replica)s::text)::text FROM moved",
                    {"now": self._db.clock(), "plan": plan_json(plan), "replica": replica, "id": action_id},
                )
            ]
        )
        return claimed.rowcount == 1

    async def hold(self, action_id: int, replica: str, reason: str, detail: str) -> None:
        await self._db.write(
            lambda tx: self._move(
                tx,
                action_id,
                sql.SQL("skip_reason = %s, detail = %s"),
                (reason, detail),
                ActionState.PENDING,
                ("held", {"reason": reason, "detail": detail, "replica": replica}),
                replica,
            )
        )

    async def suspensions(self, since: float) -> list[Suspension]:
        ended = await self._db.read(
            "SELECT a.skip_reason, a.rule, count(*) FROM actions a JOIN episodes e ON e.id = a.episode_id"
            " WHERE e.state = 'suspended' AND e.resolved_at IS NULL AND a.state = 'done' AND a.finished_at >= %s"
                " AND a.skip_reason IS NOT NULL"
            " GROUP BY a.skip_reason, a.rule",
            (since,),
        )
        held = await self._db.read(
            "SELECT skip_reason, rule, count(*) FROM actions WHERE state = 'pending' AND skip_reason IS NOT NULL"
            " GROUP BY skip_reason, rule"
        )
        return suspensions(
            [(r["skip_reason"], r["rule"], r["count"]) for r in ended],
            [(r["skip_reason"], r["rule"], r["count"]) for r in held],
        )

    async def await_approval(self, action_id: int, deadline: float, plan: dict[str, Any] | None) -> bool:
        return await self._db.write(
            lambda tx: self._move(
                tx,
                action_id,
                sql.SQL("state = 'awaiting_approval', approval_deadline = %s, plan = %s"),
                (deadline, plan_json(plan)),
                ActionState.PENDING,
                ("awaiting_approval", {"deadline": deadline}),
            )
        )

    async def approve(self, action_id: int, approver: str) -> bool:
        return await self._db.write(
            lambda tx: self._move(
                tx,
                action_id,
                sql.SQL("state = 'pending', approved = TRUE, not_before = %s"),
                (self._db.clock(),),
                ActionState.AWAITING_APPROVAL,
                ("approved", {"by": approver}),
            )
        )

    async def finish(
        self, action_id: int, finish: Finish, replica: str | None = None, abandoned_before: float | None = None
    ) -> bool:
        return await self._db.write(lambda tx: self._finish(tx, action_id, finish, replica, abandoned_before))

    async def _finish(
        self,
        tx: Transaction,
        action_id: int,
        finish: Finish,
        replica: str | None,
        abandoned_before: float | None,
    ) -> bool:
        now = self._db.clock()
        # A step's episode never changes, so it is read unlocked; then the episode is locked before the
        # step, in the order every transaction here keeps (see the module's docstring).
        episode_id = await tx.value("SELECT episode_id FROM actions WHERE id = %s", (action_id,))
        if episode_id is None:
            return False
        episode = await tx.row("SELECT state, resolved_at FROM episodes WHERE id = %s FOR UPDATE", (episode_id,))
        row = await tx.row("SELECT * FROM actions WHERE id = %s FOR UPDATE", (action_id,))
        if episode is None or row is None:
            return False
        action = _action(row)
        if finish_refused(action, replica, abandoned_before):
            return False
        await tx.execute(
            "UPDATE actions SET state = 'done', outcome = %s, skip_reason = %s, detail = %s, exit_code = %s,"
            " output = %s, finished_at = %s, started_at = coalesce(started_at, %s),"
            " plan = coalesce(%s, plan) WHERE id = %s",
            finish_values(finish, now, action_id),
        )
        await tx.event(*finished(finish), episode_id, action_id)
        for kind, detail in finish.events:
            await tx.event(kind, detail, episode_id, action_id)
        if finish.cooldown is not None:
            until, streak = finish.cooldown
            await tx.execute(
                "INSERT INTO cooldowns (rule, fingerprint, until, streak) SELECT %s, fingerprint, %s, %s"
                " FROM episodes WHERE id = %s ON CONFLICT (rule, fingerprint) DO UPDATE SET"
                " until = excluded.until, streak = excluded.streak",
                (action.rule, until, streak, episode_id),
            )
        then = after_step(EpisodeState(episode["state"]), episode["resolved_at"] is not None, finish)
        if then.schedule is not None:
            await self._insert_action(tx, episode_id, then.schedule, now)
        if then.end_as is not None:
            await tx.execute(
                "UPDATE episodes SET state = %s, ended_at = %s WHERE id = %s AND state = 'open'",
                (then.end_as.value, now, episode_id),
            )
        if then.queue_escalation:
            await tx.execute(
                "INSERT INTO escalations (episode_id, rule, reason, created_at, next_send)"
                " VALUES (%s, %s, %s, %s, %s) ON CONFLICT (episode_id) DO NOTHING",
                (episode_id, action.rule, finish.escalation, now, now),
            )
        return True

    async def strategy_outcomes(self) -> dict[tuple[str, str], tuple[int, int]]:
        rows = await self._db.read(
            "SELECT rule, strategy, count(*) FILTER (WHERE outcome = 'healed') AS healed,"
            " count(*) FILTER (WHERE outcome = ANY(%s)) AS judged FROM actions GROUP BY rule, strategy",
            ([o.value for o in LEARNING_OUTCOMES],),
        )
        return {(row["rule"], row["strategy"]): (int(row["healed"]), int(row["judged"])) for row in rows}

    async def tried_strategies(self, episode_id: int) -> set[str]:
        rows = await self._db.read("SELECT DISTINCT strategy FROM actions WHERE episode_id = %s", (episode_id,))
        return {row["strategy"] for row in rows}

    # -- escalations ---------------------------------------------------------------------------

    async def get_escalation(self, episode_id: int) -> Escalation | None:
        rows = await self._db.read("SELECT * FROM escalations WHERE episode_id = %s", (episode_id,))
        return _escalation(rows[0]) if rows else None

    async def escalation_sent(self, episode_id: int, next_send: float | None) -> None:
        async def work(tx: Transaction) -> None:
            # The row lock keeps "was this the first delivery?" true for one replica only.
            first = await tx.row("SELECT sent_at FROM escalations WHERE episode_id = %s FOR UPDATE", (episode_id,))
            # A resolution recorded while a firing post was in flight makes the next post due at once.
            await tx.execute(
                "UPDATE escalations SET sent_at = %(now)s, failures = 0, next_send = CASE"
                " WHEN %(next)s::double precision IS NOT NULL AND resolved_at IS NOT NULL THEN %(now)s"
                " ELSE %(next)s::double precision END WHERE episode_id = %(episode)s",
                {"now": self._db.clock(), "next": next_send, "episode": episode_id},
            )
            # Re-sends keep HealingFailed firing; only the first delivery and the resolution are news.
            if first is not None and first["sent_at"] is None:
                await tx.event("escalation_delivered", {}, episode_id)
            if next_send is None:
                await tx.event("escalation_resolved", {}, episode_id)

        await self._db.write(work)

    async def escalation_failed(self, episode_id: int, next_send: float | None, reason: str) -> None:
        async def work(tx: Transaction) -> None:
            await tx.execute(
                "UPDATE escalations SET failures = failures + 1, next_send = %s WHERE episode_id = %s",
                (next_send, episode_id),
            )
            if next_send is None:
                await tx.event("escalation_refused", {"reason": reason[:2000]}, episode_id)

        await self._db.write(work)

    async def escalation_withdrawn(self, episode_id: int) -> None:
        async def work(tx: Transaction) -> None:
            await tx.execute("UPDATE escalations SET next_send = NULL WHERE episode_id = %s", (episode_id,))
            await tx.event("escalation_withdrawn", {"reason": "the alert resolved before it was delivered"}, episode_id)

        await self._db.write(work)

    async def escalation_stopped_firing(self, episode_id: int) -> None:
        await self._db.write(lambda tx: self._resolve_escalation(tx, episode_id, self._db.clock()))

    @staticmethod
    async def _resolve_escalation(tx: Transaction, episode_id: int, now: float, alert_resolved: bool = False) -> None:
        # A flapping alert's resolution is no news: its HealingFailed stays until Prometheus says it stopped.
        await tx.execute(
            "UPDATE escalations SET resolved_at = %s, next_send = %s WHERE episode_id = %s AND resolved_at IS NULL"
            " AND next_send IS NOT NULL AND NOT (%s AND reason LIKE %s)",
            (now, now, episode_id, alert_resolved, FLAPPING_REASON_PREFIX + "%"),
        )

    # -- audit ---------------------------------------------------------------------------------

    async def list_actions(self, query: ActionFilter) -> list[tuple[Action, Episode]]:
        terms = action_filter_terms(query)
        # The operators are the few of action_filter_terms; the columns are quoted as identifiers.
        clauses = [
            sql.SQL("{} {} %s").format(sql.Identifier(*column.split(".")), sql.SQL(operator))
            for column, operator, _ in terms
        ]
        params = [value for _, _, value in terms]
        where = sql.SQL("WHERE ") + sql.SQL(" AND ").join(clauses) if clauses else sql.SQL("")

        async def work(tx: Transaction) -> list[tuple[Action, Episode]]:
            rows = await tx.rows(
                sql.SQL(
                    "SELECT a.* FROM actions a JOIN episodes e ON e.id = a.episode_id {} ORDER BY a.id DESC LIMIT %s"
                ).format(where),
                (*params, query.limit),
            )
            ids = sorted({row["episode_id"] for row in rows})
            episodes = {
                row["id"]: _episode(row) for row in await tx.rows("SELECT * FROM episodes WHERE id = ANY(%s)", (ids,))
            }
            return [(_action(row), episodes[row["episode_id"]]) for row in rows]

        return await self._db.transaction(work)

    async def events(self, episode_id: int) -> list[dict[str, Any]]:
        rows = await self._db.read(
            "SELECT ts, action_id, kind, detail FROM events WHERE episode_id = %s ORDER BY id", (episode_id,)
        )
        return [_event(r) for r in rows]

    async def operator_acts(self, limit: int = 100) -> list[AuditEntry]:
        rows = await self._db.read(
            "SELECT id, ts, kind, detail FROM events WHERE episode_id IS NULL AND kind = ANY(%s)"
            " ORDER BY id DESC LIMIT %s",
            (list(OPERATOR_ACT_KINDS), limit),
        )
        return [audit_entry(int(r["id"]), float(r["ts"]), r["kind"], json.loads(r["detail"])) for r in rows]

    async def counts(self) -> HealingCounts:
        async def work(tx: Transaction) -> HealingCounts:
            received = int(await tx.value("SELECT coalesce(sum(alerts), 0) FROM inbox"))
            episodes = {
                r["state"]: int(r["n"])
                for r in await tx.rows("SELECT state, count(*) AS n FROM episodes GROUP BY state")
            }
            outcomes = {
                r["outcome"]: int(r["n"])
                for r in await tx.rows(
                    "SELECT outcome, count(*) AS n FROM actions WHERE outcome IS NOT NULL GROUP BY outcome"
                )
            }
            heal_times = [
                float(r["seconds"])
                for r in await tx.rows(
                    "SELECT a.finished_at - e.starts_at_epoch AS seconds FROM actions a"
                    " JOIN episodes e ON e.id = a.episode_id WHERE a.outcome = 'healed' ORDER BY 1"
                )
            ]
            return HealingCounts(received, episodes, outcomes, heal_times)

        return await self._db.transaction(work)

    async def purge(self, older_than: float) -> int:
        async def work(tx: Transaction) -> int:
            # An episode whose silence could not be expired yet, or whose HealingFailed still has to be
            # sent or resolved, is kept, so neither is forgotten.
            ended = sql.SQL(
                "state != 'open' AND silence_id IS NULL AND coalesce(ended_at, created_at) < %s"
                " AND id NOT IN (SELECT episode_id FROM escalations WHERE next_send IS NOT NULL)"
            )
            old = sql.SQL("SELECT id FROM episodes WHERE {}").format(ended)
            for table in ("events", "escalations", "actions"):
                await tx.execute(
                    sql.SQL("DELETE FROM {} WHERE episode_id IN ({})").format(sql.Identifier(table), old),
                    (older_than,),
                )
            # Operators' acts belong to no episode: they age out by their own time, as the episodes do.
            await tx.execute(
                "DELETE FROM events WHERE episode_id IS NULL AND kind = ANY(%s) AND ts < %s",
                (list(OPERATOR_ACT_KINDS), older_than),
            )
            return await tx.execute(sql.SQL("DELETE FROM episodes WHERE {}").format(ended), (older_than,))

        return await self._db.write(work)
