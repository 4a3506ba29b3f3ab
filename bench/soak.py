"""Soak healer on the demo's stack: ten minutes with no fault, and ten minutes with one alert flapping.

What it runs
------------
Per mode, a stack of its own on loopback, built as `healer demo` builds its stack (healer/demo.py) and from the
same files: the example app under its supervisor (examples/app); Prometheus scraping it and healer every second
with rules/*.yml and examples/app/rules.yml, their ``for`` durations and range windows divided by 30 as the demo
divides them; Alertmanager with the demo's route (one group per alert, ``group_wait: 0s``, ``group_interval:
1s``, healer's own alerts to a receiver without webhooks); healer on examples/healer.yml with the demo's changes
(dependency checks every 5 s, process scan every 1 s, probes every 2 s, every rule's cooldown 2s and verify within
20s every 1s, the planner every 1 s with only the drift forecast goal, the optimizer every 1 s with the demo's two
batch candidates, whose queues never start here).

Two differences from the demo. The watched process's and the restart signal's command-line regexes name this
stack's app port, so that two stacks side by side, or a demo a test runs meanwhile, never watch or signal each
other's app. And a baseline gets the same traffic as healer: ``bench/soak.py _bare``, a bare aiohttp server in its
own process that Prometheus scrapes every second (prometheus_client's process and GC metrics, as a small
exporter) and that gets every Alertmanager notification (it parses the JSON and answers 200). Its RSS slope is
what Python and aiohttp drift by under that traffic without healer's work.

healthy: no fault. flapping: the app's drift fault (alert ModelDriftHigh, ``for`` 20 s; healer's rule model-drift,
strategy recalibrate-model) is injected; held until healer has fixed it or ``--hold`` seconds passed, when the
benchmark recalibrates the model itself as an operator would (healer leaves a flapping alert alone); waited out
until neither Prometheus nor Alertmanager has the alert; and injected again ``--gap`` seconds later, for the whole
soak. With healer's default ``healing.flapping`` (4 episodes in 10 minutes), the first four episodes are healed,
the fifth escalates once (reason ``flapping:``) and the later ones are recorded only.

Sampling starts ``--warmup`` seconds (60) after the stacks are ready: healer's first process scans, queries and
planner and optimizer cycles allocate once, and a leak is what grows after them.

What it reports
---------------
Every ``--interval`` seconds, per stack: healer's RSS (VmRSS), the store's bytes (healer.db, -wal, -shm), strategy
runs (steps of healing, of goals and optimisation trials, ended or running, from healer's /metrics), escalations
(healer_escalations_total) and the HealingFailed alerts Alertmanager holds, healer's episodes (GET /api/v1/status),
flapping skips (healer_skipped_total{reason="flapping"}) and the baseline's RSS. Then least-squares slopes in MB
per 10 minutes of healer's RSS, the baseline's RSS and the store, healer's RSS slope minus and over the baseline's,
the alerts that fired (from the baseline's log), the episodes by state, and the store after healer stopped (SQLite
folds the write-ahead log into the file then). For flapping, the cycles and who ended them; with both modes, the
store's growth per episode: the flapping store's bytes after stop minus the healthy one's, over the extra episodes.

Checks, for healthy: 0 strategy runs, 0 escalations, healer's RSS slope < 1 MB per 10 minutes.

Usage: ``python bench/soak.py [--minutes 10] [--interval 30] [--mode healthy|flapping|both] [--json]``. ``both``
(the default) runs the two stacks side by side, each with its own Prometheus, Alertmanager, app and healer.
Everything started is stopped by its own PID on exit, also on error, Ctrl-C or SIGTERM. All traffic stays on
127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import signal
import sys
import tempfile
import threading
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

# isort: split
import common  # bench/common.py: `python bench/soak.py` puts bench/ first on sys.path
from common import MEGABYTE, REPO, WEBHOOK_PATH, free_port, wait_for

MODES = ("healthy", "flapping")
# The demo's clock (healer/demo.py TIME_COMPRESSION, MIN_FOR_SECONDS, MIN_RANGE_SECONDS): minutes become seconds.
TIME_COMPRESSION = 30
MIN_FOR_SECONDS = 1.0
MIN_RANGE_SECONDS = 5.0
EXAMPLE_APP_URL = "http://127.0.0.1:8000"
EXAMPLE_DATA_DIR = "/var/tmp/healer-demo"  # the path examples/healer.yml names, replaced here
FORECAST_TEMPLATE = "model-drift-forecast"
FORECAST_TRIGGER = "predict_linear(app_model_drift_score[20s], 120) > 0.3 and app_model_drift_score < 0.3"
# The demo's optimizer candidates: name -> (queue, knob, applied value, rolled-back value, prior confidence).
DEMO_CANDIDATES = {
    "batch-workers": ("reports", "workers", "4", "1", 0.8),
    "batch-prefetch": ("exports", "prefetch", "on", "off", 0.75),
}
# A fault whose fix always works: memory freed by the app is not always given back to the system, so
# ProcessHighMemory can outlast free-memory, and its rule silences the alert, which delays its resolution.
FLAP_FAULT = "drift"
FLAP_ALERT = "ModelDriftHigh"
FLAP_FIX = "/admin/model/recalibrate"
RSS_TARGET_MB_PER_10_MIN = 1.0
TEN_MINUTES = 600.0
_DURATION_PART = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
_UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 365 * 86400}
_RANGE = re.compile(r"\[(\d+(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*)(:[^\]]*)?\]")


# --------------------------------------------------------------------------- the demo's configuration


def compress(duration: str, minimum: float) -> str:
    """A Prometheus duration divided by TIME_COMPRESSION, at least `minimum` seconds, in whole milliseconds."""
    seconds = sum(int(count) * _UNIT_SECONDS[unit] for count, unit in _DURATION_PART.findall(duration))
    millis = round(max(seconds / TIME_COMPRESSION, minimum) * 1000)
    return f"{millis // 1000}s" if millis % 1000 == 0 else f"{millis}ms"


def compressed_rules(path: Path) -> dict[str, Any]:
    """A rule file with every ``for`` and every range selector compressed, as the demo loads it."""
    document: dict[str, Any] = yaml.safe_load(path.read_text())
    for group in document.get("groups", []):
        for rule in group.get("rules", []):
            if "for" in rule:
                rule["for"] = compress(rule["for"], MIN_FOR_SECONDS)
            rule["expr"] = _RANGE.sub(
                lambda m: f"[{compress(m.group(1), MIN_RANGE_SECONDS)}{m.group(2) or ''}]", str(rule["expr"])
            )
    return document


def demo_optimizer(app_url: str) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """The demo's optimizer candidates on the app's batch queues and the http strategies they apply and undo."""
    candidates: list[dict[str, Any]] = []
    strategies: dict[str, dict[str, Any]] = {}
    for name, (queue, knob, applied, undone, prior) in DEMO_CANDIDATES.items():
        for value in (applied, undone):
            url = f"{app_url}/admin/batch/{queue}/{knob}/{value}"
            strategies[f"{name}-{value}"] = {"type": "http", "method": "POST", "url": url, "timeout": "5s"}
        candidates.append(
            {
                "name": name,
                "component": f"batch-{queue}",
                "metric": f'app_batch_duration_seconds{{queue="{queue}"}}',
                "direction": "decrease",
                "apply": f"{name}-{applied}",
                "rollback": f"{name}-{undone}",
                "expected_improvement": 0.5,
                "cost": 1,
                "confidence": prior,
                "window": "3s",
                "settle": "2s",
                "min_improvement": 0.1,
                "cooldown": "10m",
            }
        )
    return candidates, strategies


@dataclass
class Stack:
    """One mode's processes and where they listen."""

    mode: str
    workdir: Path
    keeper: common.Keeper
    app_port: int = field(default_factory=free_port)
    healer_port: int = field(default_factory=free_port)
    token: str = field(default_factory=lambda: secrets.token_urlsafe(24))
    children: dict[str, common.Child] = field(default_factory=dict)

    @property
    def token_file(self) -> Path:
        return self.workdir / "token"

    @property
    def home(self) -> Path:
        # Not a directory named healer: `python -m healer` run in it would import it.
        return self.workdir / "store"

    @property
    def app_url(self) -> str:
        return f"http://127.0.0.1:{self.app_port}"

    @property
    def healer_url(self) -> str:
        return f"http://127.0.0.1:{self.healer_port}"

    def url(self, name: str) -> str:
        return self.children[name].url

    def healer_json(self, path: str) -> Any:
        """healer's JSON answer to ``GET path``, read with its token."""
        return get_json(self.healer_url + path, headers={"Authorization": f"Bearer {self.token}"})

    def store_files(self) -> list[Path]:
        database = self.home / "healer.db"
        return [database, Path(f"{database}-wal"), Path(f"{database}-shm")]

    def store_bytes(self) -> tuple[int, int]:
        """The store's total bytes (file, -wal, -shm) and its write-ahead log's."""
        sizes = [path.stat().st_size if path.exists() else 0 for path in self.store_files()]
        return sum(sizes), sizes[1]


