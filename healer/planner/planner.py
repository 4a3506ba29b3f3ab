"""The planner: trend queries open goals, and one goal at a time is worked through its plan.

Each cycle runs every template's trigger query; a series with no open goal of its key opens one,
and a pending goal whose series has gone is cancelled. Then the goal in progress (or, when none
is, the highest-priority oldest pending one) is measured with its target query: reached means
completed; otherwise the next step of its plan runs once the previous one has had `settle` to
show an effect. A goal whose plan is spent without reaching the target, or whose deadline passes,
has failed. Goals, their steps and measurements live in the store, so a restart resumes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import Callable
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Gauge

from healer.config import GoalSpec, GoalTemplate, HealerConfig
from healer.cycles import Cycle
from healer.healing.steps import STOPPING, StepRefusedError, StepRunner
from healer.logs import fields
from healer.planner.model import (
    ENDED_STATES,
    Goal,
    GoalEndedError,
    GoalState,
    GoalType,
    NewGoal,
    Target,
    ended,
    goal_key,
    measured,
    started,
    step_abandoned,
    step_begun,
    step_ended,
)
from healer.promql import PrometheusUnavailableError, PromQLClient, PromQLError, render_query
from healer.storage import GoalRecords, StoreUnavailableError
from healer.storage.audit import OperatorAct
from healer.strategies.runner import AlertContext

log = logging.getLogger(__name__)

STEP_RESULTS = ("ok", "failed", "refused", "interrupted")
# How long a cancel waits for the cancelled step to stop its action, beyond the runner's own grace.
STEP_CANCEL_WAIT_SECONDS = 10.0
QUERY_KINDS = ("trigger", "target")
OPERATOR = "operator"


class PlannerMetrics:
    """The planner's metrics, every label value created up front."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.open = Gauge("healer_goals_open", "Goals pending or in progress.", ["state"], registry=registry)
        self.opened = Counter("healer_goals_opened", "Goals opened, by type.", ["type"], registry=registry)
        self.ended = Counter("healer_goals_ended", "Goals ended, by final state.", ["state"], registry=registry)
        self.progress = Gauge(
            "healer_goal_progress_ratio",
            "Progress 0-1 of the goal in progress toward its target; 0 when no goal is in progress.",
            registry=registry,
        )
        self.steps = Counter(
            "healer_goal_steps", "Steps of goals' plans that ended, by result.", ["result"], registry=registry
        )
        self.query_errors = Counter(
            "healer_planner_query_errors",
            "Trigger and target queries that Prometheus rejected or did not answer.",
            ["kind"],
            registry=registry,
        )
        for state in (GoalState.PENDING, GoalState.IN_PROGRESS):
            self.open.labels(state.value)
        for goal_type in GoalType:
            self.opened.labels(goal_type.value)
        for state in ENDED_STATES:
            self.ended.labels(state.value)
        for result in STEP_RESULTS:
            self.steps.labels(result)
        for kind in QUERY_KINDS:
            self.query_errors.labels(kind)


# Goal targets fill `{labels.NAME}` as healing rules' `verify.query` does.
render_target_query = render_query


def new_goal(
    spec: GoalSpec, name: str, source: str, labels: dict[str, str], now: float, trigger_value: float | None = None
) -> NewGoal:
    """The goal a template's series, or an operator's request, opens."""
    target = Target(render_target_query(spec.target.query, labels), spec.target.below, spec.target.above)
    return NewGoal(
        # Operators' goals have keys of their own, so that they never block a template's goals.
        key=goal_key(f"{OPERATOR}/{name}" if source == OPERATOR else source, labels),
        name=name,
        source=source,
        type=spec.type,
        priority=spec.priority,
        description=spec.description,
        labels=labels,
        target=target,
        plan=list(spec.plan),
        deadline=now + spec.deadline,
        settle=spec.settle,
        trigger_value=trigger_value,
    )


def goal_context(goal: Goal) -> AlertContext:
    """What a goal's strategy sees: the trigger series' labels, as an alert's would be."""
    return AlertContext(
        labels={**goal.labels, "goal": goal.name},
        annotations={"description": goal.description},
        fingerprint=f"goal-{goal.id}",
        starts_at=datetime.fromtimestamp(goal.created_at, UTC).isoformat(),
        status="firing",
    )


