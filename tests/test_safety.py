"""End to end with real servers: the safety rails (guards, per-group concurrency, pauses, maintenance
windows, flapping and rules' budgets) hold healer back from acting, and let it heal once they allow."""

from __future__ import annotations

import itertools
import json
import re
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from healer.config.model import WEEKDAYS
from tests.servers import http_get, http_json, http_send, wait_for
from tests.stack import TOKEN, HealingStack, dump, remove_fault_strategy, start_stack, wait_resolved
from tests.test_healing_e2e import rule, wait_episode_end

pytestmark = pytest.mark.slow

AUTH = {"Authorization": f"Bearer {TOKEN}"}
GUARD_MESSAGE = "the fault file is too small to be removed safely"
# Appends "start NAME T" and "end NAME T" around the removal of the fault file, to show when each ran.
LOGGED_REMOVE = """
import os, sys, time
log, faults, name = sys.argv[1:]
with open(log, "a") as f:
    f.write(f"start {name} {time.time()}\\n")
time.sleep(0.5)
os.remove(os.path.join(faults, name))
with open(log, "a") as f:
    f.write(f"end {name} {time.time()}\\n")
"""
COUNT_RUN = "import sys; open(sys.argv[1], 'a').write('run\\n')"
SAMPLE = re.compile(r"^(\w+)(?:\{(.*)\})? (\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def sample(stack: HealingStack, metric: str, /, **labels: str) -> float | None:
    """The value of the first sample of a metric in healer's /metrics whose labels include `labels`, or None."""
    _, body = http_get(stack.healer.url + "/metrics", headers=stack.healer.headers)
    for line in body.decode().splitlines():
        match = SAMPLE.match(line)
        if match and match.group(1) == metric and labels.items() <= dict(LABEL.findall(match.group(2) or "")).items():
            return float(match.group(3))
    return None


def weekly_window(name: str, fault: str, start: datetime, seconds: int) -> dict[str, Any]:
    """A maintenance window recurring each week on `start`'s weekday and time (UTC) for one fault."""
    return {
        "name": name,
        "match": [f'fault="{fault}"'],
        "weekdays": [WEEKDAYS[start.weekday()]],
        "start": start.strftime("%H:%M"),
        "duration": f"{seconds}s",
        "timezone": "UTC",
    }


def wait_held(stack: HealingStack, rule_name: str, reason: str) -> dict[str, Any]:
    """Wait until the newest step of a rule is pending, held back for `reason`, and return it."""

    def held() -> dict[str, Any] | None:
        actions = stack.actions(rule=rule_name)
        if actions and actions[0]["state"] == "pending" and actions[0]["skip_reason"] == reason:
            return actions[0]
        return None

    try:
        return wait_for(held, 30, interval=0.2, what=f"a step of {rule_name} held for {reason}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{dump(stack)}") from None


def healer_events(stack: HealingStack, event: str) -> list[dict[str, Any]]:
    """healer's JSON log records of one event."""
    lines = [line for line in stack.healer.log().splitlines() if line.startswith("{")]
    return [record for record in map(json.loads, lines) if record.get("event") == event]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HealingStack]:
    """One stack for every rail but pause_when (which pauses everything); each test has its own faults and rules."""
    workdir = tmp_path_factory.mktemp("safety")
    faults = workdir / "faults"
    strategies = {
        "remove-fault": remove_fault_strategy(faults),
        "logged-remove": {
            "type": "exec",
            "command": [sys.executable, "-c", LOGGED_REMOVE, str(workdir / "fleet.log"), str(faults), "{labels.fault}"],
            "timeout": "10s",
        },
        "count-run": {
            "type": "exec",
            "command": [sys.executable, "-c", COUNT_RUN, str(workdir / "flap.log")],
            "timeout": "10s",
        },
    }
    now = datetime.now(UTC).replace(second=0, microsecond=0)
    guard = {"query": "fault_file_bytes{fault={labels.fault}} >= 100", "message": GUARD_MESSAGE}
    healing = {
        "pause_check_interval": "200ms",
        "maintenance": [
            weekly_window("ended", "maintpast", now - timedelta(hours=3), 3600),
            weekly_window("later", "maintfuture", now + timedelta(hours=2), 3600),
            weekly_window("now", "maintnow", now - timedelta(minutes=5), 3 * 3600),
        ],
        "rules": [
            rule("guarded", "guarded", ["remove-fault"], guard=[guard], guard_timeout="2s"),
            rule(
                "fleet",
                "fleet",
                ["logged-remove"],
                match=['alertname="FaultActive"', 'fault=~"fleet[abc]"'],
                max_concurrent_per={"labels": ["alertname"], "limit": 1},
            ),
            rule("pause-a", "pausea", ["remove-fault"]),
            rule("pause-b", "pauseb", ["remove-fault"]),
            rule("pause-c", "pausec", ["remove-fault"]),
            rule("maint-past", "maintpast", ["remove-fault"]),
            rule("maint-future", "maintfuture", ["remove-fault"]),
            rule("maint-now", "maintnow", ["remove-fault"]),
            rule(
                "flap",
                "flap",
                ["count-run"],
                max_attempts=1,
                verify={"within": "2s", "interval": "200ms"},
                flapping={"episodes": 3, "window": "60s"},
                budget={"actions": 2, "window": "60s"},
            ),
            rule("steady", "steady", ["remove-fault"]),
        ],
    }
    stack = start_stack(workdir, healing, strategies)
    yield stack
    stack.stop()


