"""The built-in strategy types, exec, http, signal and systemd, and the default registry.

Each type's runner lives in its own module and its parameter model in
`healer.config.strategy_params`; both are re-exported here.
"""

from __future__ import annotations

from healer.config.strategy_params import BUILTIN_PARAMS, ExecParams, HttpParams, SignalParams, SystemdParams
from healer.strategies.base import StrategyRegistry, StrategyType
from healer.strategies.exec import ExecRunner
from healer.strategies.http import HttpRunner
from healer.strategies.runner import StrategyRunner
from healer.strategies.signal import SignalRunner
from healer.strategies.systemd import SystemdRunner

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

_RUNNERS: dict[str, StrategyRunner] = {
    "exec": ExecRunner(),
    "http": HttpRunner(),
    "signal": SignalRunner(),
    "systemd": SystemdRunner(),
}

# Built from config's table of parameter models, so config and the registry agree on the built-in types.
BUILTIN_TYPES = tuple(StrategyType(name, params, _RUNNERS[name]) for name, params in BUILTIN_PARAMS.items())


def default_registry(*, plugins: bool = True) -> StrategyRegistry:
    """Return a registry holding the built-in strategy types and, optionally, installed plugins."""
    registry = StrategyRegistry()
    for strategy_type in BUILTIN_TYPES:
        registry.register(strategy_type)
    if plugins:
        registry.load_plugins()
    return registry
