"""The SQLite store: one transaction per decision, exactly-once episodes and claims, retention."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from pathlib import Path

import pytest

from healer.healing.payload import WebhookAlert, WebhookPayload
from healer.store import (
    ActionFilter,
    AsyncStore,
    Finish,
    InboxPosition,
    NewAction,
    OpenRequest,
    SQLiteStore,
    StoreUnavailableError,
)


@pytest.fixture
def firing(fixtures_dir: Path) -> WebhookAlert:
    payload = json.loads((fixtures_dir / "alertmanager-0.25-firing-one.json").read_text())
    return WebhookPayload.model_validate(payload).alerts[0]


@pytest.fixture
def resolved(fixtures_dir: Path) -> WebhookAlert:
    payload = json.loads((fixtures_dir / "alertmanager-0.25-resolved.json").read_text())
    return WebhookPayload.model_validate(payload).alerts[0]


@pytest.fixture
def store(tmp_path: Path) -> SQLiteStore:
    return SQLiteStore(tmp_path / "healer.db")


def body_of(*alerts: WebhookAlert) -> bytes:
    """A webhook body carrying these alerts."""
    return WebhookPayload(version="4", status=alerts[0].status, alerts=list(alerts)).model_dump_json().encode()


def deliver(store: SQLiteStore, *alerts: WebhookAlert) -> list[InboxPosition]:
    """Accept one delivery of these alerts; return where each of them sits in the inbox."""
    [delivery] = store.accept([(body_of(*alerts), len(alerts))])
    return [InboxPosition(delivery, index) for index in range(len(alerts))]


def open_with_first_step(store: SQLiteStore, alert: WebhookAlert, not_before: float = 0.0) -> tuple[int, bool]:
    [position] = deliver(store, alert)
    [opened] = store.open_episodes(
        [OpenRequest(position, alert, "web", "open", NewAction(1, 0, "web", "restart", not_before))]
    )
    return opened.episode.id, opened.created


def test_accepted_alerts_survive_reopening(tmp_path: Path, firing: WebhookAlert) -> None:
    """Alerts written by accept are in the inbox, in order, after the store is closed and opened again."""
    first = SQLiteStore(tmp_path / "healer.db")
    positions = deliver(first, firing, firing) + deliver(first, firing)
    first.close()
    again = SQLiteStore(tmp_path / "healer.db")
    assert [item.position for item in again.unprocessed()] == positions
    assert again.unprocessed()[0].alert == firing
    assert again.inbox_depth() == 3


def test_a_delivery_split_between_batches_is_processed_once(store: SQLiteStore, firing: WebhookAlert) -> None:
    """A delivery larger than one engine batch is taken in order, each alert once, and then leaves the inbox."""
    alerts = [firing.model_copy(update={"fingerprint": f"{i:016x}"}) for i in range(5)]
    deliver(store, *alerts)
    taken: list[str] = []
    while batch := store.unprocessed(limit=2):
        store.open_episodes([OpenRequest(item.position, item.alert, None, "unmatched", None) for item in batch])
        taken += [item.alert.fingerprint for item in batch]
        assert store.inbox_depth() == 5 - len(taken)
    assert taken == [alert.fingerprint for alert in alerts]
    assert store.counts()["alerts_received"] == 5


def test_unreadable_delivery_is_skipped_and_recorded(store: SQLiteStore, firing: WebhookAlert) -> None:
    """A stored body the payload model no longer accepts is recorded in the audit trail, and later ones still run."""
    [bad] = store.accept([(b'{"version": "3", "alerts": []}', 1)])
    [good] = deliver(store, firing)
    assert [item.position for item in store.unprocessed()] == [good]
    event = store._db.execute("SELECT kind, detail FROM events").fetchone()
    assert event["kind"] == "delivery_unreadable" and json.loads(event["detail"])["delivery"] == bad
    assert store.inbox_depth() == 1


def test_inbox_of_an_earlier_layout_is_migrated(tmp_path: Path, firing: WebhookAlert) -> None:
    """A store whose inbox held one row per alert keeps its unprocessed alerts after the upgrade."""
    path = tmp_path / "healer.db"
    old = sqlite3.connect(path)
    old.executescript(
        "CREATE TABLE inbox (id INTEGER PRIMARY KEY, received_at REAL NOT NULL, status TEXT NOT NULL,"
        " fingerprint TEXT NOT NULL, starts_at TEXT NOT NULL, alert TEXT NOT NULL, processed_at REAL);"
        " CREATE INDEX inbox_unprocessed ON inbox(id) WHERE processed_at IS NULL;"
    )
    rows = [
        (1.0, "firing", "a", "x", firing.model_dump_json(), 2.0),
        (3.0, "firing", "b", "x", firing.model_dump_json(), None),
    ]
    old.executemany(
        "INSERT INTO inbox (received_at, status, fingerprint, starts_at, alert, processed_at)"
        " VALUES (?, ?, ?, ?, ?, ?)",
        rows,
    )
    old.commit()
    old.close()
    store = SQLiteStore(path)
    [item] = store.unprocessed()
    assert item.alert == firing and item.received_at == 3.0
    assert store.inbox_depth() == 1


def test_same_episode_opens_once(store: SQLiteStore, firing: WebhookAlert) -> None:
    """The same (fingerprint, startsAt) delivered twice creates one episode and one first step."""
    episode_id, created = open_with_first_step(store, firing)
    again_id, again_created = open_with_first_step(store, firing)
    assert created and not again_created and again_id == episode_id
    assert len(store.list_actions(ActionFilter(episode_id=episode_id))) == 1
    assert store.inbox_depth() == 0


def test_claim_is_exclusive(store: SQLiteStore, firing: WebhookAlert) -> None:
    """A pending step can be claimed once; the second claim fails."""
    open_with_first_step(store, firing)
    [action] = store.due_actions(now=1e12)
    assert store.claim(action.id, {"argv": ["true"]}) is True
    assert store.claim(action.id, None) is False
    assert store.running_actions()[0].plan == {"argv": ["true"]}


def test_not_before_delays_a_step(store: SQLiteStore, firing: WebhookAlert) -> None:
    """A step is due only once its not_before time has come."""
    open_with_first_step(store, firing, not_before=1000.0)
    assert store.due_actions(now=999.0) == []
    assert len(store.due_actions(now=1000.0)) == 1
    assert store.agenda(now=999.0).next_wake == 1000.0


def test_resolved_cancels_pending_steps(store: SQLiteStore, firing: WebhookAlert, resolved: WebhookAlert) -> None:
    """A resolved notification cancels the episode's pending step and ends the episode."""
    episode_id, _ = open_with_first_step(store, firing, not_before=1e12)
    [position] = deliver(store, resolved)
    episode, cancelled, running = store.resolve_episode(position, resolved)
    assert episode is not None and episode.id == episode_id and episode.state == "resolved"
    assert [a.outcome for a in cancelled] == ["cancelled"] and running == []
    assert store.get_action(cancelled[0].id).skip_reason == "resolved"


