"""The healing engine's metrics, with every label value created up front."""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from healer.healing.model import Outcome, SkipReason

# Every label value, created up front, comes from the enums of the healing model.
OUTCOMES = tuple(outcome.value for outcome in Outcome)
SKIP_REASONS = tuple(reason.value for reason in SkipReason)
WEBHOOK_CODES = ("2xx", "4xx", "5xx")
HEAL_BUCKETS = (1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800, 3600)
ACTION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class HealingMetrics:
    """Counters, gauges and histograms of the webhook and the healing engine."""

    def __init__(self, registry: CollectorRegistry, strategies: Iterable[str]) -> None:
        names = sorted(strategies)
        self.alerts_received = Counter(
            "healer_alerts_received", "Alerts received on the webhook, by status.", ["status"], registry=registry
        )
        self.webhook_requests = Counter(
            "healer_webhook_requests", "Webhook requests by response class.", ["code"], registry=registry
        )
        # The webhook's hot path uses these children directly; labels() takes a lock and a lookup each time.
        self.webhook_responses = {int(code[0]): self.webhook_requests.labels(code) for code in WEBHOOK_CODES}
        self.alerts_firing = self.alerts_received.labels("firing")
        self.alerts_resolved = self.alerts_received.labels("resolved")
        self.actions = Counter(
            "healer_actions",
            "Healing steps finished, by strategy and outcome.",
            ["strategy", "outcome"],
            registry=registry,
        )
        self.action_duration = Histogram(
            "healer_action_duration_seconds",
            "Time a strategy ran.",
            ["strategy"],
            buckets=ACTION_BUCKETS,
            registry=registry,
        )
        self.time_to_heal = Histogram(
            "healer_time_to_heal_seconds",
            "From the alert's startsAt to the verified heal.",
            buckets=HEAL_BUCKETS,
            registry=registry,
        )
        self.skipped = Counter("healer_skipped", "Steps not run, by reason.", ["reason"], registry=registry)
        self.escalations = Counter(
            "healer_escalations", "Episodes escalated to humans after the ladder was exhausted.", registry=registry
        )
        self.escalation_failures = Counter(
            "healer_escalation_delivery_failures",
            "Posts of HealingFailed to Alertmanager that failed; each is retried from the store.",
            registry=registry,
        )
        self.inbox_depth = Gauge("healer_inbox_depth", "Alerts accepted and not yet processed.", registry=registry)
        self.circuit_open = Gauge(
            "healer_circuit_open", "1 while the action budget's circuit breaker is open.", registry=registry
        )
        self.running = Gauge("healer_actions_running", "Healing steps running now.", registry=registry)
        for status in ("firing", "resolved"):
            self.alerts_received.labels(status)
        for code in WEBHOOK_CODES:
            self.webhook_requests.labels(code)
        for reason in SKIP_REASONS:
            self.skipped.labels(reason)
        for name in names:
            self.action_duration.labels(name)
            for outcome in OUTCOMES:
                self.actions.labels(name, outcome)
