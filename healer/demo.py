"""`healer demo`: a real stack on loopback, real faults, healed and verified while you watch.

It starts Prometheus and Alertmanager (the binaries on PATH), the example app under its
supervisor, and healer, all on free loopback ports with the configs from `examples/` and the
rules from `rules/`. The rules' `for` durations and range windows are compressed (divided by
`TIME_COMPRESSION`) so that a fault fires, heals and clears within seconds instead of minutes;
thresholds and expressions are otherwise the shipped ones.

The optimizer runs too, with the demo's own candidates on the app's batch queues (the example's
web-caching candidate would toggle the cache that the latency scenario breaks): a queue's batch
job starts only when its scenario starts, so a candidate has no data, and is not tried, before.
Its `window` and `settle` are seconds, the app's batch duration being a gauge with no range.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

import yaml

from healer.durations import format_duration, parse_duration

TIME_COMPRESSION = 30
EXAMPLE_DATA_DIR = "/var/tmp/healer-demo"  # noqa: S108 - the path examples/healer.yml names, replaced here
MIN_RANGE_SECONDS = 5.0
MIN_FOR_SECONDS = 1.0
SCENARIO_TIMEOUT = 120.0
MISSING_BINARIES = (
    "healer demo needs Prometheus and Alertmanager on PATH (`prometheus`, and `alertmanager` or "
    "Debian's `prometheus-alertmanager`).\nOn Debian or Ubuntu: sudo apt-get install prometheus prometheus-alertmanager"
)


class DemoError(Exception):
    """The demo cannot run; the message says why and what to do."""


@dataclass(frozen=True)
class Scenario:
    """One fault the example app can suffer, and the alert that healing answers.

    A scenario with a `goal` shows the planner instead: the goal of that template must reach its
    target before `alert` fires. A scenario with a `candidate` shows the optimizer: the app's batch
    queue `queue` starts, and the candidate's trial must end `expect`.
    """

    name: str
    alert: str
    story: str
    goal: str | None = None
    candidate: str | None = None
    queue: str | None = None
    expect: str | None = None

    @property
    def success(self) -> str:
        """The outcome that means the scenario showed what it should."""
        return self.expect or ("completed" if self.goal else "healed")


SCENARIOS = (
    Scenario("memory-leak", "ProcessHighMemory", "the app leaks 400 MiB of memory"),
    Scenario("cpu-burn", "ProcessHighCpu", "a runaway loop keeps a CPU busy"),
    Scenario("disk-fill", "AppDataDirFull", "scratch files fill the app's data directory"),
    Scenario("crash", "ProcessDown", "the app crashes"),
    Scenario("errors", "AppHighErrorRate", "a corrupted cache makes every request fail"),
    Scenario("latency", "AppHighLatency", "the cache is switched off and requests slow down"),
    Scenario(
        "drift-creep",
        "ModelDriftHigh",
        "the model drifts slowly toward ModelDriftHigh; a forecast goal recalibrates it before the alert",
        goal="model-drift-forecast",
    ),
    Scenario("drift", "ModelDriftHigh", "the model drifts away from its calibration"),
    Scenario(
        "tune-workers",
        "",
        "a batch queue processes one item at a time; the optimizer tries four workers",
        candidate="batch-workers",
        queue="reports",
        expect="kept",
    ),
    Scenario(
        "tune-prefetch",
        "",
        "another queue gets read-ahead, which cannot speed up a job bound by processing",
        candidate="batch-prefetch",
        queue="exports",
        expect="rolled_back",
    ),
)
FORECAST_TEMPLATE = "model-drift-forecast"
# The template's trigger with the demo's compressed time: a 20s trend projected 2 minutes ahead.
FORECAST_TRIGGER = "predict_linear(app_model_drift_score[20s], 120) > 0.3 and app_model_drift_score < 0.3"
SCENARIO_NAMES = tuple(s.name for s in SCENARIOS)
BATCH_METRIC = 'app_batch_duration_seconds{{queue="{queue}"}}'
# Seconds: the app's batch duration is a gauge, so the "after" window needs no settle for a range.
OPTIMIZER_WINDOW = "3s"
OPTIMIZER_SETTLE = "2s"


def demo_candidates(app_url: str) -> tuple[list[dict[str, Any]], dict[str, dict[str, Any]]]:
    """The optimizer's candidates of the demo and the http strategies that apply and roll them back."""
    knobs = {
        # name: (queue, knob, applied value, rolled-back value, prior confidence)
        "batch-workers": ("reports", "workers", "4", "1", 0.8),
        "batch-prefetch": ("exports", "prefetch", "on", "off", 0.75),
    }
    candidates: list[dict[str, Any]] = []
    strategies: dict[str, dict[str, Any]] = {}
    for name, (queue, knob, applied, undone, prior) in knobs.items():
        for value in (applied, undone):
            strategies[f"{name}-{value}"] = {
                "type": "http",
                "method": "POST",
                "url": f"{app_url}/admin/batch/{queue}/{knob}/{value}",
                "timeout": "5s",
            }
        candidates.append(
            {
                "name": name,
                "component": f"batch-{queue}",
                "metric": BATCH_METRIC.format(queue=queue),
                "direction": "decrease",
                "apply": f"{name}-{applied}",
                "rollback": f"{name}-{undone}",
                "expected_improvement": 0.5,
                "cost": 1,
                "confidence": prior,
                "window": OPTIMIZER_WINDOW,
                "settle": OPTIMIZER_SETTLE,
                "min_improvement": 0.1,
                "cooldown": "10m",
            }
        )
    return candidates, strategies