def test_resolved_leaves_running_step_to_the_engine(
    store: SQLiteStore, firing: WebhookAlert, resolved: WebhookAlert
) -> None:
    """A step already running is reported, not cancelled, and the episode stays open until it ends."""
    open_with_first_step(store, firing)
    [action] = store.due_actions(now=1e12)
    store.claim(action.id, None)
    [position] = deliver(store, resolved)
    episode, cancelled, running = store.resolve_episode(position, resolved)
    assert [a.id for a in running] == [action.id] and cancelled == []
    assert episode is not None and episode.state == "open" and episode.resolved_at is not None
    store.finish(action.id, Finish(outcome="healed", detail="exit 0"))
    assert store.get_episode(episode.id).state == "resolved"


def test_finish_schedules_next_step_once(store: SQLiteStore, firing: WebhookAlert) -> None:
    """Finishing a step writes its outcome and the ladder's next step together, and only once."""
    episode_id, _ = open_with_first_step(store, firing)
    [action] = store.due_actions(now=1e12)
    store.claim(action.id, None)
    finish = Finish(
        outcome="not_healed", detail="exit 0", next_action=NewAction(2, 1, "web", "rollback", 5.0), cooldown=(50.0, 1)
    )
    assert store.finish(action.id, finish) is True
    assert store.finish(action.id, finish) is False
    rows = store.list_actions(ActionFilter(episode_id=episode_id))
    assert [(a.attempt, a.strategy, a.state, a.outcome) for a, _ in rows] == [
        (2, "rollback", "pending", None),
        (1, "restart", "done", "not_healed"),
    ]
    assert store.cooldown("web", firing.fingerprint) == (50.0, 1)
    assert store.attempts(episode_id) == 2


def test_events_record_every_decision(store: SQLiteStore, firing: WebhookAlert) -> None:
    """The audit trail holds received, scheduled, started and finished events in order."""
    [position] = deliver(store, firing)
    [opened] = store.open_episodes(
        [
            OpenRequest(
                position,
                firing,
                "web",
                "open",
                NewAction(1, 0, "web", "restart", 0.0),
                [("received", {}), ("matched", {})],
            )
        ]
    )
    episode = opened.episode
    [action] = store.due_actions(now=1e12)
    store.claim(action.id, None)
    store.finish(action.id, Finish(outcome="healed", episode_state="healed"))
    kinds = [event["kind"] for event in store.events(episode.id)]
    assert kinds == ["received", "matched", "scheduled", "started", "finished"]
    assert store.get_episode(episode.id).state == "healed"


