"""Collectors against a fresh registry: real psutil readings, and degradation when the OS refuses."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from healer.config import ExporterConfig, ProbeConfig, ProcessWatch
from healer.exporter.host import HostCollector
from healer.exporter.probes import ProbeMetrics, Prober
from healer.exporter.processes import ProcessCollector, ProcessFinder
from healer.exporter.stats import CollectorStats, StatsCollector
from tests.servers import wait_for


def registry_with(*collectors: Any) -> CollectorRegistry:
    registry = CollectorRegistry()
    for collector in collectors:
        registry.register(collector)
    return registry


class RefusingPsutil:
    """psutil, except that the named calls raise as an unprivileged or containerised host would."""

    def __init__(self, refuse: dict[str, BaseException]) -> None:
        self._refuse = refuse

    def __getattr__(self, name: str) -> Any:
        if name in self._refuse:
            error = self._refuse[name]

            def refused(*args: Any, **kwargs: Any) -> Any:
                raise error

            return refused
        return getattr(psutil, name)


def start_sleeper(marker: str) -> subprocess.Popen[bytes]:
    """Start an idle process with `marker` in its command line, once the command line shows it."""
    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", marker])
    # Until the child has exec'd, its command line is still the parent's and a scan would miss it.
    wait_for(lambda: marker in " ".join(psutil.Process(process.pid).cmdline()), 10, 0.01, what="sleeper exec'd")
    return process


@pytest.fixture
def sleeper() -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    """A real idle process with a unique marker in its command line."""
    marker = f"healer-test-{uuid.uuid4().hex[:12]}"
    process = start_sleeper(marker)
    yield process, marker
    if process.poll() is None:
        process.kill()
        process.wait()


def test_host_reports_real_readings() -> None:
    """The host collector reports the machine's memory, CPU time and root filesystem."""
    stats = CollectorStats()
    registry = registry_with(HostCollector(ExporterConfig(), stats), StatsCollector(stats))
    assert registry.get_sample_value("healer_host_memory_total_bytes") == psutil.virtual_memory().total
    assert registry.get_sample_value("healer_host_cpu_seconds_total", {"mode": "idle"}) > 0
    assert registry.get_sample_value("healer_host_cpus") == psutil.cpu_count()
    root = next(p for p in psutil.disk_partitions() if p.mountpoint == "/")
    labels = {"device": root.device, "mountpoint": "/", "fstype": root.fstype}
    size = registry.get_sample_value("healer_host_filesystem_size_bytes", labels)
    avail = registry.get_sample_value("healer_host_filesystem_avail_bytes", labels)
    assert size is not None and avail is not None and 0 < avail <= size
    assert registry.get_sample_value("healer_host_network_receive_bytes_total", {"device": "lo"}) is not None
    assert registry.get_sample_value("healer_host_processes") > 1
    assert registry.get_sample_value("healer_collector_errors_total", {"collector": "host"}) == 0
    assert registry.get_sample_value("healer_collector_duration_seconds", {"collector": "host"}) > 0


def test_pseudo_filesystems_are_filtered() -> None:
    """Mounts whose fstype matches the exclusion regex are not exported."""
    config = ExporterConfig.model_validate({"filesystems": {"exclude_fstypes": "^ext4$"}})
    registry = registry_with(HostCollector(config, CollectorStats()))
    exported = {s.labels["fstype"] for m in registry.collect() for s in m.samples if "filesystem" in s.name}
    assert "ext4" not in exported


def test_refused_part_is_left_out_and_counted() -> None:
    """When the OS refuses disk and network counters, the other families still appear and errors are counted."""
    stats = CollectorStats()
    ps = RefusingPsutil({"disk_io_counters": PermissionError(13, "denied"), "net_io_counters": OSError(5, "EIO")})
    registry = registry_with(HostCollector(ExporterConfig(), stats, ps=ps), StatsCollector(stats))
    names = {metric.name for metric in registry.collect()}
    assert "healer_host_disk_read_bytes" not in names
    assert "healer_host_network_receive_bytes" not in names
    assert "healer_host_memory_total_bytes" in names
    # Each scrape counts both refusals again; this is the second scrape.
    assert registry.get_sample_value("healer_collector_errors_total", {"collector": "host"}) == 4


