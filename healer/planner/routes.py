"""The HTTP API of goals: list them, open one as an operator, cancel one."""

from __future__ import annotations

import logging

from aiohttp import web
from pydantic import Field, ValidationError

from healer.auth import actor
from healer.config import GoalSpec, plan_problems
from healer.http import invalid_body, path_id, problem, query_limit, require_json
from healer.logs import fields
from healer.planner.model import GoalEndedError, GoalNotFoundError, GoalState
from healer.planner.planner import Planner, render_target_query
from healer.promql import PrometheusUnavailableError, PromQLError

log = logging.getLogger(__name__)

PLANNER = web.AppKey("planner", Planner)


class GoalRequest(GoalSpec):
    """The body of `POST /api/v1/goals`."""

    name: str = Field(pattern=r"^[a-zA-Z0-9_.-]+$")
    labels: dict[str, str] = Field(default_factory=dict)


async def list_goals(request: web.Request) -> web.Response:
    """Goals newest first, optionally of one state (`?state=in_progress`)."""
    planner = request.app[PLANNER]
    raw_state = request.query.get("state")
    state = None
    if raw_state is not None:
        try:
            state = GoalState(raw_state)
        except ValueError:
            return problem(400, f"state must be one of {', '.join(s.value for s in GoalState)}, not {raw_state!r}")
    goals = await planner.records.recent(state, query_limit(request))
    return web.json_response({"goals": [goal.to_json() for goal in goals]})


async def get_goal(request: web.Request) -> web.Response:
    """One goal with its steps and latest measurement."""
    planner = request.app[PLANNER]
    goal_id = path_id(request, "goal")
    try:
        goal = await planner.records.get(goal_id)
    except GoalNotFoundError:
        return problem(404, f"no goal {goal_id}")
    return web.json_response({"goal": goal.to_json()})


async def create_goal(request: web.Request) -> web.Response:
    """Open a goal as an operator: 201 with the goal, 409 when the same one is open, 422 for a bad one."""
    planner = request.app[PLANNER]
    if not planner.config.planner.enabled:
        return problem(503, "the planner is disabled (planner.enabled: false); a goal opened now would never run")
    refused = require_json(request)
    if refused is not None:
        return refused
    try:
        spec = GoalRequest.model_validate_json(await request.read())
    except ValidationError as exc:
        return invalid_body(exc, "not a valid goal")
    problems = plan_problems(spec.plan, dict(planner.config.strategies))
    if problems:
        position, message = problems[0]
        return problem(422, f"plan[{position}]: {message}")
    rejected = await _query_rejected(planner, spec)
    if rejected is not None:
        return problem(422, f"target.query: Prometheus rejects it: {rejected}")
    who = actor(request)
    goal = await planner.add(spec, spec.name, spec.labels, who)
    if goal is None:
        return problem(409, f"a goal {spec.name!r} with these labels is open already")
    log.info("goal opened by operator", extra=fields(goal=goal.id, name=spec.name, by=who))
    return web.json_response({"goal": goal.to_json()}, status=201)


async def _query_rejected(planner: Planner, spec: GoalRequest) -> str | None:
    """Why Prometheus rejects the target query, or None (also when Prometheus cannot be asked now)."""
    try:
        await planner.promql.query(render_target_query(spec.target.query, spec.labels))
    except PromQLError as exc:
        return str(exc)
    except PrometheusUnavailableError:
        return None  # measured later, when Prometheus answers
    return None


async def cancel_goal(request: web.Request) -> web.Response:
    """Cancel an open goal and stop its running step."""
    planner = request.app[PLANNER]
    goal_id = path_id(request, "goal")
    who = actor(request)
    try:
        goal = await planner.cancel(goal_id, who)
    except GoalNotFoundError:
        return problem(404, f"no goal {goal_id}")
    except GoalEndedError as exc:
        return problem(409, str(exc))
    return web.json_response({"goal": goal.to_json()})


def add_goal_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/goals", list_goals)
    app.router.add_post("/api/v1/goals", create_goal)
    app.router.add_get("/api/v1/goals/{id}", get_goal)
    app.router.add_post("/api/v1/goals/{id}/cancel", cancel_goal)
