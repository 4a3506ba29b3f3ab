"""The parameter models of strategy types, and what config needs to know of a strategy registry.

The models sit in the config layer because config validates `strategies:` against them; the
runners in `healer.strategies` import them from here.
"""

from __future__ import annotations

import grp
import os
import pwd
import re
import signal as signal_module
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib.metadata import entry_points
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, PrivateAttr, field_validator, model_validator

from healer.config.secrets import Masker, SecretRef, read_all
from healer.types import Duration, Regex

STRATEGY_ENTRY_POINTS = "healer.strategies"

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
    # The config's `secrets:` section, bound by config loading (healer.config.secrets); never dumped.
    _secrets: Mapping[str, SecretRef] = PrivateAttr(default_factory=dict)

    def bind_secrets(self, secrets: Mapping[str, SecretRef]) -> None:
        """Give this strategy the configured secrets it may fill in at run time."""
        self._secrets = dict(secrets)

    def secret_values(self) -> dict[str, str]:
        """Every configured secret's value now, by name; raises SecretError (no value in it)."""
        return read_all(self._secrets)

    def masker(self, values: Mapping[str, str] | None = None) -> Masker:
        """What masks every configured secret value; reads them unless `values` is given."""
        if values is None:
            values = {}
            for name, ref in self._secrets.items():
                try:
                    values[name] = ref.read()
                except ValueError:
                    continue  # unreadable now: nothing of it can be masked, nor filled in
        return Masker(values.values())

    def label_pattern(self, name: str) -> re.Pattern[str]:
        """Return the allowlist pattern a label must match before it enters this strategy."""
        return re.compile(self.allow_labels.get(name, DEFAULT_LABEL_PATTERN))


def _known(kind: str, find: Callable[[str], object]) -> AfterValidator:
    """A validator of a `kind` ("user" or "group") name this machine knows or an id (a bare number)."""

    def known(value: str | int) -> str | int:
        if isinstance(value, int) and value < 0:
            raise ValueError(f"a {kind} id is not negative, not {value}")
        if isinstance(value, int) or value.isdigit():
            return int(value)
        try:
            find(value)
        except KeyError:
            raise ValueError(f"unknown {kind} {value!r} (not in this machine's {kind} database)") from None
        return value

    return AfterValidator(known)


UserField = Annotated[str | int, _known("user", pwd.getpwnam)]
GroupField = Annotated[str | int, _known("group", grp.getgrnam)]


class ExecParams(StrategyParams):
    """Run a program from an argv list; never through a shell."""

    type: Literal["exec"] = "exec"
    command: list[TemplateField] = Field(min_length=1)
    env: dict[str, TemplateField] = Field(default_factory=dict)
    cwd: Path | None = None
    output_limit_bytes: int = Field(default=65536, ge=0)
    # Run as this user (name or id) and group; with a user and no group, the user's primary group
    # and its supplementary groups. Unset: healer's own user (warned about when that is root).
    user: UserField | None = None
    group: GroupField | None = None


def run_as_root_warning(strategies: Mapping[str, StrategyParams], euid: int | None = None) -> str | None:
    """One warning when healer runs as root and exec or signal strategies would act as root without saying so
    (a signal sent as root reaches every process, whoever owns it)."""
    if (os.geteuid() if euid is None else euid) != 0:
        return None
    unnamed = [
        name
        for name, params in strategies.items()
        if isinstance(params, ExecParams | SignalParams) and params.user is None
    ]
    if not unnamed:
        return None
    return (
        f"healer runs as root and exec or signal strategies {', '.join(sorted(unnamed))} have no user: they act as"
        " root; give each a user (docs/least-privilege.md)"
    )


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


def _signal_name(name: str) -> str:
    """The canonical `SIGNAME` of a signal given with or without its `SIG` prefix, in any case."""
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
    # Send the signal as this user (name or id) and group, as exec runs: the kernel then checks that user's
    # permission, so a strategy can only reach that user's processes. Unset: healer's own user.
    user: UserField | None = None
    group: GroupField | None = None

    @field_validator("signal")
    @classmethod
    def _known_signal(cls, name: str) -> str:
        return _signal_name(name)

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


BUILTIN_PARAMS: dict[str, type[StrategyParams]] = {
    "exec": ExecParams,
    "http": HttpParams,
    "signal": SignalParams,
    "systemd": SystemdParams,
}
"""The parameter model of each built-in strategy type, by type name."""


class UnknownStrategyTypeError(KeyError):
    """No strategy type of that name is registered."""

    def __str__(self) -> str:
        return f"unknown strategy type {self.args[0]!r}; known types: {', '.join(self.args[1])}"


class DuplicateStrategyTypeError(ValueError):
    """A strategy type of that name is registered already."""


class StrategyKind(Protocol):
    """What config needs of one strategy type: its name and its parameter model."""

    @property
    def name(self) -> str: ...

    @property
    def params(self) -> type[StrategyParams]: ...


class StrategyKinds(Protocol):
    """What config needs of a strategy registry: the type names, and each type by name.

    `healer.strategies.base.StrategyRegistry` has this shape; `get` raises KeyError for an unknown name.
    """

    def __iter__(self) -> Iterator[str]: ...

    def get(self, name: str) -> StrategyKind: ...


def published_strategy_types(group: str = STRATEGY_ENTRY_POINTS) -> list[Any]:
    """Load what every entry point of `group` publishes: a strategy type, or a factory that returns one.

    The objects are taken as they come (duck-typed), so config can read their `name` and `params`
    without importing the runners' registry.
    """
    published = []
    for entry in entry_points(group=group):
        loaded = entry.load()
        published.append(loaded() if callable(loaded) else loaded)
    return published


@dataclass(frozen=True)
class _ParamsOnly:
    name: str
    params: type[StrategyParams]


class ParamsCatalog:
    """Parameter models by strategy type name, without runners: what config validates against."""

    def __init__(self, kinds: dict[str, type[StrategyParams]]) -> None:
        self._kinds = dict(kinds)

    @classmethod
    def installed(cls) -> ParamsCatalog:
        """The built-in types plus every type the `healer.strategies` entry points publish."""
        kinds = dict(BUILTIN_PARAMS)
        for published in published_strategy_types():
            if published.name in kinds:
                raise DuplicateStrategyTypeError(f"strategy type {published.name!r} is registered twice")
            kinds[published.name] = published.params
        return cls(kinds)

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._kinds))

    def get(self, name: str) -> StrategyKind:
        """The type called `name`, as its name and parameter model."""
        try:
            return _ParamsOnly(name, self._kinds[name])
        except KeyError:
            raise UnknownStrategyTypeError(name, sorted(self._kinds)) from None
