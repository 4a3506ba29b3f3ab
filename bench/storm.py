"""Benchmark an alert storm: 1,000 distinct alerts through real Prometheus and Alertmanager into healer under a small
action budget, against the floor of the same notifications and a bare aiohttp server's /-/healthy.

What it runs
------------
One stack on loopback, as bench/e2e.py builds it (its fault app and Prometheus: rule ``FaultActive:
fault_active == 1``, scrape and evaluation every ``--interval-ms``, 1000) → Alertmanager (``group_by: [alertname,
fault]``, ``group_wait: 0s``, ``group_interval: 1s``), whose FaultActive notifications go to two receivers (the
first route has ``continue: true``): e2e.py's floor (an aiohttp handler that parses the JSON and logs each alert's
arrival) and healer. healer's own HealingFailed and HealingSuspended go to a receiver without webhooks.

healer: ``healing.budget: {actions: --budget (10), window: 10m}``, one rule matching FaultActive with
``max_attempts: 1`` whose strategy appends the alert's fault to a log and heals nothing (verify within 1s).

``--alerts`` (1000) fault files are created at once, so Prometheus fires that many alerts in one evaluation.

What it reports
---------------
* take-in: from the first alert firing in Prometheus (the earliest ``activeAt`` of /api/v1/alerts) to all alerts
  recorded as episodes in healer (``GET /api/v1/status``, polled every 100 ms) and to every episode ended; beside it
  the floor: from the same moment to the floor holding every alert's notification (the Prometheus → Alertmanager
  → webhook floor), and the ratio;
* healer's peak RSS (VmHWM of /proc/PID/status) at the end, and its RSS before the storm;
* ``GET /-/healthy`` latency p50/p99/max measured throughout, from one thread per server, each on its own
  keep-alive connection: healer and the baseline, a bare aiohttp server (``bench/storm.py _bare``); ratios;
* strategy runs (lines of the strategy's log), HealingSuspended and HealingFailed alerts in Alertmanager.

Usage: ``python bench/storm.py [--alerts 1000] [--budget 10] [--json]``. Everything started is stopped by its own
PID on exit, also on error or Ctrl-C. All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

# isort: split
import common  # bench/common.py: `python bench/storm.py` puts bench/ first on sys.path
import e2e  # the stack of bench/e2e.py: its fault app, floor receiver and Prometheus
from common import WEBHOOK_PATH, free_port, percentile, wait_for

TOKEN = e2e.TOKEN
RECORD_RUN = "import sys; open(sys.argv[1], 'a').write(sys.argv[2] + '\\n')"
HEALTH_INTERVAL_SECONDS = 0.02
# Nanoseconds of Prometheus's RFC 3339 timestamps: Python's parser takes microseconds.
_FRACTION = re.compile(r"(\.\d{6})\d*")


def bare_main() -> int:
    """Child process: the baseline, a bare aiohttp server answering ``GET /-/healthy``."""
    from aiohttp import web

    async def healthy(request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    app = web.Application()
    app.router.add_get("/-/healthy", healthy)
    common.serve_on_loopback(app)
    return 0


class HealthPoller(threading.Thread):
    """Times ``GET /-/healthy`` every HEALTH_INTERVAL_SECONDS on one keep-alive connection until stopped."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.address = urllib.parse.urlparse(url).netloc
        self.latencies_ms: list[float] = []
        self.errors: list[str] = []
        self.stopping = threading.Event()

    def run(self) -> None:
        connection = http.client.HTTPConnection(self.address, timeout=10)
        while not self.stopping.is_set():
            started = time.perf_counter()
            try:
                connection.request("GET", "/-/healthy")
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    self.errors.append(f"HTTP {response.status}")
            except (OSError, http.client.HTTPException) as exc:
                self.errors.append(repr(exc))
                connection.close()
                connection = http.client.HTTPConnection(self.address, timeout=10)
            else:
                self.latencies_ms.append((time.perf_counter() - started) * 1000)
            self.stopping.wait(HEALTH_INTERVAL_SECONDS)
        connection.close()

    def stop(self) -> None:
        self.stopping.set()
        self.join(15)