class Planner:
    """Opens goals from trend queries and works the open ones, one at a time."""

    def __init__(
        self,
        config: HealerConfig,
        records: GoalRecords,
        steps: StepRunner,
        promql: PromQLClient,
        metrics: PlannerMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.records = records
        self.steps = steps
        self.promql = promql
        self.metrics = metrics
        self._clock = clock
        self._templates = {template.name: template for template in config.planner.goals}
        self._cycle = Cycle("planner", config.planner.interval, self.cycle)
        self._step: tuple[int, asyncio.Task[None]] | None = None
        self._stopping = False

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Record steps a previous run left running as interrupted, then start the cycle.

        Only the leader works goals; a replica that becomes leader later finds such a step still
        recorded as running and closes it as failed (it may have run).
        """
        if not self.steps.replica.leader:
            goals: list[Goal] = []
        else:
            goals = await self.records.open_goals()
        for goal in goals:
            if goal.step_running:
                interrupted = functools.partial(
                    step_ended, result="interrupted", detail="healer stopped while the step ran", now=self._clock()
                )
                await self.records.change(goal.id, interrupted)
                self.metrics.steps.labels("interrupted").inc()
        if self.config.planner.enabled:
            self._cycle.start()

    async def stop(self, deadline: float) -> None:
        """Stop the cycle; a running step has until `deadline` (monotonic) and then stays for the next start."""
        self._stopping = True
        await self._cycle.stop()
        if self._step is not None:
            task = self._step[1]
            with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(asyncio.shield(task), max(0.0, deadline - time.monotonic()))
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def wake(self) -> None:
        self._cycle.wake()

    # -- one cycle -----------------------------------------------------------------------------

    async def cycle(self) -> None:
        """Run the trigger queries, then advance the goal in progress or start the next one (on the leader)."""
        if not self.steps.replica.leader:
            return
        goals = await self.records.open_goals()
        by_source: dict[str, list[Goal]] = {}
        for goal in goals:
            by_source.setdefault(goal.source, []).append(goal)
        changed = False
        for template in self._templates.values():
            changed |= await self._discover(template, by_source.get(template.name, []))
        now = self._clock()
        for goal in goals:
            # A goal in progress is measured first: reaching the target at the last moment counts.
            if goal.state is GoalState.PENDING and now >= goal.deadline:
                changed |= (
                    await self._end(goal, GoalState.FAILED, "the deadline passed before the goal could start")
                    is not None
                )
        if changed:
            goals = await self.records.open_goals()
        current = next((g for g in goals if g.state is GoalState.IN_PROGRESS), None)
        if current is None and goals and not self.steps.stopping:
            current = await self._begin(goals[0])
        if current is not None:
            await self._advance(current)
        await self._publish()

    async def _discover(self, template: GoalTemplate, open_goals: list[Goal]) -> bool:
        """Open a goal for each new series of the template's trigger, cancel pending goals whose series went;
        return whether any goal was opened or cancelled."""
        try:
            samples = await self.promql.query(template.trigger)
        except (PromQLError, PrometheusUnavailableError) as exc:
            self.metrics.query_errors.labels("trigger").inc()
            log.warning("trigger query failed", extra=fields(template=template.name, reason=str(exc)))
            return False  # an unanswered trigger says nothing about the goals it opened: leave them be
        now = self._clock()
        known = {goal.key for goal in open_goals}
        wanted: set[str] = set()
        fresh: dict[str, NewGoal] = {}
        for sample in samples:
            labels = {k: v for k, v in sample.labels.items() if k != "__name__"}
            key = goal_key(template.name, labels)
            wanted.add(key)
            # Most cycles find every series' goal open already: nothing to build, no write.
            if key not in known:
                value = sample.value if math.isfinite(sample.value) else None
                fresh[key] = new_goal(template, template.name, template.name, labels, now, value)
        if fresh:
            cooling = await self.records.ended_since(list(fresh), now - template.cooldown)
            fresh = {key: goal for key, goal in fresh.items() if key not in cooling}
        opened = await self.records.create(list(fresh.values()), now) if fresh else []
        for goal in opened:
            self.metrics.opened.labels(goal.type.value).inc()
            log.info("goal opened", extra=fields(goal=goal.id, key=goal.key, trigger_value=goal.trigger_value))
        cancelled = 0
        for goal in open_goals:
            if goal.key not in wanted and goal.state is GoalState.PENDING:
                gone = await self._end(goal, GoalState.CANCELLED, "the trigger no longer returns this series")
                cancelled += gone is not None
        return bool(opened) or cancelled > 0

    def _running(self, goal_id: int) -> bool:
        return self._step is not None and self._step[0] == goal_id and not self._step[1].done()

    async def _measure(self, goal: Goal) -> tuple[bool, float | None]:
        """Return (answered, value) of the target query; a value is None when the query returns nothing."""
        try:
            value = await self.promql.scalar(goal.target.query)
        except PromQLError as exc:
            self.metrics.query_errors.labels("target").inc()
            await self._end(goal, GoalState.FAILED, f"the target query is not usable: {exc}")
            return False, None
        except PrometheusUnavailableError as exc:
            self.metrics.query_errors.labels("target").inc()
            log.warning("target not measured", extra=fields(goal=goal.id, reason=str(exc)))
            return False, None
        return True, value if value is not None and math.isfinite(value) else None

    async def _begin(self, goal: Goal) -> Goal | None:
        answered, value = await self._measure(goal)
        if not answered:
            return None
        try:
            progress, now = goal.target.progress(value, value), self._clock()
            goal = await self.records.change(goal.id, lambda g: started(g, value, progress, now))
        except GoalEndedError:
            return None  # cancelled by an operator while this cycle ran its queries
        log.info("goal started", extra=fields(goal=goal.id, key=goal.key, value=value))
        return goal

    async def _advance(self, goal: Goal) -> None:
        running = self._running(goal.id)
        if not running:
            # The cycle's copy was read before the trigger queries; a step may have ended since.
            goal = await self.records.get(goal.id)
            if not goal.is_open:
                return
        answered, value = await self._measure(goal)
        if answered:
            initial = goal.initial_value if goal.initial_value is not None else value
            progress = goal.target.progress(initial, value)
            now = self._clock()
            await self.records.change(goal.id, lambda g: measured(g, value, progress, now))
            if value is not None and goal.target.reached(value):
                if not running:
                    await self._end(
                        goal,
                        GoalState.COMPLETED,
                        f"target reached: {goal.target.describe()} (value {value:g}) after {len(goal.steps)} step(s)",
                    )
                return
        else:
            progress = goal.progress
        if running:
            return
        if goal.step_running:
            # The step's task ended without recording how (its store write failed): it may have run,
            # so it is not run again.
            now = self._clock()
            await self.records.change(
                goal.id, lambda g: step_ended(g, "failed", "the step's outcome was not recorded", now)
            )
            self.metrics.steps.labels("failed").inc()
            return
        since_step = self._clock() - (goal.step_started_at or 0.0)
        # A step still running at the deadline gets `settle` after it ends to show its effect.
        overran = goal.step_started_at is not None and goal.step_started_at > goal.deadline
        if self._clock() >= goal.deadline and (not overran or since_step >= goal.settle):
            await self._end(
                goal,
                GoalState.FAILED,
                f"the deadline passed with the target not reached ({_percent(progress)} of the way)",
            )
            return
        if not answered or self.steps.stopping:
            return  # no step runs blind, nor once the stop has begun
        if goal.next_step < len(goal.plan):
            if goal.next_step == 0 or since_step >= goal.settle:
                self._launch(goal)
            return
        if since_step >= goal.settle:
            reached = "no data" if value is None else f"value {value:g}, {_percent(progress)} of the way"
            await self._end(goal, GoalState.FAILED, f"the plan ran out with the target not reached ({reached})")

    def _launch(self, goal: Goal) -> None:
        task = asyncio.create_task(self._run_step(goal), name=f"goal-{goal.id}-step-{goal.next_step}")
        self._step = (goal.id, task)

    async def _run_step(self, goal: Goal) -> None:
        strategy = goal.plan[goal.next_step]
        outcome = "interrupted"
        try:
            begun = self._clock()
            goal = await self.records.change(goal.id, lambda g: step_begun(g, begun))
            log.info("goal step started", extra=fields(goal=goal.id, strategy=strategy, step=goal.next_step))
            try:
                result = await self.steps.run_unattached(strategy, goal_context(goal))
            except StepRefusedError as exc:
                if exc.reason == STOPPING:
                    await self.records.change(goal.id, step_abandoned)
                    return  # not run: it runs after the restart
                outcome, detail = "refused", f"{exc.reason}: {exc.detail}"
            except asyncio.CancelledError:
                if not self._stopping:  # cancelled with its goal, which recorded the step as interrupted
                    self.metrics.steps.labels("interrupted").inc()
                raise
            except Exception as exc:  # a fault of healer's, not of the step: record it, never run it again
                log.exception("goal step failed unexpectedly", extra=fields(goal=goal.id, strategy=strategy))
                outcome, detail = "failed", f"internal error: {exc!r}"
            else:
                outcome, detail = ("ok" if result.ok else "failed"), result.detail
            now = self._clock()
            await self.records.change(goal.id, lambda g: step_ended(g, outcome, detail, now))
            self.metrics.steps.labels(outcome).inc()
            log.info("goal step finished", extra=fields(goal=goal.id, strategy=strategy, result=outcome, detail=detail))
        except GoalEndedError:
            return
        except StoreUnavailableError as exc:
            # The next cycle finds the step still recorded as running and closes it as failed.
            log.error("goal step not recorded", extra=fields(goal=goal.id, strategy=strategy, reason=str(exc)))
        finally:
            self.wake()

    async def _end(
        self, goal: Goal, state: GoalState, detail: str, act: tuple[OperatorAct, str] | None = None
    ) -> Goal | None:
        try:
            now = self._clock()
            closed = await self.records.change(goal.id, lambda g: ended(g, state, detail, now), act)
        except GoalEndedError:
            return None
        self.metrics.ended.labels(state.value).inc()
        log.info("goal ended", extra=fields(goal=goal.id, key=goal.key, state=state.value, detail=detail))
        self.wake()  # the next goal may start now rather than a cycle later
        return closed

    async def _publish(self) -> None:
        counts, progress = await self.records.open_summary()
        self.metrics.open.labels(GoalState.PENDING.value).set(counts[GoalState.PENDING])
        self.metrics.open.labels(GoalState.IN_PROGRESS.value).set(counts[GoalState.IN_PROGRESS])
        self.metrics.progress.set(progress or 0.0)

    # -- operators -----------------------------------------------------------------------------

    async def add(self, spec: GoalSpec, name: str, labels: dict[str, str], by: str) -> Goal | None:
        """Open an operator's goal, recording `by` in the audit trail; None when a goal of the same name and
        labels is open already."""
        opened = await self.records.create(
            [new_goal(spec, name, OPERATOR, labels, self._clock())], self._clock(), by=by
        )
        if not opened:
            return None
        self.metrics.opened.labels(opened[0].type.value).inc()
        self.wake()
        return opened[0]

    async def cancel(self, goal_id: int, who: str) -> Goal:
        """Cancel an open goal, stopping its running step; raises GoalNotFoundError or GoalEndedError."""
        goal = await self.records.get(goal_id)
        if not goal.is_open:
            raise GoalEndedError(f"goal {goal_id} is {goal.state.value} already")
        closed = await self._end(goal, GoalState.CANCELLED, f"cancelled by {who}", (OperatorAct.GOAL_CANCELLED, who))
        if closed is None:
            raise GoalEndedError(f"goal {goal_id} ended meanwhile")
        if self._step is not None and self._step[0] == goal_id:
            task = self._step[1]
            task.cancel()
            # The runner stops the action (a process group gets a grace period); the next goal waits for that.
            await asyncio.wait([task], timeout=STEP_CANCEL_WAIT_SECONDS)
        self.wake()
        return closed


def _percent(value: float | None) -> str:
    return "unmeasured" if value is None else f"{value:.0%}"
