"""Periodic readiness checks of Prometheus and Alertmanager, logged on every change of state."""

from __future__ import annotations

import asyncio
import logging

import aiohttp

from healer.config import UpstreamConfig
from healer.config.http_client import client_session
from healer.exporter.own import OwnMetrics
from healer.logs import fields

log = logging.getLogger(__name__)


class UpstreamMonitor:
    """Checks each upstream's `/-/ready` endpoint on its interval and publishes the result."""

    def __init__(self, upstreams: dict[str, UpstreamConfig], metrics: OwnMetrics) -> None:
        self._upstreams = upstreams
        self._metrics = metrics
        self._state: dict[str, bool | None] = {name: None for name in upstreams}
        self._tasks: list[asyncio.Task[None]] = []
        # One session per upstream: each has its own tls_config and credentials.
        self._sessions: dict[str, aiohttp.ClientSession] = {}

    def is_up(self, name: str) -> bool | None:
        """Return the last known state of an upstream, or None before the first check."""
        return self._state[name]

    async def start(self) -> None:
        for name, upstream in self._upstreams.items():
            timeout = aiohttp.ClientTimeout(total=upstream.timeout)
            self._sessions[name] = client_session(upstream.tls_config, upstream.authorization(), timeout)
        self._tasks = [asyncio.create_task(self._loop(name), name=f"upstream-{name}") for name in self._upstreams]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for session in self._sessions.values():
            await session.close()
        self._sessions = {}

    async def check(self, name: str) -> bool:
        """Check one upstream now, record the result and log a change of state."""
        session = self._sessions[name]
        upstream = self._upstreams[name]
        try:
            async with session.get(f"{upstream.url}/-/ready", server_hostname=upstream.server_name) as response:
                up, reason = response.status == 200, f"HTTP {response.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            up, reason = False, str(exc) or type(exc).__name__
        self._metrics.dependency_up.labels(name).set(1 if up else 0)
        if up != self._state[name]:
            if up:
                log.info("upstream reachable", extra=fields(dependency=name, url=upstream.url))
            else:
                log.warning("upstream unreachable", extra=fields(dependency=name, url=upstream.url, reason=reason))
        self._state[name] = up
        return up

    async def _loop(self, name: str) -> None:
        while True:
            await self.check(name)
            await asyncio.sleep(self._upstreams[name].check_interval)
