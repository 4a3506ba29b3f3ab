"""Durations written the way Prometheus writes them (`500ms`, `30s`, `1h30m`)."""

from __future__ import annotations

import re

_UNIT_SECONDS = {
    "ms": 0.001,
    "s": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "d": 86400.0,
    "w": 7 * 86400.0,
    "y": 365 * 86400.0,
}
# Units must appear largest first and at most once, as in Prometheus's own parser.
_DURATION = re.compile(
    r"^(?:(?P<y>\d+)y)?(?:(?P<w>\d+)w)?(?:(?P<d>\d+)d)?(?:(?P<h>\d+)h)?"
    r"(?:(?P<m>\d+)m)?(?:(?P<s>\d+)s)?(?:(?P<ms>\d+)ms)?$"
)


class InvalidDurationError(ValueError):
    """A string is not a Prometheus duration."""


def parse_duration(text: str) -> float:
    """Return the number of seconds in a Prometheus duration string."""
    match = _DURATION.match(text)
    if text in ("", "0") or match is None:
        if text == "0":
            return 0.0
        raise InvalidDurationError(f"invalid duration {text!r}: write a number and a unit, like 500ms, 30s, 5m, 1h")
    return sum(int(value) * _UNIT_SECONDS[unit] for unit, value in match.groupdict().items() if value)


def format_duration(seconds: float) -> str:
    """Return the shortest Prometheus duration string for a whole number of milliseconds."""
    millis = round(seconds * 1000)
    if millis == 0:
        return "0s"
    parts = []
    for unit in ("y", "w", "d", "h", "m", "s", "ms"):
        size = round(_UNIT_SECONDS[unit] * 1000)
        count, millis = divmod(millis, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)
