"""A rule's ladder: which rule an alert matches, where its ladder starts, and which step follows which.

With `order: learned` the ladder is sorted by the confidence each strategy has earned healing that
rule's alerts, ties in configured order.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

from healer.config import HealerConfig, HealingRule
from healer.healing.learning import OutcomeTally
from healer.healing.model import Action, NewAction, Outcome, SkipReason
from healer.healing.payload import WebhookAlert
from healer.healing.rails import backoff
from healer.strategies.base import StrategyRegistry
from healer.strategies.runner import AlertContext, UnsafeLabelError

STRATEGY_LABEL = "healer_strategy"


@dataclass(frozen=True)
class Decision:
    """What the engine would do with one firing alert, without doing it."""

    rule: HealingRule | None
    ladder: list[str]
    start: int
    skip_reason: SkipReason | None
    explanation: str


def decide(
    config: HealerConfig, labels: Mapping[str, str], ladder_of: Callable[[HealingRule], list[str]] | None = None
) -> Decision:
    """Find the first rule matching the labels and the ladder position the alert starts at.

    `ladder_of` gives a rule's ladder (for `order: learned`); without it, the ladder is as configured.
    """
    rule = next((r for r in config.healing.rules if r.matches(dict(labels))), None)
    if rule is None:
        return Decision(None, [], 0, SkipReason.NO_RULE, "no healing rule matches these labels")
    ladder = ladder_of(rule) if ladder_of is not None else rule.strategies
    wanted = labels.get(STRATEGY_LABEL)
    if wanted is None:
        return Decision(rule, ladder, 0, None, f"rule {rule.name!r} matches")
    if wanted in ladder:
        return Decision(
            rule,
            ladder,
            ladder.index(wanted),
            None,
            f"rule {rule.name!r} matches; label {STRATEGY_LABEL}={wanted!r} starts the ladder there",
        )
    return Decision(
        rule,
        ladder,
        0,
        SkipReason.STRATEGY_NOT_ALLOWED,
        f"rule {rule.name!r} matches; label {STRATEGY_LABEL}={wanted!r} is not in its ladder and is ignored",
    )


def dry_run_for(config: HealerConfig, rule: HealingRule) -> bool:
    """A rule's own dry_run, when set, overrides the global one in both directions."""
    return config.healing.dry_run if rule.dry_run is None else rule.dry_run


class Ladder:
    """The ladders of the configured rules, ordered as configured or as learned from outcomes."""

    def __init__(self, config: HealerConfig, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.tally = OutcomeTally(config.optimizer.prior_weight)
        self._clock = clock

    @property
    def learns(self) -> bool:
        """Whether any rule orders its ladder by what it learned."""
        return any(rule.order == "learned" for rule in self.config.healing.rules)

    def order(self, rule: HealingRule) -> list[str]:
        """A rule's ladder: as configured, or for `order: learned` by confidence, ties in configured order."""
        if rule.order != "learned":
            return rule.strategies
        return sorted(rule.strategies, key=lambda name: -self.tally.confidence(rule.name, name)[0])

    def confidence(self, rule: str, strategy: str) -> tuple[float, int, int]:
        """(confidence, healed, trials) of a rule's strategy."""
        return self.tally.confidence(rule, strategy)

    def learn(self, action: Action, outcome: Outcome) -> None:
        """Count how a step ended toward its strategy's confidence."""
        self.tally.learn(action.rule, action.strategy, outcome)

    def learned(self) -> dict[str, list[dict[str, Any]]]:
        """For each rule with `order: learned`, its ladder in the order the next episode would take it."""
        ladders = {}
        for rule in self.config.healing.rules:
            if rule.order == "learned":
                rungs = []
                for name in self.order(rule):
                    confidence, healed, trials = self.confidence(rule.name, name)
                    rungs.append({"strategy": name, "confidence": confidence, "healed": healed, "trials": trials})
                ladders[rule.name] = rungs
        return ladders

    def decide(self, labels: Mapping[str, str]) -> Decision:
        """The rule an alert matches and where on its ladder (as ordered now) it starts."""
        return decide(self.config, labels, self.order)

    def first(self, decision: Decision) -> NewAction:
        """The first step of a matched alert's episode, due now."""
        assert decision.rule is not None
        strategy = decision.ladder[decision.start]
        return NewAction(1, decision.rule.strategies.index(strategy), decision.rule.name, strategy, self._clock())

    def next_step(
        self, action: Action, rule: HealingRule | None, *, same_step: bool = False, tried: Collection[str] = ()
    ) -> NewAction | None:
        """The step after `action`: the same one again, the next rung, or (learned order) the best untried one.

        None when the rule is gone or its attempts are used up. A next rung waits the rule's backoff;
        the same step again (after an interruption) is due at once.
        """
        if rule is None or action.attempt >= rule.max_attempts:
            return None
        delay = 0.0 if same_step else backoff(rule, action.attempt)
        if action.strategy not in rule.strategies:  # the config changed since: keep the position
            step = min(action.step, len(rule.strategies) - 1)
        elif same_step:
            step = rule.strategies.index(action.strategy)
        elif rule.order == "learned":
            untried = [name for name in self.order(rule) if name not in tried]
            # Like the configured ladder, the last rung repeats once every strategy has had its turn.
            step = rule.strategies.index(untried[0] if untried else action.strategy)
        else:
            step = min(action.step + 1, len(rule.strategies) - 1)
        return NewAction(action.attempt + 1, step, rule.name, rule.strategies[step], self._clock() + delay)


def first_plans(config: HealerConfig, registry: StrategyRegistry, alert: WebhookAlert) -> dict[str, Any]:
    """Describe what the engine would run for one alert, for `healer test-alert`."""
    decision = decide(config, alert.labels)
    report: dict[str, Any] = {
        "alertname": alert.alertname,
        "status": alert.status,
        "fingerprint": alert.fingerprint,
        "rule": decision.rule.name if decision.rule else None,
        "explanation": decision.explanation,
        "skip_reason": decision.skip_reason,
        "ladder": [],
    }
    if decision.rule is None or alert.status != "firing":
        if alert.status != "firing":
            report["explanation"] = "resolved notification: cancels the pending steps of its episode"
        return report
    if decision.rule.order == "learned":
        report["explanation"] += "; order: learned, so healer puts first what has healed most (shown as configured)"
    context = AlertContext(alert.labels, alert.annotations, alert.fingerprint, alert.starts_at, alert.status)
    dry_run = dry_run_for(config, decision.rule)
    for name in decision.ladder[decision.start :]:
        params = config.strategies[name]
        entry: dict[str, Any] = {"strategy": name, "type": params.type, "dry_run": dry_run, "approval": params.approval}
        try:
            entry["plan"] = registry.get(params.type).runner.plan(params, context)
        except UnsafeLabelError as exc:
            entry["skip_reason"] = SkipReason.UNSAFE_LABEL
            entry["error"] = str(exc)
        report["ladder"].append(entry)
    return report
