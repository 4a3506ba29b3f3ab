"""The audit trail of operators' acts outside any episode, on every backend: each is recorded with who did it,
in the transaction of the change, and only when the change happened."""

from __future__ import annotations

import pytest

from healer.optimizer.model import Outcome
from healer.planner.model import GoalEndedError, GoalState, ended
from healer.storage import Storage
from healer.storage.audit import OperatorAct
from tests.storage.support import FakeClock
from tests.storage.test_goal_records import new_goal


async def test_each_act_is_recorded_with_who_did_it(storage: Storage, clock: FakeClock) -> None:
    """Closing the circuit, opening and cancelling a goal and acknowledging a failed rollback each leave one entry
    naming the operator and what was acted on, newest first; the planner's own goals and changes leave none."""
    await storage.coordination.close_circuit("alice")
    (goal,) = await storage.goals.create([new_goal({"disk": "sda"}, name="trim")], clock.now, by="alice")
    await storage.goals.create([new_goal({"disk": "sdb"}, name="auto")], clock.now)  # a template's: no operator
    cancel = (OperatorAct.GOAL_CANCELLED, "bob")
    await storage.goals.change(goal.id, lambda g: ended(g, GoalState.CANCELLED, "cancelled by bob", clock.now), cancel)
    trial = await storage.trials.begin("tune", "web", 0.8, 1.0, 10.0, clock.now)
    await storage.trials.end(trial.id, Outcome.ROLLBACK_FAILED, "rollback exited 1", clock.now)
    assert await storage.trials.acknowledge("tune", clock.now, "alice")

    acts = [(entry.act, entry.by, entry.subject) for entry in await storage.healing.operator_acts()]
    assert acts == [
        (OperatorAct.OPTIMIZATION_ACKNOWLEDGED, "alice", {"candidate": "tune"}),
        (OperatorAct.GOAL_CANCELLED, "bob", {"goal": goal.id, "name": "trim", "labels": {"disk": "sda"}}),
        (OperatorAct.GOAL_OPENED, "alice", {"goal": goal.id, "name": "trim", "labels": {"disk": "sda"}}),
        (OperatorAct.CIRCUIT_CLOSED, "alice", {}),
    ]
    assert [entry.act for entry in await storage.healing.operator_acts(limit=1)] == [
        OperatorAct.OPTIMIZATION_ACKNOWLEDGED
    ]


async def test_acts_age_out_with_the_retention(storage: Storage, clock: FakeClock) -> None:
    """Purging the audit trail older than a time deletes the operators' acts older than it and keeps the rest."""
    await storage.coordination.close_circuit("alice")
    clock.advance(100)
    await storage.coordination.close_circuit("bob")
    await storage.healing.purge(older_than=clock.now - 50)
    assert [entry.by for entry in await storage.healing.operator_acts()] == ["bob"]


async def test_an_act_that_changes_nothing_is_not_recorded(storage: Storage, clock: FakeClock) -> None:
    """A refused cancel (the goal ended already), a goal already open and an acknowledgement with nothing to
    acknowledge roll back with their change: no entry claims they happened."""
    (goal,) = await storage.goals.create([new_goal({"n": "1"})], clock.now, by="alice")
    assert await storage.goals.create([new_goal({"n": "1"})], clock.now, by="alice") == []
    await storage.goals.change(goal.id, lambda g: ended(g, GoalState.COMPLETED, "target reached", clock.now))
    with pytest.raises(GoalEndedError):
        await storage.goals.change(
            goal.id, lambda g: ended(g, GoalState.CANCELLED, "x", clock.now), (OperatorAct.GOAL_CANCELLED, "bob")
        )
    assert not await storage.trials.acknowledge("never-tried", clock.now, "bob")
    acts = await storage.healing.operator_acts()
    assert [(entry.act, entry.by) for entry in acts] == [(OperatorAct.GOAL_OPENED, "alice")]
