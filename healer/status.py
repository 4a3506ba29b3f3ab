"""The unified status report: health from Prometheus, healing from the store, in ten seconds' reading."""

from __future__ import annotations

import asyncio
import math
import statistics
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from healer.healing.engine import Engine
from healer.healing.model import EpisodeState, Outcome
from healer.healing.routes import ENGINE
from healer.optimizer.optimizer import STATES as CANDIDATE_STATES
from healer.optimizer.optimizer import Optimizer
from healer.optimizer.routes import OPTIMIZER
from healer.planner.planner import Planner
from healer.planner.routes import PLANNER
from healer.promql import PrometheusUnavailableError

HEALTH_NAMES = {0: "HEALTHY", 1: "DEGRADED", 2: "CRITICAL", 3: "FAILING"}
TREND_NAMES = {-1: "improving", 0: "stable", 1: "degrading"}
# Each figure is the worst instance's, read from the recording rules in rules/.
HEALTH_QUERIES = {
    "status": "max(instance:healer_health_status:max)",
    "trend": "max(instance:healer_health_status:trend30m)",
    "cpu_ratio": "max(instance:healer_host_cpu_utilisation:ratio_rate1m)",
    "memory_ratio": "max(instance:healer_host_memory_utilisation:ratio)",
    "error_ratio": "max(probe:healer_probe_errors:ratio_rate5m)",
    "latency_p99_seconds": "max(probe:healer_probe_duration_seconds:p99_rate5m)",
    "alerts_firing": 'count(ALERTS{alertstate="firing"}) or vector(0)',
}
ENDED_BY_HEALER = (EpisodeState.HEALED, EpisodeState.ESCALATED, EpisodeState.UNVERIFIED)


def _quantile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(q * 100) - 1]


async def health(engine: Engine) -> dict[str, Any]:
    """Ask Prometheus for the health figures; report which were unavailable instead of failing."""
    names = list(HEALTH_QUERIES)
    results = await asyncio.gather(*(engine.promql.scalar(HEALTH_QUERIES[n]) for n in names), return_exceptions=True)
    report: dict[str, Any] = {}
    for name, result in zip(names, results, strict=True):
        if isinstance(result, PrometheusUnavailableError):
            return {"status": "UNKNOWN", "trend": "unknown", "error": str(result)}
        # NaN (an empty denominator in a ratio) means "no data", and JSON cannot carry it.
        usable = not isinstance(result, BaseException) and result is not None and math.isfinite(result)
        report[name] = result if usable else None
    status = report.pop("status")
    trend = report.pop("trend")
    report["status"] = HEALTH_NAMES.get(int(status), "UNKNOWN") if status is not None else "UNKNOWN"
    report["trend"] = TREND_NAMES.get(int(trend), "unknown") if trend is not None else "unknown"
    return report


async def healing(engine: Engine) -> dict[str, Any]:
    """Counts of the audit trail: alerts, episodes by outcome, resolution rate, time to heal."""
    counts = await engine.records.counts()
    episodes = counts.episodes
    ended = sum(episodes.get(state, 0) for state in ENDED_BY_HEALER)
    heal_seconds = counts.heal_seconds
    return {
        "alerts_received": counts.alerts_received,
        "episodes": episodes,
        "healed": episodes.get(EpisodeState.HEALED, 0),
        "not_healed": counts.actions.get(Outcome.NOT_HEALED, 0),
        "escalated": episodes.get(EpisodeState.ESCALATED, 0),
        "in_progress": episodes.get(EpisodeState.OPEN, 0),
        "actions": counts.actions,
        "resolution_rate": (episodes.get(EpisodeState.HEALED, 0) / ended) if ended else None,
        "time_to_heal_seconds": {"p50": _quantile(heal_seconds, 0.5), "p95": _quantile(heal_seconds, 0.95)},
        "circuit_open": await engine.steps.circuit_open(),
        "pauses": [pause.to_json() for pause in await engine.episode_steps.pauses.current()],
        "replica": engine.replica.name,
        "leader": engine.replica.leader,
        "dry_run": engine.config.healing.dry_run,
    }


async def goals(planner: Planner) -> dict[str, Any]:
    """Goals by state, and the open ones in the order the planner takes them."""
    counts, open_goals = await asyncio.gather(planner.records.counts(), planner.records.open_goals())
    return {
        "enabled": planner.config.planner.enabled,
        **counts,
        "open": [
            {
                "id": g.id,
                "name": g.name,
                "labels": g.labels,
                "type": g.type.value,
                "priority": g.priority.name,
                "state": g.state.value,
                "progress": g.progress,
                "deadline": g.deadline,
            }
            for g in open_goals
        ],
    }


