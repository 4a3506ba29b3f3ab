"""Goals against real servers: trend queries open goals, plans run real actions, PromQL measures progress."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from healer.planner.model import Goal
from tests.conftest import World
from tests.servers import (
    Server,
    http_get,
    http_json,
    http_post,
    process_alive,
    prom_query,
    start_healer,
    wait_for,
)

pytestmark = pytest.mark.slow

TOKEN = "planner-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
PY = sys.executable
# Appends 50 kB every 0.1 s (at most 60 s) after writing its pid: a runaway writer filling a cache file.
WRITER = (
    "import os, sys, time\n"
    "open(sys.argv[2], 'w').write(str(os.getpid()))\n"
    "for _ in range(600):\n"
    "    open(sys.argv[1], 'ab').write(b'x' * 50000)\n"
    "    time.sleep(0.1)\n"
)
TRUNCATE = "import os, sys; open(os.path.join(sys.argv[1], sys.argv[2]), 'w').close()"
# Writes its pid to a file, then sleeps: a step that takes long and leaves a process to look for.
SLEEPER = "import os, sys, time; open(sys.argv[1], 'w').write(str(os.getpid())); time.sleep(float(sys.argv[2]))"


def start_planner(
    world: World,
    workdir: Path,
    strategies: dict[str, Any],
    goals: list[dict[str, Any]] | None = None,
    servers: list[Server] | None = None,
) -> Server:
    """Start healer with a planner that runs every 0.3 s."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "token").write_text(TOKEN)
    config = {
        "server": {"auth": {"bearer_token_file": str(workdir / "token")}, "shutdown_timeout": "2s"},
        "prometheus": {"url": world.prometheus.url, "timeout": "2s"},
        "store": {"path": str(workdir / "healer.db")},
        "exporter": {"host": False},
        "planner": {"interval": "300ms", "goals": goals or []},
        "strategies": strategies,
    }
    healer = start_healer(workdir / "healer", config)
    if servers is not None:
        servers.append(healer)
    return healer


def goals(healer: Server, **query: str) -> list[dict[str, Any]]:
    params = "&".join(f"{k}={v}" for k, v in query.items())
    return list(http_json(f"{healer.url}/api/v1/goals?{params}", headers=healer.headers)["goals"])


def call(url: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """POST JSON with the token unless `headers` says otherwise."""
    return http_post(url, body, AUTH if headers is None else headers)


def post_goal(healer: Server, body: dict[str, Any], headers: dict[str, str] | None = None) -> tuple[int, Any]:
    return call(f"{healer.url}/api/v1/goals", body, headers)


def wait_goal(healer: Server, goal_id: int, states: tuple[str, ...], timeout: float = 30) -> dict[str, Any]:
    def reached() -> dict[str, Any] | None:
        goal = http_json(f"{healer.url}/api/v1/goals/{goal_id}", headers=healer.headers)["goal"]
        return goal if goal["state"] in states else None

    try:
        return wait_for(reached, timeout, interval=0.1, what=f"goal {goal_id} to be {states}")
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}\n{http_json(f'{healer.url}/api/v1/goals', headers=healer.headers)}\n{healer.log()[-3000:]}"
        ) from None


def metric(healer: Server, sample: str) -> float:
    _, body = http_get(healer.url + "/metrics", headers=healer.headers)
    for line in body.decode().splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{sample} not in /metrics")


def operator_goal(name: str, plan: list[str], **extra: Any) -> dict[str, Any]:
    """An operator's goal whose target `vector(1) <= 0` is never reached unless `target` is given."""
    return {
        "name": name,
        "type": "performance",
        "target": {"query": "vector(1)", "below": 0},
        "plan": plan,
        "settle": "500ms",
        **extra,
    }


