"""Faults at each stage of an episode, with real Prometheus, Alertmanager and healer.

healer itself is killed (SIGKILL) or stopped (SIGTERM) and restarted on the same SQLite store at each
stage of an episode: held for approval, strategy running, step being verified, escalation in flight.
Prometheus and Alertmanager are killed and restarted under a running healer where an episode needs
them. Every test asserts that the alert has exactly one episode however often Alertmanager delivered
it, that its step ran once (twice only when SIGKILL cut it off: recorded interrupted, then run again),
and that nothing healer accepted was lost.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.servers import http_json, prom_value, restart_server, wait_for
from tests.stack import TOKEN, HealingStack, dump, start_stack
from tests.test_receiver import post

pytestmark = pytest.mark.slow

AUTH = {"Authorization": f"Bearer {TOKEN}"}
# Far longer than a test waits for healer to exit: a stop that waited out a verification would fail it.
SHUTDOWN_TIMEOUT = "120s"
HELD, RUNNING, VERIFYING, ESCALATING = "held", "running", "verifying", "escalating"
SILENCED, CHECKED = "silenced", "checked"

# The strategy: log "start FAULT", sleep, remove the fault's file when told to fix it, log "end FAULT".
STEP = """
import os, sys, time
log_path, fault, seconds, mode, faults = sys.argv[1:]
with open(log_path, "a") as log:
    log.write(f"start {fault}\\n")
    log.flush()
    time.sleep(float(seconds))
    if mode == "fix":
        os.remove(os.path.join(faults, fault))
    log.write(f"end {fault}\\n")
"""


def strategy(workdir: Path, seconds: float, fixes: bool, **extra: Any) -> dict[str, Any]:
    """The STEP strategy: sleeps `seconds`, then removes the fault's file when it `fixes`."""
    mode, faults = ("fix" if fixes else "keep"), str(workdir / "faults")
    return {
        "type": "exec",
        "command": [
            sys.executable,
            "-c",
            STEP,
            str(workdir / "steps.log"),
            "{labels.fault}",
            str(seconds),
            mode,
            faults,
        ],
        "allow_labels": {"fault": "^[a-z]+-[a-z]+$"},
        "timeout": "30s",
        **extra,
    }


def rule(name: str, **extra: Any) -> dict[str, Any]:
    """A rule for the faults named `name-*`, running the strategy of the same name."""
    return {
        "name": name,
        "match": ['alertname="FaultActive"', f'fault=~"{name}-.*"'],
        "strategies": [name],
        "max_attempts": 2,
        "cooldown": "100ms",
        "verify": {"within": "60s", "interval": "200ms", "wait_for_prometheus": "60s"},
        **extra,
    }


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HealingStack]:
    """One stack for the module (Prometheus at 200 ms); each test has its own fault, named STAGE-WHAT.

    held: the step waits for approval, then fixes; running and verifying: the step takes 2 s or none and
    changes nothing, the test fixes the fault when it wants the verification to end; escalating: the step
    takes 1 s and changes nothing, and one attempt verified for 1 s escalates; silenced: like held, with
    a silence; checked: like held, but the test fixes the fault.
    """
    workdir = tmp_path_factory.mktemp("episode-faults")
    strategies = {
        HELD: strategy(workdir, 0, True, approval="required"),
        RUNNING: strategy(workdir, 2, False),
        VERIFYING: strategy(workdir, 0, False),
        ESCALATING: strategy(workdir, 1, False),
        SILENCED: strategy(workdir, 0, True, approval="required"),
        CHECKED: strategy(workdir, 0, False, approval="required"),
    }
    short = {"within": "1s", "interval": "200ms", "wait_for_prometheus": "60s"}
    healing = {
        "rules": [
            rule(HELD),
            rule(RUNNING),
            rule(VERIFYING),
            rule(ESCALATING, max_attempts=1, verify=short),
            rule(SILENCED, silence=True),
            rule(CHECKED),
        ]
    }
    settings = {
        "server": {"shutdown_timeout": SHUTDOWN_TIMEOUT},
        "alertmanager": {"timeout": "500ms", "resend_interval": "1s"},
    }
    stack = start_stack(workdir, healing, strategies, interval="200ms", settings=settings)
    yield stack
    stack.stop()


