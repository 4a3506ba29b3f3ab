"""The registry of strategy types keyed by name, each a parameter model and the runner that runs it.

The parameter models live in `healer.config.strategy_params` (config validates against them);
their names are re-exported here for runners and plugins.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TypeVar

from healer.config.strategy_params import (
    DEFAULT_LABEL_PATTERN,
    PLACEHOLDER,
    STRATEGY_ENTRY_POINTS,
    DuplicateStrategyTypeError,
    StrategyParams,
    TemplateField,
    UnknownStrategyTypeError,
    published_strategy_types,
)
from healer.strategies.runner import StrategyRunner

__all__ = [
    "DEFAULT_LABEL_PATTERN",
    "PLACEHOLDER",
    "DuplicateStrategyTypeError",
    "StrategyParams",
    "StrategyRegistry",
    "StrategyType",
    "TemplateField",
    "UnknownStrategyTypeError",
    "params_of",
]

P = TypeVar("P", bound=StrategyParams)


def params_of(params: StrategyParams, model: type[P], runner: str) -> P:
    """Return `params` as the model a runner expects, failing loudly when it is another type's."""
    if not isinstance(params, model):
        raise TypeError(f"{runner} runner got {type(params).__name__}, not {model.__name__}")
    return params


@dataclass(frozen=True)
class StrategyType:
    """A strategy type: its name, its parameter model, and the object that runs it."""

    name: str
    params: type[StrategyParams]
    runner: StrategyRunner


class StrategyRegistry:
    """Strategy types keyed by name; built-ins first, then plugins from entry points."""

    def __init__(self) -> None:
        self._types: dict[str, StrategyType] = {}

    def register(self, strategy_type: StrategyType) -> None:
        """Add a strategy type, refusing a second one of the same name."""
        if strategy_type.name in self._types:
            raise DuplicateStrategyTypeError(f"strategy type {strategy_type.name!r} is registered twice")
        self._types[strategy_type.name] = strategy_type

    def get(self, name: str) -> StrategyType:
        """Return the strategy type called `name`."""
        try:
            return self._types[name]
        except KeyError:
            raise UnknownStrategyTypeError(name, sorted(self._types)) from None

    def __contains__(self, name: object) -> bool:
        return name in self._types

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._types))

    def load_plugins(self, group: str = STRATEGY_ENTRY_POINTS) -> None:
        """Register every strategy type published under the `healer.strategies` entry points."""
        for published in published_strategy_types(group):
            if not isinstance(published, StrategyType):
                raise TypeError(f"entry point of {group!r} gave {published!r}, not a StrategyType")
            self.register(published)
