"""What healer asks of a store, one interface per concern; each backend implements all of them.

Every method is one transaction: a crash leaves all of a decision on disk or none of it. Methods
take and return domain values, never rows or connections, and raise StoreUnavailableError when the
store cannot answer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from healer.auth.sessions import SessionStore
from healer.healing.model import (
    Action,
    ActionFilter,
    Agenda,
    BudgetScope,
    Charge,
    Episode,
    Escalation,
    Finish,
    HealingCounts,
    InboxItem,
    InboxPosition,
    Opened,
    OpenRequest,
    Pause,
    Resolution,
    Suspension,
)
from healer.healing.model import Outcome as StepOutcome
from healer.healing.payload import WebhookAlert
from healer.optimizer.model import CandidateRecord, Outcome, Trial
from healer.planner.model import Goal, GoalState, NewGoal
from healer.storage.audit import AuditEntry, OperatorAct
from healer.storage.health import StoreHealth


class Inbox(Protocol):
    """Webhook deliveries, each kept as received until the engine has processed every alert of it."""

    async def accept(self, body: bytes, alerts: int) -> int:
        """Make one validated delivery durable (batched with concurrent ones); return its id."""
        ...

    async def unprocessed(self, limit: int = 500) -> list[InboxItem]:
        """The next alerts the engine has not processed, in order; a delivery may span several calls."""
        ...

    async def depth(self) -> int:
        """Alerts accepted and not yet processed."""
        ...

    @property
    def discarded_alerts(self) -> int:
        """Alerts of stored deliveries that the payload format no longer accepts, skipped so far."""
        ...

    async def purge(self, older_than: float) -> int:
        """Delete processed deliveries older than a time; return how many."""
        ...


class HealingRecords(Protocol):
    """Episodes, their steps, cooldowns, escalations and the audit trail."""

    async def open_episodes(
        self, requests: Sequence[OpenRequest], replica: str | None = None, until: float = 0.0
    ) -> list[Opened]:
        """Create the episodes of firing alerts with their first steps, and move the inbox past them.

        With `replica`, a first step due at once is created taken by that replica until `until` and
        returned (`Opened.first`), so that the replica that opened the episode starts it without asking
        the store for it again.

        An episode that exists already is left alone (Alertmanager re-sends); a first step waits out
        its rule's cooldown for that alert (`healing.rules.defer_for_cooldown`); an alert that flaps
        (`healing.rules.flapping`) gets an episode without steps, escalated for the first of a spell.
        """
        ...

    async def resolve_episode(self, position: InboxPosition, alert: WebhookAlert) -> Resolution:
        """Record a resolved notification: cancel the episode's open steps, report its running ones."""
        ...

    async def get_episode(self, episode_id: int) -> Episode | None: ...

    async def set_silence(self, episode_id: int, silence_id: str | None) -> None: ...

    async def episodes_with_silences(self) -> list[Episode]:
        """Episodes that ended while their silence was still recorded."""
        ...

    async def get_action(self, action_id: int) -> Action | None: ...

    async def agenda(self, now: float, replica: str) -> Agenda:
        """Due steps (not taken by another replica whose claim holds), expired approvals, due escalations,
        and when to look again, in one read."""
        ...

    async def take(self, action_id: int, replica: str, now: float, until: float) -> Episode | None:
        """Reserve a pending step for one replica until `until` and return its episode; None when another
        replica holds it (or it is no longer pending)."""
        ...

    async def give_back(self, action_id: int, replica: str) -> None:
        """Return a step this replica took and did not run (it is stopping), for any replica to take."""
        ...

    async def claim(self, action_id: int, plan: dict[str, Any] | None, replica: str) -> bool:
        """Move a pending step to running for this replica (which took it, or nobody did); False when a
        cancellation or another replica won."""
        ...

    async def hold(self, action_id: int, replica: str, reason: str, detail: str) -> None:
        """Record on a pending step that this replica holds it back, and why (a pause, a guard, blast radius)."""
        ...

    async def suspensions(self, since: float) -> list[Suspension]:
        """Per skip reason and rule: episodes ended suspended since `since`, and steps held back now."""
        ...

    async def await_approval(self, action_id: int, deadline: float, plan: dict[str, Any] | None) -> bool:
        """Park a pending step until someone approves it or the deadline passes."""
        ...

    async def approve(self, action_id: int, approver: str) -> bool:
        """Return an awaiting step to pending with its approval recorded."""
        ...

    async def mark_verifying(
        self, action_id: int, detail: str, replica: str, failed: StepOutcome | None = None
    ) -> bool:
        """Record that a step's strategy has run and only its verification is left (again, harmlessly,
        when it was recorded already), or with `failed` how it failed to act, recorded as its outcome
        until the step ends; False when the replica's claim was lost (fencing)."""
        ...

    async def adopt(self, action_id: int, replica: str, until: float, abandoned_before: float) -> Action | None:
        """Take over a verifying step whose replica's claim ended before `abandoned_before` (or that an
        earlier process of this replica held), to verify it here until `until`; None when another replica
        holds it or it has ended."""
        ...

    async def abandoned(self, now: float) -> list[Action]:
        """Running or verifying steps whose replica's claim ended before `now` (it stopped renewing)."""
        ...

    async def running_actions(self) -> list[Action]: ...

    async def finish(
        self, action_id: int, finish: Finish, replica: str | None = None, abandoned_before: float | None = None
    ) -> bool:
        """Record how a step ended and what follows (`healing.rules.after_step`); False if it had ended.

        With `replica`, a running or verifying step is finished only by the replica whose claim on it
        still holds (fencing): a replica that lost its claim never finishes the step as its own. With
        `abandoned_before`, it is finished only if its claim ran out before then (another replica
        settles it).
        """
        ...

    async def strategy_outcomes(self) -> dict[tuple[str, str], tuple[int, int]]:
        """Per (rule, strategy): steps that healed, and steps whose outcome says whether they healed."""
        ...

    async def tried_strategies(self, episode_id: int) -> set[str]: ...

    async def get_escalation(self, episode_id: int) -> Escalation | None: ...

    async def escalation_sent(self, episode_id: int, next_send: float | None) -> None:
        """Record that Alertmanager took HealingFailed; `next_send` None means it was the resolving post."""
        ...

    async def escalation_failed(self, episode_id: int, next_send: float | None, reason: str) -> None:
        """Record a failed post of HealingFailed; with `next_send` None healer gives up on it."""
        ...

    async def escalation_withdrawn(self, episode_id: int) -> None:
        """The alert resolved before HealingFailed ever reached Alertmanager: nobody needs paging."""
        ...

    async def escalation_stopped_firing(self, episode_id: int) -> None:
        """The escalated alert no longer fires: resolve HealingFailed with the next send, which is now."""
        ...

    async def list_actions(self, query: ActionFilter) -> list[tuple[Action, Episode]]:
        """Steps newest first, filtered, each with its episode."""
        ...

    async def events(self, episode_id: int) -> list[dict[str, Any]]:
        """An episode's audit events in order."""
        ...

    async def operator_acts(self, limit: int = 100) -> list[AuditEntry]:
        """Operators' acts outside any episode (circuit closed, goal opened or cancelled, optimisation
        acknowledged), newest first, each with who did it."""
        ...

    async def counts(self) -> HealingCounts: ...

    async def purge(self, older_than: float) -> int:
        """Delete finished episodes, with their steps and events, and operators' acts older than a time; return
        how many episodes."""
        ...


