"""The step runner: the one path by which any strategy runs, under the rails that hold for every caller.

Healing steps, goal steps and optimizer changes all pass here: a step is planned (labels checked
against their allowlists), refused while healer stops, charged to the action budget (whose circuit
breaker opens when it is spent), and run within the global and per-strategy concurrency limits.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from healer.config import HealerConfig
from healer.healing.metrics import HealingMetrics
from healer.healing.model import BudgetScope, Charge, SkipReason
from healer.healing.pauses import PauseBoard
from healer.healing.replica import Replica
from healer.storage import Coordination, StoreUnavailableError
from healer.strategies.base import StrategyParams, StrategyRegistry
from healer.strategies.runner import AlertContext, StepResult, StrategyRunner, UnsafeLabelError


class Halt(enum.StrEnum):
    """Why a step did not run that is not a skip: it may still run (after the restart, or elsewhere)."""

    # healer is stopping; the step runs after the restart.
    STOPPING = "stopping"
    # A cancellation or another replica won the step's claim; nothing ran here.
    NOT_CLAIMED = "not_claimed"


STOPPING = Halt.STOPPING
NOT_CLAIMED = Halt.NOT_CLAIMED
# How often a step waiting for a concurrency slot looks again when no slot of this replica frees up;
# a slot freed here wakes it at once.
SLOT_POLL_SECONDS = 0.1
SLOT_POLL_MAX_SECONDS = 1.0


class StepRefusedError(Exception):
    """The rails did not let a step run; `reason` is a `healer_skipped_total` reason or a Halt."""

    def __init__(self, reason: SkipReason | Halt, detail: str) -> None:
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
    """Runs strategies under the action budget, concurrency limits and the stop, for every caller.

    The budget, its circuit breaker and the slots live in the store, so that they hold across replicas.
    """

    def __init__(
        self,
        config: HealerConfig,
        registry: StrategyRegistry,
        metrics: HealingMetrics,
        coordination: Coordination,
        replica: Replica,
        pauses: PauseBoard,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self._registry = registry
        self.metrics = metrics
        self._coordination = coordination
        self.replica = replica
        self.pauses = pauses
        self._clock = clock
        # Set whenever this replica frees a slot, so that a step waiting here looks again at once.
        self._slot_freed = asyncio.Event()
        # Set whenever this replica frees a label group's slot (blast radius).
        self.group_freed = asyncio.Event()
        # Slots whose release the store could not take; released again from the work loop.
        self._unreleased: set[int] = set()
        self._global_gate = asyncio.Semaphore(config.healing.max_concurrent)
        self._local_slots = {
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
        before_slot: Callable[[], Awaitable[None]] | None = None, scope: BudgetScope | None = None,
    ) -> StepResult:  # fmt: skip
        """Run a planned step under the rails; raises StepRefusedError when one stops it.

        The step is charged to the global budget and, with `scope`, to that budget too (a rule's own).
        `before_slot` runs once the budget is charged (healing silences the alert there); `claim`
        runs holding the slots and must return False when the step may no longer run.
        """
        if self._stopping:
            raise StepRefusedError(STOPPING, "healer is stopping")
        budget = self.config.healing.budget
        charge = await self._coordination.charge_budget(
            self._clock(), budget.actions, budget.window, self.config.healing.circuit_reset, scope
        )
        self.metrics.circuit_open.set(int(charge is Charge.CIRCUIT_OPEN))
        if charge is Charge.CIRCUIT_OPEN:
            raise StepRefusedError(
                SkipReason.CIRCUIT_OPEN, "the action budget is spent; the circuit breaker is open"
            )
        if charge is Charge.SCOPE_SPENT:
            assert scope is not None
            raise StepRefusedError(
                SkipReason.BUDGET, f"the budget of {scope.limit} actions per {scope.window:g}s for {scope.key} is spent"
            )
        if before_slot is not None:
            await before_slot()
        async with self._slot(step.strategy, step.params):
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
            # A deploy or a maintenance window holds goals' steps and optimizer changes too (by their labels).
            pause = await self.pauses.covering(context.labels)
            if pause is not None:
                raise StepRefusedError(SkipReason.PAUSED, f"paused by {pause.source} {pause.name}: {pause.reason}")
            return await self.run(step)
        except StepRefusedError as refused:
            if refused.reason != STOPPING:
                self.metrics.skipped.labels(refused.reason).inc()
            if refused.reason == SkipReason.UNSAFE_LABEL:
                raise StepRefusedError(refused.reason, f"unsafe label: {refused.detail}") from None
            raise

    @asynccontextmanager
    async def _slot(self, strategy: str, params: StrategyParams) -> AsyncIterator[None]:
        """Hold a slot within the global and the strategy's limit; a step that has to wait for one is
        counted once as `concurrency`. Raises StepRefusedError when the stop begins meanwhile.

        Steps first queue here, in this replica, for the limits as seen locally: only the few at the
        head ask the store, so that hundreds of due steps do not poll it (nor starve its connections).
        """
        local = self._local_slots.setdefault(strategy, asyncio.Semaphore(params.max_concurrent))
        waited = self._global_gate.locked() or local.locked()
        if waited:
            self.metrics.skipped.labels(SkipReason.CONCURRENCY).inc()
        async with self._global_gate, local:
            slot = None
            poll = SLOT_POLL_SECONDS
            while slot is None:
                if self._stopping:
                    raise StepRefusedError(STOPPING, "healer is stopping")
                slot = await self._coordination.take_slot(
                    self.replica.name,
                    strategy,
                    self._clock(),
                    self.replica.until(),
                    self.config.healing.max_concurrent,
                    params.max_concurrent,
                )
                if slot is None:
                    # Other replicas hold the slots: look again, less often the longer it takes.
                    if not waited:
                        self.metrics.skipped.labels(SkipReason.CONCURRENCY).inc()
                        waited = True
                    self._slot_freed.clear()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._slot_freed.wait(), poll)
                    poll = min(poll * 2, SLOT_POLL_MAX_SECONDS)
            try:
                yield
            finally:
                # Shielded: a step cancelled while it ran must still give its slot back.
                await asyncio.shield(self._release(slot))
                self._slot_freed.set()

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

    # -- label groups (blast radius) -------------------------------------------------------------

    async def take_group_slot(self, group: str, limit: int) -> int | None:
        """A slot for healing one episode of a label group, held until released (or this replica dies)."""
        self.group_freed.clear()
        return await self._coordination.take_group_slot(
            self.replica.name, group, self._clock(), self.replica.until(), limit
        )

    async def release_group_slot(self, slot: int) -> None:
        """Give a label group's slot back; the steps of this replica waiting for one look again at once."""
        try:
            await self._release(slot)
        finally:
            self.group_freed.set()

    async def _release(self, slot: int) -> None:
        """Release a slot, or keep it to release later when the store cannot take it now: the replica's
        renewals keep every slot of its name alive, so a slot not released would never lapse."""
        try:
            await self._coordination.release_slot(slot)
        except StoreUnavailableError:
            self._unreleased.add(slot)

    async def release_leftovers(self) -> None:
        """Release the slots that the store could not take when their step ended (called by the work loop)."""
        for slot in list(self._unreleased):
            await self._coordination.release_slot(slot)
            self._unreleased.discard(slot)
            self._slot_freed.set()
            self.group_freed.set()

    async def take_share(self, group: str, episode_id: int, window: float, limit: int) -> bool:
        """Count an episode as acted on in its group unless `limit` others were within `window`."""
        return await self._coordination.take_share(group, episode_id, self._clock(), window, limit)

    # -- operator actions ----------------------------------------------------------------------

    async def circuit_open(self) -> bool:
        """Whether the action budget's circuit breaker is open now (for every replica)."""
        is_open: bool = await self._coordination.circuit_open(self._clock())
        self.metrics.circuit_open.set(int(is_open))
        return is_open

    async def close_circuit(self, by: str) -> None:
        """Close the circuit breaker and reset the action budget; the audit trail records `by`."""
        await self._coordination.close_circuit(by)
        self.metrics.circuit_open.set(0)
