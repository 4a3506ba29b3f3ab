"""Alertmanager-style label matchers: `name="v"`, `name!="v"`, `name=~"re"`, `name!~"re"`."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

Operator = Literal["=", "!=", "=~", "!~"]

_MATCHER = re.compile(
    r'^\s*(?P<name>[a-zA-Z_][a-zA-Z0-9_]*)\s*(?P<op>=~|!~|!=|=)\s*(?P<value>"(?:[^"\\]|\\.)*"|[^"\s]*)\s*$'
)


class InvalidMatcherError(ValueError):
    """A matcher string cannot be parsed, or its regular expression does not compile."""


@dataclass(frozen=True)
class Matcher:
    """One label matcher; regexes are anchored at both ends, as Alertmanager anchors them."""

    name: str
    op: Operator
    value: str
    pattern: re.Pattern[str] | None = None

    @classmethod
    def parse(cls, text: str) -> Matcher:
        """Parse a matcher in Alertmanager's syntax, quoted or not."""
        found = _MATCHER.match(text)
        if found is None:
            raise InvalidMatcherError(
                f'invalid matcher {text!r}: write name="value", name!="value", name=~"regex" or name!~"regex"'
            )
        raw = found["value"]
        value = json.loads(raw) if raw.startswith('"') else raw
        op: Operator = found["op"]  # type: ignore[assignment]
        pattern = None
        if op in ("=~", "!~"):
            try:
                pattern = re.compile(f"(?:{value})")
            except re.error as exc:
                raise InvalidMatcherError(f"invalid regular expression {value!r} in {text!r}: {exc}") from exc
        return cls(found["name"], op, value, pattern)

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Tell whether a label set satisfies this matcher; a missing label counts as empty."""
        actual = labels.get(self.name, "")
        if self.op == "=":
            return actual == self.value
        if self.op == "!=":
            return actual != self.value
        assert self.pattern is not None
        full = self.pattern.fullmatch(actual) is not None
        return full if self.op == "=~" else not full

    def __str__(self) -> str:
        return f"{self.name}{self.op}{json.dumps(self.value)}"
