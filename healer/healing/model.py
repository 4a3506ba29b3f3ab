"""What healing is made of: episodes, their steps, the states and outcomes they pass through.

These are plain values: storage takes and returns them, the engine decides with them. Nothing
here does I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from healer.healing.payload import WebhookAlert
from healer.matchers import Matcher


class EpisodeState(enum.StrEnum):
    """Where an episode stands; every state but OPEN is final."""

    OPEN = "open"
    HEALED = "healed"
    ESCALATED = "escalated"
    RESOLVED = "resolved"
    UNMATCHED = "unmatched"
    DRY_RUN = "dry_run"
    UNVERIFIED = "unverified"
    # A rule matched but healing.enabled is false.
    DISABLED = "disabled"
    # Not acted on while its alert flaps; the first episode of the spell escalated (reason flapping).
    FLAPPING = "flapping"
    # Not acted on because healing was suspended for it (circuit breaker open, the rule's budget spent);
    # people are told once for all such episodes, by HealingSuspended, not per episode.
    SUSPENDED = "suspended"

    @property
    def is_final(self) -> bool:
        return self is not EpisodeState.OPEN


class ActionState(enum.StrEnum):
    """Where a step stands: pending → running → verifying → done, or via awaiting_approval."""

    PENDING = "pending"
    AWAITING_APPROVAL = "awaiting_approval"
    RUNNING = "running"
    # The strategy ran; only its verification is left, so a restart must not run it again.
    VERIFYING = "verifying"
    DONE = "done"


class Outcome(enum.StrEnum):
    """How a step ended: verified either way, failed to act, or did not run (and why)."""

    HEALED = "healed"
    NOT_HEALED = "not_healed"
    UNVERIFIED = "unverified"
    FAILED = "failed"
    TIMEOUT = "timeout"
    INTERRUPTED = "interrupted"
    CANCELLED = "cancelled"
    DRY_RUN = "dry_run"


# The outcomes that say whether a strategy heals: verified either way, or failed to act.
LEARNING_OUTCOMES = (Outcome.HEALED, Outcome.NOT_HEALED, Outcome.FAILED, Outcome.TIMEOUT)


class SkipReason(enum.StrEnum):
    """Why a step did not run, or an alert was not acted on: the values of `healer_skipped_total{reason}`."""

    NO_RULE = "no_rule"
    DUPLICATE = "duplicate"
    COOLDOWN = "cooldown"
    MAX_ATTEMPTS = "max_attempts"
    CIRCUIT_OPEN = "circuit_open"
    CONCURRENCY = "concurrency"
    UNSAFE_LABEL = "unsafe_label"
    DRY_RUN = "dry_run"
    APPROVAL_PENDING = "approval_pending"
    APPROVAL_EXPIRED = "approval_expired"
    REJECTED = "rejected"
    RESOLVED = "resolved"
    STRATEGY_NOT_ALLOWED = "strategy_not_allowed"
    DISABLED = "disabled"
    # A guard of the rule did not hold (or Prometheus could not tell: guards fail closed).
    GUARD = "guard"
    # The rule's max_concurrent_per or blast_radius held the step back.
    BLAST_RADIUS = "blast_radius"
    # A pause (from the API, a pause_when query or a maintenance window) covered the alert.
    PAUSED = "paused"
    # The alert opened too many episodes within the flapping window.
    FLAPPING = "flapping"
    # The rule's own action budget is spent.
    BUDGET = "budget"
    # The store's latest health check failed (deleted, full, read-only, damaged, unreachable): what a step
    # did could not be kept, so none starts until the store can keep it.
    STORE_NOT_READY = "store_not_ready"


# An audit event: its kind and what it records.
Event = tuple[str, dict[str, Any]]


@dataclass(frozen=True)
class NewAction:
    """A step to schedule: which strategy, which attempt, and not before when."""

    attempt: int
    step: int
    rule: str
    strategy: str
    not_before: float


@dataclass(frozen=True, order=True)
class InboxPosition:
    """Where an alert sits in the inbox: its delivery (one webhook request) and its index there."""

    delivery: int
    index: int


@dataclass(frozen=True)
class InboxItem:
    """One accepted alert that the engine has not processed yet."""

    position: InboxPosition
    received_at: float
    alert: WebhookAlert


@dataclass(frozen=True)
class FlapPolicy:
    """When an alert flaps: it opened `episodes` episodes within `window` seconds."""

    episodes: int
    window: float


class Flap(enum.StrEnum):
    """What flapping does to a new episode: the first of a spell escalates, the later ones are only recorded."""

    ESCALATE = "escalate"
    SUPPRESS = "suppress"


@dataclass(frozen=True)
class OpenRequest:
    """A firing alert from the inbox and what the engine decided for it."""

    position: InboxPosition
    alert: WebhookAlert
    rule: str | None
    state: EpisodeState
    first: NewAction | None
    events: Sequence[Event] = ()
    flapping: FlapPolicy | None = None


@dataclass(frozen=True)
class Episode:
    """One firing of one alert, keyed by (fingerprint, starts_at)."""

    id: int
    fingerprint: str
    starts_at: str
    starts_at_epoch: float
    alertname: str
    labels: dict[str, str]
    annotations: dict[str, str]
    rule: str | None
    state: EpisodeState
    created_at: float
    ended_at: float | None
    resolved_at: float | None
    silence_id: str | None


@dataclass(frozen=True)
class Opened:
    """What opening an episode did: the episode, whether it is new, and until when a cooldown defers it."""

    episode: Episode
    created: bool
    deferred_until: float | None
    # Set when the alert flaps: the episode is not acted on.
    flap: Flap | None = None
    # The first step when it is due at once, created taken by the replica that opened the episode.
    first: Action | None = None


@dataclass(frozen=True)
class Action:
    """One step of an episode's ladder, as recorded."""

    id: int
    episode_id: int
    attempt: int
    step: int
    rule: str
    strategy: str
    state: ActionState
    outcome: Outcome | None
    skip_reason: str | None
    not_before: float
    approval_deadline: float | None
    approved: bool
    created_at: float
    started_at: float | None
    finished_at: float | None
    plan: dict[str, Any] | None
    detail: str | None
    exit_code: int | None
    output: str | None
    # The replica that took the step (to run it, or that ran it), and until when its claim holds.
    replica: str | None = None
    lease_until: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


