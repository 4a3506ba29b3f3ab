"""The sections of `healer.yml` as validated, immutable models."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal, Protocol

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    ValidationInfo,
    field_validator,
    model_validator,
)

from healer.config.goals import GoalPriority, GoalType, parse_priority
from healer.config.http_client import HTTPClientConfig, TLSClientConfig
from healer.config.secrets import SecretRef
from healer.config.secrets import check_names as check_secret_names
from healer.config.strategy_params import StrategyParams
from healer.matchers import InvalidMatcherError, Matcher
from healer.types import Duration, PositiveDuration, Regex

GRAFANA_TOKEN_ENV = "HEALER_GRAFANA_TOKEN"  # noqa: S105 - the variable's name, not a secret
TOKEN_ENV = "HEALER_TOKEN"  # noqa: S105 - the variable's name, not a secret
STORE_PASSWORD_ENV = "HEALER_STORE_PASSWORD"  # noqa: S105 - the variable's name, not a secret


class _Named(Protocol):
    @property
    def name(self) -> str: ...


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _matcher(value: object) -> Matcher:
    if isinstance(value, Matcher):
        return value
    if not isinstance(value, str):
        raise ValueError(f"a matcher is a string such as 'alertname=\"X\"', not {value!r}")
    try:
        return Matcher.parse(value)
    except InvalidMatcherError as exc:
        raise ValueError(str(exc)) from exc


MatcherField = Annotated[Matcher, BeforeValidator(_matcher), PlainSerializer(str)]


def _listen(value: str) -> str:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{value!r} is not HOST:PORT (for example 127.0.0.1:9877)")
    return value


ListenAddress = Annotated[str, BeforeValidator(_listen)]


def _url(value: str) -> str:
    if not isinstance(value, str) or not value.startswith(("http://", "https://")):
        raise ValueError(f"{value!r} is not an http:// or https:// URL")
    return value.rstrip("/")


Url = Annotated[str, BeforeValidator(_url)]


def split_listen(address: str) -> tuple[str, int]:
    """Split HOST:PORT, accepting bracketed IPv6 hosts."""
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    """Tell whether a listen host only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _secret(variable: str, path: Path | None, environ: dict[str, str] | None) -> SecretStr | None:
    """A secret from the environment variable first, then from the file; None when neither gives one."""
    env = os.environ if environ is None else environ
    token = env.get(variable, "").strip()
    if not token and path is not None:
        token = path.read_text().strip()
    # An empty token would make every request fail authentication; treat it as none.
    return SecretStr(token) if token else None


class AuthConfig(_Strict):
    # Deprecated: one shared token with the alertmanager and operator roles; prefer the web config file.
    bearer_token_file: Path | None = None
    # Prometheus users expect to scrape without a login: when true, /metrics answers without a
    # credential even when credentials are configured (it holds no secrets, only healer's state).
    metrics_open: bool = False

    def resolve_token(self, environ: dict[str, str] | None = None) -> SecretStr | None:
        """Return the bearer token: the environment variable first, then the file (a blank one counts as none;
        healer.auth, which serves requests, refuses a blank file instead)."""
        return _secret(TOKEN_ENV, self.bearer_token_file, environ)


