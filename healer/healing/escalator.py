"""The escalator: HealingFailed delivered to Alertmanager (and resolved), and the silences of episodes.

HealingFailed is queued in the store with the episode's escalation and posted from here: retried
through an Alertmanager outage or a restart, re-posted every `resend_interval` while the alert fires,
and resolved when the alert does. A silence covers an episode while healer works on it and is
expired when the episode ends, so a failure still pages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime
from typing import Any

from healer.alertmanager import AlertmanagerClient, AlertmanagerUnavailableError
from healer.config import HealerConfig, HealingRule
from healer.healing.metrics import HealingMetrics
from healer.healing.model import ActionFilter, Agenda, Episode, Escalation, Suspension
from healer.logs import fields
from healer.promql import PrometheusUnavailableError, PromQLClient
from healer.storage import HealingRecords, StoreUnavailableError

log = logging.getLogger(__name__)

# How often silences that Alertmanager could not expire when their episode ended are tried again.
SILENCE_SWEEP_SECONDS = 30.0
# How long a HealingFailed waits before it is posted again when the store could not record the last try.
STORE_RETRY_SECONDS = 2.0


class SideTasks:
    """Tasks that run beside the work loop (posts, expiries, annotations) and are awaited at the stop."""

    def __init__(self) -> None:
        self.tasks: set[asyncio.Task[Any]] = set()

    def spawn(self, coroutine: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coroutine)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def wait(self, timeout: float) -> None:
        """Wait up to `timeout` for the tasks, then cancel those left; what they did not do stays queued."""
        if not self.tasks:
            return
        _, pending = await asyncio.wait(self.tasks, timeout=timeout)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)


HEALING_SUSPENDED = "HealingSuspended"
SUSPENDED_RUNBOOK_URL = "https://github.com/healer-project/healer/blob/main/docs/runbook.md#healingsuspended"
# How often the leader looks whether healing is suspended for many alerts (a storm).
STORM_CHECK_SECONDS = 5.0
# Steps a blast-radius limit holds back at once before people are told.
STORM_HELD = 10
# How far back suspended episodes whose alert still fires are reported.
SUSPENSION_MEMORY_SECONDS = 86400.0
# Why healing was suspended, as people read it.
SUSPENSION_REASONS = {
    "circuit_open": "the global action budget was spent (circuit breaker open) when they fired",
    "budget": "the rule's own action budget was spent when they fired",
    "blast_radius": "the rule's blast radius holds them back",
}


def healing_suspended_alert(
    suspension: Suspension, audit_url: str, starts_at: datetime, ends_at: datetime
) -> dict[str, Any]:
    """The one alert that stands for every episode a storm left unacted on, for one reason and rule."""
    why = SUSPENSION_REASONS.get(suspension.reason, suspension.reason)
    counts = f"{suspension.suspended} alerts not acted on and still firing" + (
        f", {suspension.held} held back now" if suspension.held else ""
    )
    return {
        "labels": {
            "alertname": HEALING_SUSPENDED,
            "reason": suspension.reason,
            "healer_rule": suspension.rule,
            "severity": "critical",
        },
        "annotations": {
            "summary": f"healer suspended healing under rule {suspension.rule}: {why}",
            "description": f"{counts}. Each is recorded in the audit trail with its reason; nobody is paged per alert.",
            "suspended": str(suspension.suspended),
            "held": str(suspension.held),
            "audit_url": audit_url,
            "runbook_url": SUSPENDED_RUNBOOK_URL,
        },
        "startsAt": starts_at.isoformat().replace("+00:00", "Z"),
        "endsAt": ends_at.isoformat().replace("+00:00", "Z"),
        "generatorURL": audit_url,
    }


def _storm(suspension: Suspension) -> bool:
    """Whether people should hear of a suspension: alerts that a spent budget left unacted on and that still
    fire, or many held back by a blast radius now (paused and guarded steps are held on purpose)."""
    if suspension.reason in ("circuit_open", "budget"):
        return suspension.suspended > 0
    return suspension.reason == "blast_radius" and suspension.held >= STORM_HELD


class Escalator:
    """Posts HealingFailed for escalated episodes, HealingSuspended for storms, and keeps silences."""

    def __init__(
        self,
        config: HealerConfig,
        records: HealingRecords,
        alertmanager: AlertmanagerClient,
        promql: PromQLClient,
        metrics: HealingMetrics,
        external_url: str,
        side: SideTasks,
        wake: Callable[[], None],
        circuit_open: Callable[[], Awaitable[bool]],
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.records = records
        self.alertmanager = alertmanager
        self.promql = promql
        self.metrics = metrics
        self.external_url = external_url.rstrip("/")
        self._side = side
        self._wake = wake
        self._clock = clock
        self._sending: set[int] = set()
        # Episodes whose last try the store could not record (its row still says "due now"), and until when
        # they wait: without it the work loop, woken by each try, would post again at once, in a tight loop.
        self._store_wait: dict[int, float] = {}
        self._not_firing_seen: set[int] = set()
        # Leftover silences are expired at start; the sweep takes over from then on.
        self._next_silence_sweep = clock() + SILENCE_SWEEP_SECONDS
        self._sweeping = False
        self._circuit_open = circuit_open
        self._next_storm_check = 0.0
        self._checking_storms = False
        # HealingSuspended alerts this leader posted: (reason, rule) → when it began, when and what was posted.
        self._storms: dict[tuple[str, str], tuple[float, float, Suspension]] = {}

    async def count(self, episode: Episode, reason: str) -> None:
        """Count and log an escalation the store has queued; the work loop sends HealingFailed."""
        # A resolved notification may have won the race; then the store queued nothing and nobody is paged.
        if await self.records.get_escalation(episode.id) is None:
            return
        self.metrics.escalations.inc()
        log.warning("escalating", extra=fields(episode=episode.id, alertname=episode.alertname, reason=reason))
        self._wake()

    def send_due(self, agenda: Agenda) -> None:
        """Start posting every due HealingFailed that is not being posted already nor waiting for the store."""
        now = self._clock()
        # A wait that is over is no longer needed, also for an escalation withdrawn meanwhile (none is sent).
        self._store_wait = {episode: until for episode, until in self._store_wait.items() if until > now}
        for escalation in agenda.escalations:
            if escalation.episode_id not in self._sending and self._store_wait.get(escalation.episode_id, 0.0) <= now:
                self._sending.add(escalation.episode_id)
                self._side.spawn(self._send(escalation))

    def sweep_when_due(self) -> None:
        """Start a sweep of leftover silences every SILENCE_SWEEP_SECONDS; sweeps never overlap."""
        if self._clock() >= self._next_silence_sweep and not self._sweeping:
            self._next_silence_sweep = self._clock() + SILENCE_SWEEP_SECONDS
            self._sweeping = True
            self._side.spawn(self._sweep_silences())

    def report_storms_when_due(self) -> None:
        """Start a look at suspended and held-back episodes every STORM_CHECK_SECONDS; looks never overlap."""
        if self._clock() >= self._next_storm_check and not self._checking_storms:
            self._next_storm_check = self._clock() + STORM_CHECK_SECONDS
            self._checking_storms = True
            self._side.spawn(self._report_storms())

    async def _report_storms(self) -> None:
        """Post one HealingSuspended per reason and rule while healing is suspended for it, resolve it after."""
        try:
            await self._post_storms()
        except (StoreUnavailableError, AlertmanagerUnavailableError) as exc:
            # Looked at again within seconds; what was posted stays valid for four resend intervals.
            log.error("HealingSuspended not updated", extra=fields(reason=str(exc)))
        finally:
            self._checking_storms = False

    async def _post_storms(self) -> None:
        now = self._clock()
        # Alerts left unacted on stay news while they fire (nobody healed them), up to a day back.
        since = now - SUSPENSION_MEMORY_SECONDS
        await self._circuit_open()  # keeps healer_circuit_open current on the leader
        firing: dict[tuple[str, str], Suspension] = {}
        for suspension in await self.records.suspensions(since):
            if _storm(suspension):
                firing[(suspension.reason, suspension.rule)] = suspension
        resend = self.config.alertmanager.resend_interval
        alerts = []
        posted: dict[tuple[str, str], tuple[float, float, Suspension]] = {}
        for key, suspension in firing.items():
            began, last, told = self._storms.get(key, (now, float("-inf"), suspension))
            # Again every resend interval, and whenever the counts people read have changed.
            if now - last < resend and told == suspension:
                continue
            audit = f"{self.external_url}/api/v1/actions?rule={suspension.rule}&since={since:.0f}"
            starts, ends = datetime.fromtimestamp(began, UTC), datetime.fromtimestamp(now + 4 * resend, UTC)
            alerts.append(healing_suspended_alert(suspension, audit, starts, ends))
            posted[key] = (began, now, suspension)
        ended = [key for key in self._storms if key not in firing]
        for key in ended:
            gone = Suspension(key[0], key[1], 0, 0)
            starts, ends = datetime.fromtimestamp(self._storms[key][0], UTC), datetime.fromtimestamp(now, UTC)
            alerts.append(healing_suspended_alert(gone, self.external_url, starts, ends))
        if not alerts:
            return
        await self.alertmanager.post_alerts(alerts)
        for key in ended:
            del self._storms[key]
            log.warning("healing no longer suspended", extra=fields(reason=key[0], rule=key[1]))
        for key, times in posted.items():
            if key not in self._storms:
                log.warning(
                    "healing suspended", extra=fields(reason=key[0], rule=key[1], suspended=firing[key].suspended)
                )
            self._storms[key] = times

    async def _send(self, queued: Escalation) -> None:
        """Post the HealingFailed of an escalated episode: firing while its alert fires, then resolved once."""
        episode_id = queued.episode_id
        self._store_wait.pop(episode_id, None)
        try:
            # The agenda may be older than a send that just finished; the row says what is due now.
            escalation = await self.records.get_escalation(episode_id)
            episode = await self.records.get_episode(episode_id)
            now = self._clock()
            if escalation is None or episode is None or escalation.next_send is None or escalation.next_send > now:
                return
            if escalation.resolved_at is not None and escalation.sent_at is None:
                await self.records.escalation_withdrawn(episode_id)
                return
            await self._post(escalation, episode)
        except StoreUnavailableError as exc:
            # Expected while the disk is full or the database is down: one line, and a pause before the next try.
            log.error("HealingFailed waits for the store", extra=fields(episode=episode_id, reason=str(exc)))
            self._store_wait[episode_id] = self._clock() + STORE_RETRY_SECONDS
        except Exception:
            # Anything unexpected waits like a failed post, so that a bug cannot turn into a flood of posts.
            log.exception("HealingFailed not sent", extra=fields(episode=episode_id))
            with contextlib.suppress(Exception):
                retry = self._clock() + self.config.alertmanager.resend_interval
                await self.records.escalation_failed(episode_id, retry, "internal error")
        finally:
            self._sending.discard(episode_id)
            self._wake()

    async def _post(self, escalation: Escalation, episode: Episode) -> None:
        episode_id = episode.id
        resolved_at = escalation.resolved_at
        if resolved_at is None and escalation.sent_at is not None:
            # Alertmanager may never send the resolved notification (send_resolved: false). One empty
            # answer can be a gap in ALERTS (a Prometheus restart); two in a row, an interval apart, are not.
            if await self.still_firing(episode) is False:
                if episode_id in self._not_firing_seen:
                    await self.records.escalation_stopped_firing(episode_id)
                    resolved_at = self._clock()
                self._not_firing_seen.add(episode_id)
            else:
                self._not_firing_seen.discard(episode_id)
        tried = await self.records.list_actions(ActionFilter(episode_id=episode_id, limit=1000))
        resend = self.config.alertmanager.resend_interval
        now = self._clock()
        alert = AlertmanagerClient.healing_failed_alert(
            episode.labels,
            episode.annotations,
            rule=escalation.rule,
            episode=episode_id,
            strategies_tried=[action.strategy for action, _ in reversed(tried)],
            audit_url=f"{self.external_url}/api/v1/actions?episode={episode_id}",
            reason=escalation.reason,
            starts_at=datetime.fromtimestamp(escalation.created_at, UTC),
            ends_at=datetime.fromtimestamp(resolved_at if resolved_at is not None else now + 4 * resend, UTC),
        )
        try:
            await self.alertmanager.post_alerts([alert])
        except AlertmanagerUnavailableError as exc:
            self.metrics.escalation_failures.inc()
            # A first post that Alertmanager refuses will be refused again. A re-send is never given up:
            # the alert was valid once, and giving up would let the page expire while the alert fires.
            refused = (
                escalation.sent_at is None
                and exc.status is not None
                and 400 <= exc.status < 500
                and exc.status not in (408, 429)
            )
            log.error(
                "HealingFailed not delivered", extra=fields(episode=episode_id, reason=str(exc), giving_up=refused)
            )
            retry = None if refused else now + min(resend, 2.0 ** min(escalation.failures, 10))
            await self.records.escalation_failed(episode_id, retry, str(exc))
            return
        if resolved_at is not None:
            self._not_firing_seen.discard(episode_id)
        await self.records.escalation_sent(episode_id, None if resolved_at is not None else now + resend)

    async def still_firing(self, episode: Episode) -> bool | None:
        """Whether Prometheus reports the episode's alert firing; None when it cannot tell."""
        try:
            return await self.promql.alert_firing(episode.labels)
        except (PrometheusUnavailableError, ValueError):  # ValueError: a label name PromQL cannot express
            return None

    # -- silences ------------------------------------------------------------------------------

    async def silence(self, episode: Episode, rule: HealingRule) -> Episode:
        """Silence the episode's alert for as long as every attempt could take; return the episode as recorded."""
        longest_step = max((self.config.strategies[name].timeout for name in rule.strategies), default=0.0)
        verifying = rule.verify.within + rule.verify.wait_for_prometheus
        duration = (longest_step + verifying + rule.max_backoff) * rule.max_attempts
        try:
            silence_id = await self.alertmanager.create_silence(
                episode.labels, duration, comment=f"healer is healing episode {episode.id} (rule {rule.name})"
            )
        except AlertmanagerUnavailableError as exc:
            log.error("silence not created", extra=fields(episode=episode.id, reason=str(exc)))
            return episode
        await self.records.set_silence(episode.id, silence_id)
        refreshed = await self.records.get_episode(episode.id)
        assert refreshed is not None
        return refreshed

    async def expire_silence(self, episode: Episode) -> None:
        """End an episode's silence; when Alertmanager cannot take it now, the sweep tries again."""
        if episode.silence_id is None:
            return
        try:
            await self.alertmanager.expire_silence(episode.silence_id)
        except AlertmanagerUnavailableError as exc:
            log.error("silence not expired", extra=fields(episode=episode.id, reason=str(exc)))
            return
        await self.records.set_silence(episode.id, None)

    async def expire_leftover_silences(self) -> None:
        """Expire the silences of ended episodes that Alertmanager could not take before."""
        for episode in await self.records.episodes_with_silences():
            await self.expire_silence(episode)

    async def _sweep_silences(self) -> None:
        try:
            await self.expire_leftover_silences()
        except StoreUnavailableError as exc:
            log.error("silence sweep failed", extra=fields(reason=str(exc)))
        finally:
            self._sweeping = False