def healer_config(stack: Stack) -> dict[str, Any]:
    """examples/healer.yml with the demo's changes (healer/demo.py healer_config), and regexes naming this app."""
    config: dict[str, Any] = yaml.safe_load((REPO / "examples" / "healer.yml").read_text())
    data_dir = str(stack.workdir / "app-data")
    config["server"].update(listen=f"127.0.0.1:{stack.healer_port}", auth={"bearer_token_file": str(stack.token_file)})
    config["prometheus"].update(url=stack.url("prometheus"), check_interval="5s")
    config["alertmanager"].update(url=stack.url("alertmanager"), check_interval="5s")
    config["store"]["path"] = str(stack.home / "healer.db")
    exporter = config["exporter"]
    exporter["process_scan_interval"] = "1s"
    # The app and its supervisor both run with `--port PORT` first: the port tells this stack's app apart.
    this_app = f" --port {stack.app_port} "
    for process in exporter["processes"]:
        process["cmdline"] += this_app
    for probe in exporter["probes"]:
        probe.update(url=probe["url"].replace(EXAMPLE_APP_URL, stack.app_url), interval="2s", timeout="2s")
    for rule in config["healing"]["rules"]:
        rule.update(cooldown="2s", verify={"within": "20s", "interval": "1s"})
    planner = config.setdefault("planner", {})
    planner["interval"] = "1s"
    planner["goals"] = [
        {**template, "trigger": FORECAST_TRIGGER, "settle": "5s", "deadline": "2m"}
        for template in planner.get("goals", [])
        if template["name"] == FORECAST_TEMPLATE
    ]
    candidates, optimizer_strategies = demo_optimizer(stack.app_url)
    config["optimizer"] = {**config.get("optimizer", {}), "enabled": True, "interval": "1s", "candidates": candidates}
    for strategy in config["strategies"].values():
        if strategy["type"] == "http":
            strategy["url"] = strategy["url"].replace(EXAMPLE_APP_URL, stack.app_url)
        if strategy["type"] == "exec":
            strategy["command"] = [data_dir if part == EXAMPLE_DATA_DIR else part for part in strategy["command"]]
        if strategy["type"] == "signal":
            strategy["cmdline"] += this_app
    config["strategies"].update(optimizer_strategies)
    return config