def test_failing_guard_holds_the_step_and_escalates_with_its_message(stack: HealingStack) -> None:
    """A failing guard holds the step and escalates with its message after guard_timeout; satisfied, it lets it heal."""
    skipped_before = sample(stack, "healer_skipped_total", reason="guard") or 0.0
    stack.inject("guarded")  # 6 bytes: the guard wants at least 100
    [held] = wait_episode_end(stack, "guarded")
    assert (held["outcome"], held["skip_reason"], held["detail"]) == ("cancelled", "guard", GUARD_MESSAGE), dump(stack)
    assert held["episode"]["state"] == "escalated"
    assert held["started_at"] is None and stack.fault_present("guarded")  # the strategy never ran
    assert (sample(stack, "healer_skipped_total", reason="guard") or 0.0) >= skipped_before + 1
    [escalation] = wait_for(
        lambda: stack.am_alerts(alertname="HealingFailed", fault="guarded"), 20, what="HealingFailed for the guard"
    )
    assert GUARD_MESSAGE in escalation["annotations"]["description"]

    (stack.faults / "guarded").unlink()
    wait_resolved(stack, held)
    (stack.faults / "guarded").write_text("x" * 200)

    def second_episode() -> list[dict[str, Any]] | None:
        actions = [a for a in stack.actions(rule="guarded") if a["episode"]["id"] != held["episode"]["id"]]
        return actions if actions and actions[0]["episode"]["state"] != "open" else None

    [healed] = wait_for(second_episode, 40, interval=0.2, what="the guarded fault's second episode to end")
    assert (healed["outcome"], healed["episode"]["state"]) == ("healed", "healed"), dump(stack)
    assert not stack.fault_present("guarded")


def test_max_concurrent_per_group_heals_one_instance_at_a_time(stack: HealingStack) -> None:
    """Three alerts of one label group firing at once are healed one after another, never overlapping."""
    held_before = sample(stack, "healer_skipped_total", reason="blast_radius") or 0.0
    for name in ("fleeta", "fleetb", "fleetc"):
        stack.inject(name)

    def all_ended() -> list[dict[str, Any]] | None:
        actions = stack.actions(rule="fleet")
        ended = len({a["episode"]["id"] for a in actions}) == 3 and all(
            a["episode"]["state"] != "open" for a in actions
        )
        return actions if ended else None

    actions = wait_for(all_ended, 60, interval=0.2, what="three fleet episodes to end")
    assert sorted((a["episode"]["labels"]["fault"], a["outcome"]) for a in actions) == [
        ("fleeta", "healed"),
        ("fleetb", "healed"),
        ("fleetc", "healed"),
    ], dump(stack)
    runs: dict[str, dict[str, float]] = {}
    for line in (stack.workdir / "fleet.log").read_text().splitlines():
        edge, name, at = line.split()
        runs.setdefault(name, {})[edge] = float(at)
    intervals = sorted((run["start"], run["end"]) for run in runs.values())
    assert len(intervals) == 3, intervals
    for (_, earlier_end), (later_start, _) in itertools.pairwise(intervals):
        assert later_start >= earlier_end, f"restarts overlap: {intervals}"
    assert (sample(stack, "healer_skipped_total", reason="blast_radius") or 0.0) >= held_before + 1


