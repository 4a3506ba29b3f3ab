"""Goals without servers: progress toward a target, priorities, goal config errors (goal records: tests/storage)."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from healer.config import ConfigError, parse_config
from healer.planner.model import GoalPriority, Target, parse_priority
from healer.planner.planner import render_target_query

finite = st.floats(min_value=-1e12, max_value=1e12, allow_nan=False)


def test_progress_below_target_counts_the_way_from_the_first_value() -> None:
    """From 100 toward at most 50: 75 is halfway, 50 is reached, anything worse than the start is 0."""
    target = Target("q", below=50)
    assert target.progress(100, 75) == 0.5
    assert target.progress(100, 50.0001) < 1.0 and not target.reached(50.0001)
    assert target.progress(100, 50) == 1.0 and target.reached(50)
    assert target.progress(100, 130) == 0.0
    # Started reached (it would have completed at once) and slipped back: no way was made.
    assert target.progress(40, 60) == 0.0
    assert target.progress(100, None) is None and target.progress(100, math.nan) is None


def test_progress_above_target_and_an_unmeasured_start() -> None:
    """From 0 toward at least 10: 5 is halfway; without a first value, only reaching it counts."""
    target = Target("q", above=10)
    assert target.progress(0, 5) == 0.5
    assert target.progress(0, 9.999) < 1.0 and target.progress(0, 10) == 1.0
    assert target.progress(None, 5) == 0.0 and target.progress(None, 11) == 1.0


@given(initial=finite, value=finite, threshold=finite, below=st.booleans())
def test_progress_is_always_a_ratio(initial: float, value: float, threshold: float, below: bool) -> None:
    """Whatever the values, progress stays within 0..1 and is 1 exactly when the target is reached."""
    target = Target("q", below=threshold) if below else Target("q", above=threshold)
    progress = target.progress(initial, value)
    assert progress is not None and 0.0 <= progress <= 1.0
    assert (progress == 1.0) == target.reached(value)


def test_priority_by_name_or_level() -> None:
    """Names in any case and levels 1-5 are accepted; anything else names the valid choices."""
    assert parse_priority("critical") is GoalPriority.CRITICAL and parse_priority(1) is GoalPriority.DEFERRED
    for bad in ("urgent", 6, True, None):
        with pytest.raises(ValueError, match=r"CRITICAL \(5\), HIGH \(4\)"):
            parse_priority(bad)


def test_target_query_labels_enter_as_quoted_strings() -> None:
    """A label value with quotes and backslashes cannot break out of its PromQL string; a missing one is ""."""
    query = render_target_query("x{a={labels.a}, b={labels.b}}", {"a": 'we"b\\1'})
    assert query == 'x{a="we\\"b\\\\1", b=""}'


def _config(template: dict[str, Any], **strategies: dict[str, Any]) -> dict[str, Any]:
    goal = {
        "name": "t",
        "type": "reliability",
        "trigger": "up == 0",
        "target": {"query": "up", "above": 1},
        "plan": ["fix"],
        **template,
    }
    return {
        "strategies": {"fix": {"type": "exec", "command": ["true"]}, **strategies},
        "planner": {"goals": [goal]},
    }


@pytest.mark.parametrize(
    ("template", "message"),
    [
        ({"target": {"query": "up"}}, r"planner\.goals\[0\]\.target: give exactly one of below or above"),
        ({"target": {"query": "up", "below": 1, "above": 2}}, r"planner\.goals\[0\]\.target: give exactly one"),
        ({"target": {"query": "x{a={annotations.a}}", "below": 1}}, r"goals\[0\]\.target\.query: .*only '\{labels"),
        ({"type": "wishful"}, r"planner\.goals\[0\]\.type: Input should be 'performance'"),
        ({"priority": "urgent"}, r"planner\.goals\[0\]\.priority: priority 'urgent' is not one of"),
        ({"plan": []}, r"planner\.goals\[0\]\.plan: List should have at least 1 item"),
        ({"plan": ["fix", "nope"]}, r"planner\.goals\[0\]\.plan\[1\]: strategy 'nope' is not defined"),
        ({"plan": ["gated"]}, r"planner\.goals\[0\]\.plan\[0\]: strategy 'gated' requires approval"),
        ({"deadline": "0s"}, r"planner\.goals\[0\]\.deadline: .*longer than 0s"),
        ({"trigger": " "}, r"planner\.goals\[0\]\.trigger: .*PromQL expression"),
    ],
)
def test_goal_template_errors_name_the_key(template: dict[str, Any], message: str) -> None:
    """Each mistake in a goal template is reported at its key path in the file."""
    gated = {"type": "exec", "command": ["true"], "approval": "required"}
    with pytest.raises(ConfigError, match=message) as caught:
        parse_config(_config(template, gated=gated), "healer.yml")
    assert str(caught.value).startswith("healer.yml: ")


def test_goal_template_names_are_unique() -> None:
    """Two templates of one name are refused, since goals are keyed by their template."""
    config = _config({})
    config["planner"]["goals"] *= 2
    with pytest.raises(ConfigError, match="goal template name 't' is used twice"):
        parse_config(config)
