"""The HTTP API of healing: the Alertmanager webhook, the audit trail and operator actions."""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from pydantic import SecretStr, ValidationError

from healer.healing.engine import Engine
from healer.healing.payload import InvalidPayloadError, decode_webhook
from healer.logs import fields
from healer.store import ActionFilter, StoreUnavailableError

log = logging.getLogger(__name__)

ENGINE = web.AppKey("engine", Engine)
TOKEN = web.AppKey("token", SecretStr)
# Names people use to pass tokens in URLs; a token there ends up in access logs, so it is refused.
QUERY_TOKEN_NAMES = frozenset({"token", "access_token", "bearer", "auth", "authorization", "api_key"})

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def problem(status: int, message: str, **extra: Any) -> web.Response:
    """A JSON error body that says what is wrong."""
    return web.json_response({"error": message, **extra}, status=status)


def authenticate(request: web.Request) -> web.Response | None:
    """Return an error response unless the request carries the configured bearer token."""
    if QUERY_TOKEN_NAMES & {name.lower() for name in request.query}:
        return problem(
            401,
            "send the token in the Authorization header, never in the URL",
            headers_hint="Authorization: Bearer <token>",
        )
    token = request.app.get(TOKEN)
    if token is None:
        return None
    header = request.headers.get("Authorization", "")
    scheme, _, presented = header.partition(" ")
    if not header:
        return problem(401, "missing Authorization header; expected 'Bearer <token>'")
    if scheme.lower() != "bearer" or not presented:
        return problem(401, "Authorization header must use the Bearer scheme")
    if not hmac.compare_digest(presented.strip().encode(), token.get_secret_value().encode()):
        return problem(403, "the bearer token is not valid")
    return None


def invalid_body(exc: ValidationError, what: str) -> web.Response:
    """400 for a body that is not JSON; 422 naming each field at fault for JSON that the model refuses."""
    details = exc.errors(include_url=False, include_input=False)
    if details and details[0]["type"] == "json_invalid":
        return problem(400, f"body is not valid JSON: {details[0]['msg']}")
    errors = [
        {
            "field": ".".join(str(part) for part in error["loc"]) or "(body)",
            "message": str(error["msg"]).removeprefix("Value error, "),
        }
        for error in details
    ]
    return problem(422, f"{what}: {errors[0]['field']}: {errors[0]['message']}", errors=errors[:20])


