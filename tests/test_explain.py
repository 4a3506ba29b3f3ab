"""`healer test-alert` explains the safety rails for a payload, asking a real Prometheus for guards and pause_when."""

from __future__ import annotations

import datetime
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from tests.conftest import World
from tests.servers import wait_for
from tests.test_clients import closed_url
from tests.test_engine_safety import alert, config, payload


def explain(tmp_path: Path, settings: dict[str, Any], *alerts: dict[str, Any], text: bool = False) -> Any:
    """Run `healer test-alert` on a config and a payload; its JSON report (or text with `text`)."""
    (tmp_path / "healer.yml").write_text(json.dumps(settings))
    (tmp_path / "payload.json").write_bytes(payload(*alerts))
    argv = [sys.executable, "-m", "healer", "test-alert", "-c", str(tmp_path / "healer.yml")]
    argv.append(str(tmp_path / "payload.json"))
    result = subprocess.run([*argv, *([] if text else ["--json"])], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    return result.stdout if text else json.loads(result.stdout)


def rails_config(tmp_path: Path, prometheus: str) -> dict[str, Any]:
    """A rule with a guard that holds, one that does not, a group limit, a fleet share and a budget; a pause_when
    query, a maintenance window covering now and one that does not."""
    now = datetime.datetime.now(datetime.UTC)
    settings = config(
        tmp_path,
        rule={
            "guard": [
                {"query": 'count(up{job="app"} == 1) >= 1', "message": "keep the app up"},
                {"query": 'count(up{job="app"} == 1) >= 2', "message": "keep two app instances up"},
            ],
            "guard_timeout": "2m",
            "max_concurrent_per": {"labels": ["service"], "limit": 1},
            "blast_radius": {"labels": ["job"], "of": 'count(up{job="app"})', "fraction": 0.5, "window": "10m"},
            "budget": {"actions": 3, "window": "1h", "per": ["instance"]},
        },
        healing={
            "pause_when": ['up{job="app"} == 1'],
            "maintenance": [
                {"name": "now", "start": (now - datetime.timedelta(hours=1)).strftime("%H:%M"), "duration": "3h"},
                {"name": "later", "start": (now + datetime.timedelta(hours=2)).strftime("%H:%M"), "duration": "1h"},
            ],
        },
    )
    settings["prometheus"] = {"url": prometheus, "timeout": "2s"}
    return settings


def test_test_alert_asks_prometheus_for_guards_and_pauses(tmp_path: Path, world: World) -> None:
    """With Prometheus answering, each guard and pause_when is evaluated and every rail that applies is explained."""
    settings = rails_config(tmp_path, world.prometheus.url)
    web = alert("web-1")
    web["labels"].update(service="web", job="app")

    def report() -> dict[str, Any] | None:
        [found] = explain(tmp_path, settings, web)
        rails = {(r["rail"], r.get("source") or r.get("query") or r.get("group")): r for r in found["rails"]}
        # Prometheus scrapes the app within a second of starting; until then up{job="app"} is empty.
        return rails if rails[("pause", 'pause_when up{job="app"} == 1')]["holds"] else None

    rails = wait_for(report, 20, interval=0.5, what="Prometheus to scrape the app")
    assert rails[("guard", 'count(up{job="app"} == 1) >= 1')]["holds"] is False
    held = rails[("guard", 'count(up{job="app"} == 1) >= 2')]
    assert held["holds"] is True and "keep two app instances up" in held["explanation"]
    assert rails[("pause", "maintenance window now")]["holds"] is True
    assert rails[("pause", "maintenance window later")]["holds"] is False
    assert "at most 1 episode" in rails[("blast_radius", 'record:["web"]')]["explanation"]
    assert "1 instances now, so at most 1" in rails[("blast_radius", 'count(up{job="app"})')]["explanation"]
    assert {kind for kind, _ in rails} == {"pause", "guard", "blast_radius", "budget", "flapping"}
    printed = explain(tmp_path, settings, web, text=True)
    assert "guard: HOLDS" in printed and "flapping:" in printed


def test_test_alert_says_when_prometheus_cannot_answer(tmp_path: Path) -> None:
    """Without Prometheus, guards and pause_when are reported as holding (they fail closed), and why."""
    settings = rails_config(tmp_path, closed_url())
    [found] = explain(tmp_path, settings, alert("web-1"))
    guards = [rail for rail in found["rails"] if rail["rail"] == "guard"]
    assert len(guards) == 2 and all(rail["holds"] and "not checked" in rail["explanation"] for rail in guards)
    [pause_when] = [rail for rail in found["rails"] if rail.get("source", "").startswith("pause_when")]
    assert pause_when["holds"] and "could not answer" in pause_when["explanation"]
