"""Stopping while a step is being verified: healer stops at once, and the verification resumes after the restart."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path
from typing import Any

from tests.conftest import World
from tests.servers import Server, start_healer, wait_for
from tests.test_engine_safety import AUTH, actions, alert, config, payload, steps_log
from tests.test_receiver import post

# Far longer than the test waits for healer to exit: a stop that waited for verification would fail it.
SHUTDOWN_TIMEOUT = "120s"


def verifying_config(tmp_path: Path, prometheus: str, query: str) -> dict[str, Any]:
    """A healer whose one step is verified by `query` against a real Prometheus for up to two minutes."""
    settings = config(
        tmp_path, rule={"max_attempts": 1, "verify": {"query": query, "within": "120s", "interval": "200ms"}}
    )
    settings["prometheus"] = {"url": prometheus, "timeout": "2s"}
    settings["server"]["shutdown_timeout"] = SHUTDOWN_TIMEOUT
    return settings


def test_sigterm_during_verification_stops_at_once_and_the_restart_verifies(
    tmp_path: Path, world: World, servers: list[Server]
) -> None:
    """SIGTERM while the only work is a verification ends healer without waiting out shutdown_timeout; the
    restarted healer verifies the same step (it never runs again) and records the verdict."""
    healer = start_healer(tmp_path, verifying_config(tmp_path, world.prometheus.url, "vector(1) == 2"))
    servers.append(healer)
    assert post(healer.url + "/api/v1/alertmanager", payload(alert("v1")), AUTH)[0] == 200
    wait_for(lambda: [a["state"] for a in actions(healer)] == ["verifying"], 20, what="the step verifying")
    healer.process.send_signal(signal.SIGTERM)
    try:
        healer.process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        raise AssertionError("healer did not stop while only a verification was in flight:\n" + healer.log()) from None
    assert healer.process.returncode == 0, healer.log()

    # The fix shows now: the restarted healer's verification (of the same step, not a new run) says healed.
    restarted = start_healer(tmp_path, verifying_config(tmp_path, world.prometheus.url, "vector(1)"))
    servers.append(restarted)
    wait_for(lambda: [a["outcome"] for a in actions(restarted)] == ["healed"], 30, what="the step verified healed")
    [step] = actions(restarted)
    assert step["attempt"] == 1 and step["episode"]["state"] == "healed"
    assert len([line for line in steps_log(tmp_path) if line.startswith("start")]) == 1
    assert "verification resumed" in restarted.log()