def _count(request: web.Request, status: int) -> None:
    request.app[ENGINE].metrics.webhook_responses[status // 100].inc()


async def alertmanager_webhook(request: web.Request) -> web.Response:
    """Accept an Alertmanager v4 payload; answer 2xx only once every alert is in the store."""
    response = await _receive(request)
    _count(request, response.status)
    return response


async def _receive(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    refused = authenticate(request)
    if refused is not None:
        return refused
    if request.content_type != "application/json":
        return problem(415, f"Content-Type must be application/json, not {request.content_type!r}")
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        limit = engine.config.server.max_request_bytes
        return problem(413, f"body larger than the limit of {limit} bytes (server.max_request_bytes)", detail=exc.text)
    try:
        payload = decode_webhook(body)
    except InvalidPayloadError as exc:
        if exc.status == 400:
            return problem(400, exc.message)
        return problem(exc.status, exc.message, errors=exc.errors)
    if engine.backlog >= engine.config.store.max_backlog:
        # Alertmanager retries a 5xx later; refusing now bounds the disk and loses nothing.
        return problem(
            503,
            f"{engine.backlog} alerts wait to be processed, the limit is {engine.config.store.max_backlog}"
            " (store.max_backlog); retry later",
            backlog=engine.backlog,
        )
    try:
        delivery = await engine.store.accept(body, len(payload.alerts))
    except StoreUnavailableError as exc:
        log.error("store refused alerts", extra=fields(reason=str(exc), alerts=len(payload.alerts)))
        return problem(503, "the store cannot take the alerts now; retry", reason=str(exc))
    metrics = engine.metrics
    resolved = sum(1 for alert in payload.alerts if alert.status == "resolved")
    if resolved:
        metrics.alerts_resolved.inc(resolved)
    if resolved < len(payload.alerts):
        metrics.alerts_firing.inc(len(payload.alerts) - resolved)
    engine.inbox_grew(len(payload.alerts))
    # Two integers: formatting them directly is a tenth of json_response's cost on the hottest path.
    answer = b'{"accepted": %d, "delivery": %d}' % (len(payload.alerts), delivery)
    return web.Response(body=answer, content_type="application/json")


def _action_json(action: Any, episode: Any) -> dict[str, Any]:
    return {
        **action.to_json(),
        "episode": {
            "id": episode.id,
            "fingerprint": episode.fingerprint,
            "starts_at": episode.starts_at,
            "alertname": episode.alertname,
            "labels": episode.labels,
            "state": episode.state,
            "rule": episode.rule,
        },
    }


def _number(request: web.Request, name: str, kind: type[float] | type[int]) -> Any:
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        return kind(raw)
    except ValueError:
        raise web.HTTPBadRequest(
            text=json.dumps({"error": f"query parameter {name!r} must be a number, not {raw!r}"}),
            content_type="application/json",
        ) from None


async def list_actions(request: web.Request) -> web.Response:
    """The audit trail, newest first, filtered by alertname, rule, strategy, outcome, episode and time."""
    engine = request.app[ENGINE]
    query = request.query
    limit = _number(request, "limit", int) or 100
    flt = ActionFilter(
        alertname=query.get("alertname"),
        fingerprint=query.get("fingerprint"),
        episode_id=_number(request, "episode", int),
        rule=query.get("rule"),
        strategy=query.get("strategy"),
        outcome=query.get("outcome"),
        since=_number(request, "since", float),
        until=_number(request, "until", float),
        limit=max(1, min(limit, 1000)),
    )
    rows = await engine.store.call(engine.store.sync.list_actions, flt)
    return web.json_response({"actions": [_action_json(a, e) for a, e in rows]})


async def get_action(request: web.Request) -> web.Response:
    """One step with its episode and the episode's full event history."""
    engine = request.app[ENGINE]
    try:
        action_id = int(request.match_info["id"])
    except ValueError:
        return problem(400, "action id must be an integer")
    action = await engine.store.call(engine.store.sync.get_action, action_id)
    if action is None:
        return problem(404, f"no action {action_id}")
    episode = await engine.store.call(engine.store.sync.get_episode, action.episode_id)
    events = await engine.store.call(engine.store.sync.events, action.episode_id)
    return web.json_response({**_action_json(action, episode), "events": events})


async def approve_action(request: web.Request) -> web.Response:
    """Approve a step that waits for approval; it runs at once."""
    refused = authenticate(request)
    if refused is not None:
        return refused
    engine = request.app[ENGINE]
    try:
        action_id = int(request.match_info["id"])
    except ValueError:
        return problem(400, "action id must be an integer")
    approver = request.headers.get("X-Healer-Approver", "api")
    if not await engine.approve(action_id, approver):
        return problem(409, f"action {action_id} is not waiting for approval")
    return web.json_response({"approved": action_id})


async def close_circuit(request: web.Request) -> web.Response:
    """Close the circuit breaker and reset the action budget."""
    refused = authenticate(request)
    if refused is not None:
        return refused
    engine = request.app[ENGINE]
    engine.close_circuit()
    log.info("circuit closed by operator")
    return web.json_response({"circuit_open": False})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/v1/alertmanager", alertmanager_webhook)
    app.router.add_get("/api/v1/actions", list_actions)
    app.router.add_get("/api/v1/actions/{id}", get_action)
    app.router.add_post("/api/v1/actions/{id}/approve", approve_action)
    app.router.add_post("/api/v1/circuit/close", close_circuit)
