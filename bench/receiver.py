"""Benchmark healer's Alertmanager webhook against a bare aiohttp JSON handler, in the same run.

What it measures
----------------
``POST /api/v1/alertmanager`` with Alertmanager v4 payloads of 1 and of 50 alerts, as seen by a
load generator (an aiohttp client in its own process) over keep-alive connections:

* closed loop: ``--connections`` (32) concurrent connections, each sending its next request as
  soon as the previous answer arrived, for ``--seconds`` (10) after ``--warmup`` (1) seconds:
  requests/s, alerts/s, p50 and p99 latency (request sent to full answer read);
* open loop: ``--rate`` (200) 1-alert requests per second paced by the clock, whether or not
  earlier answers came back, for ``--rate-seconds`` (10): p50 and p99 latency measured from the
  moment each request was *due*, so a stall of the server counts in full (no coordinated
  omission).

Every request carries alerts with fingerprints never sent before (a counter in the
fingerprint), so healer does its real work each time: authenticate, parse, validate, commit
the delivery to its inbox (SQLite: WAL, group commit; PostgreSQL: a committed transaction)
before answering 200, and its engine then records each alert as an unmatched episode. healer
runs ``python -m healer serve`` with a config in a temporary directory: a bearer token, no
healing rules, the host exporter off, and Prometheus/Alertmanager URLs pointing at a closed
loopback port. ``--store`` picks its store: ``sqlite`` (default, a file in the temporary
directory), ``postgresql`` (a real PostgreSQL started for the run with tests/postgres.py's
harness, one database per healer) or ``both`` (two healers, ``healer`` on SQLite and
``healer-pg`` on PostgreSQL, measured in the same run beside the bare server).

The baseline
------------
A bare aiohttp server, started by this script in its own process, whose handler only reads the
body, runs ``json.loads`` on it and answers 200 (no access log, like healer). Both servers run
side by side and are measured alternately, case by case, with the same load generator, so the
healer/bare ratios are the figures to compare between runs on a shared, noisy machine. The load
generator's own CPU use is reported: when it is near 100 % of one core the client, not the
server, limits the bare server's figures.

Checks printed as PASS/FAIL at the end: healer's alerts/s is at least 0.55 x the bare server's
with 1 alert per request and 0.4 x with 50 (0.5 x for other sizes); healer's p99 is below 20 ms
at 200 requests/s; healer's status API counts exactly as many alerts received as were answered
200. The first two hold healer on SQLite (issue 9); healer on PostgreSQL is held, with ``--store
both``, to at least 0.5 x the alerts/s of healer on SQLite (issue 10), and its inbox count must
match too. healer is read only through its HTTP API
(``/api/v1/status``, ``/metrics``), never its store. Then the floor: what parsing, validating and
committing one payload cost in this process, and the ceiling on healer/bare that follows. The
resident memory (RSS) of both servers is printed after each case.

Usage: ``python bench/receiver.py [--seconds 10] [--store sqlite|postgresql|both] [--json]``.
Everything started is stopped by its own PID on exit, also on error or Ctrl-C; a PostgreSQL
started for the run is removed with its directory. All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil

# isort: split
import common  # bench/common.py: `python bench/receiver.py` puts bench/ first on sys.path
from common import WEBHOOK_PATH, percentile

TOKEN = "bench-receiver-token"
# healer's reads need its token too.
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CLOSED_PORT_URL = "http://127.0.0.1:1"  # nothing listens on port 1: upstreams are unreachable
RATIO_TARGETS = {1: 0.55, 50: 0.4}  # issue 9: healer/bare alerts/s per payload size
RATIO_TARGET = 0.5  # other sizes
POSTGRES_RATIO_TARGET = 0.5  # issue 10: healer on PostgreSQL / healer on SQLite, alerts/s, every size
HEALER_NAMES = {"sqlite": "healer", "postgresql": "healer-pg"}
P99_TARGET_MS = 20.0

# --------------------------------------------------------------------------- payloads

# One alert shaped like a captured Alertmanager 0.25 alert (tests/fixtures), about 600 bytes.
# FP is replaced by a fingerprint that is new for every alert of every request.
_ALERT_TEMPLATE = json.dumps(
    {
        "status": "firing",
        "labels": {
            "alertname": "BenchAlert",
            "instance": "web-1:9877",
            "job": "healer",
            "process": "web",
            "service": "demo-app",
            "severity": "warning",
            "id": "FP",
        },
        "annotations": {
            "description": "web on web-1:9877 is above 85% memory for 2m",
            "runbook_url": "https://example.org/runbook.md#processhighmemory",
            "summary": "Process web uses 91% of memory",
        },
        "startsAt": "2026-11-23T23:14:16Z",
        "endsAt": "0001-01-01T00:00:00Z",
        "generatorURL": "http://127.0.0.1:9090/graph?g0.expr=healer_process_resident_memory_bytes+%3E+0",
        "fingerprint": "FP",
    },
    separators=(",", ":"),
)
_ALERT_PARTS = _ALERT_TEMPLATE.split("FP")
_PAYLOAD_HEAD = '{"receiver":"healer","status":"firing","alerts":['
_PAYLOAD_TAIL = (
    '],"groupLabels":{"alertname":"BenchAlert"},"commonLabels":{"alertname":"BenchAlert","job":"healer"},'
    '"commonAnnotations":{},"externalURL":"http://127.0.0.1:9093","version":"4",'
    '"groupKey":"{}:{alertname=\\"BenchAlert\\"}","truncatedAlerts":0}'
)


def make_body(case: int, request: int, alerts: int) -> bytes:
    """A v4 payload of `alerts` alerts whose 16-hex-digit fingerprints encode case, request and index."""
    items = []
    for index in range(alerts):
        fingerprint = f"{case:02x}{request:010x}{index:04x}"
        items.append(fingerprint.join(_ALERT_PARTS))
    return (_PAYLOAD_HEAD + ",".join(items) + _PAYLOAD_TAIL).encode()


# --------------------------------------------------------------------------- load generator (child)


@dataclass
class LoadResult:
    """What one load-generator run saw; latencies in milliseconds."""

    mode: str
    alerts_per_request: int
    seconds: float
    requests: int  # measured requests (after warm-up) answered with any status
    ok: int  # measured requests answered 200
    requests_per_second: float
    alerts_per_second: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    errors: int  # transport errors (connection refused, reset, timeout), measured and warm-up
    statuses: dict[str, int]  # every answer, warm-up included
    alerts_accepted: int  # alerts in 200 answers, warm-up included (the store must hold them all)
    client_cpu_ratio: float  # CPU seconds of the load generator / wall seconds
    max_send_lag_ms: float = 0.0  # open loop: how late the generator sent a request


async def _post(session: Any, url: str, body: bytes, headers: dict[str, str]) -> int:
    async with session.post(url, data=body, headers=headers) as response:
        await response.read()
        return int(response.status)


async def closed_loop(url: str, alerts: int, case: int, connections: int, seconds: float, warmup: float) -> LoadResult:
    """`connections` workers, each sending its next request when the previous one is answered."""
    import aiohttp

    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    counter = iter(range(1 << 40))
    accepted = 0
    errors = 0
    measured = 0
    measured_ok = 0
    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=30)
    cpu_start = time.process_time()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        begin = time.perf_counter()
        measure_from = begin + warmup
        stop = measure_from + seconds

        async def worker() -> None:
            nonlocal accepted, errors, measured, measured_ok
            while True:
                body = make_body(case, next(counter), alerts)
                start = time.perf_counter()
                if start >= stop:
                    return
                try:
                    status = await _post(session, url, body, headers)
                except (aiohttp.ClientError, TimeoutError):
                    errors += 1
                    continue
                end = time.perf_counter()
                statuses[str(status)] += 1
                if status == 200:
                    accepted += alerts
                if start >= measure_from:
                    measured += 1
                    latencies.append(end - start)
                    if status == 200:
                        measured_ok += 1

        await asyncio.gather(*(worker() for _ in range(connections)))
        wall = time.perf_counter() - begin
    latencies.sort()
    ms = [value * 1000 for value in latencies]
    return LoadResult(
        mode="closed",
        alerts_per_request=alerts,
        seconds=seconds,
        requests=measured,
        ok=measured_ok,
        requests_per_second=measured_ok / seconds,
        alerts_per_second=measured_ok * alerts / seconds,
        p50_ms=percentile(ms, 0.50),
        p90_ms=percentile(ms, 0.90),
        p99_ms=percentile(ms, 0.99),
        max_ms=ms[-1] if ms else 0.0,
        errors=errors,
        statuses=dict(statuses),
        alerts_accepted=accepted,
        client_cpu_ratio=(time.process_time() - cpu_start) / wall,
    )


async def open_loop(
    url: str, alerts: int, case: int, connections: int, rate: float, seconds: float, warmup: float
) -> LoadResult:
    """Requests due at a fixed rate, each sent at its due time; latency counts from the due time."""
    import aiohttp

    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {TOKEN}"}
    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    lags: list[float] = []
    accepted = 0
    errors = 0
    measured_ok = 0
    warmup_requests = int(rate * warmup)
    total = warmup_requests + int(rate * seconds)
    connector = aiohttp.TCPConnector(limit=connections)
    timeout = aiohttp.ClientTimeout(total=30)
    cpu_start = time.process_time()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        begin = time.perf_counter() + 0.05

        async def one(index: int, due: float) -> None:
            nonlocal accepted, errors, measured_ok
            body = make_body(case, index, alerts)
            sent = time.perf_counter()
            try:
                status = await _post(session, url, body, headers)
            except (aiohttp.ClientError, TimeoutError):
                errors += 1
                return
            end = time.perf_counter()
            statuses[str(status)] += 1
            if status == 200:
                accepted += alerts
            if index >= warmup_requests:
                latencies.append(end - due)
                lags.append(sent - due)
                if status == 200:
                    measured_ok += 1

        tasks: list[asyncio.Task[None]] = []
        for index in range(total):
            due = begin + index / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(index, due)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - begin
    latencies.sort()
    ms = [value * 1000 for value in latencies]
    return LoadResult(
        mode="open",
        alerts_per_request=alerts,
        seconds=seconds,
        requests=len(latencies),
        ok=measured_ok,
        requests_per_second=measured_ok / seconds,
        alerts_per_second=measured_ok * alerts / seconds,
        p50_ms=percentile(ms, 0.50),
        p90_ms=percentile(ms, 0.90),
        p99_ms=percentile(ms, 0.99),
        max_ms=ms[-1] if ms else 0.0,
        errors=errors,
        statuses=dict(statuses),
        alerts_accepted=accepted,
        client_cpu_ratio=(time.process_time() - cpu_start) / wall,
        max_send_lag_ms=max(lags, default=0.0) * 1000,
    )


def load_main(argv: list[str]) -> int:
    """Child process: run one load case and print its LoadResult as JSON on stdout."""
    parser = argparse.ArgumentParser(prog="receiver.py _load")
    parser.add_argument("--url", required=True)
    parser.add_argument("--alerts", type=int, required=True)
    parser.add_argument("--case", type=int, required=True)
    parser.add_argument("--connections", type=int, required=True)
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--warmup", type=float, required=True)
    parser.add_argument("--rate", type=float, default=0.0, help="0 = closed loop")
    args = parser.parse_args(argv)
    if not args.url.startswith("http://127.0.0.1:"):
        raise SystemExit("the load generator only sends to 127.0.0.1")
    if args.rate > 0:
        result = asyncio.run(
            open_loop(args.url, args.alerts, args.case, args.connections, args.rate, args.seconds, args.warmup)
        )
    else:
        result = asyncio.run(closed_loop(args.url, args.alerts, args.case, args.connections, args.seconds, args.warmup))
    print(json.dumps(asdict(result)))
    return 0


# --------------------------------------------------------------------------- bare server (child)


def bare_main(argv: list[str]) -> int:
    """Child process: the baseline, an aiohttp handler that parses the JSON body and answers 200."""
    from aiohttp import web

    parser = argparse.ArgumentParser(prog="receiver.py _bare")
    parser.add_argument("--max-request-bytes", type=int, default=1024 * 1024)
    args = parser.parse_args(argv)

    async def webhook(request: web.Request) -> web.Response:
        json.loads(await request.read())
        return web.Response(status=200)

    app = web.Application(client_max_size=args.max_request_bytes)
    app.router.add_post(WEBHOOK_PATH, webhook)
    common.serve_on_loopback(app)
    return 0


# --------------------------------------------------------------------------- orchestration


def healer_config(workdir: Path, store: dict[str, Any]) -> Path:
    """healer with a token, the given store, no healing rules, no host exporter, no upstreams."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "token").write_text(TOKEN)
    config = {
        "server": {
            "auth": {"bearer_token_file": str(workdir / "token")},
            "shutdown_timeout": "2s",
            "max_request_bytes": 4 * 1024 * 1024,
        },
        "prometheus": {"url": CLOSED_PORT_URL, "timeout": "200ms"},
        "alertmanager": {"url": CLOSED_PORT_URL, "timeout": "200ms"},
        "store": store,
        "exporter": {"host": False},
        "healing": {"rules": []},
    }
    return common.write_yaml(workdir / "healer.yml", config)