class GoalRecords(Protocol):
    """Goals, at most one open per key."""

    async def get(self, goal_id: int) -> Goal:
        """The goal with that id; raises GoalNotFoundError."""
        ...

    async def open_goals(self) -> list[Goal]:
        """Every pending or in-progress goal, by priority, then age."""
        ...

    async def open_summary(self) -> tuple[dict[GoalState, int], float | None]:
        """How many goals are pending and in progress, and the progress of the one in progress."""
        ...

    async def ended_since(self, keys: Sequence[str], since: float) -> set[str]:
        """Those of `keys` that had a goal end at or after `since`."""
        ...

    async def recent(self, state: GoalState | None = None, limit: int = 100) -> list[Goal]: ...

    async def create(self, goals: Sequence[NewGoal], now: float, by: str | None = None) -> list[Goal]:
        """Open each goal whose key has no open goal yet; return the ones opened. With `by` (an operator's goal),
        record GOAL_OPENED by that name for each, in the same transaction."""
        ...

    async def change(
        self, goal_id: int, change: Callable[[Goal], Goal], act: tuple[OperatorAct, str] | None = None
    ) -> Goal:
        """Apply a planner rule to a goal and write the result, atomically; the rule's errors roll back. With
        `act` (what, who), an operator's change such as a cancel is recorded in the same transaction."""
        ...

    async def counts(self) -> dict[str, int]: ...

    async def purge(self, older_than: float) -> int: ...


class TrialRecords(Protocol):
    """Optimisation trials: one per application of a candidate."""

    async def in_flight(self) -> Trial | None: ...

    async def begin(
        self, candidate: str, component: str, confidence: float, score: float, before: float, now: float
    ) -> Trial: ...

    async def measuring(self, trial_id: int, measure_at: float, detail: str) -> Trial: ...

    async def rolling_back(
        self, trial_id: int, verdict: Outcome, detail: str, after: float | None, improvement: float | None
    ) -> Trial: ...

    async def end(
        self,
        trial_id: int,
        outcome: Outcome,
        detail: str,
        now: float,
        after: float | None = None,
        improvement: float | None = None,
    ) -> Trial: ...

    async def discard(self, trial_id: int) -> None: ...

    async def acknowledge(self, candidate: str, now: float, by: str) -> bool:
        """Mark the candidate's failed rollback as undone by a person, recording OPTIMIZATION_ACKNOWLEDGED by
        `by`; False (nothing recorded) when its last trial is not a failed rollback waiting for that."""
        ...

    async def history(self, limit: int = 100) -> list[Trial]: ...

    async def records(self) -> dict[str, CandidateRecord]: ...

    async def last_ended(self) -> float | None: ...

    async def purge(self, older_than: float) -> int: ...


