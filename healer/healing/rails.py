"""Safety rails that live in memory: the action budget's circuit breaker and backoff arithmetic."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterable

from prometheus_client import Gauge

from healer.config import HealingRule


class CircuitBreaker:
    """Allows at most `limit` actions per `window` seconds; one more opens it for `reset` seconds."""

    def __init__(
        self, limit: int, window: float, reset: float, gauge: Gauge, clock: Callable[[], float] = time.time
    ) -> None:
        self._limit = limit
        self._window = window
        self._reset = reset
        self._gauge = gauge
        self._clock = clock
        self._starts: deque[float] = deque()
        self._open_until = 0.0

    def restore(self, started_at: Iterable[float]) -> None:
        """Count actions started before a restart, so that a restart does not refill the budget."""
        horizon = self._clock() - self._window
        self._starts.extend(sorted(t for t in started_at if t >= horizon))

    @property
    def is_open(self) -> bool:
        if self._open_until and self._clock() >= self._open_until:
            self.close()
        return self._open_until > 0

    def acquire(self) -> bool:
        """Take one action from the budget; False, and the breaker opens, when it is spent."""
        if self.is_open:
            return False
        now = self._clock()
        while self._starts and self._starts[0] < now - self._window:
            self._starts.popleft()
        if len(self._starts) >= self._limit:
            self._open_until = now + self._reset
            self._gauge.set(1)
            return False
        self._starts.append(now)
        return True

    def close(self) -> None:
        """Close the breaker and forget the spent budget, as an operator's reset does."""
        self._open_until = 0.0
        self._starts.clear()
        self._gauge.set(0)


def backoff(rule: HealingRule, attempt: int) -> float:
    """Seconds to wait after attempt `attempt` (1-based) before the next step of the ladder."""
    return float(min(rule.cooldown * rule.backoff_factor ** max(attempt - 1, 0), rule.max_backoff))


class IntakePacer:
    """Keeps inbox processing to a share of the time while webhook deliveries keep arriving.

    Accepting a delivery costs a few microseconds per alert and Alertmanager waits for the answer;
    opening an episode costs tens. In an alert storm healer answers first and works off the inbox
    with `share` of its time, at full speed again once the deliveries stop.
    """

    def __init__(self, share: float, clock: Callable[[], float] = time.monotonic) -> None:
        if not 0 < share <= 1:
            raise ValueError(f"intake share must be in (0, 1], not {share}")
        self._share = share
        self._clock = clock
        self._last_delivery = float("-inf")
        self._batch_started = float("-inf")
        self._not_before = float("-inf")

    def delivered(self) -> None:
        """Note that a delivery has just been committed to the inbox."""
        self._last_delivery = self._clock()

    def start_batch(self) -> None:
        self._batch_started = self._clock()

    def end_batch(self) -> None:
        """Schedule the next batch: at once when the webhook was quiet, else after a pause in proportion."""
        finished = self._clock()
        if self.waiting:
            self._not_before = finished + (finished - self._batch_started) * (1 / self._share - 1)
        else:
            self._not_before = finished

    def hold(self, seconds: float) -> None:
        """Start no batch for `seconds`, as after a batch that failed."""
        self._not_before = max(self._not_before, self._clock() + seconds)

    @property
    def waiting(self) -> bool:
        """Whether deliveries arrived after the last batch began, so their alerts may not be in it."""
        return self._last_delivery >= self._batch_started

    def wait(self) -> float:
        """Seconds until the next batch may start; 0 when it may start now."""
        return max(0.0, self._not_before - self._clock())
