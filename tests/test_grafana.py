"""Grafana dashboards and provisioning: structure (fast), and every query against a real Prometheus (slow).

The live test starts the example app, a real healer that watches and probes it and heals a few
posted alerts, and a real Prometheus loading rules/*.yml; then it runs each panel's and each
annotation's PromQL with the template variables filled in, the way Grafana would.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import signal
import subprocess
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.servers import (
    PROMTOOL,
    REPO,
    Server,
    free_port,
    http_get,
    prom_query,
    start_healer,
    start_prometheus,
    wait_for,
)
from tests.test_engine_safety import payload
from tests.test_receiver import post

GRAFANA = REPO / "grafana"
DASHBOARD_DIR = GRAFANA / "dashboards"
DASHBOARD_FILES = sorted(DASHBOARD_DIR.glob("*.json"))
EXPECTED_DASHBOARDS = {"healer-overview.json", "host-and-application.json"}
# Where the provisioning file tells Grafana to look, and where docker-compose mounts grafana/dashboards.
DASHBOARDS_MOUNT = "/etc/grafana/dashboards"
DATASOURCE_REF = {"type": "prometheus", "uid": "${datasource}"}
# Grafana's own variables and the values the live test gives them (Prometheus scrapes every second).
GLOBAL_VARIABLES = {"__rate_interval": "5s", "__interval": "5s", "__range": "1m"}


def load(path: Path) -> dict[str, Any]:
    return dict(json.loads(path.read_text()))


def all_panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, including those nested in collapsed rows."""
    for panel in board.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def query_panels(board: dict[str, Any]) -> Iterator[dict[str, Any]]:
    return (p for p in all_panels(board) if p.get("type") != "row")


def prometheus_annotations(board: dict[str, Any]) -> list[dict[str, Any]]:
    return [a for a in board["annotations"]["list"] if not a.get("builtIn")]


def variables(board: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in board["templating"]["list"]}


def substitute(expr: str, board: dict[str, Any]) -> str:
    """Fill in template variables as Grafana would with every query variable set to All."""
    names = {name: ".*" for name, v in variables(board).items() if v["type"] == "query"}
    names.update(GLOBAL_VARIABLES)

    def value(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(2)
        assert name in names, f"unknown template variable ${name} in {expr!r}"
        return names[name]

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)", value, expr)


@dataclass(frozen=True)
class Query:
    dashboard: str
    title: str  # panel title, or "annotation NAME"
    ref: str
    expr: str

    def __str__(self) -> str:
        return f"{self.dashboard} / {self.title!r} / {self.ref}: {self.expr}"


def queries(path: Path, *, annotations: bool) -> list[Query]:
    board = load(path)
    found: list[Query] = []
    if annotations:
        for ann in prometheus_annotations(board):
            found.append(Query(path.name, f"annotation {ann['name']}", "Anno", substitute(ann["expr"], board)))
        return found
    for panel in query_panels(board):
        for target in panel.get("targets", []):
            found.append(Query(path.name, panel["title"], target["refId"], substitute(target["expr"], board)))
    return found


# --- structure --------------------------------------------------------------------------------------------


def test_the_dashboards_exist() -> None:
    assert {p.name for p in DASHBOARD_FILES} >= EXPECTED_DASHBOARDS