class PauseRecords(Protocol):
    """Operators' pauses, durable and the same for every replica."""

    async def create(self, matchers: Sequence[str], reason: str, created_by: str, now: float, ends_at: float) -> Pause:
        """Record a pause from `now` until `ends_at`."""
        ...

    async def active(self, now: float) -> list[Pause]:
        """The pauses neither ended nor expired at `now`, oldest first."""
        ...

    async def recent(self, limit: int = 100) -> list[Pause]:
        """Pauses newest first, ended and expired ones included."""
        ...

    async def end(self, pause_id: int, ended_by: str, now: float) -> Pause | None:
        """End a pause before its expiry; None when there is no such pause or it has ended already."""
        ...


class SessionRecords(SessionStore, Protocol):
    """The console's sessions, each by the SHA-256 digest of its id (never the id), with its user's name, roles
    and credential kind, when it opened and expires, and who closed it when; and the one CSRF secret that
    every replica derives its tokens from. A session is kept until it expires, closed or not."""


class Coordination(Protocol):
    """What replicas share beyond the records: the action budget and its circuit breaker, concurrency
    slots, the renewal of claims, and the leader. With one healer per store it is just as true."""

    async def charge_budget(
        self, now: float, limit: int, window: float, reset: float, scope: BudgetScope | None = None
    ) -> Charge:
        """Take one action from the global budget of `limit` per `window` and, with `scope`, from that
        budget too, both or neither. CIRCUIT_OPEN, with the circuit breaker open for `reset` seconds,
        when the global budget is spent or the breaker is open already; SCOPE_SPENT when the scope's is."""
        ...

    async def circuit_open(self, now: float) -> bool:
        """Whether the circuit breaker is open (it closes by itself `reset` after it opened)."""
        ...

    async def close_circuit(self, by: str) -> None:
        """Close the circuit breaker and forget the spent budget, as an operator's reset does; record
        CIRCUIT_CLOSED by `by` in the same transaction."""
        ...

    async def take_slot(
        self, replica: str, strategy: str, now: float, until: float, limit: int, strategy_limit: int
    ) -> int | None:
        """A concurrency slot for one strategy run, or None when `limit` steps in all or `strategy_limit`
        of this strategy run already (slots whose claim ended do not count)."""
        ...

    async def take_group_slot(self, replica: str, group: str, now: float, until: float, limit: int) -> int | None:
        """A slot for healing one episode of a label group (blast radius), or None when `limit` are held;
        it does not count against the strategy slots. Released with `release_slot`."""
        ...

    async def take_share(self, group: str, episode_id: int, now: float, window: float, limit: int) -> bool:
        """Count an episode as acted on in its group, unless `limit` other episodes of the group were
        within `window` (an episode counted already always may go on)."""
        ...

    async def release_slot(self, slot: int) -> None: ...

    async def forget(self, replica: str) -> None:
        """Drop the slots and give back the steps an earlier process of this replica held: a replica that
        starts holds nothing yet, and renewing what its dead predecessor held would keep it forever."""
        ...

    async def renew(self, replica: str, until: float) -> None:
        """Extend the replica's claims (its taken, running and verifying steps, its slots) to `until`."""
        ...

    async def lead(self, replica: str, now: float, until: float) -> bool:
        """Become or stay the leader until `until`, unless another replica's leadership still holds."""
        ...

    async def resign(self, replica: str) -> None:
        """Give up the leadership (at a clean stop), so that another replica takes it at once."""
        ...


class Storage(Protocol):
    """One store: its records per concern, opened and migrated, and closed once."""

    @property
    def shared(self) -> bool:
        """Whether several replicas share this store; when not, one healer owns it (SQLite's lock file)."""
        ...

    @property
    def inbox(self) -> Inbox: ...

    @property
    def healing(self) -> HealingRecords: ...

    @property
    def goals(self) -> GoalRecords: ...

    @property
    def trials(self) -> TrialRecords: ...

    @property
    def coordination(self) -> Coordination: ...

    @property
    def pauses(self) -> PauseRecords: ...

    @property
    def sessions(self) -> SessionRecords: ...

    async def health(self) -> StoreHealth:
        """Whether the store can keep what is written to it now, and if not why (a fixed reason)."""
        ...

    async def close(self) -> None: ...
