"""What the safety rails would decide for an alert, in words, for `healer test-alert`.

Configuration alone says which pauses, guards, blast radius, budget and flapping policy apply. Guards,
pause_when and the blast radius's fleet count are PromQL: asked when Prometheus answers, and said so
when it does not (a guard that cannot be checked holds the step: guards fail closed). Pauses made
through the API and an alert's flapping history live in the running healer's store, not here.
"""

from __future__ import annotations

import math
import time
from typing import Any

from healer.config import HealerConfig, HealingRule
from healer.healing.episodes import group_key
from healer.healing.pauses import window_ends
from healer.healing.payload import WebhookAlert
from healer.promql import PrometheusUnavailableError, PromQLClient, PromQLError, render_query


async def _ask(promql: PromQLClient, query: str) -> tuple[int | None, str]:
    """How many series a query returns, or None with why Prometheus could not say."""
    try:
        return len(await promql.query(query)), ""
    except (PrometheusUnavailableError, PromQLError) as exc:
        return None, str(exc)


async def explain_rails(
    config: HealerConfig, rule: HealingRule, alert: WebhookAlert, promql: PromQLClient, now: float | None = None
) -> list[dict[str, Any]]:
    """One entry per rail that applies to the alert under its rule: which, what it would decide, and why."""
    now = time.time() if now is None else now
    labels = dict(alert.labels)
    found: list[dict[str, Any]] = []
    for window in config.healing.maintenance:
        if not all(matcher.matches(labels) for matcher in window.match):
            continue
        ends = window_ends(window, now)
        found.append(
            {
                "rail": "pause",
                "source": f"maintenance window {window.name}",
                "holds": ends is not None,
                "explanation": f"in the window now, until {ends:.0f}" if ends else "covers this alert; not in it now",
            }
        )
    for query in config.healing.pause_when:
        count, error = await _ask(promql, query)
        holds = count is None or count > 0
        why = f"Prometheus could not answer ({error}); pause_when holds" if count is None else f"{count} series"
        found.append({"rail": "pause", "source": f"pause_when {query}", "holds": holds, "explanation": why})
    for guard in rule.guard:
        query = render_query(guard.query, labels)
        count, error = await _ask(promql, query)
        if count is None:
            why = f"not checked: Prometheus could not answer ({error}); a guard that cannot be checked holds the step"
        else:
            why = "returns a result: the step may run"
            if not count:
                why = f"returns nothing: the step waits ({guard.message})"
        found.append(
            {
                "rail": "guard",
                "query": query,
                "holds": count is None or count == 0,
                "explanation": f"{why}; escalates after {rule.guard_timeout:g}s",
            }
        )
    if rule.max_concurrent_per is not None:
        per = rule.max_concurrent_per
        found.append(
            {
                "rail": "blast_radius",
                "group": group_key(rule.name, per.labels, labels),
                "explanation": f"at most {per.limit} episode(s) with these values of {', '.join(per.labels)} healed"
                " at once; others wait their turn",
            }
        )
    if rule.blast_radius is not None:
        radius = rule.blast_radius
        query = render_query(radius.of, labels)
        try:
            instances = await promql.scalar(query)
            limit = max(1, math.floor((instances or 0.0) * radius.fraction))
            why = f"{instances or 0:g} instances now, so at most {limit} acted on within {radius.window:g}s"
        except (PrometheusUnavailableError, PromQLError) as exc:
            why = f"not counted: Prometheus could not answer ({exc}); the step would wait"
        found.append({"rail": "blast_radius", "query": query, "explanation": why})
    if rule.budget is not None:
        budget = rule.budget
        group = f" per {', '.join(budget.per)}" if budget.per else ""
        found.append(
            {
                "rail": "budget",
                "explanation": f"{budget.actions} actions per {budget.window:g}s{group} for this rule, beside the"
                f" global {config.healing.budget.actions} per {config.healing.budget.window:g}s",
            }
        )
    flapping = rule.flapping or config.healing.flapping
    found.append(
        {
            "rail": "flapping",
            "explanation": f"after {flapping.episodes} episodes within {flapping.window:g}s the alert escalates once"
            f" and is not acted on until quiet for {flapping.window:g}s (its history is in the running healer's store)",
        }
    )
    return found
