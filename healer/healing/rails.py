"""Rail arithmetic that needs no store: the ladder's backoff and the pacing of inbox intake."""

from __future__ import annotations

import time
from collections.abc import Callable

from healer.config import HealingRule


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