def test_uids_are_fixed_short_and_unique() -> None:
    uids = [load(p).get("uid") for p in DASHBOARD_FILES]
    for path, uid in zip(DASHBOARD_FILES, uids, strict=True):
        assert isinstance(uid, str) and uid and len(uid) <= 40, f"{path.name}: uid {uid!r}"
        assert re.fullmatch(r"[A-Za-z0-9_-]+", uid), f"{path.name}: uid {uid!r}"
    assert len(set(uids)) == len(uids), uids


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_dashboard_is_provisionable(path: Path) -> None:
    """No export-time __inputs or ${DS_...} placeholders, which file provisioning leaves unresolved."""
    text = path.read_text()
    board = load(path)
    assert "${DS_" not in text and "__inputs" not in board and "__requires" not in board
    assert board.get("id") is None, "a provisioned dashboard must not carry a database id"
    assert board["title"] and board["schemaVersion"] >= 36
    datasource = variables(board).get("datasource")
    assert datasource is not None, "no template variable named datasource"
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_every_query_uses_the_datasource_variable(path: Path) -> None:
    board = load(path)
    for panel in query_panels(board):
        assert panel.get("datasource") == DATASOURCE_REF, f"panel {panel['title']!r}: {panel.get('datasource')}"
        assert panel.get("targets"), f"panel {panel['title']!r} has no query"
        for target in panel["targets"]:
            assert target.get("datasource") == DATASOURCE_REF, f"panel {panel['title']!r} target {target.get('refId')}"
            assert target.get("expr", "").strip(), f"panel {panel['title']!r} target {target.get('refId')} is empty"
    for ann in prometheus_annotations(board):
        assert ann.get("datasource") == DATASOURCE_REF, f"annotation {ann['name']!r}"
        assert ann.get("expr", "").strip(), f"annotation {ann['name']!r}"
    for var in variables(board).values():
        if var["type"] == "query":
            assert var["datasource"] == DATASOURCE_REF, f"variable {var['name']!r}"


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_panel_ids_titles_and_layout(path: Path) -> None:
    """Unique ids (rows' nested panels included), unique titles, and a grid that fits and does not overlap."""
    board = load(path)
    panels = list(all_panels(board))
    ids = [p.get("id") for p in panels]
    assert all(isinstance(i, int) for i in ids), ids
    assert len(set(ids)) == len(ids), f"duplicate panel ids: {[i for i in ids if ids.count(i) > 1]}"
    titles = [p["title"] for p in query_panels(board)]
    assert len(set(titles)) == len(titles), f"duplicate titles: {[t for t in titles if titles.count(t) > 1]}"
    taken: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        assert grid["w"] > 0 and grid["h"] > 0 and grid["x"] >= 0 and grid["y"] >= 0, panel["title"]
        assert grid["x"] + grid["w"] <= 24, f"panel {panel['title']!r} is wider than the grid: {grid}"
    for panel in board["panels"]:  # panels inside collapsed rows have their own positions
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in taken, f"panels {taken[(x, y)]!r} and {panel['title']!r} overlap"
                taken[(x, y)] = panel["title"]


@pytest.mark.parametrize("path", DASHBOARD_FILES, ids=lambda p: p.name)
def test_instance_filters_work_with_all(path: Path) -> None:
    """Instance variables are matched with =~ so that All (.*) and multi-value selections work."""
    board = load(path)
    for var in variables(board).values():
        if var["type"] == "query":
            assert var.get("includeAll") and var.get("allValue") == ".*", var["name"]
    texts = [t["expr"] for p in query_panels(board) for t in p["targets"]]
    texts += [a["expr"] for a in prometheus_annotations(board)]
    for expr in texts:
        assert not re.search(r'[^=!]=\s*"\$', expr), f"variable compared with = instead of =~: {expr}"


@pytest.mark.skipif(not Path(PROMTOOL).exists(), reason="promtool is not installed")
def test_every_expression_parses(tmp_path: Path) -> None:
    """promtool parses every panel and annotation expression (as recording rules) with the variables filled in."""
    found = [q for p in DASHBOARD_FILES for a in (False, True) for q in queries(p, annotations=a)]
    rules = {
        "groups": [
            {"name": "grafana", "rules": [{"record": f"grafana:query{i}", "expr": q.expr} for i, q in enumerate(found)]}
        ]
    }
    rule_file = tmp_path / "queries.yml"
    rule_file.write_text(yaml.safe_dump(rules))
    result = subprocess.run([PROMTOOL, "check", "rules", str(rule_file)], capture_output=True, text=True, timeout=60)
    if result.returncode != 0:
        numbers = {int(n) for n in re.findall(r"grafana:query(\d+)", result.stdout + result.stderr)}
        bad = "\n".join(str(found[n]) for n in sorted(numbers)) or "(see output)"
        pytest.fail(f"promtool rejects dashboard queries:\n{bad}\n{result.stdout}{result.stderr}")


def test_datasource_provisioning() -> None:
    config = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    assert config["apiVersion"] == 1
    [source] = config["datasources"]
    assert source["type"] == "prometheus" and source["uid"] == "prometheus"
    assert source["url"] == "http://prometheus:9090" and source["isDefault"] is True