@pytest.fixture
def servers_back(stack: HealingStack) -> Iterator[None]:
    """Start again whatever server a test left dead, so that the next test finds the whole stack."""
    yield
    for server in (stack.prometheus, stack.alertmanager, stack.healer):
        if server.process.poll() is not None:
            restart_server(server)


def starts(stack: HealingStack, fault: str) -> int:
    """How often the strategy's process began for a fault (its first line, written before it sleeps)."""
    path = stack.workdir / "steps.log"
    return path.read_text().splitlines().count(f"start {fault}") if path.exists() else 0


def steps_of(stack: HealingStack, fault: str) -> list[dict[str, Any]]:
    """The steps healer recorded for a fault's alert, oldest first."""
    return [step for step in reversed(stack.actions(limit="1000")) if step["episode"]["labels"]["fault"] == fault]


def wait_state(stack: HealingStack, fault: str, state: str) -> dict[str, Any]:
    """Wait until the newest step of a fault is in `state`; return it."""

    def reached() -> dict[str, Any] | None:
        found = steps_of(stack, fault)
        return found[-1] if found and found[-1]["state"] == state else None

    try:
        return wait_for(reached, 30, interval=0.05, what=f"a step of {fault} {state}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{dump(stack)}") from None


def wait_ended(stack: HealingStack, fault: str) -> list[dict[str, Any]]:
    """Wait until the episode of a fault has ended and the inbox is worked off; return its steps, oldest first."""

    def ended() -> list[dict[str, Any]] | None:
        found = steps_of(stack, fault)
        done = found and found[-1]["episode"]["state"] != "open" and stack.metric("healer_inbox_depth") == 0
        return found if done else None

    try:
        return wait_for(ended, 40, interval=0.1, what=f"the episode of {fault} ended")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{dump(stack)}") from None


def logged(stack: HealingStack, event: str, **about: int) -> bool:
    """Whether healer's JSON log has `event` with the fields `about` (the log spans every restart of the module)."""
    for line in stack.healer.log().splitlines():
        if line.startswith("{") and '"' + event + '"' in line:
            record = json.loads(line)
            if record.get("event") == event and about.items() <= record.items():
                return True
    return False


def signal_healer(stack: HealingStack, signum: int) -> None:
    """Deliver `signum`; after SIGTERM healer must exit 0 long before shutdown_timeout, whatever is in flight."""
    stack.healer.process.send_signal(signum)
    try:
        code = stack.healer.process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        stack.healer.stop(signal.SIGKILL)  # so that the next test finds a healer it can start again
        raise AssertionError(f"healer did not stop on signal {signum}\n{stack.healer.log()[-4000:]}") from None
    assert code == (0 if signum == signal.SIGTERM else -signal.SIGKILL), stack.healer.log()[-4000:]