def test_unreadable_mount_hides_only_itself() -> None:
    """A mount whose statvfs fails is left out; the other mounts are still exported."""
    from types import SimpleNamespace

    partitions = [
        SimpleNamespace(device="/dev/ok", mountpoint="/", fstype="ext4"),
        SimpleNamespace(device="nfs:/x", mountpoint="/mnt/stale", fstype="nfs4"),
    ]

    def statvfs(path: str) -> os.statvfs_result:
        if path == "/mnt/stale":
            raise OSError(116, "Stale file handle")
        return os.statvfs("/")

    class Partitions(RefusingPsutil):
        def disk_partitions(self, all: bool = False) -> list[Any]:
            return partitions

    stats = CollectorStats()
    registry = registry_with(HostCollector(ExporterConfig(), stats, ps=Partitions({}), statvfs=statvfs))
    assert (
        registry.get_sample_value(
            "healer_host_filesystem_size_bytes", {"device": "/dev/ok", "mountpoint": "/", "fstype": "ext4"}
        )
        is not None
    )
    assert (
        registry.get_sample_value(
            "healer_host_filesystem_size_bytes", {"device": "nfs:/x", "mountpoint": "/mnt/stale", "fstype": "nfs4"}
        )
        is None
    )
    assert stats.errors["host"] == 2  # one per scrape, two scrapes


def test_watched_process_up_then_down(sleeper: tuple[subprocess.Popen[bytes], str]) -> None:
    """A process found by command-line regex is up with its real readings, and down once killed."""
    process, marker = sleeper
    finder = ProcessFinder([ProcessWatch(name="sleeper", cmdline=marker)])
    finder.scan()
    registry = registry_with(ProcessCollector(finder, CollectorStats()))
    labels = {"process": "sleeper"}
    assert registry.get_sample_value("healer_process_up", labels) == 1
    assert registry.get_sample_value("healer_process_instances", labels) == 1
    assert registry.get_sample_value("healer_process_resident_memory_bytes", labels) > 1_000_000
    assert registry.get_sample_value("healer_process_threads", labels) >= 1
    assert registry.get_sample_value("healer_process_open_fds", labels) >= 3
    created = psutil.Process(process.pid).create_time()
    assert registry.get_sample_value("healer_process_start_time_seconds", labels) == pytest.approx(created)
    process.kill()
    process.wait()
    # No rescan: a vanished PID is noticed at scrape time.
    assert registry.get_sample_value("healer_process_up", labels) == 0
    assert registry.get_sample_value("healer_process_instances", labels) == 0
    assert registry.get_sample_value("healer_process_resident_memory_bytes", labels) is None


def test_pidfile_process(tmp_path: Path, sleeper: tuple[subprocess.Popen[bytes], str]) -> None:
    """A process found by pidfile is up while the pidfile names a live process, down when it does not."""
    process, _ = sleeper
    pidfile = tmp_path / "app.pid"
    pidfile.write_text(f"{process.pid}\n")
    registry = registry_with(
        ProcessCollector(ProcessFinder([ProcessWatch(name="app", pidfile=pidfile)]), CollectorStats())
    )
    assert registry.get_sample_value("healer_process_up", {"process": "app"}) == 1
    pidfile.write_text("not a pid")
    assert registry.get_sample_value("healer_process_up", {"process": "app"}) == 0
    pidfile.unlink()
    assert registry.get_sample_value("healer_process_up", {"process": "app"}) == 0


