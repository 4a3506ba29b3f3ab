"""The rules of an episode's life that storage applies inside its transactions.

Storage reads the rows these rules need, asks here what follows, and writes the answer in the same
transaction, so that the decision and its effect are atomic whichever backend holds them.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from healer.healing.model import EpisodeState, Finish, Flap, FlapPolicy, NewAction


@dataclass(frozen=True)
class Deferral:
    """A first step, moved past its rule's cooldown for the alert when one is running."""

    first: NewAction
    deferred_until: float | None


def defer_for_cooldown(first: NewAction, cooldown_until: float | None) -> Deferral:
    """A new episode's first step waits until the cooldown that its rule left on the alert has passed."""
    if cooldown_until is not None and cooldown_until > first.not_before:
        return Deferral(replace(first, not_before=cooldown_until), cooldown_until)
    return Deferral(first, None)


@dataclass(frozen=True)
class Flapping:
    """Whether a new episode of an alert flaps, and until when its alert counts as flapping."""

    flap: Flap | None
    until: float | None


def flapping(policy: FlapPolicy, earlier: int, flapping_until: float | None, now: float) -> Flapping:
    """Judge a new episode from the `earlier` episodes its alert opened within the policy's window.

    An alert flaps once it opened `policy.episodes` episodes within the window: that episode escalates,
    and every later one is only recorded, until the alert has opened none for a whole window.
    """
    if flapping_until is not None and now < flapping_until:
        return Flapping(Flap.SUPPRESS, now + policy.window)
    if earlier >= policy.episodes:
        return Flapping(Flap.ESCALATE, now + policy.window)
    return Flapping(None, None)


# How a flapping escalation's reason begins. Its HealingFailed does not resolve with the alert, which
# resolves within seconds by nature; it resolves once Prometheus no longer reports the alert firing.
FLAPPING_REASON_PREFIX = "flapping:"


def flapping_reason(policy: FlapPolicy) -> str:
    """What people read about an alert that flaps."""
    return (
        f"{FLAPPING_REASON_PREFIX} the alert had opened {policy.episodes} episodes within {policy.window:g}s before"
        f" this one; healer does not act on it again until it has been quiet for {policy.window:g}s"
    )


@dataclass(frozen=True)
class AfterStep:
    """What follows a finished step: a next step, the end of its episode, and whether HealingFailed is queued."""

    schedule: NewAction | None = None
    end_as: EpisodeState | None = None
    queue_escalation: bool = False


def after_step(state: EpisodeState, resolved: bool, finish: Finish) -> AfterStep:
    """Decide what a step's end means for its episode.

    The next step is scheduled only while the episode is open and its alert has not resolved; an
    alert that resolved meanwhile ends the episode as resolved, even when the step meant to escalate,
    so that nobody is paged for what stopped by itself.
    """
    if finish.next_action is not None and state is EpisodeState.OPEN and not resolved:
        return AfterStep(schedule=finish.next_action)
    if state is not EpisodeState.OPEN:
        return AfterStep()
    if finish.episode_state is EpisodeState.ESCALATED and resolved:
        return AfterStep(end_as=EpisodeState.RESOLVED)
    if finish.episode_state is not None:
        escalates = finish.episode_state is EpisodeState.ESCALATED and finish.escalation is not None
        return AfterStep(end_as=finish.episode_state, queue_escalation=escalates)
    if resolved:
        return AfterStep(end_as=EpisodeState.RESOLVED)
    return AfterStep()


def after_resolved(state: EpisodeState, steps_running: bool) -> EpisodeState | None:
    """A resolved notification ends an open episode at once unless a step of it is running or verifying."""
    if state is EpisodeState.OPEN and not steps_running:
        return EpisodeState.RESOLVED
    return None
