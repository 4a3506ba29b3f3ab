"""The safety rails' storage contract, on every backend: pauses, rules' budgets, label-group slots and
shares, flapping, held steps and suspensions."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import msgspec

from healer.healing.model import (
    BudgetScope,
    Charge,
    EpisodeState,
    Finish,
    Flap,
    FlapPolicy,
    OpenRequest,
    Outcome,
    SkipReason,
)
from healer.healing.payload import WebhookAlert
from healer.storage import Storage
from tests.storage.support import REPLICA, RULE, Backend, FakeClock, deliver, due, first_step, open_with_first_step

LEASE = 10.0
FLAPS = FlapPolicy(episodes=2, window=60.0)


async def test_a_pause_holds_until_it_ends_or_expires(backend: Backend, clock: FakeClock) -> None:
    """A pause is listed while in force, gone once ended or expired, and survives reopening the store."""
    storage = await backend.open()
    short = await storage.pauses.create(['service="web"'], "deploy", "alice", clock.now, clock.now + 30)
    long = await storage.pauses.create(['alertname=~".+"'], "maintenance", "bob", clock.now, clock.now + 3600)
    assert [p.id for p in await storage.pauses.active(clock.now)] == [short.id, long.id]
    assert short.covers({"service": "web"}) and not short.covers({"service": "db"})
    await backend.close(storage)
    storage = await backend.open()
    ended = await storage.pauses.end(long.id, "carol", clock.now + 1)
    assert ended is not None and ended.ended_by == "carol" and not ended.active(clock.now + 1)
    assert await storage.pauses.end(long.id, "carol", clock.now + 2) is None
    assert [p.id for p in await storage.pauses.active(clock.now + 10)] == [short.id]
    assert await storage.pauses.active(clock.now + 31) == []
    assert await storage.pauses.end(short.id, "carol", clock.now + 31) is None  # expired already
    assert [p.id for p in await storage.pauses.recent()] == [long.id, short.id]


async def test_a_rule_budget_refuses_without_spending_the_global_one(storage: Storage, clock: FakeClock) -> None:
    """A spent scope refuses its steps, leaves the global budget and the breaker alone, and refills after its window."""
    coordination = storage.coordination
    noisy = BudgetScope("noisy", 2, 60.0)
    charges = [await coordination.charge_budget(clock.now, 5, 600.0, 600.0, noisy) for _ in range(3)]
    assert charges == [Charge.CHARGED, Charge.CHARGED, Charge.SCOPE_SPENT]
    assert not await coordination.circuit_open(clock.now)
    # Two of the global five are spent: three more of another rule fit, the fourth opens the breaker.
    other_rule = BudgetScope("other", 9, 60.0)
    other = [await coordination.charge_budget(clock.now, 5, 600.0, 600.0, other_rule) for _ in range(4)]
    assert other == [Charge.CHARGED] * 3 + [Charge.CIRCUIT_OPEN]
    await coordination.close_circuit("carol")
    # The rule's own budget is not reset by closing the breaker; its window refills it.
    assert await coordination.charge_budget(clock.now, 5, 600.0, 600.0, noisy) is Charge.SCOPE_SPENT
    assert await coordination.charge_budget(clock.now + 61, 5, 600.0, 600.0, noisy) is Charge.CHARGED


async def test_group_slots_hold_one_group_apart_from_strategy_slots(storage: Storage, clock: FakeClock) -> None:
    """A label group's slots are limited per group, do not count against strategy slots, and lapse with their lease."""
    coordination = storage.coordination
    first = await coordination.take_group_slot(REPLICA, "web:a", clock.now, clock.now + LEASE, 1)
    assert first is not None
    assert await coordination.take_group_slot("replica-b", "web:a", clock.now, clock.now + LEASE, 1) is None
    assert await coordination.take_group_slot("replica-b", "web:b", clock.now, clock.now + LEASE, 1) is not None
    assert await coordination.take_slot(REPLICA, "restart", clock.now, clock.now + LEASE, 1, 1) is not None
    await coordination.release_slot(first)
    second = await coordination.take_group_slot("replica-b", "web:a", clock.now, clock.now + LEASE, 1)
    assert second is not None
    # Its replica died: past the lease the slot no longer holds the group.
    later = clock.now + LEASE + 1
    assert await coordination.take_group_slot(REPLICA, "web:a", later, later + LEASE, 1) is not None


async def test_a_share_counts_episodes_within_its_window(storage: Storage, clock: FakeClock) -> None:
    """At most `limit` episodes of a group are acted on within the window; one counted already may go on."""
    coordination = storage.coordination
    assert await coordination.take_share("job:web", 1, clock.now, 60.0, 2)
    assert await coordination.take_share("job:web", 2, clock.now, 60.0, 2)
    assert not await coordination.take_share("job:web", 3, clock.now, 60.0, 2)
    assert await coordination.take_share("job:web", 1, clock.now + 1, 60.0, 2)  # its next step
    assert await coordination.take_share("job:db", 3, clock.now, 60.0, 2)
    assert await coordination.take_share("job:web", 3, clock.now + 61, 60.0, 2)


