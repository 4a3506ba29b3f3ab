"""Healing's and the planner's rules as pure functions, on a clock the test sets: no store, no server."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from healer.config import HealerConfig, HealingRule, parse_config
from healer.healing.ladder import STRATEGY_LABEL, Ladder, decide
from healer.healing.model import Action, ActionState, EpisodeState, Finish, NewAction, Outcome, SkipReason
from healer.healing.rules import AfterStep, Deferral, after_resolved, after_step, defer_for_cooldown
from healer.planner.model import (
    Goal,
    GoalEndedError,
    GoalPriority,
    GoalState,
    GoalStep,
    GoalType,
    Target,
    ended,
    measured,
    started,
    step_abandoned,
    step_begun,
    step_ended,
)

NOW = 10_000.0
LADDER = ["restart", "rollback", "page"]
LABELS = {"alertname": "Web"}
FINAL_STATES = [state for state in EpisodeState if state.is_final]


def config(rules: list[dict[str, Any]] | None = None, **rule: Any) -> HealerConfig:
    """A config of the three strategies of LADDER and one rule `web` for alert Web (or the rules given)."""
    web = {"name": "web", "match": ['alertname="Web"'], "strategies": LADDER, "max_attempts": 10, **rule}
    return parse_config(
        {
            "strategies": {name: {"type": "exec", "command": ["true"]} for name in LADDER},
            "healing": {"rules": rules if rules is not None else [web]},
        }
    )


def web_rule(**settings: Any) -> tuple[Ladder, HealingRule]:
    """The ladder on a clock stopped at NOW, and the rule `web` with these settings."""
    healer_config = config(**settings)
    return Ladder(healer_config, clock=lambda: NOW), healer_config.healing.rules[0]


def action(attempt: int = 1, strategy: str = "restart", step: int | None = None) -> Action:
    """A finished step of rule `web`."""
    index = LADDER.index(strategy) if step is None else step
    return Action(
        1, 1, attempt, index, "web", strategy, ActionState.DONE, Outcome.NOT_HEALED, None, 0.0, None, False,
        0.0, 0.0, 1.0, None, None, 0, None,
    )  # fmt: skip


# -- a new episode's first step and its cooldown -------------------------------------------------

FIRST = NewAction(1, 0, "web", "restart", NOW)


@pytest.mark.parametrize("cooldown_until", [None, NOW - 1, NOW])
def test_first_step_runs_when_no_cooldown_is_left(cooldown_until: float | None) -> None:
    """A first step with no cooldown, or one that ended by its time, is left as it was and not deferred."""
    assert defer_for_cooldown(FIRST, cooldown_until) == Deferral(FIRST, None)


def test_first_step_waits_out_a_running_cooldown() -> None:
    """A cooldown that lasts past the first step's time moves the step to the cooldown's end and says so."""
    deferral = defer_for_cooldown(FIRST, NOW + 300)
    assert deferral.first == replace(FIRST, not_before=NOW + 300) and deferral.deferred_until == NOW + 300


# -- what follows a step -------------------------------------------------------------------------

NEXT = NewAction(2, 1, "web", "rollback", NOW + 60)
ESCALATE = Finish(Outcome.NOT_HEALED, episode_state=EpisodeState.ESCALATED, escalation="the alert still fires")


def test_next_step_is_scheduled_while_the_episode_is_open_and_firing() -> None:
    """A step with a next one schedules it and leaves the episode open."""
    assert after_step(EpisodeState.OPEN, False, Finish(Outcome.NOT_HEALED, next_action=NEXT)) == AfterStep(NEXT)


def test_no_next_step_once_the_alert_resolved() -> None:
    """A next step is dropped when the alert resolved meanwhile; the episode ends resolved."""
    then = after_step(EpisodeState.OPEN, True, Finish(Outcome.NOT_HEALED, next_action=NEXT))
    assert then == AfterStep(end_as=EpisodeState.RESOLVED)


def test_escalation_of_a_resolved_alert_ends_resolved_and_pages_nobody() -> None:
    """A step that meant to escalate, after its alert resolved, ends the episode resolved and queues nothing."""
    assert after_step(EpisodeState.OPEN, True, ESCALATE) == AfterStep(end_as=EpisodeState.RESOLVED)


def test_escalation_queues_healing_failed_only_with_a_reason() -> None:
    """Ending escalated queues HealingFailed when the step says why; without a reason it only ends the episode."""
    assert after_step(EpisodeState.OPEN, False, ESCALATE) == AfterStep(
        end_as=EpisodeState.ESCALATED, queue_escalation=True
    )
    no_reason = replace(ESCALATE, escalation=None)
    assert after_step(EpisodeState.OPEN, False, no_reason) == AfterStep(end_as=EpisodeState.ESCALATED)


def test_a_step_ends_its_episode_in_the_state_it_names() -> None:
    """A healed step ends the episode healed, with no HealingFailed."""
    finish = Finish(Outcome.HEALED, episode_state=EpisodeState.HEALED, escalation="ignored when not escalating")
    assert after_step(EpisodeState.OPEN, False, finish) == AfterStep(end_as=EpisodeState.HEALED)


def test_a_resolved_alert_without_an_episode_state_ends_resolved() -> None:
    """A last step that names no state, after the alert resolved, ends the episode resolved."""
    assert after_step(EpisodeState.OPEN, True, Finish(Outcome.HEALED)) == AfterStep(end_as=EpisodeState.RESOLVED)


def test_a_firing_alert_without_an_episode_state_leaves_the_episode_open() -> None:
    """A step that names neither a next step nor a state changes nothing while the alert fires."""
    assert after_step(EpisodeState.OPEN, False, Finish(Outcome.INTERRUPTED)) == AfterStep()


@given(
    state=st.sampled_from(FINAL_STATES),
    resolved=st.booleans(),
    outcome=st.sampled_from(Outcome),
    next_action=st.none() | st.just(NEXT),
    episode_state=st.none() | st.sampled_from(EpisodeState),
    escalation=st.none() | st.text(max_size=5),
)
def test_an_ended_episode_is_never_touched(
    state: EpisodeState,
    resolved: bool,
    outcome: Outcome,
    next_action: NewAction | None,
    episode_state: EpisodeState | None,
    escalation: str | None,
) -> None:
    """Whatever a late step's end says, an episode in a final state gets no step, no new state and no page."""
    finish = Finish(outcome, next_action=next_action, episode_state=episode_state, escalation=escalation)
    assert after_step(state, resolved, finish) == AfterStep()


