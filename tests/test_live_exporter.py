"""A real Prometheus scrapes a real healer: host, process and probe series are queryable and correct."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

from tests.servers import (
    PROMTOOL,
    Server,
    free_port,
    http_get,
    prom_query,
    prom_value,
    start_healer,
    start_prometheus,
    wait_for,
)

pytestmark = pytest.mark.slow

TARGET_APP = """
import http.server, sys
class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(500 if self.path == "/fail" else 200)
        self.end_headers()
        self.wfile.write(b"x")
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), Handler).serve_forever()
"""


class Stack:
    def __init__(self, healer: Server, prometheus: Server, sleeper: subprocess.Popen[bytes]) -> None:
        self.healer = healer
        self.prometheus = prometheus
        self.sleeper = sleeper

    def value(self, expr: str) -> float | None:
        return prom_value(self.prometheus, expr)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """healer watching a sleeper and probing a target, scraped by Prometheus every second."""
    workdir = tmp_path_factory.mktemp("live")
    port = free_port()
    target = subprocess.Popen([sys.executable, "-c", TARGET_APP, str(port)])
    marker = f"healer-live-{uuid.uuid4().hex[:12]}"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", marker])
    started: list[Server] = []
    try:
        wait_for(lambda: http_get(f"http://127.0.0.1:{port}/ok")[0] == 200, 10, what="target up")
        config: dict[str, Any] = {
            "prometheus": {"url": "http://127.0.0.1:1"},
            "exporter": {
                "process_scan_interval": "500ms",
                "processes": [{"name": "sleeper", "cmdline": marker}],
                "probes": [
                    {"name": "ok", "url": f"http://127.0.0.1:{port}/ok", "interval": "500ms", "timeout": "400ms"},
                    {"name": "fail", "url": f"http://127.0.0.1:{port}/fail", "interval": "500ms", "timeout": "400ms"},
                ],
            },
        }
        healer = start_healer(workdir / "healer", config)
        started.append(healer)
        prometheus = start_prometheus(
            workdir / "prometheus",
            [{"job_name": "healer", "static_configs": [{"targets": [healer.url.removeprefix("http://")]}]}],
        )
        started.append(prometheus)
        stack = Stack(healer, prometheus, sleeper)
        wait_for(lambda: stack.value('up{job="healer"}') == 1, 30, what="healer scraped")
        yield stack
    finally:
        for server in reversed(started):
            server.stop(signal.SIGTERM)
        for process in (target, sleeper):
            process.kill()
            process.wait()


def test_healer_is_up_and_host_series_are_sensible(stack: Stack) -> None:
    """Prometheus sees healer up, the host's real memory total, and CPU time advancing at about one second per CPU."""
    assert stack.value('up{job="healer"}') == 1
    assert stack.value("healer_host_memory_total_bytes") == psutil.virtual_memory().total
    cpus = psutil.cpu_count()
    rate = wait_for(lambda: stack.value("sum(irate(healer_host_cpu_seconds_total[5s]))"), 20, what="cpu rate")
    assert 0.5 * cpus <= rate <= 1.5 * cpus
    assert stack.value('healer_host_filesystem_avail_bytes{mountpoint="/"}') > 0
    assert stack.value("healer_host_memory_available_bytes / healer_host_memory_total_bytes") < 1


def test_failing_probe_shows_errors(stack: Stack) -> None:
    """A probe of a target that answers 500 shows as down with 5xx requests; the healthy one is up."""
    wait_for(lambda: stack.value('healer_probe_requests_total{probe="fail",code="5xx"}'), 20, what="5xx counted")
    assert stack.value('healer_probe_up{probe="fail"}') == 0
    assert stack.value('healer_probe_up{probe="ok"}') == 1
    assert stack.value('healer_probe_requests_total{probe="ok",code="5xx"}') == 0
    error_ratio = wait_for(
        lambda: stack.value(
            'sum(irate(healer_probe_requests_total{probe="fail",code=~"5xx|timeout|error"}[5s]))'
            ' / sum(irate(healer_probe_requests_total{probe="fail"}[5s]))'
        ),
        20,
        what="error ratio",
    )
    assert error_ratio == 1


def test_killed_process_shows_down(stack: Stack) -> None:
    """A watched process is up with its memory; after the test kills it, Prometheus sees it down."""
    assert stack.value('healer_process_up{process="sleeper"}') == 1
    assert stack.value('healer_process_resident_memory_bytes{process="sleeper"}') > 1_000_000
    stack.sleeper.kill()
    stack.sleeper.wait()
    wait_for(lambda: stack.value('healer_process_up{process="sleeper"}') == 0, 20, what="sleeper down")
    assert stack.value('healer_process_instances{process="sleeper"}') == 0


def test_unreachable_prometheus_is_reported(stack: Stack) -> None:
    """healer serves although its configured Prometheus is unreachable, and says so in metrics and log."""
    assert stack.value('healer_dependency_up{dependency="prometheus"}') == 0
    events = [json.loads(line) for line in stack.healer.log().splitlines() if line.startswith("{")]
    assert any(e["event"] == "upstream unreachable" and e["dependency"] == "prometheus" for e in events)


def test_promtool_finds_no_problems(stack: Stack, tmp_path: Path) -> None:
    """`promtool check metrics` reports nothing on healer's /metrics output."""
    status, body = http_get(stack.healer.url + "/metrics")
    assert status == 200
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True, timeout=30)
    assert result.returncode == 0 and not result.stdout.strip() and not result.stderr.strip(), (
        result.stdout + result.stderr
    )


def test_label_values_exist_before_any_event(stack: Stack) -> None:
    """Every skip reason and webhook code exists as a series before anything happened."""
    reasons = {r["metric"]["reason"] for r in prom_query(stack.prometheus, "healer_skipped_total")}
    assert {"cooldown", "unsafe_label", "circuit_open", "dry_run"} <= reasons