def alerts_received(healer_url: str) -> int:
    """The alerts healer's store holds, as its status API counts them (the sum over inbox deliveries)."""
    status, body = common.http_get(f"{healer_url}/api/v1/status", timeout=30, headers=AUTH)
    if status != 200:
        raise RuntimeError(f"GET /api/v1/status: HTTP {status}: {body[:300]!r}")
    return int(json.loads(body)["healing"]["alerts_received"])


def inbox_depth(healer_url: str) -> int:
    """Alerts accepted and not yet processed, from healer's own healer_inbox_depth gauge on /metrics."""
    status, body = common.http_get(f"{healer_url}/metrics", timeout=30, headers=AUTH)
    if status != 200:
        raise RuntimeError(f"GET /metrics: HTTP {status}: {body[:300]!r}")
    for line in body.decode().splitlines():
        if line.startswith("healer_inbox_depth "):
            return int(float(line.split()[1]))
    raise RuntimeError("healer's /metrics has no healer_inbox_depth")


def wait_drained(healer_url: str, timeout: float) -> tuple[int, float, int]:
    """Wait for healer's engine to process its inbox backlog, at most `timeout` seconds.

    Return (unprocessed inbox items when called, seconds waited, unprocessed items left at the end).
    """
    backlog = left = inbox_depth(healer_url)
    start = time.monotonic()
    while left and time.monotonic() - start < timeout:
        time.sleep(0.1)
        left = inbox_depth(healer_url)
    return backlog, time.monotonic() - start, left


