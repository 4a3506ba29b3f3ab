"""The audit trail names the authenticated operator for the acts that belong to no episode: closing the circuit
breaker, opening and cancelling a goal, acknowledging an optimisation's failed rollback; against a real
`healer serve` with a web config, a real Prometheus and real strategy processes."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import World
from tests.servers import Server, prom_query, start_healer, wait_for
from tests.test_access import basic, call, web_config

pytestmark = pytest.mark.slow

PY = sys.executable
# Headers a caller may send to claim another name; the audit trail must not believe them.
SPOOF = {"X-Healer-Approver": "mallory", "X-Healer-Operator": "mallory"}


def _json(method: str, url: str, body: Any, headers: dict[str, str]) -> tuple[int, Any]:
    status, answer, _ = call(method, url, None if body is None else json.dumps(body).encode(), headers)
    return status, json.loads(answer)


def test_operator_acts_record_the_authenticated_name(world: World, tmp_path: Path, servers: list[Server]) -> None:
    """As alice (HTTP Basic, operator) close the circuit, open and cancel a goal and acknowledge a failed rollback,
    each while claiming to be mallory in headers: GET /api/v1/audit, read by bob (viewer), names alice for each."""
    knob = world.files / "audit-knob"
    knob.write_text("x" * 1000)
    wait_for(lambda: prom_query(world.prometheus, 'fault_file_bytes{fault="audit-knob"} == 1000'), 15)
    strategies = {
        "grow": {"type": "exec", "command": [PY, "-c", f"open({str(knob)!r}, 'w').write('x' * 2000)"]},
        "broken-restore": {"type": "exec", "command": ["false"]},
        "wait": {"type": "exec", "command": [PY, "-c", "import time; time.sleep(30)"], "timeout": "1m"},
    }
    candidate = {
        "name": "stuck",
        "component": "files",
        "metric": 'fault_file_bytes{fault="audit-knob"}',
        "direction": "decrease",
        "apply": "grow",
        "rollback": "broken-restore",
        "expected_improvement": 0.5,
        "cost": 1,
        "confidence": 0.9,
        "window": "2s",
        "cooldown": "1s",
    }
    settings = {
        "server": {"web_config_file": str(web_config(tmp_path)), "shutdown_timeout": "2s"},
        "prometheus": {"url": world.prometheus.url, "timeout": "2s"},
        "store": {"path": str(tmp_path / "healer.db")},
        "exporter": {"host": False},
        "planner": {"interval": "300ms"},
        "optimizer": {"interval": "300ms", "candidates": [candidate]},
        "strategies": strategies,
    }
    healer = start_healer(tmp_path / "healer", settings)
    servers.append(healer)
    alice, bob = {**basic("alice"), **SPOOF}, basic("bob")
    try:
        status, closed = _json("POST", healer.url + "/api/v1/circuit/close", None, alice)
        assert status == 200 and closed["by"] == "alice", closed

        goal = {"name": "audit-me", "type": "performance", "target": {"query": "vector(1)", "below": 0}}
        status, opened = _json("POST", healer.url + "/api/v1/goals", {**goal, "plan": ["wait"]}, alice)
        assert status == 201, opened
        goal_id = opened["goal"]["id"]
        status, cancelled = _json("POST", f"{healer.url}/api/v1/goals/{goal_id}/cancel", None, alice)
        assert status == 200 and cancelled["goal"]["detail"] == "cancelled by alice", cancelled

        def rollback_failed() -> bool:
            trials = _json("GET", healer.url + "/api/v1/optimizations", None, bob)[1]["trials"]
            return bool(trials) and trials[0]["outcome"] == "rollback_failed"

        wait_for(rollback_failed, 30, interval=0.2, what="the candidate's rollback to fail")
        acknowledge = healer.url + "/api/v1/optimizations/stuck/acknowledge"
        status, acknowledged = _json("POST", acknowledge, None, alice)
        assert status == 200 and acknowledged == {"acknowledged": "stuck", "by": "alice"}, acknowledged

        status, audit = _json("GET", healer.url + "/api/v1/audit", None, bob)
        assert status == 200, audit
        acts = [(act["act"], act["by"], act["subject"]) for act in reversed(audit["acts"])]
        subject = {"goal": goal_id, "name": "audit-me", "labels": {}}
        assert acts == [
            ("circuit_closed", "alice", {}),
            ("goal_opened", "alice", subject),
            ("goal_cancelled", "alice", subject),
            ("optimization_acknowledged", "alice", {"candidate": "stuck"}),
        ], audit
        assert call("GET", healer.url + "/api/v1/audit")[0] == 401
        assert "mallory" not in json.dumps(audit) and "mallory" not in healer.log()
    finally:
        knob.unlink(missing_ok=True)
