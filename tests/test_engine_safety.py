"""Safety of the engine in a real healer process: exactly once, crash durability, hostile labels, rails.

Prometheus is deliberately unreachable here, so verification ends `unverified` at once (no wait for
Prometheus to return) and the episode escalates: these tests are about what runs and how often, not
about whether it healed (tests/test_healing_e2e.py does that).
"""

from __future__ import annotations

import concurrent.futures
import copy
import hashlib
import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
from collections import Counter
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from healer.healing.model import ActionFilter
from healer.storage import Storage
from tests.servers import (
    Server,
    free_port,
    healing_status,
    http_get,
    http_json,
    processes_mentioning,
    read_stopped_store,
    start_alertmanager,
    start_healer,
    wait_for,
)
from tests.test_receiver import post

TOKEN = "engine-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
RECORD = (
    "import sys, time; log = open(sys.argv[1], 'a'); log.write('start ' + sys.argv[2] + '\\n'); log.flush();"
    " time.sleep(float(sys.argv[3])); log.write('end ' + sys.argv[2] + '\\n')"
)


def config(
    workdir: Path,
    *,
    step_seconds: float = 0.0,
    rule: dict[str, Any] | None = None,
    strategy: dict[str, Any] | None = None,
    healing: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A healer whose one rule runs an exec step that logs `start ID` and `end ID` around a sleep."""
    (workdir / "token").write_text(TOKEN)
    return {
        "server": {"auth": {"bearer_token_file": str(workdir / "token")}, "shutdown_timeout": "1s"},
        "prometheus": {"url": "http://127.0.0.1:1", "timeout": "200ms"},
        "alertmanager": {"url": "http://127.0.0.1:1", "timeout": "200ms"},
        "store": {"path": str(workdir / "healer.db")},
        "exporter": {"host": False},
        "healing": {
            "budget": {"actions": 100000, "window": "1m"},
            "max_concurrent": 8,
            **(healing or {}),
            "rules": [
                {
                    "name": "record",
                    "match": ['alertname="Broken"'],
                    "strategies": ["record"],
                    "max_attempts": 2,
                    "cooldown": "100ms",
                    "verify": {"within": "300ms", "interval": "100ms", "wait_for_prometheus": "0s"},
                    **(rule or {}),
                }
            ],
        },
        "strategies": {
            "record": {
                "type": "exec",
                "max_concurrent": 8,
                "timeout": "10s",
                "command": [sys.executable, "-c", RECORD, str(workdir / "steps.log"), "{labels.id}", str(step_seconds)],
                **(strategy or {}),
            }
        },
    }


def alert(identifier: str, **labels: str) -> dict[str, Any]:
    return {
        "status": "firing",
        "labels": {"alertname": "Broken", "id": identifier, **labels},
        "annotations": {"summary": "broken"},
        "startsAt": "2026-11-23T23:14:16Z",
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://127.0.0.1:9090/graph",
        "fingerprint": hashlib.sha256(identifier.encode()).hexdigest()[:16],
    }


def payload(*alerts: dict[str, Any]) -> bytes:
    return json.dumps(
        {
            "version": "4",
            "status": "firing",
            "receiver": "healer",
            "groupKey": "{}",
            "truncatedAlerts": 0,
            "groupLabels": {},
            "commonLabels": {},
            "commonAnnotations": {},
            "externalURL": "http://127.0.0.1:9093",
            "alerts": list(alerts),
        }
    ).encode()


def steps_log(workdir: Path) -> list[str]:
    path = workdir / "steps.log"
    return path.read_text().splitlines() if path.exists() else []


def actions(healer: Server, **filters: str) -> list[dict[str, Any]]:
    """Every step healer recorded, newest first, each with its episode (GET /api/v1/actions)."""
    query = urllib.parse.urlencode({"limit": "1000", **filters})
    found: list[dict[str, Any]] = http_json(f"{healer.url}/api/v1/actions?{query}", headers=healer.headers)["actions"]
    assert len(found) < 1000, "more steps than one page of the API holds"
    return found


def events(healer: Server, action_id: int) -> list[str]:
    """The kinds of the audit events of a step's episode, in order (GET /api/v1/actions/{id})."""
    return [
        event["kind"]
        for event in http_json(f"{healer.url}/api/v1/actions/{action_id}", headers=healer.headers)["events"]
    ]


def metric(healer: Server, sample: str, **labels: str) -> float | None:
    """One sample of GET /metrics, such as healer_skipped_total with reason="duplicate"; None when absent."""
    _, body = http_get(healer.url + "/metrics", headers=healer.headers)
    for family in text_string_to_metric_families(body.decode()):
        for found in family.samples:
            if found.name == sample and found.labels == labels:
                return float(found.value)
    return None


def episodes(healer: Server) -> dict[str, int]:
    """Episodes by state, such as {"open": 1, "escalated": 2}."""
    return dict(healing_status(healer)["episodes"])


def all_ended(healer: Server, count: int) -> bool:
    """Whether exactly `count` episodes exist and none is open, read in one request (one snapshot)."""
    by_state = episodes(healer)
    return sum(by_state.values()) == count and by_state.get("open", 0) == 0


def test_same_payload_twenty_times_runs_once(tmp_path: Path, servers: list[Server]) -> None:
    """The same payload posted 20 times concurrently and 20 times in sequence gives one action per episode."""
    healer = start_healer(tmp_path, config(tmp_path))
    servers.append(healer)
    body = payload(alert("a"), alert("b"))
    url = healer.url + "/api/v1/alertmanager"
    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        answers = list(pool.map(lambda _: post(url, body, AUTH), range(20)))
    answers += [post(url, body, AUTH) for _ in range(20)]
    assert [code for code, _ in answers] == [200] * 40
    # Every post is kept as its own delivery of two alerts; only the engine folds them.
    assert len({answer["delivery"] for _, answer in answers}) == 40
    wait_for(
        lambda: all_ended(healer, 2),
        30,
        what="both episodes ended",
    )
    assert sorted(line for line in steps_log(tmp_path) if line.startswith("start")) == ["start a", "start b"]
    assert len(actions(healer)) == 2
    assert healing_status(healer)["alerts_received"] == 80
    assert metric(healer, "healer_skipped_total", reason="duplicate") == 78


def test_sigkill_mid_burst_loses_nothing_and_repeats_nothing(tmp_path: Path, servers: list[Server]) -> None:
    """After SIGKILL mid-burst, every 2xx alert is processed, completed steps never rerun, cut-off ones retry."""
    settings = config(tmp_path, step_seconds=0.3)
    healer = start_healer(tmp_path, settings)
    url = healer.url + "/api/v1/alertmanager"
    accepted: list[str] = []
    total = 400

    def send(index: int) -> str | None:
        try:
            code, _ = post(url, payload(alert(f"n{index}")), AUTH)
        except (urllib.error.URLError, ConnectionError, OSError):
            return None
        return f"n{index}" if code == 200 else None

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        futures = [pool.submit(send, i) for i in range(total)]
        # Kill once a good share is accepted and steps are running.
        wait_for(lambda: sum(1 for f in futures if f.done() and f.result()) >= 150, 60, interval=0.01)
        healer.stop(signal.SIGKILL)
        accepted = [r for f in futures if (r := f.result())]
    assert 150 <= len(accepted) < total

    async def at_kill(storage: Storage) -> tuple[set[str], set[int]]:
        # Every alert in the store: still waiting in the inbox, or already the episode of a step (each
        # of these alerts matches the rule, so each processed one has a first step).
        waiting = {item.alert.labels["id"] for item in await storage.inbox.unprocessed(limit=10**6)}
        steps = await storage.healing.list_actions(ActionFilter(limit=10**6))
        processed = {episode.labels["id"] for _, episode in steps}
        return waiting | processed, {action.id for action in await storage.healing.running_actions()}

    # What the store held when healer died, before a restart can change it.
    stored_ids, running_at_kill = read_stopped_store(settings, at_kill)
    assert set(accepted) <= stored_ids

    restarted = start_healer(tmp_path, settings)
    servers.append(restarted)
    wait_for(
        lambda: (
            # The inbox first: once it is empty no episode can appear, so "none open" read after it holds.
            metric(restarted, "healer_inbox_depth") == 0 and healing_status(restarted)["in_progress"] == 0
        ),
        120,
        interval=0.5,
        what="all work done",
    )

    steps = actions(restarted)
    episode_ids = {step["episode"]["labels"]["id"] for step in steps}
    assert set(accepted) <= episode_ids

    outcomes: dict[str, Counter[str]] = {}
    for step in steps:
        outcomes.setdefault(step["episode"]["labels"]["id"], Counter())[step["outcome"]] += 1
        assert step["attempt"] <= 2
    starts = Counter(line.split()[1] for line in steps_log(tmp_path) if line.startswith("start"))
    interrupted = {step["id"] for step in steps if step["outcome"] == "interrupted"}
    assert interrupted == running_at_kill and len(interrupted) >= 1
    for identifier, counts in outcomes.items():
        # A step recorded as finished ran once; only a step cut off by the kill ran again. A step
        # claimed just before the kill may not have reached its process's first line, hence "<=".
        assert counts["unverified"] <= starts[identifier] <= counts["unverified"] + counts["interrupted"], (
            identifier,
            counts,
            starts[identifier],
        )
        assert counts["unverified"] == 1, (identifier, counts)


HOSTILE = [
    "; touch {marker}",
    "$(touch {marker})",
    "`touch {marker}`",
    "x\ntouch {marker}",
    "../../{marker}",
    "v" * 100_000,
]


def test_hostile_labels_never_run(tmp_path: Path, servers: list[Server]) -> None:
    """Labels with shell syntax, newlines, paths or 100 kB never reach a command; the step is skipped unsafe_label."""
    marker = tmp_path / "pwned"
    settings = config(tmp_path)
    settings["server"]["max_request_bytes"] = 4 * 1024 * 1024
    healer = start_healer(tmp_path, settings)
    servers.append(healer)
    alerts = [alert(value.format(marker=marker)) for value in HOSTILE]
    assert post(healer.url + "/api/v1/alertmanager", payload(*alerts), AUTH)[0] == 200
    wait_for(
        lambda: all_ended(healer, len(HOSTILE)),
        30,
        what="episodes ended",
    )
    assert not marker.exists()
    assert steps_log(tmp_path) == []
    reasons = Counter(step["skip_reason"] for step in actions(healer))
    # Each episode tries its two attempts, and each is refused.
    assert reasons == {"unsafe_label": 2 * len(HOSTILE)}
    assert metric(healer, "healer_skipped_total", reason="unsafe_label") == 2 * len(HOSTILE)


def test_dry_run_records_without_running(tmp_path: Path, servers: list[Server]) -> None:
    """In dry-run the rendered command is recorded with outcome dry_run and nothing runs."""
    healer = start_healer(tmp_path, config(tmp_path, healing={"dry_run": True}))
    servers.append(healer)
    post(healer.url + "/api/v1/alertmanager", payload(alert("dry")), AUTH)
    action = wait_for(
        lambda: http_json(healer.url + "/api/v1/actions?outcome=dry_run", headers=healer.headers)["actions"], 20
    )[0]
    assert action["plan"]["argv"][-2] == "dry" and action["episode"]["state"] == "dry_run"
    time.sleep(0.5)
    assert steps_log(tmp_path) == []


def test_approval_required_waits_for_an_operator(tmp_path: Path, servers: list[Server]) -> None:
    """A strategy marked approval: required waits until POST /api/v1/actions/{id}/approve with the token."""
    healer = start_healer(tmp_path, config(tmp_path, strategy={"approval": "required"}))
    servers.append(healer)
    post(healer.url + "/api/v1/alertmanager", payload(alert("needs-ok")), AUTH)
    action = wait_for(
        lambda: [
            a
            for a in http_json(healer.url + "/api/v1/actions", headers=healer.headers)["actions"]
            if a["state"] == "awaiting_approval"
        ],
        20,
        what="awaiting approval",
    )[0]
    time.sleep(0.5)
    assert steps_log(tmp_path) == []
    approve = f"{healer.url}/api/v1/actions/{action['id']}/approve"
    assert post(approve, b"", {})[0] == 401
    assert post(approve, b"", AUTH)[0] == 200
    assert post(approve, b"", AUTH)[0] == 409
    wait_for(lambda: "end needs-ok" in steps_log(tmp_path), 20, what="approved step ran")


def test_unapproved_step_expires_into_escalation(tmp_path: Path, servers: list[Server]) -> None:
    """A step nobody approves within approval_timeout ends the episode escalated."""
    settings = config(tmp_path, strategy={"approval": "required"}, healing={"approval_timeout": "500ms"})
    healer = start_healer(tmp_path, settings)
    servers.append(healer)
    post(healer.url + "/api/v1/alertmanager", payload(alert("ignored")), AUTH)
    wait_for(lambda: episodes(healer) == {"escalated": 1}, 20, what="escalated")
    assert [step["skip_reason"] for step in actions(healer)] == ["approval_expired"]
    assert steps_log(tmp_path) == []


def test_budget_opens_circuit_until_closed(tmp_path: Path, servers: list[Server]) -> None:
    """Beyond the action budget the breaker opens and skips steps; POST /api/v1/circuit/close closes it."""
    settings = config(tmp_path, healing={"budget": {"actions": 2, "window": "10m"}}, rule={"max_attempts": 1})
    healer = start_healer(tmp_path, settings)
    servers.append(healer)
    post(healer.url + "/api/v1/alertmanager", payload(alert("c1"), alert("c2"), alert("c3")), AUTH)
    wait_for(lambda: all_ended(healer, 3), 20)
    assert [step["skip_reason"] for step in actions(healer)].count("circuit_open") == 1
    assert len([line for line in steps_log(tmp_path) if line.startswith("start")]) == 2
    _, metrics = http_get(healer.url + "/metrics", headers=healer.headers)
    assert b"healer_circuit_open 1.0" in metrics
    assert post(healer.url + "/api/v1/circuit/close", b"", {})[0] == 401
    assert post(healer.url + "/api/v1/circuit/close", b"", AUTH)[0] == 200
    _, metrics = http_get(healer.url + "/metrics", headers=healer.headers)
    assert b"healer_circuit_open 0.0" in metrics


def test_test_alert_shows_plan_and_runs_nothing(tmp_path: Path) -> None:
    """`healer test-alert` prints the matched rule and rendered argv per alert, and runs nothing."""
    settings = config(tmp_path)
    config_path = tmp_path / "healer.yml"
    config_path.write_text(json.dumps(settings))
    hostile = alert("; rm -rf /")
    unmatched = copy.deepcopy(alert("other"))
    unmatched["labels"]["alertname"] = "Other"
    (tmp_path / "payload.json").write_bytes(payload(alert("web-1"), hostile, unmatched))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "healer",
            "test-alert",
            "-c",
            str(config_path),
            str(tmp_path / "payload.json"),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    ok, refused, none = json.loads(result.stdout)
    assert ok["rule"] == "record" and ok["ladder"][0]["plan"]["argv"][-2] == "web-1"
    assert refused["ladder"][0]["skip_reason"] == "unsafe_label"
    assert none["rule"] is None and none["skip_reason"] == "no_rule"
    assert steps_log(tmp_path) == []


def test_resolved_stops_the_running_step_when_the_rule_says_so(tmp_path: Path, servers: list[Server]) -> None:
    """With cancel_running_on_resolve, a resolved notification stops the running step and its process."""
    settings = config(tmp_path, step_seconds=60, rule={"cancel_running_on_resolve": True})
    healer = start_healer(tmp_path, settings)
    servers.append(healer)
    firing = alert("long")
    post(healer.url + "/api/v1/alertmanager", payload(firing), AUTH)
    wait_for(lambda: "start long" in steps_log(tmp_path), 20, what="step started")
    resolved = {**firing, "status": "resolved", "endsAt": "2026-11-23T23:20:00Z"}
    post(healer.url + "/api/v1/alertmanager", payload(resolved), AUTH)
    wait_for(lambda: episodes(healer) == {"resolved": 1}, 20, what="resolved")
    assert [(step["outcome"], step["skip_reason"]) for step in actions(healer)] == [("cancelled", "resolved")]
    time.sleep(0.5)
    assert "end long" not in steps_log(tmp_path)
    assert processes_mentioning(str(tmp_path / "steps.log")) == []


def test_escalation_survives_alertmanager_outage_and_restart(tmp_path: Path, servers: list[Server]) -> None:
    """HealingFailed queued while Alertmanager is down reaches it after a SIGKILL and restart, then resolves."""
    am_port = free_port()  # nothing listens here until the test starts Alertmanager
    settings = config(tmp_path, strategy={"approval": "required"}, healing={"approval_timeout": "300ms"})
    settings["alertmanager"] = {"url": f"http://127.0.0.1:{am_port}", "timeout": "500ms", "resend_interval": "1s"}
    healer = start_healer(tmp_path, settings)
    post(healer.url + "/api/v1/alertmanager", payload(alert("paged")), AUTH)
    wait_for(
        lambda: (metric(healer, "healer_escalation_delivery_failures_total") or 0) >= 2,
        20,
        what="HealingFailed posts failing while Alertmanager is down",
    )
    assert metric(healer, "healer_escalations_total") == 1
    healer.stop(signal.SIGKILL)

    alertmanager = start_alertmanager(
        tmp_path / "alertmanager", {"route": {"receiver": "null"}, "receivers": [{"name": "null"}]}, port=am_port
    )
    servers.append(alertmanager)
    restarted = start_healer(tmp_path, settings)
    servers.append(restarted)
    url = f"{alertmanager.url}/api/v2/alerts?filter=" + urllib.parse.quote('alertname="HealingFailed"')
    [page] = wait_for(lambda: http_json(url) or None, 20, what="HealingFailed in Alertmanager")
    assert page["labels"]["id"] == "paged" and page["labels"]["healed_alertname"] == "Broken"
    assert page["status"]["state"] == "active"
    first_ends = page["endsAt"]
    wait_for(lambda: http_json(url)[0]["endsAt"] > first_ends, 10, what="HealingFailed posted again")

    resolved = {**alert("paged"), "status": "resolved", "endsAt": "2026-11-23T23:20:00Z"}
    post(restarted.url + "/api/v1/alertmanager", payload(resolved), AUTH)
    wait_for(lambda: http_json(url) == [], 20, what="HealingFailed resolved in Alertmanager")
    [step] = actions(restarted)

    def resolving_post_recorded() -> list[str] | None:
        # Recorded once Alertmanager took the resolving post, with nothing left to send.
        kinds = events(restarted, step["id"])
        return kinds if kinds[-1] == "escalation_resolved" else None

    kinds = wait_for(resolving_post_recorded, 10, what="the resolving post recorded")
    assert kinds.count("escalation_delivered") == 1 and kinds.count("escalation_resolved") == 1


def test_sigterm_stops_within_one_shutdown_timeout(tmp_path: Path, servers: list[Server]) -> None:
    """With a step running and a request in flight, SIGTERM ends healer after one shutdown_timeout, not two."""
    settings = config(tmp_path, step_seconds=60)
    settings["server"]["shutdown_timeout"] = "2s"
    healer = start_healer(tmp_path, settings)
    post(healer.url + "/api/v1/alertmanager", payload(alert("long")), AUTH)
    wait_for(lambda: "start long" in steps_log(tmp_path), 20, what="the step started")
    host, port = healer.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as stalled:
        # Headers and half a body: aiohttp counts the request in flight and waits for it at shutdown.
        stalled.sendall(
            f"POST /api/v1/alertmanager HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {TOKEN}\r\n"
            "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{".encode()
        )
        time.sleep(0.2)
        started = time.monotonic()
        assert healer.stop(signal.SIGTERM, timeout=15) == 0
        took = time.monotonic() - started
    assert 1.9 <= took < 3.5, f"stop took {took:.2f}s with shutdown_timeout 2s"
    assert "end long" not in steps_log(tmp_path)
    assert processes_mentioning(str(tmp_path / "steps.log")) == []
    restarted = start_healer(tmp_path, settings)
    servers.append(restarted)
    wait_for(lambda: actions(restarted, outcome="interrupted"), 20, what="recorded interrupted")


def test_full_inbox_answers_503_and_loses_nothing(tmp_path: Path, servers: list[Server]) -> None:
    """At store.max_backlog the webhook answers 503 so that Alertmanager retries, and accepts again once worked off."""
    settings = config(tmp_path)
    settings["store"]["max_backlog"] = 10
    settings["server"]["max_request_bytes"] = 8 * 1024 * 1024
    healer = start_healer(tmp_path, settings)
    servers.append(healer)
    url = healer.url + "/api/v1/alertmanager"
    storm = payload(*(alert(f"s{i}", alertname="Storm") for i in range(5000)))
    assert post(url, storm, AUTH)[0] == 200  # below the limit when it came, so taken whole
    code, answer = post(url, payload(alert("late", alertname="Storm")), AUTH)
    assert code == 503 and "store.max_backlog" in answer["error"] and answer["backlog"] >= 10
    wait_for(lambda: post(url, payload(alert("late", alertname="Storm")), AUTH)[0] == 200, 60, what="accepted again")
    assert healing_status(healer)["alerts_received"] == 5001
    _, metrics = http_get(healer.url + "/metrics", headers=healer.headers)
    refused = re.search(rb'healer_webhook_requests_total\{code="5xx"\} ([0-9.]+)', metrics)
    assert refused is not None and float(refused.group(1)) >= 1
    assert steps_log(tmp_path) == []  # no rule matches Storm
