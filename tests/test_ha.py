"""High availability with real parts: three healer replicas sharing one real PostgreSQL database.

Each test starts its replicas (`healer serve` processes with the same config and `store.url`) on a
fresh database of the session's PostgreSQL cluster and counts real strategy runs in a file that every
replica's exec steps append to, so "exactly once" is counted on what ran, not only on what was recorded.
"""

from __future__ import annotations

import concurrent.futures
import copy
import itertools
import signal
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PostgresDatabase
from tests.servers import (
    Server,
    free_port,
    healing_status,
    http_get,
    http_json,
    process_alive,
    start_alertmanager,
    start_healer,
    wait_for,
)
from tests.test_engine_safety import AUTH, actions, alert, config, events, metric, payload
from tests.test_receiver import post

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

REPLICAS = 3
# `start ID PID TIME`, a sleep, `end ID TIME`: the step's real run, timed by the process itself.
STAMPED = (
    "import os, sys, time; log = open(sys.argv[1], 'a');"
    " log.write(f'start {sys.argv[2]} {os.getpid()} {time.time()}\\n'); log.flush();"
    " time.sleep(float(sys.argv[3])); log.write(f'end {sys.argv[2]} {os.getpid()} {time.time()}\\n'); log.flush();"
    " sys.exit(int(sys.argv[4]))"
)


def ha_config(
    workdir: Path,
    db: PostgresDatabase,
    *,
    seconds: float | None = None,
    exit_code: int = 0,
    lease: str | None = None,
    **overrides: Any,
) -> dict[str, Any]:
    """test_engine_safety's config on the shared PostgreSQL store; its step appends `start ID` to steps.log.

    With `seconds` the step is STAMPED (pid and times, a sleep, an exit code); without, a shell echo.
    """
    settings = config(workdir, **overrides)
    settings["store"] = {**db.store(), **({"lease": lease} if lease else {})}
    log = str(workdir / "steps.log")
    if seconds is None:
        command = ["sh", "-c", 'echo "start $1" >> "$0"', log, "{labels.id}"]
    else:
        command = [sys.executable, "-c", STAMPED, log, "{labels.id}", str(seconds), str(exit_code)]
    settings["strategies"]["record"]["command"] = command
    return settings


def start_replicas(
    workdir: Path, settings: dict[str, Any], servers: list[Server], count: int = REPLICAS
) -> list[Server]:
    """Start `count` replicas r0, r1, ... of one config at once, each logging to its own directory."""

    def start(index: int) -> Server:
        own = copy.deepcopy(settings)
        own["server"]["replica"] = f"r{index}"
        return start_healer(workdir / f"r{index}", own)

    with concurrent.futures.ThreadPoolExecutor(count) as pool:
        futures = [pool.submit(start, index) for index in range(count)]
        started = []
        for future in futures:
            try:
                started.append(future.result())
            except Exception:
                servers.extend(f.result() for f in futures if f.done() and f.exception() is None)
                raise
    servers.extend(started)
    return started


def name_of(replica: Server) -> str:
    """The replica's name: start_replicas names it after its directory (r0, r1, ...)."""
    return replica.log_path.parent.name


def leaders(replicas: list[Server]) -> list[Server]:
    """The live replicas whose /metrics show healer_replica_leader 1."""
    return [r for r in replicas if r.process.poll() is None and metric(r, "healer_replica_leader") == 1]


def one_leader(replicas: list[Server]) -> Server | None:
    found = leaders(replicas)
    return found[0] if len(found) == 1 else None


def episode_count(replica: Server) -> int:
    return sum(healing_status(replica)["episodes"].values())


def all_done(replica: Server, count: int) -> bool:
    """Whether `count` episodes exist, none open and nothing in progress, in one status snapshot."""
    status = healing_status(replica)
    by_state = status["episodes"]
    return sum(by_state.values()) == count and by_state.get("open", 0) == 0 and status["in_progress"] == 0


