"""The aiohttp application factory: health endpoints, /metrics, and the background services."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from healer.config import HealerConfig
from healer.exporter.host import HostCollector
from healer.exporter.own import OwnMetrics
from healer.healing.metrics import HealingMetrics
from healer.exporter.probes import Prober, ProbeMetrics
from healer.exporter.processes import ProcessCollector, ProcessFinder
from healer.exporter.stats import CollectorStats, StatsCollector
from healer.logs import fields
from healer.upstreams import UpstreamMonitor

log = logging.getLogger(__name__)


@dataclass
class Services:
    """Everything the running app owns, created by the factory and stopped on cleanup."""

    config: HealerConfig
    registry: CollectorRegistry
    own: OwnMetrics
    prober: Prober
    finder: ProcessFinder
    upstreams: UpstreamMonitor
    healing_metrics: HealingMetrics
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    background: list[asyncio.Task[None]] = field(default_factory=list)


SERVICES = web.AppKey("services", Services)


def build_services(config: HealerConfig, registry: CollectorRegistry | None = None) -> Services:
    """Create the registry and its collectors from the config; nothing runs yet."""
    registry = registry if registry is not None else CollectorRegistry()
    stats = CollectorStats()
    if config.exporter.host:
        registry.register(HostCollector(config.exporter, stats))
    finder = ProcessFinder(config.exporter.processes)
    if config.exporter.processes:
        registry.register(ProcessCollector(finder, stats))
    prober = Prober(config.exporter.probes, ProbeMetrics(registry, config.exporter.probes))
    own = OwnMetrics(registry, config)
    healing_metrics = HealingMetrics(registry, config.strategies)
    upstreams = UpstreamMonitor({"prometheus": config.prometheus, "alertmanager": config.alertmanager}, own)
    # Last, so that it reports the durations measured during this same scrape.
    registry.register(StatsCollector(stats))
    return Services(config, registry, own, prober, finder, upstreams, healing_metrics)


async def _scan_processes(services: Services) -> None:
    interval = services.config.exporter.process_scan_interval
    while True:
        try:
            await asyncio.to_thread(services.finder.scan)
        except Exception:  # a failed walk must not stop future walks
            log.exception("process scan failed")
        await asyncio.sleep(interval)


async def _lifecycle(app: web.Application) -> AsyncIterator[None]:
    services = app[SERVICES]
    await services.prober.start()
    await services.upstreams.start()
    if services.config.exporter.processes:
        # The first walk completes before readiness so that the first scrape already sees processes.
        await asyncio.to_thread(services.finder.scan)
        services.background.append(asyncio.create_task(_scan_processes(services), name="process-scan"))
    services.ready.set()
    yield
    services.ready.clear()
    for task in services.background:
        task.cancel()
    await asyncio.gather(*services.background, return_exceptions=True)
    await services.prober.stop()
    await services.upstreams.stop()


async def healthy(request: web.Request) -> web.Response:
    return web.Response(text="healer is healthy.\n")


async def ready(request: web.Request) -> web.Response:
    if request.app[SERVICES].ready.is_set():
        return web.Response(text="healer is ready.\n")
    return web.Response(status=503, text="healer is not ready.\n")


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[SERVICES].registry
    # Off the event loop: a hung mount's statvfs must not stall the webhook.
    body = await asyncio.get_running_loop().run_in_executor(None, generate_latest, registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


def create_app(config: HealerConfig, *, registry: CollectorRegistry | None = None) -> web.Application:
    """Build the healer web application for a validated config."""
    app = web.Application(client_max_size=config.server.max_request_bytes)
    app[SERVICES] = build_services(config, registry)
    app.cleanup_ctx.append(_lifecycle)
    app.router.add_get("/-/healthy", healthy)
    app.router.add_get("/-/ready", ready)
    app.router.add_get("/metrics", metrics)
    log.debug("app created", extra=fields(probes=len(config.exporter.probes)))
    return app
