"""Verification through a Prometheus outage, with real Prometheus, Alertmanager and healer: the verdict waits for
Prometheus up to `verify.wait_for_prometheus`, and without one the episode escalates as unverified."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from tests.servers import prom_query, restart_server, wait_for
from tests.stack import HealingStack, dump, remove_fault_command, start_stack
from tests.test_healing_e2e import wait_episode_end

pytestmark = pytest.mark.slow

# The first check comes `settle` after the step ran: time enough to kill Prometheus before it.
RESTART_VERIFY = {"settle": "4s", "within": "5s", "interval": "200ms", "wait_for_prometheus": "60s"}
DOWN_VERIFY = {"settle": "2s", "within": "3s", "interval": "200ms", "wait_for_prometheus": "3s"}


def rule(name: str, verify: dict[str, str]) -> dict[str, Any]:
    return {
        "name": name,
        "match": ['alertname="FaultActive"', f'fault="{name}"'],
        "strategies": ["remove-fault"],
        "max_attempts": 1,
        "verify": verify,
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HealingStack]:
    """One stack for the module, Prometheus at 200 ms intervals; each test has its own fault and rule.

    Alertmanager's group_interval of a minute keeps the resolved notification, which would cut the settle
    short, out of the tests: Prometheus alone gives the verdict.
    """
    workdir = tmp_path_factory.mktemp("unverified")
    strategies = {
        "remove-fault": {"type": "exec", "command": remove_fault_command(workdir / "faults"), "timeout": "10s"}
    }
    healing = {"rules": [rule("restart", RESTART_VERIFY), rule("down", DOWN_VERIFY)]}
    stack = start_stack(workdir, healing, strategies, interval="200ms", group_interval="1m")
    yield stack
    stack.stop()


@pytest.fixture
def prometheus_back(stack: HealingStack) -> Iterator[None]:
    """Start Prometheus again after a test that left it dead."""
    yield
    if stack.prometheus.process.poll() is not None:
        restart_server(stack.prometheus)


def kill_prometheus_while_verifying(stack: HealingStack, fault: str) -> tuple[dict[str, Any], float]:
    """Inject `fault`, wait until its step ran and verifies, SIGKILL Prometheus; return the step and when it was
    first seen verifying."""
    stack.inject(fault)

    def verifying() -> dict[str, Any] | None:
        actions = stack.actions(rule=fault)
        return actions[0] if actions and actions[0]["state"] == "verifying" else None

    action = wait_for(verifying, 30, interval=0.05, what=f"the step of {fault} verifying")
    seen = time.time()
    # Prometheus has seen the fault gone: after the restart its ALERTS hold the staleness marker, not "firing".
    wait_for(lambda: not prom_query(stack.prometheus, f'ALERTS{{fault="{fault}"}}'), 10, what="the alert resolved")
    stack.prometheus.stop(signal.SIGKILL)
    assert stack.action(action["id"])["state"] == "verifying", "Prometheus died after the verdict\n" + dump(stack)
    return action, seen


def test_verdict_comes_from_the_restarted_prometheus(stack: HealingStack, prometheus_back: None) -> None:
    """Prometheus killed during a step's verification and restarted past its window: the restarted one says healed."""
    action, seen = kill_prometheus_while_verifying(stack, "restart")
    # Down past the verification window (which began before `seen`): the step waits for an answer meanwhile.
    window_over = seen + 5.0 + 0.5
    while time.time() < window_over:
        assert stack.action(action["id"])["state"] == "verifying", dump(stack)
        time.sleep(0.2)
    restarted_at = time.time()
    restart_server(stack.prometheus)
    [ended] = wait_episode_end(stack, "restart")
    assert (ended["outcome"], ended["episode"]["state"]) == ("healed", "healed"), dump(stack)
    assert ended["finished_at"] > restarted_at
    assert not stack.am_alerts(alertname="HealingFailed", fault="restart")


def test_prometheus_down_past_the_bound_escalates_unverified(stack: HealingStack, prometheus_back: None) -> None:
    """Prometheus killed during verification and kept down past wait_for_prometheus: the episode escalates as
    unverified and HealingFailed reaches Alertmanager."""
    action, _ = kill_prometheus_while_verifying(stack, "down")
    [ended] = wait_episode_end(stack, "down")
    assert (ended["outcome"], ended["episode"]["state"]) == ("unverified", "escalated"), dump(stack)
    # It waited out the window and the bound (3 s + 3 s) from before the verification began.
    assert ended["finished_at"] >= ended["started_at"] + 3.0 + 3.0
    [escalated] = [event for event in stack.action(action["id"])["events"] if event["kind"] == "escalated"]
    assert escalated["reason"].startswith("unverified"), escalated
    [page] = wait_for(
        lambda: stack.am_alerts(alertname="HealingFailed", fault="down"), 20, what="HealingFailed in Alertmanager"
    )
    assert page["labels"]["healer_episode"] == str(ended["episode"]["id"])
    assert "unverified" in page["annotations"]["description"]
    assert stack.prometheus.process.poll() is not None  # the verdict came with Prometheus still down