def alertmanager_config(stack: Stack) -> dict[str, Any]:
    """The demo's Alertmanager route, with every notification also sent to the baseline first."""
    return {
        "route": {
            "receiver": "healer",
            "group_by": ["..."],
            "group_wait": "0s",
            "group_interval": "1s",
            "repeat_interval": "1h",
            # A route that matched (the baseline's) keeps the alert from the default receiver: healer's is explicit.
            "routes": [
                {"receiver": "bare", "continue": True},
                {"matchers": ['alertname=~"Healing(Failed|Suspended)|Healer.*"'], "receiver": "humans"},
                {"receiver": "healer"},
            ],
        },
        "receivers": [
            {
                "name": "healer",
                "webhook_configs": [
                    {
                        "url": stack.healer_url + WEBHOOK_PATH,
                        "send_resolved": True,
                        "http_config": {"authorization": {"credentials_file": str(stack.token_file)}},
                    }
                ],
            },
            {"name": "bare", "webhook_configs": [{"url": stack.url("bare") + WEBHOOK_PATH, "send_resolved": True}]},
            {"name": "humans"},
        ],
    }


def prometheus_config(stack: Stack, rules_dir: Path) -> dict[str, Any]:
    """The demo's Prometheus (1 s scrape and evaluation), scraping the baseline too."""
    targets = {"healer": stack.healer_url, "app": stack.app_url, "bare": stack.url("bare")}
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules_dir / "*.yml")],
        "alerting": {
            "alertmanagers": [{"static_configs": [{"targets": [stack.url("alertmanager").removeprefix("http://")]}]}]
        },
        "scrape_configs": [
            {
                "job_name": job,
                "static_configs": [{"targets": [url.removeprefix("http://")]}],
                # healer's reads, /metrics included, may need its token.
                **({"authorization": {"credentials_file": str(stack.token_file)}} if job == "healer" else {}),
            }
            for job, url in targets.items()
        ],
    }