@dataclass(frozen=True)
class Resolution:
    """What a resolved notification did: the episode, its steps cancelled, and those still running."""

    episode: Episode | None
    cancelled: list[Action]
    running: list[Action]


@dataclass(frozen=True)
class Escalation:
    """The HealingFailed alert of an escalated episode and where its delivery stands.

    `next_send` is when to post it next (None once nothing is left to send); `resolved_at` is when
    the escalated alert stopped firing, so that the next post resolves HealingFailed.
    """

    episode_id: int
    rule: str
    reason: str
    created_at: float
    next_send: float | None
    sent_at: float | None
    failures: int
    resolved_at: float | None


@dataclass(frozen=True)
class Agenda:
    """What the engine must do now, and when it must look again."""

    due: list[Action]
    expired_approvals: list[Action]
    escalations: list[Escalation]
    next_wake: float | None


@dataclass(frozen=True)
class ActionFilter:
    """Which steps of the audit trail to list."""

    alertname: str | None = None
    fingerprint: str | None = None
    episode_id: int | None = None
    rule: str | None = None
    strategy: str | None = None
    outcome: str | None = None
    since: float | None = None
    until: float | None = None
    limit: int = 100


@dataclass(frozen=True)
class Finish:
    """How a step ended, and what follows from it, written in one transaction."""

    outcome: Outcome
    detail: str = ""
    skip_reason: str | None = None
    exit_code: int | None = None
    output: str | None = None
    plan: dict[str, Any] | None = None
    started_at: float | None = None
    next_action: NewAction | None = None
    episode_state: EpisodeState | None = None
    # Why the episode goes to people; with episode_state ESCALATED it queues HealingFailed.
    escalation: str | None = None
    cooldown: tuple[float, int] | None = None
    events: Sequence[Event] = field(default_factory=tuple)


@dataclass(frozen=True)
class HealingCounts:
    """Totals for the status report: alerts received, episodes by state, steps by outcome, times to heal."""

    alerts_received: int
    episodes: dict[str, int]
    actions: dict[str, int]
    heal_seconds: list[float]


@dataclass(frozen=True)
class Pause:
    """An operator's pause: alerts its matchers select are recorded but not acted on until it ends."""

    id: int
    # In Alertmanager's syntax, as given (every one must hold; none selects every alert).
    matchers: list[str]
    reason: str
    created_by: str
    created_at: float
    ends_at: float
    ended_at: float | None = None
    ended_by: str | None = None

    def active(self, now: float) -> bool:
        """Whether the pause holds at `now`: neither ended nor expired."""
        return self.ended_at is None and now < self.ends_at

    def covers(self, labels: dict[str, str]) -> bool:
        """Whether every matcher of the pause holds for an alert's labels."""
        return all(Matcher.parse(text).matches(labels) for text in self.matchers)

    def to_json(self, now: float) -> dict[str, Any]:
        return {k: getattr(self, k) for k in self.__dataclass_fields__} | {"active": self.active(now)}


class Charge(enum.StrEnum):
    """What charging the action budgets said: charged, or which budget refused."""

    CHARGED = "charged"
    # The global budget is spent (its circuit breaker is open).
    CIRCUIT_OPEN = "circuit_open"
    # The rule's own budget (for the alert's label group) is spent.
    SCOPE_SPENT = "scope_spent"


@dataclass(frozen=True)
class BudgetScope:
    """A budget beside the global one: `limit` actions per `window` for one key (a rule, a label group)."""

    key: str
    limit: int
    window: float


@dataclass(frozen=True)
class Suspension:
    """Episodes that healing holds back for one reason and rule: ended suspended since a time, or held now."""

    reason: str
    rule: str
    suspended: int
    held: int
