"""The Prometheus rules, their promtool tests, and the example Prometheus and Alertmanager configs."""

from __future__ import annotations

import contextlib
import functools
import re
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.servers import (
    AMTOOL,
    PROMTOOL,
    REPO,
    Server,
    http_get,
    http_json,
    prom_query,
    start_healer,
    start_prometheus,
    wait_for,
)

RULES = REPO / "rules"
RULE_FILES = sorted(RULES.glob("*.yml"))
RULE_TESTS = sorted((RULES / "tests").glob("*.yml"))
RUNBOOK = REPO / "docs" / "runbook.md"
RUNBOOK_URL = "https://github.com/healer-project/healer/blob/main/docs/runbook.md#"
PROMETHEUS_EXAMPLE = REPO / "examples" / "prometheus.yml"
ALERTMANAGER_EXAMPLE = REPO / "examples" / "alertmanager.yml"

# A metric name that is not part of a recording rule's name (those have colons).
HEALER_METRIC = re.compile(r"(?<![:\w])healer_[a-z0-9_]+")
RECORD_NAME = re.compile(r"^[a-z_]+:[a-z0-9_]+:[a-z0-9_]+$")


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120, check=False)


def _rules() -> list[dict[str, Any]]:
    found = []
    for path in RULE_FILES:
        for group in yaml.safe_load(path.read_text())["groups"]:
            for rule in group["rules"]:
                found.append({**rule, "_group": group["name"], "_file": path.name})
    return found


def _alerts() -> list[dict[str, Any]]:
    return [rule for rule in _rules() if "alert" in rule]


def _records() -> list[dict[str, Any]]:
    return [rule for rule in _rules() if "record" in rule]


def _duration_seconds(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}
    total = 0.0
    for number, unit in re.findall(r"(\d+)(ms|s|m|h|d|w|y)", text):
        total += int(number) * units[unit]
    return total


@functools.cache
def _unit_test_groups() -> tuple[tuple[Path, dict[str, Any], float], ...]:
    found = []
    for path in RULE_TESTS:
        document = yaml.safe_load(path.read_text())
        interval = _duration_seconds(document.get("evaluation_interval", "1m"))
        found.extend((path, group, interval) for group in document["tests"])
    return tuple(found)


