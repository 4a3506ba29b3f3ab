"""Benchmark healer's /metrics scrape against node_exporter's, in the same run.

What it measures
----------------
The wall time of one Prometheus-style scrape of ``GET /metrics`` (request sent, full body
read) over a keep-alive HTTP connection, as Prometheus would see it from this host, plus the
size of what comes back (series and bytes) and the resident memory of the server afterwards.

The baseline
------------
``prometheus-node-exporter`` with its default collectors, started by this script beside
healer and scraped alternately with it, round by round. The machine running the benchmarks is
shared and noisy, so absolute milliseconds drift from run to run; scraping both servers
interleaved exposes them to the same noise, and the healer/node_exporter ratios are the
figures to compare between runs.

The healer under test runs ``python -m healer serve`` with a config written to a temporary
directory: the host collector on, two watched processes (one found by command-line regex, one
by pidfile, both sleepers this script spawns) and one HTTP probe of a tiny http.server target
every second. ``--processes N`` adds N idle sleepers to the process table: healer walks the
process table off the scrape path (every ``exporter.process_scan_interval``), so its scrape
time should not grow with N.

Targets checked at the end: healer's p50 is at most node_exporter's p50 and below 5 ms, and
healer's RSS is below 60 MB (1 MB = 10**6 bytes).

Run ``python bench/scrape.py --help`` for the options. Everything started is stopped by its
own PID on exit, also on error or Ctrl-C.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

import psutil

# isort: split
import common  # bench/common.py: `python bench/scrape.py` puts bench/ first on sys.path

NODE_EXPORTER = shutil.which("prometheus-node-exporter") or "/usr/bin/prometheus-node-exporter"
SLEEP = shutil.which("sleep") or "/bin/sleep"
PROMETHEUS_TEXT_FORMAT = "text/plain;version=0.0.4"
P50_LIMIT_MS = 5.0
RSS_LIMIT_MB = 60.0
# A sleeper outlives the benchmark by at most this long if the benchmark itself is SIGKILLed.
SLEEPER_SECONDS = "3600"


# --------------------------------------------------------------------------- servers


def start_sleeper(keeper: common.Keeper, name: str, process_title: str) -> common.Child:
    """Start `sleep` with argv[0] set to `process_title`, so a cmdline regex can single it out."""
    return keeper.start(name, [process_title, SLEEPER_SECONDS], executable=SLEEP, log=False)


def start_probe_target(keeper: common.Keeper, workdir: Path) -> str:
    """Serve a tiny static directory with http.server for healer's probe to hit; return its URL."""
    docroot = workdir / "probe-target"
    docroot.mkdir()
    (docroot / "index.html").write_text("ok\n")
    port = common.free_port()
    argv = [
        sys.executable,
        "-m",
        "http.server",
        str(port),
        "--bind",
        "127.0.0.1",
        "--directory",
        str(docroot),
    ]
    target = keeper.start("probe-target", argv)
    common.wait_ready(target, f"http://127.0.0.1:{port}", "/")
    return f"{target.url}/"


def write_healer_config(workdir: Path, watched_title: str, pidfile: Path, probe_url: str) -> Path:
    # Upstreams point at ports nobody listens on, so healer's readiness checks of Prometheus
    # and Alertmanager stay on this benchmark and do not poke other people's servers.
    config: dict[str, Any] = {
        "prometheus": {"url": f"http://127.0.0.1:{common.free_port()}"},
        "alertmanager": {"url": f"http://127.0.0.1:{common.free_port()}"},
        "store": {"path": str(workdir / "healer.db")},
        "exporter": {
            "host": True,
            "processes": [
                {"name": "bench_sleeper_by_cmdline", "cmdline": f"^{watched_title}( |$)"},
                {"name": "bench_sleeper_by_pidfile", "pidfile": str(pidfile)},
            ],
            "probes": [{"name": "bench_target", "url": probe_url, "interval": "1s", "timeout": "1s"}],
        },
    }
    return common.write_yaml(workdir / "healer.yml", config)


def start_node_exporter(keeper: common.Keeper) -> common.Child:
    port = common.free_port()
    node_exporter = keeper.start("node_exporter", [NODE_EXPORTER, f"--web.listen-address=127.0.0.1:{port}"])
    common.wait_ready(node_exporter, f"http://127.0.0.1:{port}", "/metrics")
    return node_exporter


# --------------------------------------------------------------------------- scraping


