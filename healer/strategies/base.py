"""What every healing strategy shares: its parameter model and the registry keyed by type."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from healer.types import Duration, Regex

# Conservative on purpose: no whitespace, quotes, shell metacharacters, slashes or leading dash.
DEFAULT_LABEL_PATTERN = r"^[A-Za-z0-9_][A-Za-z0-9_.:-]{0,127}$"
PLACEHOLDER = re.compile(r"\{(labels|annotations)\.([A-Za-z_][A-Za-z0-9_]*)\}")


def _whole_placeholder_or_literal(value: str) -> str:
    """Accept a literal string (braces such as find's `{}` included) or exactly one whole placeholder."""
    if PLACEHOLDER.fullmatch(value) or not PLACEHOLDER.search(value):
        return value
    raise ValueError(
        f"{value!r}: a template must be exactly one whole placeholder such as "
        "'{labels.service}' (labels fill whole arguments only, never part of one)"
    )


TemplateField = Annotated[str, AfterValidator(_whole_placeholder_or_literal)]


class StrategyParams(BaseModel):
    """Parameters shared by every strategy type."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    description: str = ""
    timeout: Duration = 30.0
    approval: Literal["none", "required"] = "none"
    max_concurrent: int = Field(default=1, ge=1)
    allow_labels: dict[str, Regex] = Field(default_factory=dict)

    def label_pattern(self, name: str) -> re.Pattern[str]:
        """Return the allowlist pattern a label must match before it enters this strategy."""
        return re.compile(self.allow_labels.get(name, DEFAULT_LABEL_PATTERN))


class UnknownStrategyTypeError(KeyError):
    """No strategy type of that name is registered."""

    def __str__(self) -> str:
        return f"unknown strategy type {self.args[0]!r}; known types: {', '.join(self.args[1])}"


class DuplicateStrategyTypeError(ValueError):
    """A strategy type of that name is registered already."""


@dataclass(frozen=True)
class StrategyType:
    """A strategy type: its name, its parameter model, and the object that runs it."""

    name: str
    params: type[StrategyParams]
    runner: Any = None


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

    def load_plugins(self, group: str = "healer.strategies") -> None:
        """Register every strategy type published under the `healer.strategies` entry points."""
        for entry in entry_points(group=group):
            loaded = entry.load()
            is_factory = callable(loaded) and not isinstance(loaded, StrategyType)
            self.register(loaded() if is_factory else loaded)
