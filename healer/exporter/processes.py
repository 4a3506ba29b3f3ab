"""Watched processes: found by command-line regex or pidfile, read on every scrape."""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import psutil
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from healer.config import ProcessWatch
from healer.exporter.stats import CollectorStats, InstrumentedCollector, Part


class ProcessFinder:
    """Maps each watched name to its PIDs.

    Walking every process to match command lines grows with the process count, so it runs
    from `scan()` on its own interval, off the scrape path; pidfiles are cheap and read live.
    """

    def __init__(
        self,
        watches: Sequence[ProcessWatch],
        *,
        ps: ModuleType | Any = psutil,
        read_file: Callable[[Path], str] = Path.read_text,
    ) -> None:
        self._ps = ps
        self._read_file = read_file
        self._by_regex = {w.name: re.compile(w.cmdline) for w in watches if w.cmdline is not None}
        self._pidfiles = {w.name: w.pidfile for w in watches if w.pidfile is not None}
        self.names = [w.name for w in watches]
        self._scanned: dict[str, list[int]] = {name: [] for name in self._by_regex}
        self._lock = threading.Lock()
        self._own_pid = os.getpid()

    def scan(self) -> None:
        """Walk the process table once and remember which PIDs match each regex."""
        if not self._by_regex:
            return
        found: dict[str, list[int]] = {name: [] for name in self._by_regex}
        for proc in self._ps.process_iter(["pid", "cmdline"]):
            if proc.info["pid"] == self._own_pid:
                continue
            cmdline = " ".join(proc.info["cmdline"] or ())
            if not cmdline:
                continue
            for name, pattern in self._by_regex.items():
                if pattern.search(cmdline):
                    found[name].append(proc.info["pid"])
        with self._lock:
            self._scanned = found

    def pids(self, name: str) -> list[int]:
        """Return the PIDs last seen for a watched name; a pidfile is read now."""
        if name in self._pidfiles:
            try:
                return [int(self._read_file(self._pidfiles[name]).strip())]
            except (OSError, ValueError):
                return []
        with self._lock:
            return list(self._scanned.get(name, ()))

    def forget(self, name: str, pid: int) -> None:
        """Drop a PID that has exited, so that the next scrape does not try it again."""
        with self._lock:
            if pid in self._scanned.get(name, ()):
                self._scanned[name] = [p for p in self._scanned[name] if p != pid]


class ProcessCollector(InstrumentedCollector):
    """Resource use of each watched process, summed over its matching PIDs."""

    name = "processes"

    def __init__(self, finder: ProcessFinder, stats: CollectorStats, *, ps: ModuleType | Any = psutil) -> None:
        super().__init__(stats)
        self._finder = finder
        self._ps = ps

    def parts(self) -> Iterable[Part]:
        return (self._watched,)

    def _watched(self) -> Iterator[Metric]:
        label = ["process"]
        up = GaugeMetricFamily("healer_process_up", "1 if at least one matching process is running.", labels=label)
        count = GaugeMetricFamily("healer_process_instances", "Number of matching processes.", labels=label)
        cpu = CounterMetricFamily(
            "healer_process_cpu_seconds", "CPU time of the matching processes.", labels=["process", "mode"]
        )
        rss = GaugeMetricFamily("healer_process_resident_memory_bytes", "Resident memory.", labels=label)
        fds = GaugeMetricFamily("healer_process_open_fds", "Open file descriptors.", labels=label)
        threads = GaugeMetricFamily("healer_process_threads", "Threads.", labels=label)
        start = GaugeMetricFamily(
            "healer_process_start_time_seconds",
            "Unix start time of the oldest matching process; a change means a restart.",
            labels=label,
        )
        for name in self._finder.names:
            totals = self._read(name)
            up.add_metric([name], 1.0 if totals else 0.0)
            count.add_metric([name], totals["instances"] if totals else 0)
            if not totals:
                continue
            cpu.add_metric([name, "user"], totals["user"])
            cpu.add_metric([name, "system"], totals["system"])
            rss.add_metric([name], totals["rss"])
            threads.add_metric([name], totals["threads"])
            start.add_metric([name], totals["start"])
            if "fds" in totals:
                fds.add_metric([name], totals["fds"])
        yield from (up, count, cpu, rss, fds, threads, start)

    def _read(self, name: str) -> dict[str, float]:
        totals: dict[str, float] = {}
        for pid in self._finder.pids(name):
            try:
                proc = self._ps.Process(pid)
                with proc.oneshot():
                    if proc.status() == psutil.STATUS_ZOMBIE:
                        raise psutil.NoSuchProcess(pid)
                    times = proc.cpu_times()
                    sample = {
                        "user": times.user,
                        "system": times.system,
                        "rss": proc.memory_info().rss,
                        "threads": proc.num_threads(),
                    }
                    created = proc.create_time()
                    try:
                        sample["fds"] = proc.num_fds()
                    except psutil.AccessDenied:
                        # Another user's process: still up, just fewer series.
                        self._stats.record_error(self.name)
            except (psutil.NoSuchProcess, psutil.ZombieProcess):
                self._finder.forget(name, pid)
                continue
            for key, value in sample.items():
                totals[key] = totals.get(key, 0.0) + value
            totals["instances"] = totals.get("instances", 0) + 1
            totals["start"] = min(totals.get("start", created), created)
        return totals
