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