class ServerConfig(_Strict):
    listen: ListenAddress = "127.0.0.1:9877"
    # This replica's name in the audit trail, /metrics and the status; HEALER_REPLICA overrides it.
    # Default: the host name and process id.
    replica: str | None = Field(default=None, pattern=r"^[A-Za-z0-9_.:-]{1,64}$")
    external_url: Url | None = None
    auth: AuthConfig = AuthConfig()
    # The exporter-toolkit web configuration file (basic_auth_users, tls_server_config and healer's
    # roles and tokens), as node_exporter and Prometheus read it; `--web.config.file` overrides it.
    web_config_file: Path | None = None
    log_format: Literal["text", "json"] = "text"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    max_request_bytes: int = Field(default=1024 * 1024, ge=1024)
    # How long a client may take to send a request's line and headers, from the connection's start or from
    # the first byte of its next request. An Alertmanager's head is a few hundred bytes, one packet even on
    # a slow link; only a client holding connections open on purpose needs more than a second or two.
    header_timeout: PositiveDuration = 10.0
    # How long a client may take to send a whole body once its head has arrived: the largest body
    # (max_request_bytes, 1 MiB) in 60 s needs about 140 kbit/s, and Alertmanager's notifications are a
    # few kB to a few hundred kB.
    body_timeout: PositiveDuration = 60.0
    # Bodies above this size (and bodies of unknown length) are large: at most max_large_bodies of them are
    # read at once, so the memory they take is bounded (each costs about three times its size while it is
    # decoded and stored). 256 KiB is an Alertmanager notification of some 250 alerts; more at once is a
    # storm that Alertmanager retries after the 503.
    large_body_bytes: int = Field(default=256 * 1024, ge=1024)
    max_large_bodies: int = Field(default=16, ge=1)
    shutdown_timeout: Duration = 30.0


class UpstreamConfig(HTTPClientConfig):
    # tls_config, basic_auth and bearer_token_file (healer.config.http_client), as Prometheus's http_config.
    url: Url
    timeout: Duration = 5.0
    check_interval: PositiveDuration = 15.0


class PrometheusConfig(UpstreamConfig):
    url: Url = "http://127.0.0.1:9090"


class AlertmanagerConfig(UpstreamConfig):
    url: Url = "http://127.0.0.1:9093"
    # Like Prometheus's rules.alert.resend-delay: a firing HealingFailed is posted again this often,
    # valid for four times as long, so Alertmanager keeps it while healer runs and drops it if healer dies.
    resend_interval: PositiveDuration = 60.0
    # The other Alertmanagers of url's cluster. Gossip shares silences and the notification log, not
    # alerts: HealingFailed is posted to url and every peer, as Prometheus posts to each; silences go
    # to url, or to a peer while url is unreachable.
    peers: list[Url] = Field(default_factory=list)


def _postgres_url(value: str) -> str:
    """A PostgreSQL URL without a password: the password comes from password_file or the environment."""
    if not re.match(r"^postgres(ql)?://[^/?#]+(/[^/?#]*)?([?][^#]*)?$", value):
        # The value itself is not repeated: a malformed URL may carry a password.
        raise ValueError("must look like postgresql://USER@HOST:PORT/DATABASE")
    authority = value.split("://", 1)[1].split("/", 1)[0]
    if "@" in authority and ":" in authority.rsplit("@", 1)[0]:
        raise ValueError(
            "must not contain a password; put it in store.password_file or the environment variable "
            + STORE_PASSWORD_ENV
        )
    if "password=" in value.lower():
        raise ValueError("must not contain a password parameter; use store.password_file or " + STORE_PASSWORD_ENV)
    return value


class StoreConfig(_Strict):
    # The SQLite file of a single healer; exclusive with `url`.
    path: Path = Path("healer.db")
    # PostgreSQL, shared by any number of replicas.
    url: Annotated[str, AfterValidator(_postgres_url)] | None = None
    password_file: Path | None = None
    retention: Duration = 30 * 86400.0
    # About 600 MB of webhook bodies; beyond it Alertmanager is told to retry instead of filling the disk.
    max_backlog: int = Field(default=1_000_000, ge=1)
    # How long a replica's claim on a step, a concurrency slot or the leadership lasts unless renewed;
    # a replica renews at a quarter of it, so a dead replica's work moves on within about this long.
    lease: PositiveDuration = 4.0
    # Connections each replica keeps to PostgreSQL.
    pool_size: int = Field(default=10, ge=2, le=100)
    # The SQLite write-ahead log is checkpointed and truncated to stay about this size (4 MiB).
    wal_max_bytes: int = Field(default=4 * 1024 * 1024, ge=64 * 1024)

    @model_validator(mode="after")
    def _one_backend(self) -> StoreConfig:
        if self.url is not None and "path" in self.model_fields_set:
            raise ValueError("set either path (SQLite) or url (PostgreSQL), not both")
        if self.password_file is not None and self.url is None:
            raise ValueError("password_file is for a PostgreSQL store: set url too")
        return self

    @property
    def shared(self) -> bool:
        """Whether replicas share this store (PostgreSQL) rather than one healer owning it (SQLite)."""
        return self.url is not None

    def resolve_password(self, environ: dict[str, str] | None = None) -> SecretStr | None:
        """The database password: HEALER_STORE_PASSWORD first, then password_file."""
        return _secret(STORE_PASSWORD_ENV, self.password_file, environ)


