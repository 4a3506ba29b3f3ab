"""The step runner: the one path by which any strategy runs, under the rails that hold for every caller.

Healing steps, goal steps and optimizer changes all pass here: a step is planned (labels checked
against their allowlists), refused while healer stops, charged to the action budget (whose circuit
breaker opens when it is spent), and run within the global and per-strategy concurrency limits.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from healer.config import HealerConfig
from healer.healing.metrics import HealingMetrics
from healer.healing.model import SkipReason
from healer.healing.rails import CircuitBreaker
from healer.strategies.base import StrategyParams, StrategyRegistry
from healer.strategies.runner import AlertContext, StepResult, StrategyRunner, UnsafeLabelError

# The reason of a StepRefusedError for a step that did not run because healer is stopping: not a
# skip, since the step may run after the restart.
STOPPING = "stopping"
# The reason for a step whose claim was lost (cancelled or taken meanwhile): nothing ran.
NOT_CLAIMED = "not_claimed"


class StepRefusedError(Exception):
    """The rails did not let a step run; `reason` is a `healer_skipped_total` reason, STOPPING or NOT_CLAIMED."""

    def __init__(self, reason: str, detail: str) -> None:
        self.reason = reason
        self.detail = detail
        super().__init__(detail)


@dataclass(frozen=True)
class PlannedStep:
    """A strategy's invocation rendered for one alert, ready to run."""

    strategy: str
    params: StrategyParams
    runner: StrategyRunner
    context: AlertContext
    plan: dict[str, Any]


class StepRunner:
    """Runs strategies under the action budget, concurrency limits and the stop, for every caller."""

    def __init__(
        self,
        config: HealerConfig,
        registry: StrategyRegistry,
        metrics: HealingMetrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._registry = registry
        self.metrics = metrics
        healing = config.healing
        self.circuit = CircuitBreaker(
            healing.budget.actions, healing.budget.window, healing.circuit_reset, metrics.circuit_open, clock
        )
        self._global_slots = asyncio.Semaphore(healing.max_concurrent)
        self._strategy_slots = {
            name: asyncio.Semaphore(params.max_concurrent) for name, params in config.strategies.items()
        }
        self._stopping = False
        self._stop_deadline: float | None = None

    # -- the stop ------------------------------------------------------------------------------

    def begin_stop(self, timeout: float) -> None:
        """Start no step from now on; running ones have `timeout` seconds from the first call to finish."""
        if self._stop_deadline is None:
            self._stop_deadline = time.monotonic() + timeout
        self._stopping = True

    @property
    def stopping(self) -> bool:
        """True once the stop has begun: no new step may start."""
        return self._stopping

    @property
    def stop_deadline(self) -> float:
        """When (monotonic) running steps must have finished; only meaningful after `begin_stop`."""
        return self._stop_deadline if self._stop_deadline is not None else time.monotonic()

    # -- planning and running ------------------------------------------------------------------

    def plan(self, strategy: str, context: AlertContext) -> PlannedStep:
        """Render a configured strategy for an alert; raises StepRefusedError (disabled, unsafe_label)."""
        params = self.config.strategies.get(strategy)
        if params is None:
            raise StepRefusedError(SkipReason.DISABLED, f"strategy {strategy!r} is not configured")
        runner = self._registry.get(params.type).runner
        try:
            plan = runner.plan(params, context)
        except UnsafeLabelError as exc:
            raise StepRefusedError(SkipReason.UNSAFE_LABEL, str(exc)) from None
        return PlannedStep(strategy, params, runner, context, plan)

    async def run(
        self, step: PlannedStep, *, claim: Callable[[], Awaitable[bool]] | None = None,
        before_slot: Callable[[], Awaitable[None]] | None = None,
    ) -> StepResult:  # fmt: skip
        """Run a planned step under the rails; raises StepRefusedError when one stops it.

        `before_slot` runs once the budget is charged (healing silences the alert there); `claim`
        runs holding the slots and must return False when the step may no longer run.
        """
        if self._stopping:
            raise StepRefusedError(STOPPING, "healer is stopping")
        if not self.circuit.acquire():
            raise StepRefusedError(
                SkipReason.CIRCUIT_OPEN, "the action budget is spent; the circuit breaker is open"
            )
        if before_slot is not None:
            await before_slot()
        async with self._slots(step.strategy, step.params):
            if self._stopping:  # the stop began while this step waited for a slot
                raise StepRefusedError(STOPPING, "healer is stopping")
            if claim is not None and not await claim():
                raise StepRefusedError(NOT_CLAIMED, "the step was cancelled or taken meanwhile")
            return await self._execute(step)

    async def run_unattached(self, strategy: str, context: AlertContext) -> StepResult:
        """Run a named strategy that no alert asked for (a goal's step, an optimizer change) under the rails.

        Dry run holds here too. Raises StepRefusedError, counted in `healer_skipped_total` unless
        healer is stopping.
        """
        try:
            step = self.plan(strategy, context)
            if self.config.healing.dry_run:
                raise StepRefusedError(SkipReason.DRY_RUN, "dry run: would have run " + json.dumps(step.plan)[:300])
            return await self.run(step)
        except StepRefusedError as refused:
            if refused.reason != STOPPING:
                self.metrics.skipped.labels(refused.reason).inc()
            if refused.reason == SkipReason.UNSAFE_LABEL:
                raise StepRefusedError(refused.reason, f"unsafe label: {refused.detail}") from None
            raise

    @asynccontextmanager
    async def _slots(self, strategy: str, params: StrategyParams) -> AsyncIterator[None]:
        """Hold a global and a per-strategy slot; a step that has to wait for one is counted as `concurrency`."""
        slots = self._strategy_slots.setdefault(strategy, asyncio.Semaphore(params.max_concurrent))
        if self._global_slots.locked() or slots.locked():
            self.metrics.skipped.labels(SkipReason.CONCURRENCY).inc()
        async with self._global_slots, slots:
            yield

    async def _execute(self, step: PlannedStep) -> StepResult:
        started = time.monotonic()
        self.metrics.running.inc()
        try:
            return await step.runner.run(step.params, step.context)
        except UnsafeLabelError as exc:
            return StepResult(ok=False, detail=f"unsafe label: {exc}")
        finally:
            self.metrics.running.dec()
            self.metrics.action_duration.labels(step.strategy).observe(time.monotonic() - started)

    # -- operator actions ----------------------------------------------------------------------

    def close_circuit(self) -> None:
        """Close the circuit breaker and reset the action budget."""
        self.circuit.close()
