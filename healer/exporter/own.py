"""healer's own state: build info, start time, config state and reachability of its upstreams."""

from __future__ import annotations

import platform
import time

from prometheus_client import CollectorRegistry, Gauge, Info

from healer import __version__
from healer.config import HealerConfig

DEPENDENCIES = ("prometheus", "alertmanager")


class OwnMetrics:
    """Gauges describing the running healer process, on the given registry."""

    def __init__(self, registry: CollectorRegistry, config: HealerConfig) -> None:
        Info("healer_build", "healer's version.", registry=registry).info(
            {"version": __version__, "python_version": platform.python_version()}
        )
        Gauge("healer_start_time_seconds", "Unix time healer started.", registry=registry).set(time.time())
        config_loaded = Gauge(
            "healer_config_last_load_success_timestamp_seconds",
            "Unix time the running config was loaded and validated.",
            registry=registry,
        )
        config_loaded.set(time.time())
        watched = Gauge("healer_processes_watched", "Number of watched process definitions.", registry=registry)
        watched.set(len(config.exporter.processes))
        rules = Gauge("healer_healing_rules", "Number of configured healing rules.", registry=registry)
        rules.set(len(config.healing.rules))
        self.dependency_up = Gauge(
            "healer_dependency_up",
            "1 if healer's most recent readiness check of the dependency succeeded.",
            ["dependency"],
            registry=registry,
        )
        for name in DEPENDENCIES:
            self.dependency_up.labels(name)