def wait_idle(healers: list[common.Child], timeout: float) -> dict[str, int]:
    """Wait up to `timeout` s until no healer has an inbox backlog; return the backlogs left (none when idle)."""
    deadline = time.monotonic() + timeout
    left = {healer.name: inbox_depth(healer.url) for healer in healers}
    while any(left.values()) and time.monotonic() < deadline:
        time.sleep(0.5)
        left = {healer.name: inbox_depth(healer.url) for healer in healers}
    return {name: depth for name, depth in left.items() if depth}


@dataclass
class CaseResult:
    server: str
    load: LoadResult
    server_cpu_ratio: float  # server CPU seconds / wall seconds of the case (1.0 = one core busy)
    server_cpu_us_per_alert: float
    rss_mb: float
    other_cpu_ratio: float  # CPU seconds of everything else on the machine / wall seconds
    db_cpu_ratio: float = 0.0  # CPU seconds of the PostgreSQL cluster (all its processes) / wall seconds
    inbox_backlog_after: int | None = None  # healer: unprocessed inbox items when the load stopped
    drain_seconds: float | None = None  # healer: time its engine then took to process them
    backlog_left: int | None = None  # healer: items still unprocessed when the drain wait gave up
    busy_healers_at_start: dict[str, int] = field(default_factory=dict)  # backlogs still being worked off


