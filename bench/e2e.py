"""Benchmark the whole loop: time from a fault to healer's action and to its verified heal.

What it measures
----------------
One stack on loopback: a fault app (exports ``fault_active{fault="NAME"} 1`` for every file in
a directory) → Prometheus (scrape and rule evaluation every ``--interval-ms``, 100 ms; rule
``FaultActive: fault_active == 1`` with no ``for``) → Alertmanager (``group_by: [alertname,
fault]``, ``group_wait: 0s``, ``group_interval: 10ms``) → two webhook receivers of every alert
(the first route has ``continue: true``):

* the floor: a bare aiohttp handler that only parses the JSON and logs its arrival time;
* healer (``python -m healer serve``) with one rule matching FaultActive whose strategy is an
  exec of ``rm -f -- {labels.fault}`` in the fault directory (the label as one whole argv
  element), verified with PromQL (``verify: {within: 5s, interval: 50ms}``, cooldown 100ms).

``--store`` picks healer's store: ``sqlite`` (default, a file), ``postgresql`` (a real
PostgreSQL started for the run with tests/postgres.py's harness) or ``both``: two healers, one
on each store, as two more receivers of the same notifications, each with a fault directory of
its own; a fault is a file in each, and the fault app exports it while any of them has it, so
the alert resolves once both healers acted.

``--faults`` (20) faults are injected one after another, each with a new fault name, so each
is a new Alertmanager group, sent at once. Before each injection the script sleeps a random
fraction of the interval, so faults land at all phases of the scrape/evaluation cycle; t0 is
the moment the fault file is created. For each fault: the floor's arrival time, and from
healer's audit API (``GET /api/v1/actions``, unix seconds) the step scheduled (``created_at``),
the step started (``started_at``) and the verified heal (``finished_at`` of the step whose
outcome is ``healed``). healer is read only through its HTTP API, never its SQLite file; the
API does not expose when a delivery arrived, so the floor's arrival, the same notification at
the same moment, stands for healer's.

The baseline
------------
The floor receiver gets the very same notification as healer, from the same Prometheus and
Alertmanager, at the same moment. Two separate stacks would not compare: Prometheus derives
the offset between a scrape and a rule evaluation from hashes of the target address and of the
rules file path, so two otherwise identical stacks differ by a fixed part of the interval (a
first version of this script measured separate stacks and found the floor 40 ms *slower* than
healer at the median, which says nothing about either receiver).

Reported: median / p90 / max over the faults of each time after t0; "healer adds" =
median(healer step start - t0) - median(floor arrival - t0), and the same difference taken fault
by fault (paired: floor arrival → healer step started, the cleanest number). Target printed as
PASS/FAIL for each healer: the median of the paired webhook arrival → step start is below 20 ms.

Usage: ``python bench/e2e.py [--faults 20] [--store sqlite|postgresql|both] [--json]``.
Everything started is stopped by its own PID on exit, also on error or Ctrl-C; a PostgreSQL
started for the run is removed with its directory. All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sys
import tempfile
import time
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# isort: split
import common  # bench/common.py: `python bench/e2e.py` puts bench/ first on sys.path
from common import WEBHOOK_PATH, free_port, percentile, summary, wait_for

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
ALERTMANAGER = (
    shutil.which("prometheus-alertmanager") or shutil.which("alertmanager") or "/usr/bin/prometheus-alertmanager"
)
RM = shutil.which("rm") or "/bin/rm"
TOKEN = "bench-e2e-token"
# healer's reads need its token too.
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TARGET_MS = 20.0
FAULT_TIMEOUT_SECONDS = 20.0

FAULT_RULES = {
    "groups": [
        {
            "name": "bench-faults",
            "rules": [
                {
                    "alert": "FaultActive",
                    "expr": "fault_active == 1",
                    "labels": {"severity": "warning"},
                    "annotations": {"summary": "fault {{ $labels.fault }} is active"},
                }
            ],
        }
    ]
}


# --------------------------------------------------------------------------- children


def fault_app_main(argv: list[str]) -> int:
    """Child process: export `fault_active{fault="NAME"} 1` for every file in any of the directories."""
    port, directories = int(argv[0]), argv[1:]

    def exposition() -> bytes:
        lines = ["# HELP fault_active 1 while a fault file exists.", "# TYPE fault_active gauge"]
        names = set().union(*(os.listdir(directory) for directory in directories))
        lines += [f'fault_active{{fault="{name}"}} 1' for name in sorted(names)]
        return ("\n".join(lines) + "\n").encode()

    common.serve_exposition(port, exposition)
    return 0


def floor_main(argv: list[str]) -> int:
    """Child process: the floor receiver; parses each webhook and logs one JSON line per alert."""
    from aiohttp import web

    async def webhook(request: web.Request) -> web.Response:
        document = json.loads(await request.read())
        arrived = time.time()
        lines = [
            json.dumps(
                {
                    "event": "alert",
                    "t": arrived,
                    "status": alert.get("status"),
                    "fault": alert.get("labels", {}).get("fault"),
                }
            )
            for alert in document.get("alerts", [])
        ]
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post(WEBHOOK_PATH, webhook)
    common.serve_on_loopback(app)
    return 0


# --------------------------------------------------------------------------- stacks


def get_json(url: str, headers: dict[str, str] | None = None) -> Any:
    status, body = common.http_get(url, headers=headers)
    if status != 200:
        raise RuntimeError(f"GET {url}: HTTP {status}: {body[:300]!r}")
    return json.loads(body)


HEALER_NAMES = {"sqlite": "healer", "postgresql": "healer-pg"}


@dataclass
class Stack:
    workdir: Path
    faults: dict[str, Path]  # each healer's fault directory, by healer name
    prometheus: common.Child
    alertmanager: common.Child
    floor: common.Child
    healers: dict[str, common.Child]


def start_alertmanager(
    keeper: common.Keeper, workdir: Path, floor_url: str, healer_urls: dict[str, str]
) -> common.Child:
    """Alertmanager sending every FaultActive group to the floor and to each healer (continue: true but the last)."""
    webhook = {"send_resolved": True, "http_config": {"authorization": {"credentials": TOKEN}}}
    names = list(healer_urls)
    routes: list[dict[str, Any]] = [{"receiver": "floor", "matchers": ['alertname="FaultActive"'], "continue": True}]
    routes += [
        {"receiver": name, "matchers": ['alertname="FaultActive"'], **({"continue": True} if name != names[-1] else {})}
        for name in names
    ]
    config = {
        "route": {
            "receiver": names[0],
            "group_by": ["alertname", "fault"],
            "group_wait": "0s",
            "group_interval": "10ms",
            "repeat_interval": "1h",
            "routes": routes,
        },
        "receivers": [
            {"name": "floor", "webhook_configs": [{"url": floor_url, **webhook}]},
            *({"name": name, "webhook_configs": [{"url": url, **webhook}]} for name, url in healer_urls.items()),
        ],
    }
    directory = workdir / "alertmanager"
    directory.mkdir(parents=True)
    common.write_yaml(directory / "alertmanager.yml", config)
    port = free_port()
    child = keeper.start(
        "alertmanager",
        [
            ALERTMANAGER,
            f"--config.file={directory / 'alertmanager.yml'}",
            f"--storage.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--cluster.listen-address=",
            "--log.level=warn",
        ],
    )
    common.wait_ready(child, f"http://127.0.0.1:{port}")
    return child


def start_prometheus(
    keeper: common.Keeper, workdir: Path, interval: str, app_port: int, alertmanager: common.Child
) -> common.Child:
    directory = workdir / "prometheus"
    directory.mkdir(parents=True)
    rules = directory / "rules.yml"
    common.write_yaml(rules, FAULT_RULES)
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": interval},
        "scrape_configs": [{"job_name": "app", "static_configs": [{"targets": [f"127.0.0.1:{app_port}"]}]}],
        "rule_files": [str(rules)],
        "alerting": {"alertmanagers": [{"static_configs": [{"targets": [alertmanager.url.split("//", 1)[1]]}]}]},
    }
    common.write_yaml(directory / "prometheus.yml", config)
    port = free_port()
    child = keeper.start(
        "prometheus",
        [
            PROMETHEUS,
            f"--config.file={directory / 'prometheus.yml'}",
            f"--storage.tsdb.path={directory / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
    )
    common.wait_ready(child, f"http://127.0.0.1:{port}")

    def scraping_and_notifying() -> bool:
        up = get_json(f"{child.url}/api/v1/query?" + urllib.parse.urlencode({"query": 'up{job="app"} == 1'}))
        managers = get_json(f"{child.url}/api/v1/alertmanagers")
        return bool(up["data"]["result"]) and bool(managers["data"]["activeAlertmanagers"])

    wait_for(scraping_and_notifying, "Prometheus scraping the app and knowing Alertmanager", 30)
    return child


def start_fault_app(keeper: common.Keeper, workdir: Path, names: list[str]) -> tuple[dict[str, Path], int]:
    """The fault app watching one fault directory per healer name."""
    faults = {name: workdir / f"faults-{name}" for name in names}
    for directory in faults.values():
        directory.mkdir(parents=True)
    port = free_port()
    argv = [sys.executable, str(Path(__file__).resolve()), "_fault_app", str(port), *map(str, faults.values())]
    child = keeper.start("fault-app", argv)
    common.wait_ready(child, f"http://127.0.0.1:{port}", "/", timeout=10)
    return faults, port


def healer_config(
    workdir: Path, faults: Path, prometheus: str, alertmanager: str, store: dict[str, Any]
) -> dict[str, Any]:
    (workdir / "token").write_text(TOKEN)
    return {
        "server": {"auth": {"bearer_token_file": str(workdir / "token")}, "shutdown_timeout": "2s"},
        "prometheus": {"url": prometheus, "timeout": "2s"},
        "alertmanager": {"url": alertmanager, "timeout": "2s"},
        "store": store,
        "exporter": {"host": False},
        "healing": {
            "budget": {"actions": 1000, "window": "10m"},
            "rules": [
                {
                    "name": "remove-fault",
                    "match": ['alertname="FaultActive"'],
                    "strategies": ["remove-fault"],
                    "max_attempts": 2,
                    "cooldown": "100ms",
                    "verify": {"within": "5s", "interval": "50ms"},
                }
            ],
        },
        "strategies": {
            "remove-fault": {
                "type": "exec",
                "command": [RM, "-f", "--", "{labels.fault}"],
                "cwd": str(faults),
                "allow_labels": {"fault": "^[a-z0-9][a-z0-9-]*$"},
                "timeout": "5s",
            },
        },
    }


def start_stack(keeper: common.Keeper, workdir: Path, interval: str, stores: list[str], postgres: Any) -> Stack:
    names = {HEALER_NAMES[store]: store for store in stores}
    faults, app_port = start_fault_app(keeper, workdir, list(names))
    floor = keeper.start("floor", [sys.executable, str(Path(__file__).resolve()), "_floor"])
    common.wait_listening(floor)
    ports = {name: free_port() for name in names}
    alertmanager = start_alertmanager(
        keeper,
        workdir,
        floor.url + WEBHOOK_PATH,
        {name: f"http://127.0.0.1:{port}{WEBHOOK_PATH}" for name, port in ports.items()},
    )
    prometheus = start_prometheus(keeper, workdir, interval, app_port, alertmanager)
    healers = {}
    for name, store in names.items():
        # Not a directory named healer: `python -m healer` run in it would import it as a package.
        home = workdir / f"store-{store}"
        home.mkdir()
        section = common.store_config(store, home, postgres)
        config = healer_config(home, faults[name], prometheus.url, alertmanager.url, section)
        config_path = common.write_yaml(home / "healer.yml", config)
        healers[name] = common.start_healer(keeper, config_path, listen=f"127.0.0.1:{ports[name]}", cwd=home, name=name)
    for healer in healers.values():
        common.wait_listening(healer)
    return Stack(workdir, faults, prometheus, alertmanager, floor, healers)


# --------------------------------------------------------------------------- measurements


def floor_arrival(stack: Stack, fault: str, status: str) -> float | None:
    for line in stack.floor.log().splitlines():
        if line.startswith('{"event": "alert"'):
            record = json.loads(line)
            if record["fault"] == fault and record["status"] == status:
                return float(record["t"])
    return None


def healer_saw_resolved(healer: common.Child, action_id: int) -> bool:
    """Whether healer recorded the resolution of the step's episode (a "resolved" event in the audit API)."""
    events = get_json(f"{healer.url}/api/v1/actions/{action_id}", AUTH)["events"]
    return any(event["kind"] == "resolved" for event in events)


