"""The healing engine: inbox → episode → matched rule → safety rails → strategy → verification → ladder.

Every decision goes through the store in one transaction before it has effect, so that after a
crash the engine resumes from the store: unprocessed inbox items are processed, steps that were
running are recorded as interrupted and retried within their attempt limit.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Any

from healer.alertmanager import AlertmanagerClient, AlertmanagerUnavailableError
from healer.annotations import GrafanaAnnotator
from healer.config import HealerConfig, HealingRule
from healer.healing.metrics import HealingMetrics
from healer.healing.payload import WebhookAlert
from healer.healing.rails import CircuitBreaker, IntakePacer, backoff
from healer.logs import fields
from healer.optimizer.model import learned_confidence
from healer.promql import PrometheusUnavailableError, PromQLClient
from healer.store import (
    LEARNING_OUTCOMES,
    Action,
    ActionFilter,
    Agenda,
    AsyncStore,
    Episode,
    Escalation,
    Finish,
    InboxItem,
    NewAction,
    OpenRequest,
    StoreUnavailableError,
)
from healer.strategies.base import StrategyParams, StrategyRegistry
from healer.strategies.runner import AlertContext, StepResult, UnsafeLabelError

log = logging.getLogger(__name__)

STRATEGY_LABEL = "healer_strategy"
# While webhook deliveries keep arriving, processing the inbox gets this share of the time.
INTAKE_SHARE_UNDER_LOAD = 0.25
# After the inbox failed to process, how long before it is tried again.
INTAKE_RETRY_SECONDS = 1.0
# At shutdown, what an escalation or a silence expiry in flight may take beyond the steps' deadline.
SIDE_TASK_GRACE = 1.0
# How often silences that Alertmanager could not expire when their episode ended are tried again.
SILENCE_SWEEP_SECONDS = 30.0


# The reason of a StepRefusedError for a step that did not run because healer is stopping: not a
# skip, since the step may run after the restart.
STOPPING = "stopping"


class StepRefusedError(Exception):
    """The safety rails did not let a step run; `reason` is its `healer_skipped_total` reason, or STOPPING."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(detail)


@dataclass(frozen=True)
class Decision:
    """What the engine would do with one firing alert, without doing it."""

    rule: HealingRule | None
    ladder: list[str]
    start: int
    skip_reason: str | None
    explanation: str


def decide(
    config: HealerConfig, labels: Mapping[str, str], ladder_of: Callable[[HealingRule], list[str]] | None = None
) -> Decision:
    """Find the first rule matching the labels and the ladder position the alert starts at.

    `ladder_of` gives a rule's ladder (for `order: learned`); without it, the ladder is as configured.
    """
    rule = next((r for r in config.healing.rules if r.matches(dict(labels))), None)
    if rule is None:
        return Decision(None, [], 0, "no_rule", "no healing rule matches these labels")
    ladder = ladder_of(rule) if ladder_of is not None else rule.strategies
    wanted = labels.get(STRATEGY_LABEL)
    if wanted is None:
        return Decision(rule, ladder, 0, None, f"rule {rule.name!r} matches")
    if wanted in ladder:
        return Decision(
            rule,
            ladder,
            ladder.index(wanted),
            None,
            f"rule {rule.name!r} matches; label {STRATEGY_LABEL}={wanted!r} starts the ladder there",
        )
    return Decision(
        rule,
        ladder,
        0,
        "strategy_not_allowed",
        f"rule {rule.name!r} matches; label {STRATEGY_LABEL}={wanted!r} is not in its ladder and is ignored",
    )


def dry_run_for(config: HealerConfig, rule: HealingRule) -> bool:
    """A rule's own dry_run, when set, overrides the global one in both directions."""
    return config.healing.dry_run if rule.dry_run is None else rule.dry_run


def alert_context(episode: Episode, status: str = "firing") -> AlertContext:
    return AlertContext(
        labels=episode.labels,
        annotations=episode.annotations,
        fingerprint=episode.fingerprint,
        starts_at=episode.starts_at,
        status=status,
    )


