"""The HTTP API of healing: the Alertmanager webhook, the audit trail and operator actions."""

from __future__ import annotations

import logging
import time
from typing import Annotated, Any

from aiohttp import web
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, field_validator

from healer.auth import actor
from healer.config.model import MatcherField
from healer.healing.engine import Engine
from healer.healing.ladder import Ladder
from healer.healing.model import Action, ActionFilter, Episode
from healer.healing.payload import InvalidPayloadError, decode_webhook
from healer.http import invalid_body, path_id, problem, query_limit, query_number, require_json
from healer.limits import BodyTooLargeError, read_body
from healer.logs import fields
from healer.storage import StoreUnavailableError
from healer.storage.watch import STORE_WATCH
from healer.types import PositiveDuration

log = logging.getLogger(__name__)

ENGINE = web.AppKey("engine", Engine)
# The ladders and what they learned, for the optimisation API (which shows learned ladders).
LADDER = web.AppKey("ladder", Ladder)
# The longest pause one request may set.
MAX_PAUSE_SECONDS = 30 * 86400


async def alertmanager_webhook(request: web.Request) -> web.Response:
    """Accept an Alertmanager v4 payload; answer 2xx only once every alert is in the store."""
    response = await _receive(request)
    request.app[ENGINE].metrics.webhook_responses[response.status // 100].inc()
    return response


async def _receive(request: web.Request) -> web.Response:
    engine = request.app[ENGINE]
    refused = require_json(request)
    if refused is not None:
        return refused
    try:
        # Read here, not cached on the request: a kept-alive connection would hold a large body until its next
        # request. A body that does not arrive in time raises BodyTimeoutError, answered 408 by request_limits.
        body = await read_body(request)
    except BodyTooLargeError as exc:
        return problem(413, str(exc))
    try:
        payload = decode_webhook(body)
    except InvalidPayloadError as exc:
        if exc.status == 400:
            return problem(400, exc.message)
        return problem(exc.status, exc.message, errors=exc.errors)
    store = request.app[STORE_WATCH].health
    if not store.up:
        # Nothing is accepted into a store that may lose it; Alertmanager retries a 5xx later.
        return problem(503, f"the store cannot keep alerts now ({store.reason}); retry", reason=store.reason)
    if engine.backlog >= engine.config.store.max_backlog:
        # Alertmanager retries a 5xx later; refusing now bounds the disk and loses nothing.
        return problem(
            503,
            f"{engine.backlog} alerts wait to be processed, the limit is {engine.config.store.max_backlog}"
            " (store.max_backlog); retry later",
            backlog=engine.backlog,
        )
    try:
        delivery = await engine.inbox.accept(body, len(payload.alerts))
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


def _action_json(action: Action, episode: Episode) -> dict[str, Any]:
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


async def list_actions(request: web.Request) -> web.Response:
    """The audit trail, newest first, filtered by alertname, rule, strategy, outcome, episode and time."""
    engine = request.app[ENGINE]
    query = request.query
    flt = ActionFilter(
        alertname=query.get("alertname"),
        fingerprint=query.get("fingerprint"),
        episode_id=query_number(request, "episode", int),
        rule=query.get("rule"),
        strategy=query.get("strategy"),
        outcome=query.get("outcome"),
        since=query_number(request, "since", float),
        until=query_number(request, "until", float),
        limit=query_limit(request),
    )
    rows = await engine.records.list_actions(flt)
    return web.json_response({"actions": [_action_json(a, e) for a, e in rows]})


async def list_operator_acts(request: web.Request) -> web.Response:
    """Operators' acts outside any episode, newest first: who closed the circuit, opened or cancelled a goal,
    acknowledged an optimisation (approvals, rejections and pauses are in their step's events and pauses)."""
    acts = await request.app[ENGINE].records.operator_acts(query_limit(request))
    return web.json_response({"acts": [act.to_json() for act in acts]})


async def get_action(request: web.Request) -> web.Response:
    """One step with its episode and the episode's full event history."""
    engine = request.app[ENGINE]
    action_id = path_id(request, "action")
    action = await engine.records.get_action(action_id)
    if action is None:
        return problem(404, f"no action {action_id}")
    episode = await engine.records.get_episode(action.episode_id)
    if episode is None:  # purged between the two reads
        return problem(404, f"no action {action_id}")
    events = await engine.records.events(action.episode_id)
    return web.json_response({**_action_json(action, episode), "events": events})


async def approve_action(request: web.Request) -> web.Response:
    """Approve a step that waits for approval; it runs at once."""
    engine = request.app[ENGINE]
    action_id = path_id(request, "action")
    approver = actor(request)
    if not await engine.approve(action_id, approver):
        return problem(409, f"action {action_id} is not waiting for approval")
    return web.json_response({"approved": action_id})


class RejectRequest(BaseModel):
    """The body of `POST /api/v1/actions/{id}/reject`."""

    model_config = ConfigDict(extra="forbid")

    reason: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=1000)]