def refired(alert: WebhookAlert, minute: int, fingerprint: str | None = None) -> WebhookAlert:
    """The alert firing anew (another startsAt), `minute` minutes after 06:00."""
    starts = datetime(2026, 11, 27, 6, 0, tzinfo=UTC) + timedelta(minutes=minute)
    return msgspec.structs.replace(alert, startsAt=starts, fingerprint=fingerprint or alert.fingerprint)


async def open_flapping(storage: Storage, alert: WebhookAlert, minute: int) -> tuple[int, Flap | None, EpisodeState]:
    """Open an episode for a new firing of `alert` under the flapping policy."""
    firing = refired(alert, minute)
    [position] = await deliver(storage, firing)
    request = OpenRequest(position, firing, RULE, EpisodeState.OPEN, first_step(), flapping=FLAPS)
    [opened] = await storage.healing.open_episodes([request])
    return opened.episode.id, opened.flap, opened.episode.state


async def test_a_flapping_alert_escalates_once_then_is_only_recorded(
    storage: Storage, clock: FakeClock, firing: WebhookAlert
) -> None:
    """After `episodes` episodes in the window the next escalates (HealingFailed queued, no step), the later ones end
    flapping, until the alert has been quiet for a window."""
    opened = [await open_flapping(storage, firing, n) for n in range(5)]
    assert [flap for _, flap, _ in opened] == [None, None, Flap.ESCALATE, Flap.SUPPRESS, Flap.SUPPRESS]
    states = [state for _, _, state in opened[2:]]
    assert states == [EpisodeState.ESCALATED, EpisodeState.FLAPPING, EpisodeState.FLAPPING]
    escalated_id = opened[2][0]
    escalation = await storage.healing.get_escalation(escalated_id)
    assert escalation is not None and escalation.reason.startswith("flapping")
    assert await storage.healing.get_escalation(opened[3][0]) is None
    assert len(await due(storage, clock.now)) == 2  # only the first two episodes got a step
    kinds = [event["kind"] for event in await storage.healing.events(escalated_id)]
    assert "flapping" in kinds and "escalated" in kinds
    clock.advance(FLAPS.window + 1)
    _, flap, state = await open_flapping(storage, firing, 60)
    assert flap is None and state is EpisodeState.OPEN


async def test_several_firings_in_one_batch_are_judged_in_order(storage: Storage, firing: WebhookAlert) -> None:
    """Firings of one alert opened together are judged one after another, as if they came one by one."""
    alerts = [refired(firing, n) for n in range(4)]
    positions = await deliver(storage, *alerts)
    requests = [
        OpenRequest(position, alert, RULE, EpisodeState.OPEN, first_step(), flapping=FLAPS)
        for position, alert in zip(positions, alerts, strict=True)
    ]
    opened = await storage.healing.open_episodes(requests)
    assert [o.flap for o in opened] == [None, None, Flap.ESCALATE, Flap.SUPPRESS]


async def test_held_steps_and_suspended_episodes_are_counted(
    storage: Storage, clock: FakeClock, firing: WebhookAlert
) -> None:
    """A held step shows its reason until it runs; an episode ended suspended counts by reason and rule."""
    await open_with_first_step(storage, firing)
    [action] = await due(storage, clock.now)
    await storage.healing.hold(action.id, REPLICA, SkipReason.BLAST_RADIUS, "1 episode of service='web' is healed now")
    held = await storage.healing.get_action(action.id)
    assert held is not None and held.skip_reason == "blast_radius" and held.detail is not None
    [suspension] = await storage.healing.suspensions(clock.now - 60)
    assert (suspension.reason, suspension.rule, suspension.suspended, suspension.held) == ("blast_radius", RULE, 0, 1)
    assert await storage.healing.claim(action.id, None, REPLICA)
    assert await storage.healing.suspensions(clock.now - 60) == []
    other = refired(firing, 10, fingerprint="0000000000000002")
    await open_with_first_step(storage, other)
    [pending] = [a for a in await due(storage, clock.now) if a.id != action.id]
    suspended = Finish(
        Outcome.CANCELLED, skip_reason=SkipReason.CIRCUIT_OPEN, episode_state=EpisodeState.SUSPENDED, detail="spent"
    )
    assert await storage.healing.finish(pending.id, suspended)
    [suspension] = await storage.healing.suspensions(clock.now - 60)
    assert (suspension.reason, suspension.suspended, suspension.held) == ("circuit_open", 1, 0)
    assert await storage.healing.suspensions(clock.now + 1) == []
    episode = await storage.healing.get_episode(pending.episode_id)
    assert episode is not None and episode.state is EpisodeState.SUSPENDED
    assert await storage.healing.get_escalation(pending.episode_id) is None