def healer_actions(healer: common.Child, fault: str) -> list[dict[str, Any]]:
    """The fault's steps from the audit API, oldest first."""
    query = urllib.parse.urlencode({"alertname": "FaultActive", "limit": 50})
    actions = get_json(f"{healer.url}/api/v1/actions?{query}", AUTH)["actions"]
    return [a for a in reversed(actions) if a["episode"]["labels"].get("fault") == fault]


@dataclass
class Sample:
    """One fault as one healer handled it; every time in ms after t0 unless named a -> b."""

    healer: str
    fault: str
    floor_arrival_ms: float
    scheduled_ms: float  # actions.created_at
    started_ms: float  # actions.started_at
    healed_ms: float  # finished_at of the healed step
    floor_arrival_to_scheduled_ms: float
    floor_arrival_to_started_ms: float  # paired "healer adds"
    started_to_healed_ms: float
    steps: int


def run_fault(stack: Stack, fault: str, interval: float, rng: random.Random) -> list[Sample]:
    """Inject one fault at a random phase; wait until every healer healed it and every receiver saw it resolve."""
    time.sleep(rng.uniform(0, interval))
    files = [directory / fault for directory in stack.faults.values()]
    t0 = time.time()
    for file in files:
        file.write_text("fault\n")
    actions: dict[str, list[dict[str, Any]]] = {}
    try:
        # Watching the files costs healer nothing; the audit API is asked only once they are gone.
        wait_for(
            lambda: not any(file.exists() for file in files), f"healer to remove {fault}", FAULT_TIMEOUT_SECONDS, 0.005
        )
        for name, healer in stack.healers.items():

            def finished(healer: common.Child = healer) -> list[dict[str, Any]] | None:
                found = healer_actions(healer, fault)
                return found if found and found[-1]["finished_at"] is not None else None

            actions[name] = wait_for(finished, f"{name}'s step for {fault} to finish", FAULT_TIMEOUT_SECONDS, 0.1)
    finally:
        for file in files:
            file.unlink(missing_ok=True)
    floor = wait_for(lambda: floor_arrival(stack, fault, "firing"), f"floor webhook of {fault}", 5)
    # Every receiver sees the resolution before the next fault, so each fault meets a quiet stack.
    wait_for(
        lambda: (
            floor_arrival(stack, fault, "resolved")
            and all(healer_saw_resolved(stack.healers[name], steps[0]["id"]) for name, steps in actions.items())
        ),
        f"resolved notifications of {fault}",
        FAULT_TIMEOUT_SECONDS,
    )
    return [sample(name, fault, t0, floor, steps) for name, steps in actions.items()]


