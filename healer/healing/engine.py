"""The healing engine's work loop: inbox → episode → step → verification → next rung or escalation.

Every decision goes through the store in one transaction before it has effect, so that after a
crash the engine resumes from the store: unprocessed inbox items are processed, steps that were
running are recorded as interrupted and retried within their attempt limit. A due step is handed to
`EpisodeSteps`; the rails are the step runner's, paging and silences the escalator's.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable

from healer.config import HealerConfig
from healer.healing.episodes import EpisodeSteps
from healer.healing.escalator import SideTasks
from healer.healing.ladder import Decision
from healer.healing.model import (
    Action,
    ActionState,
    Agenda,
    Episode,
    EpisodeState,
    Event,
    Finish,
    Flap,
    FlapPolicy,
    InboxItem,
    OpenRequest,
    Outcome,
    SkipReason,
)
from healer.healing.rails import IntakePacer
from healer.healing.replica import RENEWALS_PER_LEASE
from healer.healing.rules import flapping_reason
from healer.logs import fields
from healer.promql import PrometheusUnavailableError
from healer.storage import Inbox

log = logging.getLogger(__name__)

# While webhook deliveries keep arriving, processing the inbox gets this share of the time.
INTAKE_SHARE_UNDER_LOAD = 0.25
# Alerts the work loop takes from the inbox in one transaction: when quiet, and while deliveries arrive.
BATCH = 200
BATCH_UNDER_LOAD = 25
# With a shared store, how long the work loop sleeps at most: steps that other replicas schedule, and
# claims that lapse, do not wake it.
SHARED_POLL_SECONDS = 0.5
# How often the work loop looks for steps this replica holds but no longer works on.
ORPHAN_CHECK_SECONDS = 5.0
# With a shared store, how often the inbox's depth is read from it.
DEPTH_CHECK_SECONDS = 1.0
# After the inbox failed to process, how long before it is tried again.
INTAKE_RETRY_SECONDS = 1.0
# At shutdown, what an escalation or a silence expiry in flight may take beyond the steps' deadline.
SIDE_TASK_GRACE = 1.0


class Engine:
    """Runs healing for the alerts the webhook has committed to the inbox."""

    def __init__(
        self,
        config: HealerConfig,
        wakeup: asyncio.Event,
        inbox: Inbox,
        episode_steps: EpisodeSteps,
        side: SideTasks,
        clock: Callable[[], float] = time.time,
        intake_share: float = INTAKE_SHARE_UNDER_LOAD,
    ) -> None:
        self.config = config
        self.inbox = inbox
        self.episode_steps = episode_steps
        self.records = episode_steps.records
        self.steps = episode_steps.steps
        self.ladder = episode_steps.ladder
        self.escalator = episode_steps.escalator
        self.metrics = episode_steps.metrics
        self.promql = episode_steps.promql
        self.replica = episode_steps.steps.replica
        self._side = side
        self._clock = clock
        self._rules = {rule.name: rule for rule in config.healing.rules}
        self._wake = wakeup
        self._intake = IntakePacer(intake_share)
        self._inflight: dict[int, asyncio.Task[None]] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._discarded_counted = 0
        self._next_orphan_check = 0.0
        self._next_reclaim = 0.0
        self._next_depth = 0.0
        # Alerts accepted and not yet processed; the webhook refuses deliveries at store.max_backlog.
        self.backlog = 0

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Recover what a previous run left unfinished, then start the work loop."""
        await self._recover()
        self._loop_task = asyncio.create_task(self._run(), name="healing-engine")

    def begin_stop(self, timeout: float) -> None:
        """Take no new steps from now on; running ones have `timeout` seconds from now to finish."""
        self.steps.begin_stop(timeout)
        self.wake()

    async def stop(self, timeout: float) -> None:
        """Stop: running steps get what is left of `timeout` since `begin_stop`, then are cancelled as interrupted."""
        self.begin_stop(timeout)
        deadline = self.steps.stop_deadline
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        # Only a strategy that is running deserves the stop's grace: a step waiting for its turn, held by
        # a pause or guard, or being verified stops at once and is taken up again after the restart
        # (anywhere, with a shared store), verification included.
        for action_id, task in self._inflight.items():
            if not self.episode_steps.must_finish(action_id):
                task.cancel()
        running = list(self._inflight.values())
        if running:
            _, pending = await asyncio.wait(running, timeout=max(0.0, deadline - time.monotonic()))
            for task in pending:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
        # Steps that ended during the stop may have escalated: post those now rather than at a next
        # start that may never come.
        if self.replica.leader:
            with contextlib.suppress(Exception):
                self.escalator.send_due(await self.records.agenda(self._clock(), self.replica.name))
        # Escalations and silence expiries stay queued in the store if cut short here.
        await self._side.wait(max(SIDE_TASK_GRACE, deadline - time.monotonic()))

    def wake(self) -> None:
        """Tell the work loop that there is new work."""
        self._wake.set()

    def inbox_grew(self, alerts: int) -> None:
        """Tell the work loop that a delivery of `alerts` is in the inbox; it comes when intake's pause allows."""
        self.backlog += alerts
        self.metrics.inbox_depth.set(self.backlog)
        self._intake.delivered()
        if not self._intake.wait():
            self._wake.set()

    async def _recover(self) -> None:
        # A store that one healer owns was left by this replica's previous process: every claim in it
        # is stale, however recent. A shared store's lapsed claims are settled by the work loop once
        # this replica has reached the store for a whole lease (`Replica.steady`).
        if not self.replica.shared:
            await self._reclaim(math.inf)
        if self.ladder.learns:
            self.ladder.tally.load(await self.records.strategy_outcomes())
        self.backlog = await self.inbox.depth()
        self.metrics.inbox_depth.set(self.backlog)
        if self.config.healing.rules:
            # The first PromQL call pays for imports and a connection (about 40 ms); pay it now, not in
            # the first heal. Without rules healer never queries, and skips the imports' 4 MB.
            self._side.spawn(self._warm_promql())
        await self.steps.circuit_open()  # the gauge shows the shared breaker from the first scrape
        if self.replica.leader:
            await self.escalator.expire_leftover_silences()

    async def _settle_own_orphans(self) -> None:
        """Settle the steps this replica holds but no longer works on (a store error cut their task
        short): renewing their claims would keep them running in the store forever."""
        now = self._clock()
        if now < self._next_orphan_check:
            return
        self._next_orphan_check = now + ORPHAN_CHECK_SECONDS
        for action in await self.records.abandoned(math.inf):
            if action.replica == self.replica.name and action.id not in self._inflight:
                await self._settle(action, math.inf)

    async def _reclaim(self, abandoned_before: float) -> None:
        """Settle the steps whose replica stopped renewing its claim before `abandoned_before`.

        A step that ran and was being verified ends unverified: running it again could repeat a
        non-idempotent fix. A step that was running is recorded interrupted and retried within its
        attempt limit. Several replicas may look at once; the store lets one of them settle each step.
        """
        for action in await self.records.abandoned(abandoned_before):
            await self._settle(action, abandoned_before)

    async def _settle(self, action: Action, abandoned_before: float) -> None:
        """Settle one abandoned step: a step that ran is verified here (never run again); one that was
        running is recorded interrupted and retried."""
        if action.state is not ActionState.VERIFYING:
            await self._interrupted(action, abandoned_before)
            return
        if action.id in self._inflight:
            return
        adopted = await self.records.adopt(action.id, self.replica.name, self.replica.until(), abandoned_before)
        if adopted is None:
            return  # another replica adopted it, or it ended meanwhile
        task = asyncio.create_task(self.episode_steps.resume(adopted), name=f"verify-{action.id}")
        self._inflight[action.id] = task
        task.add_done_callback(functools.partial(self._forget, action.id))

    async def _interrupted(self, action: Action, abandoned_before: float) -> None:
        """Record a step that was running when its replica stopped, and retry it within its attempt limit."""
        rule = self._rules.get(action.rule)
        episode = await self.records.get_episode(action.episode_id)
        assert episode is not None
        nxt = self.ladder.next_step(action, rule, same_step=True)
        reason = "attempts exhausted after interruption"
        finish = Finish(
            outcome=Outcome.INTERRUPTED,
            detail=f"healer ({action.replica}) stopped while the step was running",
            next_action=nxt,
            episode_state=None if nxt else EpisodeState.ESCALATED,
            escalation=None if nxt else reason,
            events=[] if nxt else [("escalated", {"reason": reason})],
        )
        if not await self.records.finish(action.id, finish, abandoned_before=abandoned_before):
            return  # another replica settled it, or its replica renewed its claim after all
        self.metrics.actions.labels(action.strategy, Outcome.INTERRUPTED).inc()
        log.warning(
            "step interrupted", extra=fields(action=action.id, strategy=action.strategy, replica=action.replica)
        )
        if nxt is None:
            await self.escalator.count(episode, reason)
        self.wake()

    async def _warm_promql(self) -> None:
        with contextlib.suppress(PrometheusUnavailableError, ValueError):
            await self.promql.alert_firing({"alertname": "HealerWarmUp"})

    # -- the work loop -------------------------------------------------------------------------

    async def _run(self) -> None:
        while not self.steps.stopping:
            self._wake.clear()
            more = False
            if not self._intake.wait():
                # While deliveries keep arriving, a smaller batch holds the store's thread for less
                # time, so the webhook's commits queue behind it for less.
                size = BATCH_UNDER_LOAD if self._intake.waiting else BATCH
                self._intake.start_batch()
                try:
                    more = await self._take_inbox_batch(size)
                except Exception:
                    log.exception("inbox processing failed; retrying in a second")
                    self._intake.end_batch()
                    self._intake.hold(INTAKE_RETRY_SECONDS)
                else:
                    self._intake.end_batch()
            try:
                # Due steps and escalations go out whatever the inbox is doing, a failing inbox included.
                if self.replica.shared and self.replica.steady and self._clock() >= self._next_reclaim:
                    # Claims lapse in leases, so looking a few times per lease is enough; every loop
                    # would add a query to each step's way from the inbox to its start.
                    self._next_reclaim = self._clock() + self.replica.lease / RENEWALS_PER_LEASE
                    await self._reclaim(self._clock())
                await self._settle_own_orphans()
                await self.steps.release_leftovers()
                # Keeps healer_paused current when no step asks (at most once per pause_check_interval).
                await self.episode_steps.pauses.refresh()
                agenda = await self.records.agenda(self._clock(), self.replica.name)
                if self.replica.leader:
                    await self._expire_approvals(agenda.expired_approvals)
                delay = self._dispatch_due(agenda)
                if self.replica.shared:
                    # Other replicas schedule steps and let claims lapse without waking this loop.
                    delay = min(delay, SHARED_POLL_SECONDS)
                    await self._refresh_depth()
            except Exception:
                log.exception("healing loop failed; retrying")
                delay = 1.0
            pause = self._intake.wait()
            if more or self._intake.waiting or pause:
                if not pause:
                    continue
                delay = min(delay, pause)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=delay)

    async def _take_inbox_batch(self, size: int) -> bool:
        """Process up to `size` inbox items in order; return whether more may be waiting."""
        items = await self.inbox.unprocessed(size)
        firing: list[InboxItem] = []
        for item in items:
            if item.alert.status == "firing":
                firing.append(item)
                continue
            # A resolved notification must see the episodes of the firing alerts before it.
            await self._open_all(firing)
            firing = []
            await self._on_resolved(item)
        await self._open_all(firing)
        discarded = self.inbox.discarded_alerts - self._discarded_counted
        self._discarded_counted += discarded
        # With a shared store other replicas take in deliveries too; the work loop reads the true depth
        # from the store now and then (`_refresh_depth`), off the way of a step from the inbox to its start.
        self.backlog = max(0, self.backlog - len(items) - discarded)
        self.metrics.inbox_depth.set(self.backlog)
        return len(items) == size

    async def _refresh_depth(self) -> None:
        """Read the inbox's depth from a shared store, at most once per DEPTH_CHECK_SECONDS."""
        if self._clock() < self._next_depth:
            return
        self._next_depth = self._clock() + DEPTH_CHECK_SECONDS
        self.backlog = await self.inbox.depth()
        self.metrics.inbox_depth.set(self.backlog)

    def _plan_first_step(self, item: InboxItem) -> tuple[OpenRequest, Decision]:
        alert = item.alert
        decision = self.ladder.decide(alert.labels)
        received = {"alertname": alert.alertname, "delivery": item.position.delivery}
        events: list[Event] = [("received", received)]
        first = None
        state = EpisodeState.UNMATCHED
        if decision.rule is not None and not self.config.healing.enabled:
            state = EpisodeState.DISABLED
            events.append(("disabled", {"explanation": "healing.enabled is false; nothing runs"}))
        elif decision.rule is not None:
            state = EpisodeState.OPEN
            events.append(("matched", {"rule": decision.rule.name, "explanation": decision.explanation}))
            first = self.ladder.first(decision)
        else:
            events.append(("unmatched", {"explanation": decision.explanation}))
        rule_name = decision.rule.name if decision.rule else None
        flapping = None
        if decision.rule is not None:
            policy = decision.rule.flapping or self.config.healing.flapping
            flapping = FlapPolicy(policy.episodes, policy.window)
        return OpenRequest(item.position, alert, rule_name, state, first, events, flapping), decision

    async def _open_all(self, items: list[InboxItem]) -> None:
        """Open the episodes of a run of firing alerts in one store transaction."""
        if not items:
            return
        planned = [self._plan_first_step(item) for item in items]
        # The first steps due at once come back taken by this replica, ready to start without a round trip.
        opened = await self.records.open_episodes(
            [request for request, _ in planned], self.replica.name, self.replica.until()
        )
        for item, (request, decision), result in zip(items, planned, opened, strict=True):
            if not result.created:
                self.metrics.skipped.labels(SkipReason.DUPLICATE).inc()
                continue
            if request.state is EpisodeState.DISABLED:
                self.metrics.skipped.labels(SkipReason.DISABLED).inc()
            elif decision.skip_reason is not None:
                self.metrics.skipped.labels(decision.skip_reason).inc()
            if result.deferred_until is not None:
                self.metrics.skipped.labels(SkipReason.COOLDOWN).inc()
            if result.first is not None:
                self._start(result.first, result.episode, item.received_at)
            if result.flap is not None:
                self.metrics.skipped.labels(SkipReason.FLAPPING).inc()
                if result.flap is Flap.ESCALATE and request.flapping is not None:
                    await self.escalator.count(result.episode, flapping_reason(request.flapping))
            # Unmatched alerts are in the audit trail; logging each one would flood the log in a storm.
            log.log(
                logging.INFO if decision.rule is not None else logging.DEBUG,
                "alert received",
                extra=fields(
                    alertname=request.alert.alertname,
                    fingerprint=request.alert.fingerprint,
                    episode=result.episode.id,
                    rule=request.rule,
                    explanation=decision.explanation,
                ),
            )

    async def _on_resolved(self, item: InboxItem) -> None:
        resolution = await self.records.resolve_episode(item.position, item.alert)
        episode = resolution.episode
        if episode is None:
            return
        for action in resolution.cancelled:
            self.metrics.actions.labels(action.strategy, Outcome.CANCELLED).inc()
            self.metrics.skipped.labels(SkipReason.RESOLVED).inc()
        self.episode_steps.alert_resolved(episode.id)
        rule = self._rules.get(episode.rule or "")
        for action in resolution.running:
            task = self._inflight.get(action.id)
            if (
                task is not None
                and rule is not None
                and rule.cancel_running_on_resolve
                and self.episode_steps.in_runner(action.id)
            ):
                task.cancel()
        if episode.state is not EpisodeState.OPEN:
            await self.escalator.expire_silence(episode)

    async def _expire_approvals(self, expired: list[Action]) -> None:
        for action in expired:
            episode = await self.records.get_episode(action.episode_id)
            assert episode is not None
            await self.episode_steps.cancel_and_escalate(
                action, episode, SkipReason.APPROVAL_EXPIRED, "nobody approved the step in time", "approval expired"
            )

    def _dispatch_due(self, agenda: Agenda) -> float:
        """Start every due step; return how long the loop may sleep before the next one is due."""
        if self.steps.stopping:
            return 1.0
        for action in agenda.due:
            self._start(action)
        if self.replica.leader:
            self.escalator.send_due(agenda)
            self.escalator.sweep_when_due()
            self.escalator.report_storms_when_due()
        if agenda.next_wake is None:
            return 5.0
        return max(0.01, min(5.0, agenda.next_wake - self._clock()))

    def _start(self, action: Action, taken_for: Episode | None = None, arrived_at: float | None = None) -> None:
        """Start a due step's task unless it runs here already; `taken_for` when this replica holds it already
        (a first step, whose alert arrived at `arrived_at`)."""
        if action.id in self._inflight or self.steps.stopping:
            return
        work = self.episode_steps.execute(action, taken_for, arrived_at)
        task = asyncio.create_task(work, name=f"action-{action.id}")
        self._inflight[action.id] = task
        task.add_done_callback(functools.partial(self._forget, action.id))

    def _forget(self, action_id: int, _task: asyncio.Task[None]) -> None:
        self._inflight.pop(action_id, None)

    # -- operator actions ----------------------------------------------------------------------

    async def approve(self, action_id: int, approver: str) -> bool:
        """Approve a step that waits for approval; it runs at once."""
        approved = await self.records.approve(action_id, approver)
        if approved:
            self.wake()
        return approved

    async def reject(self, action_id: int, who: str, reason: str) -> bool:
        """Reject a step that waits for approval: it ends cancelled and its episode escalates at once."""
        rejected = await self.episode_steps.reject(action_id, who, reason)
        if rejected:
            self.wake()  # HealingFailed is queued as due now: deliver it without waiting for the next wake
        return rejected

    async def close_circuit(self, by: str) -> None:
        """Close the circuit breaker and reset the action budget, for every replica; the audit trail records
        `by` (the authenticated operator)."""
        await self.steps.close_circuit(by)
        self.wake()