@dataclass
class Report:
    cpus: int
    python: str
    load_average: list[float]
    connections: int
    seconds: float
    rate: float
    rate_seconds: float
    stores: list[str] = field(default_factory=list)
    cases: list[CaseResult] = field(default_factory=list)
    checks: list[dict[str, Any]] = field(default_factory=list)
    store_alerts: dict[str, int] = field(default_factory=dict)  # per healer, from its status API
    alerts_answered_200: dict[str, int] = field(default_factory=dict)  # per healer
    rss_mb: dict[str, float] = field(default_factory=dict)
    peak_rss_mb: dict[str, float] = field(default_factory=dict)
    floors: list[Floor] = field(default_factory=list)


def run_load(
    keeper: common.Keeper, server: common.Child, alerts: int, case: int, args: argparse.Namespace, rate: float
) -> LoadResult:
    seconds = args.rate_seconds if rate > 0 else args.seconds
    argv = [
        sys.executable,
        str(Path(__file__).resolve()),
        "_load",
        "--url",
        server.url + WEBHOOK_PATH,
        "--alerts",
        str(alerts),
        "--case",
        str(case),
        "--connections",
        str(args.connections),
        "--seconds",
        str(seconds),
        "--warmup",
        str(args.warmup),
        "--rate",
        str(rate),
    ]
    out_path = keeper.workdir / f"load-{case}-{server.name}.json"
    child = keeper.start(f"load-{case}-{server.name}", argv, stdout=out_path)  # stderr goes to its log
    try:
        code = child.process.wait(seconds + args.warmup + 90)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"load generator for case {case} did not finish in time") from None
    finally:
        child.stop()
    if code != 0:
        raise RuntimeError(f"load generator failed ({code}):\n{child.log_tail()}")
    return LoadResult(**json.loads(out_path.read_text()))


