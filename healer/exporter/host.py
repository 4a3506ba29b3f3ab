"""Host metrics from psutil: CPU, load, memory, swap, filesystems, disks, network, processes."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator
from types import ModuleType
from typing import Any

import psutil
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from healer.config import ExporterConfig
from healer.exporter.stats import CollectorStats, InstrumentedCollector, Part

StatVfs = Callable[[str], os.statvfs_result]


class HostCollector(InstrumentedCollector):
    """Reads the host's state on every scrape; each family group fails on its own."""

    name = "host"

    def __init__(
        self,
        config: ExporterConfig,
        stats: CollectorStats,
        *,
        ps: ModuleType | Any = psutil,
        statvfs: StatVfs = os.statvfs,
    ) -> None:
        super().__init__(stats)
        self._ps = ps
        self._statvfs = statvfs
        self._exclude_fstypes = re.compile(config.filesystems.exclude_fstypes)
        self._exclude_mounts = re.compile(config.filesystems.exclude_mountpoints)
        self._exclude_disks = re.compile(config.disks.exclude)
        self._exclude_nics = re.compile(config.network.exclude)

    def parts(self) -> Iterable[Part]:
        return (
            self._cpu,
            self._load,
            self._memory,
            self._swap,
            self._filesystems,
            self._disks,
            self._network,
            self._processes,
            self._boot_time,
        )

    def _cpu(self) -> Iterator[Metric]:
        times = self._ps.cpu_times()
        seconds = CounterMetricFamily(
            "healer_host_cpu_seconds", "CPU time spent in each mode, summed over all CPUs.", labels=["mode"]
        )
        for mode in times._fields:
            # guest time is also counted in user time on Linux; exporting both would count it twice.
            if mode not in ("guest", "guest_nice"):
                seconds.add_metric([mode], getattr(times, mode))
        yield seconds
        yield GaugeMetricFamily("healer_host_cpus", "Number of logical CPUs.", value=self._ps.cpu_count() or 1)

    def _load(self) -> Iterator[Metric]:
        load1, load5, load15 = self._ps.getloadavg()
        yield GaugeMetricFamily("healer_host_load1", "1-minute load average.", value=load1)
        yield GaugeMetricFamily("healer_host_load5", "5-minute load average.", value=load5)
        yield GaugeMetricFamily("healer_host_load15", "15-minute load average.", value=load15)

    def _memory(self) -> Iterator[Metric]:
        memory = self._ps.virtual_memory()
        yield GaugeMetricFamily("healer_host_memory_total_bytes", "Physical memory.", value=memory.total)
        yield GaugeMetricFamily(
            "healer_host_memory_available_bytes",
            "Memory available to new processes without swapping.",
            value=memory.available,
        )
        yield GaugeMetricFamily(
            "healer_host_memory_used_bytes",
            "Memory in use: total minus available.",
            value=memory.total - memory.available,
        )

    def _swap(self) -> Iterator[Metric]:
        swap = self._ps.swap_memory()
        yield GaugeMetricFamily("healer_host_swap_total_bytes", "Swap space.", value=swap.total)
        yield GaugeMetricFamily("healer_host_swap_used_bytes", "Swap space in use.", value=swap.used)

    def _filesystems(self) -> Iterator[Metric]:
        labels = ["device", "mountpoint", "fstype"]
        size = GaugeMetricFamily("healer_host_filesystem_size_bytes", "Filesystem size.", labels=labels)
        free = GaugeMetricFamily(
            "healer_host_filesystem_free_bytes", "Free space, including root's reserve.", labels=labels
        )
        avail = GaugeMetricFamily(
            "healer_host_filesystem_avail_bytes", "Space available to unprivileged users.", labels=labels
        )
        seen: set[str] = set()
        for part in self._ps.disk_partitions(all=False):
            if part.mountpoint in seen or self._exclude_fstypes.match(part.fstype):
                continue
            if self._exclude_mounts.match(part.mountpoint):
                continue
            seen.add(part.mountpoint)
            try:
                vfs = self._statvfs(part.mountpoint)
            except OSError:
                # One unreadable mount (stale NFS, permissions) must not hide the others.
                self._stats.record_error(self.name)
                continue
            values = [part.device, part.mountpoint, part.fstype]
            size.add_metric(values, vfs.f_blocks * vfs.f_frsize)
            free.add_metric(values, vfs.f_bfree * vfs.f_frsize)
            avail.add_metric(values, vfs.f_bavail * vfs.f_frsize)
        yield from (size, free, avail)

    def _disks(self) -> Iterator[Metric]:
        counters = self._ps.disk_io_counters(perdisk=True, nowrap=True) or {}
        families = {
            "read_bytes": CounterMetricFamily("healer_host_disk_read_bytes", "Bytes read.", labels=["device"]),
            "write_bytes": CounterMetricFamily("healer_host_disk_written_bytes", "Bytes written.", labels=["device"]),
            "read_count": CounterMetricFamily(
                "healer_host_disk_reads_completed", "Reads completed.", labels=["device"]
            ),
            "write_count": CounterMetricFamily(
                "healer_host_disk_writes_completed", "Writes completed.", labels=["device"]
            ),
        }
        busy = CounterMetricFamily("healer_host_disk_io_time_seconds", "Time spent doing I/O.", labels=["device"])
        for device, io in sorted(counters.items()):
            if self._exclude_disks.match(device):
                continue
            for field, family in families.items():
                family.add_metric([device], getattr(io, field))
            if hasattr(io, "busy_time"):
                busy.add_metric([device], io.busy_time / 1000)
        yield from families.values()
        yield busy

    def _network(self) -> Iterator[Metric]:
        counters = self._ps.net_io_counters(pernic=True, nowrap=True) or {}
        fields = {
            "bytes_recv": ("healer_host_network_receive_bytes", "Bytes received."),
            "bytes_sent": ("healer_host_network_transmit_bytes", "Bytes sent."),
            "packets_recv": ("healer_host_network_receive_packets", "Packets received."),
            "packets_sent": ("healer_host_network_transmit_packets", "Packets sent."),
            "errin": ("healer_host_network_receive_errors", "Receive errors."),
            "errout": ("healer_host_network_transmit_errors", "Transmit errors."),
        }
        families = {f: CounterMetricFamily(name, doc, labels=["device"]) for f, (name, doc) in fields.items()}
        for device, io in sorted(counters.items()):
            if self._exclude_nics.match(device):
                continue
            for field, family in families.items():
                family.add_metric([device], getattr(io, field))
        yield from families.values()

    def _processes(self) -> Iterator[Metric]:
        yield GaugeMetricFamily("healer_host_processes", "Processes on the host.", value=len(self._ps.pids()))

    def _boot_time(self) -> Iterator[Metric]:
        yield GaugeMetricFamily(
            "healer_host_boot_time_seconds", "Unix time the host booted.", value=self._ps.boot_time()
        )
