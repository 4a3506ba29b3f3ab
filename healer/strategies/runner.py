"""What the healing engine and every strategy runner share: the alert a runner sees, the result it
returns, the error it raises for an unsafe label, and the runner protocol itself."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from healer.config.strategy_params import StrategyParams

TRUNCATION_MARKER = "…[truncated {dropped} bytes]"


@dataclass(frozen=True)
class AlertContext:
    """What a strategy sees of one alert."""

    labels: Mapping[str, str]
    annotations: Mapping[str, str]
    fingerprint: str
    starts_at: str  # RFC 3339 as Alertmanager sent it
    status: str  # "firing" | "resolved"


@dataclass(frozen=True)
class StepResult:
    """The outcome of one action: whether the action itself succeeded, not whether it healed."""

    ok: bool
    detail: str
    output: str = ""
    exit_code: int | None = None
    timed_out: bool = False


class UnsafeLabelError(Exception):
    """A label or annotation a template uses is missing or fails its allowlist; nothing was run.

    `label` is the key to put under `allow_labels` (`service`, or `annotations.summary` for an
    annotation); `reason` says what is wrong with the value.
    """

    def __init__(self, label: str, reason: str, *, noun: str = "label", name: str | None = None) -> None:
        self.label = label
        self.reason = reason
        self.noun = noun
        self.name = name if name is not None else label
        super().__init__(f"{noun} {self.name!r} {reason}")

    def __reduce__(self) -> tuple[object, ...]:
        return (_rebuild_unsafe, (self.label, self.reason, self.noun, self.name))


def _rebuild_unsafe(label: str, reason: str, noun: str, name: str) -> UnsafeLabelError:
    return UnsafeLabelError(label, reason, noun=noun, name=name)


@runtime_checkable
class StrategyRunner(Protocol):
    """Runs one strategy type; registered as `StrategyType(name, params_model, runner)`."""

    def plan(self, params: StrategyParams, alert: AlertContext) -> dict[str, object]:
        """Render the invocation without running it (JSON-serialisable); raises UnsafeLabelError."""
        ...

    async def run(self, params: StrategyParams, alert: AlertContext) -> StepResult:
        """Run it; raises UnsafeLabelError before doing anything; on cancellation stops the action
        and re-raises."""
        ...


class OutputBuffer:
    """Keeps the first `limit` bytes fed to it and counts the rest, so a pipe is drained fully."""

    def __init__(self, limit: int) -> None:
        self.limit = max(limit, 0)
        self._kept = bytearray()
        self.dropped = 0

    def feed(self, chunk: bytes) -> None:
        """Add a chunk, keeping only what fits under the limit."""
        room = self.limit - len(self._kept)
        if room > 0:
            self._kept += chunk[:room]
        self.dropped += max(len(chunk) - max(room, 0), 0)

    def text(self) -> str:
        """The kept bytes as text, with a truncation marker when anything was dropped."""
        text = bytes(self._kept).decode("utf-8", errors="replace")
        if self.dropped:
            text += TRUNCATION_MARKER.format(dropped=self.dropped)
        return text


def one_line(text: str) -> str:
    """Collapse whitespace runs, newlines included, so a detail stays on one line."""
    return " ".join(text.split())