class FilesystemFilter(_Strict):
    # Pseudo and virtual filesystems whose sizes say nothing about disk space.
    exclude_fstypes: Regex = (
        r"^(autofs|binfmt_misc|bpf|cgroup2?|configfs|debugfs|devpts|devtmpfs|fusectl|hugetlbfs|"
        r"iso9660|mqueue|nsfs|overlay|proc|procfs|pstore|rpc_pipefs|securityfs|selinuxfs|"
        r"squashfs|sysfs|tracefs|tmpfs|ramfs|fuse\..*|nfsd)$"
    )
    exclude_mountpoints: Regex = r"^/(dev|proc|run|sys|var/lib/docker/.+|var/lib/containers/.+)($|/)"


class DiskFilter(_Strict):
    # Partitions, loop, RAM and optical devices: their I/O is counted on the whole disk or is noise.
    exclude: Regex = r"^(ram\d*|loop\d*|zram\d*|fd\d*|(h|s|v|xv)d[a-z]+\d+|nvme\d+n\d+p\d+|dm-\d+|sr\d+)$"


class NetworkFilter(_Strict):
    exclude: Regex = r"^$"


class ProcessWatch(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z_][a-zA-Z0-9_.-]*$")
    cmdline: Regex | None = None
    pidfile: Path | None = None

    @model_validator(mode="after")
    def _one_selector(self) -> ProcessWatch:
        if (self.cmdline is None) == (self.pidfile is None):
            raise ValueError("give exactly one of cmdline (a regex) or pidfile")
        return self


class ProbeConfig(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z_][a-zA-Z0-9_.-]*$")
    url: Url
    method: Literal["GET", "HEAD", "POST"] = "GET"
    interval: Duration = 15.0
    timeout: Duration = 5.0
    expected_status: list[int] = Field(default_factory=lambda: list(range(200, 400)))
    headers: dict[str, str] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _timeout_within_interval(self) -> ProbeConfig:
        if self.interval <= 0:
            raise ValueError("interval must be greater than 0s")
        if self.timeout > self.interval:
            raise ValueError("timeout must not exceed interval")
        return self


def _unique_names(items: Sequence[_Named], what: str) -> None:
    seen: set[str] = set()
    for item in items:
        if item.name in seen:
            raise ValueError(f"{what} name {item.name!r} is used twice")
        seen.add(item.name)


def _unique_names_of(what: str) -> AfterValidator:
    """A validator for a list whose items' names must differ; `what` names them in the error."""

    def check(items: list[Any]) -> list[Any]:
        _unique_names(items, what)
        return items

    return AfterValidator(check)


class ExporterConfig(_Strict):
    host: bool = True
    filesystems: FilesystemFilter = FilesystemFilter()
    disks: DiskFilter = DiskFilter()
    network: NetworkFilter = NetworkFilter()
    process_scan_interval: PositiveDuration = 5.0
    processes: list[ProcessWatch] = Field(default_factory=list)
    probes: list[ProbeConfig] = Field(default_factory=list)

    @model_validator(mode="after")
    def _names_unique(self) -> ExporterConfig:
        _unique_names(self.processes, "process")
        _unique_names(self.probes, "probe")
        return self


GOAL_PLACEHOLDER = re.compile(r"\{(\w+)\.([A-Za-z_][A-Za-z0-9_]*)\}")