def test_access_denied_fds_gives_fewer_series(sleeper: tuple[subprocess.Popen[bytes], str]) -> None:
    """A process whose file descriptors cannot be read is still up; only the fd series is missing."""
    _, marker = sleeper

    class DeniedProcess(psutil.Process):
        def num_fds(self) -> int:
            raise psutil.AccessDenied(self.pid)

    class DenyingPsutil(RefusingPsutil):
        Process = DeniedProcess

    stats = CollectorStats()
    finder = ProcessFinder([ProcessWatch(name="sleeper", cmdline=marker)])
    finder.scan()
    registry = registry_with(ProcessCollector(finder, stats, ps=DenyingPsutil({})))
    assert registry.get_sample_value("healer_process_up", {"process": "sleeper"}) == 1
    assert registry.get_sample_value("healer_process_open_fds", {"process": "sleeper"}) is None
    assert stats.errors["processes"] == 2  # one per scrape, two scrapes


def test_scan_counts_every_matching_process(sleeper: tuple[subprocess.Popen[bytes], str]) -> None:
    """Two processes matching one regex are counted as two instances with summed memory."""
    first, marker = sleeper
    second = start_sleeper(marker)
    try:
        finder = ProcessFinder([ProcessWatch(name="pair", cmdline=marker)])
        finder.scan()
        assert sorted(finder.pids("pair")) == sorted([first.pid, second.pid])
        registry = registry_with(ProcessCollector(finder, CollectorStats()))
        assert registry.get_sample_value("healer_process_instances", {"process": "pair"}) == 2
    finally:
        second.kill()
        second.wait()


async def _target(aiohttp_server: Any, status: int, delay: float = 0.0) -> str:
    import asyncio

    async def handler(request: web.Request) -> web.Response:
        if delay:
            await asyncio.sleep(delay)
        return web.Response(status=status, text="x")

    app = web.Application()
    app.router.add_get("/health", handler)
    server = await aiohttp_server(app)
    return str(server.make_url("/health"))


async def _probe_until_recorded(probe: ProbeConfig) -> CollectorRegistry:
    """Run the prober's own loop until it has recorded its first request."""
    import asyncio

    registry = CollectorRegistry()
    prober = Prober([probe], ProbeMetrics(registry, [probe]))
    await prober.start()
    try:
        for _ in range(100):
            if registry.get_sample_value("healer_probe_duration_seconds_count", {"probe": probe.name}):
                break
            await asyncio.sleep(0.05)
    finally:
        await prober.stop()
    return registry


@pytest.mark.parametrize(
    ("status", "delay", "code", "up"),
    [(200, 0.0, "2xx", 1.0), (500, 0.0, "5xx", 0.0), (200, 1.0, "timeout", 0.0)],
)
async def test_probe_outcomes(aiohttp_server: Any, status: int, delay: float, code: str, up: float) -> None:
    """A probe records the status class, the duration, and up only for an expected status in time."""
    url = await _target(aiohttp_server, status, delay)
    probe = ProbeConfig(name="web", url=url, interval="1m", timeout="200ms")  # type: ignore[arg-type]
    registry = await _probe_until_recorded(probe)
    assert registry.get_sample_value("healer_probe_requests_total", {"probe": "web", "code": code}) == 1
    assert registry.get_sample_value("healer_probe_up", {"probe": "web"}) == up
    assert registry.get_sample_value("healer_probe_duration_seconds_count", {"probe": "web"}) == 1
    succeeded = registry.get_sample_value("healer_probe_last_success_timestamp_seconds", {"probe": "web"})
    assert (succeeded > 0) if up else (succeeded == 0)


async def test_probe_connection_refused_is_error() -> None:
    """A probe of a closed port counts as `error` and sets up to 0."""
    from tests.servers import free_port

    probe = ProbeConfig(name="gone", url=f"http://127.0.0.1:{free_port()}/", interval="1m", timeout="1s")  # type: ignore[arg-type]
    registry = await _probe_until_recorded(probe)
    assert registry.get_sample_value("healer_probe_requests_total", {"probe": "gone", "code": "error"}) == 1
    assert registry.get_sample_value("healer_probe_up", {"probe": "gone"}) == 0
