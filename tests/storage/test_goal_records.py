"""The goal records contract: one open goal per key, the planner's order, rules applied atomically."""

from __future__ import annotations

import pytest

from healer.planner.model import (
    GoalEndedError,
    GoalNotFoundError,
    GoalPriority,
    GoalState,
    GoalType,
    NewGoal,
    Target,
    ended,
    goal_key,
    measured,
    started,
    step_begun,
    step_ended,
)
from healer.storage import GoalRecords, Storage


def new_goal(key_labels: dict[str, str], priority: GoalPriority = GoalPriority.MEDIUM, name: str = "g") -> NewGoal:
    return NewGoal(
        key=goal_key(name, key_labels),
        name=name,
        source="operator",
        type=GoalType.PERFORMANCE,
        priority=priority,
        description="",
        labels=key_labels,
        target=Target("vector(1)", below=0),
        plan=["fix"],
        deadline=1000.0,
        settle=1.0,
    )


@pytest.fixture
def records(storage: Storage) -> GoalRecords:
    return storage.goals


async def test_one_open_goal_per_key(records: GoalRecords) -> None:
    """A key with an open goal opens no second one; once it has ended, the key may open again."""
    first = await records.create([new_goal({"a": "1"}), new_goal({"a": "1"}), new_goal({"a": "2"})], now=1.0)
    assert [g.labels for g in first] == [{"a": "1"}, {"a": "2"}]
    assert await records.create([new_goal({"a": "1"})], now=2.0) == []
    await records.change(first[0].id, lambda g: ended(g, GoalState.CANCELLED, "by test", now=3.0))
    assert await records.ended_since([first[0].key, first[1].key], since=3.0) == {first[0].key}
    again = await records.create([new_goal({"a": "1"})], now=4.0)
    assert len(again) == 1 and again[0].id not in {g.id for g in first}
    assert await records.counts() == {"pending": 2, "in_progress": 0, "completed": 0, "failed": 0, "cancelled": 1}


async def test_open_goals_come_by_priority_then_age(records: GoalRecords) -> None:
    """The planner's order: the highest priority first, and the oldest among equals."""
    await records.create([new_goal({"n": "old-low"}, GoalPriority.LOW)], now=1.0)
    await records.create([new_goal({"n": "old-high"}, GoalPriority.HIGH)], now=2.0)
    await records.create([new_goal({"n": "new-high"}, GoalPriority.HIGH)], now=3.0)
    assert [g.labels["n"] for g in await records.open_goals()] == ["old-high", "new-high", "old-low"]


async def test_steps_and_ends_are_recorded_once(records: GoalRecords) -> None:
    """A step's start and end are kept in order; an ended goal cannot start, end again or be found when missing."""
    (goal,) = await records.create([new_goal({})], now=1.0)
    await records.change(goal.id, lambda g: started(g, 10.0, 0.0, now=2.0))
    with pytest.raises(GoalEndedError):
        await records.change(goal.id, lambda g: started(g, 20.0, 0.0, now=2.5))
    assert (await records.get(goal.id)).initial_value == 10.0  # the refused change wrote nothing
    await records.change(goal.id, lambda g: step_begun(g, now=3.0))
    goal = await records.change(goal.id, lambda g: step_ended(g, "ok", "exit 0", now=4.0))
    assert goal.next_step == 1 and not goal.step_running and goal.step_started_at == 4.0
    assert [(s.strategy, s.result, s.started_at, s.finished_at) for s in goal.steps] == [("fix", "ok", 3.0, 4.0)]
    assert await records.get(goal.id) == goal
    await records.change(goal.id, lambda g: ended(g, GoalState.COMPLETED, "done", now=5.0))
    with pytest.raises(GoalEndedError, match="completed already"):
        await records.change(goal.id, lambda g: ended(g, GoalState.FAILED, "late", now=6.0))
    with pytest.raises(GoalNotFoundError):
        await records.get(999)
    assert await records.purge(older_than=5.0) == 0 and await records.purge(older_than=5.1) == 1


async def test_ending_a_goal_closes_its_running_step(records: GoalRecords) -> None:
    """No ended goal keeps a step recorded as running; a first value measured late still anchors progress."""
    (goal,) = await records.create([new_goal({})], now=1.0)
    await records.change(goal.id, lambda g: started(g, None, None, now=2.0))
    await records.change(goal.id, lambda g: measured(g, 80.0, 0.0, now=2.5))
    await records.change(goal.id, lambda g: measured(g, 40.0, 0.5, now=2.7))
    assert (await records.get(goal.id)).initial_value == 80.0
    await records.change(goal.id, lambda g: step_begun(g, now=3.0))
    closed = await records.change(goal.id, lambda g: ended(g, GoalState.CANCELLED, "by test", now=4.0))
    assert not closed.step_running
    assert [(s.result, s.finished_at) for s in closed.steps] == [("interrupted", 4.0)]
    # The step's own end, arriving afterwards, changes nothing.
    assert (await records.change(goal.id, lambda g: step_ended(g, "ok", "exit 0", now=5.0))).steps == closed.steps
    assert (await records.get(goal.id)).steps == closed.steps


async def test_open_summary_counts_open_goals_and_the_progress_in_hand(records: GoalRecords) -> None:
    """The status summary counts pending and in-progress goals and gives the progress of the one in progress."""
    first, _ = await records.create([new_goal({"n": "1"}), new_goal({"n": "2"})], now=1.0)
    await records.change(first.id, lambda g: started(g, 80.0, 0.25, now=2.0))
    assert await records.open_summary() == ({GoalState.PENDING: 1, GoalState.IN_PROGRESS: 1}, 0.25)
    assert [g.id for g in await records.recent(GoalState.IN_PROGRESS)] == [first.id]