def _labelled_query(query: str) -> str:
    """Check a query whose only placeholders are `{labels.NAME}` (goal targets, verify.query)."""
    if not query.strip():
        raise ValueError("must be a PromQL expression")
    for match in GOAL_PLACEHOLDER.finditer(query):
        if match.group(1) != "labels":
            raise ValueError(f"{match.group(0)!r}: this query can use only '{{labels.NAME}}' placeholders")
    return query


def _plain_query(query: str) -> str:
    if not query.strip():
        raise ValueError("must be a PromQL expression")
    if GOAL_PLACEHOLDER.search(query):
        raise ValueError("placeholders such as '{labels.NAME}' belong in a goal's target query, not here")
    return query


class Budget(_Strict):
    actions: int = Field(default=20, ge=1)
    window: Duration = 600.0


class HealthyWhen(_Strict):
    """A bound on the value of `verify.query`: at or below `below`, or at or above `above`."""

    below: float | None = Field(default=None, allow_inf_nan=False)
    above: float | None = Field(default=None, allow_inf_nan=False)

    @model_validator(mode="after")
    def _one_bound(self) -> HealthyWhen:
        if (self.below is None) == (self.above is None):
            raise ValueError("give exactly one of below or above: the value that counts as healed")
        return self

    def holds(self, value: float) -> bool:
        """Tell whether a value is on the healthy side of the bound (NaN never is)."""
        if self.below is not None:
            return value <= self.below
        assert self.above is not None
        return value >= self.above


class VerifyConfig(_Strict):
    within: PositiveDuration = 120.0
    interval: PositiveDuration = 5.0
    # For alerts that keep firing after a fix because of their range window: a result
    # (or a value satisfying healthy_when) means healed. {labels.NAME} becomes the alert's label
    # value as a quoted PromQL string.
    query: Annotated[str, AfterValidator(_labelled_query)] | None = None
    healthy_when: HealthyWhen | None = None
    # Within `within`: time for the fix to show in the metrics before the first check.
    settle: Duration = 0.0
    # When Prometheus cannot answer at the end of `within`, how much longer verification waits for
    # it; the first answer decides. Past it the episode escalates as unverified.
    wait_for_prometheus: Duration = 300.0

    @field_validator("healthy_when")
    @classmethod
    def _needs_query(cls, value: HealthyWhen | None, info: ValidationInfo) -> HealthyWhen | None:
        if value is not None and info.data.get("query") is None:
            raise ValueError("compares the value of verify.query: set query too")
        return value

    @field_validator("settle")
    @classmethod
    def _inside_within(cls, value: float, info: ValidationInfo) -> float:
        within = info.data.get("within")
        if within is not None and value >= within:
            raise ValueError("must be shorter than within: the checks happen between settle and within")
        return value


LabelName = Annotated[str, Field(pattern=r"^[a-zA-Z_][a-zA-Z0-9_]*$")]
Weekday = Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]
WEEKDAYS: tuple[Weekday, ...] = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")


class Guard(_Strict):
    """A precondition of a rule's steps: the step runs only while `query` returns a result."""

    # {labels.NAME} becomes the alert's label value as a quoted PromQL string.
    query: Annotated[str, AfterValidator(_labelled_query)]
    # What people read when the guard held the step back until guard_timeout.
    message: str = Field(min_length=1, max_length=500)


class ConcurrencyPerGroup(_Strict):
    """At most `limit` episodes of one group (alerts with equal values of `labels`) healed at once."""

    labels: list[LabelName] = Field(min_length=1)
    limit: int = Field(default=1, ge=1)


class BlastRadius(_Strict):
    """Of a group (alerts with equal values of `labels`, such as a job), at most `fraction` of its
    instances (as `of` counts them) acted on within `window`; at least one."""

    labels: list[LabelName] = Field(min_length=1)
    # One number: how many instances the group has, e.g. 'count(up{job={labels.job}})'.
    of: Annotated[str, AfterValidator(_labelled_query)]
    fraction: float = Field(gt=0, le=1, allow_inf_nan=False)
    window: PositiveDuration = 600.0


