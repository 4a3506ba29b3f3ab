"""The optimizer: try the best-scoring confident candidate, measure it, keep it or roll it back.

Each cycle, when no trial is in flight, the candidates that are ready (confidence at least
`min_confidence`, not kept already, not cooling down after a trial that was not kept, and a
quiet `settle + window` since the last trial of any candidate) are taken in order of score,
expected improvement / cost x confidence. The first whose metric has data is measured (its
average over `window`), applied, and `settle + window` later measured again over the last
`window`. A change that helped by more than `min_improvement` is kept; otherwise the verdict is
recorded first and the rollback runs, so that a trial cut off during its rollback is rolled back
again, never judged again. Outcomes teach the confidence: the prior counts as `prior_weight`
trials, each kept trial as a success. Trials live in the store, so a restart resumes them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge

from healer.config import HealerConfig, OptimizationCandidate
from healer.cycles import Cycle
from healer.healing.learning import learned_confidence
from healer.healing.model import SkipReason
from healer.healing.steps import STOPPING, StepRefusedError, StepRunner
from healer.logs import fields
from healer.optimizer.model import ENDED, Outcome, Trial, improvement, score
from healer.promql import PrometheusUnavailableError, PromQLClient, PromQLError
from healer.storage import TrialRecords
from healer.strategies.runner import AlertContext

log = logging.getLogger(__name__)

# Where a candidate stands. The first three are the trial in flight; the rest are checked in this order.
STATES = (
    "applying",
    "measuring",
    "rolling_back",
    "rollback_failed",
    "kept",
    "cooldown",
    "below_confidence",
    "waiting",
    "ready",
)
# Refusals that pass by themselves: a rollback refused for one of them is tried again next cycle.
PASSING_REFUSALS = (STOPPING, SkipReason.CIRCUIT_OPEN, SkipReason.DRY_RUN)


class OptimizerMetrics:
    """The optimizer's metrics, every label value created up front."""

    def __init__(self, registry: CollectorRegistry, candidates: list[OptimizationCandidate]) -> None:
        self.trials = Counter(
            "healer_optimizations", "Optimisation trials ended, by outcome.", ["outcome"], registry=registry
        )
        self.confidence = Gauge(
            "healer_optimization_confidence",
            "Learned confidence 0-1 that a candidate's change helps.",
            ["candidate"],
            registry=registry,
        )
        self.in_flight = Gauge(
            "healer_optimization_in_flight",
            "1 while a change is being applied, measured or rolled back.",
            registry=registry,
        )
        self.query_errors = Counter(
            "healer_optimizer_query_errors",
            "Measurements of a candidate's metric that Prometheus rejected or did not answer.",
            registry=registry,
        )
        for outcome in ENDED:
            self.trials.labels(outcome.value)
        for candidate in candidates:
            self.confidence.labels(candidate.name).set(candidate.confidence)


@dataclass(frozen=True)
class CandidateView:
    """A configured candidate with what its trials taught."""

    candidate: OptimizationCandidate
    confidence: float
    score: float
    trials: int
    helped: int
    state: str
    ready_at: float | None

    def to_json(self) -> dict[str, Any]:
        c = self.candidate
        return {
            "name": c.name,
            "component": c.component,
            "metric": c.metric,
            "direction": c.direction,
            "apply": c.apply,
            "rollback": c.rollback,
            "expected_improvement": c.expected_improvement,
            "cost": c.cost,
            "prior_confidence": c.confidence,
            "confidence": self.confidence,
            "score": self.score,
            "trials": self.trials,
            "helped": self.helped,
            "state": self.state,
            "ready_at": self.ready_at,
        }


def window_average(metric: str, window: float) -> str:
    """The PromQL average of `metric` over the last `window` seconds, as a subquery."""
    return f"avg_over_time(({metric})[{max(1, round(window * 1000))}ms:])"


