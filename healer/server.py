"""The aiohttp application factory: health endpoints, /metrics, and the background services."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from healer.alertmanager import AlertmanagerClient
from healer.annotations import GrafanaAnnotator
from healer.auth import ACCESS, Access, access_control, add_login_routes, identity, load_access
from healer.config import HealerConfig
from healer.console import CONSOLE_ACCESS, SIGNED_IN_ACCESS, add_console_routes
from healer.exporter.host import HostCollector
from healer.exporter.own import OwnMetrics
from healer.exporter.probes import ProbeMetrics, Prober
from healer.exporter.processes import ProcessCollector, ProcessFinder
from healer.exporter.stats import CollectorStats, StatsCollector
from healer.healing.engine import Engine
from healer.healing.episodes import EpisodeSteps
from healer.healing.escalator import Escalator, SideTasks
from healer.healing.ladder import Ladder
from healer.healing.metrics import HealingMetrics
from healer.healing.pauses import PauseBoard
from healer.healing.replica import Replica, replica_name
from healer.healing.routes import ENGINE, LADDER, add_routes
from healer.healing.steps import StepRunner
from healer.http import problem
from healer.limits import LIMITS, RequestLimits, request_limits
from healer.logs import fields
from healer.optimizer.optimizer import Optimizer, OptimizerMetrics
from healer.optimizer.routes import OPTIMIZER, add_optimization_routes
from healer.planner.planner import Planner, PlannerMetrics
from healer.planner.routes import PLANNER, add_goal_routes
from healer.promql import PromQLClient
from healer.status import status_handler
from healer.storage import Storage, StoreUnavailableError, open_local_storage
from healer.storage.watch import STORE_WATCH, StoreWatch
from healer.strategies.base import StrategyRegistry
from healer.strategies.builtin import default_registry
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
    strategies: StrategyRegistry
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    background: list[asyncio.Task[None]] = field(default_factory=list)


SERVICES = web.AppKey("services", Services)
STORAGE = web.AppKey("storage", Storage)


def build_services(
    config: HealerConfig, registry: CollectorRegistry | None = None, strategies: StrategyRegistry | None = None
) -> Services:
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
    strategies = strategies if strategies is not None else default_registry()
    return Services(config, registry, own, prober, finder, upstreams, healing_metrics, strategies)


async def _scan_processes(services: Services) -> None:
    interval = services.config.exporter.process_scan_interval
    while True:
        try:
            await asyncio.to_thread(services.finder.scan)
        except Exception:  # a failed walk must not stop future walks
            log.exception("process scan failed")
        await asyncio.sleep(interval)


async def _purge_old_records(storage: Storage, replica: Replica, retention: float) -> None:
    while True:
        if not replica.leader:  # once per cluster
            await asyncio.sleep(replica.lease)
            continue
        try:
            horizon = time.time() - retention
            removed = await storage.healing.purge(horizon)
            await storage.inbox.purge(horizon)
            goals = await storage.goals.purge(horizon)
            trials = await storage.trials.purge(horizon)
            # Console sessions past their expiry, closed or not (an expired one is refused anyway).
            await storage.sessions.purge(time.time())
        except StoreUnavailableError as exc:
            log.error("audit records not purged; retrying in an hour", extra=fields(reason=str(exc)))
        else:
            if removed or goals or trials:
                log.info("audit records purged", extra=fields(episodes=removed, goals=goals, trials=trials))
        await asyncio.sleep(3600)


def build_engine(services: Services, storage: Storage, store_watch: StoreWatch) -> Engine:
    """Create the engine and the parts it is made of (step runner, ladder, escalator) on an open store; no
    step starts while `store_watch` says the store cannot keep what it does."""
    config = services.config
    promql = PromQLClient(config.prometheus)
    replica = Replica(
        replica_name(config), storage.coordination, config.store.lease, storage.shared, services.registry
    )
    pauses = PauseBoard(config, storage.pauses, promql, services.registry)
    steps = StepRunner(
        config, services.strategies, services.healing_metrics, storage.coordination, replica, pauses
    )
    side = SideTasks()
    # The escalator wakes the engine's work loop when a post ends; both share this event.
    wakeup = asyncio.Event()
    escalator = Escalator(
        config,
        storage.healing,
        AlertmanagerClient(config.alertmanager),
        promql,
        services.healing_metrics,
        config.server.external_url or f"http://{config.server.listen}",
        side,
        wakeup.set,
        steps.circuit_open,
    )
    episode_steps = EpisodeSteps(
        config,
        storage.healing,
        steps,
        Ladder(config),
        escalator,
        side,
        services.healing_metrics,
        promql,
        GrafanaAnnotator(config.grafana, services.registry),
        wakeup.set,
        store_health=lambda: store_watch.health,
    )
    return Engine(config, wakeup, storage.inbox, episode_steps, side)


def build_planner(services: Services, storage: Storage, engine: Engine) -> Planner:
    """The planner, its goals in the store, its steps through the engine's step runner."""
    metrics = PlannerMetrics(services.registry)
    return Planner(services.config, storage.goals, engine.steps, engine.promql, metrics)


def build_optimizer(services: Services, storage: Storage, engine: Engine) -> Optimizer:
    """The optimizer, its trials in the store, its changes through the engine's step runner."""
    config = services.config
    metrics = OptimizerMetrics(services.registry, config.optimizer.candidates)
    return Optimizer(config, storage.trials, engine.steps, engine.promql, metrics)