class RuleBudget(Budget):
    """A rule's own action budget, beside the global one; with `per`, one budget per label group."""

    per: list[LabelName] = Field(default_factory=list)


class Flapping(_Strict):
    """An alert (fingerprint) that opened `episodes` episodes within `window` is not acted on again
    until it has been quiet for `window`; it escalates once."""

    episodes: int = Field(default=4, ge=2)
    window: PositiveDuration = 600.0


class MaintenanceWindow(_Strict):
    """A recurring window in which matching alerts are recorded but not acted on."""

    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]+$")
    # Empty: every alert.
    match: list[MatcherField] = Field(default_factory=list)
    weekdays: list[Weekday] = Field(
        default_factory=lambda: list(WEEKDAYS), min_length=1
    )
    # HH:MM, local to `timezone`.
    start: str = Field(pattern=r"^([01][0-9]|2[0-3]):[0-5][0-9]$")
    duration: PositiveDuration
    timezone: str = "UTC"

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        import zoneinfo

        try:
            zoneinfo.ZoneInfo(value)
        except (zoneinfo.ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not a time zone this machine knows (such as UTC or Europe/Paris)") from None
        return value

    @field_validator("duration")
    @classmethod
    def _within_a_week(cls, value: float) -> float:
        if value > 7 * 86400:
            raise ValueError("must be at most a week: the window recurs every week")
        return value


class HealingRule(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]+$")
    match: list[MatcherField] = Field(min_length=1)
    strategies: list[str] = Field(min_length=1)
    max_attempts: int = Field(default=3, ge=1)
    cooldown: Duration = 60.0
    backoff_factor: float = Field(default=2.0, ge=1.0)
    max_backoff: Duration = 3600.0
    verify: VerifyConfig = VerifyConfig()
    silence: bool = False
    dry_run: bool | None = None
    cancel_running_on_resolve: bool = False
    # learned: each step takes the strategy not yet tried in this episode that has healed most often.
    order: Literal["config", "learned"] = "config"
    # Preconditions checked before each step, every verify.interval until guard_timeout.
    guard: list[Guard] = Field(default_factory=list)
    guard_timeout: Duration = 300.0
    max_concurrent_per: ConcurrencyPerGroup | None = None
    blast_radius: BlastRadius | None = None
    budget: RuleBudget | None = None
    # Overrides healing.flapping for this rule.
    flapping: Flapping | None = None

    def matches(self, labels: dict[str, str]) -> bool:
        """Tell whether every matcher of this rule holds for the label set."""
        return all(matcher.matches(labels) for matcher in self.match)


class HealingConfig(_Strict):
    enabled: bool = True
    dry_run: bool = False
    max_concurrent: int = Field(default=4, ge=1)
    budget: Budget = Budget()
    circuit_reset: Duration = 600.0
    approval_timeout: Duration = 900.0
    flapping: Flapping = Flapping()
    # While any of these queries returns a result (a deploy in progress, say), no step runs.
    pause_when: list[Annotated[str, AfterValidator(_plain_query)]] = Field(default_factory=list)
    # How often pause_when is asked, and how often a held step looks again at pauses.
    pause_check_interval: Annotated[PositiveDuration, Field(ge=0.1)] = 5.0
    maintenance: Annotated[list[MaintenanceWindow], _unique_names_of("maintenance window")] = Field(
        default_factory=list
    )
    rules: Annotated[list[HealingRule], _unique_names_of("rule")] = Field(default_factory=list)


Priority = Annotated[GoalPriority, BeforeValidator(parse_priority), PlainSerializer(lambda p: p.name)]


class GoalTarget(_Strict):
    # {labels.NAME} becomes the trigger series' label value as a quoted PromQL string.
    query: Annotated[str, AfterValidator(_labelled_query)]
    below: float | None = Field(default=None, allow_inf_nan=False)
    above: float | None = Field(default=None, allow_inf_nan=False)

    @model_validator(mode="after")
    def _one_bound(self) -> GoalTarget:
        if (self.below is None) == (self.above is None):
            raise ValueError("give exactly one of below or above: the value that means the goal is reached")
        return self


class GoalSpec(_Strict):
    """What a goal is, whether a template or an operator defines it."""

    type: GoalType
    priority: Priority = GoalPriority.MEDIUM
    description: str = ""
    target: GoalTarget
    plan: list[str] = Field(min_length=1)
    deadline: PositiveDuration = 3600.0
    # After each step, how long the target has to be reached before the next step of the plan runs.
    settle: PositiveDuration = 60.0


class GoalTemplate(GoalSpec):
    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]+$")
    # Each series this query returns opens one goal, keyed by the template and the series' labels.
    trigger: Annotated[str, AfterValidator(_plain_query)]
    # After a goal of a series ends, how long before the trigger may open another for it: a trend
    # query lags, and would otherwise reopen a goal that was just reached every cycle.
    cooldown: Duration = 600.0


