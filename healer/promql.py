"""Asynchronous PromQL queries and alert verification, over `prometheus_api_client`.

`PrometheusConnect` is synchronous (it uses `requests`), so every call runs in a worker thread
through `asyncio.to_thread` and never blocks the event loop.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import yaml

from healer.config import GOAL_PLACEHOLDER, PrometheusConfig
from healer.logs import fields

if TYPE_CHECKING:
    from prometheus_api_client.exceptions import PrometheusApiClientException

    from healer.config.model import HealthyWhen

log = logging.getLogger(__name__)

VerifyOutcome = Literal["healed", "not_healed", "unverified"]
# How long one fetch of Prometheus's alerts answers every "does this alert fire?" (callers that ask while
# a fetch is under way share it: a storm asks a thousand times at once; short, so a verdict is not late).
ALERTS_CACHE_SECONDS = 0.1

LABEL_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_STATUS_IN_MESSAGE = re.compile(r"^HTTP Status Code (\d+) \((.*)\)$", re.DOTALL)


class PrometheusUnavailableError(Exception):
    """Prometheus could not be reached, timed out, or answered with a server-side error."""


class PromQLError(Exception):
    """Prometheus rejected the query itself (HTTP 400 bad_data or 422 execution error)."""


@dataclass(frozen=True)
class Sample:
    """One series of an instant-query result: its labels and its value at query time."""

    labels: dict[str, str] = field(hash=False)
    value: float


def quote_label_value(value: str) -> str:
    """Return `value` as a double-quoted PromQL string literal.

    PromQL strings use Go's escape rules; JSON's escapes (`\\\\`, `\\"`, `\\n`, `\\t`, `\\uXXXX`
    for other control characters) are a subset of them, and `ensure_ascii=False` keeps other
    characters literal, so the JSON encoding of a string is a valid PromQL literal of it.
    """
    return json.dumps(value, ensure_ascii=False)


def render_query(query: str, labels: Mapping[str, str]) -> str:
    """Put each `{labels.NAME}` of a query in as a quoted PromQL string (a missing label is "")."""
    return GOAL_PLACEHOLDER.sub(lambda m: quote_label_value(labels.get(m.group(2), "")), query)


def label_selector(metric: str, labels: Mapping[str, str]) -> str:
    """Build `metric{name="value", ...}` with every label matched by equality.

    Raises ValueError for a label name that is not a valid Prometheus label name.
    """
    parts = []
    for name, value in labels.items():
        if not LABEL_NAME.match(name):
            raise ValueError(f"{name!r} is not a valid Prometheus label name")
        parts.append(f"{name}={quote_label_value(str(value))}")
    return f"{metric}{{{', '.join(parts)}}}"


def _error_from_client_exception(exc: PrometheusApiClientException) -> Exception:
    """Turn the client's `HTTP Status Code N (b'...')` message into our own exception."""
    message = str(exc)
    match = _STATUS_IN_MESSAGE.match(message)
    if match is None:
        return PrometheusUnavailableError(f"Prometheus answered an error: {message}")
    status = int(match.group(1))
    detail = match.group(2)
    try:
        body = ast.literal_eval(detail)
        text = body.decode(errors="replace") if isinstance(body, bytes) else str(body)
    except (ValueError, SyntaxError):
        text = detail
    try:
        payload = json.loads(text)
        reason = f"{payload.get('errorType', 'error')}: {payload.get('error', text)}"
    except (ValueError, AttributeError):
        reason = text.strip()[:500] or "(empty body)"
    if status in (400, 422):
        return PromQLError(reason)
    return PrometheusUnavailableError(f"Prometheus answered HTTP {status}: {reason}")