def test_rule_files_exist() -> None:
    """The rules directory holds rule files and promtool test files."""
    assert RULE_FILES, f"no rule files in {RULES}"
    assert RULE_TESTS, f"no promtool tests in {RULES / 'tests'}"


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_rule_file_passes_promtool_check_with_every_lint(path: Path) -> None:
    """Each rule file passes `promtool check rules` with every lint enabled and fatal."""
    result = _run([PROMTOOL, "check", "rules", "--lint=all", "--lint-fatal", str(path)])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    """Every promtool unit test in rules/tests passes."""
    result = _run([PROMTOOL, "test", "rules", *map(str, RULE_TESTS)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_example_config_is_valid() -> None:
    """examples/prometheus.yml passes `promtool check config` and loads every rule file."""
    result = _run([PROMTOOL, "check", "config", str(PROMETHEUS_EXAMPLE)])
    assert result.returncode == 0, result.stdout + result.stderr
    # rules/ plus the example app's own rule file
    assert f"SUCCESS: {len(RULE_FILES) + 1} rule files found" in result.stdout


def test_alertmanager_example_config_is_valid() -> None:
    """examples/alertmanager.yml passes `amtool check-config`."""
    result = _run([AMTOOL, "check-config", str(ALERTMANAGER_EXAMPLE)])
    assert result.returncode == 0, result.stdout + result.stderr


def test_alertmanager_example_sends_healer_resolved_alerts_with_a_token() -> None:
    """The healer receiver posts to healer's webhook with send_resolved and a bearer token file."""
    config = yaml.safe_load(ALERTMANAGER_EXAMPLE.read_text())
    (receiver,) = [r for r in config["receivers"] if r["name"] == "healer"]
    (webhook,) = receiver["webhook_configs"]
    assert webhook["url"] == "http://127.0.0.1:9877/api/v1/alertmanager"
    assert webhook["send_resolved"] is True
    assert webhook["http_config"]["authorization"]["credentials_file"]


@pytest.mark.parametrize(
    ("labels", "receivers"),
    [
        (["alertname=HostHighCpu", "severity=warning"], "healer"),
        (["alertname=ProbeDown", "severity=warning", "probe=web"], "healer"),
        (["alertname=HostDiskWillFillIn4h", "severity=critical"], "healer,oncall"),
        (["alertname=AppErrorBudgetBurnFast", "severity=critical"], "healer,oncall"),
        (["alertname=HealingFailed"], "oncall"),
        (["alertname=HealingFailed", "severity=critical"], "oncall"),
        (["alertname=HealerDown", "severity=critical"], "oncall"),
        (["alertname=HealerInboxBacklog", "severity=warning"], "oncall"),
    ],
)
def test_alertmanager_example_routes(labels: list[str], receivers: str) -> None:
    """Alertmanager routes healable alerts to healer, critical ones also to people, and healer's own only to people."""
    result = _run(
        [
            AMTOOL,
            "config",
            "routes",
            "test",
            f"--config.file={ALERTMANAGER_EXAMPLE}",
            f"--verify.receivers={receivers}",
            *labels,
        ]
    )
    assert result.returncode == 0, f"{labels} went to {result.stdout.strip()}, expected {receivers}"


def test_every_alert_has_for_severity_and_annotations() -> None:
    """Every alert has a `for`, a warning or critical severity, and summary, description and runbook_url."""
    problems = []
    for alert in _alerts():
        name = alert["alert"]
        if not alert.get("for"):
            problems.append(f"{name}: no for")
        if alert.get("labels", {}).get("severity") not in ("warning", "critical"):
            problems.append(f"{name}: severity is not warning or critical")
        annotations = alert.get("annotations", {})
        for key in ("summary", "description", "runbook_url"):
            if not annotations.get(key):
                problems.append(f"{name}: no {key} annotation")
        if "{{ $labels.instance }}" not in annotations.get("description", ""):
            problems.append(f"{name}: description does not name {{{{ $labels.instance }}}}")
    assert not problems, "\n".join(problems)


def test_every_alert_links_to_its_runbook_section() -> None:
    """Every alert's runbook_url points at a section of docs/runbook.md headed with the alert's name."""
    headings = {line[3:].strip().lower() for line in RUNBOOK.read_text().splitlines() if line.startswith("## ")}
    problems = []
    for alert in _alerts():
        name = alert["alert"]
        url = alert["annotations"]["runbook_url"]
        if url != RUNBOOK_URL + name.lower():
            problems.append(f"{name}: runbook_url {url} is not {RUNBOOK_URL + name.lower()}")
        if name.lower() not in headings:
            problems.append(f"{name}: docs/runbook.md has no '## {name}' section")
    assert not problems, "\n".join(problems)


def test_alert_and_record_names_are_unique_and_well_formed() -> None:
    """Alert names are CamelCase and unique; recording rule names follow level:metric:operations."""
    alerts = [rule["alert"] for rule in _alerts()]
    records = [rule["record"] for rule in _records()]
    assert len(alerts) == len(set(alerts)), alerts
    assert len(records) == len(set(records)), records
    assert all(re.fullmatch(r"[A-Z][A-Za-z0-9]+", name) for name in alerts), alerts
    assert all(RECORD_NAME.fullmatch(name) for name in records), records


def test_every_alert_has_a_boundary_pair_in_the_promtool_tests() -> None:
    """Each alert has a promtool test silent one evaluation before it fires, with labels and annotations asserted."""
    missing = []
    for alert in _alerts():
        name = alert["alert"]
        found = False
        for _path, group, interval in _unit_test_groups():
            cases = [case for case in group.get("alert_rule_test", []) if case["alertname"] == name]
            silent = {_duration_seconds(c["eval_time"]) for c in cases if not c.get("exp_alerts")}
            for case in cases:
                expected = case.get("exp_alerts") or []
                complete = expected and all(
                    e.get("exp_labels", {}).get("severity") == alert["labels"]["severity"]
                    and set(e.get("exp_annotations", {})) == {"summary", "description", "runbook_url"}
                    for e in expected
                )
                if complete and _duration_seconds(case["eval_time"]) - interval in silent:
                    found = True
        if not found:
            missing.append(name)
    assert not missing, f"alerts without a boundary pair in rules/tests: {missing}"


def test_promtool_tests_fix_the_group_evaluation_order() -> None:
    """Each promtool test file lists every rule group in group_eval_order, recording groups before the alerts."""
    groups = [group["name"] for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]]
    for path in RULE_TESTS:
        order = yaml.safe_load(path.read_text()).get("group_eval_order", [])
        assert sorted(order) == sorted(groups), f"{path.name}: group_eval_order {order} is not every group {groups}"
        position = {name: index for index, name in enumerate(order)}
        for rule in _alerts():
            for record in re.findall(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", rule["expr"]):
                (source,) = [r["_group"] for r in _records() if r["record"] == record]
                assert position[source] < position[rule["_group"]], f"{path.name}: {source} after {rule['_group']}"


def test_every_recording_rule_has_an_exact_promtool_test() -> None:
    """Each recording rule is queried by name in a promtool test with expected samples."""
    tested = {
        case["expr"].strip()
        for _path, group, _interval in _unit_test_groups()
        for case in group.get("promql_expr_test", [])
        if case.get("exp_samples")
    }
    missing = [rule["record"] for rule in _records() if rule["record"] not in tested]
    assert not missing, f"recording rules without a promql_expr_test: {missing}"


def test_alerts_read_recording_rules_that_exist() -> None:
    """Every recording-rule name an alert expression uses is defined in the rule files."""
    records = {rule["record"] for rule in _records()}
    used = {name for rule in _rules() for name in re.findall(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", rule["expr"])}
    assert used <= records, f"undefined recording rules: {sorted(used - records)}"


# --- live: a real healer scraped by a real Prometheus loading rules/ -------------------------------


class _Healthy(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = b"ok\n"
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        return


@pytest.fixture
def probe_target() -> Iterator[str]:
    """A tiny HTTP server answering 200 on every path, for healer's probe."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Healthy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/healthz"
    server.shutdown()
    server.server_close()


@pytest.fixture
def watched_process() -> Iterator[str]:
    """A sleeping Python process with a unique marker on its command line; yields the marker."""
    marker = f"healer-rules-test-{uuid.uuid4().hex}"
    process = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(600)", marker],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    yield marker
    process.terminate()
    try:
        process.wait(10)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


def _timestamp(text: str) -> float:
    """Parse Prometheus's RFC 3339 timestamps, which carry nanoseconds."""
    text = re.sub(r"(\.\d{6})\d+", r"\1", text).replace("Z", "+00:00")
    return datetime.fromisoformat(text).timestamp()


def _rule_groups(prometheus: Server) -> list[dict[str, Any]]:
    return list(http_json(f"{prometheus.url}/api/v1/rules")["data"]["groups"])


@pytest.mark.slow
def test_rules_evaluate_against_a_live_healer(
    tmp_path: Path, servers: list[Server], probe_target: str, watched_process: str
) -> None:
    """Against a real healer, every rule evaluates without error and every recording rule returns a series."""
    healer = start_healer(
        tmp_path / "healer",
        {
            "store": {"path": str(tmp_path / "healer" / "healer.db")},
            "exporter": {
                "process_scan_interval": "1s",
                "processes": [{"name": "sleeper", "cmdline": re.escape(watched_process)}],
                "probes": [{"name": "web", "url": probe_target, "interval": "1s", "timeout": "1s"}],
            },
        },
    )
    servers.append(healer)
    target = healer.url.removeprefix("http://")
    prometheus = start_prometheus(
        tmp_path / "prometheus",
        [{"job_name": "healer", "static_configs": [{"targets": [target]}]}],
        rule_files=[str(RULES / "*.yml")],
        interval="1s",
    )
    servers.append(prometheus)

    # Every rule group must have run twice after the first successful scrape.
    wait_for(lambda: prom_query(prometheus, 'up{job="healer"} == 1'), 30, what="healer scraped")
    scraped_at = time.time()
    expected_groups = {group["name"] for path in RULE_FILES for group in yaml.safe_load(path.read_text())["groups"]}

    def evaluated_twice() -> bool:
        groups = _rule_groups(prometheus)
        return {g["name"] for g in groups} == expected_groups and all(
            _timestamp(g["lastEvaluation"]) >= scraped_at + 2 * g["interval"] for g in groups
        )

    wait_for(evaluated_twice, 30, interval=0.2, what="two evaluations of every rule group")

    groups = _rule_groups(prometheus)
    rules = [rule for group in groups for rule in group["rules"]]
    assert len(rules) == len(_rules())
    unhealthy = [f"{r['name']}: {r['health']} {r.get('lastError', '')}" for r in rules if r["health"] != "ok"]
    assert not unhealthy, "rules that failed to evaluate:\n" + "\n".join(unhealthy)

    # A recording rule may need one more evaluation when it reads another group's output.
    def empty_records() -> list[str]:
        return [rule["record"] for rule in _records() if not prom_query(prometheus, rule["record"])]

    with contextlib.suppress(AssertionError):
        wait_for(lambda: not empty_records(), 10, interval=0.5, what="every recording rule")
    empty = empty_records()
    assert not empty, "recording rules with no series against a live healer:\n" + "\n".join(empty)

    # Every healer metric a rule reads is one healer exports.
    status, body = http_get(f"{healer.url}/metrics")
    assert status == 200
    exported = {line.split("{")[0].split(" ")[0] for line in body.decode().splitlines() if line and line[0] != "#"}
    read = {name for rule in _rules() for name in HEALER_METRIC.findall(rule["expr"])}
    assert read <= exported, f"rules read healer metrics that healer does not export: {sorted(read - exported)}"