def test_api_pause_holds_matching_alerts_until_it_ends(stack: HealingStack) -> None:
    """A pause holds the alerts its matchers select while others are healed; expired or deleted, they are healed."""
    url = stack.healer.url + "/api/v1/pauses"
    good = {"matchers": ['fault="pausea"'], "reason": "database migration", "duration": "15s"}
    for body, field in [
        ({"matchers": ['fault="pausea"'], "duration": "30s"}, "reason"),
        ({"matchers": ["fault~pausea"], "reason": "r", "duration": "30s"}, "matchers"),
        ({"matchers": ['fault="pausea"'], "reason": "r", "duration": "soon"}, "duration"),
    ]:
        status, answer = http_send("POST", url, body, AUTH)
        assert 400 <= status < 500 and field in answer["error"], (status, answer)
    assert http_send("POST", url, good)[0] == 401
    status, created = http_send("POST", url, good, AUTH)
    assert status == 201, created
    expiring = created["pause"]
    assert expiring["matchers"] == ['fault="pausea"'] and expiring["active"]
    status, deleted_later = http_send("POST", url, {**good, "matchers": ['fault="pausec"'], "duration": "1h"}, AUTH)
    assert status == 201, deleted_later

    for name in ("pausea", "pauseb", "pausec"):
        stack.inject(name)
    [healed] = wait_episode_end(stack, "pause-b")
    assert healed["outcome"] == "healed", dump(stack)
    held = wait_held(stack, "pause-a", "paused")
    assert f"api {created['id']}" in held["detail"] and "database migration" in held["detail"]
    wait_held(stack, "pause-c", "paused")

    listed = http_json(url, headers=AUTH)
    assert {p["id"] for p in listed["pauses"]} >= {created["id"], deleted_later["id"]}
    status_pauses = http_json(stack.healer.url + "/api/v1/status", headers=stack.healer.headers)["healing"]["pauses"]
    assert {("api", str(created["id"])), ("api", str(deleted_later["id"]))} <= {
        (p["source"], p["name"]) for p in status_pauses
    }
    printed = subprocess.run(
        [
            sys.executable,
            "-m",
            "healer",
            "status",
            "--url",
            stack.healer.url,
            "--bearer-token-file",
            str(stack.workdir / "token"),
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert f"PAUSED by api {created['id']}: database migration" in printed, printed
    assert sample(stack, "healer_paused", source="api", name=str(created["id"])) == 1

    one = f"{url}/{deleted_later['id']}"
    assert http_send("DELETE", one)[0] == 401
    status, ended = http_send("DELETE", one, headers=AUTH)
    assert status == 200 and ended["pause"]["ended_at"] is not None, ended
    assert http_send("DELETE", one, headers=AUTH)[0] == 404
    [resumed] = wait_episode_end(stack, "pause-c")
    assert resumed["outcome"] == "healed", dump(stack)
    assert resumed["started_at"] >= ended["pause"]["ended_at"]

    [expired] = wait_episode_end(stack, "pause-a")
    assert expired["outcome"] == "healed", dump(stack)
    assert expired["started_at"] >= expiring["ends_at"]
    wait_for(lambda: sample(stack, "healer_paused", source="api", name=str(created["id"])) is None, 10, what="gauge")
    assert deleted_later["id"] not in {p["id"] for p in http_json(url, headers=AUTH)["pauses"]}


def test_maintenance_window_pauses_only_while_it_covers_now(stack: HealingStack) -> None:
    """Weekly maintenance windows that ended or are yet to come do not pause; the one covering now holds its alert."""
    try:
        for name in ("maintpast", "maintfuture", "maintnow"):
            stack.inject(name)
        for rule_name in ("maint-past", "maint-future"):
            [action] = wait_episode_end(stack, rule_name)
            assert action["outcome"] == "healed", dump(stack)
        held = wait_held(stack, "maint-now", "paused")
        assert "maintenance now" in held["detail"]
        assert stack.fault_present("maintnow")
        in_force = {
            (p["source"], p["name"])
            for p in http_json(stack.healer.url + "/api/v1/pauses", headers=stack.healer.headers)["in_force"]
        }
        assert ("maintenance", "now") in in_force
        assert not {("maintenance", "ended"), ("maintenance", "later")} & in_force
        assert sample(stack, "healer_paused", source="maintenance", name="now") == 1
    finally:
        (stack.faults / "maintnow").unlink(missing_ok=True)


def test_flapping_alert_escalates_once_within_its_rules_budget(stack: HealingStack) -> None:
    """A flapping alert acts within its rule's budget, escalates once, then is only recorded; others still heal."""
    flap = stack.faults / "flap"
    stop = threading.Event()

    def toggle() -> None:
        while not stop.is_set():
            flap.write_text("fault\n")
            stop.wait(1.5)
            flap.unlink(missing_ok=True)
            stop.wait(1.5)

    def flapping_escalations() -> list[dict[str, Any]]:
        return [e for e in healer_events(stack, "escalating") if str(e.get("reason", "")).startswith("flapping")]

    def suppressed() -> int:
        return int(
            http_json(stack.healer.url + "/api/v1/status", headers=stack.healer.headers)["healing"]["episodes"].get(
                "flapping", 0
            )
        )

    toggler = threading.Thread(target=toggle, daemon=True)
    toggler.start()
    try:
        stack.inject("steady")
        [healed] = wait_episode_end(stack, "steady")
        assert healed["outcome"] == "healed", dump(stack)
        try:
            wait_for(lambda: flapping_escalations() and suppressed() >= 1, 60, 0.3, what="a flapping spell")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{dump(stack)}") from None
    finally:
        stop.set()
        toggler.join()
        flap.unlink(missing_ok=True)
    runs_log = Path(stack.workdir / "flap.log")
    runs = len(runs_log.read_text().splitlines()) if runs_log.exists() else 0
    assert runs <= 2, f"{runs} runs exceed the rule's budget of 2"
    [escalation] = flapping_escalations()
    assert escalation["alertname"] == "FaultActive"
    assert not http_json(stack.healer.url + "/api/v1/status", headers=stack.healer.headers)["healing"]["circuit_open"]
    wait_resolved(stack, healed)
    stack.inject("steady")

    def healed_again() -> list[dict[str, Any]] | None:
        actions = [a for a in stack.actions(rule="steady") if a["episode"]["id"] != healed["episode"]["id"]]
        return actions if actions and actions[0]["episode"]["state"] != "open" else None

    [again] = wait_for(healed_again, 40, interval=0.2, what="the steady fault healed after the flapping")
    assert again["outcome"] == "healed", dump(stack)


@pytest.fixture
def deploy_stack(tmp_path: Path) -> Iterator[HealingStack]:
    """A stack of its own whose pause_when pauses every rule while the fault `deploy` is active."""
    strategies = {"remove-fault": remove_fault_strategy(tmp_path / "faults")}
    healing = {
        "pause_check_interval": "200ms",
        "pause_when": ['fault_active{fault="deploy"} == 1'],
        "rules": [rule("work", "work", ["remove-fault"])],
    }
    stack = start_stack(tmp_path, healing, strategies)
    yield stack
    stack.stop()


def test_pause_when_query_holds_steps_while_it_returns_a_result(deploy_stack: HealingStack) -> None:
    """While a pause_when query returns a result a fault is not acted on; once it returns nothing, it is healed."""
    stack = deploy_stack
    stack.inject("deploy")

    def pause_when_in_force() -> bool:
        in_force = http_json(stack.healer.url + "/api/v1/pauses", headers=stack.healer.headers)["in_force"]
        return any(p["source"] == "pause_when" for p in in_force)

    wait_for(pause_when_in_force, 20, what="the pause_when query to hold")
    stack.inject("work")
    held = wait_held(stack, "work", "paused")
    assert "pause_when" in held["detail"]
    assert stack.fault_present("work")
    assert sample(stack, "healer_paused", source="pause_when") == 1
    (stack.faults / "deploy").unlink()
    [action] = wait_episode_end(stack, "work")
    assert action["outcome"] == "healed", dump(stack)
    assert not stack.fault_present("work")
    wait_for(lambda: not pause_when_in_force(), 10, what="the pause_when pause to end")
