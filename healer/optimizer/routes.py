"""The HTTP API of optimisation: the candidates with what was learned, and the trials."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from healer.healing.engine import Engine
from healer.optimizer.optimizer import Optimizer
from healer.receiver import problem

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
