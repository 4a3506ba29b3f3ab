"""The Alertmanager webhook payload, version 4."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

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


class InvalidPayloadError(ValueError):
    """A webhook body that is not JSON (status 400) or not the Alertmanager format (status 422)."""

    def __init__(self, status: int, message: str, errors: list[dict[str, str]]) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.errors = errors


FORMAT_MISMATCH = "payload does not match the Alertmanager webhook format"


def decode_webhook(body: bytes | str) -> WebhookPayload:
    """Parse and validate a webhook body in one pass, or raise InvalidPayloadError naming the field at fault."""
    try:
        return WebhookPayload.model_validate_json(body)
    except ValidationError as exc:
        details = exc.errors(include_url=False, include_input=False)
        if details and details[0]["type"] == "json_invalid":
            raise InvalidPayloadError(400, f"body is not valid JSON: {details[0]['msg']}", []) from None
        errors = [
            {
                "field": ".".join(str(part) for part in error["loc"]) or "(body)",
                "message": str(error["msg"]).removeprefix("Value error, "),
            }
            for error in details[:20]
        ]
        message = f"{FORMAT_MISMATCH}: {errors[0]['field']}: {errors[0]['message']}"
        raise InvalidPayloadError(422, message, errors) from None