@dataclass
class Result:
    scenario: str
    alert: str
    outcome: str
    strategies: list[str] = field(default_factory=list)
    seconds_to_fire: float | None = None
    seconds_to_heal: float | None = None
    seconds_from_alert: float | None = None
    expected: str = "healed"
    candidate: str | None = None
    before: float | None = None
    after: float | None = None
    confidence_before: float | None = None
    confidence_after: float | None = None


# -- configuration -----------------------------------------------------------------------------

_RANGE = re.compile(r"\[(\d+(?:ms|[smhdwy])(?:\d+(?:ms|[smhdwy]))*)(:[^\]]*)?\]")


def compress(duration: str, minimum: float) -> str:
    """Divide a Prometheus duration by TIME_COMPRESSION, not going below `minimum` seconds."""
    return format_duration(max(parse_duration(duration) / TIME_COMPRESSION, minimum))


def compress_rules(document: dict[str, Any]) -> dict[str, Any]:
    """Return a rule file with every `for` and every range selector compressed in time."""
    for group in document.get("groups", []):
        for rule in group.get("rules", []):
            if "for" in rule:
                rule["for"] = compress(rule["for"], MIN_FOR_SECONDS)
            rule["expr"] = _RANGE.sub(
                lambda m: f"[{compress(m.group(1), MIN_RANGE_SECONDS)}{m.group(2) or ''}]", str(rule["expr"])
            )
    return document


def source_tree() -> Path:
    """The checkout that holds rules/ and examples/, which the demo needs beside the package."""
    root = Path(__file__).resolve().parent.parent
    if not (root / "rules").is_dir() or not (root / "examples" / "app").is_dir():
        raise DemoError(f"healer demo runs from a source checkout with rules/ and examples/; not found under {root}")
    return root


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Ports:
    prometheus: int = field(default_factory=free_port)
    alertmanager: int = field(default_factory=free_port)
    healer: int = field(default_factory=free_port)
    app: int = field(default_factory=free_port)


@dataclass(frozen=True)
class Credentials:
    """The demo's credentials, each in a file readable by its user only: Alertmanager's token, a viewer token
    (Prometheus's scrape and the demo's own reads) and the console user's password; `web_config` lists them."""

    alertmanager_token: Path
    viewer_token: Path
    console_password: Path
    web_config: Path

    # The console's operator, who signs in with the password in `console_password`.
    USER = "demo"

    @classmethod
    def create(cls, workdir: Path) -> Credentials:
        import bcrypt  # a dependency of healer's access control; imported here so that the demo's import is cheap

        def secret(name: str) -> Path:
            path = workdir / name
            path.write_text(secrets.token_urlsafe(24) + "\n")
            path.chmod(0o600)
            return path

        made = cls(
            secret("alertmanager.token"), secret("viewer.token"), secret("console.password"), workdir / "web.yml"
        )
        hashed = bcrypt.hashpw(made.console_password.read_text().strip().encode(), bcrypt.gensalt(rounds=10))
        web = {
            "basic_auth_users": {cls.USER: hashed.decode()},
            "healer_roles": {cls.USER: "operator"},
            "healer_tokens": [
                {"name": "alertmanager", "file": str(made.alertmanager_token), "role": "alertmanager"},
                {"name": "demo-viewer", "file": str(made.viewer_token), "role": "viewer"},
            ],
        }
        made.web_config.write_text(yaml.safe_dump(web))
        made.web_config.chmod(0o600)
        return made

    def reader(self) -> dict[str, str]:
        """The header that reads healer's API (its reads need a viewer)."""
        return {"Authorization": f"Bearer {self.viewer_token.read_text().strip()}"}


