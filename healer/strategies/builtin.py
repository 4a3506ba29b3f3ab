"""Parameter models of the built-in strategy types: exec, http, signal and systemd."""

from __future__ import annotations

import signal as signal_module
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator, model_validator

from healer.strategies.base import StrategyParams, StrategyRegistry, StrategyType, TemplateField
from healer.types import Regex


class ExecParams(StrategyParams):
    """Run a program from an argv list; never through a shell."""

    type: Literal["exec"] = "exec"
    command: list[TemplateField] = Field(min_length=1)
    env: dict[str, TemplateField] = Field(default_factory=dict)
    cwd: Path | None = None
    output_limit_bytes: int = Field(default=65536, ge=0)


class HttpParams(StrategyParams):
    """Send one HTTP request and check its status code."""

    type: Literal["http"] = "http"
    method: Literal["GET", "POST", "PUT", "PATCH", "DELETE"] = "POST"
    url: str
    headers: dict[str, TemplateField] = Field(default_factory=dict)
    body: str | None = None
    expected_status: list[int] = Field(default_factory=lambda: list(range(200, 300)))

    @field_validator("url")
    @classmethod
    def _http_url(cls, url: str) -> str:
        if not url.startswith(("http://", "https://")):
            raise ValueError(f"{url!r} is not an http:// or https:// URL")
        return url


def _signal_number(name: str) -> str:
    normalised = name.upper() if name.upper().startswith("SIG") else f"SIG{name.upper()}"
    if not isinstance(getattr(signal_module, normalised, None), signal_module.Signals):
        raise ValueError(f"unknown signal {name!r}; use a name such as SIGHUP or SIGTERM")
    return normalised


class SignalParams(StrategyParams):
    """Send a signal to processes found by pidfile or command-line regex."""

    type: Literal["signal"] = "signal"
    signal: str = "SIGHUP"
    pidfile: Path | None = None
    cmdline: Regex | None = None

    @field_validator("signal")
    @classmethod
    def _known_signal(cls, name: str) -> str:
        return _signal_number(name)

    @model_validator(mode="after")
    def _one_target(self) -> SignalParams:
        if (self.pidfile is None) == (self.cmdline is None):
            raise ValueError("give exactly one of pidfile or cmdline")
        return self


class SystemdParams(StrategyParams):
    """Restart, reload, start or stop a systemd unit through systemctl."""

    type: Literal["systemd"] = "systemd"
    unit: TemplateField
    action: Literal["restart", "reload", "start", "stop"] = "restart"


BUILTIN_TYPES = (
    StrategyType("exec", ExecParams),
    StrategyType("http", HttpParams),
    StrategyType("signal", SignalParams),
    StrategyType("systemd", SystemdParams),
)


def default_registry(*, plugins: bool = True) -> StrategyRegistry:
    """Return a registry holding the built-in strategy types and, optionally, installed plugins."""
    registry = StrategyRegistry()
    for strategy_type in BUILTIN_TYPES:
        registry.register(strategy_type)
    if plugins:
        registry.load_plugins()
    return registry