def test_trend_opens_a_goal_whose_plan_reaches_the_target(world: World, tmp_path: Path, servers: list[Server]) -> None:
    """A growing file's forecast opens a goal; its plan stops the writer, then trims, and PromQL sees the target met."""
    cache, pidfile = world.files / "cache", tmp_path / "writer.pid"
    strategies = {
        "stop-writer": {"type": "signal", "signal": "SIGTERM", "pidfile": str(pidfile)},
        "trim": {"type": "exec", "command": [PY, "-c", TRUNCATE, str(world.files), "{labels.fault}"]},
    }
    template = {
        "name": "cache-growth",
        "type": "reliability",
        "priority": "high",
        "description": "the cache file will outgrow its budget within a minute",
        "trigger": 'predict_linear(fault_file_bytes{fault="cache"}[5s], 60) > 2e6 and fault_file_bytes > 1e5',
        "target": {"query": "fault_file_bytes{fault={labels.fault}}", "below": 50000},
        "plan": ["stop-writer", "trim"],
        "settle": "1500ms",
        "deadline": "1m",
    }
    healer = start_planner(world, tmp_path, strategies, [template], servers)
    writer = subprocess.Popen([PY, "-c", WRITER, str(cache), str(pidfile)])
    try:
        opened = wait_for(lambda: goals(healer), 30, interval=0.1, what="a goal to open")
        goal = wait_goal(healer, opened[0]["id"], ("completed", "failed", "cancelled"))
        assert writer.wait(timeout=10) == -signal.SIGTERM  # the plan's first step stopped the real writer
    finally:
        writer.kill()
        writer.wait()
        cache.unlink(missing_ok=True)
    assert goal["state"] == "completed", goal
    assert goal["source"] == "cache-growth" and goal["type"] == "reliability" and goal["priority"] == "HIGH"
    assert goal["labels"]["fault"] == "cache" and goal["trigger_value"] > 2e6
    assert [(s["strategy"], s["result"]) for s in goal["steps"]] == [("stop-writer", "ok"), ("trim", "ok")]
    assert goal["initial_value"] > 1e5 and goal["value"] <= 50000 and goal["progress"] == 1.0
    assert goal["target"]["query"] == 'fault_file_bytes{fault="cache"}'
    assert "target reached" in goal["detail"] and goal["started_at"] <= goal["ended_at"] <= goal["deadline"]
    # The trigger is gone with the file's size, so no second goal opens for the same series.
    time.sleep(1.5)
    assert [g["id"] for g in goals(healer)] == [goal["id"]]
    assert metric(healer, 'healer_goals_ended_total{state="completed"}') == 1
    assert metric(healer, 'healer_goal_steps_total{result="ok"}') == 2
    assert metric(healer, 'healer_goals_opened_total{type="reliability"}') == 1
    assert metric(healer, 'healer_goals_open{state="in_progress"}') == 0
    report = http_json(f"{healer.url}/api/v1/status", headers=healer.headers)["goals"]
    assert report["completed"] == 1 and report["open"] == []
    text = subprocess.run(
        [PY, "-m", "healer", "status", "--url", healer.url, "--bearer-token-file", str(tmp_path / "token")],
        capture_output=True,
        text=True,
        timeout=30,
    ).stdout
    assert "1 completed, 0 failed, 0 cancelled" in text, text


def test_operator_goals_run_by_priority_then_age(world: World, tmp_path: Path, servers: list[Server]) -> None:
    """While one goal runs, a CRITICAL goal posted after a LOW one still starts first; a spent plan fails its goal."""
    strategies = {
        "slow": {"type": "exec", "command": [PY, "-c", "import time; time.sleep(2)"]},
        "noop": {"type": "exec", "command": ["true"]},
    }
    healer = start_planner(world, tmp_path, strategies, servers=servers)
    status, body = post_goal(healer, operator_goal("busy", ["slow"], priority="medium"))
    assert status == 201, body
    busy = wait_goal(healer, body["goal"]["id"], ("in_progress",))
    reached = {"query": "vector(0)", "below": 1}
    _, low = post_goal(healer, operator_goal("later", ["noop"], priority="low", target=reached))
    _, critical = post_goal(healer, operator_goal("urgent", ["noop"], priority=5, target=reached))
    assert low["goal"]["state"] == critical["goal"]["state"] == "pending"
    busy = wait_goal(healer, busy["id"], ("failed",))
    assert "plan ran out" in busy["detail"] and busy["progress"] == 0.0, busy
    assert [(s["strategy"], s["result"]) for s in busy["steps"]] == [("slow", "ok")]
    low_goal = wait_goal(healer, low["goal"]["id"], ("completed",))
    critical_goal = wait_goal(healer, critical["goal"]["id"], ("completed",))
    assert critical_goal["started_at"] < low_goal["started_at"]
    # The target held when each started, so neither ran a step.
    assert critical_goal["steps"] == [] and low_goal["steps"] == []
    assert critical_goal["priority"] == "CRITICAL" and critical_goal["priority_level"] == 5
    assert metric(healer, 'healer_goals_ended_total{state="failed"}') == 1