def sample(healer: str, fault: str, t0: float, floor: float, actions: list[dict[str, Any]]) -> Sample:
    """One healer's figures for one fault, from its steps (oldest first)."""
    first, last = actions[0], actions[-1]
    if last["outcome"] != "healed":
        raise RuntimeError(
            f"{healer}, fault {fault}: last step ended {last['outcome']!r}, not healed: {json.dumps(actions)}"
        )
    return Sample(
        healer=healer,
        fault=fault,
        floor_arrival_ms=(floor - t0) * 1000,
        scheduled_ms=(first["created_at"] - t0) * 1000,
        started_ms=(first["started_at"] - t0) * 1000,
        healed_ms=(last["finished_at"] - t0) * 1000,
        floor_arrival_to_scheduled_ms=(first["created_at"] - floor) * 1000,
        floor_arrival_to_started_ms=(first["started_at"] - floor) * 1000,
        started_to_healed_ms=(last["finished_at"] - first["started_at"]) * 1000,
        steps=len(actions),
    )


@dataclass
class Report:
    faults: int
    interval: str
    cpus: int
    load_average: list[float]
    stores: list[str] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    summary: dict[str, dict[str, dict[str, float]]] = field(default_factory=dict)  # per healer
    healer_adds_ms: dict[str, float] = field(default_factory=dict)  # per healer
    checks: list[dict[str, Any]] = field(default_factory=list)
    load_average_end: list[float] = field(default_factory=list)


