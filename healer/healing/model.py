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
class OpenRequest:
    """A firing alert from the inbox and what the engine decided for it."""

    position: InboxPosition
    alert: WebhookAlert
    rule: str | None
    state: EpisodeState
    first: NewAction | None
    events: Sequence[Event] = ()


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