def test_bad_goal_requests_are_refused_with_the_reason(world: World, tmp_path: Path, servers: list[Server]) -> None:
    """Missing token, unknown or approval-gated strategies, a bad target and a duplicate open goal each get a 4xx."""
    strategies = {
        "noop": {"type": "exec", "command": ["true"]},
        "gated": {"type": "exec", "command": ["true"], "approval": "required"},
        "slow": {"type": "exec", "command": [PY, "-c", "import time; time.sleep(3)"]},
    }
    healer = start_planner(world, tmp_path, strategies, servers=servers)
    assert post_goal(healer, operator_goal("a", ["noop"]), headers={})[0] == 401
    status, body = post_goal(healer, operator_goal("a", ["noop", "missing"]))
    assert status == 422 and body["error"] == "plan[1]: strategy 'missing' is not defined under strategies"
    status, body = post_goal(healer, operator_goal("a", ["gated"]))
    assert status == 422 and "requires approval" in body["error"]
    status, body = post_goal(healer, operator_goal("a", ["noop"], target={"query": "up", "below": 1, "above": 2}))
    assert status == 422 and body["error"].startswith("not a valid goal: target: ") and "exactly one" in body["error"]
    status, body = post_goal(healer, operator_goal("a", ["noop"], target={"query": "sum(", "below": 1}))
    assert status == 422 and body["error"].startswith("target.query: Prometheus rejects it"), body
    status, body = post_goal(healer, operator_goal("a", ["noop"], type="wishful"))
    assert status == 422 and body["errors"][0]["field"] == "type"
    status, body = post_goal(healer, {"name": "x"}, headers={**AUTH, "Content-Type": "text/plain"})
    assert status == 415 and "application/json" in body["error"]
    status, first = post_goal(healer, operator_goal("a", ["slow"], labels={"service": "web"}))
    assert status == 201
    status, body = post_goal(healer, operator_goal("a", ["slow"], labels={"service": "web"}))
    assert status == 409 and "open already" in body["error"]
    # Same name, other labels: another goal.
    status, second = post_goal(healer, operator_goal("a", ["slow"], labels={"service": "api"}))
    assert status == 201
    assert http_get(f"{healer.url}/api/v1/goals?state=done", headers=healer.headers)[0] == 400
    assert http_get(f"{healer.url}/api/v1/goals/x", headers=healer.headers)[0] == 400
    assert http_get(f"{healer.url}/api/v1/goals/9999", headers=healer.headers)[0] == 404
    # Only the two accepted goals exist; the first is worked on and the second waits for it.
    wait_goal(healer, first["goal"]["id"], ("in_progress",))
    listed = {g["id"]: g["state"] for g in goals(healer)}
    assert listed == {first["goal"]["id"]: "in_progress", second["goal"]["id"]: "pending"}, listed