def test_dashboard_provisioning_points_at_the_documented_folder() -> None:
    config = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "healer.yml").read_text())
    assert config["apiVersion"] == 1
    [provider] = config["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == DASHBOARDS_MOUNT
    readme = (GRAFANA / "README.md").read_text()
    assert DASHBOARDS_MOUNT in readme
    for path in DASHBOARD_FILES:
        assert path.name in readme, f"grafana/README.md does not mention {path.name}"


# --- live --------------------------------------------------------------------------------------------------

TOKEN = "grafana-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
APP_MODULE = REPO / "examples" / "app" / "app.py"

# Stand-in for the example app when examples/app is missing: the same series, fixed values.
FAKE_APP = r"""
import http.server, sys, time
BODY = '''app_http_requests_total{handler="healthz",code="200"} %(n)d
app_http_requests_total{handler="healthz",code="500"} 0
app_http_request_duration_seconds_bucket{handler="healthz",le="0.005"} %(n)d
app_http_request_duration_seconds_bucket{handler="healthz",le="+Inf"} %(n)d
app_http_request_duration_seconds_sum{handler="healthz"} %(s)f
app_http_request_duration_seconds_count{handler="healthz"} %(n)d
app_cache_size_bytes 2048
app_model_drift_score 0.05
app_knowledge_base_last_update_timestamp_seconds %(t)f
app_data_dir_bytes 1048576
app_data_dir_limit_bytes 67108864
app_faults_active{fault="errors"} 0
app_faults_active{fault="latency"} 0
'''
START = time.time()
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        n = int((time.time() - START) * 10)
        body = (BODY % {"n": n, "s": n * 0.001, "t": START}).encode() if self.path == "/metrics" else b"ok"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""

# Alerts for the fixture's healing. healer acts only on alerts Prometheus reports firing, and calls
# a step healed when Prometheus stops reporting it: GrafanaHeals fires while the victim process
# runs, and its strategy kills it; GrafanaHopeless fires while healer is up, and its strategy fails.
TEST_RULES = {
    "groups": [
        {
            "name": "grafana-test",
            "rules": [
                {
                    "alert": "GrafanaHeals",
                    "expr": 'healer_process_up{process="victim"} == 1',
                    "labels": {"severity": "warning"},
                },
                {"alert": "GrafanaHopeless", "expr": 'up{job="healer"} == 1', "labels": {"severity": "critical"}},
            ],
        }
    ]
}
KILL = "import os, signal, sys; os.kill(int(sys.argv[1]), signal.SIGTERM)"


def exceptions(healer_metrics: str) -> dict[str, str]:
    """Panel titles (or annotation names) allowed to return no data in the live test, with the reason.

    The list is short because the fixture makes the rare events happen: alerts fire, one step heals,
    one fails and escalates, a re-send is skipped, and the circuit breaker opens. Only what depends
    on the machine may be missing.
    """
    allowed: dict[str, str] = {}
    if "healer_host_disk_read_bytes_total{" not in healer_metrics:
        reason = "this machine exposes no block device statistics to psutil"
        allowed["Disk throughput"] = reason
        allowed["Disk busy"] = reason
    if "healer_host_disk_io_time_seconds_total{" not in healer_metrics:
        allowed["Disk busy"] = "this machine exposes no busy time for its block devices"
    return allowed


@dataclass
class LiveStack:
    prometheus: Server
    healer: Server
    app_address: str
    exceptions: dict[str, str]


def alert(name: str, episode: str) -> dict[str, Any]:
    """An Alertmanager alert; healer verifies by its labels, so they are a subset of Prometheus's ALERTS series."""
    starts = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 30))
    return {
        "status": "firing",
        "labels": {"alertname": name},
        "annotations": {},
        "startsAt": starts,
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://127.0.0.1/graph",
        "fingerprint": hashlib.sha256(f"{name}/{episode}".encode()).hexdigest()[:16],
    }


