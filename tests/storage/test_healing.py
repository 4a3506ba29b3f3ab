"""The healing records contract: exactly-once episodes and claims, what follows a step, escalations, retention."""

from __future__ import annotations

import dataclasses
import math

import msgspec

from healer.healing.model import ActionFilter, ActionState, EpisodeState, Event, Finish, OpenRequest, Outcome
from healer.healing.payload import WebhookAlert
from healer.storage import Storage
from tests.storage.support import (
    REPLICA,
    RULE,
    Backend,
    FakeClock,
    claim_only_step,
    deliver,
    due,
    escalate,
    first_step,
    open_with_first_step,
)

NEXT_STEP = dataclasses.replace(first_step(5.0), attempt=2, step=1, strategy="rollback")


async def resolve(storage: Storage, alert: WebhookAlert) -> None:
    [position] = await deliver(storage, alert)
    await storage.healing.resolve_episode(position, alert)


async def kinds_of_events(storage: Storage, episode_id: int) -> list[str]:
    return [event["kind"] for event in await storage.healing.events(episode_id)]


async def test_same_episode_opens_once(storage: Storage, firing: WebhookAlert) -> None:
    """The same (fingerprint, startsAt) delivered twice creates one episode and one first step."""
    episode_id, created = await open_with_first_step(storage, firing)
    again_id, again_created = await open_with_first_step(storage, firing)
    assert created and not again_created and again_id == episode_id
    assert len(await storage.healing.list_actions(ActionFilter(episode_id=episode_id))) == 1
    assert await storage.inbox.depth() == 0


async def test_claim_is_exclusive(storage: Storage, clock: FakeClock, firing: WebhookAlert) -> None:
    """A pending step can be claimed once; the second claim fails."""
    await open_with_first_step(storage, firing)
    [action] = await due(storage, clock.now)
    assert await storage.healing.claim(action.id, {"argv": ["true"]}, REPLICA) is True
    assert await storage.healing.claim(action.id, None, REPLICA) is False
    [running] = await storage.healing.running_actions()
    assert running.plan == {"argv": ["true"]} and running.started_at == clock.now


async def test_not_before_delays_a_step(storage: Storage, firing: WebhookAlert) -> None:
    """A step is due only once its not_before time has come."""
    await open_with_first_step(storage, firing, not_before=2000.0)
    assert await due(storage, 1999.0) == []
    assert len(await due(storage, 2000.0)) == 1
    assert (await storage.healing.agenda(1999.0, REPLICA)).next_wake == 2000.0


async def test_resolved_cancels_pending_steps(storage: Storage, firing: WebhookAlert, resolved: WebhookAlert) -> None:
    """A resolved notification cancels the episode's pending step and ends the episode."""
    episode_id, _ = await open_with_first_step(storage, firing, not_before=1e12)
    [position] = await deliver(storage, resolved)
    resolution = await storage.healing.resolve_episode(position, resolved)
    episode = resolution.episode
    assert episode is not None and episode.id == episode_id and episode.state is EpisodeState.RESOLVED
    assert [a.outcome for a in resolution.cancelled] == [Outcome.CANCELLED] and resolution.running == []
    cancelled = await storage.healing.get_action(resolution.cancelled[0].id)
    assert cancelled is not None and cancelled.skip_reason == "resolved"


async def test_resolved_leaves_running_step_to_the_engine(
    storage: Storage, clock: FakeClock, firing: WebhookAlert, resolved: WebhookAlert
) -> None:
    """A step already running is reported, not cancelled, and the episode stays open until it ends."""
    await open_with_first_step(storage, firing)
    action = await claim_only_step(storage, clock.now)
    [position] = await deliver(storage, resolved)
    resolution = await storage.healing.resolve_episode(position, resolved)
    assert [a.id for a in resolution.running] == [action.id] and resolution.cancelled == []
    episode = resolution.episode
    assert episode is not None and episode.state is EpisodeState.OPEN and episode.resolved_at is not None
    await storage.healing.finish(action.id, Finish(Outcome.HEALED, detail="exit 0"))
    after = await storage.healing.get_episode(episode.id)
    assert after is not None and after.state is EpisodeState.RESOLVED


