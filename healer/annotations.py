"""Healing steps as Grafana annotations, posted to Grafana's HTTP API when it is configured."""

from __future__ import annotations

import logging
import time

import aiohttp
from prometheus_client import CollectorRegistry, Counter

from healer.config import GrafanaConfig
from healer.config.http_client import client_session
from healer.logs import fields

log = logging.getLogger(__name__)


class GrafanaAnnotator:
    """Posts one annotation per finished step; does nothing when no Grafana URL is configured."""

    def __init__(self, config: GrafanaConfig, registry: CollectorRegistry) -> None:
        self._config = config
        self._token = config.resolve_token()
        self._session: aiohttp.ClientSession | None = None
        self.posted = Counter(
            "healer_grafana_annotations",
            "Annotations posted to Grafana, by result.",
            ["result"],
            registry=registry,
        )
        for result in ("ok", "error"):
            self.posted.labels(result)

    @property
    def enabled(self) -> bool:
        return self._config.url is not None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def annotate(self, text: str, tags: list[str], started: float, ended: float | None = None) -> bool:
        """Post an annotation spanning a step; failures are logged and counted, never raised."""
        if self._config.url is None:
            return False
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=self._config.timeout)
            self._session = client_session(self._config.tls_config, None, timeout)
        body = {
            "time": int(started * 1000),
            "timeEnd": int((ended or time.time()) * 1000),
            "tags": [*self._config.tags, *tags],
            "text": text,
        }
        headers = {"Authorization": f"Bearer {self._token.get_secret_value()}"} if self._token else {}
        try:
            server_name = self._config.tls_config.server_name if self._config.tls_config is not None else None
            url = f"{self._config.url}/api/annotations"
            async with self._session.post(url, json=body, headers=headers, server_hostname=server_name) as reply:
                ok = reply.status == 200
                reason = f"HTTP {reply.status}"
        except (aiohttp.ClientError, TimeoutError) as exc:
            ok, reason = False, str(exc) or type(exc).__name__
        self.posted.labels("ok" if ok else "error").inc()
        if not ok:
            log.warning("grafana annotation not posted", extra=fields(url=self._config.url, reason=reason))
        return ok