def test_a_resolution_ends_an_open_episode_unless_a_step_is_running() -> None:
    """A resolved notification ends an open episode at once, waits for a running step, and leaves ended ones."""
    assert after_resolved(EpisodeState.OPEN, steps_running=False) is EpisodeState.RESOLVED
    assert after_resolved(EpisodeState.OPEN, steps_running=True) is None
    assert all(after_resolved(state, steps_running=False) is None for state in FINAL_STATES)


# -- the ladder: which step comes next, and when --------------------------------------------------


def test_same_step_after_an_interruption_is_due_at_once() -> None:
    """An interrupted step is tried again, same strategy, as the next attempt, without backoff."""
    ladder, rule = web_rule()
    assert ladder.next_step(action(2, "rollback"), rule, same_step=True) == NewAction(3, 1, "web", "rollback", NOW)


@pytest.mark.parametrize(("attempt", "delay"), [(1, 60.0), (2, 120.0), (3, 240.0), (4, 300.0), (9, 300.0)])
def test_next_rung_waits_the_growing_backoff(attempt: int, delay: float) -> None:
    """The next rung waits cooldown * factor^(attempt-1), never more than max_backoff."""
    ladder, rule = web_rule(cooldown="1m", backoff_factor=2, max_backoff="5m")
    step = ladder.next_step(action(attempt), rule)
    assert step is not None and step.not_before == NOW + delay and step.attempt == attempt + 1


def test_the_ladder_climbs_and_its_last_rung_repeats() -> None:
    """Each step moves one rung up; once on the last rung, it stays there."""
    ladder, rule = web_rule()
    rungs = [ladder.next_step(action(1, name), rule) for name in LADDER]
    assert [(s.step, s.strategy) for s in rungs if s is not None] == [(1, "rollback"), (2, "page"), (2, "page")]


def test_no_step_once_attempts_are_used_up_or_the_rule_is_gone() -> None:
    """The attempt that reaches max_attempts is the last; a rule removed from the config schedules nothing."""
    ladder, rule = web_rule(max_attempts=3)
    assert ladder.next_step(action(2), rule) is not None
    assert ladder.next_step(action(3), rule) is None
    assert ladder.next_step(action(3), rule, same_step=True) is None
    assert ladder.next_step(action(1), None) is None


@pytest.mark.parametrize(("step", "expected"), [(1, (1, "rollback")), (7, (2, "page"))])
def test_a_config_change_keeps_the_ladder_position(step: int, expected: tuple[int, str]) -> None:
    """A step whose strategy left the ladder is followed by the rung at its position, or the last rung."""
    ladder, rule = web_rule()
    then = ladder.next_step(action(1, "retired", step=step), rule)
    assert then is not None and (then.step, then.strategy) == expected


def test_learned_order_takes_the_most_confident_untried_strategy() -> None:
    """With order: learned, the next step is the untried strategy that healed most; the last tried one repeats."""
    ladder, rule = web_rule(order="learned")
    ladder.tally.load({("web", "page"): (5, 5), ("web", "rollback"): (0, 5)})
    assert [s["strategy"] for s in ladder.learned()["web"]] == ["page", "restart", "rollback"]
    picks = [ladder.next_step(action(1, "restart"), rule, tried=tried) for tried in ({"restart"}, set(LADDER))]
    assert [(s.step, s.strategy) for s in picks if s is not None] == [(2, "page"), (0, "restart")]


