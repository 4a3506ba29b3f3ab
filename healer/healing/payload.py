"""The Alertmanager webhook payload, version 4, and its decoder."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Literal

import msgspec

MAX_ALERTS_PER_PAYLOAD = 10_000
FORMAT_MISMATCH = "payload does not match the Alertmanager webhook format"
FINGERPRINT_PATTERN = "^[0-9a-f]{1,32}$"
_HEX_DIGITS = "0123456789abcdef"

Status = Literal["firing", "resolved"]


class WebhookAlert(msgspec.Struct, frozen=True, kw_only=True):
    """One alert of a webhook payload; fields Alertmanager may add later are ignored."""

    status: Status
    labels: Annotated[dict[str, str], msgspec.Meta(min_length=1)]
    annotations: dict[str, str] = {}
    startsAt: datetime
    endsAt: datetime | None = None
    generatorURL: str = ""
    fingerprint: str

    def __post_init__(self) -> None:
        # Checked here rather than with msgspec.Meta(pattern=...): msgspec calls Python's re per value,
        # which cost more than the rest of an alert's decoding. The "field: " prefix names the field.
        fingerprint = self.fingerprint
        if not 0 < len(fingerprint) <= 32 or fingerprint.strip(_HEX_DIGITS):
            raise ValueError(f"fingerprint: String should match pattern '{FINGERPRINT_PATTERN}'")
        if not self.labels.get("alertname"):
            raise ValueError("labels: an alert needs an alertname label")

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
        # Properties, not cached: msgspec.structs.replace would copy a stale value.
        moment = self.startsAt if self.startsAt.tzinfo else self.startsAt.replace(tzinfo=UTC)
        return moment.timestamp()


class WebhookPayload(msgspec.Struct, frozen=True, kw_only=True):
    """The body Alertmanager posts to a webhook receiver."""

    version: Literal["4"]
    status: Status
    receiver: str = ""
    groupKey: str = ""
    truncatedAlerts: int = 0
    groupLabels: dict[str, str] = {}
    commonLabels: dict[str, str] = {}
    commonAnnotations: dict[str, str] = {}
    externalURL: str = ""
    alerts: Annotated[list[WebhookAlert], msgspec.Meta(min_length=1, max_length=MAX_ALERTS_PER_PAYLOAD)]


class InvalidPayloadError(ValueError):
    """A webhook body that is not JSON (status 400) or not the Alertmanager format (status 422)."""

    def __init__(self, status: int, message: str, errors: list[dict[str, str]]) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.errors = errors


_DECODER = msgspec.json.Decoder(WebhookPayload)
_ENCODER = msgspec.json.Encoder()
_INDEX = re.compile(r"\[(\d+)\]")
_MISSING = re.compile(r"^Object missing required field `([^`]*)`$")
_OWN_CHECKS = frozenset({"fingerprint", "labels"})  # the fields WebhookAlert.__post_init__ checks


def decode_webhook(body: bytes | str) -> WebhookPayload:
    """Parse and validate a webhook body in one pass, or raise InvalidPayloadError naming the field at fault."""
    try:
        return _DECODER.decode(body)
    except msgspec.ValidationError as exc:  # a subclass of DecodeError, so caught first
        # msgspec checks types while it parses, so a body that is both wrong and not JSON fails on
        # whichever comes first; parsing it untyped (only on this error path) keeps "not JSON" a 400.
        try:
            msgspec.json.decode(body)
        except msgspec.DecodeError as syntax:
            raise InvalidPayloadError(400, f"body is not valid JSON: {syntax}", []) from None
        field, message = _located(str(exc))
        raise InvalidPayloadError(
            422, f"{FORMAT_MISMATCH}: {field}: {message}", [{"field": field, "message": message}]
        ) from None
    except msgspec.DecodeError as exc:
        raise InvalidPayloadError(400, f"body is not valid JSON: {exc}", []) from None


def encode_webhook(value: WebhookPayload | WebhookAlert) -> bytes:
    """The JSON of a payload or an alert, as decode_webhook reads it back."""
    return _ENCODER.encode(value)


def _located(error: str) -> tuple[str, str]:
    """Split msgspec's "message - at `$.alerts[0].x`" into a dotted field path and the message."""
    message, found, path = error.rpartition(" - at `$")
    if not found:
        message, path = error, ""
    # "$.alerts[0].labels[...]" names a value of a mapping; the mapping is the field at fault.
    parts = [part for part in _INDEX.sub(r".\1", path.rstrip("`").replace("[...]", "")).split(".") if part]
    missing = _MISSING.match(message)
    if missing:
        parts.append(missing.group(1))
        message = "Field required"
    else:
        # Our own checks in __post_init__ say which field they refuse: "fingerprint: ...".
        name, colon, rest = message.partition(": ")
        if colon and name in _OWN_CHECKS:
            parts.append(name)
            message = rest
    return ".".join(parts) or "(body)", message