@dataclass
class ScrapeTarget:
    """One server under test and what its scrapes took."""

    name: str
    process: common.Child
    latencies_seconds: list[float] = field(default_factory=list)
    last_body: bytes = b""
    _connection: http.client.HTTPConnection | None = None

    def scrape(self) -> float:
        """Scrape /metrics once over the kept-alive connection; return the wall time in seconds."""
        if self._connection is None:
            address = urllib.parse.urlsplit(self.process.url)
            self._connection = http.client.HTTPConnection(address.hostname or "", address.port, timeout=10)
        started = time.perf_counter()
        self._connection.request("GET", "/metrics", headers={"Accept": PROMETHEUS_TEXT_FORMAT})
        response = self._connection.getresponse()
        body = response.read()
        elapsed = time.perf_counter() - started
        if response.status != 200:
            raise RuntimeError(f"{self.name} /metrics answered {response.status}: {body[:300]!r}")
        if response.will_close:
            # Keep-alive is part of what we measure; a server that closes would pay a reconnect.
            self.close()
        self.last_body = body
        return elapsed

    def close(self) -> None:
        if self._connection is not None:
            self._connection.close()
            self._connection = None


def count_series(body: bytes) -> int:
    """Count the sample lines of a text-format exposition: neither comments nor blank."""
    return sum(1 for line in body.splitlines() if line.strip() and not line.startswith(b"#"))


def collector_durations_ms(healer_body: bytes) -> dict[str, float]:
    """Read healer's own `healer_collector_duration_seconds` per collector from a scrape body."""
    durations: dict[str, float] = {}
    for line in healer_body.decode(errors="replace").splitlines():
        if line.startswith("healer_collector_duration_seconds{"):
            labels, _, value = line.rpartition(" ")
            collector = labels.split('collector="', 1)[1].split('"', 1)[0]
            durations[collector] = round(float(value) * 1000, 3)
    return durations


HEALER_WORKLOAD_SAMPLES = (
    'healer_process_up{process="bench_sleeper_by_cmdline"} 1.0',
    'healer_process_up{process="bench_sleeper_by_pidfile"} 1.0',
    'healer_probe_up{probe="bench_target"} 1.0',
)


def missing_workload_samples(healer_body: bytes) -> list[str]:
    """Return the samples showing healer sees both sleepers and a good probe that the body lacks."""
    lines = set(healer_body.decode(errors="replace").splitlines())
    return [sample for sample in HEALER_WORKLOAD_SAMPLES if sample not in lines]


def wait_until_healer_sees_its_workload(healer: ScrapeTarget, timeout: float = 10.0) -> None:
    """Make sure the config is exercised: both watched processes found and the probe succeeding."""
    deadline = time.monotonic() + timeout
    while True:
        healer.scrape()
        missing = missing_workload_samples(healer.last_body)
        if not missing:
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"after {timeout}s healer's scrape still lacks {missing}")
        time.sleep(0.2)


def run_rounds(targets: list[ScrapeTarget], rounds: int, *, record: bool) -> None:
    """Scrape the targets alternately; who goes first swaps every round, to cancel order effects."""
    for round_number in range(rounds):
        order = targets if round_number % 2 == 0 else list(reversed(targets))
        for target in order:
            elapsed = target.scrape()
            if record:
                target.latencies_seconds.append(elapsed)


# --------------------------------------------------------------------------- results


@dataclass
class ServerResult:
    name: str
    pid: int
    p50_ms: float
    p99_ms: float
    mean_ms: float
    series: int
    body_bytes: int
    rss_mb: float


def summarise(target: ScrapeTarget) -> ServerResult:
    latencies_ms = [seconds * 1000 for seconds in target.latencies_seconds]
    percentiles = statistics.quantiles(latencies_ms, n=100, method="inclusive")
    return ServerResult(
        name=target.name,
        pid=target.process.pid,
        p50_ms=round(statistics.median(latencies_ms), 3),
        p99_ms=round(percentiles[98], 3),
        mean_ms=round(statistics.fmean(latencies_ms), 3),
        series=count_series(target.last_body),
        body_bytes=len(target.last_body),
        rss_mb=round(common.rss_mb(target.process.pid), 1),
    )


def ratio(numerator: float, denominator: float) -> float | None:
    return round(numerator / denominator, 2) if denominator else None


def build_report(
    healer: ServerResult,
    node_exporter: ServerResult,
    *,
    rounds: int,
    extra_processes: int,
    host_processes: int,
    healer_collectors_ms: dict[str, float],
) -> dict[str, Any]:
    p50_pass = healer.p50_ms <= node_exporter.p50_ms and healer.p50_ms < P50_LIMIT_MS
    return {
        "rounds": rounds,
        "extra_processes": extra_processes,
        "host_processes": host_processes,
        "healer": asdict(healer),
        "node_exporter": asdict(node_exporter),
        "ratios_healer_over_node_exporter": {
            "p50": ratio(healer.p50_ms, node_exporter.p50_ms),
            "p99": ratio(healer.p99_ms, node_exporter.p99_ms),
            "series": ratio(healer.series, node_exporter.series),
            "rss": ratio(healer.rss_mb, node_exporter.rss_mb),
        },
        "healer_collector_duration_ms_last_scrape": healer_collectors_ms,
        "checks": {
            "p50_at_most_node_exporter_and_below_5ms": p50_pass,
            "rss_below_60mb": healer.rss_mb < RSS_LIMIT_MB,
        },
    }