def test_learned_order_breaks_ties_in_written_order() -> None:
    """Strategies equally trusted are taken in the order the rule writes them, not alphabetically."""
    ladder, rule = web_rule(order="learned", strategies=["rollback", "restart", "page"])
    then = ladder.next_step(action(1, "rollback", step=0), rule, tried={"rollback"})
    assert then is not None and (then.step, then.strategy) == (1, "restart")


@settings(deadline=None)  # parsing a config per example takes a few milliseconds, more on a busy machine
@given(
    cooldown=st.integers(min_value=0, max_value=3600),
    factor=st.floats(min_value=1.0, max_value=10.0),
    max_backoff=st.integers(min_value=0, max_value=7200),
    attempt=st.integers(min_value=1, max_value=49),
    strategy=st.sampled_from(LADDER),
)
def test_backoff_never_exceeds_max_backoff_and_attempts_grow_by_one(
    cooldown: int, factor: float, max_backoff: int, attempt: int, strategy: str
) -> None:
    """Whatever the settings, the next step comes after at most max_backoff, as the very next attempt."""
    ladder, rule = web_rule(
        cooldown=f"{cooldown}s", backoff_factor=factor, max_backoff=f"{max_backoff}s", max_attempts=50
    )
    then = ladder.next_step(action(attempt, strategy), rule)
    assert then is not None and then.attempt == attempt + 1
    assert NOW <= then.not_before <= NOW + max_backoff
    assert then.not_before == NOW + min(cooldown * factor ** (attempt - 1), max_backoff)


# -- which rule, and where on its ladder, an alert starts -------------------------------------------


def test_an_alert_no_rule_matches_is_skipped() -> None:
    """Labels no rule matches give no rule, no ladder, and the no_rule reason."""
    decision = decide(config(), {"alertname": "Other"})
    assert (decision.rule, decision.ladder, decision.skip_reason) == (None, [], SkipReason.NO_RULE)


def test_the_first_matching_rule_starts_at_the_bottom_of_its_ladder() -> None:
    """Without a strategy label the first matching rule's ladder starts at its first rung."""
    other = {"name": "other", "match": ['alertname="Web"'], "strategies": ["page"]}
    first = {"name": "web", "match": ['alertname=~"W.*"'], "strategies": LADDER}
    decision = decide(config(rules=[first, other]), LABELS)
    assert decision.rule is not None and decision.rule.name == "web"
    assert (decision.ladder, decision.start, decision.skip_reason) == (LADDER, 0, None)


def test_a_strategy_label_inside_the_ladder_starts_there() -> None:
    """healer_strategy naming a rung of the ladder starts the episode on that rung."""
    decision = decide(config(), {**LABELS, STRATEGY_LABEL: "rollback"})
    assert (decision.start, decision.skip_reason) == (1, None)


def test_a_strategy_label_outside_the_ladder_is_ignored() -> None:
    """healer_strategy naming a strategy the rule does not allow starts at the bottom and says so."""
    decision = decide(config(), {**LABELS, STRATEGY_LABEL: "format-disk"})
    assert (decision.start, decision.skip_reason) == (0, SkipReason.STRATEGY_NOT_ALLOWED)
    assert "not in its ladder" in decision.explanation


def test_a_learned_ladder_starts_with_its_most_confident_strategy() -> None:
    """With order: learned, the first step is the most trusted strategy, recorded at its written position, due now."""
    ladder, _ = web_rule(order="learned")
    ladder.tally.load({("web", "page"): (5, 5)})
    decision = ladder.decide(LABELS)
    assert decision.ladder[0] == "page"
    assert ladder.first(decision) == NewAction(1, 2, "web", "page", NOW)


# -- how a goal changes ---------------------------------------------------------------------------------


def goal(**changes: Any) -> Goal:
    """A pending goal with a two-step plan, changed as given."""
    pending = Goal(
        id=1, key="k", name="g", source="operator", type=GoalType.PERFORMANCE, priority=GoalPriority.MEDIUM,
        description="", labels={}, target=Target("q", below=10), plan=["fix", "scale"], state=GoalState.PENDING,
        created_at=1.0, deadline=1000.0, settle=5.0, trigger_value=None, started_at=None, ended_at=None,
        initial_value=None, last_value=None, progress=None, measured_at=None, next_step=0, step_started_at=None,
        step_running=False, detail="",
    )  # fmt: skip
    return replace(pending, **changes)


