"""Annotated field types shared by the config models."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BeforeValidator

from healer.durations import parse_duration


def _duration(value: object) -> float:
    """Parse a Prometheus duration string; bare numbers are refused because their unit is unclear."""
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(f"invalid duration {value!r}: write it as a string with a unit, like 30s or 5m")
    return parse_duration(value)


def _regex(value: str) -> str:
    """Check that a regular expression compiles, naming the fault when it does not."""
    try:
        re.compile(value)
    except re.error as exc:
        raise ValueError(f"invalid regular expression {value!r}: {exc}") from exc
    return value


Duration = Annotated[float, BeforeValidator(_duration)]
"""Seconds, written in config as a Prometheus duration."""


def _positive(seconds: float) -> float:
    if seconds <= 0:
        raise ValueError("must be longer than 0s")
    return seconds


PositiveDuration = Annotated[float, BeforeValidator(_duration), AfterValidator(_positive)]
"""A duration that must be longer than zero, for intervals that drive loops."""

Regex = Annotated[str, AfterValidator(_regex)]
"""A regular expression that is known to compile."""
