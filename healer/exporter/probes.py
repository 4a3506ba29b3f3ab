"""Application health probes: HTTP requests on their own interval, recorded for PromQL."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence

import aiohttp
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from healer.config import ProbeConfig

log = logging.getLogger(__name__)

# Status classes rather than exact codes keep the label set fixed and created up front.
CODE_CLASSES = ("2xx", "3xx", "4xx", "5xx", "timeout", "error")
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def code_class(status: int) -> str:
    """Map an HTTP status code to its class label such as `5xx`."""
    return f"{status // 100}xx" if 200 <= status < 600 else "error"


class ProbeMetrics:
    """The probe series, registered on the given registry with every label value created up front."""

    def __init__(self, registry: CollectorRegistry, probes: Sequence[ProbeConfig]) -> None:
        self.up = Gauge("healer_probe_up", "1 if the most recent probe succeeded.", ["probe"], registry=registry)
        self.duration = Histogram(
            "healer_probe_duration_seconds",
            "Probe request duration, including failed and timed-out requests.",
            ["probe"],
            buckets=DURATION_BUCKETS,
            registry=registry,
        )
        self.requests = Counter(
            "healer_probe_requests", "Probe requests by status class.", ["probe", "code"], registry=registry
        )
        self.last_success = Gauge(
            "healer_probe_last_success_timestamp_seconds",
            "Unix time of the most recent successful probe.",
            ["probe"],
            registry=registry,
        )
        self.configured = Gauge("healer_probes_configured", "Number of configured probes.", registry=registry)
        self.configured.set(len(probes))
        for probe in probes:
            self.up.labels(probe.name)
            self.duration.labels(probe.name)
            self.last_success.labels(probe.name)
            for code in CODE_CLASSES:
                self.requests.labels(probe.name, code)

    def record(self, probe: str, code: str, seconds: float, success: bool) -> None:
        """Record one probe outcome."""
        self.requests.labels(probe, code).inc()
        self.duration.labels(probe).observe(seconds)
        self.up.labels(probe).set(1 if success else 0)
        if success:
            self.last_success.labels(probe).set(time.time())


class Prober:
    """Runs each probe on its own interval until stopped."""

    def __init__(self, probes: Sequence[ProbeConfig], metrics: ProbeMetrics) -> None:
        self._probes = list(probes)
        self._metrics = metrics
        self._tasks: list[asyncio.Task[None]] = []
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Start one task per probe."""
        if not self._probes:
            return
        self._session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit_per_host=2, force_close=True),
            headers={"User-Agent": "healer-probe"},
        )
        self._tasks = [asyncio.create_task(self._loop(probe), name=f"probe-{probe.name}") for probe in self._probes]

    async def stop(self) -> None:
        """Cancel every probe task and close the HTTP session."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def probe_once(self, probe: ProbeConfig) -> bool:
        """Send one request and record its outcome; return whether it succeeded."""
        assert self._session is not None
        started = time.perf_counter()
        try:
            async with self._session.request(
                probe.method,
                probe.url,
                headers=probe.headers,
                timeout=aiohttp.ClientTimeout(total=probe.timeout),
                allow_redirects=False,
            ) as response:
                await response.read()
                status = response.status
        except TimeoutError:
            self._metrics.record(probe.name, "timeout", time.perf_counter() - started, False)
            return False
        except aiohttp.ClientError as exc:
            log.debug("probe failed", extra={"fields": {"probe": probe.name, "error": repr(exc)}})
            self._metrics.record(probe.name, "error", time.perf_counter() - started, False)
            return False
        success = status in probe.expected_status
        self._metrics.record(probe.name, code_class(status), time.perf_counter() - started, success)
        return success

    async def _loop(self, probe: ProbeConfig) -> None:
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            await self.probe_once(probe)
            # Fixed schedule rather than fixed gap, so a slow target does not stretch the interval.
            next_at += probe.interval
            now = loop.time()
            if next_at < now:
                next_at = now
            await asyncio.sleep(next_at - now)
