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
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import psutil
import yaml

T = TypeVar("T")

NODE_EXPORTER = shutil.which("prometheus-node-exporter") or "/usr/bin/prometheus-node-exporter"
SLEEP = shutil.which("sleep") or "/bin/sleep"
PROMETHEUS_TEXT_FORMAT = "text/plain;version=0.0.4"
MEGABYTE = 1_000_000
P50_LIMIT_MS = 5.0
RSS_LIMIT_MB = 60.0
# A sleeper outlives the benchmark by at most this long if the benchmark itself is SIGKILLed.
SLEEPER_SECONDS = "3600"
STOP_TIMEOUT_SECONDS = 10.0


# --------------------------------------------------------------------------- processes


@dataclass
class StartedProcess:
    """A child process this benchmark started and must stop by its PID."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path | None = None

    @property
    def pid(self) -> int:
        return self.process.pid

    def log_tail(self, lines: int = 30) -> str:
        if self.log_path is None or not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])

    def exit_error(self) -> RuntimeError | None:
        """Return an error describing the exit if the process has already exited."""
        if self.process.poll() is None:
            return None
        code = self.process.returncode
        return RuntimeError(f"{self.name} (pid {self.pid}) exited with {code}:\n{self.log_tail()}")


class ProcessKeeper:
    """Starts child processes and stops each one by its own PID: terminate, wait, kill."""

    def __init__(self, workdir: Path) -> None:
        self._workdir = workdir
        self._started: list[StartedProcess] = []

    def start(
        self, name: str, argv: list[str], *, executable: str | None = None, log: bool = True
    ) -> StartedProcess:
        log_path = self._workdir / f"{name}.log" if log else None
        output = log_path.open("wb") if log_path else subprocess.DEVNULL
        try:
            process = subprocess.Popen(
                argv,
                executable=executable,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
                cwd=self._workdir,
            )
        finally:
            if log_path:
                output.close()  # type: ignore[union-attr]
        started = StartedProcess(name, process, log_path)
        self._started.append(started)
        return started

    def stop_all(self) -> None:
        """Terminate every started process (newest first), then wait, then kill the stragglers."""
        running = [p for p in reversed(self._started) if p.process.poll() is None]
        for started in running:
            with suppress(ProcessLookupError):
                started.process.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        for started in running:
            try:
                started.process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                started.process.kill()
                started.process.wait(STOP_TIMEOUT_SECONDS)
        self._started.clear()


# --------------------------------------------------------------------------- helpers


def free_port() -> int:
    """Return a loopback port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(
    check: Callable[[], T | None], what: str, timeout: float = 30.0, interval: float = 0.05
) -> T:
    """Call `check` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (OSError, http.client.HTTPException) as exc:  # not up yet
            last_error = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}; last error: {last_error!r}")


def http_status(host: str, port: int, path: str) -> int:
    connection = http.client.HTTPConnection(host, port, timeout=2)
    try:
        connection.request("GET", path)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def wait_until_serving(started: StartedProcess, host: str, port: int, path: str) -> None:
    def serving() -> bool:
        if error := started.exit_error():
            raise error
        return http_status(host, port, path) == 200

    wait_for(serving, f"{started.name} to answer {path} on {host}:{port}")


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host.strip("[]"), int(port)


# --------------------------------------------------------------------------- servers


def start_sleeper(keeper: ProcessKeeper, name: str, process_title: str) -> StartedProcess:
    """Start `sleep` with argv[0] set to `process_title`, so a cmdline regex can single it out."""
    return keeper.start(name, [process_title, SLEEPER_SECONDS], executable=SLEEP, log=False)


def start_probe_target(keeper: ProcessKeeper, workdir: Path) -> tuple[StartedProcess, str]:
    """Serve a tiny static directory with http.server for healer's probe to hit."""
    docroot = workdir / "probe-target"
    docroot.mkdir()
    (docroot / "index.html").write_text("ok\n")
    port = free_port()
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
    wait_until_serving(target, "127.0.0.1", port, "/")
    return target, f"http://127.0.0.1:{port}/"


def write_healer_config(workdir: Path, watched_title: str, pidfile: Path, probe_url: str) -> Path:
    # Upstreams point at ports nobody listens on, so healer's readiness checks of Prometheus
    # and Alertmanager stay on this benchmark and do not poke other people's servers.
    config: dict[str, Any] = {
        "prometheus": {"url": f"http://127.0.0.1:{free_port()}"},
        "alertmanager": {"url": f"http://127.0.0.1:{free_port()}"},
        "store": {"path": str(workdir / "healer.db")},
        "exporter": {
            "host": True,
            "processes": [
                {"name": "bench_sleeper_by_cmdline", "cmdline": f"^{watched_title}( |$)"},
                {"name": "bench_sleeper_by_pidfile", "pidfile": str(pidfile)},
            ],
            "probes": [
                {"name": "bench_target", "url": probe_url, "interval": "1s", "timeout": "1s"}
            ],
        },
    }
    config_path = workdir / "healer.yml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return config_path