def start_alertmanager(keeper: common.Keeper, workdir: Path, floor_url: str, healer_url: str) -> common.Child:
    """Alertmanager sending FaultActive to the floor and to healer, and healer's own alerts to nobody."""
    webhook = {"send_resolved": True, "http_config": {"authorization": {"credentials": TOKEN}}}
    config = {
        "route": {
            "receiver": "humans",
            "group_by": ["alertname", "fault"],
            "group_wait": "0s",
            "group_interval": "1s",
            "repeat_interval": "1h",
            "routes": [
                {"receiver": "floor", "matchers": ['alertname="FaultActive"'], "continue": True},
                {"receiver": "healer", "matchers": ['alertname="FaultActive"']},
            ],
        },
        "receivers": [
            {"name": "humans"},
            {"name": "floor", "webhook_configs": [{"url": floor_url, **webhook}]},
            {"name": "healer", "webhook_configs": [{"url": healer_url, **webhook}]},
        ],
    }
    return common.start_alertmanager(keeper, workdir / "alertmanager", config)


def healer_config(workdir: Path, prometheus: str, alertmanager: str, budget: int) -> dict[str, Any]:
    (workdir / "token").write_text(TOKEN)
    return {
        "server": {"auth": {"bearer_token_file": str(workdir / "token")}, "shutdown_timeout": "2s"},
        "prometheus": {"url": prometheus, "timeout": "2s"},
        "alertmanager": {"url": alertmanager, "timeout": "2s"},
        "store": {"path": str(workdir / "healer.db")},
        "exporter": {"host": False},
        "healing": {
            "budget": {"actions": budget, "window": "10m"},
            "rules": [
                {
                    "name": "storm",
                    "match": ['alertname="FaultActive"'],
                    "strategies": ["record-run"],
                    "max_attempts": 1,
                    "verify": {"within": "1s", "interval": "200ms", "wait_for_prometheus": "5s"},
                }
            ],
        },
        "strategies": {
            "record-run": {
                "type": "exec",
                "command": [sys.executable, "-c", RECORD_RUN, str(workdir / "runs.log"), "{labels.fault}"],
                "timeout": "10s",
            }
        },
    }


def rfc3339(text: str) -> float:
    """Unix seconds of an RFC 3339 timestamp as Prometheus writes it (nanoseconds, Z)."""
    return datetime.fromisoformat(_FRACTION.sub(r"\1", text).replace("Z", "+00:00")).timestamp()


def floor_arrivals(floor: common.Child) -> dict[str, float]:
    """When the floor first got each fault's firing notification."""
    arrivals: dict[str, float] = {}
    for line in floor.log().splitlines():
        if line.startswith('{"event": "alert"'):
            record = json.loads(line)
            if record["status"] == "firing":
                arrivals.setdefault(record["fault"], float(record["t"]))
    return arrivals


def am_alerts(alertmanager: common.Child, alertname: str) -> list[dict[str, Any]]:
    query = urllib.parse.urlencode({"filter": f'alertname="{alertname}"'})
    return list(e2e.get_json(f"{alertmanager.url}/api/v2/alerts?{query}"))