def metric(server: Server, name: str, **labels: str) -> float:
    """Sum of the samples named `name` on healer's /metrics whose labels include `labels`."""
    _, body = http_get(server.url + "/metrics", headers=server.headers)
    return sum(
        sample.value
        for family in text_string_to_metric_families(body.decode())
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    )


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveStack]:
    workdir = tmp_path_factory.mktemp("grafana")
    app_port, healer_port = free_port(), free_port()
    if APP_MODULE.exists():
        argv = [sys.executable, "-m", "examples.app.app", "--port", str(app_port), "--data-dir", str(workdir / "data")]
        marker = rf"examples\.app\.app --port {app_port}"
    else:
        marker = f"grafana-fake-app-{app_port}"
        argv = [sys.executable, "-c", FAKE_APP, str(app_port), marker]
    app_log = (workdir / "app.log").open("wb")
    app = subprocess.Popen(argv, cwd=REPO, stdout=app_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    app_log.close()
    victim_marker = f"grafana-victim-{app_port}"
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", victim_marker])
    started: list[Server] = []
    try:
        wait_for(
            lambda: http_get(f"http://127.0.0.1:{app_port}/metrics", timeout=1)[0] == 200,
            30,
            what=f"app up: {(workdir / 'app.log').read_text(errors='replace')}",
        )
        rule_file = workdir / "test-rules.yml"
        rule_file.write_text(yaml.safe_dump(TEST_RULES))
        prometheus = start_prometheus(
            workdir / "prometheus",
            [
                {
                    "job_name": "healer",
                    # healer's reads, /metrics included, need its token once it has one.
                    "authorization": {"credentials": TOKEN},
                    "static_configs": [{"targets": [f"127.0.0.1:{healer_port}"]}],
                },
                {"job_name": "app", "static_configs": [{"targets": [f"127.0.0.1:{app_port}"]}]},
            ],
            rule_files=[str(REPO / "rules" / "*.yml"), str(rule_file)],
        )
        started.append(prometheus)
        (workdir / "token").write_text(TOKEN)
        config: dict[str, Any] = {
            "server": {"auth": {"bearer_token_file": str(workdir / "token")}, "shutdown_timeout": "1s"},
            "prometheus": {"url": prometheus.url, "timeout": "1s", "check_interval": "1s"},
            "alertmanager": {"url": "http://127.0.0.1:1", "timeout": "200ms"},
            "store": {"path": str(workdir / "healer.db")},
            "exporter": {
                "host": True,
                "process_scan_interval": "500ms",
                "processes": [{"name": "app", "cmdline": marker}, {"name": "victim", "cmdline": victim_marker}],
                "probes": [
                    {
                        "name": "app",
                        "url": f"http://127.0.0.1:{app_port}/healthz",
                        "interval": "500ms",
                        "timeout": "400ms",
                    }
                ],
            },
            "healing": {
                # Two actions fit in the budget; a third one opens the circuit breaker.
                "budget": {"actions": 2, "window": "10m"},
                "rules": [
                    {
                        "name": "heals",
                        "match": ['alertname="GrafanaHeals"'],
                        "strategies": ["kill-victim"],
                        "max_attempts": 1,
                        "cooldown": "100ms",
                        "verify": {"within": "15s", "interval": "200ms"},
                    },
                    {
                        "name": "hopeless",
                        "match": ['alertname="GrafanaHopeless"'],
                        "strategies": ["fail"],
                        "max_attempts": 1,
                        "cooldown": "100ms",
                        "verify": {"within": "1s", "interval": "200ms"},
                    },
                ],
            },
            "strategies": {
                "kill-victim": {
                    "type": "exec",
                    "command": [sys.executable, "-c", KILL, str(victim.pid)],
                    "timeout": "10s",
                },
                "fail": {"type": "exec", "command": [sys.executable, "-c", "raise SystemExit(1)"], "timeout": "10s"},
            },
            # Below min_confidence, so it never acts (and never spends the budget), but its confidence is exported.
            "optimizer": {
                "candidates": [
                    {
                        "name": "doubtful",
                        "component": "app",
                        "metric": "up",
                        "direction": "increase",
                        "apply": "fail",
                        "rollback": "fail",
                        "expected_improvement": 0.1,
                        "cost": 1,
                        "confidence": 0.5,
                    }
                ]
            },
        }
        healer = start_healer(workdir / "healer", config, listen=f"127.0.0.1:{healer_port}")
        started.append(healer)

        def firing(expr: str) -> bool:
            return bool(prom_query(prometheus, expr))

        wait_for(
            lambda: firing('up{job="healer"} == 1') and firing('up{job="app"} == 1'), 30, what="healer and app scraped"
        )
        first_up = time.monotonic()
        wait_for(
            lambda: (
                firing('ALERTS{alertname=~"GrafanaHeals|GrafanaHopeless", alertstate="firing"} == 1')
                and len(prom_query(prometheus, 'ALERTS{alertname=~"Grafana.*", alertstate="firing"}')) == 2
            ),
            30,
            what="the test alerts firing",
        )
        time.sleep(max(0.0, 2.0 - (time.monotonic() - first_up)))  # counters have samples before the events
        webhook = healer.url + "/api/v1/alertmanager"
        body = payload(alert("GrafanaHeals", "1"), alert("GrafanaHopeless", "1"))
        assert post(webhook, body, AUTH)[0] == 200
        assert post(webhook, body, AUTH)[0] == 200  # Alertmanager's re-send: skipped as a duplicate
        try:
            wait_for(
                lambda: (
                    metric(healer, "healer_actions_total", strategy="kill-victim", outcome="healed") >= 1
                    and metric(healer, "healer_escalations_total") >= 1
                ),
                40,
                what="one heal and one escalation",
            )
            # A third action is over the budget of two: the circuit breaker opens.
            assert post(webhook, payload(alert("GrafanaHopeless", "2")), AUTH)[0] == 200
            wait_for(lambda: metric(healer, "healer_circuit_open") == 1, 30, what="circuit breaker open")
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{healer.log()[-5000:]}") from None
        # At least six seconds of one-second scrapes and rule evaluations after the first `up`,
        # and two after the last event, so that rate() over 5s sees them.
        time.sleep(max(2.0, 6.0 - (time.monotonic() - first_up)))
        _, body_bytes = http_get(healer.url + "/metrics", headers=healer.headers)
        yield LiveStack(prometheus, healer, f"127.0.0.1:{app_port}", exceptions(body_bytes.decode()))
    finally:
        for server in reversed(started):
            server.stop(signal.SIGTERM)
        for process in (app, victim):
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def run(prometheus: Server, expr: str, *, range_seconds: int = 0) -> tuple[str | None, list[dict[str, Any]]]:
    """Run an instant (or range) query; return (error, result)."""
    params: dict[str, Any] = {"query": expr}
    endpoint = "query"
    if range_seconds:
        now = time.time()
        params.update({"start": now - range_seconds, "end": now, "step": "1s"})
        endpoint = "query_range"
    status, body = http_get(f"{prometheus.url}/api/v1/{endpoint}?" + urllib.parse.urlencode(params))
    answer = json.loads(body)
    if status != 200 or answer.get("status") != "success":
        return f"{answer.get('errorType')}: {answer.get('error')}", []
    return None, list(answer["data"]["result"])


def has_finite_value(result: list[dict[str, Any]]) -> bool:
    samples = [s["value"][1] for s in result if "value" in s]
    samples += [v[1] for s in result for v in s.get("values", [])]
    return any(math.isfinite(float(v)) for v in samples)


def check(live: LiveStack, found: list[Query], *, range_seconds: int = 0) -> None:
    errors, empty = [], []
    for query in found:
        error, result = run(live.prometheus, query.expr, range_seconds=range_seconds)
        if error:
            errors.append(f"{query}\n    {error}")
        elif not has_finite_value(result) and query.title not in live.exceptions:
            empty.append(f"{query}\n    returned {result or 'nothing'}")
    report = [("queries Prometheus rejects:", errors), ("panels without data (or only NaN):", empty)]
    assert not errors and not empty, "\n".join(f"{head}\n" + "\n".join(lines) for head, lines in report if lines)


@pytest.mark.slow
def test_every_panel_query_runs_and_has_data(live: LiveStack) -> None:
    """Each panel target runs without error and returns a finite value, bar the listed exceptions.

    A panel with several targets passes when each target has data: every target is checked alone.
    """
    found = [q for path in DASHBOARD_FILES for q in queries(path, annotations=False)]
    assert len(found) > 40
    titles = {q.title for q in found}
    assert set(live.exceptions) <= titles, f"exceptions name unknown panels: {set(live.exceptions) - titles}"
    check(live, found)


@pytest.mark.slow
def test_every_annotation_query_runs_and_marks_the_events(live: LiveStack) -> None:
    """The healing, escalation and circuit-breaker annotations find the events the fixture caused."""
    found = [q for path in DASHBOARD_FILES for q in queries(path, annotations=True)]
    assert {q.title for q in found} >= {"annotation Healing actions", "annotation Escalations"}
    check(live, found, range_seconds=60)
    [healing] = [q for q in found if q.dashboard == "healer-overview.json" and q.title == "annotation Healing actions"]
    _, result = run(live.prometheus, healing.expr)
    events = [(r["metric"].get("strategy"), r["metric"].get("outcome")) for r in result]
    assert ("kill-victim", "healed") in events and ("fail", "failed") in events, events


@pytest.mark.slow
def test_variable_queries_list_the_targets(live: LiveStack) -> None:
    """`instance` lists the healer target and `app_instance` the app target (label_values run as Grafana does)."""
    expected = {"instance": live.healer.url.removeprefix("http://"), "app_instance": live.app_address}
    for path in DASHBOARD_FILES:
        for var in variables(load(path)).values():
            if var["type"] != "query":
                continue
            text = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", text.strip())
            assert match, f"{path.name}: variable {var['name']!r} is not a label_values() query: {text}"
            selector, label = match.groups()
            values = {r["metric"].get(label) for r in prom_query(live.prometheus, substitute(selector, load(path)))}
            assert expected[var["name"]] in values, f"{path.name}: variable {var['name']!r} lists {values}"
