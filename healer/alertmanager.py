"""Alertmanager API v2 client: escalation alerts and silences, over one aiohttp session.

An Alertmanager cluster shares silences and its notification log by gossip, not alerts. So, as
Prometheus does, alerts go to every Alertmanager of the cluster (`url` and `peers`), and the
cluster notifies once; silences go to `url`, or to a peer while `url` cannot be reached.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import quote

import aiohttp

from healer.config import AlertmanagerConfig
from healer.config.http_client import client_session
from healer.logs import fields

log = logging.getLogger(__name__)

RUNBOOK_URL = "https://github.com/healer-project/healer/blob/main/docs/runbook.md#healingfailed"
HEALING_FAILED = "HealingFailed"
# The escalation reason of a ladder that ran out while the alert still fired.
STILL_FIRES = "the alert still fires"


class AlertmanagerUnavailableError(Exception):
    """Alertmanager could not be reached, timed out, or answered with a non-2xx status.

    `status` is the HTTP status when there was an answer, None for connection errors and
    timeouts; a 4xx status means Alertmanager rejected the request itself.
    """

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


def _timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC, as Alertmanager parses it."""
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


def _matcher_filter(labels: Mapping[str, str]) -> list[tuple[str, str]]:
    """`filter` query parameters (`name="value"`, one per label) for the v2 list endpoints.

    Alertmanager's matcher parser unescapes exactly backslash, double quote and newline.
    """
    escaped = {
        name: value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") for name, value in labels.items()
    }
    return [("filter", f'{name}="{value}"') for name, value in escaped.items()]


def healing_failed_alert(
    original_labels: Mapping[str, str],
    annotations: Mapping[str, str],
    *,
    rule: str,
    episode: int | None = None,
    strategies_tried: Sequence[str],
    audit_url: str,
    reason: str,
    starts_at: datetime | None = None,
    ends_at: datetime | None = None,
) -> dict[str, Any]:
    """Build the `HealingFailed` alert healer posts when a rule's escalation ladder is exhausted.

    Labels are the original alert's labels with `alertname` replaced by `HealingFailed`, plus
    `healed_alertname`, `healer_rule`, `healer_episode` (when given: each failed episode is its
    own alert, even for the same flapping alert) and `severity="critical"`; empty label values
    are dropped, as Prometheus treats them as absent. The original annotations are kept, each
    renamed with a `healed_` prefix (so `summary` becomes `healed_summary`), beside healer's
    own `summary`, `description`, `strategies_tried`, `audit_url` and `runbook_url`.
    `generatorURL` is the audit URL. Alertmanager tells alerts apart by their labels, so posting
    the same alert again updates it. Without `ends_at` Alertmanager resolves the alert after its
    `resolve_timeout` (5m by default) unless it is posted again; an `ends_at` in the past resolves it.
    """
    alertname = original_labels.get("alertname", "") or "(unnamed alert)"
    instance = original_labels.get("instance") or original_labels.get("job") or "unknown instance"
    labels = {k: v for k, v in original_labels.items() if k != "alertname" and v != ""}
    labels.update(
        alertname=HEALING_FAILED,
        healed_alertname=alertname,
        healer_rule=rule,
        severity="critical",
    )
    if episode is not None:
        labels["healer_episode"] = str(episode)
    tried = ", ".join(strategies_tried) if strategies_tried else "none"
    # Whether the alert still fires is known only when the escalation says so: an unverified step, a
    # guard, flapping or a rejection are other reasons to hand over.
    outcome = f"and {alertname} still fires" if reason == STILL_FIRES else f"without healing {alertname}"
    description = (
        f"healer rule {rule!r} tried {len(strategies_tried)} "
        f"strateg{'y' if len(strategies_tried) == 1 else 'ies'} ({tried}) {outcome}: {reason}"
    )
    merged = {f"healed_{name}": value for name, value in annotations.items()}
    merged.update(
        summary=f"healer could not heal {alertname} on {instance}",
        description=description,
        strategies_tried=",".join(strategies_tried),
        audit_url=audit_url,
        runbook_url=RUNBOOK_URL,
    )
    alert: dict[str, Any] = {"labels": labels, "annotations": merged, "generatorURL": audit_url}
    if starts_at is not None:
        alert["startsAt"] = _timestamp(starts_at)
    if ends_at is not None:
        alert["endsAt"] = _timestamp(ends_at)
    return alert