def start_healer(keeper: ProcessKeeper, config_path: Path) -> tuple[StartedProcess, str, int]:
    """Start healer on 127.0.0.1:0 and read the bound address from its JSON `listening` log line."""
    argv = [
        sys.executable,
        "-m",
        "healer",
        "serve",
        "-c",
        str(config_path),
        "--listen",
        "127.0.0.1:0",
        "--log-format",
        "json",
    ]
    healer = keeper.start("healer", argv)
    assert healer.log_path is not None
    log_path = healer.log_path

    def listening_address() -> str | None:
        if error := healer.exit_error():
            raise error
        for line in log_path.read_text(errors="replace").splitlines():
            if not line.startswith("{"):
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line still being written
            if entry.get("event") == "listening":
                return str(entry["address"])
        return None

    host, port = split_address(wait_for(listening_address, "healer's 'listening' log line"))
    wait_until_serving(healer, host, port, "/-/ready")
    return healer, host, port


def start_node_exporter(keeper: ProcessKeeper) -> tuple[StartedProcess, str, int]:
    port = free_port()
    node_exporter = keeper.start(
        "node_exporter", [NODE_EXPORTER, f"--web.listen-address=127.0.0.1:{port}"]
    )
    wait_until_serving(node_exporter, "127.0.0.1", port, "/metrics")
    return node_exporter, "127.0.0.1", port


# --------------------------------------------------------------------------- scraping


@dataclass
class ScrapeTarget:
    """One server under test and what its scrapes took."""

    name: str
    process: StartedProcess
    host: str
    port: int
    latencies_seconds: list[float] = field(default_factory=list)
    last_body: bytes = b""
    _connection: http.client.HTTPConnection | None = None

    def scrape(self) -> float:
        """Scrape /metrics once over the kept-alive connection; return the wall time in seconds."""
        if self._connection is None:
            self._connection = http.client.HTTPConnection(self.host, self.port, timeout=10)
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
    rss_bytes = psutil.Process(target.process.pid).memory_info().rss
    return ServerResult(
        name=target.name,
        pid=target.process.pid,
        p50_ms=round(statistics.median(latencies_ms), 3),
        p99_ms=round(percentiles[98], 3),
        mean_ms=round(statistics.fmean(latencies_ms), 3),
        series=count_series(target.last_body),
        body_bytes=len(target.last_body),
        rss_mb=round(rss_bytes / MEGABYTE, 1),
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
    header = (
        f"{'server':<14}{'p50 ms':>9}{'p99 ms':>9}{'mean ms':>9}"
        f"{'series':>8}{'bytes':>9}{'RSS MB':>9}"
    )
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

    previous = {
        signum: signal.signal(signum, exit_cleanly) for signum in (signal.SIGTERM, signal.SIGHUP)
    }
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0] if __doc__ else None)
    parser.add_argument(
        "--rounds", type=int, default=500, help="measured rounds; each scrapes both servers once"
    )
    parser.add_argument("--warmup", type=int, default=30, help="unmeasured rounds before measuring")
    parser.add_argument(
        "--processes", type=int, default=0, help="extra idle sleeper processes to spawn"
    )
    parser.add_argument(
        "--json", action="store_true", help="also print the results as one JSON object"
    )
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
        keeper = ProcessKeeper(workdir)
        targets: list[ScrapeTarget] = []
        try:
            watched_title = f"healer-bench-watched-{run_id}"
            start_sleeper(keeper, "sleeper-by-cmdline", watched_title)
            pidfile_sleeper = start_sleeper(
                keeper, "sleeper-by-pidfile", f"healer-bench-pidfile-{run_id}"
            )
            pidfile = workdir / "sleeper.pid"
            pidfile.write_text(f"{pidfile_sleeper.pid}\n")
            for index in range(args.processes):
                start_sleeper(keeper, f"idle-{index}", f"healer-bench-idle-{run_id}")
            _, probe_url = start_probe_target(keeper, workdir)

            config_path = write_healer_config(workdir, watched_title, pidfile, probe_url)
            healer, healer_host, healer_port = start_healer(keeper, config_path)
            node_exporter, node_host, node_port = start_node_exporter(keeper)
            targets = [
                ScrapeTarget("healer", healer, healer_host, healer_port),
                ScrapeTarget("node_exporter", node_exporter, node_host, node_port),
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