def _to_samples(result: Any) -> list[Sample]:
    """Convert the `data.result` of an instant query (vector, scalar or string) into samples."""
    if not isinstance(result, list):
        raise PrometheusUnavailableError(f"unexpected query result from Prometheus: {result!r:.200}")
    # A scalar or string result is `[timestamp, "value"]`, not a list of series.
    if len(result) == 2 and not isinstance(result[0], dict):
        try:
            return [Sample({}, float(result[1]))]
        except (TypeError, ValueError):
            raise PromQLError(f"query returned a string, not a number: {result[1]!r}") from None
    samples = []
    for series in result:
        if not isinstance(series, dict):
            raise PrometheusUnavailableError(f"unexpected query result from Prometheus: {result!r:.200}")
        if "value" not in series:
            raise PromQLError("query returned a range vector; use an instant vector expression")
        samples.append(
            Sample(
                {str(k): str(v) for k, v in series.get("metric", {}).items()},
                float(series["value"][1]),
            )
        )
    return samples


def _server_name_adapter() -> type[Any]:
    """An HTTPAdapter class that sends `server_name` as SNI and expects it in the certificate (tls_config.server_name);
    built on first use, as `requests` is imported late."""
    from requests.adapters import HTTPAdapter

    class ServerNameAdapter(HTTPAdapter):
        def __init__(self, server_name: str, **options: Any) -> None:
            self._server_name = server_name
            super().__init__(**options)

        def init_poolmanager(self, *args: Any, **options: Any) -> None:
            options.update(server_hostname=self._server_name, assert_hostname=self._server_name)
            super().init_poolmanager(*args, **options)

    return ServerNameAdapter