def test_cancelling_a_goal_stops_its_running_step(world: World, tmp_path: Path, servers: list[Server]) -> None:
    """An operator's cancel ends the goal at once and kills the step's process; a second cancel is refused."""
    pidfile = tmp_path / "step.pid"
    strategies = {"long": {"type": "exec", "command": [PY, "-c", SLEEPER, str(pidfile), "30"], "timeout": "1m"}}
    healer = start_planner(world, tmp_path, strategies, servers=servers)
    _, body = post_goal(healer, operator_goal("long-running", ["long"]))
    goal_id = body["goal"]["id"]
    pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text(), 20, what="the step to start"))
    cancel = f"{healer.url}/api/v1/goals/{goal_id}/cancel"
    status, body = call(cancel, headers={})
    assert status == 401 and body["error"].startswith("missing Authorization")
    status, body = call(cancel, headers={**AUTH, "X-Healer-Operator": "alice"})
    goal = body["goal"]
    assert status == 200 and goal["state"] == "cancelled" and goal["detail"] == "cancelled by legacy-token (says alice)"
    wait_for(lambda: not process_alive(pid), 10, what="the step's process to be stopped")
    goal = wait_for(
        lambda: (
            (g := http_json(f"{healer.url}/api/v1/goals/{goal_id}", headers=healer.headers)["goal"])["steps"][0][
                "result"
            ]
            and g
        ),
        10,
        what="the step to be recorded",
    )
    assert goal["steps"][0]["result"] == "interrupted" and goal["state"] == "cancelled"
    status, body = call(cancel)
    assert status == 409 and "is cancelled already" in body["error"]
    assert call(f"{healer.url}/api/v1/goals/4242/cancel") == (404, {"error": "no goal 4242"})


def test_trigger_gone_cancels_pending_goal_and_deadline_fails_running_one(
    world: World, tmp_path: Path, servers: list[Server]
) -> None:
    """Two series open two goals; the pending one is cancelled when its series goes, the other fails at its deadline."""
    names = ("dl-a", "dl-b")
    strategies = {"noop": {"type": "exec", "command": ["true"]}}
    template = {
        "name": "deadline",
        "type": "capability",
        "trigger": 'fault_active{fault=~"dl-.*"}',
        "target": {"query": "vector(1)", "below": 0},
        "plan": ["noop"],
        "settle": "1m",
        "deadline": "5s",
    }
    healer = start_planner(world, tmp_path, strategies, [template], servers)
    try:
        for name in names:
            (world.files / name).write_text("x")
        both = wait_for(lambda: len(g := goals(healer)) == 2 and g, 20, what="two goals")
        running = wait_for(lambda: [g for g in goals(healer) if g["state"] == "in_progress"], 10, what="one to start")
        pending = next(g for g in both if g["id"] != running[0]["id"])
        (world.files / pending["labels"]["fault"]).unlink()
        cancelled = wait_goal(healer, pending["id"], ("cancelled",))
        assert cancelled["detail"] == "the trigger no longer returns this series" and cancelled["steps"] == []
        failed = wait_goal(healer, running[0]["id"], ("failed", "completed"), timeout=20)
    finally:
        for name in names:
            (world.files / name).unlink(missing_ok=True)
    assert failed["state"] == "failed" and failed["detail"].startswith("the deadline passed"), failed
    assert failed["ended_at"] >= failed["deadline"] and failed["ended_at"] - failed["deadline"] < 3
    assert [s["strategy"] for s in failed["steps"]] == ["noop"]


def test_goal_survives_a_crash_during_its_step(world: World, tmp_path: Path, servers: list[Server]) -> None:
    """healer killed while a goal's step runs: after restart that step is recorded interrupted and the plan goes on."""
    target, pidfile = world.files / "restart", tmp_path / "step.pid"
    target.write_text("y" * 1000)
    strategies = {
        "slow": {"type": "exec", "command": [PY, "-c", SLEEPER, str(pidfile), "5"]},
        "trim": {"type": "exec", "command": [PY, "-c", TRUNCATE, str(world.files), "{labels.fault}"]},
    }
    healer = start_planner(world, tmp_path, strategies, servers=servers)
    step_pid = None
    try:
        wait_for(lambda: prom_query(world.prometheus, 'fault_file_bytes{fault="restart"} == 1000'), 10)
        goal = operator_goal(
            "shrink",
            ["slow", "trim"],
            labels={"fault": "restart"},
            target={"query": "fault_file_bytes{fault={labels.fault}}", "below": 10},
        )
        status, body = post_goal(healer, goal)
        assert status == 201, body
        step_pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text(), 20, what="the slow step"))
        healer.stop(signal.SIGKILL)
        healer = start_planner(world, tmp_path, strategies, servers=servers)
        done = wait_goal(healer, body["goal"]["id"], ("completed", "failed"))
    finally:
        if step_pid is not None and process_alive(step_pid):
            os.kill(step_pid, signal.SIGKILL)
        target.unlink(missing_ok=True)
    assert done["state"] == "completed", done
    assert [(s["strategy"], s["result"]) for s in done["steps"]] == [("slow", "interrupted"), ("trim", "ok")]
    assert done["initial_value"] == 1000 and done["value"] == 0