def peak_rss_mb(pid: int) -> float:
    """VmHWM (the peak resident set) of a process, in MB (10**6 bytes)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024 / common.MEGABYTE
    raise RuntimeError(f"no VmHWM in /proc/{pid}/status")


def latency(values: list[float]) -> dict[str, float]:
    return {
        "p50": round(percentile(values, 0.5), 2),
        "p99": round(percentile(values, 0.99), 2),
        "max": round(max(values, default=0.0), 2),
        "count": len(values),
    }


@dataclass
class Report:
    alerts: int
    budget: int
    interval: str
    cpus: int
    load_average: list[float]
    first_firing_after_files_s: float = 0.0
    floor_all_notified_s: float = 0.0
    healer_all_recorded_s: float = 0.0
    healer_all_ended_s: float = 0.0
    take_in_ratio: float = 0.0
    healer_rss_before_mb: float = 0.0
    healer_peak_rss_mb: float = 0.0
    healthy_ms: dict[str, dict[str, float]] = field(default_factory=dict)
    healthy_errors: dict[str, int] = field(default_factory=dict)
    healthy_ratio: dict[str, float] = field(default_factory=dict)
    strategy_runs: int = 0
    episodes: dict[str, int] = field(default_factory=dict)
    healing_suspended: int = 0
    healing_suspended_annotations: dict[str, str] = field(default_factory=dict)
    healing_failed: int = 0
    checks: list[dict[str, Any]] = field(default_factory=list)
    load_average_end: list[float] = field(default_factory=list)


def run(args: argparse.Namespace) -> Report:
    report = Report(
        args.alerts, args.budget, f"{args.interval_ms}ms", os.cpu_count() or 0, [round(x, 2) for x in os.getloadavg()]
    )
    with tempfile.TemporaryDirectory(prefix="bench-storm-") as tmp:
        workdir = Path(tmp)
        keeper = common.Keeper(workdir)
        try:
            faults, app_port = e2e.start_fault_app(keeper, workdir, ["healer"])
            floor = keeper.start("floor", [sys.executable, str(Path(e2e.__file__).resolve()), "_floor"])
            bare = keeper.start("bare", [sys.executable, str(Path(__file__).resolve()), "_bare"])
            common.wait_listening(floor)
            common.wait_listening(bare)
            healer_port = free_port()
            alertmanager = start_alertmanager(
                keeper, workdir, floor.url + WEBHOOK_PATH, f"http://127.0.0.1:{healer_port}{WEBHOOK_PATH}"
            )
            prometheus = e2e.start_prometheus(keeper, workdir, report.interval, app_port, alertmanager)
            home = workdir / "store"  # not a directory named healer: `python -m healer` would import it
            home.mkdir()
            config = healer_config(home, prometheus.url, alertmanager.url, args.budget)
            config_path = common.write_yaml(home / "healer.yml", config)
            healer = common.start_healer(keeper, config_path, listen=f"127.0.0.1:{healer_port}", cwd=home)
            common.wait_listening(healer)
            report.healer_rss_before_mb = round(common.rss_mb(healer.pid), 1)
            storm(report, args, faults["healer"], home, prometheus, alertmanager, floor, bare, healer)
        finally:
            keeper.stop_all()
    report.load_average_end = [round(x, 2) for x in os.getloadavg()]
    add_checks(report)
    return report


def storm(
    report: Report,
    args: argparse.Namespace,
    faults: Path,
    home: Path,
    prometheus: common.Child,
    alertmanager: common.Child,
    floor: common.Child,
    bare: common.Child,
    healer: common.Child,
) -> None:
    """Start the pollers, create every fault file at once, and measure until healer has ended every episode."""
    pollers = {"healer": HealthPoller(healer.url), "bare": HealthPoller(bare.url)}
    for poller in pollers.values():
        poller.start()
    recorded_at: float | None = None
    ended_at: float | None = None
    try:
        created = time.time()
        for index in range(args.alerts):
            (faults / f"storm-{index:04d}").write_text("fault\n")

        def all_ended() -> dict[str, int] | None:
            nonlocal recorded_at, ended_at
            now = time.time()
            counts = e2e.get_json(healer.url + "/api/v1/status", e2e.AUTH)["healing"]["episodes"]
            episodes = {str(state): int(count) for state, count in counts.items()}
            if sum(episodes.values()) < args.alerts:
                return None
            recorded_at = recorded_at or now
            if episodes.get("open"):
                return None
            ended_at = now
            return episodes

        report.episodes = wait_for(all_ended, f"healer to end {args.alerts} episodes", args.timeout, 0.1)
        arrivals = wait_for(
            lambda: (found := floor_arrivals(floor)) and len(found) >= args.alerts and found,
            f"the floor to get {args.alerts} notifications",
            30,
        )
        suspended = wait_for(
            lambda: am_alerts(alertmanager, "HealingSuspended"), "HealingSuspended in Alertmanager", 30, 0.2
        )
    finally:
        for poller in pollers.values():
            poller.stop()
    assert recorded_at is not None and ended_at is not None
    firing = e2e.get_json(prometheus.url + "/api/v1/alerts")["data"]["alerts"]
    first = min(rfc3339(alert["activeAt"]) for alert in firing if alert["labels"].get("alertname") == "FaultActive")
    report.first_firing_after_files_s = round(first - created, 3)
    report.floor_all_notified_s = round(max(arrivals.values()) - first, 3)
    report.healer_all_recorded_s = round(recorded_at - first, 3)
    report.healer_all_ended_s = round(ended_at - first, 3)
    report.take_in_ratio = round(report.healer_all_recorded_s / max(report.floor_all_notified_s, 1e-3), 2)
    report.healer_peak_rss_mb = round(peak_rss_mb(healer.pid), 1)
    for name, poller in pollers.items():
        report.healthy_ms[name] = latency(poller.latencies_ms)
        report.healthy_errors[name] = len(poller.errors)
    for key in ("p50", "p99", "max"):
        report.healthy_ratio[key] = round(
            report.healthy_ms["healer"][key] / max(report.healthy_ms["bare"][key], 1e-3), 2
        )
    runs = home / "runs.log"
    report.strategy_runs = len(runs.read_text().splitlines()) if runs.exists() else 0
    report.healing_suspended = len(suspended)
    report.healing_suspended_annotations = {k: suspended[0]["annotations"][k] for k in ("suspended", "held")}
    report.healing_failed = len(am_alerts(alertmanager, "HealingFailed"))


def add_checks(report: Report) -> None:
    total = sum(report.episodes.values())
    checks = [
        (f"strategy runs <= budget ({report.budget})", report.strategy_runs, report.strategy_runs <= report.budget),
        ("exactly one HealingSuspended in Alertmanager", report.healing_suspended, report.healing_suspended == 1),
        (f"HealingFailed <= budget ({report.budget})", report.healing_failed, report.healing_failed <= report.budget),
        (f"every alert an ended episode ({report.alerts})", total, total == report.alerts),
        ("healer /-/healthy answered every poll", report.healthy_errors.get("healer", -1),
         report.healthy_errors.get("healer") == 0),
    ]  # fmt: skip
    report.checks = [{"check": name, "value": value, "passed": passed} for name, value, passed in checks]


def print_report(report: Report) -> None:
    print(
        f"storm benchmark: {report.alerts} distinct alerts, budget {report.budget} actions/10m, scrape/evaluation"
        f" {report.interval}, {report.cpus} CPUs, load average at start {report.load_average},"
        f" at the end {report.load_average_end}"
    )
    print(f"first alert firing in Prometheus {report.first_firing_after_files_s:.3f} s after the fault files")
    print("from the first alert firing in Prometheus (s):")
    print(f"  floor: every notification received          {report.floor_all_notified_s:8.3f}")
    print(f"  healer: every alert recorded as an episode   {report.healer_all_recorded_s:8.3f}")
    print(f"  healer: every episode ended                  {report.healer_all_ended_s:8.3f}")
    print(f"  take-in healer/floor                         {report.take_in_ratio:8.2f}")
    print(f"healer RSS before the storm {report.healer_rss_before_mb} MB, peak (VmHWM) {report.healer_peak_rss_mb} MB")
    print(f"GET /-/healthy during the storm (ms){'p50':>10}{'p99':>10}{'max':>10}{'polls':>8}{'errors':>8}")
    for name, stats in report.healthy_ms.items():
        print(
            f"  {name:<34}{stats['p50']:>10.2f}{stats['p99']:>10.2f}{stats['max']:>10.2f}"
            f"{int(stats['count']):>8}{report.healthy_errors[name]:>8}"
        )
    ratio = report.healthy_ratio
    print(f"  {'healer/bare':<34}{ratio['p50']:>10.2f}{ratio['p99']:>10.2f}{ratio['max']:>10.2f}")
    print(f"episodes by state: {report.episodes}")
    print(
        f"strategy runs {report.strategy_runs}; in Alertmanager: HealingSuspended {report.healing_suspended}"
        f" {report.healing_suspended_annotations}, HealingFailed {report.healing_failed}"
    )
    print()
    for check in report.checks:
        print(f"{'PASS' if check['passed'] else 'FAIL'}  {check['check']}: {check['value']}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_bare"]:
        return bare_main()
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--alerts", type=int, default=1000, help="distinct alerts fired at once")
    parser.add_argument("--budget", type=int, default=10, help="healing.budget.actions (window 10m)")
    parser.add_argument("--interval-ms", type=int, default=1000, help="Prometheus scrape and evaluation interval")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for every episode to end")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if not (1 <= args.alerts <= 10000 and args.budget >= 1 and 5 <= args.interval_ms <= 5000):
        parser.error("--alerts must be 1..10000, --budget >= 1 and --interval-ms 5..5000")
    # A failed check is reported by its FAIL line; non-zero means the benchmark itself failed.
    return common.emit(run(args), args.json, print_report)


if __name__ == "__main__":
    sys.exit(main())