class Optimizer:
    """Tries candidate changes one at a time and learns which ones help."""

    def __init__(
        self,
        config: HealerConfig,
        records: TrialRecords,
        steps: StepRunner,
        promql: PromQLClient,
        metrics: OptimizerMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.records = records
        self.steps = steps
        self.promql = promql
        self.metrics = metrics
        self._clock = clock
        self._candidates = {c.name: c for c in config.optimizer.candidates}
        self._cycle = Cycle("optimizer", config.optimizer.interval, self.cycle)
        # True while a strategy runs, so that a stop lets the change finish instead of cutting it in half.
        self._busy = False

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Settle what a previous run left in flight (on the leader), then start the cycle."""
        trial = await self.records.in_flight() if self.steps.replica.leader else None
        if trial is not None:
            self.metrics.in_flight.set(1)
            if trial.candidate not in self._candidates:
                await self._end(trial, Outcome.UNMEASURED, "the candidate is no longer configured; nothing rolled back")
            elif self.config.optimizer.enabled and trial.outcome is Outcome.APPLYING:
                await self._roll_back(trial, Outcome.UNMEASURED, "healer stopped while applying the change")
        await self.candidates()  # the confidence gauges show what was learned, from the first scrape
        if self.config.optimizer.enabled and self._candidates:
            self._cycle.start()

    async def stop(self, deadline: float) -> None:
        """Stop the cycle; a strategy running gets until `deadline` (monotonic); a trial in flight resumes later."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._quiet(), max(0.0, deadline - time.monotonic()))
        await self._cycle.stop()

    async def _quiet(self) -> None:
        """Wait until the cycle is not in the middle of a strategy run."""
        while self._busy:
            await asyncio.sleep(0.05)

    def wake(self) -> None:
        self._cycle.wake()

    # -- what the candidates stand at ----------------------------------------------------------

    async def candidates(self) -> list[CandidateView]:
        """Every configured candidate with its learned confidence, score and state, best score first."""
        records = await self.records.records()
        last_ended = await self.records.last_ended()
        settings = self.config.optimizer
        now = self._clock()
        views = []
        for c in self._candidates.values():
            record = records.get(c.name)
            trials, helped = (record.trials, record.helped) if record else (0, 0)
            last = record.last if record else None
            confidence = learned_confidence(c.confidence, settings.prior_weight, helped, trials)
            # The "before" of a new trial must not overlap the last trial's change or its rollback.
            quiet_at = None if last_ended is None else last_ended + c.settle + c.window
            ready_at: float | None = None
            state: str
            if last is not None and last.outcome.value in STATES[:3]:
                state = last.outcome.value
            elif last is not None and last.outcome is Outcome.ROLLBACK_FAILED and last.acknowledged_at is None:
                state = "rollback_failed"
            elif last is not None and last.outcome is Outcome.KEPT:
                state = "kept"
            elif last is not None and last.ended_at is not None and now < last.ended_at + c.cooldown:
                state, ready_at = "cooldown", last.ended_at + c.cooldown
            elif confidence < settings.min_confidence:
                state = "below_confidence"
            elif quiet_at is not None and now < quiet_at:
                state, ready_at = "waiting", quiet_at
            else:
                state = "ready"
            value = score(c.expected_improvement, c.cost, confidence)
            views.append(CandidateView(c, confidence, value, trials, helped, state, ready_at))
            self.metrics.confidence.labels(c.name).set(confidence)
        return sorted(views, key=lambda v: (-v.score, v.candidate.name))

    # -- one cycle -----------------------------------------------------------------------------

    async def cycle(self) -> None:
        """Go on with the trial in flight, or else start the best ready candidate (on the leader)."""
        if not self.steps.replica.leader:
            return
        trial = await self.records.in_flight()
        self.metrics.in_flight.set(0 if trial is None else 1)
        if self.steps.stopping or self._busy:
            return  # a trial in flight resumes after the restart
        if trial is not None:
            if trial.outcome is Outcome.APPLYING:
                # An earlier cycle failed between applying and recording it; how far it got is unknown.
                await self._roll_back(trial, Outcome.UNMEASURED, "the apply's outcome was not recorded")
            elif trial.outcome is Outcome.ROLLING_BACK:
                await self._run_rollback(trial)
            elif self._clock() >= (trial.measure_at or 0.0):
                await self._judge(trial)
            return
        for view in await self.candidates():
            if view.state == "ready" and await self._try(view):
                return

    async def _measure(self, candidate: OptimizationCandidate) -> tuple[bool, float | None]:
        """(answered, average over the window); the average is None when the metric has no data."""
        try:
            value = await self.promql.scalar(window_average(candidate.metric, candidate.window))
        except (PromQLError, PrometheusUnavailableError) as exc:
            self.metrics.query_errors.inc()
            log.warning("candidate not measured", extra=fields(candidate=candidate.name, reason=str(exc)))
            return False, None
        return True, value if value is not None and math.isfinite(value) else None

    async def _run_strategy(self, strategy: str, candidate: OptimizationCandidate) -> tuple[bool, str, str | None]:
        """Run apply or rollback under the rails: (succeeded, detail, the refusal's reason or None)."""
        context = AlertContext(
            labels={"candidate": candidate.name, "component": candidate.component},
            annotations={},
            fingerprint=f"optimization-{candidate.name}",
            starts_at="",
            status="firing",
        )
        self._busy = True
        try:
            result = await self.steps.run_unattached(strategy, context)
        except StepRefusedError as exc:
            return False, f"refused ({exc.reason}): {exc.detail}", exc.reason
        finally:
            self._busy = False
        return result.ok, result.detail, None

    async def _try(self, view: CandidateView) -> bool:
        """Measure, then apply one candidate; False when its metric has no data now."""
        c = view.candidate
        answered, before = await self._measure(c)
        if not answered or before is None:
            return False
        trial = await self.records.begin(c.name, c.component, view.confidence, view.score, before, self._clock()
        )
        self.metrics.in_flight.set(1)
        log.info("optimization applying", extra=fields(candidate=c.name, before=before, score=view.score))
        ok, detail, refusal = await self._run_strategy(c.apply, c)
        if refusal == STOPPING:
            await self.records.discard(trial.id)  # nothing ran; it is tried after the restart
            self.metrics.in_flight.set(0)
            return True
        if not ok:
            await self._end(trial, Outcome.APPLY_FAILED, f"{c.apply} did not apply: {detail}")
            return True
        measure_at = self._clock() + c.settle + c.window
        await self.records.measuring(trial.id, measure_at, f"{c.apply}: {detail}")
        return True

    async def _judge(self, trial: Trial) -> None:
        c = self._candidates.get(trial.candidate)
        if c is None:
            await self._end(trial, Outcome.UNMEASURED, "the candidate is no longer configured; nothing rolled back")
            return
        answered, after = await self._measure(c)
        if not answered:
            if self._clock() < (trial.measure_at or 0.0) + c.window:
                return  # Prometheus may answer at the next cycle
            await self._roll_back(trial, Outcome.UNMEASURED, "Prometheus did not answer the measurement")
            return
        if after is None or trial.before is None:
            await self._roll_back(trial, Outcome.UNMEASURED, "the metric had no data after the change")
            return
        gain = improvement(trial.before, after, c.direction)
        verdict = f"{c.metric} averaged {trial.before:g} before and {after:g} after ({_signed_percent(gain)})"
        if gain > c.min_improvement:
            await self._end(trial, Outcome.KEPT, f"kept: {verdict}", after, gain)
        else:
            await self._roll_back(trial, Outcome.ROLLED_BACK, f"no help: {verdict}", after, gain)

    async def _roll_back(
        self, trial: Trial, verdict: Outcome, why: str, after: float | None = None, gain: float | None = None
    ) -> None:
        trial = await self.records.rolling_back(trial.id, verdict, why, after, gain)
        await self._run_rollback(trial)

    async def _run_rollback(self, trial: Trial) -> None:
        """Run the rollback of a trial whose verdict is recorded; a refusal that passes is retried next cycle."""
        c = self._candidates.get(trial.candidate)
        if c is None:
            detail = f"{trial.detail}; the candidate is no longer configured, nothing rolled back"
            await self._end(trial, Outcome.ROLLBACK_FAILED, detail)
            return
        ok, detail, refusal = await self._run_strategy(c.rollback, c)
        if refusal in PASSING_REFUSALS:
            log.warning("rollback postponed", extra=fields(candidate=c.name, reason=detail))
            return
        if ok:
            await self._end(
                trial, trial.verdict or Outcome.ROLLED_BACK, f"{trial.detail}; rolled back with {c.rollback}: {detail}"
            )
        else:
            log.error("rollback failed", extra=fields(candidate=c.name, detail=detail))
            await self._end(trial, Outcome.ROLLBACK_FAILED, f"{trial.detail}; rollback {c.rollback} failed: {detail}")

    async def _end(
        self, trial: Trial, outcome: Outcome, detail: str, after: float | None = None, gain: float | None = None
    ) -> None:
        await self.records.end(trial.id, outcome, detail, self._clock(), after, gain)
        self.metrics.trials.labels(outcome.value).inc()
        self.metrics.in_flight.set(0)
        log.info("optimization ended", extra=fields(candidate=trial.candidate, outcome=outcome.value, detail=detail))
        await self.candidates()  # refresh the confidence gauges with what this trial taught

    async def acknowledge(self, candidate: str, by: str) -> bool:
        """A person (`by`, recorded in the audit trail) has undone a change whose rollback failed: the candidate
        may be tried again."""
        return bool(await self.records.acknowledge(candidate, self._clock(), by))


def _signed_percent(value: float) -> str:
    return f"{value:+.1%}" if math.isfinite(value) else ("better" if value > 0 else "worse")