async def _healing(app: web.Application) -> AsyncIterator[None]:
    """Start the engine, planner and optimizer; on shutdown let running steps finish, then close the store."""
    engine, planner, optimizer = app[ENGINE], app[PLANNER], app[OPTIMIZER]
    config = app[SERVICES].config
    alertmanager = engine.escalator.alertmanager
    await alertmanager.start()
    await engine.replica.start()
    await engine.start()
    await planner.start()
    await optimizer.start()
    purge = asyncio.create_task(
        _purge_old_records(app[STORAGE], engine.replica, config.store.retention), name="purge"
    )
    # Readiness and the webhook follow the store's latest health, checked every couple of seconds.
    await app[STORE_WATCH].check()
    store_watch = asyncio.create_task(app[STORE_WATCH].run(), name="store-health")
    yield
    purge.cancel()
    store_watch.cancel()
    engine.begin_stop(config.server.shutdown_timeout)
    deadline = engine.steps.stop_deadline
    await asyncio.gather(planner.stop(deadline), optimizer.stop(deadline))
    await engine.stop(config.server.shutdown_timeout)
    await engine.replica.stop()
    await alertmanager.close()
    await engine.episode_steps.annotator.close()
    engine.promql.close()
    await app[STORAGE].close()


async def _begin_stop(app: web.Application) -> None:
    # aiohttp drains requests for up to shutdown_timeout before the cleanup contexts exit; starting
    # the steps' clock now makes the whole stop take one shutdown_timeout, not two.
    app[ENGINE].begin_stop(app[SERVICES].config.server.shutdown_timeout)


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
    store = request.app[STORE_WATCH].health
    if not store.up:
        text = f"healer is not ready: the store is {store.reason} ({store.detail}); {store.advice}\n"
        return web.Response(status=503, text=text)
    if request.app[SERVICES].ready.is_set():
        return web.Response(text="healer is ready.\n")
    return web.Response(status=503, text="healer is not ready.\n")


async def metrics(request: web.Request) -> web.Response:
    registry = request.app[SERVICES].registry
    # Off the event loop: a hung mount's statvfs must not stall the webhook.
    body = await asyncio.get_running_loop().run_in_executor(None, generate_latest, registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


# How long a client told that the store cannot answer should wait before it asks again.
STORE_RETRY_AFTER_SECONDS = 5


@web.middleware
async def store_unavailable(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Any route whose store cannot answer now says so with 503 and Retry-After, never a 500; why, only to a
    caller with a role (the driver's message names the database's host and user)."""
    try:
        return await handler(request)
    except StoreUnavailableError as exc:
        # A caller not yet authenticated (its session lookup failed) learns nothing and cannot flood the log.
        known = bool(identity(request).roles)
        (log.error if known else log.debug)("store unavailable", extra=fields(path=request.path, reason=str(exc)))
        details = {"reason": str(exc)} if known else {}
        answer = problem(503, "the store cannot answer now; retry", **details)
        answer.headers["Retry-After"] = str(STORE_RETRY_AFTER_SECONDS)
        return answer


def create_app(
    config: HealerConfig,
    *,
    registry: CollectorRegistry | None = None,
    strategies: StrategyRegistry | None = None,
    storage: Storage | None = None,
    access: Access | None = None,
) -> web.Application:
    """Build the healer web application for a validated config, on `storage` when given (a PostgreSQL
    store is opened asynchronously, with `await open_storage(config.store)`), else on its SQLite file;
    with the credentials of `access` when given, else those the config names (`load_access`)."""
    access = access if access is not None else load_access(config)
    # Every request passes access control first, so no route can be reached without its role, and a body
    # without a credential is refused before request_limits lets it take a large-body slot. store_unavailable
    # wraps them all: access control looks sessions up in the store, and an outage there is a 503 too.
    app = web.Application(
        client_max_size=config.server.max_request_bytes,
        middlewares=[store_unavailable, access_control, request_limits],
    )
    app[ACCESS] = access
    app[SERVICES] = build_services(config, registry, strategies)
    app[LIMITS] = RequestLimits.from_config(config.server, app[SERVICES].registry)
    app[STORAGE] = storage if storage is not None else open_local_storage(config.store)
    app[STORE_WATCH] = StoreWatch(app[STORAGE], app[SERVICES].registry)
    app[ENGINE] = build_engine(app[SERVICES], app[STORAGE], app[STORE_WATCH])
    app[LADDER] = app[ENGINE].ladder
    app[PLANNER] = build_planner(app[SERVICES], app[STORAGE], app[ENGINE])
    app[OPTIMIZER] = build_optimizer(app[SERVICES], app[STORAGE], app[ENGINE])
    for warning in access.warnings:
        log.warning("access control", extra=fields(warning=warning))
    if access.no_credentials:
        log.warning("the webhook and operator endpoints accept requests without a token (loopback only)")
    # Healing first, so that readiness (set by the exporter's lifecycle) implies an open store.
    app.cleanup_ctx.append(_healing)
    app.cleanup_ctx.append(_lifecycle)
    app.on_shutdown.append(_begin_stop)
    add_routes(app)
    add_goal_routes(app)
    add_optimization_routes(app)
    app.router.add_get("/api/v1/status", status_handler)
    add_console_routes(app, config)
    add_login_routes(app, app[STORAGE].sessions, config.server.external_url)
    app[CONSOLE_ACCESS] = SIGNED_IN_ACCESS
    app.router.add_get("/-/healthy", healthy)
    app.router.add_get("/-/ready", ready)
    app.router.add_get("/metrics", metrics)
    log.debug("app created", extra=fields(probes=len(config.exporter.probes)))
    return app
