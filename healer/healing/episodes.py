"""An episode's steps: approval, the still-firing check, the run under the rails, verification, and then
the next rung of the ladder or the hand-over to people.

Every outcome is recorded in the store before it has effect (`HealingRecords.finish`), so that a
restart resumes from there: a step that ran is only ever verified again, never run twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import TypeVar

from healer.annotations import GrafanaAnnotator
from healer.config import HealerConfig, HealingRule
from healer.healing.escalator import Escalator, SideTasks
from healer.healing.ladder import Ladder, dry_run_for
from healer.healing.metrics import HealingMetrics
from healer.healing.model import Action, ActionState, Episode, EpisodeState, Finish, Outcome, SkipReason
from healer.healing.rails import backoff
from healer.healing.steps import STOPPING, StepRefusedError, StepRunner
from healer.logs import fields
from healer.promql import PromQLClient, render_query
from healer.storage import HealingRecords, StoreUnavailableError
from healer.strategies.runner import AlertContext, StepResult

log = logging.getLogger(__name__)
T = TypeVar("T")

# After a step ran, how soon recording its outcome is tried again while the store is unavailable.
DURABLE_RETRY_SECONDS = 0.5
DURABLE_RETRY_MAX_SECONDS = 5.0


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
        self._wake = wake
        self._clock = clock
        self._rules = {rule.name: rule for rule in config.healing.rules}
        # Steps whose strategy is running now (a resolution may stop those, not those verifying).
        self._in_runner: set[int] = set()
        # Per open episode, set when its alert resolves, so that a verification in progress ends early.
        self._resolved: dict[int, asyncio.Event] = {}

    def in_runner(self, action_id: int) -> bool:
        """Whether the step's strategy is running now."""
        return action_id in self._in_runner

    def alert_resolved(self, episode_id: int) -> None:
        """Tell a verification in progress that the episode's alert has resolved."""
        event = self._resolved.get(episode_id)
        if event is not None:
            event.set()

    def count_skip(self, strategy: str, reason: str, outcome: Outcome = Outcome.CANCELLED) -> None:
        """Count a step that ended without running: why, and how it ended."""
        self.metrics.skipped.labels(reason).inc()
        self.metrics.actions.labels(strategy, outcome).inc()

    async def execute(self, action: Action) -> None:
        """Take a due step as far as it goes; nothing it meets is left pending or running forever.

        The step is first reserved for this replica, so that of several replicas one runs it.
        """
        replica = self.steps.replica
        if not await self.records.take(action.id, replica.name, self._clock(), replica.until()):
            return
        try:
            await self._execute_step(action)
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

    async def _execute_step(self, action: Action) -> None:
        episode = await self.records.get_episode(action.episode_id)
        assert episode is not None
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
        if await self.escalator.still_firing(episode) is False:
            detail = "Prometheus no longer reports the alert firing"
            await self._end_unrun(
                action, SkipReason.RESOLVED, Outcome.CANCELLED, EpisodeState.RESOLVED, detail, step.plan
            )
            return
        resolved = self._resolved.setdefault(episode.id, asyncio.Event())
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
        try:
            result = await self.steps.run(step, claim=claim, before_slot=silence)
        except StepRefusedError as refused:
            if refused.reason == SkipReason.CIRCUIT_OPEN:
                await self.cancel_and_escalate(
                    action, episode, SkipReason.CIRCUIT_OPEN, refused.detail, "circuit breaker open", step.plan
                )
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
        # From here a restart must not run the step again: it ran; only its verification is left.
        if not await self._durably(action, lambda: self.records.mark_verifying(action.id, result.detail, name)):
            # Fencing: this replica's claim ran out while the strategy ran and another replica has
            # settled the step; its outcome is not this replica's to record.
            log.warning("step finished after its claim was lost", extra=fields(action=action.id))
            return
        finish, still_fires = await self._judge(action, rule, episode, result, resolved, started)
        await self._durably(action, lambda: self._record_verdict(action, rule, episode, finish, still_fires))

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
        """End a step that did not run, and its episode with it, counting why."""
        self.count_skip(action.strategy, reason, outcome)
        finish = Finish(outcome=outcome, skip_reason=reason, plan=plan, episode_state=episode_state, detail=detail)
        await self.finish(action, finish)

    async def _judge(
        self,
        action: Action,
        rule: HealingRule,
        episode: Episode,
        result: StepResult,
        resolved: asyncio.Event,
        started: float,
    ) -> tuple[Finish, str | None]:
        """Verify a step that ran and count its outcome; return how it ends and, when the ladder must go
        on (or escalate), why."""
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
            return finish, f"{action.strategy} {outcome}: {result.detail}"
        try:
            verify = rule.verify
            if verify.query is not None:  # a windowed alert outlives the fault: the query says whether it is gone
                answer = await self.promql.verify_query(
                    render_query(verify.query, episode.labels),
                    verify.within,
                    verify.interval,
                    settle=verify.settle,
                    healthy_when=verify.healthy_when,
                    resolved=resolved,
                )
            else:
                answer = await self.promql.verify_resolved(
                    episode.labels, verify.within, verify.interval, settle=verify.settle, resolved=resolved
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
            return replace(base, episode_state=EpisodeState.HEALED), None
        if verdict is Outcome.UNVERIFIED:
            return replace(base, episode_state=EpisodeState.UNVERIFIED), None
        return base, "the alert still fires"

    async def _record_verdict(
        self, action: Action, rule: HealingRule, episode: Episode, finish: Finish, still_fires: str | None
    ) -> None:
        """End the episode as judged, or go on with the ladder (escalating when it is spent)."""
        if still_fires is None:
            await self.finish(action, finish)
        else:
            await self._continue_or_escalate(action, rule, episode, finish, still_fires)

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
    ) -> None:
        """End a step that a safety rail stopped, count why, and hand the episode to people."""
        self.count_skip(action.strategy, skip_reason)
        finish = Finish(outcome=Outcome.CANCELLED, skip_reason=skip_reason, detail=detail, plan=plan)
        await self._end_with_escalation(action, episode, finish, escalation_reason)

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

    async def _end_with_escalation(self, action: Action, episode: Episode, finish: Finish, reason: str) -> None:
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

    async def episode_ended(self, episode_id: int) -> None:
        """Drop what an episode held in memory and expire its silence, once it is no longer open."""
        episode = await self.records.get_episode(episode_id)
        if episode is None or episode.state is EpisodeState.OPEN:
            return
        self._resolved.pop(episode.id, None)
        await self.escalator.expire_silence(episode)