class Engine:
    """Runs healing for the alerts the receiver has committed to the store."""

    def __init__(
        self,
        config: HealerConfig,
        store: AsyncStore,
        registry: StrategyRegistry,
        metrics: HealingMetrics,
        promql: PromQLClient,
        alertmanager: AlertmanagerClient,
        external_url: str,
        annotator: GrafanaAnnotator,
        clock: Callable[[], float] = time.time,
        intake_share: float = INTAKE_SHARE_UNDER_LOAD,
    ) -> None:
        self.config = config
        self.store = store
        self._registry = registry
        self.metrics = metrics
        self.promql = promql
        self.alertmanager = alertmanager
        self.annotator = annotator
        self.external_url = external_url.rstrip("/")
        self._clock = clock
        self._rules = {rule.name: rule for rule in config.healing.rules}
        healing = config.healing
        self.circuit = CircuitBreaker(
            healing.budget.actions, healing.budget.window, healing.circuit_reset, metrics.circuit_open, clock
        )
        self._global_slots = asyncio.Semaphore(healing.max_concurrent)
        self._strategy_slots = {
            name: asyncio.Semaphore(params.max_concurrent) for name, params in config.strategies.items()
        }
        self._wake = asyncio.Event()
        self._intake = IntakePacer(intake_share)
        self._inflight: dict[int, asyncio.Task[None]] = {}
        self._in_runner: set[int] = set()
        self._resolved: dict[int, asyncio.Event] = {}
        self._loop_task: asyncio.Task[None] | None = None
        self._stopping = False
        self._stop_deadline: float | None = None
        self._side_tasks: set[asyncio.Task[Any]] = set()
        self._sending: set[int] = set()
        self._not_firing_seen: set[int] = set()
        self._discarded_counted = 0
        # (rule, strategy) -> (healed, trials): what orders the ladders of rules with `order: learned`.
        self._outcomes: dict[tuple[str, str], tuple[int, int]] = {}
        # Alerts accepted and not yet processed; the webhook refuses deliveries at store.max_backlog.
        self.backlog = 0
        # _recover expires leftover silences at start; the sweep takes over from then on.
        self._next_silence_sweep = clock() + SILENCE_SWEEP_SECONDS
        self._sweeping = False

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Recover what a previous run left unfinished, then start the work loop."""
        await self._recover()
        self._loop_task = asyncio.create_task(self._run(), name="healing-engine")

    def begin_stop(self, timeout: float) -> None:
        """Take no new steps from now on; running ones have `timeout` seconds from now to finish."""
        if self._stop_deadline is None:
            self._stop_deadline = time.monotonic() + timeout
        self._stopping = True
        self.wake()

    @property
    def stopping(self) -> bool:
        """True once the stop has begun: no new step may start."""
        return self._stopping

    @property
    def stop_deadline(self) -> float:
        """When (monotonic) running steps must have finished; only meaningful after `begin_stop`."""
        return self._stop_deadline if self._stop_deadline is not None else time.monotonic()

    async def stop(self, timeout: float) -> None:
        """Stop: running steps get what is left of `timeout` since `begin_stop`, then are cancelled as interrupted."""
        self.begin_stop(timeout)
        assert self._stop_deadline is not None
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        running = list(self._inflight.values())
        if running:
            _, pending = await asyncio.wait(running, timeout=max(0.0, self._stop_deadline - time.monotonic()))
            for task in pending:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
        # Steps that ended during the stop may have escalated: post those now rather than at a next
        # start that may never come.
        with contextlib.suppress(Exception):
            self._send_due(await self.store.call(self.store.sync.agenda, self._clock()))
        if self._side_tasks:
            # Escalations and silence expiries stay queued in the store if cut short here.
            remaining = max(SIDE_TASK_GRACE, self._stop_deadline - time.monotonic())
            _, pending = await asyncio.wait(self._side_tasks, timeout=remaining)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)

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
        for action in await self.store.call(self.store.sync.verifying_actions):
            # The strategy ran before the stop; running it again could repeat a non-idempotent fix.
            self.metrics.actions.labels(action.strategy, "unverified").inc()
            await self._finish(
                action,
                Finish(
                    outcome="unverified",
                    detail=f"healer stopped while verifying; the step ran: {action.detail}",
                    episode_state="unverified",
                ),
            )
        for action in await self.store.call(self.store.sync.running_actions):
            rule = self._rules.get(action.rule)
            episode = await self.store.call(self.store.sync.get_episode, action.episode_id)
            assert episode is not None
            nxt = self._next_step(action, rule, same_step=True) if rule else None
            reason = "attempts exhausted after interruption"
            finish = Finish(
                outcome="interrupted",
                detail="healer stopped while the step was running",
                next_action=nxt,
                episode_state=None if nxt else "escalated",
                escalation=None if nxt else reason,
                events=[] if nxt else [("escalated", {"reason": reason})],
            )
            await self.store.call(self.store.sync.finish, action.id, finish)
            self.metrics.actions.labels(action.strategy, "interrupted").inc()
            log.warning("step interrupted by restart", extra=fields(action=action.id, strategy=action.strategy))
            if nxt is None:
                await self._count_escalation(episode, reason)
        if any(rule.order == "learned" for rule in self.config.healing.rules):
            self._outcomes = await self.store.call(self.store.sync.strategy_outcomes)
        self.backlog = await self.store.call(self.store.sync.inbox_depth)
        self.metrics.inbox_depth.set(self.backlog)
        if self.config.healing.rules:
            # The first PromQL call pays for imports and a connection (about 40 ms); pay it now, not in
            # the first heal. Without rules healer never queries, and skips the imports' 4 MB.
            self._spawn(self._warm_promql())
        horizon = self._clock() - self.config.healing.budget.window
        self.circuit.restore(await self.store.call(self.store.sync.action_starts_since, horizon))
        for episode in await self.store.call(self.store.sync.episodes_with_silences):
            await self._expire_silence(episode)

    # -- the work loop -------------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            more = False
            if not self._intake.wait():
                self._intake.start_batch()
                try:
                    more = await self._take_inbox_batch()
                except Exception:
                    log.exception("inbox processing failed; retrying in a second")
                    self._intake.end_batch()
                    self._intake.hold(INTAKE_RETRY_SECONDS)
                else:
                    self._intake.end_batch()
            try:
                # Due steps and escalations go out whatever the inbox is doing, a failing inbox included.
                agenda = await self.store.call(self.store.sync.agenda, self._clock())
                await self._expire_approvals(agenda.expired_approvals)
                delay = self._dispatch_due(agenda)
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

    async def _take_inbox_batch(self, size: int = 200) -> bool:
        """Process up to `size` inbox items in order; return whether more may be waiting."""
        items = await self.store.call(self.store.sync.unprocessed, size)
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
        discarded = self.store.sync.discarded_alerts - self._discarded_counted
        self._discarded_counted += discarded
        self.backlog -= len(items) + discarded
        self.metrics.inbox_depth.set(self.backlog)
        return len(items) == size

    def _plan_first_step(self, item: InboxItem) -> tuple[OpenRequest, Decision]:
        alert = item.alert
        decision = decide(self.config, alert.labels, self.ladder)
        received = {"alertname": alert.alertname, "delivery": item.position.delivery}
        events: list[tuple[str, dict[str, Any]]] = [("received", received)]
        first = None
        state = "unmatched"
        if decision.rule is not None and not self.config.healing.enabled:
            state = "disabled"
            events.append(("disabled", {"explanation": "healing.enabled is false; nothing runs"}))
        elif decision.rule is not None:
            rule = decision.rule
            state = "open"
            events.append(("matched", {"rule": rule.name, "explanation": decision.explanation}))
            strategy = decision.ladder[decision.start]
            first = NewAction(1, rule.strategies.index(strategy), rule.name, strategy, self._clock())
        else:
            events.append(("unmatched", {"explanation": decision.explanation}))
        rule_name = decision.rule.name if decision.rule else None
        return OpenRequest(item.position, alert, rule_name, state, first, events), decision

    async def _open_all(self, items: list[InboxItem]) -> None:
        """Open the episodes of a run of firing alerts in one store transaction."""
        if not items:
            return
        planned = [self._plan_first_step(item) for item in items]
        opened = await self.store.call(self.store.sync.open_episodes, [request for request, _ in planned])
        for (request, decision), result in zip(planned, opened, strict=True):
            if not result.created:
                self.metrics.skipped.labels("duplicate").inc()
                continue
            if request.state == "disabled":
                self.metrics.skipped.labels("disabled").inc()
            elif decision.skip_reason is not None:
                self.metrics.skipped.labels(decision.skip_reason).inc()
            if result.deferred_until is not None:
                self.metrics.skipped.labels("cooldown").inc()
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
        episode, cancelled, running = await self.store.call(self.store.sync.resolve_episode, item.position, item.alert)
        if episode is None:
            return
        for action in cancelled:
            self.metrics.actions.labels(action.strategy, "cancelled").inc()
            self.metrics.skipped.labels("resolved").inc()
        event = self._resolved.get(episode.id)
        if event is not None:
            event.set()
        rule = self._rules.get(episode.rule or "")
        for action in running:
            task = self._inflight.get(action.id)
            if (
                task is not None
                and rule is not None
                and rule.cancel_running_on_resolve
                and action.id in self._in_runner
            ):
                task.cancel()
        if episode.state != "open":
            await self._expire_silence(episode)

    async def _expire_approvals(self, expired: list[Action]) -> None:
        for action in expired:
            episode = await self.store.call(self.store.sync.get_episode, action.episode_id)
            assert episode is not None
            await self._cancel_and_escalate(
                action, episode, "approval_expired", "nobody approved the step in time", "approval expired"
            )

    def _dispatch_due(self, agenda: Agenda) -> float:
        """Start every due step; return how long the loop may sleep before the next one is due."""
        if self._stopping:
            return 1.0
        for action in agenda.due:
            if action.id not in self._inflight:
                task = asyncio.create_task(self._execute(action), name=f"action-{action.id}")
                self._inflight[action.id] = task
                task.add_done_callback(functools.partial(self._forget, action.id))
        self._send_due(agenda)
        if self._clock() >= self._next_silence_sweep and not self._sweeping:
            self._next_silence_sweep = self._clock() + SILENCE_SWEEP_SECONDS
            self._sweeping = True
            self._spawn(self._sweep_silences())
        if agenda.next_wake is None:
            return 5.0
        return max(0.01, min(5.0, agenda.next_wake - self._clock()))

    def _count_skip(self, strategy: str, reason: str, outcome: str = "cancelled") -> None:
        """Count a step that ended without running: why, and how it ended."""
        self.metrics.skipped.labels(reason).inc()
        self.metrics.actions.labels(strategy, outcome).inc()

    def _forget(self, action_id: int, _task: asyncio.Task[None]) -> None:
        self._inflight.pop(action_id, None)

    # -- steps that no alert asked for ---------------------------------------------------------

    async def run_unattached(self, strategy: str, context: AlertContext) -> StepResult:
        """Run a named strategy for a goal under the rails of healing: dry run, budget and concurrency.

        Raises StepRefusedError, counted in `healer_skipped_total`, when a rail stops it.
        """
        params = self.config.strategies.get(strategy)
        if params is None:
            self.metrics.skipped.labels("disabled").inc()
            raise StepRefusedError("disabled", f"strategy {strategy!r} is not configured")
        runner = self._registry.get(params.type).runner
        try:
            plan = runner.plan(params, context)
        except UnsafeLabelError as exc:
            self.metrics.skipped.labels("unsafe_label").inc()
            raise StepRefusedError("unsafe_label", f"unsafe label: {exc}") from None
        if self.config.healing.dry_run:
            self.metrics.skipped.labels("dry_run").inc()
            raise StepRefusedError("dry_run", "dry run: would have run " + json.dumps(plan)[:300])
        if self._stopping:
            raise StepRefusedError(STOPPING, "healer is stopping")
        if not self.circuit.acquire():
            self.metrics.skipped.labels("circuit_open").inc()
            raise StepRefusedError("circuit_open", "the action budget is spent; the circuit breaker is open")
        slots = self._strategy_slots.setdefault(strategy, asyncio.Semaphore(params.max_concurrent))
        if self._global_slots.locked() or slots.locked():
            self.metrics.skipped.labels("concurrency").inc()
        async with self._global_slots, slots:
            if self._stopping:  # the stop began while this step waited for a slot
                raise StepRefusedError(STOPPING, "healer is stopping")
            started = time.monotonic()
            self.metrics.running.inc()
            try:
                return await runner.run(params, context)  # type: ignore[no-any-return]
            except UnsafeLabelError as exc:
                return StepResult(ok=False, detail=f"unsafe label: {exc}")
            finally:
                self.metrics.running.dec()
                self.metrics.action_duration.labels(strategy).observe(time.monotonic() - started)

    # -- one step ------------------------------------------------------------------------------

    def _next_step(
        self, action: Action, rule: HealingRule | None, *, same_step: bool = False, tried: Collection[str] = ()
    ) -> NewAction | None:
        """The step after `action`: the same one again, the next rung, or (learned order) the best untried one."""
        if rule is None or action.attempt >= rule.max_attempts:
            return None
        delay = 0.0 if same_step else backoff(rule, action.attempt)
        if action.strategy not in rule.strategies:  # the config changed since: keep the position
            step = min(action.step, len(rule.strategies) - 1)
        elif same_step:
            step = rule.strategies.index(action.strategy)
        elif rule.order == "learned":
            untried = [name for name in self.ladder(rule) if name not in tried]
            # Like the configured ladder, the last rung repeats once every strategy has had its turn.
            step = rule.strategies.index(untried[0] if untried else action.strategy)
        else:
            step = min(action.step + 1, len(rule.strategies) - 1)
        return NewAction(action.attempt + 1, step, rule.name, rule.strategies[step], self._clock() + delay)

    # -- learned order -------------------------------------------------------------------------

    def strategy_confidence(self, rule: str, strategy: str) -> tuple[float, int, int]:
        """(confidence, healed, trials) of a rule's strategy: an even prior moved by the steps' outcomes."""
        healed, trials = self._outcomes.get((rule, strategy), (0, 0))
        return learned_confidence(0.5, self.config.optimizer.prior_weight, healed, trials), healed, trials

    def ladder(self, rule: HealingRule) -> list[str]:
        """A rule's ladder: as configured, or for `order: learned` by confidence, ties in configured order."""
        if rule.order != "learned":
            return rule.strategies
        return sorted(rule.strategies, key=lambda name: -self.strategy_confidence(rule.name, name)[0])

    def _learn(self, action: Action, outcome: str) -> None:
        if outcome in LEARNING_OUTCOMES:
            healed, trials = self._outcomes.get((action.rule, action.strategy), (0, 0))
            self._outcomes[(action.rule, action.strategy)] = (healed + (outcome == "healed"), trials + 1)

    async def _execute(self, action: Action) -> None:
        try:
            await self._execute_step(action)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("step failed unexpectedly", extra=fields(action=action.id))
            # Leave nothing pending or running forever: end the step and hand the episode to people.
            with contextlib.suppress(Exception):
                episode = await self.store.call(self.store.sync.get_episode, action.episode_id)
                if episode is not None:
                    self._learn(action, "failed")  # as the store records it, so a restart learns the same
                    self.metrics.actions.labels(action.strategy, "failed").inc()
                    await self._end_with_escalation(
                        action,
                        episode,
                        Finish(outcome="failed", detail=f"internal error: {exc!r}"),
                        f"internal error: {exc!r}",
                    )

    async def _execute_step(self, action: Action) -> None:
        store = self.store
        episode = await store.call(store.sync.get_episode, action.episode_id)
        assert episode is not None
        rule = self._rules.get(action.rule)
        params = self.config.strategies.get(action.strategy)
        if rule is None or params is None:
            detail = f"rule {action.rule!r} or strategy {action.strategy!r} is no longer configured"
            await self._cancel_and_escalate(action, episode, "disabled", detail, "configuration changed")
            return
        runner = self._registry.get(params.type).runner
        alert = alert_context(episode)
        try:
            plan = runner.plan(params, alert)
        except UnsafeLabelError as exc:
            self._count_skip(action.strategy, "unsafe_label", "cancelled")
            log.warning("unsafe label", extra=fields(action=action.id, reason=str(exc)))
            await self._continue_or_escalate(
                action,
                rule,
                episode,
                Finish(outcome="cancelled", skip_reason="unsafe_label", detail=str(exc)),
                reason=f"unsafe label: {exc}",
            )
            return
        if dry_run_for(self.config, rule):
            self._count_skip(action.strategy, "dry_run", "dry_run")
            await self._finish(
                action,
                Finish(
                    outcome="dry_run",
                    skip_reason="dry_run",
                    plan=plan,
                    episode_state="dry_run",
                    detail="dry run: recorded what would have run",
                ),
            )
            return
        if params.approval == "required" and not action.approved:
            deadline = self._clock() + self.config.healing.approval_timeout
            if await store.call(store.sync.await_approval, action.id, deadline, plan):
                self.metrics.skipped.labels("approval_pending").inc()
                self.wake()
            return
        firing = await self._still_firing(episode)
        if firing is False:
            self._count_skip(action.strategy, "resolved", "cancelled")
            await self._finish(
                action,
                Finish(
                    outcome="cancelled",
                    skip_reason="resolved",
                    episode_state="resolved",
                    plan=plan,
                    detail="Prometheus no longer reports the alert firing",
                ),
            )
            await self._episode_ended(episode.id)
            return
        if not self.circuit.acquire():
            detail = "the action budget is spent; the circuit breaker is open"
            await self._cancel_and_escalate(action, episode, "circuit_open", detail, "circuit breaker open", plan)
            return
        if rule.silence and episode.silence_id is None:
            episode = await self._silence(episode, rule)
        slots = self._strategy_slots.setdefault(action.strategy, asyncio.Semaphore(params.max_concurrent))
        if self._global_slots.locked() or slots.locked():
            self.metrics.skipped.labels("concurrency").inc()
        resolved = self._resolved.setdefault(episode.id, asyncio.Event())
        # Slots are held while the strategy runs, not while verification waits on Prometheus.
        async with self._global_slots, slots:
            if self._stopping:
                return  # the step stays pending and runs after the restart
            if not await store.call(store.sync.claim, action.id, plan):
                await self._episode_ended(episode.id)  # cancelled meanwhile: release its silence
                return
            started = self._clock()
            result = await self._run_strategy(action, rule, params, episode)
        # From here a restart must not run the step again: it ran; only its verification is left.
        await store.call(store.sync.mark_verifying, action.id, result.detail)
        await self._conclude(action, rule, episode, result, resolved, started)

    async def _run_strategy(
        self, action: Action, rule: HealingRule, params: StrategyParams, episode: Episode
    ) -> StepResult:
        runner = self._registry.get(params.type).runner
        started = time.monotonic()
        self.metrics.running.inc()
        self._in_runner.add(action.id)
        log.info(
            "step started",
            extra=fields(action=action.id, rule=rule.name, strategy=action.strategy, attempt=action.attempt),
        )
        try:
            return await runner.run(params, alert_context(episode))  # type: ignore[no-any-return]
        except asyncio.CancelledError:
            # On shutdown the step stays "running" in the store; the next start records it as
            # interrupted and retries it, exactly as after a crash.
            if not self._stopping:
                self.metrics.actions.labels(action.strategy, "cancelled").inc()
                await self._finish(
                    action,
                    Finish(
                        outcome="cancelled",
                        skip_reason="resolved",
                        episode_state="resolved",
                        detail="the alert resolved while the step ran; the step was stopped",
                    ),
                )
            raise
        except UnsafeLabelError as exc:
            return StepResult(ok=False, detail=f"unsafe label: {exc}")
        finally:
            self._in_runner.discard(action.id)
            self.metrics.running.dec()
            self.metrics.action_duration.labels(action.strategy).observe(time.monotonic() - started)

    async def _conclude(
        self,
        action: Action,
        rule: HealingRule,
        episode: Episode,
        result: StepResult,
        resolved: asyncio.Event,
        started: float,
    ) -> None:
        """Verify a step that ran, then end the episode or schedule the next step of the ladder."""
        cooldown = (self._clock() + backoff(rule, action.attempt), action.attempt)
        if not result.ok:
            outcome = "timeout" if result.timed_out else "failed"
            self._learn(action, outcome)
            self.metrics.actions.labels(action.strategy, outcome).inc()
            self._annotate(action, episode, outcome, result.detail, started)
            await self._continue_or_escalate(
                action,
                rule,
                episode,
                Finish(
                    outcome=outcome,
                    detail=result.detail,
                    exit_code=result.exit_code,
                    output=result.output,
                    cooldown=cooldown,
                ),
                reason=f"{action.strategy} {outcome}: {result.detail}",
            )
            return
        try:
            verdict = await self.promql.verify_resolved(
                episode.labels, rule.verify.within, rule.verify.interval, resolved=resolved
            )
        except ValueError:  # a label name PromQL cannot express: the outcome cannot be proven
            verdict = "unverified"
        self._learn(action, verdict)
        self.metrics.actions.labels(action.strategy, verdict).inc()
        self._annotate(action, episode, verdict, result.detail, started)
        base = Finish(
            outcome=verdict, detail=result.detail, exit_code=result.exit_code, output=result.output, cooldown=cooldown
        )
        log.info("step verified", extra=fields(action=action.id, strategy=action.strategy, outcome=verdict))
        if verdict == "healed":
            self.metrics.time_to_heal.observe(max(0.0, self._clock() - episode.starts_at_epoch))
            await self._finish(action, replace(base, episode_state="healed"))
        elif verdict == "unverified":
            await self._finish(action, replace(base, episode_state="unverified"))
        else:
            await self._continue_or_escalate(action, rule, episode, base, reason="the alert still fires")

    def _annotate(self, action: Action, episode: Episode, outcome: str, detail: str, started: float) -> None:
        """Mark the step on Grafana's graphs, from its start to now, without waiting for Grafana."""
        if self.annotator.enabled:
            text = f"healer ran {action.strategy} for {episode.alertname} (rule {action.rule}): {outcome}, {detail}"
            tags = [f"strategy:{action.strategy}", f"outcome:{outcome}", f"alertname:{episode.alertname}"]
            self._spawn(self.annotator.annotate(text, tags, started))

    async def _finish(self, action: Action, finish: Finish) -> bool:
        """Record how a step ended; when that closed its episode, end the episode's silence too."""
        done = await self.store.call(self.store.sync.finish, action.id, finish)
        await self._episode_ended(action.episode_id)
        return done

    async def _continue_or_escalate(
        self, action: Action, rule: HealingRule, episode: Episode, finish: Finish, reason: str
    ) -> None:
        tried: set[str] = set()
        if rule.order == "learned":
            tried = await self.store.call(self.store.sync.tried_strategies, episode.id)
        nxt = self._next_step(action, rule, tried=tried)
        if nxt is not None:
            await self._finish(action, replace(finish, next_action=nxt))
            self.wake()
            return
        if action.attempt >= rule.max_attempts:
            self.metrics.skipped.labels("max_attempts").inc()
        await self._end_with_escalation(action, episode, finish, reason)

    async def _cancel_and_escalate(
        self,
        action: Action,
        episode: Episode,
        skip_reason: str,
        detail: str,
        escalation_reason: str,
        plan: dict[str, Any] | None = None,
    ) -> None:
        """End a step that a safety rail stopped, count why, and hand the episode to people."""
        self._count_skip(action.strategy, skip_reason, "cancelled")
        finish = Finish(outcome="cancelled", skip_reason=skip_reason, detail=detail, plan=plan)
        await self._end_with_escalation(action, episode, finish, escalation_reason)

    async def _end_with_escalation(self, action: Action, episode: Episode, finish: Finish, reason: str) -> None:
        done = await self._finish(
            action,
            replace(finish, episode_state="escalated", escalation=reason, events=[("escalated", {"reason": reason})]),
        )
        if done:
            await self._count_escalation(episode, reason)

    async def _count_escalation(self, episode: Episode, reason: str) -> None:
        """Count and log an escalation the store has queued; the work loop sends HealingFailed."""
        # A resolved notification may have won the race; then the store queued nothing and nobody is paged.
        if await self.store.call(self.store.sync.get_escalation, episode.id) is None:
            return
        self.metrics.escalations.inc()
        log.warning("escalating", extra=fields(episode=episode.id, alertname=episode.alertname, reason=reason))
        self.wake()

    def _send_due(self, agenda: Agenda) -> None:
        """Start posting every due HealingFailed that is not being posted already."""
        for escalation in agenda.escalations:
            if escalation.episode_id not in self._sending:
                self._sending.add(escalation.episode_id)
                self._spawn(self._send_escalation(escalation))

    async def _send_escalation(self, queued: Escalation) -> None:
        """Post the HealingFailed of an escalated episode: firing while its alert fires, then resolved once."""
        episode_id = queued.episode_id
        try:
            # The agenda may be older than a send that just finished; the row says what is due now.
            escalation = await self.store.call(self.store.sync.get_escalation, episode_id)
            episode = await self.store.call(self.store.sync.get_episode, episode_id)
            now = self._clock()
            if escalation is None or episode is None or escalation.next_send is None or escalation.next_send > now:
                return
            if escalation.resolved_at is not None and escalation.sent_at is None:
                await self.store.call(self.store.sync.escalation_withdrawn, episode_id)
                return
            await self._post_escalation(escalation, episode)
        except Exception:
            # Anything unexpected waits like a failed post, so that a bug cannot turn into a flood of posts.
            log.exception("HealingFailed not sent", extra=fields(episode=episode_id))
            with contextlib.suppress(Exception):
                retry = self._clock() + self.config.alertmanager.resend_interval
                await self.store.call(self.store.sync.escalation_failed, episode_id, retry, "internal error")
        finally:
            self._sending.discard(episode_id)
            self.wake()

    async def _post_escalation(self, escalation: Escalation, episode: Episode) -> None:
        episode_id = episode.id
        resolved_at = escalation.resolved_at
        if resolved_at is None and escalation.sent_at is not None:
            # Alertmanager may never send the resolved notification (send_resolved: false). One empty
            # answer can be a gap in ALERTS (a Prometheus restart); two in a row, an interval apart, are not.
            if await self._still_firing(episode) is False:
                if episode_id in self._not_firing_seen:
                    await self.store.call(self.store.sync.escalation_stopped_firing, episode_id)
                    resolved_at = self._clock()
                self._not_firing_seen.add(episode_id)
            else:
                self._not_firing_seen.discard(episode_id)
        tried = await self.store.call(self.store.sync.list_actions, ActionFilter(episode_id=episode_id, limit=1000))
        resend = self.config.alertmanager.resend_interval
        now = self._clock()
        alert = AlertmanagerClient.healing_failed_alert(
            episode.labels,
            episode.annotations,
            rule=escalation.rule,
            episode=episode_id,
            strategies_tried=[action.strategy for action, _ in reversed(tried)],
            audit_url=f"{self.external_url}/api/v1/actions?episode={episode_id}",
            reason=escalation.reason,
            starts_at=datetime.fromtimestamp(escalation.created_at, UTC),
            ends_at=datetime.fromtimestamp(resolved_at if resolved_at is not None else now + 4 * resend, UTC),
        )
        try:
            await self.alertmanager.post_alerts([alert])
        except AlertmanagerUnavailableError as exc:
            self.metrics.escalation_failures.inc()
            # A first post that Alertmanager refuses will be refused again. A re-send is never given up:
            # the alert was valid once, and giving up would let the page expire while the alert fires.
            refused = (
                escalation.sent_at is None
                and exc.status is not None
                and 400 <= exc.status < 500
                and exc.status not in (408, 429)
            )
            log.error(
                "HealingFailed not delivered", extra=fields(episode=episode_id, reason=str(exc), giving_up=refused)
            )
            retry = None if refused else now + min(resend, 2.0 ** min(escalation.failures, 10))
            await self.store.call(self.store.sync.escalation_failed, episode_id, retry, str(exc))
            return
        if resolved_at is not None:
            self._not_firing_seen.discard(episode_id)
        await self.store.call(
            self.store.sync.escalation_sent, episode_id, None if resolved_at is not None else now + resend
        )

    async def _sweep_silences(self) -> None:
        """Expire the silences of ended episodes that Alertmanager could not take before."""
        try:
            for episode in await self.store.call(self.store.sync.episodes_with_silences):
                await self._expire_silence(episode)
        except StoreUnavailableError as exc:
            log.error("silence sweep failed", extra=fields(reason=str(exc)))
        finally:
            self._sweeping = False

    def _spawn(self, coroutine: Any) -> None:
        task = asyncio.create_task(coroutine)
        self._side_tasks.add(task)
        task.add_done_callback(self._side_tasks.discard)

    async def _warm_promql(self) -> None:
        with contextlib.suppress(PrometheusUnavailableError, ValueError):
            await self.promql.alert_firing({"alertname": "HealerWarmUp"})

    async def _still_firing(self, episode: Episode) -> bool | None:
        try:
            return await self.promql.alert_firing(episode.labels)
        except (PrometheusUnavailableError, ValueError):  # ValueError: a label name PromQL cannot express
            return None

    async def _silence(self, episode: Episode, rule: HealingRule) -> Episode:
        # Long enough for every attempt to run, verify and back off; it is expired when the episode ends.
        longest_step = max((self.config.strategies[name].timeout for name in rule.strategies), default=0.0)
        duration = (longest_step + rule.verify.within + rule.max_backoff) * rule.max_attempts
        try:
            silence_id = await self.alertmanager.create_silence(
                episode.labels, duration, comment=f"healer is healing episode {episode.id} (rule {rule.name})"
            )
        except AlertmanagerUnavailableError as exc:
            log.error("silence not created", extra=fields(episode=episode.id, reason=str(exc)))
            return episode
        await self.store.call(self.store.sync.set_silence, episode.id, silence_id)
        refreshed = await self.store.call(self.store.sync.get_episode, episode.id)
        assert refreshed is not None
        return refreshed

    async def _episode_ended(self, episode_id: int) -> None:
        """Drop what an episode held in memory and expire its silence, once it is no longer open."""
        episode = await self.store.call(self.store.sync.get_episode, episode_id)
        if episode is None or episode.state == "open":
            return
        self._resolved.pop(episode.id, None)
        await self._expire_silence(episode)

    async def _expire_silence(self, episode: Episode) -> None:
        if episode.silence_id is None:
            return
        try:
            await self.alertmanager.expire_silence(episode.silence_id)
        except AlertmanagerUnavailableError as exc:
            log.error("silence not expired", extra=fields(episode=episode.id, reason=str(exc)))
            return
        await self.store.call(self.store.sync.set_silence, episode.id, None)

    # -- operator actions ----------------------------------------------------------------------

    async def approve(self, action_id: int, approver: str) -> bool:
        approved = await self.store.call(self.store.sync.approve, action_id, approver)
        if approved:
            self.wake()
        return approved

    def close_circuit(self) -> None:
        self.circuit.close()
        self.wake()