class PromQLClient:
    """Instant PromQL queries against one Prometheus, with the configured timeout."""

    def __init__(self, config: PrometheusConfig) -> None:
        self.url = config.url
        self.timeout = config.timeout
        self._config = config
        self._session: Any = None
        self._prom: Any = None
        self._external_labels: dict[str, str] | None = None
        # Whether the backend serves the rule manager's alerts (Prometheus does; some compatible ones do not).
        self._alerts_api = True
        self._alerts_cache: tuple[float, list[dict[str, Any]] | None] | None = None
        self._alerts_lock = asyncio.Lock()

    def _connect(self) -> Any:
        """Create the library's client on first use, in the worker thread.

        The import is deferred because `requests` and the client add about 4 MB of resident
        memory that an exporter-only healer, which never queries, should not carry.
        """
        if self._prom is None:
            import requests
            from prometheus_api_client.prometheus_connect import PrometheusConnect
            from urllib3.util.retry import Retry

            self._session = requests.Session()
            self._session.headers["User-Agent"] = "healer"
            # tls_config, basic_auth and bearer_token_file, as Prometheus's http_config.
            tls = self._config.tls_config
            if tls is not None:
                if tls.insecure_skip_verify:
                    import urllib3

                    # Asked for in the config: not worth a warning on every query.
                    urllib3.disable_warnings(urllib3.exceptions.InsecureRequestWarning)
                    self._session.verify = False
                elif tls.ca_file is not None:
                    self._session.verify = str(tls.ca_file)
                if tls.cert_file is not None and tls.key_file is not None:
                    self._session.cert = (str(tls.cert_file), str(tls.key_file))
            if (authorization := self._config.authorization()) is not None:
                self._session.headers["Authorization"] = authorization
            # The library's default retries three times with backoff (6 s on a closed port). Here a
            # failed connect is retried once at once, nothing else is, so a query takes at most
            # about two connect timeouts or one read timeout; callers poll on their own.
            retry = Retry(total=1, connect=1, read=0, other=0, status=0, backoff_factor=0, raise_on_status=False)
            # `timeout` is annotated int but goes straight to `requests`, which takes float seconds.
            connect: Any = PrometheusConnect
            self._prom = connect(url=self.url, session=self._session, retry=retry, timeout=self.timeout)
            if tls is not None and tls.server_name is not None:
                # Replaces the adapter the library mounted at the URL, with the same retries.
                self._session.mount(self.url, _server_name_adapter()(tls.server_name, max_retries=retry))
        return self._prom

    def close(self) -> None:
        """Release the HTTP connection pool."""
        if self._session is not None:
            self._session.close()

    async def __aenter__(self) -> PromQLClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.close()

    def _query_sync(self, expr: str) -> list[Sample]:
        import requests
        from prometheus_api_client.exceptions import PrometheusApiClientException

        prom = self._connect()
        try:
            # The timeout applies to connecting and to each read, as `requests` defines it.
            result = prom.custom_query(query=expr, timeout=self.timeout)
        except PrometheusApiClientException as exc:
            raise _error_from_client_exception(exc) from None
        except requests.RequestException as exc:
            raise PrometheusUnavailableError(
                f"cannot reach Prometheus at {self.url}: {type(exc).__name__}: {exc}"
            ) from None
        except (ValueError, KeyError, TypeError) as exc:  # 200 with a body that is not the API's
            raise PrometheusUnavailableError(f"unreadable answer from Prometheus at {self.url}: {exc}") from None
        return _to_samples(result)

    async def query(self, expr: str) -> list[Sample]:
        """Run an instant query and return its series.

        Raises PromQLError when Prometheus rejects the expression and PrometheusUnavailableError
        when it cannot be reached, times out, or fails on its side.
        """
        return await asyncio.to_thread(self._query_sync, expr)

    async def scalar(self, expr: str) -> float | None:
        """Return the single value of an instant query, None for an empty result.

        Raises PromQLError when the query returns more than one series.
        """
        samples = await self.query(expr)
        if not samples:
            return None
        if len(samples) > 1:
            raise PromQLError(f"{expr!r} returned {len(samples)} series where one was expected")
        return samples[0].value

    def _get_sync(self, path: str, params: dict[str, str] | None = None) -> Any:
        """GET one of Prometheus's API paths (in a worker thread); raises PrometheusUnavailableError when it
        cannot be reached. The answer's status is the caller's to judge."""
        import requests

        self._connect()
        try:
            return self._session.get(f"{self.url}{path}", params=params, timeout=self.timeout)
        except requests.RequestException as exc:
            raise PrometheusUnavailableError(
                f"cannot reach Prometheus at {self.url}: {type(exc).__name__}: {exc}"
            ) from None

    def _external_labels_sync(self) -> dict[str, str]:
        response = self._get_sync("/api/v1/status/config")
        if response.status_code != 200:
            # Prometheus-compatible backends may not serve the config; assume no external labels.
            return {}
        try:
            config = yaml.safe_load(response.json()["data"]["yaml"]) or {}
            external = (config.get("global") or {}).get("external_labels") or {}
            return {str(k): str(v) for k, v in external.items()}
        except (ValueError, KeyError, TypeError, AttributeError, yaml.YAMLError):
            return {}

    async def external_labels(self) -> dict[str, str]:
        """Return Prometheus's `global.external_labels`, fetched once and then cached.

        Prometheus adds them to alerts it sends to Alertmanager but not to its own `ALERTS`
        series. A backend that does not serve `/api/v1/status/config` counts as having none.
        """
        if self._external_labels is None:
            self._external_labels = await asyncio.to_thread(self._external_labels_sync)
        return dict(self._external_labels)

    def _rules_evaluated_sync(self) -> bool:
        response = self._get_sync("/api/v1/rules", {"type": "alert"})
        if response.status_code != 200:
            # A Prometheus-compatible backend that does not serve rules: nothing to wait for.
            return True
        try:
            groups = response.json()["data"]["groups"]
            # A group not evaluated since the start shows Go's zero time.
            return all(not str(group.get("lastEvaluation", "")).startswith("0001-") for group in groups)
        except (ValueError, KeyError, TypeError, AttributeError):
            return True

    async def rules_evaluated(self) -> bool:
        """Tell whether Prometheus has evaluated every alerting rule group since it started.

        Until then a Prometheus that just started shows no `ALERTS` at all, which must not read as
        "the alert stopped firing".
        """
        return await asyncio.to_thread(self._rules_evaluated_sync)

    def _alerts_sync(self) -> list[dict[str, Any]] | None:
        response = self._get_sync("/api/v1/alerts")
        if response.status_code in (400, 404, 405, 501):
            return None
        if response.status_code != 200:
            raise PrometheusUnavailableError(f"Prometheus answered HTTP {response.status_code} to /api/v1/alerts")
        try:
            alerts = response.json()["data"]["alerts"]
            return [alert for alert in alerts if isinstance(alert, dict)]
        except (ValueError, KeyError, TypeError) as exc:
            raise PrometheusUnavailableError(f"unreadable alerts from Prometheus at {self.url}: {exc}") from None

    async def _alerts(self) -> list[dict[str, Any]] | None:
        """The rule manager's alerts, fetched at most once per ALERTS_CACHE_SECONDS however many ask.

        In a storm a thousand steps ask at once, and each answer lists every alert: one fetch serves them.
        """
        async with self._alerts_lock:
            now = time.monotonic()
            if self._alerts_cache is None or now - self._alerts_cache[0] >= ALERTS_CACHE_SECONDS:
                self._alerts_cache = (now, await asyncio.to_thread(self._alerts_sync))
            return self._alerts_cache[1]

    async def alert_firing(self, labels: Mapping[str, str]) -> bool:
        """Tell whether Prometheus's rule manager has a firing alert carrying all of `labels` exactly.

        `labels` are the alert's labels as Alertmanager shows them. Labels equal to one of
        Prometheus's external labels (name and value) are left out, since Prometheus adds them only
        on the way to Alertmanager. The rule manager's own state (`/api/v1/alerts`) is asked rather
        than the `ALERTS` series: after a restart, ALERTS still shows the last sample written before
        it for minutes, as if the alert fired. Raises ValueError for an invalid label name and
        PrometheusUnavailableError when Prometheus cannot answer.
        """
        external = await self.external_labels()
        wanted: dict[str, str] = {}
        for name, value in labels.items():
            if not LABEL_NAME.match(name):
                raise ValueError(f"{name!r} is not a valid Prometheus label name")
            if name != "alertstate" and external.get(name) != value:
                wanted[name] = value
        alerts = await self._alerts() if self._alerts_api else None
        if alerts is None:  # a Prometheus-compatible backend without the rule manager's API
            self._alerts_api = False
            return await self._alert_series_firing(wanted)
        for alert in alerts:
            found = alert.get("labels") or {}
            # Pending counts: after a restart Prometheus shows an alert that fired as pending again until
            # its `for` has passed anew, while the condition holds all along. A fix that works removes it.
            if alert.get("state") in ("firing", "pending") and all(
                # As in a PromQL selector, a label that is absent matches an empty value.
                found.get(name, "") == value
                for name, value in wanted.items()
            ):
                return True
        return False

    async def _alert_series_firing(self, wanted: Mapping[str, str]) -> bool:
        """The same question asked of the `ALERTS` series, for backends without /api/v1/alerts."""
        try:
            samples = await self.query(label_selector("ALERTS", {**wanted, "alertstate": "firing"}))
        except PromQLError as exc:  # our own selector cannot be wrong; the server is
            raise PrometheusUnavailableError(f"Prometheus rejected the ALERTS query: {exc}") from None
        return bool(samples)

    async def query_healthy(self, expr: str, healthy_when: HealthyWhen | None = None) -> bool:
        """Tell whether a verification query says healed: any result, or with `healthy_when` every value within it."""
        samples = await self.query(expr)
        if healthy_when is None:
            return bool(samples)
        return bool(samples) and all(healthy_when.holds(sample.value) for sample in samples)

    async def verify_resolved(
        self,
        labels: Mapping[str, str],
        within: float,
        interval: float,
        *,
        settle: float = 0.0,
        grace: float = 0.0,
        resolved: asyncio.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> VerifyOutcome:
        """Poll `alert_firing(labels)` every `interval` seconds for up to `within` seconds.

        Returns "healed" as soon as Prometheus says the alert no longer fires (and has evaluated its
        rules since it started); "not_healed" when Prometheus answers "firing" at the deadline;
        "unverified" when it cannot answer then nor within `grace` seconds after, polling on every
        `interval` meanwhile (the first answer decides). The first poll comes after `settle`
        seconds (counted within `within`) and the last one of the window happens at the deadline.

        `resolved` is an optional event the caller sets when Alertmanager reports the alert
        resolved. It cuts the current wait (the settle included) short and triggers one
        confirming query at once; only Prometheus's answer decides, so if that query still sees
        the alert firing (or cannot reach Prometheus) polling resumes at the normal interval and
        the event is not consulted again. An event already set on entry makes the first poll,
        without settle, the confirming one. `clock` and `sleep` are injectable for tests.
        """

        async def healthy() -> bool:
            if await self.alert_firing(labels):
                return False
            if not await self.rules_evaluated():
                raise PrometheusUnavailableError("Prometheus has not evaluated its alerting rules since it started")
            return True

        return await _poll(healthy, within, interval, settle, resolved, clock, sleep, grace)

    async def verify_query(
        self,
        expr: str,
        within: float,
        interval: float,
        *,
        settle: float = 0.0,
        healthy_when: HealthyWhen | None = None,
        grace: float = 0.0,
        resolved: asyncio.Event | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> VerifyOutcome:
        """Poll `query_healthy(expr, healthy_when)` as `verify_resolved` polls the alert, with the same outcomes."""
        # For alerts that outlive a fix by their range window the query, not the alert, says whether the
        # fault is gone. A query Prometheus rejects counts as a poll it could not answer: a wrong query
        # proves nothing, so it ends "unverified", never "not_healed".
        warned = False

        async def healthy() -> bool:
            nonlocal warned
            try:
                return await self.query_healthy(expr, healthy_when)
            except PromQLError as exc:
                if not warned:  # once per verification: a wrong query stays wrong
                    log.warning("Prometheus rejected the verification query", extra=fields(query=expr, error=str(exc)))
                    warned = True
                raise PrometheusUnavailableError(f"Prometheus rejected the verification query: {exc}") from None

        return await _poll(healthy, within, interval, settle, resolved, clock, sleep, grace)


async def _poll(
    healthy: Callable[[], Awaitable[bool]],
    within: float,
    interval: float,
    settle: float,
    resolved: asyncio.Event | None,
    clock: Callable[[], float],
    sleep: Callable[[float], Awaitable[None]],
    grace: float = 0.0,
) -> VerifyOutcome:
    """Ask `healthy()` after `settle`, then every `interval` until `within`; see `verify_resolved`.

    A verdict needs an answer: while Prometheus cannot answer at the deadline, polling goes on for up
    to `grace` more seconds and the first answer decides.
    """
    deadline = clock() + within
    last_word = deadline + grace
    answered = False
    resolved_seen = resolved is not None and resolved.is_set()
    last_error: PrometheusUnavailableError | None = None
    polls = 0
    # An alert Alertmanager already reported resolved needs no time to show the fix.
    delay = 0.0 if resolved_seen else min(settle, within)
    while True:
        if delay > 0:
            if resolved is None or resolved_seen:
                await sleep(delay)
            else:
                resolved_seen = await _sleep_or_event(sleep, delay, resolved)
        polls += 1
        try:
            if await healthy():
                return "healed"
        except PrometheusUnavailableError as exc:
            last_error = exc
            answered = False
        else:
            answered = True
        now = clock()
        if now >= deadline and (answered or now >= last_word):
            break
        # The last poll of the window comes at the deadline; past it, one comes every interval.
        delay = min(interval, (deadline if now < deadline else last_word) - now)
    outcome: VerifyOutcome = "not_healed" if answered else "unverified"
    log.debug(
        "verification finished",
        extra=fields(outcome=outcome, polls=polls, last_error=str(last_error) if last_error else ""),
    )
    return outcome


async def _sleep_or_event(sleep: Callable[[float], Awaitable[None]], delay: float, event: asyncio.Event) -> bool:
    """Wait `delay` seconds or until `event` is set, whichever comes first; True if it was set."""
    sleeper = asyncio.ensure_future(sleep(delay))
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait((sleeper, waiter), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (sleeper, waiter):
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
    return event.is_set()