def starts(workdir: Path) -> Counter[str]:
    """How often each alert's strategy really started, from steps.log."""
    path = workdir / "steps.log"
    lines = path.read_text().splitlines() if path.exists() else []
    return Counter(line.split()[1] for line in lines if line.startswith("start "))


def runs(workdir: Path) -> list[tuple[str, int, float, float | None]]:
    """The STAMPED runs in steps.log: (id, pid, start time, end time or None), in start order."""
    starts: list[tuple[str, int, float]] = []
    ends: dict[int, float] = {}
    for line in (workdir / "steps.log").read_text().splitlines():
        words = line.split()
        if words[0] == "start":
            starts.append((words[1], int(words[2]), float(words[3])))
        elif words[0] == "end":
            ends[int(words[2])] = float(words[3])
    # Each run is one process: its end is the one its pid wrote (a killed run writes none).
    return [(identifier, pid, start, ends.get(pid)) for identifier, pid, start in starts]


def post_patiently(url: str, body: bytes, timeout: float = 30.0) -> int:
    """POST a webhook delivery and return the status, waiting up to `timeout` for the answer."""
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": "application/json", **AUTH}
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def replica_logs(replicas: list[Server]) -> str:
    """The tail of every replica's log, for assertion messages."""
    return "\n".join(f"--- {r.log_path.parent.name}\n{r.log()[-3000:]}" for r in replicas)


# -- exactly once across replicas ---------------------------------------------------------------


def test_same_payload_to_every_replica_runs_once(
    tmp_path: Path, postgres_db: PostgresDatabase, servers: list[Server]
) -> None:
    """The same payload posted 20 times to each of three replicas at once gives one action per episode."""
    replicas = start_replicas(tmp_path, ha_config(tmp_path, postgres_db), servers)
    body = payload(alert("a"), alert("b"))
    targets = [r.url + "/api/v1/alertmanager" for r in replicas for _ in range(20)]
    with concurrent.futures.ThreadPoolExecutor(len(targets)) as pool:
        answers = list(pool.map(lambda url: post(url, body, AUTH), targets))
    assert [code for code, _ in answers] == [200] * 60
    wait_for(lambda: all_done(replicas[0], 2), 30, what="both episodes ended")
    assert starts(tmp_path) == {"a": 1, "b": 1}
    for replica in replicas:  # every replica answers the same
        assert len(actions(replica)) == 2
        assert healing_status(replica)["alerts_received"] == 120


def test_500_alerts_spread_over_replicas_open_500_episodes(
    tmp_path: Path, postgres_db: PostgresDatabase, servers: list[Server]
) -> None:
    """500 distinct alerts posted in payloads of 5 spread over three replicas give 500 episodes and one run each."""
    settings = ha_config(tmp_path, postgres_db, healing={"max_concurrent": 16}, strategy={"max_concurrent": 16})
    replicas = start_replicas(tmp_path, settings, servers)
    ids = [f"n{index}" for index in range(500)]
    batches = [ids[i : i + 5] for i in range(0, len(ids), 5)]

    def send(index: int) -> int:
        url = replicas[index % REPLICAS].url + "/api/v1/alertmanager"
        return post(url, payload(*(alert(i) for i in batches[index])), AUTH)[0]

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        assert list(pool.map(send, range(len(batches)))) == [200] * len(batches)
    wait_for(lambda: all_done(replicas[1], 500), 150, interval=0.5, what="500 episodes ended")
    assert starts(tmp_path) == dict.fromkeys(ids, 1)
    steps = actions(replicas[2])
    assert len(steps) == 500 and {s["attempt"] for s in steps} == {1}
    assert sorted(s["episode"]["labels"]["id"] for s in steps) == sorted(ids)
    by_replica = Counter(s["replica"] for s in steps)
    print(f"500 steps taken by replica: {dict(sorted(by_replica.items()))}")
    assert set(by_replica) <= {"r0", "r1", "r2"}


# -- failover -----------------------------------------------------------------------------------