def healer_config(root: Path, workdir: Path, ports: Ports, credentials: Credentials, data_dir: Path) -> dict[str, Any]:
    """examples/healer.yml with the demo's ports, paths, credentials and short verification times."""
    config: dict[str, Any] = yaml.safe_load((root / "examples" / "healer.yml").read_text())
    app_url = f"http://127.0.0.1:{ports.app}"
    config["server"].update(listen=f"127.0.0.1:{ports.healer}", web_config_file=str(credentials.web_config))
    config["prometheus"].update(url=f"http://127.0.0.1:{ports.prometheus}", check_interval="5s")
    config["alertmanager"].update(url=f"http://127.0.0.1:{ports.alertmanager}", check_interval="5s")
    config["store"]["path"] = str(workdir / "healer.db")
    exporter = config["exporter"]
    exporter["process_scan_interval"] = "1s"
    for probe in exporter["probes"]:
        probe.update(url=probe["url"].replace("http://127.0.0.1:8000", app_url), interval="2s", timeout="2s")
    for rule in config["healing"]["rules"]:
        rule.update(cooldown="2s", verify={"within": "20s", "interval": "1s"})
    # Only the drift forecast plans goals, on the demo's compressed clock; other templates and the
    # optimizer acting on the same app would blur which fix did what.
    planner = config.setdefault("planner", {})
    planner["interval"] = "1s"
    planner["goals"] = [
        {**template, "trigger": FORECAST_TRIGGER, "settle": "5s", "deadline": "2m"}
        for template in planner.get("goals", [])
        if template["name"] == FORECAST_TEMPLATE
    ]
    candidates, demo_strategies = demo_candidates(app_url)
    config["optimizer"] = {**config.get("optimizer", {}), "enabled": True, "interval": "1s", "candidates": candidates}
    for strategy in config["strategies"].values():
        if strategy["type"] == "http":
            strategy["url"] = strategy["url"].replace("http://127.0.0.1:8000", app_url)
        if strategy["type"] == "exec":
            strategy["command"] = [str(data_dir) if part == EXAMPLE_DATA_DIR else part for part in strategy["command"]]
    config["strategies"].update(demo_strategies)
    return config


def prometheus_config(ports: Ports, rules_dir: Path, viewer_token: Path) -> dict[str, Any]:
    def job(name: str, port: int) -> dict[str, Any]:
        return {"job_name": name, "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}

    # healer's /metrics needs a viewer, as every read does once credentials exist.
    healer = {**job("healer", ports.healer), "authorization": {"credentials_file": str(viewer_token)}}
    return {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(rules_dir / "*.yml")],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [f"127.0.0.1:{ports.alertmanager}"]}]}]},
        "scrape_configs": [healer, job("app", ports.app)],
    }


def alertmanager_config(ports: Ports, token_file: Path) -> dict[str, Any]:
    return {
        "route": {
            "receiver": "healer",
            # One group per alert, so every alert is sent the moment it fires.
            "group_by": ["..."],
            "group_wait": "0s",
            "group_interval": "1s",
            "repeat_interval": "1h",
            "routes": [{"matchers": ['alertname=~"Healing(Failed|Suspended)|Healer.*"'], "receiver": "humans"}],
        },
        "receivers": [
            {
                "name": "healer",
                "webhook_configs": [
                    {
                        "url": f"http://127.0.0.1:{ports.healer}/api/v1/alertmanager",
                        "send_resolved": True,
                        "http_config": {"authorization": {"credentials_file": str(token_file)}},
                    }
                ],
            },
            {"name": "humans"},
        ],
    }


# -- processes ---------------------------------------------------------------------------------


def find_binaries() -> tuple[str, str]:
    prometheus = shutil.which("prometheus")
    alertmanager = shutil.which("alertmanager") or shutil.which("prometheus-alertmanager")
    if prometheus is None or alertmanager is None:
        raise DemoError(MISSING_BINARIES)
    return prometheus, alertmanager