def first_plans(config: HealerConfig, registry: StrategyRegistry, alert: WebhookAlert) -> dict[str, Any]:
    """Describe what the engine would run for one alert, for `healer test-alert`."""
    decision = decide(config, alert.labels)
    report: dict[str, Any] = {
        "alertname": alert.alertname,
        "status": alert.status,
        "fingerprint": alert.fingerprint,
        "rule": decision.rule.name if decision.rule else None,
        "explanation": decision.explanation,
        "skip_reason": decision.skip_reason,
        "ladder": [],
    }
    if decision.rule is None or alert.status != "firing":
        if alert.status != "firing":
            report["explanation"] = "resolved notification: cancels the pending steps of its episode"
        return report
    if decision.rule.order == "learned":
        report["explanation"] += "; order: learned, so healer puts first what has healed most (shown as configured)"
    context = AlertContext(alert.labels, alert.annotations, alert.fingerprint, alert.starts_at, alert.status)
    dry_run = dry_run_for(config, decision.rule)
    for name in decision.ladder[decision.start :]:
        params = config.strategies[name]
        entry: dict[str, Any] = {"strategy": name, "type": params.type, "dry_run": dry_run, "approval": params.approval}
        try:
            entry["plan"] = registry.get(params.type).runner.plan(params, context)
        except UnsafeLabelError as exc:
            entry["skip_reason"] = "unsafe_label"
            entry["error"] = str(exc)
        report["ladder"].append(entry)
    return report