async def test_finish_schedules_next_step_once(storage: Storage, clock: FakeClock, firing: WebhookAlert) -> None:
    """Finishing a step writes its outcome, its cooldown and the ladder's next step together, and only once."""
    episode_id, _ = await open_with_first_step(storage, firing)
    action = await claim_only_step(storage, clock.now)
    finish = Finish(Outcome.NOT_HEALED, detail="exit 0", next_action=NEXT_STEP, cooldown=(5000.0, 1))
    assert await storage.healing.finish(action.id, finish) is True
    assert await storage.healing.finish(action.id, finish) is False
    rows = await storage.healing.list_actions(ActionFilter(episode_id=episode_id))
    assert [(a.attempt, a.strategy, a.state, a.outcome) for a, _ in rows] == [
        (2, "rollback", ActionState.PENDING, None),
        (1, "restart", ActionState.DONE, Outcome.NOT_HEALED),
    ]
    # The cooldown recorded for the rule and the alert holds back the first step of its next episode.
    later = msgspec.structs.replace(firing, startsAt=firing.startsAt.replace(year=2027))
    [position] = await deliver(storage, later)
    [opened] = await storage.healing.open_episodes(
        [OpenRequest(position, later, RULE, EpisodeState.OPEN, first_step(clock.now))]
    )
    assert opened.deferred_until == 5000.0


async def test_events_record_every_decision(storage: Storage, clock: FakeClock, firing: WebhookAlert) -> None:
    """The audit trail holds received, scheduled, started and finished events in order."""
    [position] = await deliver(storage, firing)
    events: list[Event] = [("received", {}), ("matched", {})]
    [opened] = await storage.healing.open_episodes(
        [OpenRequest(position, firing, RULE, EpisodeState.OPEN, first_step(), events)]
    )
    episode = opened.episode
    action = await claim_only_step(storage, clock.now)
    await storage.healing.finish(action.id, Finish(Outcome.HEALED, episode_state=EpisodeState.HEALED))
    assert await kinds_of_events(storage, episode.id) == ["received", "matched", "scheduled", "started", "finished"]
    ended = await storage.healing.get_episode(episode.id)
    assert ended is not None and ended.state is EpisodeState.HEALED


async def end_by_its_step(storage: Storage, episode_id: int, state: EpisodeState) -> None:
    """End an episode the way the engine does: its pending step finishes and says how the episode ends."""
    [(step, _)] = await storage.healing.list_actions(ActionFilter(episode_id=episode_id))
    assert await storage.healing.finish(step.id, Finish(Outcome.CANCELLED, episode_state=state))


async def test_purge_removes_only_old_finished_episodes(
    storage: Storage, clock: FakeClock, firing: WebhookAlert
) -> None:
    """Retention deletes ended episodes older than the horizon, with their steps, and keeps open ones."""
    episode_id, _ = await open_with_first_step(storage, firing)
    clock.advance(10)
    assert await storage.healing.purge(older_than=clock.now) == 0
    await end_by_its_step(storage, episode_id, EpisodeState.ESCALATED)
    assert await storage.healing.purge(older_than=clock.now) == 0
    assert await storage.healing.purge(older_than=clock.advance(1)) == 1
    assert await storage.healing.get_episode(episode_id) is None
    assert await storage.healing.list_actions(ActionFilter()) == []


async def test_purge_keeps_an_episode_whose_silence_is_still_recorded(
    storage: Storage, clock: FakeClock, firing: WebhookAlert
) -> None:
    """An ended episode whose silence has not been expired yet is kept, so that a restart still expires it."""
    episode_id, _ = await open_with_first_step(storage, firing)
    await storage.healing.set_silence(episode_id, "silence-1")
    await end_by_its_step(storage, episode_id, EpisodeState.HEALED)
    assert await storage.healing.purge(older_than=clock.advance(10)) == 0
    assert [e.silence_id for e in await storage.healing.episodes_with_silences()] == ["silence-1"]
    await storage.healing.set_silence(episode_id, None)
    assert await storage.healing.purge(older_than=clock.now) == 1


async def test_first_step_waits_out_the_cooldown(storage: Storage, clock: FakeClock, firing: WebhookAlert) -> None:
    """A new episode of an alert still in its rule's cooldown gets a first step deferred to the cooldown's end."""
    await open_with_first_step(storage, firing)
    action = await claim_only_step(storage, clock.now)
    finish = Finish(Outcome.HEALED, episode_state=EpisodeState.HEALED, cooldown=(5000.0, 1))
    await storage.healing.finish(action.id, finish)
    later = msgspec.structs.replace(firing, startsAt=firing.startsAt.replace(year=2027))
    [position] = await deliver(storage, later)
    [opened] = await storage.healing.open_episodes(
        [OpenRequest(position, later, RULE, EpisodeState.OPEN, first_step(10.0))]
    )
    assert opened.created and opened.deferred_until == 5000.0
    assert await due(storage, 4999.0) == [] and len(await due(storage, 5000.0)) == 1
    assert "deferred" in await kinds_of_events(storage, opened.episode.id)


