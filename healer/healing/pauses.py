"""Pauses: when healer records alerts but does not act on them.

Three sources, asked before each step: operators' pauses through the API (in the store, the same
for every replica), `healing.pause_when` queries (a deploy in progress, say) and recurring
maintenance windows from the configuration. What the store and Prometheus say is cached for
`healing.pause_check_interval`, so that a thousand held steps ask them once per interval, not a
thousand times.
"""

from __future__ import annotations

import asyncio
import logging
import time
import zoneinfo
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from prometheus_client import CollectorRegistry, Gauge

from healer.config import HealerConfig, MaintenanceWindow
from healer.healing.model import Pause
from healer.logs import fields
from healer.promql import PrometheusUnavailableError, PromQLClient, PromQLError
from healer.storage import PauseRecords, StoreUnavailableError

log = logging.getLogger(__name__)

WEEKDAY_INDEX = {name: index for index, name in enumerate(("mon", "tue", "wed", "thu", "fri", "sat", "sun"))}


@dataclass(frozen=True)
class ActivePause:
    """A pause in force now, whatever its source, as status and metrics show it."""

    source: str  # "api", "pause_when" or "maintenance"
    name: str
    reason: str
    until: float | None

    def to_json(self) -> dict[str, object]:
        return {"source": self.source, "name": self.name, "reason": self.reason, "until": self.until}


def window_ends(window: MaintenanceWindow, now: float) -> float | None:
    """When the occurrence of a weekly window that covers `now` ends; None when none covers it."""
    zone = zoneinfo.ZoneInfo(window.timezone)
    local = datetime.fromtimestamp(now, zone)
    hour, minute = (int(part) for part in window.start.split(":"))
    days = {WEEKDAY_INDEX[day] for day in window.weekdays}
    # A window lasts at most a week, so only the occurrences that started in the last eight days can cover now.
    for back in range(8):
        day = (local - timedelta(days=back)).date()
        if day.weekday() not in days:
            continue
        start = datetime(day.year, day.month, day.day, hour, minute, tzinfo=zone).timestamp()
        if start <= now < start + window.duration:
            return start + window.duration
    return None


class PauseBoard:
    """Tells whether a pause covers an alert, from the store, pause_when queries and maintenance windows."""

    def __init__(
        self,
        config: HealerConfig,
        records: PauseRecords,
        promql: PromQLClient,
        registry: CollectorRegistry | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config.healing
        self._records = records
        self._promql = promql
        self._clock = clock
        self._lock = asyncio.Lock()
        self._checked_at = float("-inf")
        self._stored: list[Pause] = []
        self._queries: list[ActivePause] = []
        self.paused = Gauge(
            "healer_paused",
            "1 for each pause in force: from the API, a pause_when query or a maintenance window.",
            ["source", "name"],
            registry=registry,
        )
        self._exported: set[tuple[str, str]] = set()

    async def refresh(self, force: bool = False) -> None:
        """Read the store's pauses and ask the pause_when queries again, at most once per interval unless forced."""
        async with self._lock:
            now = self._clock()
            if not force and now < self._checked_at + self._config.pause_check_interval:
                return
            try:
                self._stored = await self._records.active(now)
            except StoreUnavailableError as exc:
                # The last pauses read stay in force: a store hiccup must not lift a pause.
                log.warning("pauses could not be read; the last ones read hold", extra=fields(reason=str(exc)))
            self._queries = [pause for pause in [await self._ask(query) for query in self._config.pause_when] if pause]
            self._checked_at = now
            self._export(now)

    async def _ask(self, query: str) -> ActivePause | None:
        try:
            samples = await self._promql.query(query)
        except PromQLError as exc:
            # A query Prometheus rejects will never answer: say so loudly, and still hold (fail closed).
            log.error("pause_when query rejected; healing stays paused", extra=fields(query=query, error=str(exc)))
            return ActivePause("pause_when", query, f"Prometheus rejected the query ({exc}); pause_when holds", None)
        except PrometheusUnavailableError as exc:
            # Like a guard, pause_when fails closed: not knowing whether a deploy runs is not "no deploy".
            return ActivePause("pause_when", query, f"Prometheus could not answer ({exc}); pause_when holds", None)
        if samples:
            return ActivePause("pause_when", query, "the query returns a result", None)
        return None

    def in_force(self, now: float | None = None) -> list[ActivePause]:
        """Every pause in force, as last read, whichever alerts it covers."""
        now = self._clock() if now is None else now
        found = [
            ActivePause("api", str(p.id), f"{p.reason} (by {p.created_by})", p.ends_at)
            for p in self._stored
            if p.active(now)
        ]
        for window in self._config.maintenance:
            ends = window_ends(window, now)
            if ends is not None:
                found.append(ActivePause("maintenance", window.name, "maintenance window", ends))
        return found + self._queries

    async def current(self) -> list[ActivePause]:
        """Every pause in force now, read afresh when the last reading is older than the interval."""
        await self.refresh()
        return self.in_force()

    async def pause(self, matchers: Sequence[str], reason: str, by: str, duration: float) -> Pause:
        """Record an operator's pause; it holds on this replica at once, on the others within the interval."""
        now = self._clock()
        created = await self._records.create(matchers, reason, by, now, now + duration)
        log.warning(
            "healing paused",
            extra=fields(pause=created.id, matchers=list(matchers), reason=reason, by=by, until=created.ends_at),
        )
        await self.refresh(force=True)
        return created

    async def unpause(self, pause_id: int, by: str) -> Pause | None:
        """End an operator's pause before it expires; None when no such pause is in force."""
        ended = await self._records.end(pause_id, by, self._clock())
        if ended is not None:
            log.warning("pause ended", extra=fields(pause=pause_id, by=by))
            await self.refresh(force=True)
        return ended

    async def stored(self) -> list[Pause]:
        """Operators' pauses in force now, from the store."""
        return await self._records.active(self._clock())

    async def recent(self, limit: int) -> list[Pause]:
        """Operators' pauses newest first, ended and expired ones included (who paused and who ended each)."""
        return await self._records.recent(limit)

    async def covering(self, labels: Mapping[str, str]) -> ActivePause | None:
        """The first pause in force that covers an alert's labels, or None."""
        await self.refresh()
        now = self._clock()
        plain = dict(labels)
        for pause in self._stored:
            if pause.active(now) and pause.covers(plain):
                return ActivePause("api", str(pause.id), f"{pause.reason} (by {pause.created_by})", pause.ends_at)
        for window in self._config.maintenance:
            ends = window_ends(window, now)
            if ends is not None and all(matcher.matches(plain) for matcher in window.match):
                return ActivePause("maintenance", window.name, "maintenance window", ends)
        return self._queries[0] if self._queries else None

    def _export(self, now: float) -> None:
        current = {(pause.source, pause.name) for pause in self.in_force(now)}
        for key in self._exported - current:
            self.paused.remove(*key)
        for key in current:
            self.paused.labels(*key).set(1)
        self._exported = current