def run(args: argparse.Namespace) -> Report:
    interval_seconds = args.interval_ms / 1000
    report = Report(args.faults, f"{args.interval_ms}ms", os.cpu_count() or 0, [round(x, 2) for x in os.getloadavg()])
    report.stores = common.stores(args.store)
    rng = random.Random(args.seed)
    run_id = f"{rng.randrange(16**4):04x}"
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        keeper = common.Keeper(Path(tmp))
        postgres: Any = None
        try:
            if "postgresql" in report.stores:
                postgres = common.start_postgres(Path(tmp))
            stack = start_stack(keeper, Path(tmp), report.interval, report.stores, postgres)
            for index in range(args.faults):
                samples = run_fault(stack, f"fault-{run_id}-{index:03d}", interval_seconds, rng)
                report.samples += samples
                print(
                    f"... fault {index + 1}/{args.faults}: floor arrival {samples[0].floor_arrival_ms:.1f} ms; "
                    + "; ".join(
                        f"{s.healer} step scheduled {s.scheduled_ms:.1f} ms, start {s.started_ms:.1f} ms,"
                        f" healed {s.healed_ms:.1f} ms"
                        for s in samples
                    ),
                    file=sys.stderr,
                    flush=True,
                )
        finally:
            keeper.stop_all()
            if postgres is not None:
                postgres.destroy()
    report.load_average_end = [round(x, 2) for x in os.getloadavg()]
    for store in report.stores:
        name = HEALER_NAMES[store]
        samples = [s for s in report.samples if s.healer == name]
        report.summary[name] = {
            "floor: webhook arrival": summary([s.floor_arrival_ms for s in samples]),
            "healer: step scheduled (actions.created_at)": summary([s.scheduled_ms for s in samples]),
            "healer: step started (actions.started_at)": summary([s.started_ms for s in samples]),
            "healer: verified heal (finished_at, healed)": summary([s.healed_ms for s in samples]),
            "paired: floor arrival -> healer step scheduled": summary(
                [s.floor_arrival_to_scheduled_ms for s in samples]
            ),
            "healer: step started -> verified heal": summary([s.started_to_healed_ms for s in samples]),
            "paired: floor arrival -> healer step started": summary([s.floor_arrival_to_started_ms for s in samples]),
        }
        report.healer_adds_ms[name] = round(
            percentile([s.started_ms for s in samples], 0.5) - percentile([s.floor_arrival_ms for s in samples], 0.5),
            1,
        )
        own = report.summary[name]["paired: floor arrival -> healer step started"]["median"]
        report.checks.append(
            {
                "check": f"{name} ({store}): median webhook arrival (floor's) -> healer step start < {TARGET_MS:g} ms",
                "value": own,
                "limit": TARGET_MS,
                "passed": own < TARGET_MS,
            }
        )
    return report