class PlannerConfig(_Strict):
    enabled: bool = True
    interval: PositiveDuration = 30.0
    goals: Annotated[list[GoalTemplate], _unique_names_of("goal template")] = Field(default_factory=list)


class OptimizationCandidate(_Strict):
    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]+$")
    component: str = Field(min_length=1)
    # One series (or none): measured as its average over `window` before and after the change.
    metric: Annotated[str, AfterValidator(_plain_query)]
    direction: Literal["decrease", "increase"]
    apply: str
    rollback: str
    expected_improvement: float = Field(gt=0, allow_inf_nan=False)
    cost: float = Field(ge=1e-6, allow_inf_nan=False)
    confidence: float = Field(ge=0, le=1, allow_inf_nan=False)
    window: PositiveDuration = 300.0
    # After the change, how long before the "after" window starts: at least the range of any
    # rate() or *_over_time() in `metric`, whose values would otherwise reach back before the change.
    settle: Duration = 0.0
    # The relative change in the good direction that counts as "it helped".
    min_improvement: float = Field(default=0.0, ge=0, allow_inf_nan=False)
    # After a rollback or a failed apply, how long before the candidate may be tried again.
    cooldown: PositiveDuration = 3600.0


class OptimizerConfig(_Strict):
    enabled: bool = True
    interval: PositiveDuration = 60.0
    min_confidence: float = Field(default=0.7, ge=0, le=1)
    # How many outcomes the prior confidence is worth when learning from outcomes.
    prior_weight: float = Field(default=4.0, gt=0, allow_inf_nan=False)
    candidates: Annotated[list[OptimizationCandidate], _unique_names_of("candidate")] = Field(default_factory=list)


class GrafanaConfig(_Strict):
    url: Url | None = None
    api_token_file: Path | None = None
    tls_config: TLSClientConfig | None = None
    timeout: Duration = 5.0
    tags: list[str] = Field(default_factory=lambda: ["healer"])

    def resolve_token(self, environ: dict[str, str] | None = None) -> SecretStr | None:
        """The service-account token: HEALER_GRAFANA_TOKEN first, then api_token_file."""
        return _secret(GRAFANA_TOKEN_ENV, self.api_token_file, environ)


class HealerConfig(_Strict):
    server: ServerConfig = ServerConfig()
    prometheus: PrometheusConfig = PrometheusConfig()
    alertmanager: AlertmanagerConfig = AlertmanagerConfig()
    store: StoreConfig = StoreConfig()
    exporter: ExporterConfig = ExporterConfig()
    healing: HealingConfig = HealingConfig()
    grafana: GrafanaConfig = GrafanaConfig()
    planner: PlannerConfig = PlannerConfig()
    optimizer: OptimizerConfig = OptimizerConfig()
    strategies: dict[str, StrategyParams] = Field(default_factory=dict)
    # Secrets by reference ({file: PATH} or {env: NAME}), filled in as {secret.NAME} at run time only.
    secrets: Annotated[dict[str, SecretRef], AfterValidator(check_secret_names)] = Field(default_factory=dict)
