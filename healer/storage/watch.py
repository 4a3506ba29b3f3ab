"""The store's latest health, checked in the background: readiness, the webhook and `healer_store_up` follow it."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge

from healer.logs import fields
from healer.storage.health import OK, REASONS, UNAVAILABLE, StoreHealth
from healer.storage.interfaces import Storage

log = logging.getLogger(__name__)

# How often the store is checked, and how long one check may take before the store counts as unavailable.
STORE_HEALTH_INTERVAL = 2.0
STORE_HEALTH_TIMEOUT = 10.0


class StoreWatch:
    """Checks the store every `interval` and keeps the latest answer; logs each change once."""

    def __init__(
        self,
        storage: Storage,
        registry: CollectorRegistry,
        interval: float = STORE_HEALTH_INTERVAL,
        timeout: float = STORE_HEALTH_TIMEOUT,
    ) -> None:
        self.storage = storage
        self.interval = interval
        self.timeout = timeout
        self.health = StoreHealth()
        self._up = Gauge("healer_store_up", "1 if the latest check of the store passed, else 0.", registry=registry)
        self._reason = Gauge(
            "healer_store_down_reason",
            "1 for the reason the latest check of the store failed, 0 for the others.",
            ["reason"],
            registry=registry,
        )
        for reason in REASONS:
            if reason != OK:
                self._reason.labels(reason).set(0)
        self._up.set(1)

    @property
    def up(self) -> bool:
        return self.health.up

    async def check(self) -> StoreHealth:
        """Check the store once and record the answer."""
        try:
            health = await asyncio.wait_for(self.storage.health(), self.timeout)
        except TimeoutError:
            health = StoreHealth(UNAVAILABLE, f"the store did not answer a health check within {self.timeout:g} s")
        self._record(health)
        return health

    def _record(self, health: StoreHealth) -> None:
        previous, self.health = self.health, health
        self._up.set(1 if health.up else 0)
        for reason in REASONS:
            if reason != OK:
                self._reason.labels(reason).set(1 if reason == health.reason else 0)
        if health.reason == previous.reason:
            return
        if health.up:
            log.warning("store ready again", extra=fields(previous=previous.reason))
        else:
            # One line per change: what is wrong, and what to do (readiness and the webhook answer 503 meanwhile).
            log.error(
                "store not ready: the webhook answers 503 until it is fixed",
                extra=fields(reason=health.reason, detail=health.detail, action=health.advice),
            )

    async def run(self) -> None:
        """Check every `interval` until cancelled."""
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.check()
            except Exception:  # a failing check must not end the checks
                log.exception("store health check failed")


STORE_WATCH = web.AppKey("store_watch", StoreWatch)