def test_sigkilled_replicas_step_is_interrupted_and_retried_elsewhere(
    tmp_path: Path, postgres_db: PostgresDatabase, servers: list[Server]
) -> None:
    """A step whose replica is SIGKILLed is recorded interrupted elsewhere and retried once its claim lapsed."""
    lease = 4.0
    settings = ha_config(tmp_path, postgres_db, seconds=2.5, lease="4s", rule={"max_attempts": 2})
    replicas = start_replicas(tmp_path, settings, servers)
    assert post(replicas[0].url + "/api/v1/alertmanager", payload(alert("slow")), AUTH)[0] == 200

    def running() -> dict[str, Any] | None:
        found = [a for a in actions(replicas[0]) if a["state"] == "running"]
        return found[0] if found and (tmp_path / "steps.log").exists() else None

    step = wait_for(running, 20, interval=0.05, what="the step running")
    taker = next(r for r in replicas if name_of(r) == step["replica"])
    taker.stop(signal.SIGKILL)
    killed_at = time.time()
    [(_, child, first_start, _)] = runs(tmp_path)
    others = [r for r in replicas if r is not taker]

    def retried() -> list[dict[str, Any]] | None:
        found = actions(others[0])
        return found if len(found) == 2 and found[0]["state"] != "pending" else None

    wait_for(retried, 20, interval=0.05, what="the step retried")
    wait_for(lambda: all_done(others[1], 1), 20, what="the episode ended")
    first_run, second_run = runs(tmp_path)
    took = second_run[2] - killed_at
    print(f"SIGKILL -> retry started elsewhere: {took:.2f}s (lease {lease}s)")
    first, retry = actions(others[1])[::-1]
    assert first["outcome"] == "interrupted" and first["replica"] == name_of(taker)
    assert retry["attempt"] == 2 and retry["replica"] in {name_of(r) for r in others}
    assert retry["outcome"] == "unverified"
    # The claim was renewed at most lease/4 before the kill; it lapses no sooner than 3/4 lease after it.
    assert lease * 3 / 4 - 0.1 <= took < lease + 3.0, took
    assert first_start < killed_at < second_run[2]
    # The strategy's program died with its replica (parent-death signal): it never ran on beside the retry.
    assert first_run[3] is None and not process_alive(child)


def test_leader_failover_moves_escalation_and_approval_expiry(
    tmp_path: Path, postgres_db: PostgresDatabase, servers: list[Server]
) -> None:
    """After SIGKILL of the leader another replica leads within a few leases, expires approvals, posts HealingFailed."""
    am_port = free_port()  # nothing listens here until the new leader has to post
    settings = ha_config(
        tmp_path, postgres_db, lease="2s", strategy={"approval": "required"}, healing={"approval_timeout": "300ms"}
    )
    settings["alertmanager"] = {"url": f"http://127.0.0.1:{am_port}", "timeout": "300ms", "resend_interval": "1s"}
    replicas = start_replicas(tmp_path, settings, servers)
    leader = wait_for(lambda: one_leader(replicas), 10, what="one leader")
    # The approval expires on the leader, which escalates and fails to post HealingFailed.
    assert post(replicas[0].url + "/api/v1/alertmanager", payload(alert("before")), AUTH)[0] == 200
    wait_for(lambda: (metric(leader, "healer_escalation_delivery_failures_total") or 0) >= 1, 20, what="posts failing")
    for replica in replicas:
        if replica is not leader:
            assert metric(replica, "healer_escalation_delivery_failures_total") == 0
    leader.stop(signal.SIGKILL)
    killed_at = time.monotonic()
    others = [r for r in replicas if r is not leader]
    successor = wait_for(lambda: one_leader(others), 12, interval=0.05, what="a new leader")
    took = time.monotonic() - killed_at
    print(f"SIGKILL of the leader -> new leader: {took:.2f}s (lease 2s)")
    assert took < 3 * 2.0
    status = http_json(successor.url + "/api/v1/status", headers=successor.headers)["healing"]
    assert status["leader"] is True and status["replica"] != name_of(leader)

    # An approval that expires now is expired by the new leader.
    assert post(others[0].url + "/api/v1/alertmanager", payload(alert("after")), AUTH)[0] == 200
    wait_for(lambda: all_done(successor, 2), 20, what="both episodes escalated")
    alertmanager = start_alertmanager(
        tmp_path / "alertmanager", {"route": {"receiver": "null"}, "receivers": [{"name": "null"}]}, port=am_port
    )
    servers.append(alertmanager)
    url = f"{alertmanager.url}/api/v2/alerts?filter=" + urllib.parse.quote('alertname="HealingFailed"')
    posted = wait_for(lambda: len(http_json(url)) == 2 and http_json(url), 20, what="both HealingFailed posted")
    assert sorted(a["labels"]["id"] for a in posted) == ["after", "before"]
    for step in actions(successor):
        assert step["skip_reason"] == "approval_expired"
        kinds = wait_for(
            lambda s=step: "escalation_delivered" in events(successor, s["id"]) and events(successor, s["id"]), 10
        )
        assert kinds.count("escalation_delivered") == 1
    for replica in others:
        if replica is not successor:
            assert metric(replica, "healer_replica_leader") == 0