def print_report(report: dict[str, Any]) -> None:
    def verdict(passed: bool) -> str:
        return "PASS" if passed else "FAIL"

    print(
        f"rounds: {report['rounds']} (interleaved), "
        f"extra idle processes: {report['extra_processes']}, "
        f"host processes: {report['host_processes']}"
    )
    header = f"{'server':<14}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}{'series':>8}{'bytes':>9}{'RSS MB':>9}"
    print(header)
    print("-" * len(header))
    for key in ("healer", "node_exporter"):
        row = report[key]
        print(
            f"{row['name']:<14}{row['p50_ms']:>9.3f}{row['p99_ms']:>9.3f}{row['mean_ms']:>9.3f}"
            f"{row['series']:>8}{row['body_bytes']:>9}{row['rss_mb']:>9.1f}"
        )
    ratios = report["ratios_healer_over_node_exporter"]
    print("healer/node_exporter: " + ", ".join(f"{name} {value}" for name, value in ratios.items()))
    collectors = report["healer_collector_duration_ms_last_scrape"]
    if collectors:
        print(
            "healer collector durations, last scrape (ms): "
            + ", ".join(f"{name} {value}" for name, value in collectors.items())
        )
    checks = report["checks"]
    print(
        f"target p50 <= node_exporter p50 and < {P50_LIMIT_MS:g} ms: "
        f"{verdict(checks['p50_at_most_node_exporter_and_below_5ms'])}"
    )
    print(f"target RSS < {RSS_LIMIT_MB:g} MB: {verdict(checks['rss_below_60mb'])}")


# --------------------------------------------------------------------------- main


@contextmanager
def stop_on_termination_signals() -> Iterator[None]:
    """Turn SIGTERM and SIGHUP into SystemExit, so that the cleanup in `finally` runs."""

    def exit_cleanly(signum: int, frame: FrameType | None) -> None:
        raise SystemExit(128 + signum)

    previous = {signum: signal.signal(signum, exit_cleanly) for signum in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument("--rounds", type=int, default=500, help="measured rounds; each scrapes both servers once")
    parser.add_argument("--warmup", type=int, default=30, help="unmeasured rounds before measuring")
    parser.add_argument("--processes", type=int, default=0, help="extra idle sleeper processes to spawn")
    parser.add_argument("--json", action="store_true", help="also print the results as one JSON object")
    args = parser.parse_args(argv)
    if args.rounds < 2:
        parser.error("--rounds must be at least 2")
    if args.warmup < 0 or args.processes < 0:
        parser.error("--warmup and --processes must not be negative")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not os.access(NODE_EXPORTER, os.X_OK):
        print(f"node_exporter not found at {NODE_EXPORTER}", file=sys.stderr)
        return 2
    run_id = uuid.uuid4().hex[:12]
    with (
        tempfile.TemporaryDirectory(prefix="healer-bench-scrape-") as tmp,
        stop_on_termination_signals(),
    ):
        workdir = Path(tmp)
        keeper = common.Keeper(workdir)
        targets: list[ScrapeTarget] = []
        try:
            watched_title = f"healer-bench-watched-{run_id}"
            start_sleeper(keeper, "sleeper-by-cmdline", watched_title)
            pidfile_sleeper = start_sleeper(keeper, "sleeper-by-pidfile", f"healer-bench-pidfile-{run_id}")
            pidfile = workdir / "sleeper.pid"
            pidfile.write_text(f"{pidfile_sleeper.pid}\n")
            for index in range(args.processes):
                start_sleeper(keeper, f"idle-{index}", f"healer-bench-idle-{run_id}")
            probe_url = start_probe_target(keeper, workdir)

            config_path = write_healer_config(workdir, watched_title, pidfile, probe_url)
            healer = common.start_healer(keeper, config_path)
            common.wait_listening(healer)
            targets = [
                ScrapeTarget("healer", healer),
                ScrapeTarget("node_exporter", start_node_exporter(keeper)),
            ]

            run_rounds(targets, args.warmup, record=False)
            wait_until_healer_sees_its_workload(targets[0])
            run_rounds(targets, args.rounds, record=True)
            host_processes = len(psutil.pids())

            healer_result, node_result = (summarise(target) for target in targets)
            report = build_report(
                healer_result,
                node_result,
                rounds=args.rounds,
                extra_processes=args.processes,
                host_processes=host_processes,
                healer_collectors_ms=collector_durations_ms(targets[0].last_body),
            )
            print_report(report)
            if args.json:
                print(json.dumps(report, sort_keys=False))
        except Exception:
            for target in targets:
                if tail := target.process.log_tail(10):
                    print(f"--- last lines of {target.name}'s log ---\n{tail}", file=sys.stderr)
            raise
        finally:
            for target in targets:
                target.close()
            keeper.stop_all()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:  # everything started was already stopped in main's `finally`
        print("interrupted", file=sys.stderr)
        sys.exit(130)
