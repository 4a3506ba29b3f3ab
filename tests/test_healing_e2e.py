"""End to end with real servers: a fault fires an alert, healer heals it and proves it with PromQL."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Any

import pytest

from tests.servers import http_json, wait_for
from tests.stack import HealingStack, dump, remove_fault_command, start_stack, wait_resolved

pytestmark = pytest.mark.slow


def rule(name: str, fault: str, strategies: list[str], **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "match": ['alertname="FaultActive"', f'fault="{fault}"'],
        "strategies": strategies,
        "cooldown": "1s",
        "verify": {"within": "4s", "interval": "200ms"},
        **extra,
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HealingStack]:
    """One stack for the module; each test uses its own fault name and rule."""
    workdir = tmp_path_factory.mktemp("e2e")
    faults = workdir / "faults"
    slow_remove = "import os, sys, time; time.sleep(3); os.remove(os.path.join(sys.argv[1], sys.argv[2]))"
    strategies = {
        "remove-fault": {
            "type": "exec",
            "command": remove_fault_command(faults),
            "allow_labels": {"fault": "^[a-z]+$"},
            "timeout": "10s",
        },
        "slow-remove-fault": {
            "type": "exec",
            "command": [sys.executable, "-c", slow_remove, str(faults), "{labels.fault}"],
            "timeout": "10s",
        },
        "does-nothing": {"type": "exec", "command": ["true"], "timeout": "5s"},
    }
    healing = {
        "rules": [
            rule("simple", "simple", ["remove-fault"]),
            rule("ladder", "ladder", ["does-nothing", "remove-fault"]),
            rule("hopeless", "hopeless", ["does-nothing", "does-nothing"], max_attempts=2),
            rule("pending", "pending", ["does-nothing", "remove-fault"], cooldown="1m"),
            rule("silenced", "silenced", ["slow-remove-fault"], silence=True),
            rule("learned", "learned", ["does-nothing", "remove-fault"], order="learned"),
        ]
    }
    stack = start_stack(workdir, healing, strategies)
    yield stack
    stack.stop()


def wait_episode_end(stack: HealingStack, rule_name: str, timeout: float = 40) -> list[dict[str, Any]]:
    """Wait until the newest episode of a rule has ended, and return its actions, oldest first."""

    def ended() -> list[dict[str, Any]] | None:
        actions = stack.actions(rule=rule_name)
        if actions and actions[0]["episode"]["state"] != "open":
            return list(reversed(actions))
        return None

    try:
        return wait_for(ended, timeout, interval=0.2, what=f"episode of {rule_name} to end")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{dump(stack)}") from None


def test_exec_strategy_heals_and_is_verified(stack: HealingStack) -> None:
    """A fault fires FaultActive; the exec strategy removes it; the step is recorded healed and timed."""
    heals_before = stack.metric("healer_time_to_heal_seconds_count")
    stack.inject("simple")
    [action] = wait_episode_end(stack, "simple")
    assert action["outcome"] == "healed", dump(stack)
    assert action["episode"]["state"] == "healed"
    assert action["exit_code"] == 0
    assert action["plan"]["argv"][-1] == "simple"
    assert not stack.fault_present("simple")
    assert stack.metric("healer_time_to_heal_seconds_count") == heals_before + 1
    detail = stack.action(action["id"])
    kinds = [event["kind"] for event in detail["events"]]
    assert kinds[:4] == ["received", "matched", "scheduled", "started"] and "finished" in kinds


def test_ladder_climbs_to_the_strategy_that_heals(stack: HealingStack) -> None:
    """The first strategy does not help and is recorded not_healed; the second heals."""
    stack.inject("ladder")
    actions = wait_episode_end(stack, "ladder")
    assert [(a["strategy"], a["outcome"]) for a in actions] == [
        ("does-nothing", "not_healed"),
        ("remove-fault", "healed"),
    ], dump(stack)
    assert actions[1]["started_at"] >= actions[0]["finished_at"] + 1.0  # the backoff of cooldown 1s


def test_exhausted_ladder_escalates_to_alertmanager(stack: HealingStack) -> None:
    """When no strategy heals, HealingFailed appears in Alertmanager with the original labels."""
    stack.inject("hopeless")
    try:
        actions = wait_episode_end(stack, "hopeless")
        assert [a["outcome"] for a in actions] == ["not_healed", "not_healed"]
        assert actions[-1]["episode"]["state"] == "escalated"
        [escalation] = wait_for(
            lambda: stack.am_alerts(alertname="HealingFailed", fault="hopeless"),
            20,
            what="HealingFailed in Alertmanager",
        )
        labels = escalation["labels"]
        assert labels["healed_alertname"] == "FaultActive" and labels["healer_rule"] == "hopeless"
        assert labels["severity"] == "critical"
        assert "does-nothing" in escalation["annotations"]["strategies_tried"]
        assert f"episode={actions[0]['episode']['id']}" in escalation["annotations"]["audit_url"]
        assert stack.metric("healer_escalations_total") >= 1
    finally:
        (stack.faults / "hopeless").unlink(missing_ok=True)


def test_resolved_notification_cancels_pending_step(stack: HealingStack) -> None:
    """When the alert resolves while the next step waits for its backoff, that step is cancelled."""
    stack.inject("pending")

    def second_step_pending() -> bool:
        actions = stack.actions(rule="pending")
        return len(actions) == 2 and actions[0]["state"] == "pending"

    wait_for(second_step_pending, 30, what="second step pending")
    (stack.faults / "pending").unlink()
    actions = wait_episode_end(stack, "pending")
    assert [(a["strategy"], a["outcome"], a["skip_reason"]) for a in actions] == [
        ("does-nothing", "not_healed", None),
        ("remove-fault", "cancelled", "resolved"),
    ], dump(stack)
    assert actions[-1]["episode"]["state"] == "resolved"


def test_silence_exists_only_while_healing(stack: HealingStack) -> None:
    """With silence: true an Alertmanager silence on the alert's labels exists while the step runs and ends after."""
    stack.inject("silenced")

    def active_silence() -> dict[str, Any] | None:
        for silence in stack.am_silences():
            matchers = {m["name"]: m["value"] for m in silence["matchers"]}
            if silence["status"]["state"] == "active" and matchers.get("fault") == "silenced":
                return silence
        return None

    silence = wait_for(active_silence, 20, interval=0.1, what="silence during healing")
    assert {m["name"] for m in silence["matchers"]} >= {"alertname", "fault", "instance", "job"}
    [action] = wait_episode_end(stack, "silenced")
    assert action["outcome"] == "healed", dump(stack)
    wait_for(lambda: active_silence() is None, 10, what="silence expired")