def start_stack(stack: Stack) -> None:
    """Start the stack's baseline, Alertmanager, Prometheus, app and healer; wait until Prometheus scrapes them.

    The caller stops them with ``stack.keeper.stop_all()``, also when this fails half-way.
    """
    workdir = stack.workdir
    stack.home.mkdir(parents=True)
    stack.token_file.write_text(stack.token)
    stack.token_file.chmod(0o600)
    rules_dir = workdir / "rules"
    rules_dir.mkdir()
    for source in [*sorted((REPO / "rules").glob("*.yml")), REPO / "examples" / "app" / "rules.yml"]:
        common.write_yaml(rules_dir / f"{source.parent.name}-{source.name}", compressed_rules(source))

    keeper = stack.keeper
    stack.children["bare"] = keeper.start("bare", [sys.executable, str(Path(__file__).resolve()), "_bare"])
    common.wait_listening(stack.children["bare"])
    stack.children["alertmanager"] = common.start_alertmanager(
        keeper, workdir / "alertmanager", alertmanager_config(stack)
    )
    stack.children["prometheus"] = common.start_prometheus(
        keeper, workdir / "prometheus", prometheus_config(stack, rules_dir)
    )
    app_argv = [sys.executable, "-m", "examples.app.supervise", "--port", str(stack.app_port)]
    app_argv += ["--data-dir", str(workdir / "app-data"), "--data-limit-bytes", str(64 * 1024 * 1024)]
    stack.children["app"] = keeper.start("app", app_argv, cwd=REPO)
    common.wait_ready(stack.children["app"], stack.app_url, "/healthz")
    config_path = common.write_yaml(stack.home / "healer.yml", healer_config(stack))
    healer = common.start_healer(keeper, config_path, listen=f"127.0.0.1:{stack.healer_port}", cwd=stack.home)
    stack.children["healer"] = healer
    common.wait_listening(healer)

    def scraped() -> bool:
        up = query(stack, 'min(up{job=~"healer|app|bare"})')
        return up == 1.0 and query(stack, 'healer_process_up{process="web"}') == 1.0

    what = f"{stack.mode}: Prometheus scraping healer, the app and the baseline, and healer watching the app"
    wait_for(scraped, what, 60)


def query(stack: Stack, expr: str) -> float | None:
    """The first value of an instant query in the stack's Prometheus; None when it returns nothing."""
    url = f"{stack.url('prometheus')}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
    result = get_json(url)["data"]["result"]
    return float(result[0]["value"][1]) if result else None


def get_json(url: str, method: str = "GET", headers: dict[str, str] | None = None) -> Any:
    """The JSON answer of a GET, or of a POST with an empty body; an error status raises RuntimeError."""
    status, body = common.http_get(url, headers=headers) if method == "GET" else common.http_post(url)
    if status != 200:
        raise RuntimeError(f"{method} {url}: HTTP {status}: {body[:300]!r}")
    return json.loads(body)


def notified(stack: Stack, status: str) -> dict[str, int]:
    """How many notifications of each alert with `status` the baseline got (the same as healer got)."""
    counts: dict[str, int] = {}
    for line in stack.children["bare"].log().splitlines():
        if line.startswith('{"event": "alert"'):
            record = json.loads(line)
            if record["status"] == status:
                counts[record["alertname"]] = counts.get(record["alertname"], 0) + 1
    return counts


