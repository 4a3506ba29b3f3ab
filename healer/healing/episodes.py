"""An episode's steps: approval, the still-firing check, the run under the rails, verification, and then
the next rung of the ladder or the hand-over to people.

Every outcome is recorded in the store before it has effect (`HealingRecords.finish`), so that a
restart resumes from there: a step that ran is only ever verified again, never run twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import TypeVar

from healer.alertmanager import STILL_FIRES
from healer.annotations import GrafanaAnnotator
from healer.config import HealerConfig, HealingRule
from healer.healing.escalator import Escalator, SideTasks
from healer.healing.ladder import Ladder, dry_run_for
from healer.healing.metrics import HealingMetrics
from healer.healing.model import (
    Action,
    ActionState,
    BudgetScope,
    Episode,
    EpisodeState,
    Finish,
    Outcome,
    SkipReason,
)
from healer.healing.pauses import PauseBoard
from healer.healing.rails import backoff
from healer.healing.steps import NOT_CLAIMED, STOPPING, Halt, PlannedStep, StepRefusedError, StepRunner
from healer.logs import fields
from healer.promql import PrometheusUnavailableError, PromQLClient, PromQLError, render_query
from healer.storage import HealingRecords, StoreHealth, StoreUnavailableError
from healer.strategies.runner import AlertContext, StepResult

log = logging.getLogger(__name__)
T = TypeVar("T")

# A first step due within this long of its alert's arrival runs without asking Prometheus whether the
# alert still fires: the notification is as recent as Prometheus's last evaluation.
FRESH_ALERT_SECONDS = 5.0
# After a step ran, how soon recording its outcome is tried again while the store is unavailable.
DURABLE_RETRY_SECONDS = 0.5
DURABLE_RETRY_MAX_SECONDS = 5.0


UNVERIFIED_REASON = "unverified: Prometheus could not say whether the step healed; the fault may still be there"


@dataclass(frozen=True)
class Verdict:
    """How a step that ran ends, and what follows: the episode ends as judged (`reason` None), the ladder
    goes on (`next_rung`), or the episode goes to people at once."""

    finish: Finish
    reason: str | None = None
    next_rung: bool = True


@dataclass(frozen=True)
class Hold:
    """Why a step may not run now: a skip reason, and what people read."""

    reason: SkipReason
    detail: str


@dataclass(frozen=True)
class Turn:
    """Leave to run a step, with the label group's slot (max_concurrent_per) it holds until verified."""

    slot: int | None = None


def group_key(rule: str, labels: list[str], values: dict[str, str]) -> str:
    """The key of an alert's label group under a rule: the rule and the values of the group's labels."""
    return rule + ":" + json.dumps([values.get(name, "") for name in labels])


async def _wait_any(events: list[asyncio.Event], timeout: float) -> None:
    """Wait until one of `events` is set or `timeout` seconds have passed."""
    if not events:
        await asyncio.sleep(timeout)
        return
    waiters = [asyncio.ensure_future(event.wait()) for event in events]
    try:
        await asyncio.wait(waiters, timeout=timeout)
    finally:
        for waiter in waiters:
            waiter.cancel()


def alert_context(episode: Episode, status: str = "firing") -> AlertContext:
    """What a strategy sees of an episode's alert."""
    return AlertContext(
        labels=episode.labels,
        annotations=episode.annotations,
        fingerprint=episode.fingerprint,
        starts_at=episode.starts_at,
        status=status,
    )