def test_a_step_finishing_after_the_deadline_still_completes_its_goal(
    world: World, tmp_path: Path, servers: list[Server]
) -> None:
    """The deadline passes while a step runs; the step then reaches the target within settle, so the goal completes."""
    target = world.files / "late"
    target.write_text("z" * 1000)
    slow_trim = f"import time; time.sleep(2); {TRUNCATE}"
    strategies = {"slow-trim": {"type": "exec", "command": [PY, "-c", slow_trim, str(world.files), "{labels.fault}"]}}
    healer = start_planner(world, tmp_path, strategies, servers=servers)
    try:
        wait_for(lambda: prom_query(world.prometheus, 'fault_file_bytes{fault="late"} == 1000'), 10)
        goal = operator_goal(
            "late",
            ["slow-trim"],
            labels={"fault": "late"},
            target={"query": "fault_file_bytes{fault={labels.fault}}", "below": 10},
            deadline="1500ms",
            settle="3s",
        )
        status, body = post_goal(healer, goal)
        assert status == 201, body
        done = wait_goal(healer, body["goal"]["id"], ("completed", "failed"))
    finally:
        target.unlink(missing_ok=True)
    assert done["state"] == "completed" and done["ended_at"] > done["deadline"], done


async def test_a_step_whose_outcome_was_lost_is_not_run_again(
    world: World, tmp_path: Path, aiohttp_client: Any
) -> None:
    """The store refuses to record a step's end once; the step is then recorded failed, never run a second time."""
    from healer.config import parse_config
    from healer.planner.routes import PLANNER
    from healer.server import create_app
    from healer.storage import StoreUnavailableError

    runs = tmp_path / "runs"
    count = "import sys; open(sys.argv[1], 'a').write('ran\\n')"
    config = parse_config(
        {
            "prometheus": {"url": world.prometheus.url},
            "store": {"path": str(tmp_path / "healer.db")},
            "exporter": {"host": False},
            "planner": {"interval": "200ms"},
            "strategies": {"count": {"type": "exec", "command": [PY, "-c", count, str(runs)]}},
        }
    )
    app = create_app(config)
    records = app[PLANNER].records
    change, refused = records.change, []

    async def flaky_change(goal_id: int, rule: Callable[[Goal], Goal], act: Any = None) -> Goal:
        before = await records.get(goal_id)
        after = rule(before)
        # The change that records a running step's end: refused once, as a locked database would.
        if not refused and before.step_running and not after.step_running and after.next_step > before.next_step:
            refused.append(goal_id)
            raise StoreUnavailableError("database is locked")
        return await change(goal_id, rule, act)

    records.change = flaky_change  # type: ignore[method-assign]
    client = await aiohttp_client(app)
    response = await client.post("/api/v1/goals", json=operator_goal("once", ["count"]))
    assert response.status == 201, await response.text()
    goal_id = (await response.json())["goal"]["id"]

    async def ended() -> dict[str, Any] | None:
        goal = (await (await client.get(f"/api/v1/goals/{goal_id}")).json())["goal"]
        return goal if goal["state"] in ("completed", "failed", "cancelled") else None

    goal = None
    for _ in range(100):
        goal = await ended()
        if goal is not None:
            break
        await asyncio.sleep(0.1)
    assert goal is not None and goal["state"] == "failed", goal
    assert refused and runs.read_text() == "ran\n"
    assert [(s["strategy"], s["result"], s["detail"]) for s in goal["steps"]] == [
        ("count", "failed", "the step's outcome was not recorded")
    ]


