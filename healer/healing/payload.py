"""The Alertmanager webhook payload, version 4."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_ALERTS_PER_PAYLOAD = 10_000
MAX_LABEL_VALUE_BYTES = 1024 * 1024


class WebhookAlert(BaseModel):
    """One alert of a webhook payload; fields Alertmanager may add later are ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    status: Literal["firing", "resolved"]
    labels: dict[str, str] = Field(min_length=1)
    annotations: dict[str, str] = Field(default_factory=dict)
    startsAt: datetime
    endsAt: datetime | None = None
    generatorURL: str = ""
    fingerprint: str = Field(pattern=r"^[0-9a-f]{1,32}$")

    @field_validator("labels")
    @classmethod
    def _has_alertname(cls, labels: dict[str, str]) -> dict[str, str]:
        if not labels.get("alertname"):
            raise ValueError("an alert needs an alertname label")
        return labels

    @property
    def alertname(self) -> str:
        return self.labels["alertname"]

    @property
    def starts_at(self) -> str:
        """startsAt as a normalised UTC RFC 3339 string, half of the episode key."""
        moment = self.startsAt if self.startsAt.tzinfo else self.startsAt.replace(tzinfo=UTC)
        return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")

    @property
    def starts_at_epoch(self) -> float:
        # No cached_property here or in starts_at: model_copy(update=...) would copy a stale value.
        moment = self.startsAt if self.startsAt.tzinfo else self.startsAt.replace(tzinfo=UTC)
        return moment.timestamp()


class WebhookPayload(BaseModel):
    """The body Alertmanager posts to a webhook receiver."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    version: Literal["4"]
    status: Literal["firing", "resolved"]
    receiver: str = ""
    groupKey: str = ""
    truncatedAlerts: int = 0
    groupLabels: dict[str, str] = Field(default_factory=dict)
    commonLabels: dict[str, str] = Field(default_factory=dict)
    commonAnnotations: dict[str, str] = Field(default_factory=dict)
    externalURL: str = ""
    alerts: list[WebhookAlert] = Field(min_length=1, max_length=MAX_ALERTS_PER_PAYLOAD)
