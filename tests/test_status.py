"""The unified status report agrees with the audit trail, over HTTP and in `healer status`."""

from __future__ import annotations

import subprocess
import sys
from collections import Counter
from pathlib import Path

from tests.servers import Server, http_json, start_healer, wait_for
from tests.test_engine_safety import AUTH, alert, all_ended, config, payload
from tests.test_receiver import post


def test_status_counts_match_the_audit_trail(tmp_path: Path, servers: list[Server]) -> None:
    """Alerts received, episodes by state and steps by outcome in /api/v1/status equal the store's records."""
    settings = config(tmp_path, rule={"max_attempts": 1})
    healer = start_healer(tmp_path, settings)
    servers.append(healer)
    other = alert("x")
    other["labels"]["alertname"] = "NobodyHealsThis"
    post(healer.url + "/api/v1/alertmanager", payload(alert("s1"), alert("s2"), other), AUTH)
    post(healer.url + "/api/v1/alertmanager", payload(alert("s1")), AUTH)
    wait_for(lambda: all_ended(healer, 3), 30)

    report = http_json(healer.url + "/api/v1/status", headers=healer.headers)
    assert set(report) == {"health", "trend", "healing", "goals", "optimization"}
    healing = report["healing"]
    assert healing["alerts_received"] == 4
    steps = http_json(healer.url + "/api/v1/actions", headers=healer.headers)["actions"]
    # Two episodes ran a step (the audit trail shows how they ended); the third matched no rule and the
    # repeated s1 is the same episode.
    ended_by_steps = Counter(state for state in {a["episode"]["id"]: a["episode"]["state"] for a in steps}.values())
    # Unverified steps escalate: nobody could tell whether the fault is gone.
    assert healing["episodes"] == {**ended_by_steps, "unmatched": 1} == {"escalated": 2, "unmatched": 1}
    audit = Counter(a["outcome"] for a in steps)
    assert healing["actions"] == dict(audit) == {"unverified": 2}
    assert healing["healed"] == 0 and healing["escalated"] == 2 and healing["in_progress"] == 0
    assert healing["resolution_rate"] == 0.0
    assert report["health"]["status"] == "UNKNOWN" and "Prometheus" in report["health"]["error"]

    text = subprocess.run(
        [sys.executable, "-m", "healer", "status", "--url", healer.url, "--bearer-token-file", str(tmp_path / "token")],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert text.returncode == 0, text.stderr
    assert "4 alerts received; 0 healed, 2 escalated, 0 in progress" in text.stdout
    assert "Health     UNKNOWN" in text.stdout


def test_status_cli_reports_unreachable_healer() -> None:
    """`healer status` against a closed port exits 2 and says which URL failed."""
    from tests.servers import free_port

    url = f"http://127.0.0.1:{free_port()}"
    result = subprocess.run(
        [sys.executable, "-m", "healer", "status", "--url", url], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 2 and url in result.stderr