def test_purge_removes_only_old_finished_episodes(store: SQLiteStore, firing: WebhookAlert) -> None:
    """Retention deletes ended episodes older than the horizon and keeps open ones."""
    episode_id, _ = open_with_first_step(store, firing)
    assert store.purge(older_than=1e12) == 0
    store.end_episode(episode_id, "escalated")
    assert store.purge(older_than=1e12) == 1
    assert store.get_episode(episode_id) is None and store.list_actions(ActionFilter()) == []


async def test_group_commit_answers_every_delivery(tmp_path: Path, firing: WebhookAlert) -> None:
    """Concurrent deliveries are committed together, each gets its own id, and every alert is in the inbox."""
    store = AsyncStore(SQLiteStore(tmp_path / "healer.db"))
    sizes = [i % 3 + 1 for i in range(50)]
    ids = await asyncio.gather(*(store.accept(body_of(*[firing] * size), size) for size in sizes))
    assert len(set(ids)) == 50
    assert await store.call(store.sync.inbox_depth) == sum(sizes)
    items = await store.call(store.sync.unprocessed, 1000)
    assert [item.position.delivery for item in items] == [
        i for i, size in zip(ids, sizes, strict=True) for _ in range(size)
    ]
    await store.close()


async def test_unwritable_store_fails_every_waiter(tmp_path: Path, firing: WebhookAlert) -> None:
    """When the database refuses writes, every waiting delivery gets StoreUnavailableError."""
    path = tmp_path / "healer.db"
    store = AsyncStore(SQLiteStore(path))
    store.sync._db.execute("PRAGMA query_only = ON")
    results = await asyncio.gather(*(store.accept(body_of(firing), 1) for _ in range(5)), return_exceptions=True)
    assert all(isinstance(r, StoreUnavailableError) for r in results)
    await store.close()


def test_first_step_waits_out_the_cooldown(store: SQLiteStore, firing: WebhookAlert) -> None:
    """A new episode of an alert still in its rule's cooldown gets a first step deferred to the cooldown's end."""
    open_with_first_step(store, firing)
    [action] = store.due_actions(now=1e12)
    store.claim(action.id, None)
    store.finish(action.id, Finish(outcome="healed", episode_state="healed", cooldown=(5000.0, 1)))
    later = firing.model_copy(update={"startsAt": firing.startsAt.replace(year=2027)})
    [position] = deliver(store, later)
    [opened] = store.open_episodes(
        [OpenRequest(position, later, "web", "open", NewAction(1, 0, "web", "restart", 10.0))]
    )
    assert opened.created and opened.deferred_until == 5000.0
    assert store.due_actions(now=4999.0) == [] and len(store.due_actions(now=5000.0)) == 1


def test_second_healer_on_one_store_is_refused(tmp_path: Path) -> None:
    """A second store on the same file is refused, so two healers never run each other's steps."""
    first = SQLiteStore(tmp_path / "healer.db")
    with pytest.raises(StoreUnavailableError, match="another healer"):
        SQLiteStore(tmp_path / "healer.db")
    first.close()
    SQLiteStore(tmp_path / "healer.db").close()


def test_a_step_that_ran_is_never_running_again(store: SQLiteStore, firing: WebhookAlert) -> None:
    """After its strategy ran, a step is `verifying`: not among the running steps a restart would rerun."""
    open_with_first_step(store, firing)
    [action] = store.due_actions(now=1e12)
    store.claim(action.id, None)
    store.mark_verifying(action.id, "exit 0")
    assert store.running_actions() == []
    assert [a.id for a in store.verifying_actions()] == [action.id]


def escalate(store: SQLiteStore, alert: WebhookAlert) -> int:
    """Open an episode for `alert` and end its only step escalated; return the episode id."""
    episode_id, _ = open_with_first_step(store, alert)
    [action] = store.due_actions(now=1e12)
    store.claim(action.id, None)
    store.finish(action.id, Finish(outcome="not_healed", episode_state="escalated", escalation="the alert still fires"))
    return episode_id


def test_escalation_is_queued_with_the_episode_ending(store: SQLiteStore, firing: WebhookAlert) -> None:
    """Ending an episode escalated queues its HealingFailed in the same transaction, due at once."""
    episode_id = escalate(store, firing)
    [due] = store.agenda(now=store._clock()).escalations
    assert (due.episode_id, due.rule, due.reason) == (episode_id, "web", "the alert still fires")
    store.escalation_sent(episode_id, next_send=store._clock() + 60)
    agenda = store.agenda(now=store._clock())
    assert agenda.escalations == [] and agenda.next_wake == store.get_escalation(episode_id).next_send


