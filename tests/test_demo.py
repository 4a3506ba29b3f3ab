"""`healer demo` against the real binaries: every fault is healed and verified, with its time to heal,
and the optimizer keeps a change that helps and rolls back one that does not."""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from healer.demo import SCENARIO_NAMES, SCENARIOS, compress_rules
from tests.servers import processes_mentioning

pytestmark = pytest.mark.slow


OPTIMIZATIONS = {s.name: s for s in SCENARIOS if s.candidate is not None}


def _stop(pids: list[int], workdir: Path) -> None:
    """Stop the stack the demo left running (--keep), each process by its PID, and wait until it is gone."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while processes_mentioning(str(workdir)) and time.monotonic() < deadline:
        time.sleep(0.1)


def _optimizations(output: str, workdir: Path) -> dict[str, Any]:
    """The optimizer's API of the healer the demo left running, found by the console URL it printed, read with
    the viewer token it names (reads need a credential; without one healer answers 401)."""
    console = re.search(r"^  console +(http://127\.0\.0\.1:\d+)/$", output, re.M)
    assert console is not None, output[-3000:]
    url = console.group(1) + "/api/v1/optimizations?limit=50"
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(url, timeout=10)
    assert refused.value.code == 401
    token = workdir / "viewer.token"
    assert f"with the viewer token in {token}" in output, output[-3000:]
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token.read_text().strip()}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer


def test_every_scenario_heals(tmp_path: Path) -> None:
    """Seven faults fire their alerts and are healed and verified; a slow drift is fixed by a goal before it alerts;
    the optimizer keeps four batch workers (confidence up) and rolls read-ahead back (confidence down)."""
    report, workdir = tmp_path / "report.json", tmp_path / "w"
    arguments = [arg for name in SCENARIO_NAMES for arg in ("--scenario", name)]
    argv = [sys.executable, "-m", "healer", "demo", *arguments, "--report", str(report), "--workdir", str(workdir)]
    result = subprocess.run(
        [*argv, "--keep"],
        capture_output=True,
        text=True,
        timeout=900,
    )
    kill = re.search(r"Stop it with: kill ([\d ]+)$", result.stdout, re.M)
    try:
        assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
        optimizations = _optimizations(result.stdout, workdir)
    finally:
        _stop([int(pid) for pid in kill.group(1).split()] if kill else [], workdir)
    results = {r["scenario"]: r for r in json.loads(report.read_text())}
    assert sorted(results) == sorted(SCENARIO_NAMES)
    # Optimisation: what the optimizer's own API says, and what the demo showed of it.
    candidates = {c["name"]: c for c in optimizations["candidates"]}
    for name, scenario in OPTIMIZATIONS.items():
        outcome = results.pop(name)
        assert outcome["outcome"] == scenario.expect, (name, outcome, result.stdout[-4000:])
        trials = [t for t in optimizations["trials"] if t["candidate"] == scenario.candidate]
        assert [t["outcome"] for t in trials] == [scenario.expect], trials
        trial, candidate = trials[0], candidates[scenario.candidate]
        assert trial["before"] is not None and trial["after"] is not None, trial
        assert 0 < outcome["seconds_to_fire"] <= outcome["seconds_to_heal"] < 120, outcome
        assert (outcome["confidence_before"], outcome["confidence_after"]) == (
            trial["confidence"],
            candidate["confidence"],
        )
        shown = f"confidence in {scenario.candidate}: {trial['confidence']:.2f} → {candidate['confidence']:.2f}"
        assert shown in result.stdout, result.stdout[-4000:]
        if scenario.expect == "kept":
            assert trial["after"] < 0.5 * trial["before"] and candidate["state"] == "kept", (trial, candidate)
            assert candidate["confidence"] > trial["confidence"], candidate
        else:
            assert trial["after"] > 0.9 * trial["before"] and "rolled back with" in trial["detail"], trial
            assert candidate["confidence"] < trial["confidence"], candidate
    assert "healer's console: http://127.0.0.1:" in result.stdout
    forecast = results.pop("drift-creep")
    for name, outcome in results.items():
        assert outcome["outcome"] == "healed", (name, outcome, result.stdout[-4000:])
        assert 0 < outcome["seconds_to_fire"] <= outcome["seconds_to_heal"] < 120, (name, outcome)
        assert outcome["seconds_from_alert"] is not None and outcome["seconds_from_alert"] >= 0
    assert results["latency"]["strategies"] == ["clear-cache", "enable-caching"]
    # The forecast goal recalibrated the model before ModelDriftHigh could fire.
    assert forecast["outcome"] == "completed", (forecast, result.stdout[-4000:])
    assert forecast["strategies"] == ["recalibrate-model"]
    assert 0 < forecast["seconds_to_fire"] <= forecast["seconds_to_heal"] < 120, forecast
    assert "ModelDriftHigh never fired" in result.stdout
    assert "healed and verified by PromQL" in result.stdout
    # Side alerts (a probe failing while the app restarts) may add healed episodes of their own.
    status = re.search(r"Status report.*?(?=\nWhere to look)", result.stdout, re.S)
    assert status is not None, result.stdout[-3000:]
    healed = re.search(r"(\d+) healed", status.group(0))
    assert healed is not None and int(healed.group(1)) >= len(results), status.group(0)
    completed = re.search(r"Goals .*?(\d+) completed", status.group(0))
    assert completed is not None and int(completed.group(1)) >= 1, status.group(0)
    assert re.search(r"Optimizing 1 kept", status.group(0)), status.group(0)
    # A closing status that is not HEALTHY says why: the alerts that fire, or an escalation.
    health = re.search(r"Health +(\w+)", status.group(0))
    assert health is not None, status.group(0)
    if health.group(1) != "HEALTHY":
        assert re.search(rf"\nWhy {health.group(1)}:\n  \S", status.group(0)), status.group(0)
    # Everything the demo started is gone.
    assert processes_mentioning(str(tmp_path / "w")) == []


def test_unknown_scenario_is_refused() -> None:
    """A scenario name that does not exist is refused with the list of valid names."""
    result = subprocess.run(
        [sys.executable, "-m", "healer", "demo", "--scenario", "meteor"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2 and "memory-leak" in result.stderr


def test_compressed_rules_keep_expressions_but_shorten_time() -> None:
    """Compression divides `for` and range windows by 30 with floors, and leaves the rest alone."""
    rules = {
        "groups": [
            {
                "name": "g",
                "rules": [
                    {"alert": "A", "expr": "rate(x[5m]) > 1 and y[1h:1m] and z[1m]", "for": "10m"},
                    {"record": "r", "expr": "sum(rate(x[3d]))"},
                ],
            }
        ]
    }
    compressed = compress_rules(rules)["groups"][0]["rules"]
    assert compressed[0] == {"alert": "A", "expr": "rate(x[10s]) > 1 and y[2m:1m] and z[5s]", "for": "20s"}
    assert compressed[1]["expr"] == "sum(rate(x[2h24m]))"