async def test_a_step_that_ran_is_never_running_again(storage: Storage, clock: FakeClock, firing: WebhookAlert) -> None:
    """After its strategy ran, a step is `verifying`: not among the running steps a restart would rerun."""
    await open_with_first_step(storage, firing)
    action = await claim_only_step(storage, clock.now)
    assert await storage.healing.mark_verifying(action.id, "exit 0", REPLICA)
    assert await storage.healing.running_actions() == []
    [(verifying, state)] = [(a.id, a.state) for a in await storage.healing.abandoned(math.inf)]
    assert verifying == action.id and state is ActionState.VERIFYING


async def test_a_step_waits_for_approval_until_its_deadline(
    storage: Storage, clock: FakeClock, firing: WebhookAlert
) -> None:
    """A step awaiting approval is not due; it expires at its deadline, and an approval makes it due at once, once."""
    await open_with_first_step(storage, firing)
    [action] = await due(storage, clock.now)
    deadline = clock.now + 900
    assert await storage.healing.await_approval(action.id, deadline, {"argv": ["true"]}) is True
    assert await storage.healing.await_approval(action.id, deadline, None) is False
    agenda = await storage.healing.agenda(clock.now, REPLICA)
    assert agenda.due == [] and agenda.expired_approvals == [] and agenda.next_wake == deadline
    assert [a.id for a in (await storage.healing.agenda(deadline, REPLICA)).expired_approvals] == [action.id]
    approved_at = clock.advance(60)
    assert await storage.healing.approve(action.id, "alice") is True
    assert await storage.healing.approve(action.id, "bob") is False
    [pending] = await due(storage, approved_at)
    assert pending.id == action.id and pending.approved and pending.plan == {"argv": ["true"]}
    assert pending.not_before == approved_at


async def test_escalation_is_queued_with_the_episode_ending(
    storage: Storage, clock: FakeClock, firing: WebhookAlert
) -> None:
    """Ending an episode escalated queues its HealingFailed in the same transaction, due at once."""
    episode_id = await escalate(storage, firing, clock.now)
    episode = await storage.healing.get_episode(episode_id)
    assert episode is not None and episode.state is EpisodeState.ESCALATED
    [queued] = (await storage.healing.agenda(clock.now, REPLICA)).escalations
    assert (queued.episode_id, queued.rule, queued.reason) == (episode_id, RULE, "the alert still fires")
    await storage.healing.escalation_sent(episode_id, next_send=clock.now + 60)
    agenda = await storage.healing.agenda(clock.now, REPLICA)
    escalation = await storage.healing.get_escalation(episode_id)
    assert agenda.escalations == [] and escalation is not None and agenda.next_wake == escalation.next_send


async def test_failed_post_stays_queued_until_alertmanager_takes_it(
    backend: Backend, clock: FakeClock, firing: WebhookAlert
) -> None:
    """A HealingFailed that could not be posted is still due after the store is reopened."""
    storage = await backend.open()
    episode_id = await escalate(storage, firing, clock.now)
    await storage.healing.escalation_failed(episode_id, next_send=clock.now + 2, reason="connection refused")
    await backend.close(storage)
    again = await backend.open()
    escalation = await again.healing.get_escalation(episode_id)
    assert escalation is not None and escalation.failures == 1 and escalation.sent_at is None
    assert escalation.next_send == clock.now + 2
    agenda = await again.healing.agenda(escalation.next_send, REPLICA)
    assert [e.episode_id for e in agenda.escalations] == [episode_id]


async def test_resolved_alert_makes_its_healing_failed_due_to_resolve(
    storage: Storage, clock: FakeClock, firing: WebhookAlert, resolved: WebhookAlert
) -> None:
    """A resolved notification of an escalated alert queues the post that resolves HealingFailed."""
    episode_id = await escalate(storage, firing, clock.now)
    await storage.healing.escalation_sent(episode_id, next_send=clock.now + 60)
    await resolve(storage, resolved)
    [queued] = (await storage.healing.agenda(clock.now, REPLICA)).escalations
    assert queued.episode_id == episode_id and queued.resolved_at is not None
    await storage.healing.escalation_sent(episode_id, next_send=None)
    escalation = await storage.healing.get_escalation(episode_id)
    assert escalation is not None and escalation.next_send is None
    kinds = await kinds_of_events(storage, episode_id)
    assert kinds[-3:] == ["escalation_delivered", "resolved", "escalation_resolved"]