async def optimization(optimizer: Optimizer) -> dict[str, Any]:
    """Candidates by state, and the trial in flight."""
    views = await optimizer.candidates()
    trial = await optimizer.records.in_flight()
    states = {state: sum(1 for v in views if v.state == state) for state in CANDIDATE_STATES}
    return {
        "enabled": optimizer.config.optimizer.enabled,
        "candidates": len(views),
        **states,
        "in_flight": None if trial is None else trial.to_json(),
    }


async def build_status(engine: Engine, planner: Planner, optimizer: Optimizer) -> dict[str, Any]:
    """The whole report: health, healing, goals and optimisation."""
    health_report, healing_report, goals_report, optimization_report = await asyncio.gather(
        health(engine), healing(engine), goals(planner), optimization(optimizer)
    )
    return {
        "health": health_report,
        "trend": health_report.get("trend", "unknown"),
        "healing": healing_report,
        "goals": goals_report,
        "optimization": optimization_report,
    }


async def status_handler(request: web.Request) -> web.Response:
    """The unified status report as JSON."""
    app = request.app
    return web.json_response(await build_status(app[ENGINE], app[PLANNER], app[OPTIMIZER]))


def _optimization_line(report: dict[str, Any]) -> str:
    o = report["optimization"]
    if not o or not o["candidates"]:
        return "nothing"
    if not o.get("enabled", True):
        return f"disabled ({o['candidates']} candidates configured)"
    counts = f"{o['kept']} kept, {o['ready']} ready, {o['cooldown']} cooling down of {o['candidates']} candidates"
    trial = o["in_flight"]
    if trial is None:
        return counts
    return f"{trial['candidate']} on {trial['component']} ({trial['outcome']}); {counts}"


def _goal_line(report: dict[str, Any]) -> str:
    g = report["goals"]
    if not g:
        return "none"
    ended = f"{g['completed']} completed, {g['failed']} failed, {g['cancelled']} cancelled"
    if not g.get("enabled", True):
        return f"disabled; {ended}"
    current = [o for o in g["open"] if o["state"] == "in_progress"]
    if not current:
        return f"{g['pending']} pending, none in progress; {ended}"
    c = current[0]
    labels = ",".join(f"{k}={v}" for k, v in sorted(c["labels"].items()))
    progress = "unmeasured" if c["progress"] is None else f"{c['progress']:.0%}"
    return f"{c['name']}{{{labels}}} in progress ({progress}), {g['pending']} pending; {ended}"


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0%}"


def _seconds(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value * 1000:.0f} ms" if value < 1 else f"{value:.1f} s"


def _clock_time(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def render_status(report: dict[str, Any]) -> str:
    """Format the status report for a person."""
    h = report["health"]
    lines = [f"Health     {h['status']} ({h.get('trend', 'unknown')})"]
    if "error" in h:
        lines.append(f"           Prometheus unavailable: {h['error']}")
    else:
        lines.append(
            f"           CPU {_percent(h.get('cpu_ratio'))}, memory {_percent(h.get('memory_ratio'))}, "
            f"errors {_percent(h.get('error_ratio'))}, p99 latency {_seconds(h.get('latency_p99_seconds'))}, "
            f"{int(h.get('alerts_firing') or 0)} alerts firing"
        )
    g = report["healing"]
    ttr = g["time_to_heal_seconds"]
    lines += [
        f"Healing    {g['alerts_received']} alerts received; {g['healed']} healed, {g['escalated']} escalated, "
        f"{g['in_progress']} in progress; {g['not_healed']} steps did not heal",
        f"           resolution rate {_percent(g['resolution_rate'])}, time to heal p50 {_seconds(ttr['p50'])}, "
        f"p95 {_seconds(ttr['p95'])}"
        + ("; CIRCUIT BREAKER OPEN" if g["circuit_open"] else "")
        + ("; DRY RUN" if g["dry_run"] else ""),
        *[
            f"           PAUSED by {p['source']} {p['name']}: {p['reason']}"
            + (f" (until {_clock_time(p['until'])})" if p.get("until") else "")
            for p in g.get("pauses", [])
        ],
        f"Goals      {_goal_line(report)}",
        f"Optimizing {_optimization_line(report)}",
    ]
    return "\n".join(lines)
