"""The HTTP API of optimisation: the candidates with what was learned, and the trials."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from healer.healing.engine import Engine
from healer.optimizer.optimizer import Optimizer
from healer.receiver import authenticate, problem

OPTIMIZER = web.AppKey("optimizer", Optimizer)


async def list_optimizations(request: web.Request) -> web.Response:
    """Candidates best score first, the trial in flight, and trials newest first (`?limit=`)."""
    optimizer = request.app[OPTIMIZER]
    try:
        limit = max(1, min(int(request.query.get("limit", "100")), 1000))
    except ValueError:
        return problem(400, "limit must be an integer")
    candidates = await optimizer.candidates()
    trials = await optimizer.store.call(optimizer.records.history, limit)
    in_flight = await optimizer.store.call(optimizer.records.in_flight)
    return web.json_response(
        {
            "min_confidence": optimizer.config.optimizer.min_confidence,
            "candidates": [view.to_json() for view in candidates],
            "in_flight": in_flight.to_json() if in_flight is not None else None,
            "trials": [trial.to_json() for trial in trials],
            "ladders": learned_ladders(optimizer.engine),
        }
    )


async def acknowledge(request: web.Request) -> web.Response:
    """A person undid a change whose rollback failed; its candidate may be tried again after its cooldown."""
    refused = authenticate(request)
    if refused is not None:
        return refused
    optimizer = request.app[OPTIMIZER]
    name = request.match_info["candidate"]
    if name not in {c.name for c in optimizer.config.optimizer.candidates}:
        return problem(404, f"no candidate {name!r}")
    if not await optimizer.acknowledge(name):
        return problem(409, f"the last trial of {name!r} is not a failed rollback waiting to be acknowledged")
    return web.json_response({"acknowledged": name})


def learned_ladders(engine: Engine) -> dict[str, list[dict[str, Any]]]:
    """For each rule with `order: learned`, its ladder in the order the next episode would take it."""
    ladders = {}
    for rule in engine.config.healing.rules:
        if rule.order == "learned":
            rungs = []
            for name in engine.ladder(rule):
                confidence, healed, trials = engine.strategy_confidence(rule.name, name)
                rungs.append({"strategy": name, "confidence": confidence, "healed": healed, "trials": trials})
            ladders[rule.name] = rungs
    return ladders


def add_optimization_routes(app: web.Application) -> None:
    app.router.add_get("/api/v1/optimizations", list_optimizations)
    app.router.add_post("/api/v1/optimizations/{candidate}/acknowledge", acknowledge)