def prometheus_alerts(stack: Stack, alertname: str) -> list[dict[str, Any]]:
    """The alerts named `alertname` that the stack's Prometheus has pending or firing."""
    alerts = get_json(f"{stack.url('prometheus')}/api/v1/alerts")["data"]["alerts"]
    return [alert for alert in alerts if alert["labels"].get("alertname") == alertname]


def am_alerts(stack: Stack, alertname: str) -> list[dict[str, Any]]:
    """The active alerts named `alertname` that the stack's Alertmanager holds."""
    filters = urllib.parse.urlencode({"filter": f'alertname="{alertname}"', "active": "true"})
    return list(get_json(f"{stack.url('alertmanager')}/api/v2/alerts?{filters}"))


# --------------------------------------------------------------------------- the baseline and the flapping


def bare_main() -> int:
    """Child process: the baseline, a bare aiohttp exporter of its own process metrics and webhook receiver."""
    from aiohttp import web
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def webhook(request: web.Request) -> web.Response:
        for alert in json.loads(await request.read())["alerts"]:
            # The soak reports which alerts fired from these lines.
            print(json.dumps({"event": "alert", "alertname": alert["labels"]["alertname"], "status": alert["status"]}))
        sys.stdout.flush()
        return web.Response(text="ok\n")

    app = web.Application()
    app.router.add_get("/metrics", metrics)
    app.router.add_post(WEBHOOK_PATH, webhook)
    common.serve_on_loopback(app)
    return 0


@dataclass
class FlapCounts:
    cycles: int = 0  # injected, fired, fixed and resolved
    fixed_by_healer: int = 0
    fixed_by_bench: int = 0
    incomplete: list[str] = field(default_factory=list)  # the wait of each cycle that ran past its deadline
    cycle_seconds: list[float] = field(default_factory=list)


class Flapper(threading.Thread):
    """Makes FLAP_ALERT fire and resolve, again and again, until stopped."""

    def __init__(self, stack: Stack, hold: float, gap: float) -> None:
        super().__init__(daemon=True, name="flapper")
        self.stack, self.hold, self.gap = stack, hold, gap
        self.counts = FlapCounts()
        self.stopping = threading.Event()
        self.error: Exception | None = None

    def run(self) -> None:
        try:
            while not self.stopping.is_set():
                self.cycle()
                self.stopping.wait(self.gap)  # paces the load; no wait below relies on it
        except Exception as exc:  # reported by the main thread, which stops the stacks
            self.error = exc

    def faulty(self) -> bool:
        return bool(get_json(f"{self.stack.app_url}/admin/status")["faults"][FLAP_FAULT])

    def cycle(self) -> None:
        started = time.monotonic()
        app, counts = self.stack.app_url, self.counts
        get_json(f"{app}/admin/fault/{FLAP_FAULT}", "POST")
        try:
            wait_for(lambda: am_alerts(self.stack, FLAP_ALERT), f"{FLAP_ALERT} firing", 60, 0.2)
            try:
                wait_for(lambda: not self.faulty(), "healer to fix the fault", self.hold, 0.2)
                counts.fixed_by_healer += 1
            except TimeoutError:
                get_json(app + FLAP_FIX, "POST")
                counts.fixed_by_bench += 1

            def resolved() -> bool:
                return not prometheus_alerts(self.stack, FLAP_ALERT) and not am_alerts(self.stack, FLAP_ALERT)

            wait_for(resolved, f"{FLAP_ALERT} resolved in Prometheus and Alertmanager", 120, 0.2)
        except TimeoutError as exc:
            counts.incomplete.append(f"{time.monotonic() - started:.0f} s into the cycle: {exc}")
            get_json(app + FLAP_FIX, "POST")
            return
        counts.cycles += 1
        counts.cycle_seconds.append(time.monotonic() - started)

    def stop(self) -> None:
        self.stopping.set()
        self.join(180)


# --------------------------------------------------------------------------- sampling and figures


@dataclass
class Sample:
    seconds: float
    healer_rss_mb: float
    bare_rss_mb: float
    store_bytes: int
    wal_bytes: int
    runs: int
    escalations: int
    healing_failed: int
    alerts_received: int
    episodes: int
    flapping_skips: int