def busy_seconds() -> float:
    """CPU seconds the whole machine spent not idle since boot."""
    times = psutil.cpu_times()
    return float(sum(times) - times.idle - getattr(times, "iowait", 0.0))


def children_cpu_seconds() -> float:
    """CPU seconds of this process's waited-for children (the load generators)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def tree_cpu_seconds(pid: int | None) -> float:
    """CPU seconds of a process and its live descendants (PostgreSQL: the postmaster and its backends)."""
    if pid is None:
        return 0.0
    total = 0.0
    try:
        root = psutil.Process(pid)
        processes = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    for proc in processes:
        try:
            times = proc.cpu_times()
        except psutil.Error:
            continue  # a backend that ended meanwhile; its time is lost, a slight undercount
        total += times.user + times.system
    return total


def measure(
    keeper: common.Keeper,
    server: common.Child,
    alerts: int,
    case: int,
    args: argparse.Namespace,
    rate: float,
    report: Report,
    db_pid: int | None = None,
) -> CaseResult:
    proc = psutil.Process(server.pid)
    cpu_before = sum(proc.cpu_times()[:2])
    db_before = tree_cpu_seconds(db_pid)
    machine_before = busy_seconds()
    client_before = children_cpu_seconds()
    wall_before = time.monotonic()
    load = run_load(keeper, server, alerts, case, args, rate)
    wall = time.monotonic() - wall_before
    cpu = sum(proc.cpu_times()[:2]) - cpu_before
    db = max(0.0, tree_cpu_seconds(db_pid) - db_before)
    # Whatever else ran on the machine meanwhile (other people's jobs): a disturbed case shows here.
    other = busy_seconds() - machine_before - cpu - db - (children_cpu_seconds() - client_before)
    if server.process.poll() is not None:
        raise RuntimeError(f"{server.name} died during case {case}:\n{server.log_tail()}")
    rss = common.rss_mb(server.pid)
    report.peak_rss_mb[server.name] = max(report.peak_rss_mb.get(server.name, 0.0), rss)
    total_alerts = max(1, load.alerts_accepted)
    result = CaseResult(server.name, load, cpu / wall, cpu / total_alerts * 1e6, rss, max(0.0, other / wall), db / wall)
    if server.name != "bare":
        report.alerts_answered_200[server.name] = report.alerts_answered_200.get(server.name, 0) + load.alerts_accepted
        result.inbox_backlog_after, result.drain_seconds, result.backlog_left = wait_drained(
            server.url, args.drain_timeout
        )
    return result


@dataclass
class Floor:
    """What one payload costs in this process on one thread, with nothing around it: the ceiling on the ratio."""

    alerts: int
    parse_us: float  # json.loads, all that bare does beyond aiohttp
    validate_us: float  # healer's payload model, parsing and validating in one pass
    commit_us: float  # one insert of the body into a SQLite WAL table, committed in groups of 8


def measure_floor(alerts: int, payloads: int = 400) -> Floor:
    """Time, in this process, the work healer cannot skip for one payload of `alerts` alerts."""
    from healer.healing.payload import decode_webhook  # the installed healer's own decoder

    bodies = [make_body(99, request, alerts) for request in range(payloads)]

    def per_body(work: Any) -> float:
        start = time.thread_time()
        work()
        return 1e6 * (time.thread_time() - start) / payloads

    def each(function: Any) -> None:
        for body in bodies:
            function(body)  # the result is dropped at once, as a server drops it after the request

    parse = per_body(lambda: each(json.loads))
    validate = per_body(lambda: each(decode_webhook))
    # A scratch database of the floor's own, not healer's store: healer is read only through its API.
    with tempfile.TemporaryDirectory(prefix="bench-floor-") as tmp:
        db = sqlite3.connect(Path(tmp) / "floor.db", isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")
        db.execute("CREATE TABLE inbox (id INTEGER PRIMARY KEY, body TEXT NOT NULL)")

        def commit_all() -> None:
            for group in range(0, payloads, 8):
                db.execute("BEGIN IMMEDIATE")
                db.executemany(
                    "INSERT INTO inbox (body) VALUES (CAST(? AS TEXT))", [(b,) for b in bodies[group : group + 8]]
                )
                db.execute("COMMIT")

        commit = per_body(commit_all)
        db.close()
    return Floor(alerts, parse, validate, commit)


def run(args: argparse.Namespace) -> Report:
    report = Report(
        os.cpu_count() or 0,
        sys.version.split()[0],
        [round(x, 2) for x in os.getloadavg()],
        args.connections,
        args.seconds,
        args.rate,
        args.rate_seconds,
        common.stores(args.store),
    )
    # Before any server runs, so that nothing else competes for the CPU or the disk.
    report.floors = [measure_floor(alerts) for alerts in args.sizes]
    with tempfile.TemporaryDirectory(prefix="bench-receiver-") as tmp:
        workdir = Path(tmp)
        keeper = common.Keeper(workdir)
        postgres: Any = None
        try:
            if "postgresql" in report.stores:
                progress(args, "starting PostgreSQL (tests/postgres.py)")
                postgres = common.start_postgres(workdir)
            healers = []
            for store in report.stores:
                # Not a directory named healer: `python -m healer` in its parent would import it as a package.
                home = workdir / f"store-{store}"
                section = common.store_config(store, home, postgres)
                healers.append(common.start_healer(keeper, healer_config(home, section), name=HEALER_NAMES[store]))
            bare = keeper.start("bare", [sys.executable, str(Path(__file__).resolve()), "_bare"])
            for child in [*healers, bare]:
                common.wait_listening(child)
            db_pid = postgres.pid if postgres is not None else None
            case = 0
            # The open-loop run comes after the first (smallest) closed-loop size, once healer's engine has
            # worked off that case's backlog; the large payloads leave a backlog that takes minutes.
            plan: list[tuple[int, float]] = [(args.sizes[0], 0.0), (1, args.rate)]
            plan += [(alerts, 0.0) for alerts in args.sizes[1:]]
            for alerts, rate in plan:
                for server in (bare, *healers):  # alternate, so all see the same machine noise
                    case += 1
                    if rate:
                        progress(args, f"open loop: {server.name}, {rate:g} requests/s, {args.rate_seconds:g}s")
                    else:
                        progress(args, f"closed loop: {server.name}, {alerts} alert(s)/request, {args.seconds:g}s")
                    # An engine still working off an earlier case would take the CPU from this one.
                    busy = wait_idle(healers, args.settle_timeout)
                    result = measure(keeper, server, alerts, case, args, rate, report, db_pid)
                    result.busy_healers_at_start = busy
                    report.cases.append(result)
            for healer in healers:
                report.store_alerts[healer.name] = alerts_received(healer.url)
            for server in (*healers, bare):
                report.rss_mb[server.name] = common.rss_mb(server.pid)
        finally:
            keeper.stop_all()
            if postgres is not None:
                postgres.destroy()
    report.checks = checks(report, args.sizes)
    return report


def progress(args: argparse.Namespace, message: str) -> None:
    print(f"... {message}", file=sys.stderr, flush=True)


def find(report: Report, server: str, mode: str, alerts: int) -> CaseResult:
    return next(
        c for c in report.cases if c.server == server and c.load.mode == mode and c.load.alerts_per_request == alerts
    )


def ratio_check(name: str, value: float, target: float) -> dict[str, Any]:
    """A PASS/FAIL entry: `value` at least `target`."""
    return {"check": name, "value": round(value, 3), "limit": target, "passed": value >= target}


def checks(report: Report, sizes: list[int]) -> list[dict[str, Any]]:
    result = []
    healers = [HEALER_NAMES[store] for store in report.stores]
    # Issue 9's targets are healer's on SQLite; issue 10 holds healer on PostgreSQL to healer on SQLite.
    sqlite = [name for name in healers if name == HEALER_NAMES["sqlite"]]
    for name in sqlite:
        for alerts in sizes:
            healer, bare = find(report, name, "closed", alerts), find(report, "bare", "closed", alerts)
            ratio = healer.load.alerts_per_second / max(bare.load.alerts_per_second, 1e-9)
            target = RATIO_TARGETS.get(alerts, RATIO_TARGET)
            result.append(ratio_check(f"{name} alerts/s >= {target} x bare, {alerts} alert(s)/request", ratio, target))
    if len(healers) == 2:
        for alerts in sizes:
            on_sqlite, pg = find(report, "healer", "closed", alerts), find(report, "healer-pg", "closed", alerts)
            ratio = pg.load.alerts_per_second / max(on_sqlite.load.alerts_per_second, 1e-9)
            result.append(
                ratio_check(
                    f"healer-pg alerts/s >= {POSTGRES_RATIO_TARGET} x healer (SQLite), {alerts} alert(s)/request",
                    ratio,
                    POSTGRES_RATIO_TARGET,
                )
            )
    for name in sqlite:
        healer_rate = find(report, name, "open", 1)
        result.append(
            {
                "check": f"{name} p99 < {P99_TARGET_MS:g} ms at {report.rate:g} requests/s",
                "value": round(healer_rate.load.p99_ms, 2),
                "limit": P99_TARGET_MS,
                "passed": healer_rate.load.p99_ms < P99_TARGET_MS,
            }
        )
    for name in healers:
        stored, answered = report.store_alerts.get(name, -1), report.alerts_answered_200.get(name, 0)
        result.append(
            {
                "check": f"{name} inbox alerts == alerts answered 200",
                "value": stored,
                "limit": answered,
                "passed": stored == answered,
            }
        )
    return result


def print_report(report: Report) -> None:
    print(
        f"receiver benchmark: {report.cpus} CPUs (load average at start {report.load_average}),"
        f" Python {report.python}, {report.connections} connections,"
        f" closed loop {report.seconds:g}s per case, open loop {report.rate:g} req/s for {report.rate_seconds:g}s,"
        f" healer store(s): {', '.join(f'{HEALER_NAMES[s]} on {s}' for s in report.stores)}"
    )
    print()
    header = (
        f"{'mode':<7}{'server':<10}{'alerts/req':>10}{'req/s':>10}{'alerts/s':>10}{'p50 ms':>9}"
        f"{'p99 ms':>9}{'max ms':>9}{'non-200':>8}{'srv cpu':>8}{'us/alert':>9}{'cli cpu':>8}{'other':>6}"
        f"{'db cpu':>7}{'RSS MB':>8}"
        f"{'backlog':>8}{'drain s':>8}"
    )
    print(header)
    for c in report.cases:
        load = c.load
        non_ok = sum(n for s, n in load.statuses.items() if s != "200") + load.errors
        backlog = "" if c.inbox_backlog_after is None else str(c.inbox_backlog_after)
        drain = "" if c.drain_seconds is None else f"{c.drain_seconds:.1f}"
        if c.backlog_left:
            drain = f">{c.drain_seconds:.0f}"
        print(
            f"{load.mode:<7}{c.server:<10}{load.alerts_per_request:>10}{load.requests_per_second:>10.0f}"
            f"{load.alerts_per_second:>10.0f}{load.p50_ms:>9.2f}{load.p99_ms:>9.2f}{load.max_ms:>9.1f}"
            f"{non_ok:>8}{c.server_cpu_ratio:>8.2f}{c.server_cpu_us_per_alert:>9.0f}{load.client_cpu_ratio:>8.2f}"
            f"{c.other_cpu_ratio:>6.2f}{c.db_cpu_ratio:>7.2f}"
            f"{c.rss_mb:>8.1f}{backlog:>8}{drain:>8}"
        )
    print()
    healers = [HEALER_NAMES[store] for store in report.stores]
    pairs = [(name, "bare") for name in healers] + ([("healer-pg", "healer")] if len(healers) == 2 else [])
    for alerts in sorted({c.load.alerts_per_request for c in report.cases if c.load.mode == "closed"}):
        for left_name, right_name in pairs:
            left, right = find(report, left_name, "closed", alerts), find(report, right_name, "closed", alerts)
            print(
                f"{left_name}/{right_name}, {alerts} alert(s)/request: alerts/s {left.load.alerts_per_second:.0f}/"
                f"{right.load.alerts_per_second:.0f} = "
                f"{left.load.alerts_per_second / max(right.load.alerts_per_second, 1e-9):.3f}; p50 "
                f"{left.load.p50_ms:.2f}/{right.load.p50_ms:.2f} ms; p99 {left.load.p99_ms:.2f}/"
                f"{right.load.p99_ms:.2f} ms"
            )
    for c in report.cases:
        if c.inbox_backlog_after and c.drain_seconds:
            done = c.inbox_backlog_after - (c.backlog_left or 0)
            print(
                f"{c.server} engine after the {c.load.mode}-loop {c.load.alerts_per_request}-alert case: processed"
                f" {done} of {c.inbox_backlog_after} queued alerts in {c.drain_seconds:.1f} s"
                f" = {done / c.drain_seconds:.0f} alerts/s with no webhook traffic"
            )
    for c in report.cases:
        if c.busy_healers_at_start:
            print(
                f"DISTURBED: the {c.load.mode}-loop {c.load.alerts_per_request}-alert case of {c.server} started while"
                f" {c.busy_healers_at_start} inbox items were still being worked off (--settle-timeout)"
            )
    for name in healers:
        print(
            f"{name} store: {report.store_alerts.get(name)} alerts received (/api/v1/status);"
            f" {report.alerts_answered_200.get(name, 0)} alerts answered 200"
        )
    for floor in report.floors:
        bare = find(report, "bare", "closed", floor.alerts)
        bare_us = bare.server_cpu_us_per_alert * floor.alerts
        validating = bare_us / (bare_us - floor.parse_us + floor.validate_us)
        committing = bare_us / (bare_us - floor.parse_us + floor.validate_us + floor.commit_us)
        print(
            f"floor, {floor.alerts} alert(s)/payload, one thread: json.loads {floor.parse_us:.0f} us, healer's"
            f" validation {floor.validate_us:.0f} us, SQLite commit {floor.commit_us:.0f} us; bare's whole request"
            f" {bare_us:.0f} us of CPU. healer/bare at most {validating:.2f} with validation in place of"
            f" json.loads and nothing else, {committing:.2f} with the commit on the same core too"
        )
    print(
        "RSS at the end: "
        + ", ".join(f"{k} {v:.1f} MB" for k, v in report.rss_mb.items())
        + "; peak after a case: "
        + ", ".join(f"{k} {v:.1f} MB" for k, v in report.peak_rss_mb.items())
    )
    print(
        "(srv cpu / cli cpu / other: CPU seconds per wall second of the server / the load generator / everything"
        " else on the machine; db cpu: the PostgreSQL cluster's, not counted in other; us/alert: server CPU per"
        " alert answered 200, PostgreSQL's not included; backlog: inbox items healer's engine had not yet"
        " processed when the load stopped)"
    )
    print()
    for check in report.checks:
        verdict = "PASS" if check["passed"] else "FAIL"
        print(f"{verdict}  {check['check']}: {check['value']} (limit {check['limit']})")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_load"]:
        return load_main(argv[1:])
    if argv[:1] == ["_bare"]:
        return bare_main(argv[1:])
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=10.0, help="measured seconds per closed-loop case")
    parser.add_argument("--warmup", type=float, default=1.0, help="unmeasured seconds before each case")
    parser.add_argument("--connections", type=int, default=32)
    parser.add_argument(
        "--sizes",
        type=lambda s: [int(x) for x in s.split(",")],
        default=[1, 50],
        help="alerts per request, comma separated (default 1,50)",
    )
    parser.add_argument("--rate", type=float, default=200.0, help="requests/s of the open-loop run")
    parser.add_argument("--rate-seconds", type=float, default=10.0)
    parser.add_argument(
        "--drain-timeout",
        type=float,
        default=60.0,
        help="after each healer case, wait at most this long for its engine to work off the inbox"
        " backlog (the rate it does so is reported)",
    )
    parser.add_argument(
        "--settle-timeout",
        type=float,
        default=300.0,
        help="before each case, wait at most this long until no healer has a backlog left (reported if one has)",
    )
    parser.add_argument(
        "--store",
        choices=["sqlite", "postgresql", "both"],
        default="sqlite",
        help="healer's store: an SQLite file (default), a PostgreSQL started for the run, or both side by side",
    )
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    args = parser.parse_args(argv)
    if not (
        0 < args.seconds <= 600
        and 0 < args.rate_seconds <= 600
        and 1 <= args.connections <= 1024
        and 0 < args.rate <= 20000
        and all(1 <= s <= 10000 for s in args.sizes)
        and 0 <= args.warmup <= 60
    ):
        parser.error("out of bounds: seconds <= 600, connections 1..1024, rate <= 20000, sizes 1..10000")
    # A failed check is reported by its FAIL line; non-zero means the benchmark itself failed.
    return common.emit(run(args), args.json, print_report)


if __name__ == "__main__":
    sys.exit(main())