def http(url: str, method: str = "GET", timeout: float = 5.0, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    # Only http://127.0.0.1 URLs that the demo built itself reach here.
    data = b"" if method == "POST" else None
    request = urllib.request.Request(url, method=method, data=data, headers=headers or {})  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            body = response.read()
            status = response.status
    except urllib.error.HTTPError as exc:
        body, status = exc.read(), exc.code
    try:
        return status, json.loads(body)
    except ValueError:
        return status, body.decode(errors="replace")


class Stack:
    """The processes of the demo, each stopped by its own PID."""

    def __init__(self, root: Path, workdir: Path) -> None:
        self.root = root
        self.workdir = workdir
        self.ports = Ports()
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
        self.data_dir = workdir / "app-data"
        self.credentials = Credentials.create(workdir)

    def url(self, name: str) -> str:
        return f"http://127.0.0.1:{getattr(self.ports, name)}"

    def healer_api(self, path: str, timeout: float = 5.0) -> tuple[int, Any]:
        """GET a path of healer's API with the demo's viewer token."""
        return http(self.url("healer") + path, timeout=timeout, headers=self.credentials.reader())

    def spawn(self, name: str, argv: list[str]) -> None:
        log = (self.workdir / f"{name}.log").open("wb")
        # A session of its own, so that Ctrl-C reaches the demo, which then stops everything in order.
        self.processes[name] = subprocess.Popen(
            argv,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=self.root,
            start_new_session=True,
        )
        log.close()

    def wait_ready(self, name: str, path: str, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        process = self.processes[name]
        while time.monotonic() < deadline:
            if process.poll() is not None:
                log = (self.workdir / f"{name}.log").read_text(errors="replace")[-2000:]
                raise DemoError(f"{name} exited with {process.returncode}:\n{log}")
            try:
                if http(self.url(name) + path, timeout=1)[0] == 200:
                    return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise DemoError(f"{name} was not ready within {timeout:.0f}s; see {self.workdir / (name + '.log')}")

    def start(self, say: Callable[[str], None]) -> None:
        prometheus, alertmanager = find_binaries()
        rules_dir = self.workdir / "rules"
        rules_dir.mkdir()
        for source in [*sorted((self.root / "rules").glob("*.yml")), self.root / "examples" / "app" / "rules.yml"]:
            compressed = compress_rules(yaml.safe_load(source.read_text()))
            (rules_dir / f"{source.parent.name}-{source.name}").write_text(yaml.safe_dump(compressed, sort_keys=False))
        scrapes = prometheus_config(self.ports, rules_dir, self.credentials.viewer_token)
        (self.workdir / "prometheus.yml").write_text(yaml.safe_dump(scrapes))
        receivers = alertmanager_config(self.ports, self.credentials.alertmanager_token)
        (self.workdir / "alertmanager.yml").write_text(yaml.safe_dump(receivers))
        config = healer_config(self.root, self.workdir, self.ports, self.credentials, self.data_dir)
        (self.workdir / "healer.yml").write_text(yaml.safe_dump(config, sort_keys=False))

        say("starting the example app under its supervisor")
        self.spawn(
            "app",
            [
                sys.executable,
                "-m",
                "examples.app.supervise",
                "--port",
                str(self.ports.app),
                "--data-dir",
                str(self.data_dir),
                "--data-limit-bytes",
                str(64 * 1024 * 1024),
            ],
        )
        say("starting Alertmanager")
        self.spawn(
            "alertmanager",
            [
                alertmanager,
                f"--config.file={self.workdir / 'alertmanager.yml'}",
                f"--storage.path={self.workdir / 'alertmanager-data'}",
                f"--web.listen-address=127.0.0.1:{self.ports.alertmanager}",
                "--cluster.listen-address=",
            ],
        )
        say("starting Prometheus")
        self.spawn(
            "prometheus",
            [
                prometheus,
                f"--config.file={self.workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={self.workdir / 'prometheus-data'}",
                f"--web.listen-address=127.0.0.1:{self.ports.prometheus}",
            ],
        )
        say("starting healer")
        self.spawn("healer", [sys.executable, "-m", "healer", "serve", "-c", str(self.workdir / "healer.yml")])
        self.wait_ready("app", "/healthz")
        self.wait_ready("alertmanager", "/-/ready")
        self.wait_ready("prometheus", "/-/ready")
        self.wait_ready("healer", "/-/ready")
        say("waiting for Prometheus to scrape healer and the app")
        self.wait_for(
            lambda: (
                self.query('min(up{job=~"healer|app"})') == 1.0
                and self.query('healer_process_up{process="web"}') == 1.0
            ),
            60,
            "first scrapes",
        )

    def query(self, expr: str) -> float | None:
        status, body = http(f"{self.url('prometheus')}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        if status != 200 or not body["data"]["result"]:
            return None
        return float(body["data"]["result"][0]["value"][1])

    def wait_for(self, check: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if check():
                    return
            except (urllib.error.URLError, OSError, KeyError, TypeError):
                pass
            time.sleep(0.25)
        raise DemoError(f"timed out after {timeout:.0f}s waiting for {what}; logs in {self.workdir}")

    def stop(self) -> None:
        for name in ("healer", "prometheus", "alertmanager", "app"):
            process = self.processes.get(name)
            if process is None or process.poll() is not None:
                continue
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


# -- the show ----------------------------------------------------------------------------------


class Display:
    """Progress lines, with an elapsed-time line that redraws in place on a terminal."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.live = out.isatty()
        self._pending = False

    def say(self, text: str) -> None:
        if self._pending:
            self.out.write("\r\033[K")
            self._pending = False
        self.out.write(text + "\n")
        self.out.flush()

    def tick(self, text: str) -> None:
        if self.live:
            self.out.write("\r\033[K" + text)
            self.out.flush()
            self._pending = True


def _since(t0: float, t: float | None) -> str:
    return "" if t is None else f"+{t - t0:5.1f}s"


def inject(stack: Stack, scenario: Scenario, display: Display) -> float:
    """Announce the scenario and inject its fault; return when it was injected."""
    display.say(f"\n== {scenario.name}: {scenario.story}")
    t0 = time.time()
    # The crash fault may take the app down before it answers.
    with contextlib.suppress(urllib.error.URLError, OSError):
        http(f"{stack.url('app')}/admin/fault/{scenario.name}", "POST", timeout=30)
    display.say(f"  {_since(t0, time.time())}  fault injected")
    return t0


def follow(stack: Stack, display: Display, t0: float, waiting: str, done: Callable[[], bool]) -> None:
    """Call `done` every quarter second until it says the scenario ended or SCENARIO_TIMEOUT passes, then settle."""
    deadline = time.monotonic() + SCENARIO_TIMEOUT
    while time.monotonic() < deadline:
        display.tick(f"  {_since(t0, time.time())}  waiting for {waiting} ...")
        if done():
            break
        time.sleep(0.25)
    else:
        display.say(f"  gave up after {SCENARIO_TIMEOUT:.0f}s; logs in {stack.workdir}")
    settle(stack, display)


def run_goal_scenario(stack: Stack, scenario: Scenario, display: Display) -> Result:
    """Inject a slow fault and follow the forecast goal it opens, which must finish before the alert fires."""
    result = Result(scenario.name, scenario.alert, "timeout", expected=scenario.success)
    t0 = inject(stack, scenario, display)
    seen: set[str] = set()

    def done() -> bool:
        status, body = stack.healer_api("/api/v1/goals?limit=20")
        listed = body["goals"] if status == 200 else []
        goals = [g for g in listed if g["name"] == scenario.goal and g["created_at"] >= t0]
        goal = min(goals, key=lambda g: g["id"]) if goals else None  # the first one this fault opened
        if goal is not None:
            if "opened" not in seen:
                seen.add("opened")
                result.seconds_to_fire = goal["created_at"] - t0
                display.say(
                    f"  {_since(t0, goal['created_at'])}  goal {goal['name']} opened ({goal['type']}, "
                    f"{goal['priority']}): the trend crosses 0.3 (forecast {goal['trigger_value']:.2f})"
                )
            for step in goal["steps"]:
                key = f"{step['strategy']}:{step['started_at']}:{step['result']}"
                if step["result"] is not None and key not in seen:
                    seen.add(key)
                    display.say(f"  {_since(t0, step['finished_at'])}  {step['strategy']} finished: {step['result']}")
                    result.strategies.append(step["strategy"])
            if goal["state"] in ("completed", "failed", "cancelled"):
                since = f"{int(time.time() - t0) + 1}s"
                firing = f'ALERTS{{alertname="{scenario.alert}", alertstate="firing"}}'
                fired = bool(stack.query(f"max_over_time({firing}[{since}])"))
                result.outcome = goal["state"] if not fired else f"{goal['state']}, but {scenario.alert} fired"
                result.seconds_to_heal = goal["ended_at"] - t0
                display.say(f"  {_since(t0, goal['ended_at'])}  goal {goal['state']}: {goal['detail']}")
                display.say(f"  {scenario.alert} {'fired' if fired else 'never fired'}")
                return True
        return False

    follow(stack, display, t0, f"goal {scenario.goal}", done)
    return result


def run_optimization_scenario(stack: Stack, scenario: Scenario, display: Display) -> Result:
    """Start a batch queue and follow the optimizer's trial of its candidate: applied, measured, kept or rolled back."""
    assert scenario.candidate is not None and scenario.queue is not None
    result = Result(scenario.name, scenario.alert, "timeout", expected=scenario.success, candidate=scenario.candidate)
    metric = BATCH_METRIC.format(queue=scenario.queue)
    display.say(f"\n== {scenario.name}: {scenario.story}")
    t0 = time.time()
    http(f"{stack.url('app')}/admin/batch/{scenario.queue}/start", "POST")
    display.say(f"  {_since(t0, time.time())}  batch queue {scenario.queue} started")
    seen: set[str] = set()

    def done() -> bool:
        if "metric" not in seen:
            value = stack.query(metric)
            if value is not None:
                seen.add("metric")
                display.say(f"  {_since(t0, time.time())}  Prometheus scrapes {metric} = {value:.3f}s")
        status, body = stack.healer_api("/api/v1/optimizations?limit=20")
        if status != 200:
            return False
        view = next(c for c in body["candidates"] if c["name"] == scenario.candidate)
        trials = [t for t in body["trials"] if t["candidate"] == scenario.candidate and t["applied_at"] >= t0]
        if not trials:
            return False
        trial = min(trials, key=lambda t: t["id"])  # the first trial since the queue started
        if "applied" not in seen and trial["outcome"] != "applying":
            seen.add("applied")
            result.seconds_to_fire = trial["applied_at"] - t0
            result.before, result.confidence_before = trial["before"], trial["confidence"]
            display.say(
                f"  {_since(t0, trial['applied_at'])}  optimizer applied {view['apply']} "
                f"(score {trial['score']:.2f} = expected {view['expected_improvement']:g} / cost {view['cost']:g} "
                f"x confidence {trial['confidence']:.2f}, min {body['min_confidence']:g})"
            )
            display.say(
                f"           before: avg_over_time({metric}[{OPTIMIZER_WINDOW}]) = {trial['before']:.3f}s; "
                f"measuring again {OPTIMIZER_SETTLE} + {OPTIMIZER_WINDOW} later"
            )
        if trial["outcome"] == "rolling_back" and "rolling_back" not in seen:
            seen.add("rolling_back")
            display.say(f"  {_since(t0, time.time())}  rolling back with {view['rollback']}: {trial['detail']}")
        if trial["outcome"] in ("applying", "measuring", "rolling_back"):
            return False
        result.outcome = trial["outcome"]
        result.seconds_to_heal = trial["ended_at"] - t0
        result.after, result.confidence_after = trial["after"], view["confidence"]
        detail = trial["detail"].removeprefix(f"{trial['outcome']}: ")
        display.say(f"  {_since(t0, trial['ended_at'])}  {trial['outcome']}: {detail}")
        direction = "up" if view["confidence"] > trial["confidence"] else "down"
        display.say(
            f"  confidence in {scenario.candidate}: {trial['confidence']:.2f} → {view['confidence']:.2f} ({direction}; "
            + ("below" if view["confidence"] < body["min_confidence"] else "at or above")
            + f" min_confidence {body['min_confidence']:g}; state {view['state']})"
        )
        return True

    follow(stack, display, t0, f"the optimizer's trial of {scenario.candidate}", done)
    return result


def run_scenario(stack: Stack, scenario: Scenario, display: Display) -> Result:
    """Inject one fault and follow it through alert, rule, action and verification."""
    if scenario.goal is not None:
        return run_goal_scenario(stack, scenario, display)
    if scenario.candidate is not None:
        return run_optimization_scenario(stack, scenario, display)
    result = Result(scenario.name, scenario.alert, "timeout", expected=scenario.success)
    alertmanager = stack.url("alertmanager")
    t0 = inject(stack, scenario, display)
    seen: set[str] = set()

    def done() -> bool:
        if "firing" not in seen:
            query = urllib.parse.urlencode({"filter": f'alertname="{scenario.alert}"', "active": "true"})
            status, alerts = http(f"{alertmanager}/api/v2/alerts?{query}")
            if status == 200 and alerts:
                seen.add("firing")
                result.seconds_to_fire = time.time() - t0
                labels = ", ".join(f"{k}={v}" for k, v in alerts[0]["labels"].items() if k != "alertname")
                display.say(f"  {_since(t0, time.time())}  alert {scenario.alert} firing ({labels})")
        status, body = stack.healer_api(
            "/api/v1/actions?"
            + urllib.parse.urlencode({"alertname": scenario.alert, "since": f"{t0:.3f}", "limit": "50"})
        )
        actions = list(reversed(body["actions"])) if status == 200 else []
        for action in actions:
            key = f"{action['id']}:{action['state']}:{action['outcome']}"
            if key in seen:
                continue
            seen.add(key)
            where = _since(t0, action["finished_at"] or action["started_at"] or action["created_at"])
            if action["state"] == "pending":
                display.say(
                    f"  {where}  rule {action['rule']} chose {action['strategy']} (attempt {action['attempt']})"
                )
            elif action["state"] == "running":
                display.say(f"  {where}  running {action['strategy']}: {json.dumps(action['plan'])[:100]}")
            elif action["state"] == "done":
                detail = f" ({action['detail']})" if action["detail"] else ""
                display.say(f"  {where}  {action['strategy']} finished: {action['outcome']}{detail}")
                if action["strategy"] not in result.strategies:
                    result.strategies.append(action["strategy"])
        if actions and actions[-1]["episode"]["state"] != "open":
            last = actions[-1]
            result.outcome = last["episode"]["state"]
            if result.outcome == "healed":
                result.seconds_to_heal = last["finished_at"] - t0
                starts = datetime.fromisoformat(last["episode"]["starts_at"]).timestamp()
                result.seconds_from_alert = last["finished_at"] - starts
                display.say(
                    f"  {_since(t0, last['finished_at'])}  healed and verified by PromQL: "
                    f"{result.seconds_to_heal:.1f}s from fault, {result.seconds_from_alert:.1f}s from the alert's start"
                )
            else:
                display.say(f"  {_since(t0, time.time())}  episode ended {result.outcome}")
            return True
        return False

    follow(stack, display, t0, scenario.alert, done)
    return result


def settle(stack: Stack, display: Display) -> None:
    """Wait until the app is up and healthy again, so that the next fault starts from a clean state."""
    display.tick("  settling ...")
    stack.wait_for(lambda: http(f"{stack.url('app')}/healthz", timeout=2)[0] == 200, 60, "the app to answer")
    stack.wait_for(
        lambda: stack.query("max(app_faults_active)") == 0.0 and stack.query('healer_process_up{process="web"}') == 1,
        60,
        "the app to be clean",
    )
    stack.wait_for(
        lambda: (
            stack.query('count(ALERTS{alertstate="firing", alertname!~"Healer.*|AppErrorBudget.*|AppLow.*"})') is None
        ),
        90,
        "the app's alerts to clear",
    )


def summary(results: list[Result]) -> str:
    lines = ["\nSummary", f"  {'scenario':<13} {'alert':<18} {'outcome':<11} {'fired':>7} {'healed':>8}  strategies"]
    for r in results:
        fired = f"{r.seconds_to_fire:.1f}s" if r.seconds_to_fire is not None else "-"
        healed = f"{r.seconds_to_heal:.1f}s" if r.seconds_to_heal is not None else "-"
        if r.candidate is not None:
            after = "-" if r.confidence_after is None else f"{r.confidence_after:.2f}"
            before = "-" if r.confidence_before is None else f"{r.confidence_before:.2f}"
            what = f"confidence {before} → {after}"
        else:
            what = " → ".join(r.strategies)
        lines.append(
            f"  {r.scenario:<13} {r.alert or r.candidate or '-':<18} {r.outcome:<11} {fired:>7} {healed:>8}  {what}"
        )
    if any(r.outcome == "completed" for r in results):
        lines.append("  (for a goal: fired = the goal opened, healed = its target reached, before any alert)")
    if any(r.candidate is not None for r in results):
        lines.append("  (for an optimisation: fired = the change applied, healed = the verdict after measuring)")
    return "\n".join(lines)


def explain_health(stack: Stack, report: dict[str, Any]) -> list[str]:
    """Why the closing status is not HEALTHY: the alerts that fire (with their summaries), or escalations."""
    health = report["health"]["status"]
    if health == "HEALTHY":
        return []
    lines = [f"\nWhy {health}:"]
    status, body = http(f"{stack.url('prometheus')}/api/v1/alerts")
    firing = [a for a in body["data"]["alerts"] if a["state"] == "firing"] if status == 200 else []
    for alert in sorted(firing, key=lambda a: (a["labels"].get("severity", ""), a["labels"]["alertname"])):
        labels = alert["labels"]
        others = ", ".join(f"{k}={v}" for k, v in sorted(labels.items()) if k not in ("alertname", "severity"))
        annotations = alert.get("annotations", {})
        why = annotations.get("summary") or annotations.get("description") or "no summary annotation"
        lines.append(
            f"  {labels['alertname']} ({labels.get('severity', 'no severity')}) fires since "
            f"{alert['activeAt'][11:19]} UTC, value {float(alert['value']):.3g}"
            f"{f' [{others}]' if others else ''}: {why}"
        )
    if firing:
        lines.append(
            f"  (the demo divides rule windows by {TIME_COMPRESSION}: an hour in a summary is "
            f"{compress('1h', MIN_RANGE_SECONDS)} here, so faults shown minutes ago still count)"
        )
    window = compress("30m", MIN_RANGE_SECONDS)
    escalations = stack.query(f"sum(increase(healer_escalations_total[{window}]))")
    if escalations:
        lines.append(
            f"  healer escalated {escalations:.0f} episode(s) to people in the last {window} "
            "(the demo's compressed 30m): FAILING until that window passes"
        )
    if len(lines) == 1:
        lines.append(
            "  nothing fires now: instance:healer_health_status:max is a recording rule, evaluated every second, "
            "and the report read it while an alert was still firing"
        )
    return lines


def run_demo(
    scenarios: list[str] | None,
    *,
    keep: bool = False,
    workdir: Path | None = None,
    report: Path | None = None,
    out: TextIO = sys.stdout,
) -> int:
    """Run the demonstration; return the exit code (0 when every scenario ended as it should)."""
    from healer.status import render_status

    unknown = sorted(set(scenarios or ()) - set(SCENARIO_NAMES))
    if unknown:
        print(f"unknown scenario {', '.join(unknown)}; choose from {', '.join(SCENARIO_NAMES)}", file=sys.stderr)
        return 2
    chosen = [s for s in SCENARIOS if not scenarios or s.name in scenarios]
    display = Display(out)
    try:
        root = source_tree()
        find_binaries()
    except DemoError as exc:
        print(exc, file=sys.stderr)
        return 2
    workdir = workdir or Path(tempfile.mkdtemp(prefix="healer-demo-"))
    workdir.mkdir(parents=True, exist_ok=True)
    stack = Stack(root, workdir)
    previous = signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    results: list[Result] = []
    try:
        stack.start(display.say)
        display.say(
            f"healer's console: {stack.url('healer')}/  (the live view of what follows; sign in as"
            f" {Credentials.USER} with the password in {stack.credentials.console_password})"
        )
        for scenario in chosen:
            results.append(run_scenario(stack, scenario, display))
        display.say(summary(results))
        status, body = stack.healer_api("/api/v1/status", timeout=30)
        if status == 200:
            command = f"healer status --url {stack.url('healer')} --bearer-token-file {stack.credentials.viewer_token}"
            display.say(f"\nStatus report ({command})\n" + render_status(body))
            for line in explain_health(stack, body):
                display.say(line)
        else:
            display.say(f"\nThe status report is unavailable: HTTP {status}: {str(body)[:300]}")
        display.say(
            "\nWhere to look:\n"
            f"  Prometheus    {stack.url('prometheus')}/alerts\n"
            f"  Alertmanager  {stack.url('alertmanager')}/#/alerts\n"
            f"  console       {stack.url('healer')}/\n"
            f"  healer        {stack.url('healer')}/api/v1/actions  and  /api/v1/optimizations  and  /api/v1/status"
            f"  and  /metrics, with the viewer token in {stack.credentials.viewer_token}"
            + (f"\n  files         {workdir}" if keep else "")
        )
        if report is not None:
            report.write_text(json.dumps([r.__dict__ for r in results], indent=2))
    except KeyboardInterrupt:
        display.say("\ninterrupted; stopping the stack")
        keep = False
        return 130
    except DemoError as exc:
        display.say(f"\n{exc}")
        keep = False
        return 1
    finally:
        signal.signal(signal.SIGTERM, previous)
        if keep:
            pids = " ".join(str(p.pid) for p in stack.processes.values())
            display.say(f"\nThe stack keeps running. Stop it with: kill {pids}")
        else:
            stack.stop()
            if os.environ.get("HEALER_DEMO_KEEP_FILES") is None and workdir.name.startswith("healer-demo-"):
                shutil.rmtree(workdir, ignore_errors=True)
    return 0 if results and all(r.outcome == r.expected for r in results) else 1