def print_report(report: Report) -> None:
    print(
        f"end-to-end benchmark: {report.faults} faults, scrape/evaluation {report.interval}, Alertmanager"
        f" group_wait 0s group_interval 10ms, {report.cpus} CPUs, load average at start {report.load_average},"
        f" at the end {report.load_average_end}"
    )
    print("times in ms after the fault file was created (t0) unless named a -> b, over all faults:")
    for name, rows in report.summary.items():
        store = next(store for store in report.stores if HEALER_NAMES[store] == name)
        print()
        print(f"{name} on {store:<38}{'median':>9}{'p90':>9}{'max':>9}{'min':>9}")
        for row, stats in rows.items():
            print(f"{row:<47}{stats['median']:>9.1f}{stats['p90']:>9.1f}{stats['max']:>9.1f}{stats['min']:>9.1f}")
        steps = sorted({s.steps for s in report.samples if s.healer == name})
        print(f"{name} adds (median step start - median floor arrival): {report.healer_adds_ms[name]:.1f} ms")
        print(f"every fault healed by {name}; steps per fault: {steps}")
    if len(report.summary) == 2:
        sqlite = {s.fault: s for s in report.samples if s.healer == HEALER_NAMES["sqlite"]}
        pg = [s for s in report.samples if s.healer == HEALER_NAMES["postgresql"]]
        paired = summary([s.floor_arrival_to_started_ms - sqlite[s.fault].floor_arrival_to_started_ms for s in pg])
        print()
        print(
            "paired per fault, healer-pg step start - healer step start (same notification): median"
            f" {paired['median']:.1f} ms, p90 {paired['p90']:.1f}, max {paired['max']:.1f}, min {paired['min']:.1f}"
        )
    print()
    for check in report.checks:
        print(f"{'PASS' if check['passed'] else 'FAIL'}  {check['check']}: {check['value']} (limit {check['limit']})")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_fault_app"]:
        return fault_app_main(argv[1:])
    if argv[:1] == ["_floor"]:
        return floor_main(argv[1:])
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--faults", type=int, default=20, help="faults injected one at a time")
    parser.add_argument("--interval-ms", type=int, default=100, help="Prometheus scrape and evaluation interval")
    parser.add_argument("--seed", type=int, default=1, help="seed of the random injection phase")
    parser.add_argument(
        "--store",
        choices=["sqlite", "postgresql", "both"],
        default="sqlite",
        help="healer's store: an SQLite file (default), a PostgreSQL started for the run, or both side by side",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if not (1 <= args.faults <= 500 and 5 <= args.interval_ms <= 5000):
        parser.error("--faults must be 1..500 and --interval-ms 5..5000")
    # A failed check is reported by its FAIL line; non-zero means the benchmark itself failed.
    return common.emit(run(args), args.json, print_report)


if __name__ == "__main__":
    sys.exit(main())