def test_learned_order_puts_first_the_strategy_that_healed(stack: HealingStack) -> None:
    """With order: learned, after one episode where the second rung healed, the next episode starts with it."""
    stack.inject("learned")
    first = wait_episode_end(stack, "learned")
    assert [(a["strategy"], a["outcome"]) for a in first] == [
        ("does-nothing", "not_healed"),
        ("remove-fault", "healed"),
    ]
    ladder = http_json(f"{stack.healer.url}/api/v1/optimizations", headers=stack.healer.headers)["ladders"]["learned"]
    assert [(r["strategy"], r["healed"], r["trials"]) for r in ladder] == [
        ("remove-fault", 1, 1),
        ("does-nothing", 0, 1),
    ]
    # Injected again before healer has the resolved notification, Alertmanager may see the group as unchanged.
    wait_resolved(stack, first[-1])
    stack.inject("learned")

    def second_episode() -> list[dict[str, Any]] | None:
        actions = [a for a in stack.actions(rule="learned") if a["episode"]["id"] != first[0]["episode"]["id"]]
        return list(reversed(actions)) if actions and actions[0]["episode"]["state"] != "open" else None

    second = wait_for(second_episode, 40, interval=0.2, what="the second episode to end")
    assert [(a["strategy"], a["outcome"]) for a in second] == [("remove-fault", "healed")], dump(stack)