class EpisodeSteps:
    """Runs one step of an episode at a time per task, from its rails to its verified outcome."""

    def __init__(
        self,
        config: HealerConfig,
        records: HealingRecords,
        steps: StepRunner,
        ladder: Ladder,
        escalator: Escalator,
        side: SideTasks,
        metrics: HealingMetrics,
        promql: PromQLClient,
        annotator: GrafanaAnnotator,
        wake: Callable[[], None],
        clock: Callable[[], float] = time.time,
        store_health: Callable[[], StoreHealth] = StoreHealth,
    ) -> None:
        self.config = config
        self.records = records
        self.steps = steps
        self.ladder = ladder
        self.escalator = escalator
        self._side = side
        self.metrics = metrics
        self.promql = promql
        self.annotator = annotator
        self.pauses: PauseBoard = steps.pauses
        self._wake = wake
        self._clock = clock
        self._store_health = store_health
        self._rules = {rule.name: rule for rule in config.healing.rules}
        # Steps whose strategy is running now (a resolution may stop those, not those verifying).
        self._in_runner: set[int] = set()
        # Steps whose strategy has run and that are not yet recorded as having run.
        self._unrecorded: set[int] = set()
        # Per open episode, set when its alert resolves, so that a verification in progress ends early.
        self._resolved: dict[int, asyncio.Event] = {}

    def in_runner(self, action_id: int) -> bool:
        """Whether the step's strategy is running now."""
        return action_id in self._in_runner

    def must_finish(self, action_id: int) -> bool:
        """Whether a stop must let the step's task go on: its strategy runs, or ran and the store does not
        know yet (cut short there, the step would be retried as interrupted: run twice)."""
        return action_id in self._in_runner or action_id in self._unrecorded

    def alert_resolved(self, episode_id: int) -> None:
        """Tell a verification in progress that the episode's alert has resolved."""
        event = self._resolved.get(episode_id)
        if event is not None:
            event.set()

    def count_skip(self, strategy: str, reason: str, outcome: Outcome = Outcome.CANCELLED) -> None:
        """Count a step that ended without running: why, and how it ended."""
        self.metrics.skipped.labels(reason).inc()
        self.metrics.actions.labels(strategy, outcome).inc()

    async def execute(
        self, action: Action, taken_for: Episode | None = None, arrived_at: float | None = None
    ) -> None:
        """Take a due step as far as it goes; nothing it meets is left pending or running forever.

        The step is first reserved for this replica, so that of several replicas one runs it, unless
        it came reserved already (`taken_for`: its episode, which this replica opened with it from an
        alert that arrived at `arrived_at`).
        """
        replica = self.steps.replica
        episode = taken_for or await self.records.take(action.id, replica.name, self._clock(), replica.until())
        if episode is None:
            return
        try:
            await self._execute_step(action, episode, arrived_at)
        except asyncio.CancelledError:
            raise
        except StoreUnavailableError as exc:
            # The store will come back; the step stays (or is recorded) as the store last had it and
            # is taken again then. Escalating now would page people for a database hiccup.
            log.error("step postponed: the store is unavailable", extra=fields(action=action.id, reason=str(exc)))
            with contextlib.suppress(StoreUnavailableError):
                await self.records.give_back(action.id, replica.name)
        except Exception as exc:
            log.exception("step failed unexpectedly", extra=fields(action=action.id))
            # Leave nothing pending or running forever: end the step and hand the episode to people.
            with contextlib.suppress(Exception):
                episode = await self.records.get_episode(action.episode_id)
                if episode is not None:
                    self.ladder.learn(action, Outcome.FAILED)  # as the store records it, so a restart learns the same
                    self.metrics.actions.labels(action.strategy, Outcome.FAILED).inc()
                    await self._end_with_escalation(
                        action,
                        episode,
                        Finish(outcome=Outcome.FAILED, detail=f"internal error: {exc!r}"),
                        f"internal error: {exc!r}",
                    )

    async def _execute_step(self, action: Action, episode: Episode, arrived_at: float | None) -> None:
        rule = self._rules.get(action.rule)
        if rule is None or action.strategy not in self.config.strategies:
            detail = f"rule {action.rule!r} or strategy {action.strategy!r} is no longer configured"
            await self.cancel_and_escalate(action, episode, SkipReason.DISABLED, detail, "configuration changed")
            return
        try:
            step = self.steps.plan(action.strategy, alert_context(episode))
        except StepRefusedError as exc:  # an unsafe label: the next rung may not need it
            self.count_skip(action.strategy, SkipReason.UNSAFE_LABEL)
            log.warning("unsafe label", extra=fields(action=action.id, reason=exc.detail))
            await self._continue_or_escalate(
                action,
                rule,
                episode,
                Finish(outcome=Outcome.CANCELLED, skip_reason=SkipReason.UNSAFE_LABEL, detail=exc.detail),
                reason=f"unsafe label: {exc.detail}",
            )
            return
        if dry_run_for(self.config, rule):
            detail = "dry run: recorded what would have run"
            await self._end_unrun(action, SkipReason.DRY_RUN, Outcome.DRY_RUN, EpisodeState.DRY_RUN, detail, step.plan)
            return
        if step.params.approval == "required" and not action.approved:
            deadline = self._clock() + self.config.healing.approval_timeout
            if await self.records.await_approval(action.id, deadline, step.plan):
                self.metrics.skipped.labels(SkipReason.APPROVAL_PENDING).inc()
                self._wake()
            return
        # Alertmanager's word that the alert fires, seconds old, is as fresh as Prometheus's ALERTS:
        # only a step that waited (a cooldown, a backoff, an approval) asks Prometheus again.
        fresh = arrived_at is not None and self._clock() - arrived_at < FRESH_ALERT_SECONDS
        if not fresh and await self.escalator.still_firing(episode) is False:
            detail = "Prometheus no longer reports the alert firing"
            await self._end_unrun(
                action, SkipReason.RESOLVED, Outcome.CANCELLED, EpisodeState.RESOLVED, detail, step.plan
            )
            return
        resolved = self._resolved.setdefault(episode.id, asyncio.Event())
        turn = await self._wait_until_clear(action, rule, episode, resolved)
        if isinstance(turn, Hold) and turn.reason is SkipReason.RESOLVED:
            await self._end_unrun(
                action, SkipReason.RESOLVED, Outcome.CANCELLED, EpisodeState.RESOLVED, turn.detail, step.plan
            )
            return
        if isinstance(turn, Hold):  # a guard that held past guard_timeout, counted when it began to hold
            reason = f"guard: {turn.detail}"
            await self.cancel_and_escalate(action, episode, turn.reason, turn.detail, reason, step.plan, counted=True)
            return
        if turn is STOPPING:  # the step stays pending and runs after the restart, anywhere
            await self.records.give_back(action.id, self.steps.replica.name)
            return
        if turn is NOT_CLAIMED:  # the alert resolved meanwhile and its step was cancelled
            await self.episode_ended(episode.id)
            return
        assert isinstance(turn, Turn)
        try:
            await self._run_step(action, rule, episode, step, resolved)
        finally:
            if turn.slot is not None:
                # Shielded like the strategy slots: the group's next episode must get its turn.
                with contextlib.suppress(StoreUnavailableError):
                    await asyncio.shield(self.steps.release_group_slot(turn.slot))

    async def _run_step(
        self, action: Action, rule: HealingRule, episode: Episode, step: PlannedStep, resolved: asyncio.Event
    ) -> None:
        """Run a cleared step under the rails, verify it and record what follows."""
        silenced = episode
        started = self._clock()

        async def silence() -> None:
            nonlocal silenced
            if rule.silence and episode.silence_id is None:
                silenced = await self.escalator.silence(episode, rule)

        async def claim() -> bool:
            nonlocal started
            if not await self.records.claim(action.id, step.plan, self.steps.replica.name):
                return False
            started = self._clock()
            self._in_runner.add(action.id)
            log.info(
                "step started",
                extra=fields(action=action.id, rule=rule.name, strategy=action.strategy, attempt=action.attempt),
            )
            return True

        # Slots are held while the strategy runs, not while verification waits on Prometheus.
        scope = None
        if rule.budget is not None:
            key = group_key(rule.name, rule.budget.per, episode.labels) if rule.budget.per else rule.name
            scope = BudgetScope(key, rule.budget.actions, rule.budget.window)
        try:
            result = await self.steps.run(step, claim=claim, before_slot=silence, scope=scope)
            self._unrecorded.add(action.id)
        except StepRefusedError as refused:
            if refused.reason in (SkipReason.CIRCUIT_OPEN, SkipReason.BUDGET):
                await self._suspend(action, episode, refused, step.plan)
            elif refused.reason == STOPPING:  # the step stays pending and runs after the restart, anywhere
                await self.records.give_back(action.id, self.steps.replica.name)
            else:
                await self.episode_ended(episode.id)  # cancelled meanwhile: release its silence
            return
        except asyncio.CancelledError:
            # On shutdown the step stays "running" in the store; the next start records it as
            # interrupted and retries it, exactly as after a crash.
            if action.id in self._in_runner and not self.steps.stopping:
                self.metrics.actions.labels(action.strategy, Outcome.CANCELLED).inc()
                await self.finish(
                    action,
                    Finish(
                        outcome=Outcome.CANCELLED,
                        skip_reason=SkipReason.RESOLVED,
                        episode_state=EpisodeState.RESOLVED,
                        detail="the alert resolved while the step ran; the step was stopped",
                    ),
                )
            raise
        finally:
            self._in_runner.discard(action.id)
        await self._conclude_durably(action, rule, silenced, result, resolved, started)

    async def _suspend(
        self, action: Action, episode: Episode, refused: StepRefusedError, plan: dict[str, object]
    ) -> None:
        """End a step that a spent budget stopped. An episode that never got to act is suspended: people
        hear of all of those at once (HealingSuspended), not per episode. One that acted and failed
        escalates as ever."""
        if action.attempt > 1:
            reason = SkipReason(refused.reason)
            await self.cancel_and_escalate(action, episode, reason, refused.detail, refused.detail, plan)
            return
        self.count_skip(action.strategy, SkipReason(refused.reason))
        finish = Finish(
            outcome=Outcome.CANCELLED,
            skip_reason=refused.reason,
            detail=refused.detail,
            plan=plan,
            episode_state=EpisodeState.SUSPENDED,
            events=[("suspended", {"reason": refused.reason, "detail": refused.detail})],
        )
        await self.finish(action, finish)
        self._wake()  # the leader's escalator tells people, once for all of them

    async def _wait_until_clear(
        self, action: Action, rule: HealingRule, episode: Episode, resolved: asyncio.Event
    ) -> Hold | Halt | Turn:
        """Hold the step while a pause, a guard or the blast radius says not to act; a Turn when it may run.

        Each reason is counted once per step and recorded on it. A pause and the blast radius hold for
        as long as they last; a guard for up to the rule's guard_timeout, after which the guard's Hold is
        returned to end the step. A step that was held runs only if Prometheus does not say its alert
        stopped meanwhile (else a RESOLVED Hold). STOPPING when healer stops meanwhile, NOT_CLAIMED when
        the step was cancelled (its alert resolved).
        """
        counted: set[SkipReason] = set()
        guard_failing_since: float | None = None
        while True:
            hold = await self._hold(rule, episode)
            if hold is None and counted and await self.escalator.still_firing(episode) is False:
                # Held a while (a pause, a guard, the blast radius): the alert may have stopped meanwhile.
                return Hold(SkipReason.RESOLVED, "Prometheus no longer reports the alert firing")
            if hold is None:
                turn = await self._take_turn(rule, episode)
                if isinstance(turn, Turn):
                    return turn
                hold = turn
            if hold.reason not in counted:
                counted.add(hold.reason)
                self.metrics.skipped.labels(hold.reason).inc()
                log.info("step held", extra=fields(action=action.id, reason=hold.reason, detail=hold.detail))
                if hold.reason is not SkipReason.STORE_NOT_READY:  # a store that cannot keep it is not asked to
                    await self.records.hold(action.id, self.steps.replica.name, hold.reason, hold.detail)
            wait = self.config.healing.pause_check_interval
            if hold.reason is SkipReason.GUARD:
                now = self._clock()
                guard_failing_since = now if guard_failing_since is None else guard_failing_since
                if now >= guard_failing_since + rule.guard_timeout:
                    return hold
                wait = min(rule.verify.interval, guard_failing_since + rule.guard_timeout - now)
            else:
                guard_failing_since = None
            if self.steps.stopping:
                return STOPPING
            wake_on = [] if resolved.is_set() else [resolved]
            if hold.reason is SkipReason.BLAST_RADIUS:
                wake_on.append(self.steps.group_freed)
            await _wait_any(wake_on, wait)
            # The store says whether the step still waits: a resolution another replica took in, or its
            # claim lapsed during a store outage and another replica took the step over.
            current = await self.records.get_action(action.id)
            ours = current is not None and current.replica == self.steps.replica.name
            if current is None or current.state is not ActionState.PENDING or not ours:
                return NOT_CLAIMED

    async def _take_turn(self, rule: HealingRule, episode: Episode) -> Turn | Hold:
        """Count the episode within its group's share of the fleet and take its group's slot, or say why not."""
        if rule.blast_radius is not None:
            radius = rule.blast_radius
            key = "share:" + group_key(rule.name, radius.labels, episode.labels)
            try:
                instances = await self.promql.scalar(render_query(radius.of, episode.labels))
            except (PrometheusUnavailableError, PromQLError) as exc:
                return Hold(SkipReason.BLAST_RADIUS, f"cannot count the group's instances ({exc}); blast_radius holds")
            # At least one, so that a small group is not left unhealed forever.
            limit = max(1, math.floor((instances or 0.0) * radius.fraction))
            if not await self.steps.take_share(key, episode.id, radius.window, limit):
                return Hold(
                    SkipReason.BLAST_RADIUS,
                    f"{limit} of the group's {instances or 0:g} instances were acted on within {radius.window:g}s",
                )
        if rule.max_concurrent_per is None:
            return Turn()
        per = rule.max_concurrent_per
        slot = await self.steps.take_group_slot(group_key(rule.name, per.labels, episode.labels), per.limit)
        if slot is None:
            values = ", ".join(f"{name}={episode.labels.get(name, '')!r}" for name in per.labels)
            return Hold(SkipReason.BLAST_RADIUS, f"{per.limit} episode(s) of {values} are being healed")
        return Turn(slot)

    async def _hold(self, rule: HealingRule, episode: Episode) -> Hold | None:
        """The first reason not to run the episode's step now: a store that cannot keep what it does, a pause
        that covers it, or a failing guard."""
        store = self._store_health()
        if not store.up:
            return Hold(
                SkipReason.STORE_NOT_READY,
                f"the store is {store.reason} ({store.detail}); no step starts until it can keep what is done",
            )
        pause = await self.pauses.covering(episode.labels)
        if pause is not None:
            return Hold(SkipReason.PAUSED, f"paused by {pause.source} {pause.name}: {pause.reason}")
        for guard in rule.guard:
            try:
                samples = await self.promql.query(render_query(guard.query, episode.labels))
            except (PrometheusUnavailableError, PromQLError) as exc:
                # A guard fails closed: a precondition nobody could check does not hold.
                return Hold(SkipReason.GUARD, f"{guard.message} (Prometheus could not check the guard: {exc})")
            if not samples:
                return Hold(SkipReason.GUARD, guard.message)
        return None

    async def _conclude_durably(
        self,
        action: Action,
        rule: HealingRule,
        episode: Episode,
        result: StepResult,
        resolved: asyncio.Event,
        started: float,
    ) -> None:
        """Record that a step ran, verify it once, and record its outcome, the two writes retried through
        an outage of the store: given up, the step would be settled as interrupted and run a second time."""
        name = self.steps.replica.name
        failed = None if result.ok else (Outcome.TIMEOUT if result.timed_out else Outcome.FAILED)
        # From here a restart must not run the step again: it ran; only its verification is left (or,
        # when it failed to act, recording that), which whoever settles the step does after a crash.
        try:
            marked = await self._durably(
                action, lambda: self.records.mark_verifying(action.id, result.detail, name, failed)
            )
        finally:
            self._unrecorded.discard(action.id)
        if not marked:
            # Fencing: this replica's claim ran out while the strategy ran and another replica has
            # settled the step; its outcome is not this replica's to record.
            log.warning("step finished after its claim was lost", extra=fields(action=action.id))
            return
        if self.steps.stopping:
            # The stop let the strategy finish; its verification could wait on Prometheus for up to
            # verify.within and hold the stop that long. Recorded as ran, it resumes after the restart.
            return
        verdict = await self._judge(action, rule, episode, result, resolved, started)
        await self._durably(action, lambda: self._record_verdict(action, rule, episode, verdict))

    async def resume(self, action: Action) -> None:
        """Verify a step that ran, whose verification was cut short (healer stopped or its replica died),
        and record what follows; the step was adopted by this replica (`HealingRecords.adopt`)."""
        episode = await self.records.get_episode(action.episode_id)
        rule = self._rules.get(action.rule)
        if episode is None:
            return
        if rule is None:
            detail = f"rule {action.rule!r} is no longer configured; the step ran: {action.detail}"
            finish = Finish(outcome=Outcome.UNVERIFIED, detail=detail)
            await self._end_with_escalation(action, episode, finish, f"{UNVERIFIED_REASON} (configuration changed)")
            return
        log.info("verification resumed", extra=fields(action=action.id, strategy=action.strategy))
        failed = action.outcome in (Outcome.FAILED, Outcome.TIMEOUT)
        result = StepResult(
            ok=not failed, detail=action.detail or "", timed_out=action.outcome is Outcome.TIMEOUT
        )
        resolved = self._resolved.setdefault(episode.id, asyncio.Event())
        started = action.started_at if action.started_at is not None else self._clock()
        verdict = await self._judge(action, rule, episode, result, resolved, started)
        await self._durably(action, lambda: self._record_verdict(action, rule, episode, verdict))

    async def _durably(self, action: Action, write: Callable[[], Awaitable[T]]) -> T:
        """Run a write until the store takes it; only a stop gives up (the step is then settled later)."""
        delay = DURABLE_RETRY_SECONDS
        while True:
            try:
                return await write()
            except StoreUnavailableError as exc:
                if self.steps.stopping:
                    raise
                log.error(
                    "step ran; its outcome waits for the store",
                    extra=fields(action=action.id, reason=str(exc), retry_in=delay),
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, DURABLE_RETRY_MAX_SECONDS)

    async def _end_unrun(
        self,
        action: Action,
        reason: SkipReason,
        outcome: Outcome,
        episode_state: EpisodeState,
        detail: str,
        plan: dict[str, object],
    ) -> None:
        """End a step that did not run, and its episode with it, counting why (once: not when another
        replica or a resolution ended it first)."""
        finish = Finish(outcome=outcome, skip_reason=reason, plan=plan, episode_state=episode_state, detail=detail)
        if await self.finish(action, finish):
            self.count_skip(action.strategy, reason, outcome)

    async def _judge(
        self,
        action: Action,
        rule: HealingRule,
        episode: Episode,
        result: StepResult,
        resolved: asyncio.Event,
        started: float,
    ) -> Verdict:
        """Verify a step that ran, count its outcome, and say what follows."""
        cooldown = (self._clock() + backoff(rule, action.attempt), action.attempt)
        if not result.ok:
            outcome = Outcome.TIMEOUT if result.timed_out else Outcome.FAILED
            self._record_outcome(action, episode, outcome, result.detail, started)
            finish = Finish(
                outcome=outcome,
                detail=result.detail,
                exit_code=result.exit_code,
                output=result.output,
                cooldown=cooldown,
            )
            return Verdict(finish, f"{action.strategy} {outcome}: {result.detail}")
        try:
            verify = rule.verify
            if verify.query is not None:  # a windowed alert outlives the fault: the query says whether it is gone
                answer = await self.promql.verify_query(
                    render_query(verify.query, episode.labels),
                    verify.within,
                    verify.interval,
                    settle=verify.settle,
                    healthy_when=verify.healthy_when,
                    grace=verify.wait_for_prometheus,
                    resolved=resolved,
                )
            else:
                answer = await self.promql.verify_resolved(
                    episode.labels,
                    verify.within,
                    verify.interval,
                    settle=verify.settle,
                    grace=verify.wait_for_prometheus,
                    resolved=resolved,
                )
        except ValueError:  # a label name PromQL cannot express: the outcome cannot be proven
            answer = "unverified"
        verdict = Outcome(answer)
        self._record_outcome(action, episode, verdict, result.detail, started)
        base = Finish(
            outcome=verdict, detail=result.detail, exit_code=result.exit_code, output=result.output, cooldown=cooldown
        )
        log.info("step verified", extra=fields(action=action.id, strategy=action.strategy, outcome=verdict))
        if verdict is Outcome.HEALED:
            self.metrics.time_to_heal.observe(max(0.0, self._clock() - episode.starts_at_epoch))
            return Verdict(replace(base, episode_state=EpisodeState.HEALED))
        if verdict is Outcome.UNVERIFIED:
            # Nobody knows whether the fault is still there: a person looks, rather than the episode
            # closing quietly or the ladder running its next strategy blind.
            return Verdict(base, UNVERIFIED_REASON, next_rung=False)
        return Verdict(base, STILL_FIRES)

    async def _record_verdict(self, action: Action, rule: HealingRule, episode: Episode, verdict: Verdict) -> None:
        """End the episode as judged, go on with the ladder (escalating when it is spent), or escalate."""
        if verdict.reason is None:
            await self.finish(action, verdict.finish)
        elif verdict.next_rung:
            await self._continue_or_escalate(action, rule, episode, verdict.finish, verdict.reason)
        else:
            await self._end_with_escalation(action, episode, verdict.finish, verdict.reason)

    def _record_outcome(self, action: Action, episode: Episode, outcome: Outcome, detail: str, started: float) -> None:
        """Learn from, count and annotate a step's outcome."""
        self.ladder.learn(action, outcome)
        self.metrics.actions.labels(action.strategy, outcome).inc()
        if self.annotator.enabled:
            # Marks the step on Grafana's graphs, from its start to now, without waiting for Grafana.
            text = f"healer ran {action.strategy} for {episode.alertname} (rule {action.rule}): {outcome}, {detail}"
            tags = [f"strategy:{action.strategy}", f"outcome:{outcome}", f"alertname:{episode.alertname}"]
            self._side.spawn(self.annotator.annotate(text, tags, started))

    async def finish(self, action: Action, finish: Finish) -> bool:
        """Record how a step ended; when that closed its episode, end the episode's silence too."""
        done = await self.records.finish(action.id, finish, self.steps.replica.name)
        await self.episode_ended(action.episode_id)
        return done

    async def _continue_or_escalate(
        self, action: Action, rule: HealingRule, episode: Episode, finish: Finish, reason: str
    ) -> None:
        tried: set[str] = set()
        if rule.order == "learned":
            tried = await self.records.tried_strategies(episode.id)
        nxt = self.ladder.next_step(action, rule, tried=tried)
        if nxt is not None:
            await self.finish(action, replace(finish, next_action=nxt))
            self._wake()
            return
        if action.attempt >= rule.max_attempts:
            self.metrics.skipped.labels(SkipReason.MAX_ATTEMPTS).inc()
        await self._end_with_escalation(action, episode, finish, reason)

    async def cancel_and_escalate(
        self,
        action: Action,
        episode: Episode,
        skip_reason: SkipReason,
        detail: str,
        escalation_reason: str,
        plan: dict[str, object] | None = None,
        counted: bool = False,
    ) -> None:
        """End a step that a safety rail stopped, count why (unless `counted` already), and hand the episode
        to people."""
        finish = Finish(outcome=Outcome.CANCELLED, skip_reason=skip_reason, detail=detail, plan=plan)
        if not await self._end_with_escalation(action, episode, finish, escalation_reason):
            return
        if counted:
            self.metrics.actions.labels(action.strategy, Outcome.CANCELLED).inc()
        else:
            self.count_skip(action.strategy, skip_reason)

    async def reject(self, action_id: int, who: str, reason: str) -> bool:
        """End a step that awaits approval as rejected and hand its episode to people; False when it no longer waits."""
        action = await self.records.get_action(action_id)
        # The store's finish refuses only a step already done; an approved step is pending again, so
        # the state is checked here on a fresh read (an approval landing between the two is not seen).
        if action is None or action.state is not ActionState.AWAITING_APPROVAL:
            return False
        episode = await self.records.get_episode(action.episode_id)
        if episode is None:
            return False
        escalation = f"rejected by {who}: {reason}"
        # Built here rather than through cancel_and_escalate, whose Finish carries only the escalated event.
        finish = Finish(
            outcome=Outcome.CANCELLED,
            skip_reason=SkipReason.REJECTED,
            detail=escalation,
            episode_state=EpisodeState.ESCALATED,
            escalation=escalation,
            events=[("rejected", {"by": who, "reason": reason}), ("escalated", {"reason": escalation})],
        )
        # Finished as this replica: a step another replica started after an approval won is not touched.
        if not await self.finish(action, finish):
            return False
        self.count_skip(action.strategy, SkipReason.REJECTED)
        await self.escalator.count(episode, escalation)
        return True

    async def _end_with_escalation(self, action: Action, episode: Episode, finish: Finish, reason: str) -> bool:
        """End the step and hand its episode to people; False when the step had ended already."""
        done = await self.finish(
            action,
            replace(
                finish,
                episode_state=EpisodeState.ESCALATED,
                escalation=reason,
                events=[("escalated", {"reason": reason})],
            ),
        )
        if done:
            await self.escalator.count(episode, reason)
        return done

    async def episode_ended(self, episode_id: int) -> None:
        """Drop what an episode held in memory and expire its silence, once it is no longer open."""
        episode = await self.records.get_episode(episode_id)
        if episode is None or episode.state is EpisodeState.OPEN:
            return
        self._resolved.pop(episode.id, None)
        await self.escalator.expire_silence(episode)