# -- shared rails --------------------------------------------------------------------------------


def test_budget_and_circuit_are_shared(tmp_path: Path, postgres_db: PostgresDatabase, servers: list[Server]) -> None:
    """Three replicas with a budget of 5 actions run 5 strategies for 20 failing episodes; the circuit opens on all,
    and the 15 episodes it held back end suspended (one HealingSuspended for them), not escalated one by one."""
    settings = ha_config(
        tmp_path,
        postgres_db,
        seconds=0,
        exit_code=1,
        rule={"max_attempts": 1},
        healing={"budget": {"actions": 5, "window": "10m"}},
    )
    replicas = start_replicas(tmp_path, settings, servers)
    ids = [f"f{index}" for index in range(20)]

    def send(index: int) -> int:
        return post(replicas[index % REPLICAS].url + "/api/v1/alertmanager", payload(alert(ids[index])), AUTH)[0]

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        assert list(pool.map(send, range(20))) == [200] * 20
    wait_for(lambda: all_done(replicas[0], 20), 30, what="20 episodes ended")
    ran = starts(tmp_path)
    assert sum(ran.values()) == 5 and set(ran.values()) == {1}
    steps = actions(replicas[1])
    assert Counter((s["outcome"], s["skip_reason"]) for s in steps) == {
        ("failed", None): 5,
        ("cancelled", "circuit_open"): 15,
    }
    for replica in replicas:
        healing_status(replica)  # the status refreshes the gauge from the store
        assert metric(replica, "healer_circuit_open") == 1
        assert http_json(replica.url + "/api/v1/status", headers=replica.headers)["healing"]["episodes"] == {
            "escalated": 5,
            "suspended": 15,
        }


def test_global_concurrency_limit_holds_across_replicas(
    tmp_path: Path, postgres_db: PostgresDatabase, servers: list[Server]
) -> None:
    """With healing.max_concurrent 1, slow steps taken by three replicas never overlap in time."""
    settings = ha_config(tmp_path, postgres_db, seconds=0.4, healing={"max_concurrent": 1})
    replicas = start_replicas(tmp_path, settings, servers)
    ids = [f"c{index}" for index in range(6)]
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        codes = pool.map(
            lambda i: post(replicas[i % REPLICAS].url + "/api/v1/alertmanager", payload(alert(ids[i])), AUTH)[0],
            range(6),
        )
        assert list(codes) == [200] * 6
    wait_for(lambda: all_done(replicas[0], 6), 40, what="6 episodes ended")
    timeline = sorted((start, end) for _, _, start, end in runs(tmp_path))
    assert len(timeline) == 6 and all(end is not None for _, end in timeline)
    for (_, end), (start, _) in itertools.pairwise(timeline):
        assert end is not None and end <= start, timeline
    takers = Counter(s["replica"] for s in actions(replicas[1]))
    print(f"6 serialized steps taken by replica: {dict(sorted(takers.items()))}")