async def test_a_disabled_planner_refuses_new_goals(tmp_path: Path, aiohttp_client: Any) -> None:
    """With planner.enabled false a posted goal would never run, so it is refused with 503."""
    from healer.config import parse_config
    from healer.server import create_app

    config = parse_config(
        {
            "store": {"path": str(tmp_path / "healer.db")},
            "exporter": {"host": False},
            "planner": {"enabled": False},
            "strategies": {"noop": {"type": "exec", "command": ["true"]}},
        }
    )
    client = await aiohttp_client(create_app(config))
    response = await client.post("/api/v1/goals", json=operator_goal("never", ["noop"]))
    assert response.status == 503 and "planner.enabled" in (await response.json())["error"]


def test_a_reached_goal_is_not_reopened_within_its_cooldown(
    world: World, tmp_path: Path, servers: list[Server]
) -> None:
    """While the trigger still holds, a series whose goal just completed gets no new goal until the cooldown ends."""
    strategies = {"noop": {"type": "exec", "command": ["true"]}}
    template = {
        "type": "performance",
        "trigger": 'fault_active{fault="cool"}',
        "target": {"query": "vector(0)", "below": 1},
        "plan": ["noop"],
    }
    templates = [{**template, "name": "patient", "cooldown": "1m"}, {**template, "name": "eager", "cooldown": "0s"}]
    (world.files / "cool").write_text("x")
    try:
        healer = start_planner(world, tmp_path, strategies, templates, servers)
        wait_for(lambda: sum(g["name"] == "eager" for g in goals(healer)) >= 3, 20, what="eager goals to reopen")
    finally:
        (world.files / "cool").unlink()
    patient = [g for g in goals(healer) if g["name"] == "patient"]
    assert [g["state"] for g in patient] == ["completed"], patient


async def test_a_step_ending_during_the_trigger_queries_is_not_closed_twice(
    world: World, tmp_path: Path, aiohttp_client: Any
) -> None:
    """A step that ends while a cycle waits on slow trigger queries keeps its result, and the next step runs."""
    from healer.config import parse_config
    from healer.planner.routes import PLANNER
    from healer.server import create_app

    slow = [PY, "-c", "import time; time.sleep(0.5)"]
    config = parse_config(
        {
            "prometheus": {"url": world.prometheus.url},
            "store": {"path": str(tmp_path / "healer.db")},
            "exporter": {"host": False},
            "planner": {
                "interval": "100ms",
                "goals": [
                    {
                        "name": "race",
                        "type": "performance",
                        "trigger": "vector(1)",
                        "target": {"query": "vector(1)", "below": 0},
                        "plan": ["a", "b"],
                        "settle": "200ms",
                    }
                ],
            },
            "strategies": {"a": {"type": "exec", "command": slow}, "b": {"type": "exec", "command": ["true"]}},
        }
    )
    app = create_app(config)
    promql = app[PLANNER].promql
    query = promql.query

    async def slow_trigger(expr: str) -> Any:
        # A slow Prometheus: the trigger answers after the step has had time to end.
        if expr == "vector(1)":
            await asyncio.sleep(0.8)
        return await query(expr)

    promql.query = slow_trigger  # type: ignore[method-assign]
    client = await aiohttp_client(app)
    goal: dict[str, Any] = {}
    for _ in range(150):
        listed = (await (await client.get("/api/v1/goals")).json())["goals"]
        if listed and listed[-1]["state"] == "failed":
            goal = listed[-1]
            break
        await asyncio.sleep(0.1)
    assert goal, "the goal did not end"
    assert [(s["strategy"], s["result"]) for s in goal["steps"]] == [("a", "ok"), ("b", "ok")], goal
    assert "plan ran out" in goal["detail"]
