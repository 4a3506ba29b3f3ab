"""The kinds and priorities of goals, which goal templates in config name."""

from __future__ import annotations

import enum


class GoalType(enum.StrEnum):
    PERFORMANCE = "performance"
    CAPABILITY = "capability"
    KNOWLEDGE = "knowledge"
    RELIABILITY = "reliability"


class GoalPriority(enum.IntEnum):
    DEFERRED = 1
    LOW = 2
    MEDIUM = 3
    HIGH = 4
    CRITICAL = 5


def parse_priority(value: object) -> GoalPriority:
    """Accept a priority by name (`critical`, any case) or by level 1-5."""
    if isinstance(value, GoalPriority):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        try:
            return GoalPriority(value)
        except ValueError:
            pass
    elif isinstance(value, str) and value.upper() in GoalPriority.__members__:
        return GoalPriority[value.upper()]
    names = ", ".join(f"{p.name} ({p.value})" for p in sorted(GoalPriority, reverse=True))
    raise ValueError(f"priority {value!r} is not one of {names}")
