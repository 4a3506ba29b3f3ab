"""`healer demo` against the real binaries: every fault is healed and verified, with its time to heal."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from healer.demo import SCENARIO_NAMES, compress_rules
from tests.servers import processes_mentioning

pytestmark = pytest.mark.slow


def test_every_scenario_heals(tmp_path: Path) -> None:
    """Seven faults fire their alerts and are healed and verified; a slow drift is fixed by a goal before it alerts."""
    report = tmp_path / "report.json"
    arguments = [arg for name in SCENARIO_NAMES for arg in ("--scenario", name)]
    result = subprocess.run(
        [sys.executable, "-m", "healer", "demo", *arguments, "--report", str(report), "--workdir", str(tmp_path / "w")],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-3000:]
    results = {r["scenario"]: r for r in json.loads(report.read_text())}
    assert sorted(results) == sorted(SCENARIO_NAMES)
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