def test_failed_post_stays_queued_until_alertmanager_takes_it(tmp_path: Path, firing: WebhookAlert) -> None:
    """A HealingFailed that could not be posted is still due after the store is reopened."""
    store = SQLiteStore(tmp_path / "healer.db")
    episode_id = escalate(store, firing)
    store.escalation_failed(episode_id, next_send=store._clock() + 2, reason="connection refused")
    store.close()
    again = SQLiteStore(tmp_path / "healer.db")
    escalation = again.get_escalation(episode_id)
    assert escalation is not None and escalation.failures == 1 and escalation.sent_at is None
    assert [e.episode_id for e in again.agenda(now=escalation.next_send).escalations] == [episode_id]


def test_resolved_alert_makes_its_healing_failed_due_to_resolve(
    store: SQLiteStore, firing: WebhookAlert, resolved: WebhookAlert
) -> None:
    """A resolved notification of an escalated alert queues the post that resolves HealingFailed."""
    episode_id = escalate(store, firing)
    store.escalation_sent(episode_id, next_send=store._clock() + 60)
    [position] = deliver(store, resolved)
    store.resolve_episode(position, resolved)
    [due] = store.agenda(now=store._clock()).escalations
    assert due.episode_id == episode_id and due.resolved_at is not None
    store.escalation_sent(episode_id, next_send=None)
    assert store.get_escalation(episode_id).next_send is None
    kinds = [event["kind"] for event in store.events(episode_id)]
    assert kinds[-3:] == ["escalation_delivered", "resolved", "escalation_resolved"]


def test_escalation_refused_by_alertmanager_ends_with_an_event(store: SQLiteStore, firing: WebhookAlert) -> None:
    """Giving up on a HealingFailed that Alertmanager refuses leaves nothing due and says why in the audit."""
    episode_id = escalate(store, firing)
    store.escalation_failed(episode_id, next_send=None, reason="400 Bad Request: invalid label")
    assert store.agenda(now=1e12).escalations == []
    [event] = [e for e in store.events(episode_id) if e["kind"] == "escalation_refused"]
    assert "invalid label" in event["reason"]


def test_no_escalation_for_an_episode_that_resolved_first(
    store: SQLiteStore, firing: WebhookAlert, resolved: WebhookAlert
) -> None:
    """When the resolved notification wins the race, the episode ends resolved and nobody is paged."""
    episode_id, _ = open_with_first_step(store, firing)
    [action] = store.due_actions(now=1e12)
    store.claim(action.id, None)
    [position] = deliver(store, resolved)
    store.resolve_episode(position, resolved)
    store.finish(action.id, Finish(outcome="not_healed", episode_state="escalated", escalation="still fires"))
    assert store.get_episode(episode_id).state == "resolved"
    assert store.get_escalation(episode_id) is None


def test_purge_keeps_an_episode_whose_healing_failed_is_still_queued(store: SQLiteStore, firing: WebhookAlert) -> None:
    """Retention never deletes an escalation that still has to be sent or resolved."""
    episode_id = escalate(store, firing)
    assert store.purge(older_than=1e12) == 0 and store.get_escalation(episode_id) is not None
    store.escalation_sent(episode_id, next_send=None)
    assert store.purge(older_than=1e12) == 1 and store.get_escalation(episode_id) is None


def test_resolution_during_a_firing_post_is_sent_next(
    store: SQLiteStore, firing: WebhookAlert, resolved: WebhookAlert
) -> None:
    """When the alert resolves while a firing HealingFailed is being posted, the resolving post is due at once."""
    episode_id = escalate(store, firing)
    [position] = deliver(store, resolved)
    store.resolve_episode(position, resolved)  # arrives while the firing post is in flight
    store.escalation_sent(episode_id, next_send=store._clock() + 60)  # that post completes
    [due] = store.agenda(now=store._clock()).escalations
    assert due.episode_id == episode_id and due.resolved_at is not None


def test_delivery_ids_are_not_reused_after_purge(store: SQLiteStore, firing: WebhookAlert) -> None:
    """A delivery after retention emptied the inbox gets a new id, and its own alerts are the ones processed."""
    [first] = deliver(store, firing)
    store.open_episodes([OpenRequest(first, firing, None, "unmatched", None)])
    store.purge(older_than=1e12)
    other = firing.model_copy(update={"fingerprint": "00000000000000ff"})
    [second] = deliver(store, other)
    assert second.delivery > first.delivery
    [item] = store.unprocessed()
    assert item.position == second and item.alert.fingerprint == "00000000000000ff"
