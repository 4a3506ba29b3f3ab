"""Optimisation against real servers: changes to real files are measured by PromQL, kept or rolled back."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from healer.config import ConfigError, parse_config
from healer.healing.learning import learned_confidence
from healer.optimizer.model import improvement, score
from healer.optimizer.optimizer import window_average
from tests.conftest import World
from tests.servers import Server, http_get, http_json, http_post, process_alive, prom_query, start_healer, wait_for

pytestmark = pytest.mark.slow

PY = sys.executable
# Writes N bytes to a file: the knob the candidates turn.
WRITE = "import sys; open(sys.argv[1], 'w').write('x' * int(sys.argv[2]))"
# Writes N bytes, then sleeps after writing its pid: an apply that is cut off half way.
WRITE_THEN_SLEEP = (
    "import os, sys, time; open(sys.argv[1], 'w').write('x' * int(sys.argv[2]));"
    " open(sys.argv[3], 'w').write(str(os.getpid())); time.sleep(10)"
)


def write(path: Path, size: int) -> dict[str, Any]:
    return {"type": "exec", "command": [PY, "-c", WRITE, str(path), str(size)]}


def candidate(name: str, fault: str, apply: str, rollback: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "component": "files",
        "metric": f'fault_file_bytes{{fault="{fault}"}}',
        "direction": "decrease",
        "apply": apply,
        "rollback": rollback,
        "expected_improvement": 0.5,
        "cost": 1,
        "confidence": 0.8,
        "window": "2s",
        "cooldown": "1s",
        **extra,
    }


def start_optimizer(
    world: World, workdir: Path, strategies: dict[str, Any], candidates: list[dict[str, Any]]
) -> Server:
    config = {
        "prometheus": {"url": world.prometheus.url, "timeout": "2s"},
        "store": {"path": str(workdir / "healer.db")},
        "exporter": {"host": False},
        "server": {"shutdown_timeout": "2s"},
        "optimizer": {"interval": "300ms", "candidates": candidates},
        "strategies": strategies,
    }
    return start_healer(workdir / "healer", config)


def optimizations(healer: Server) -> dict[str, Any]:
    return dict(http_json(f"{healer.url}/api/v1/optimizations"))


@pytest.fixture
def files(world: World) -> Iterator[dict[str, Path]]:
    """Three files of 1000 bytes that Prometheus has seen for a few seconds; removed afterwards."""
    paths = {name: world.files / f"opt-{name}" for name in ("a", "b", "c")}
    for path in paths.values():
        path.write_text("x" * 1000)
    # The whole "before" window must show 1000, not what an earlier test left behind.
    steady = 'max_over_time(fault_file_bytes{fault=~"opt-.*"}[3s]) == 1000'
    wait_for(lambda: len(prom_query(world.prometheus, steady)) == 3, 15)
    yield paths
    for path in paths.values():
        path.unlink(missing_ok=True)


def test_changes_that_help_are_kept_and_others_rolled_back(
    world: World, files: dict[str, Path], tmp_path: Path, servers: list[Server]
) -> None:
    """The best-scoring candidate goes first and is kept; a harmful one is rolled back; a doubtful one never runs."""
    strategies = {
        "shrink-a": write(files["a"], 500),
        "restore-a": write(files["a"], 1000),
        "grow-b": write(files["b"], 2000),
        "restore-b": write(files["b"], 1000),
        "shrink-c": write(files["c"], 10),
        "restore-c": write(files["c"], 1000),
    }
    candidates = [
        candidate("harmful", "opt-b", "grow-b", "restore-b", confidence=0.75, expected_improvement=0.3),
        candidate("helpful", "opt-a", "shrink-a", "restore-a"),
        candidate("doubtful", "opt-c", "shrink-c", "restore-c", confidence=0.5, expected_improvement=5),
    ]
    healer = start_optimizer(world, tmp_path, strategies, candidates)
    servers.append(healer)

    def two_ended() -> list[dict[str, Any]] | None:
        trials = optimizations(healer)["trials"]
        return trials if len(trials) == 2 and all(t["ended_at"] for t in trials) else None

    helpful, harmful = reversed(wait_for(two_ended, 30, interval=0.2, what="two trials to end"))
    assert helpful["candidate"] == "helpful" and helpful["outcome"] == "kept", helpful
    assert helpful["before"] == 1000 and 500 <= helpful["after"] < 1000 and helpful["improvement"] > 0
    assert helpful["confidence"] == 0.8 and helpful["score"] == pytest.approx(0.4)
    assert helpful["ended_at"] - helpful["applied_at"] >= 2.0  # measured over the whole window after the change
    assert files["a"].stat().st_size == 500  # kept
    assert harmful["candidate"] == "harmful" and harmful["outcome"] == "rolled_back", harmful
    assert harmful["after"] > 1000 and harmful["improvement"] < 0 and "rolled back with restore-b" in harmful["detail"]
    assert files["b"].stat().st_size == 1000  # the rollback restored the real file
    assert files["c"].stat().st_size == 1000  # never applied
    # What was learned: the kept change gained confidence, the harmful one fell below 0.7 and stays out.
    wait_for(lambda: optimizations(healer)["candidates"][-1]["state"] != "cooldown", 5, what="the cooldown to end")
    state = {c["name"]: c for c in optimizations(healer)["candidates"]}
    assert state["helpful"]["state"] == "kept" and state["helpful"]["confidence"] == pytest.approx(0.84)
    assert state["harmful"]["state"] == "below_confidence" and state["harmful"]["confidence"] == pytest.approx(0.6)
    assert state["doubtful"]["state"] == "below_confidence" and state["doubtful"]["trials"] == 0
    assert len(optimizations(healer)["trials"]) == 2
    report = http_json(f"{healer.url}/api/v1/status")["optimization"]
    assert report["candidates"] == 3 and report["kept"] == 1 and report["in_flight"] is None
    text = subprocess.run(
        [PY, "-m", "healer", "status", "--url", healer.url], capture_output=True, text=True, timeout=30
    ).stdout
    assert "Optimizing 1 kept, 0 ready, 0 cooling down of 3 candidates" in text, text
    body = http_get(f"{healer.url}/metrics")[1].decode()
    assert 'healer_optimizations_total{outcome="kept"} 1.0' in body
    assert 'healer_optimizations_total{outcome="rolled_back"} 1.0' in body
    assert 'healer_optimization_confidence{candidate="harmful"} 0.6' in body


def test_an_interrupted_apply_is_rolled_back_after_restart(
    world: World, files: dict[str, Path], tmp_path: Path, servers: list[Server]
) -> None:
    """healer killed while applying a change: the next start rolls it back rather than leave it unmeasured."""
    pidfile = tmp_path / "apply.pid"
    strategies = {
        "slow-shrink": {"type": "exec", "command": [PY, "-c", WRITE_THEN_SLEEP, str(files["a"]), "300", str(pidfile)]},
        "restore-a": write(files["a"], 1000),
    }
    candidates = [candidate("slow", "opt-a", "slow-shrink", "restore-a")]
    healer = start_optimizer(world, tmp_path, strategies, candidates)
    apply_pid = None
    try:
        apply_pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text(), 20, what="the apply to start"))
        assert files["a"].stat().st_size == 300
        healer.stop(signal.SIGKILL)
        healer = start_optimizer(world, tmp_path, strategies, candidates)
        servers.append(healer)
        trials = optimizations(healer)["trials"]
    finally:
        if apply_pid is not None and process_alive(apply_pid):
            os.kill(apply_pid, signal.SIGKILL)
    assert trials[-1]["outcome"] == "unmeasured" and "stopped while applying" in trials[-1]["detail"], trials
    assert files["a"].stat().st_size == 1000


def test_a_failed_rollback_holds_the_candidate_until_acknowledged(
    world: World, files: dict[str, Path], tmp_path: Path, servers: list[Server]
) -> None:
    """A harmful change whose rollback fails stays out of the running until a person acknowledges it."""
    strategies = {"grow-b": write(files["b"], 2000), "broken-restore": {"type": "exec", "command": ["false"]}}
    candidates = [candidate("stuck", "opt-b", "grow-b", "broken-restore", confidence=0.9)]
    healer = start_optimizer(world, tmp_path, strategies, candidates)
    servers.append(healer)

    def ended() -> list[dict[str, Any]] | None:
        trials = optimizations(healer)["trials"]
        return trials if trials and trials[0]["ended_at"] else None

    (trial,) = wait_for(ended, 30, interval=0.2, what="the trial to end")
    assert trial["outcome"] == "rollback_failed" and trial["improvement"] < 0, trial
    assert "rollback broken-restore failed: exit 1" in trial["detail"]
    assert files["b"].stat().st_size == 2000  # the change is still in place
    time.sleep(2.0)  # past the cooldown: the candidate is still held
    (state,) = optimizations(healer)["candidates"]
    assert state["state"] == "rollback_failed" and state["confidence"] == pytest.approx(0.72)
    assert len(optimizations(healer)["trials"]) == 1
    acknowledge = f"{healer.url}/api/v1/optimizations/stuck/acknowledge"
    assert http_json(acknowledge, "POST", {}) == {"acknowledged": "stuck", "by": "anonymous"}
    assert http_post(acknowledge)[0] == 409  # nothing left to acknowledge
    assert http_post(f"{healer.url}/api/v1/optimizations/nobody/acknowledge") == (
        404,
        {"error": "no candidate 'nobody'"},
    )
    files["b"].write_text("x" * 1000)  # what the person did by hand
    wait_for(lambda: len(optimizations(healer)["trials"]) == 2, 20, what="the candidate to be tried again")


def test_window_average_is_a_subquery() -> None:
    """The metric is averaged over the window as a PromQL subquery, whatever the expression."""
    assert window_average("sum(rate(x[1m]))", 300) == "avg_over_time((sum(rate(x[1m])))[300000ms:])"


def test_improvement_is_relative_and_signed() -> None:
    """20 % lower is +0.2 when lower is better and -0.2 when higher is; from 0, any change is infinitely large."""
    assert improvement(100, 80, "decrease") == pytest.approx(0.2)
    assert improvement(100, 80, "increase") == pytest.approx(-0.2)
    assert improvement(-10, -5, "increase") == pytest.approx(0.5)
    assert improvement(0, 1, "increase") == float("inf") and improvement(0, 0, "decrease") == 0


def test_confidence_moves_from_the_prior_with_outcomes() -> None:
    """The prior counts as prior_weight trials; each kept trial counts as a success."""
    assert learned_confidence(0.8, 4, helped=0, trials=0) == 0.8
    assert learned_confidence(0.8, 4, helped=1, trials=1) == pytest.approx(0.84)
    assert learned_confidence(0.75, 4, helped=0, trials=1) == pytest.approx(0.6)
    assert learned_confidence(0.5, 4, helped=96, trials=96) == pytest.approx(0.98)
    assert score(0.5, 2, 0.8) == pytest.approx(0.2)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"apply": "missing"}, r"optimizer\.candidates\[0\]\.apply: strategy 'missing' is not defined"),
        ({"rollback": "gated"}, r"optimizer\.candidates\[0\]\.rollback: strategy 'gated' requires approval"),
        ({"metric": "x{a={labels.a}}"}, r"optimizer\.candidates\[0\]\.metric: .*belong in a goal's target query"),
        ({"confidence": 1.5}, r"optimizer\.candidates\[0\]\.confidence: Input should be less than or equal to 1"),
        ({"cost": 0}, r"optimizer\.candidates\[0\]\.cost: Input should be greater than or equal to 0.000001"),
        ({"direction": "up"}, r"optimizer\.candidates\[0\]\.direction: Input should be 'decrease' or 'increase'"),
    ],
)
def test_candidate_errors_name_the_key(change: dict[str, Any], message: str) -> None:
    """Each mistake in a candidate is reported at its key path."""
    strategies = {
        "fix": {"type": "exec", "command": ["true"]},
        "gated": {**write(Path("/x"), 1), "approval": "required"},
    }
    raw = {
        "strategies": strategies,
        "optimizer": {"candidates": [{**candidate("c", "f", "fix", "fix"), **change}]},
    }
    with pytest.raises(ConfigError, match=message):
        parse_config(raw, "healer.yml")


async def test_a_rollback_whose_end_was_lost_is_run_again_not_judged_again(
    world: World, files: dict[str, Path], tmp_path: Path, aiohttp_client: Any
) -> None:
    """The store refuses to record a rollback's end once: the next cycle rolls back again; it never counts as kept."""
    from healer.config import parse_config
    from healer.optimizer.model import Outcome
    from healer.optimizer.routes import OPTIMIZER
    from healer.server import create_app
    from healer.storage import StoreUnavailableError

    runs = tmp_path / "rollbacks"
    restore = f"import sys; open(sys.argv[1], 'w').write('x' * 1000); open('{runs}', 'a').write('ran\\n')"
    config = parse_config(
        {
            "prometheus": {"url": world.prometheus.url},
            "store": {"path": str(tmp_path / "healer.db")},
            "exporter": {"host": False},
            "optimizer": {"interval": "200ms", "candidates": [candidate("harmful", "opt-b", "grow", "restore")]},
            "strategies": {
                "grow": write(files["b"], 2000),
                "restore": {"type": "exec", "command": [PY, "-c", restore, str(files["b"])]},
            },
        }
    )
    app = create_app(config)
    records = app[OPTIMIZER].records
    end, refused = records.end, []

    def flaky_end(trial_id: int, outcome: Outcome, *args: Any) -> Any:
        if outcome is Outcome.ROLLED_BACK and not refused:
            refused.append(trial_id)
            raise StoreUnavailableError("database is locked")
        return end(trial_id, outcome, *args)

    records.end = flaky_end  # type: ignore[method-assign]
    client = await aiohttp_client(app)
    trials: list[dict[str, Any]] = []
    for _ in range(150):
        trials = (await (await client.get("/api/v1/optimizations")).json())["trials"]
        if trials and trials[0]["ended_at"]:
            break
        await asyncio.sleep(0.1)
    assert refused and len(trials) == 1, trials
    assert trials[0]["outcome"] == "rolled_back" and trials[0]["improvement"] < 0, trials[0]
    assert runs.read_text() == "ran\nran\n" and files["b"].stat().st_size == 1000