# -- database outage -----------------------------------------------------------------------------


def test_database_outage_answers_503_and_loses_nothing(
    tmp_path: Path, postgres_db: PostgresDatabase, servers: list[Server]
) -> None:
    """With PostgreSQL stopped 10 s under deliveries, replicas answer 503, stay up, resume, and lose no 2xx alert."""
    replicas = start_replicas(tmp_path, ha_config(tmp_path, postgres_db), servers)
    answered: dict[str, list[int]] = {}
    slowest: dict[int, float] = {}
    lock = threading.Lock()
    stop = threading.Event()

    def stream(worker: int) -> None:
        index = 0
        while not stop.is_set():
            identifier = f"w{worker}-{index}"
            url = replicas[(worker + index) % REPLICAS].url + "/api/v1/alertmanager"
            sent = time.monotonic()
            try:
                code = post_patiently(url, payload(alert(identifier)))
            except (urllib.error.URLError, ConnectionError, OSError) as exc:
                code = -1
                print(f"{identifier}: {exc!r}")
            with lock:
                answered.setdefault(identifier, []).append(code)
                slowest[code] = max(slowest.get(code, 0.0), time.monotonic() - sent)
            index += 1
            time.sleep(0.1)

    def codes() -> Counter[int]:
        with lock:
            return Counter(code for found in answered.values() for code in found)

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        workers = [pool.submit(stream, worker) for worker in range(6)]
        try:
            wait_for(lambda: codes()[200] >= 30, 20, what="deliveries accepted")
            postgres_db.server.stop("fast")
            down_at = time.monotonic()
            wait_for(lambda: codes()[503] >= 1, 10, what="503 during the outage")
            # The audit trail too says 503 with when to retry, never 500.
            with pytest.raises(urllib.error.HTTPError) as refused:
                urllib.request.urlopen(
                    urllib.request.Request(replicas[0].url + "/api/v1/actions", headers=AUTH), timeout=10
                )
            assert refused.value.code == 503 and refused.value.headers.get("Retry-After") == "5"
            while time.monotonic() - down_at < 10:
                for replica in replicas:
                    assert http_get(replica.url + "/-/healthy", timeout=3)[0] == 200
                time.sleep(0.5)
            before_return = codes()[200]
            postgres_db.server.start()
            wait_for(lambda: codes()[200] >= before_return + 60, 30, what="deliveries accepted again")
        finally:
            stop.set()
            for worker in workers:
                worker.result()
    seen = codes()
    print(f"answers over the outage: {dict(seen)}; slowest by code: { {c: round(t, 2) for c, t in slowest.items()} }")
    assert set(seen) <= {200, 503}, seen
    assert seen[503] >= 1 and max(slowest.values()) < 20, slowest
    accepted = {identifier for identifier, found in answered.items() if 200 in found}
    for replica in replicas:
        assert replica.process.poll() is None
    wait_for(
        lambda: healing_status(replicas[0])["in_progress"] == 0 and episode_count(replicas[0]) >= len(accepted),
        60,
        interval=0.5,
        what="every accepted alert processed",
    )
    wait_for(lambda: all_done(replicas[0], episode_count(replicas[0])), 30, what="every episode ended")
    steps = actions(replicas[1])
    opened = Counter(s["episode"]["labels"]["id"] for s in steps if s["attempt"] == 1)
    refused_only = set(answered) - accepted
    assert accepted <= set(opened), sorted(accepted - set(opened))[:10]
    # An alert answered 503 may have been committed all the same (the answer, not the commit, failed).
    assert set(opened) - accepted <= refused_only
    assert set(opened.values()) == {1}
    ran = starts(tmp_path)
    twice = {identifier: count for identifier, count in ran.items() if count != 1}
    assert not twice, (twice, [s for s in steps if s["episode"]["labels"]["id"] in twice], replica_logs(replicas))
    assert set(ran) == set(opened)
    print(f"{len(accepted)} alerts accepted, {len(set(opened) - accepted)} answered 503 yet kept; {len(steps)} steps")
