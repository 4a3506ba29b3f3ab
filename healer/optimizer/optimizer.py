"""The optimizer: try the best-scoring confident candidate, measure it, keep it or roll it back.

Each cycle, when no trial is in flight, the candidates that are ready (confidence at least
`min_confidence`, not kept already, not cooling down after a failed trial) are taken in order of
score, expected improvement / cost x confidence. The first whose metric has data is measured (its
average over `window`), applied, and after `window` measured again. A change that helped by more
than `min_improvement` is kept; otherwise it is rolled back. Outcomes teach the confidence: the
prior counts as `prior_weight` trials, each kept trial as a success. Trials live in the store, so
a restart resumes a measurement, and rolls back a change whose apply it interrupted.
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
from healer.healing.engine import Engine, StepRefusedError
from healer.logs import fields
from healer.optimizer.model import ENDED, Outcome, Trial, improvement, learned_confidence, score
from healer.optimizer.records import TrialRecords
from healer.promql import PrometheusUnavailableError, PromQLError
from healer.store import AsyncStore
from healer.strategies.runner import AlertContext

log = logging.getLogger(__name__)

# What keeps a candidate from being tried now, in the order they are checked.
STATES = ("measuring", "kept", "cooldown", "below_confidence", "ready")


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
            "healer_optimization_in_flight", "1 while a change is being applied or measured.", registry=registry
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
        store: AsyncStore,
        records: TrialRecords,
        engine: Engine,
        metrics: OptimizerMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.store = store
        self.records = records
        self.engine = engine
        self.metrics = metrics
        self._clock = clock
        self._candidates = {c.name: c for c in config.optimizer.candidates}
        self._cycle = Cycle("optimizer", config.optimizer.interval, self.cycle)
        # True while a strategy runs, so that a stop lets the change finish instead of cutting it in half.
        self._busy = False

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Roll back a change whose apply a previous run interrupted, then start the cycle."""
        trial = await self.store.call(self.records.in_flight)
        if trial is not None and trial.outcome is Outcome.APPLYING:
            await self._roll_back(trial, Outcome.UNMEASURED, "healer stopped while applying the change")
        if self.config.optimizer.enabled and self._candidates:
            self._cycle.start()

    async def stop(self, deadline: float) -> None:
        """Stop the cycle; a trial being applied gets until `deadline` (monotonic), a measurement resumes later."""
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
        summary = await self.store.call(self.records.summary)
        trial = await self.store.call(self.records.in_flight)
        settings = self.config.optimizer
        now = self._clock()
        views = []
        for c in self._candidates.values():
            seen = summary.get(c.name, {"trials": 0, "helped": 0, "last": None, "ended_at": None})
            confidence = learned_confidence(c.confidence, settings.prior_weight, seen["helped"], seen["trials"])
            ready_at = None
            if trial is not None and trial.candidate == c.name:
                state = "measuring"
            elif seen["last"] is Outcome.KEPT:
                state = "kept"
            elif seen["ended_at"] is not None and now < seen["ended_at"] + c.cooldown:
                state, ready_at = "cooldown", seen["ended_at"] + c.cooldown
            elif confidence < settings.min_confidence:
                state = "below_confidence"
            else:
                state = "ready"
            value = score(c.expected_improvement, c.cost, confidence)
            views.append(CandidateView(c, confidence, value, seen["trials"], seen["helped"], state, ready_at))
            self.metrics.confidence.labels(c.name).set(confidence)
        return sorted(views, key=lambda v: (-v.score, v.candidate.name))

    # -- one cycle -----------------------------------------------------------------------------

    async def cycle(self) -> None:
        """Judge the trial in flight once its window has passed, or else start the best ready candidate."""
        trial = await self.store.call(self.records.in_flight)
        self.metrics.in_flight.set(0 if trial is None else 1)
        if self.engine.stopping:
            return  # a trial in flight resumes after the restart
        if trial is not None:
            if trial.outcome is Outcome.APPLYING and not self._busy:
                # An earlier cycle failed between applying and recording it; how far it got is unknown.
                await self._roll_back(trial, Outcome.UNMEASURED, "the apply's outcome was not recorded")
            elif trial.outcome is Outcome.MEASURING and self._clock() >= (trial.measure_at or 0.0):
                await self._judge(trial)
            return
        for view in await self.candidates():
            if view.state == "ready" and await self._try(view):
                return

    async def _measure(self, candidate: OptimizationCandidate) -> tuple[bool, float | None]:
        """(answered, average over the window); the average is None when the metric has no data."""
        try:
            value = await self.engine.promql.scalar(window_average(candidate.metric, candidate.window))
        except (PromQLError, PrometheusUnavailableError) as exc:
            self.metrics.query_errors.inc()
            log.warning("candidate not measured", extra=fields(candidate=candidate.name, reason=str(exc)))
            return False, None
        return True, value if value is not None and math.isfinite(value) else None

    def _context(self, candidate: str, component: str) -> AlertContext:
        return AlertContext(
            labels={"candidate": candidate, "component": component},
            annotations={},
            fingerprint=f"optimization-{candidate}",
            starts_at="",
            status="firing",
        )

    async def _run_strategy(self, strategy: str, candidate: str, component: str) -> tuple[bool, str]:
        self._busy = True
        try:
            result = await self.engine.run_unattached(strategy, self._context(candidate, component))
        except StepRefusedError as exc:
            return False, f"refused ({exc.reason}): {exc.detail}"
        finally:
            self._busy = False
        return result.ok, result.detail

    async def _try(self, view: CandidateView) -> bool:
        """Measure, then apply one candidate; False when its metric has no data now."""
        c = view.candidate
        answered, before = await self._measure(c)
        if not answered or before is None:
            return False
        trial = await self.store.call(
            self.records.begin, c.name, c.component, view.confidence, view.score, before, self._clock()
        )
        self.metrics.in_flight.set(1)
        log.info("optimization applying", extra=fields(candidate=c.name, before=before, score=view.score))
        ok, detail = await self._run_strategy(c.apply, c.name, c.component)
        if not ok:
            await self._end(trial, Outcome.APPLY_FAILED, f"{c.apply} did not apply: {detail}")
            return True
        await self.store.call(self.records.measuring, trial.id, self._clock() + c.window, f"{c.apply}: {detail}")
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
        self, trial: Trial, outcome: Outcome, why: str, after: float | None = None, gain: float | None = None
    ) -> None:
        c = self._candidates.get(trial.candidate)
        if c is None:
            await self._end(
                trial, Outcome.UNMEASURED, f"{why}; the candidate is no longer configured, nothing rolled back"
            )
            return
        ok, detail = await self._run_strategy(c.rollback, c.name, c.component)
        if self.engine.stopping and not ok:
            return  # refused because healer is stopping: the trial stays in flight and is judged after the restart
        if ok:
            await self._end(trial, outcome, f"{why}; rolled back with {c.rollback}: {detail}", after, gain)
        else:
            log.error("rollback failed", extra=fields(candidate=c.name, detail=detail))
            await self._end(
                trial, Outcome.ROLLBACK_FAILED, f"{why}; rollback {c.rollback} failed: {detail}", after, gain
            )

    async def _end(
        self, trial: Trial, outcome: Outcome, detail: str, after: float | None = None, gain: float | None = None
    ) -> None:
        await self.store.call(self.records.end, trial.id, outcome, detail, self._clock(), after, gain)
        self.metrics.trials.labels(outcome.value).inc()
        self.metrics.in_flight.set(0)
        log.info("optimization ended", extra=fields(candidate=trial.candidate, outcome=outcome.value, detail=detail))
        await self.candidates()  # refresh the confidence gauges with what this trial taught


def _signed_percent(value: float) -> str:
    return f"{value:+.1%}" if math.isfinite(value) else ("better" if value > 0 else "worse")