async def reject_action(request: web.Request) -> web.Response:
    """Reject a step that waits for approval, saying why; it ends cancelled and its episode escalates at once."""
    refused = require_json(request)
    if refused is not None:
        return refused
    engine = request.app[ENGINE]
    action_id = path_id(request, "action")
    try:
        body = RejectRequest.model_validate_json(await request.read())
    except ValidationError as exc:
        return invalid_body(exc, "not a valid rejection")
    if await engine.records.get_action(action_id) is None:
        return problem(404, f"no action {action_id}")
    # The authenticated caller, as for approval, so the audit trail names both alike.
    who = actor(request)
    if not await engine.reject(action_id, who, body.reason):
        return problem(409, f"action {action_id} is not waiting for approval")
    return web.json_response({"rejected": action_id, "by": who, "reason": body.reason})


async def close_circuit(request: web.Request) -> web.Response:
    """Close the circuit breaker and reset the action budget, recording who did in the audit trail."""
    who = actor(request)
    await request.app[ENGINE].close_circuit(who)
    log.info("circuit closed by operator", extra=fields(by=who))
    return web.json_response({"circuit_open": False, "by": who})


class PauseRequest(BaseModel):
    """The body of `POST /api/v1/pauses`."""

    model_config = ConfigDict(extra="forbid")

    # Alertmanager's syntax; every one must hold. At least one, as for a silence: `alertname=~".+"` pauses all.
    matchers: Annotated[list[MatcherField], Field(min_length=1, max_length=50)]
    reason: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=1000)]
    duration: PositiveDuration

    @field_validator("duration")
    @classmethod
    def _bounded(cls, value: float) -> float:
        if value > MAX_PAUSE_SECONDS:
            raise ValueError(f"must be at most {MAX_PAUSE_SECONDS // 86400} days; pause again when it ends")
        return value


async def create_pause(request: web.Request) -> web.Response:
    """Pause healing for the alerts the matchers select: they are recorded, not acted on, until it ends."""
    refused = require_json(request)
    if refused is not None:
        return refused
    try:
        body = PauseRequest.model_validate_json(await request.read())
    except ValidationError as exc:
        return invalid_body(exc, "not a valid pause")
    board = request.app[ENGINE].episode_steps.pauses
    pause = await board.pause([str(m) for m in body.matchers], body.reason, actor(request), body.duration)
    return web.json_response({"id": pause.id, "pause": pause.to_json(pause.created_at)}, status=201)


async def list_pauses(request: web.Request) -> web.Response:
    """Operators' pauses in force, every pause in force whatever its source, and the newest operators' pauses,
    ended ones included (`?limit=`), so that who ended a pause stays on record for the console's audit."""
    board = request.app[ENGINE].episode_steps.pauses
    now = time.time()
    stored = await board.stored()
    recent = await board.recent(query_limit(request))
    return web.json_response(
        {
            "pauses": [p.to_json(now) for p in stored],
            "in_force": [p.to_json() for p in await board.current()],
            "recent": [p.to_json(now) for p in recent],
        }
    )


async def end_pause(request: web.Request) -> web.Response:
    """End an operator's pause before it expires; matching alerts still firing are healed."""
    pause_id = path_id(request, "pause")
    ended = await request.app[ENGINE].episode_steps.pauses.unpause(pause_id, actor(request))
    if ended is None:
        return problem(404, f"no pause {pause_id} in force")
    return web.json_response({"pause": ended.to_json(time.time())})


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/v1/alertmanager", alertmanager_webhook)
    app.router.add_get("/api/v1/actions", list_actions)
    app.router.add_get("/api/v1/actions/{id}", get_action)
    app.router.add_get("/api/v1/audit", list_operator_acts)
    app.router.add_post("/api/v1/actions/{id}/approve", approve_action)
    app.router.add_post("/api/v1/actions/{id}/reject", reject_action)
    app.router.add_post("/api/v1/circuit/close", close_circuit)
    app.router.add_post("/api/v1/pauses", create_pause)
    app.router.add_get("/api/v1/pauses", list_pauses)
    app.router.add_delete("/api/v1/pauses/{id}", end_pause)