IN_PROGRESS = goal(state=GoalState.IN_PROGRESS, started_at=2.0, initial_value=80.0)
RUNNING = replace(IN_PROGRESS, step_running=True, step_started_at=3.0, steps=[GoalStep("fix", 3.0)])


def test_a_pending_goal_starts_with_its_first_measurement() -> None:
    """Starting records when and from what value; an unmeasured start has no measurement time."""
    begun = started(goal(), 80.0, 0.0, now=2.0)
    assert (begun.state, begun.started_at, begun.initial_value, begun.last_value) == (
        GoalState.IN_PROGRESS, 2.0, 80.0, 80.0,
    )  # fmt: skip
    assert begun.measured_at == 2.0 and started(goal(), None, None, now=2.0).measured_at is None


@pytest.mark.parametrize("state", [GoalState.IN_PROGRESS, GoalState.COMPLETED, GoalState.CANCELLED])
def test_only_a_pending_goal_starts(state: GoalState) -> None:
    """A goal already in progress or ended cannot start again."""
    with pytest.raises(GoalEndedError, match="not pending"):
        started(goal(state=state), 1.0, 0.0, now=2.0)


def test_the_first_value_measured_anchors_progress() -> None:
    """A goal started unmeasured takes its first value as the start; later values do not move it."""
    unmeasured = started(goal(), None, None, now=2.0)
    first = measured(unmeasured, 80.0, 0.0, now=3.0)
    later = measured(first, 40.0, 0.5, now=4.0)
    assert (later.initial_value, later.last_value, later.progress, later.measured_at) == (80.0, 40.0, 0.5, 4.0)


def test_an_ended_goal_takes_no_measurement() -> None:
    """Measuring an ended goal leaves it as it ended."""
    done = goal(state=GoalState.COMPLETED, last_value=5.0)
    assert measured(done, 50.0, 0.0, now=9.0) == done


def test_a_step_begins_with_the_next_strategy_of_the_plan() -> None:
    """Beginning a step records the plan's next strategy as running from now."""
    begun = step_begun(replace(IN_PROGRESS, next_step=1), now=3.0)
    assert begun.step_running and begun.step_started_at == 3.0 and begun.steps == [GoalStep("scale", 3.0)]


@pytest.mark.parametrize("state", [GoalState.PENDING, GoalState.FAILED])
def test_a_step_begins_only_in_a_goal_in_progress(state: GoalState) -> None:
    """A pending or ended goal runs no step."""
    with pytest.raises(GoalEndedError):
        step_begun(goal(state=state), now=3.0)


def test_a_step_end_closes_it_and_moves_to_the_next() -> None:
    """Ending the running step records its result and moves the plan on, settling from now."""
    after = step_ended(RUNNING, "ok", "exit 0", now=4.0)
    assert after.steps == [GoalStep("fix", 3.0, 4.0, "ok", "exit 0")]
    assert (after.step_running, after.next_step, after.step_started_at) == (False, 1, 4.0)


def test_a_step_end_after_the_goal_ended_changes_nothing() -> None:
    """The goal's end closed its step already; the step's own late end is ignored."""
    cancelled = ended(RUNNING, GoalState.CANCELLED, "by operator", now=4.0)
    assert step_ended(cancelled, "ok", "exit 0", now=5.0) == cancelled


def test_an_abandoned_step_is_forgotten_so_that_it_runs_again() -> None:
    """A step that was about to run, and did not, leaves no trace and the plan stays where it was."""
    finished = GoalStep("fix", 1.0, 2.0, "failed")
    abandoned = step_abandoned(replace(RUNNING, next_step=1, steps=[finished, GoalStep("scale", 3.0)]))
    assert (abandoned.step_running, abandoned.next_step, abandoned.steps) == (False, 1, [finished])
    assert step_abandoned(replace(RUNNING, steps=[finished])).steps == [finished]


def test_ending_a_goal_interrupts_its_running_step() -> None:
    """A goal ends with its detail and time, and a step still running is closed as interrupted."""
    failed = ended(RUNNING, GoalState.FAILED, "deadline passed", now=9.0)
    assert (failed.state, failed.detail, failed.ended_at, failed.step_running) == (
        GoalState.FAILED, "deadline passed", 9.0, False,
    )  # fmt: skip
    assert failed.steps == [GoalStep("fix", 3.0, 9.0, "interrupted", "the goal ended failed")]


def test_a_goal_ends_once_and_only_in_an_end_state() -> None:
    """Ending an ended goal raises GoalEndedError; ending into an open state is refused."""
    done = ended(IN_PROGRESS, GoalState.COMPLETED, "reached", now=9.0)
    with pytest.raises(GoalEndedError, match="completed already"):
        ended(done, GoalState.FAILED, "late", now=10.0)
    with pytest.raises(ValueError, match="not a state a goal ends in"):
        ended(IN_PROGRESS, GoalState.PENDING, "", now=9.0)