async def test_escalation_refused_by_alertmanager_ends_with_an_event(
    storage: Storage, clock: FakeClock, firing: WebhookAlert
) -> None:
    """Giving up on a HealingFailed that Alertmanager refuses leaves nothing due and says why in the audit."""
    episode_id = await escalate(storage, firing, clock.now)
    await storage.healing.escalation_failed(episode_id, next_send=None, reason="400 Bad Request: invalid label")
    assert (await storage.healing.agenda(1e12, REPLICA)).escalations == []
    [event] = [e for e in await storage.healing.events(episode_id) if e["kind"] == "escalation_refused"]
    assert "invalid label" in event["reason"]


async def test_no_escalation_for_an_episode_that_resolved_first(
    storage: Storage, clock: FakeClock, firing: WebhookAlert, resolved: WebhookAlert
) -> None:
    """When the resolved notification wins the race, the episode ends resolved and nobody is paged."""
    episode_id, _ = await open_with_first_step(storage, firing)
    action = await claim_only_step(storage, clock.now)
    await resolve(storage, resolved)
    finish = Finish(Outcome.NOT_HEALED, episode_state=EpisodeState.ESCALATED, escalation="still fires")
    await storage.healing.finish(action.id, finish)
    episode = await storage.healing.get_episode(episode_id)
    assert episode is not None and episode.state is EpisodeState.RESOLVED
    assert await storage.healing.get_escalation(episode_id) is None


async def test_purge_keeps_an_episode_whose_healing_failed_is_still_queued(
    storage: Storage, clock: FakeClock, firing: WebhookAlert
) -> None:
    """Retention never deletes an escalation that still has to be sent or resolved."""
    episode_id = await escalate(storage, firing, clock.now)
    horizon = clock.advance(10)
    assert await storage.healing.purge(older_than=horizon) == 0
    assert await storage.healing.get_escalation(episode_id) is not None
    await storage.healing.escalation_sent(episode_id, next_send=None)
    assert await storage.healing.purge(older_than=horizon) == 1
    assert await storage.healing.get_escalation(episode_id) is None


async def test_resolution_during_a_firing_post_is_sent_next(
    storage: Storage, clock: FakeClock, firing: WebhookAlert, resolved: WebhookAlert
) -> None:
    """When the alert resolves while a firing HealingFailed is being posted, the resolving post is due at once."""
    episode_id = await escalate(storage, firing, clock.now)
    await resolve(storage, resolved)  # arrives while the firing post is in flight
    await storage.healing.escalation_sent(episode_id, next_send=clock.now + 60)  # that post completes
    [queued] = (await storage.healing.agenda(clock.now, REPLICA)).escalations
    assert queued.episode_id == episode_id and queued.resolved_at is not None


async def test_the_opener_takes_a_first_step_due_at_once(
    storage: Storage, clock: FakeClock, firing: WebhookAlert
) -> None:
    """Opened with a replica, a first step due now comes back taken by it; other replicas do not see it due."""
    [position] = await deliver(storage, firing)
    request = OpenRequest(position, firing, RULE, EpisodeState.OPEN, first_step(clock.now))
    [opened] = await storage.healing.open_episodes([request], REPLICA, clock.now + 10)
    first = opened.first
    assert first is not None and first.replica == REPLICA and first.lease_until == clock.now + 10
    assert first.episode_id == opened.episode.id and first.state is ActionState.PENDING
    assert (await storage.healing.agenda(clock.now, "replica-b")).due == []
    assert [a.id for a in await due(storage, clock.now)] == [first.id]
    assert await storage.healing.claim(first.id, None, REPLICA)
    # A step that waits (here, for a later not_before) is not taken: whichever replica is free then runs it.
    later = msgspec.structs.replace(firing, fingerprint="0000000000000009")
    [position] = await deliver(storage, later)
    request = OpenRequest(position, later, RULE, EpisodeState.OPEN, first_step(clock.now + 60))
    [opened] = await storage.healing.open_episodes([request], REPLICA, clock.now + 10)
    assert opened.first is None
    assert [a.replica for a in await due(storage, clock.now + 60)] == [None]