class AlertmanagerClient:
    """Talks to one Alertmanager cluster's API v2 (`url`, then its `peers`) with one aiohttp session.

    Use as `async with AlertmanagerClient(config) as am:`, or call `start()` and `close()`;
    a request made before `start()` opens the session itself.
    """

    healing_failed_alert = staticmethod(healing_failed_alert)

    def __init__(self, config: AlertmanagerConfig) -> None:
        self.url = config.url
        self.peers = tuple(config.peers)
        self._timeout = aiohttp.ClientTimeout(total=config.timeout)
        self._config = config
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Open the HTTP session; must run inside the event loop that will use it."""
        if self._session is None or self._session.closed:
            self._session = client_session(self._config.tls_config, self._config.authorization(), self._timeout)

    async def close(self) -> None:
        """Close the HTTP session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def __aenter__(self) -> AlertmanagerClient:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def _request(
        self,
        method: str,
        path: str,
        *,
        body: Any = None,
        params: Sequence[tuple[str, str]] = (),
        ok_statuses: frozenset[int] = frozenset(),
        base: str | None = None,
    ) -> Any:
        """Send one request to `base` (default `url`); return the decoded JSON body (None when empty or tolerated)."""
        await self.start()
        assert self._session is not None
        base = base or self.url
        url = f"{base}{path}"
        try:
            async with self._session.request(
                method, url, json=body, params=list(params) or None, server_hostname=self._config.server_name
            ) as response:
                text = await response.text()
                if response.status in ok_statuses:
                    return None
                if not 200 <= response.status < 300:
                    raise AlertmanagerUnavailableError(
                        f"{method} {url} answered HTTP {response.status}: {text.strip()[:500] or '(empty body)'}",
                        status=response.status,
                    )
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise AlertmanagerUnavailableError(
                f"cannot reach Alertmanager at {base}: {type(exc).__name__}: {exc}"
            ) from None
        if not text.strip():
            return None
        try:
            return json.loads(text)
        except ValueError:
            raise AlertmanagerUnavailableError(
                f"{method} {url} answered a body that is not JSON: {text[:200]!r}",
                status=response.status,
            ) from None

    async def _first_answering(self, method: str, path: str, **options: Any) -> Any:
        """Send a request to `url`; while it cannot be reached (no answer, or a 5xx), to each peer in turn.

        An answer of 4xx is final. When none answers, the error is `url`'s.
        """
        first: AlertmanagerUnavailableError | None = None
        for base in (self.url, *self.peers):
            try:
                return await self._request(method, path, base=base, **options)
            except AlertmanagerUnavailableError as exc:
                if exc.status is not None and exc.status < 500:
                    raise
                first = first or exc
        assert first is not None
        raise first

    async def post_alerts(self, alerts: Sequence[Mapping[str, Any]]) -> None:
        """POST alerts (labels, annotations, optional startsAt/endsAt, generatorURL) to `url` and every peer at once.

        Delivered when at least one Alertmanager takes them; the others' failures are logged. When all
        fail, the error carries their common status, or None when they differ (so that a caller retries).
        """
        body = [dict(alert) for alert in alerts]
        bases = (self.url, *self.peers)
        results = await asyncio.gather(
            *(self._request("POST", "/api/v2/alerts", body=body, base=base) for base in bases), return_exceptions=True
        )
        errors: list[AlertmanagerUnavailableError] = []
        for result in results:
            if isinstance(result, AlertmanagerUnavailableError):
                errors.append(result)
            elif isinstance(result, BaseException):
                raise result
        if len(errors) == len(bases):
            statuses = {error.status for error in errors}
            raise AlertmanagerUnavailableError(
                "; ".join(error.reason for error in errors), status=statuses.pop() if len(statuses) == 1 else None
            )
        for error in errors:
            log.warning("alerts not posted to one Alertmanager of the cluster", extra=fields(reason=error.reason))

    async def create_silence(
        self,
        matchers: Mapping[str, str],
        duration_seconds: float,
        comment: str,
        created_by: str = "healer",
    ) -> str:
        """Silence alerts carrying every one of `matchers` exactly, from now on; return its id.

        Pass the alert's full label set, alertname included, so the silence does not also
        catch other alerts such as healer's own `HealingFailed` for the same target.
        """
        if not matchers:
            raise ValueError("a silence needs at least one matcher")
        now = datetime.now(UTC)
        body = {
            "matchers": [
                {"name": name, "value": value, "isRegex": False, "isEqual": True} for name, value in matchers.items()
            ],
            "startsAt": _timestamp(now),
            "endsAt": _timestamp(now + timedelta(seconds=duration_seconds)),
            "createdBy": created_by,
            "comment": comment,
        }
        answer = await self._first_answering("POST", "/api/v2/silences", body=body)
        if not isinstance(answer, dict) or not isinstance(answer.get("silenceID"), str):
            raise AlertmanagerUnavailableError(f"unexpected answer to a new silence: {answer!r:.200}")
        return str(answer["silenceID"])

    async def expire_silence(self, silence_id: str) -> None:
        """Expire a silence (at a peer while `url` cannot be reached); one unknown or already expired is not an error.

        Alertmanager 0.25 answers 200 for an already expired silence and 500 "silence not
        found" for an unknown one; other versions answer 404 or "already expired".
        """
        try:
            await self._first_answering(
                "DELETE",
                f"/api/v2/silence/{quote(silence_id, safe='')}",
                ok_statuses=frozenset({404}),
            )
        except AlertmanagerUnavailableError as exc:
            if exc.status == 500 and ("not found" in exc.reason or "already expired" in exc.reason):
                return
            raise

    async def silences(self, active_only: bool = True) -> list[dict[str, Any]]:
        """List the cluster's silences (from a peer while `url` cannot be reached), by default only active ones."""
        answer = await self._first_answering("GET", "/api/v2/silences")
        result = [dict(item) for item in answer or []]
        if active_only:
            result = [item for item in result if item.get("status", {}).get("state") == "active"]
        return result

    async def alerts(self, filter: Mapping[str, str] | None = None) -> list[dict[str, Any]]:
        """List `url`'s alerts (active, silenced and inhibited) carrying every label of `filter` exactly."""
        answer = await self._request("GET", "/api/v2/alerts", params=_matcher_filter(filter or {}))
        return [dict(item) for item in answer or []]