def take_sample(stack: Stack, t0: float) -> Sample:
    text = common.metrics_text(stack.healer_url, headers={"Authorization": f"Bearer {stack.token}"})

    def total(name: str, labels: dict[str, str] | None = None) -> int:
        return round(common.sample_sum(text, name, labels))

    runs = sum(
        total(name)
        for name in (
            "healer_actions_total",  # healing steps ended
            "healer_actions_running",
            "healer_goal_steps_total",
            "healer_optimizations_total",  # trials ended
            "healer_optimization_in_flight",
        )
    )
    status = stack.healer_json("/api/v1/status")["healing"]
    store, wal = stack.store_bytes()
    return Sample(
        seconds=round(time.monotonic() - t0, 1),
        healer_rss_mb=round(common.rss_mb(stack.children["healer"].pid), 2),
        bare_rss_mb=round(common.rss_mb(stack.children["bare"].pid), 2),
        store_bytes=store,
        wal_bytes=wal,
        runs=runs,
        escalations=total("healer_escalations_total"),
        healing_failed=len(am_alerts(stack, "HealingFailed")),
        alerts_received=total("healer_alerts_received_total", {"status": "firing"}),
        episodes=sum(int(count) for count in status["episodes"].values()),
        flapping_skips=total("healer_skipped_total", {"reason": "flapping"}),
    )


def slope_per_10_min(xs: list[float], ys: list[float]) -> float:
    """The least-squares slope of ys over xs (seconds), per 10 minutes; 0.0 for fewer than two points."""
    if len(xs) < 2:
        return 0.0
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    if spread == 0:
        return 0.0
    return sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread * TEN_MINUTES


@dataclass
class ModeReport:
    mode: str
    samples: list[Sample] = field(default_factory=list)
    healer_rss_slope: float = 0.0  # MB per 10 minutes
    healer_rss_slope_second_half: float = 0.0
    bare_rss_slope: float = 0.0
    rss_slope_minus_baseline: float = 0.0
    rss_slope_ratio: float | None = None  # None when the baseline's slope is too flat to divide by
    store_slope: float = 0.0
    store_bytes_after_stop: int = 0
    runs: int = 0
    escalations: int = 0
    healing_failed: int = 0
    alerts_received: int = 0
    episodes: int = 0
    flapping_skips: int = 0
    firing_by_alert: dict[str, int] = field(default_factory=dict)  # the firing notifications healer got
    episode_states: dict[str, int] = field(default_factory=dict)
    flaps: FlapCounts | None = None
    actions: list[str] = field(default_factory=list)  # strategy and outcome of each healing step
    checks: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class Report:
    minutes: float
    interval: float
    cpus: int
    load_average: list[float]
    modes: list[ModeReport] = field(default_factory=list)
    flapping_bytes_per_episode_over_healthy: float | None = None
    load_average_end: list[float] = field(default_factory=list)


