"""Collection timing and errors per collector, and the base class that records them."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

import psutil
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

log = logging.getLogger(__name__)

# The failures a collector degrades on: the OS refused, or the thing it read vanished.
REFUSALS: tuple[type[BaseException], ...] = (OSError, psutil.Error, ValueError)


@dataclass
class CollectorStats:
    """Last collection duration and error count for each collector, by name."""

    duration_seconds: dict[str, float] = field(default_factory=dict)
    errors: dict[str, int] = field(default_factory=dict)

    def declare(self, name: str) -> None:
        """Create the series for a collector up front, so that they exist before the first error."""
        self.duration_seconds.setdefault(name, 0.0)
        self.errors.setdefault(name, 0)

    def record_error(self, name: str) -> None:
        self.errors[name] = self.errors.get(name, 0) + 1


Part = Callable[[], Iterable[Metric]]


class InstrumentedCollector(Collector):
    """A collector made of parts; a part the OS refuses is left out of that scrape and counted."""

    name = "base"

    def __init__(self, stats: CollectorStats) -> None:
        self._stats = stats
        stats.declare(self.name)

    def parts(self) -> Iterable[Part]:
        """Return the callables that each produce some of this collector's metric families."""
        raise NotImplementedError

    def describe(self) -> Iterable[Metric]:
        # Registering must not run the collection; an empty description disables duplicate checks.
        return []

    def collect(self) -> Iterator[Metric]:
        started = time.perf_counter()
        families: list[Metric] = []
        for part in self.parts():
            try:
                families.extend(part())
            except REFUSALS as exc:
                self._stats.record_error(self.name)
                log.debug("collector part failed", extra={"fields": {"collector": self.name, "error": repr(exc)}})
        self._stats.duration_seconds[self.name] = time.perf_counter() - started
        yield from families


class StatsCollector(Collector):
    """Publishes the collection duration and error count of every collector; register it last."""

    def __init__(self, stats: CollectorStats) -> None:
        self._stats = stats

    def describe(self) -> Iterable[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        duration = GaugeMetricFamily(
            "healer_collector_duration_seconds",
            "Time the collector took in the most recent scrape.",
            labels=["collector"],
        )
        errors = CounterMetricFamily(
            "healer_collector_errors",
            "Collections in which part of the collector failed and was left out.",
            labels=["collector"],
        )
        for name in sorted(self._stats.duration_seconds):
            duration.add_metric([name], self._stats.duration_seconds[name])
            errors.add_metric([name], self._stats.errors.get(name, 0))
        yield duration
        yield errors
