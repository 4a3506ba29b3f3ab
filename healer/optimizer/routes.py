"""The HTTP API of optimisation: the candidates with what was learned, and the trials."""

from __future__ import annotations

import logging

from aiohttp import web

from healer.auth import actor
from healer.healing.routes import LADDER
from healer.http import problem, query_limit
from healer.logs import fields
from healer.optimizer.optimizer import Optimizer

log = logging.getLogger(__name__)

OPTIMIZER = web.AppKey("optimizer", Optimizer)


async def list_optimizations(request: web.Request) -> web.Response:
    """Candidates best score first, the trial in flight, and trials newest first (`?limit=`)."""
    optimizer = request.app[OPTIMIZER]
    limit = query_limit(request)
    candidates = await optimizer.candidates()
    trials = await optimizer.records.history(limit)
    in_flight = await optimizer.records.in_flight()
    return web.json_response(
        {
            "min_confidence": optimizer.config.optimizer.min_confidence,
            "candidates": [view.to_json() for view in candidates],
            "in_flight": in_flight.to_json() if in_flight is not None else None,
            "trials": [trial.to_json() for trial in trials],
            "ladders": request.app[LADDER].learned(),
        }
    )


async def acknowledge(request: web.Request) -> web.Response:
    """A person undid a change whose rollback failed; its candidate may be tried again after its cooldown."""
    optimizer = request.app[OPTIMIZER]
    name = request.match_info["candidate"]
    if name not in {c.name for c in optimizer.config.optimizer.candidates}:
        return problem(404, f"no candidate {name!r}")
    who = actor(request)
    if not await optimizer.acknowledge(name, who):
        return problem(409, f"the last trial of {name!r} is not a failed rollback waiting to be acknowledged")
    log.info("failed rollback acknowledged", extra=fields(candidate=name, by=who))
    return web.json_response({"acknowledged": name, "by": who})


def add_optimization_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/optimizations", list_optimizations)
    app.router.add_post("/api/v1/optimizations/{candidate}/acknowledge", acknowledge)
