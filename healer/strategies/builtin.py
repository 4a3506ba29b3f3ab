"""The built-in strategy types, exec, http, signal and systemd, and the default registry.

Each type's parameter model and runner live in its own module; they are re-exported here.
"""

from __future__ import annotations

from healer.strategies.base import StrategyRegistry, StrategyType
from healer.strategies.exec import ExecParams, ExecRunner
from healer.strategies.http import HttpParams, HttpRunner
from healer.strategies.signal import SignalParams, SignalRunner
from healer.strategies.systemd import SystemdParams, SystemdRunner

__all__ = [
    "BUILTIN_TYPES",
    "ExecParams",
    "ExecRunner",
    "HttpParams",
    "HttpRunner",
    "SignalParams",
    "SignalRunner",
    "SystemdParams",
    "SystemdRunner",
    "default_registry",
]

BUILTIN_TYPES = (
    StrategyType("exec", ExecParams, ExecRunner()),
    StrategyType("http", HttpParams, HttpRunner()),
    StrategyType("signal", SignalParams, SignalRunner()),
    StrategyType("systemd", SystemdParams, SystemdRunner()),
)


def default_registry(*, plugins: bool = True) -> StrategyRegistry:
    """Return a registry holding the built-in strategy types and, optionally, installed plugins."""
    registry = StrategyRegistry()
    for strategy_type in BUILTIN_TYPES:
        registry.register(strategy_type)
    if plugins:
        registry.load_plugins()
    return registry