def one_episode(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """The one episode every step belongs to (Alertmanager's repeated deliveries opened no other)."""
    assert len({step["episode"]["id"] for step in steps}) == 1, steps
    return dict(steps[-1]["episode"])


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
@pytest.mark.parametrize("stage", [HELD, RUNNING, VERIFYING, ESCALATING])
def test_healer_stopped_at_each_stage_resumes_the_episode_once(
    stack: HealingStack, servers_back: None, stage: str, signum: int
) -> None:
    """healer killed or stopped at one stage of an episode and restarted on the same store goes on from that
    stage: one episode; a held step still awaits approval; the strategy ran once, or twice when SIGKILL cut
    it off (recorded interrupted, the retry heals); a step that ran is verified after the restart, not run
    again; an escalation queued while Alertmanager was down reaches it once it is back.

    Before verification was resumed (e203d69), verifying-sigkill ended unverified and verifying-sigterm
    did not stop; before eb042ec, running-sigterm did not stop either (the stop waited for the verification
    of the strategy it had let finish, up to shutdown_timeout)."""
    fault = f"{stage}-{signal.Signals(signum).name.lower()}"
    stack.inject(fault)
    if stage == HELD:
        wait_state(stack, fault, "awaiting_approval")
    elif stage == RUNNING:
        wait_for(lambda: starts(stack, fault) == 1, 30, interval=0.05, what=f"the step of {fault} running")
    elif stage == VERIFYING:
        wait_state(stack, fault, "verifying")
    else:
        # Alertmanager dies while the step runs, so HealingFailed finds nobody when the episode escalates.
        wait_for(lambda: starts(stack, fault) == 1, 30, interval=0.05, what=f"the step of {fault} running")
        stack.alertmanager.stop(signal.SIGKILL)
        wait_for(
            lambda: stack.metric("healer_escalation_delivery_failures_total") >= 1,
            30,
            what="HealingFailed failing to reach Alertmanager",
        )
    signal_healer(stack, signum)

    if stage == ESCALATING:
        restart_server(stack.alertmanager)
    restart_server(stack.healer)
    if stage == HELD:
        [waiting] = steps_of(stack, fault)
        assert waiting["state"] == "awaiting_approval" and starts(stack, fault) == 0, waiting
        assert post(f"{stack.healer.url}/api/v1/actions/{waiting['id']}/approve", b"", AUTH)[0] == 200
    if stage == RUNNING and signum == signal.SIGKILL:
        # The fix shows once the step runs again: earlier, the alert would resolve before the retry.
        wait_for(lambda: starts(stack, fault) == 2, 30, interval=0.05, what=f"the step of {fault} run again")
    if stage in (RUNNING, VERIFYING):
        (stack.faults / fault).unlink()  # the fix shows now, after the restart

    steps = wait_ended(stack, fault)
    episode = one_episode(steps)
    outcomes = [step["outcome"] for step in steps]
    if stage == RUNNING and signum == signal.SIGKILL:
        assert outcomes == ["interrupted", "healed"] and starts(stack, fault) == 2, dump(stack)
        assert [step["attempt"] for step in steps] == [1, 2]
    elif stage == ESCALATING:
        assert outcomes == ["not_healed"] and episode["state"] == "escalated", dump(stack)
        assert starts(stack, fault) == 1
    else:
        assert outcomes == ["healed"] and episode["state"] == "healed", dump(stack)
        assert starts(stack, fault) == 1
    if stage == VERIFYING or (stage == RUNNING and signum == signal.SIGTERM):
        # The step had run (SIGTERM lets a running strategy finish): only its verification was left.
        assert logged(stack, "verification resumed", action=steps[0]["id"]), dump(stack)

    if stage == ESCALATING:
        [page] = wait_for(
            lambda: stack.am_alerts(alertname="HealingFailed", fault=fault), 20, what="HealingFailed in Alertmanager"
        )
        assert page["labels"]["healer_episode"] == str(episode["id"])

        def delivered() -> Counter[str] | None:
            kinds = Counter(event["kind"] for event in stack.action(steps[0]["id"])["events"])
            return kinds if kinds["escalation_delivered"] else None

        kinds = wait_for(delivered, 10, what="the delivery recorded")
        assert kinds["escalated"] == 1 and kinds["escalation_delivered"] == 1, kinds
        stack.faults.joinpath(fault).unlink()  # the alert resolves, and HealingFailed with it


def test_prometheus_down_at_the_still_firing_check_runs_the_step_and_verifies_after(
    stack: HealingStack, servers_back: None
) -> None:
    """Prometheus killed while a step awaits approval: once approved, the step runs once although Prometheus
    cannot say whether the alert still fires (Alertmanager's word stands), and its verification waits for
    the restarted Prometheus, which sees the fix and says healed."""
    fault = "checked-prometheus"
    stack.inject(fault)
    waiting = wait_state(stack, fault, "awaiting_approval")
    stack.prometheus.stop(signal.SIGKILL)
    assert post(f"{stack.healer.url}/api/v1/actions/{waiting['id']}/approve", b"", AUTH)[0] == 200
    wait_state(stack, fault, "verifying")
    back = time.time()
    restart_server(stack.prometheus)
    # Fixed once the restarted Prometheus has scraped the fault: a series that vanished before would look
    # alive to it for its lookback of 5 minutes (it never saw the series go, so wrote no staleness marker).
    expr = f'timestamp(fault_active{{fault="{fault}"}})'
    wait_for(lambda: (prom_value(stack.prometheus, expr) or 0) > back, 10, what="the restarted Prometheus scraping")
    (stack.faults / fault).unlink()
    steps = wait_ended(stack, fault)
    assert [step["outcome"] for step in steps] == ["healed"] and one_episode(steps)["state"] == "healed", dump(stack)
    assert starts(stack, fault) == 1


def test_alertmanager_down_while_escalating_gets_healingfailed_once_back(
    stack: HealingStack, servers_back: None
) -> None:
    """Alertmanager killed while a step runs that will not heal: the episode escalates while it is down,
    healer keeps retrying HealingFailed, and the restarted Alertmanager receives it (delivered once, the
    episode still one), without a restart of healer."""
    fault = "escalating-alertmanager"
    failures_before = stack.metric("healer_escalation_delivery_failures_total")
    stack.inject(fault)
    wait_for(lambda: starts(stack, fault) == 1, 30, interval=0.05, what=f"the step of {fault} running")
    stack.alertmanager.stop(signal.SIGKILL)
    [step] = wait_ended(stack, fault)
    assert step["outcome"] == "not_healed" and step["episode"]["state"] == "escalated", dump(stack)
    wait_for(
        lambda: stack.metric("healer_escalation_delivery_failures_total") >= failures_before + 2,
        20,
        what="HealingFailed retried while Alertmanager is down",
    )
    restart_server(stack.alertmanager)
    [page] = wait_for(
        lambda: stack.am_alerts(alertname="HealingFailed", fault=fault), 20, what="HealingFailed in Alertmanager"
    )
    assert page["labels"]["healer_episode"] == str(step["episode"]["id"])
    kinds = Counter(event["kind"] for event in stack.action(step["id"])["events"])
    assert kinds["escalated"] == 1 and kinds["escalation_delivered"] == 1, kinds
    assert starts(stack, fault) == 1 and len(steps_of(stack, fault)) == 1
    stack.faults.joinpath(fault).unlink()


def test_alertmanager_down_when_silencing_still_heals_once(stack: HealingStack, servers_back: None) -> None:
    """Alertmanager killed before a step whose rule silences the alert: the silence cannot be made, the step
    runs once all the same and heals, and the restarted Alertmanager holds no silence for the alert."""
    fault = "silenced-alertmanager"
    stack.inject(fault)
    waiting = wait_state(stack, fault, "awaiting_approval")
    stack.alertmanager.stop(signal.SIGKILL)
    assert post(f"{stack.healer.url}/api/v1/actions/{waiting['id']}/approve", b"", AUTH)[0] == 200
    steps = wait_ended(stack, fault)
    assert [step["outcome"] for step in steps] == ["healed"] and one_episode(steps)["state"] == "healed", dump(stack)
    assert starts(stack, fault) == 1
    assert logged(stack, "silence not created", episode=steps[0]["episode"]["id"]), dump(stack)
    restart_server(stack.alertmanager)
    silences = [
        silence
        for silence in http_json(stack.alertmanager.url + "/api/v2/silences")
        if silence["status"]["state"] == "active"
        and {"name": "fault", "value": fault, "isRegex": False, "isEqual": True} in silence["matchers"]
    ]
    assert silences == []