def figures(report: ModeReport) -> None:
    """Slopes, totals and checks from the samples."""
    samples = report.samples
    xs = [s.seconds for s in samples]
    report.healer_rss_slope = round(slope_per_10_min(xs, [s.healer_rss_mb for s in samples]), 3)
    half = samples[len(samples) // 2 :]
    report.healer_rss_slope_second_half = round(
        slope_per_10_min([s.seconds for s in half], [s.healer_rss_mb for s in half]), 3
    )
    report.bare_rss_slope = round(slope_per_10_min(xs, [s.bare_rss_mb for s in samples]), 3)
    report.rss_slope_minus_baseline = round(report.healer_rss_slope - report.bare_rss_slope, 3)
    # Below 0.01 MB per 10 minutes the baseline is flat: a ratio to it would only say how flat.
    if abs(report.bare_rss_slope) >= 0.01:
        report.rss_slope_ratio = round(report.healer_rss_slope / report.bare_rss_slope, 2)
    report.store_slope = round(slope_per_10_min(xs, [s.store_bytes / MEGABYTE for s in samples]), 3)
    last = samples[-1]
    report.runs, report.escalations, report.healing_failed = last.runs, last.escalations, last.healing_failed
    report.alerts_received, report.flapping_skips = last.alerts_received, last.flapping_skips
    # The states were read at the end, as the store's size was: the last sample may have missed an episode.
    report.episodes = sum(report.episode_states.values()) if report.episode_states else last.episodes
    if report.mode == "healthy":
        checks = [
            ("strategy runs == 0", report.runs, report.runs == 0),
            ("escalations == 0", report.escalations, report.escalations == 0),
            (
                f"healer RSS slope < {RSS_TARGET_MB_PER_10_MIN:g} MB per 10 min",
                report.healer_rss_slope,
                report.healer_rss_slope < RSS_TARGET_MB_PER_10_MIN,
            ),
        ]
        report.checks = [{"check": name, "value": value, "passed": passed} for name, value, passed in checks]


def healing_steps(stack: Stack) -> list[str]:
    """Each healing step of the soak as 'strategy outcome', oldest first."""
    actions = stack.healer_json("/api/v1/actions?limit=500")["actions"]
    return [f"{a['strategy']} {a.get('outcome') or a.get('state')}" for a in reversed(actions)]


def run(args: argparse.Namespace) -> Report:
    modes = list(MODES) if args.mode == "both" else [args.mode]
    report = Report(args.minutes, args.interval, os.cpu_count() or 0, [round(x, 2) for x in os.getloadavg()])
    reports = {mode: ModeReport(mode) for mode in modes}
    stacks: dict[str, Stack] = {}
    flapper: Flapper | None = None
    with tempfile.TemporaryDirectory(prefix="bench-soak-") as tmp:
        try:
            for mode in modes:
                (Path(tmp) / mode).mkdir()
                stacks[mode] = Stack(mode, Path(tmp) / mode, common.Keeper(Path(tmp) / mode))
                start_stack(stacks[mode])
                print(f"{mode}: stack ready, healer {stacks[mode].healer_url}", file=sys.stderr, flush=True)
            # healer's first process scans, queries and planner cycles allocate once; a leak shows after them.
            time.sleep(args.warmup)
            if "flapping" in stacks:
                flapper = Flapper(stacks["flapping"], args.hold, args.gap)
            t0 = time.monotonic()
            if flapper is not None:
                flapper.start()
            rounds = int(args.minutes * 60 // args.interval)
            for index in range(rounds + 1):
                # Paces the samples; each sample reads the state as it is, so nothing waits on this.
                time.sleep(max(0.0, t0 + index * args.interval - time.monotonic()))
                if flapper is not None and flapper.error is not None:
                    raise flapper.error
                for mode, stack in stacks.items():
                    for child in stack.children.values():
                        if error := child.exit_error():
                            raise error
                    sample = take_sample(stack, t0)
                    reports[mode].samples.append(sample)
                    print(f"{mode}: {sample}", file=sys.stderr, flush=True)
            if flapper is not None:
                flapper.stop()
                reports["flapping"].flaps = flapper.counts
            for mode, stack in stacks.items():
                reports[mode].actions = healing_steps(stack)
                reports[mode].firing_by_alert = notified(stack, "firing")
                reports[mode].episode_states = stack.healer_json("/api/v1/status")["healing"]["episodes"]
                stack.children["healer"].stop()
                reports[mode].store_bytes_after_stop, _ = stack.store_bytes()
                figures(reports[mode])
        finally:
            if flapper is not None:
                flapper.stopping.set()
            for stack in stacks.values():
                stack.keeper.stop_all()
    report.modes = [reports[mode] for mode in modes]
    if len(modes) == 2:
        healthy, flapping = reports["healthy"], reports["flapping"]
        extra_episodes = flapping.episodes - healthy.episodes
        if extra_episodes > 0:
            extra_bytes = flapping.store_bytes_after_stop - healthy.store_bytes_after_stop
            report.flapping_bytes_per_episode_over_healthy = round(extra_bytes / extra_episodes)
    report.load_average_end = [round(x, 2) for x in os.getloadavg()]
    return report


def print_report(report: Report) -> None:
    print(
        f"soak benchmark: {report.minutes:g} min, a sample every {report.interval:g} s, {report.cpus} CPUs,"
        f" load average at start {report.load_average}, at the end {report.load_average_end}"
    )
    for mode in report.modes:
        print(f"\n== {mode.mode}")
        print(
            f"  {'t (s)':>6} {'healer RSS':>10} {'bare RSS':>9} {'store kB':>9} {'wal kB':>8} {'runs':>5}"
            f" {'escal.':>6} {'HealingFailed':>13} {'alerts':>6} {'episodes':>8} {'flap skips':>10}"
        )
        for s in mode.samples:
            print(
                f"  {s.seconds:>6.0f} {s.healer_rss_mb:>10.2f} {s.bare_rss_mb:>9.2f} {s.store_bytes / 1000:>9.0f}"
                f" {s.wal_bytes / 1000:>8.0f} {s.runs:>5} {s.escalations:>6} {s.healing_failed:>13}"
                f" {s.alerts_received:>6} {s.episodes:>8} {s.flapping_skips:>10}"
            )
        ratio = "n/a (baseline flat)" if mode.rss_slope_ratio is None else f"{mode.rss_slope_ratio:g}"
        print(f"  slopes (MB per 10 min): healer RSS {mode.healer_rss_slope:+.3f}"
              f" (second half {mode.healer_rss_slope_second_half:+.3f}), baseline (bare aiohttp) RSS"
              f" {mode.bare_rss_slope:+.3f}, healer - baseline {mode.rss_slope_minus_baseline:+.3f},"
              f" healer/baseline {ratio}; store {mode.store_slope:+.3f}")  # fmt: skip
        print(
            f"  store after healer stopped (the write-ahead log folded in): {mode.store_bytes_after_stop / 1000:.0f} kB"
        )
        print(
            f"  strategy runs {mode.runs}, escalations {mode.escalations}, HealingFailed in Alertmanager"
            f" {mode.healing_failed}, firing alerts received {mode.alerts_received}, episodes {mode.episode_states},"
            f" flapping skips {mode.flapping_skips}"
        )
        if mode.firing_by_alert:
            print(f"  firing notifications by alert: {mode.firing_by_alert}")
        if mode.actions:
            print(f"  healing steps: {', '.join(mode.actions)}")
        if mode.flaps is not None:
            flaps, seconds = mode.flaps, mode.flaps.cycle_seconds
            mean = sum(seconds) / len(seconds) if seconds else 0.0
            print(
                f"  flapping: {flaps.cycles} cycles of {FLAP_ALERT} (mean {mean:.1f} s), fixed by healer"
                f" {flaps.fixed_by_healer}, by the benchmark {flaps.fixed_by_bench}, incomplete {len(flaps.incomplete)}"
            )
            for note in flaps.incomplete:
                print(f"    incomplete: {note}")
        for check in mode.checks:
            print(f"  {'PASS' if check['passed'] else 'FAIL'}  {check['check']}: {check['value']}")
    if report.flapping_bytes_per_episode_over_healthy is not None:
        print(
            f"\nstore growth per episode, flapping over healthy (after stop):"
            f" {report.flapping_bytes_per_episode_over_healthy / 1000:.1f} kB"
        )


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_bare"]:
        return bare_main()
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0, help="length of the soak")
    parser.add_argument("--interval", type=float, default=30.0, help="seconds between samples")
    parser.add_argument("--mode", choices=[*MODES, "both"], default="both", help="both: side by side")
    parser.add_argument("--warmup", type=float, default=60.0, help="seconds the stacks run before the first sample")
    parser.add_argument("--hold", type=float, default=15.0, help="seconds the fault waits for healer's fix")
    parser.add_argument("--gap", type=float, default=5.0, help="seconds between a resolution and the next fault")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if not (args.minutes > 0 and 1 <= args.interval <= args.minutes * 60 and args.hold > 0):
        parser.error("--minutes must be > 0, --interval 1..the soak's length and --hold > 0")
    if min(args.gap, args.warmup) < 0:
        parser.error("--gap and --warmup must be >= 0")
    # SIGTERM unwinds like Ctrl-C, so that every child is stopped by its PID.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    # A failed check is reported by its FAIL line; non-zero means the benchmark itself failed.
    return common.emit(run(args), args.json, print_report)


if __name__ == "__main__":
    sys.exit(main())
