"""The msgspec webhook decoder accepts and refuses what the pydantic model it replaced did, and yields equal alerts."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Literal

import msgspec
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from healer.healing.payload import (
    MAX_ALERTS_PER_PAYLOAD,
    InvalidPayloadError,
    WebhookAlert,
    WebhookPayload,
    decode_webhook,
    encode_webhook,
)

# ---------------------------------------------------------------- the oracle: the pydantic model as it was


class PydanticAlert(BaseModel):
    """The pydantic WebhookAlert that decode_webhook replaced, kept here only as the oracle."""

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
    def starts_at(self) -> str:
        moment = self.startsAt if self.startsAt.tzinfo else self.startsAt.replace(tzinfo=UTC)
        return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")

    @property
    def starts_at_epoch(self) -> float:
        moment = self.startsAt if self.startsAt.tzinfo else self.startsAt.replace(tzinfo=UTC)
        return moment.timestamp()


class PydanticPayload(BaseModel):
    """The pydantic WebhookPayload that decode_webhook replaced."""

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
    alerts: list[PydanticAlert] = Field(min_length=1, max_length=MAX_ALERTS_PER_PAYLOAD)


def oracle(body: bytes) -> tuple[int, PydanticPayload | None, set[str]]:
    """(200, payload, {}) when the old model accepted the body, else (400 or 422, None, the fields it named)."""
    try:
        return 200, PydanticPayload.model_validate_json(body), set()
    except ValidationError as exc:
        details = exc.errors(include_url=False, include_input=False)
        if details[0]["type"] == "json_invalid":
            return 400, None, set()
        return 422, None, {".".join(str(part) for part in error["loc"]) or "(body)" for error in details}


# ---------------------------------------------------------------- generated payloads

ALERT_FIELDS = ["status", "labels", "annotations", "startsAt", "endsAt", "generatorURL", "fingerprint"]
PAYLOAD_FIELDS = ["version", "status", "receiver", "groupKey", "truncatedAlerts", "groupLabels", "commonLabels"]
PAYLOAD_FIELDS += ["commonAnnotations", "externalURL", "alerts"]

label_maps = st.dictionaries(st.text(max_size=8), st.text(max_size=8), max_size=4)
instants = st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30))
offsets = st.sampled_from(["Z", "z", "+00:00", "-00:00", "+02:00", "-07:30", "+23:59", ""])


@st.composite
def rfc3339(draw: st.DrawFn) -> str:
    """An RFC 3339 timestamp as Alertmanager and other clients write it: 0 to 6 fraction digits, any offset."""
    moment = draw(instants)
    digits = draw(st.integers(0, 6))
    fraction = f".{moment.microsecond:06d}"[: digits + 1] if digits else ""
    separator = draw(st.sampled_from(["T", "t", " "]))
    m = moment  # strftime's %Y does not pad years below 1000
    clock = f"{m.year:04d}-{m.month:02d}-{m.day:02d}{separator}{m.hour:02d}:{m.minute:02d}:{m.second:02d}"
    return clock + fraction + draw(offsets)


# Timestamps both models refuse: not dates, out-of-range parts, truncated, or offsets RFC 3339 does not allow.
BAD_TIMESTAMPS = ["", "yesterday", "2024-13-01T00:00:00Z", "2024-02-30T00:00:00Z", "2024-05-01T24:00:00Z"]
BAD_TIMESTAMPS += ["2024-05-01T10:00:60Z", "2024-05-01T10:00:00.Z", "2024-05-01T10:00:00+02", "2024-5-1T10:00:00Z"]
BAD_TIMESTAMPS += ["+2024-05-01T10:00:00Z", "2024-05-01T10:00:00+24:00", "2024-05-01T10:00:00Zjunk"]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=10),
    lambda children: st.lists(children, max_size=3) | st.dictionaries(st.text(max_size=5), children, max_size=3),
    max_leaves=6,
)


@st.composite
def alerts(draw: st.DrawFn) -> dict[str, Any]:
    alert: dict[str, Any] = {
        "status": draw(st.sampled_from(["firing", "resolved"])),
        "labels": {"alertname": draw(st.text(min_size=1, max_size=8)), **draw(label_maps)},
        "startsAt": draw(rfc3339()),
        "fingerprint": draw(st.from_regex(r"\A[0-9a-f]{1,32}\Z")),
    }
    for name, values in [
        ("annotations", label_maps),
        ("endsAt", rfc3339() | st.sampled_from(["0001-01-01T00:00:00Z"]) | st.none()),
        ("generatorURL", st.text(max_size=20)),
        ("someFutureField", json_values),
    ]:
        if draw(st.booleans()):
            alert[name] = draw(values)
    return alert


@st.composite
def payloads(draw: st.DrawFn) -> dict[str, Any]:
    payload: dict[str, Any] = {
        "version": "4",
        "status": draw(st.sampled_from(["firing", "resolved"])),
        "alerts": draw(st.lists(alerts(), min_size=1, max_size=3)),
    }
    for name, values in [
        ("receiver", st.text(max_size=8)),
        ("groupKey", st.text(max_size=8)),
        ("truncatedAlerts", st.integers(0, 2**40)),
        ("groupLabels", label_maps),
        ("commonLabels", label_maps),
        ("commonAnnotations", label_maps),
        ("externalURL", st.text(max_size=8)),
    ]:
        if draw(st.booleans()):
            payload[name] = draw(values)
    return payload


def lax_only(field: str, value: Any) -> bool:
    """Values pydantic's lax mode coerced and the decoder refuses on purpose (see decode_webhook's docstring)."""
    if field == "truncatedAlerts":
        return isinstance(value, bool | str | float)
    if field in ("startsAt", "endsAt"):
        return (isinstance(value, int | float) and not isinstance(value, bool)) or isinstance(value, str)
    return False


@st.composite
def mutated(draw: st.DrawFn) -> bytes:
    """A payload with zero to three mutations: a field dropped, replaced by any JSON value, or made subtly wrong."""
    payload = draw(payloads())
    for _ in range(draw(st.integers(0, 3))):
        alerts_now = (
            [a for a in payload.get("alerts", []) if isinstance(a, dict)]
            if isinstance(payload.get("alerts"), list)
            else []
        )
        target = payload if not alerts_now or draw(st.booleans()) else draw(st.sampled_from(alerts_now))
        fields = PAYLOAD_FIELDS if target is payload else ALERT_FIELDS
        field = draw(st.sampled_from(fields))
        how = draw(st.sampled_from(["drop", "any", "subtle"]))
        if how == "drop":
            target.pop(field, None)
        elif how == "any":
            value = draw(json_values)
            assume(not lax_only(field, value))
            target[field] = value
        elif field in ("startsAt", "endsAt"):
            target[field] = draw(st.sampled_from(BAD_TIMESTAMPS))
        elif field == "fingerprint":
            target[field] = draw(st.sampled_from(["", "A1", "0" * 33, "ab\n", "g", "1-2", "\u0661"]))
        elif field == "labels":
            target[field] = draw(st.sampled_from([{}, {"alertname": ""}, {"job": "x"}, {"alertname": 1}]))
        elif field == "alerts":
            target[field] = draw(st.sampled_from([[], {}, [None], [1]]))
        elif field in ("version", "status"):
            target[field] = draw(st.sampled_from([4, "5", "FIRING", "", None]))
        else:
            target[field] = draw(st.sampled_from([None, 1, [], {"a": 1}]))
    return json.dumps(payload).encode()


def strict_json(body: bytes) -> bool:
    """Whether the body is JSON by RFC 8259: pydantic's parser also takes NaN and Infinity, which are not."""
    try:
        json.loads(body, parse_constant=lambda name: (_ for _ in ()).throw(ValueError(name)))
    except ValueError:
        return False
    return True


def assert_same(body: bytes) -> None:
    status, expected, fields = oracle(body)
    if status == 422 and not strict_json(body):
        status = 400  # NaN or Infinity: not JSON, so not a webhook body of the wrong shape either
    try:
        decoded = decode_webhook(body)
    except InvalidPayloadError as exc:
        assert exc.status == status, (body, exc.message)
        if status == 422:
            # msgspec stops at the first error: it must be one the old model named too, or the mapping
            # that holds a wrong value (pydantic named the key inside it, msgspec names the mapping).
            field = exc.errors[0]["field"]
            assert field in fields or any(f.startswith(field + ".") for f in fields), (body, exc.message, fields)
            assert exc.message.startswith(f"payload does not match the Alertmanager webhook format: {field}: ")
        return
    assert status == 200 and expected is not None, (body, fields)
    for name in PAYLOAD_FIELDS[:-1]:
        assert getattr(decoded, name) == getattr(expected, name), name
    assert len(decoded.alerts) == len(expected.alerts)
    for mine, theirs in zip(decoded.alerts, expected.alerts, strict=True):
        for name in [*ALERT_FIELDS, "starts_at", "starts_at_epoch"]:
            assert getattr(mine, name) == getattr(theirs, name), name


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(payloads())
def test_valid_payloads_decode_to_what_pydantic_gave(payload: dict[str, Any]) -> None:
    """Every generated valid payload is accepted by both, with equal fields and the same episode key."""
    body = json.dumps(payload).encode()
    assert oracle(body)[0] == 200
    assert_same(body)


@settings(max_examples=600, deadline=None, suppress_health_check=[HealthCheck.filter_too_much, HealthCheck.too_slow])
@given(mutated())
def test_mutated_payloads_are_refused_as_pydantic_refused_them(body: bytes) -> None:
    """A payload with fields dropped or wrong is accepted or refused as before, and a 422 names a field at fault."""
    assert_same(body)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=40) | st.text(max_size=40).map(str.encode))
def test_arbitrary_bytes_get_the_same_status(body: bytes) -> None:
    """Bytes that are not JSON are a 400 for both, JSON of the wrong shape a 422."""
    assert_same(body)


# ---------------------------------------------------------------- the decoder's own contract


@pytest.fixture
def firing_body(fixtures_dir: Path) -> bytes:
    return (fixtures_dir / "alertmanager-0.25-firing-one.json").read_bytes()


def test_the_same_instant_gives_the_same_episode_key() -> None:
    """starts_at is one string for an instant however startsAt was written, so alerts stay comparable."""
    written = [
        "2026-11-23T23:14:16Z",
        "2026-11-24T01:14:16+02:00",
        "2026-11-23T23:14:16.000000Z",
        "2026-11-23T23:14:16",
    ]
    keys = {
        decode_webhook(
            json.dumps(
                {
                    "version": "4",
                    "status": "firing",
                    "alerts": [{"status": "firing", "labels": {"alertname": "A"}, "startsAt": s, "fingerprint": "ab"}],
                }
            )
        )
        .alerts[0]
        .starts_at
        for s in written
    }
    assert keys == {"2026-11-23T23:14:16Z"}


def test_encode_and_replace_round_trip(firing_body: bytes) -> None:
    """encode_webhook writes what decode_webhook reads back, and msgspec.structs.replace derives an alert."""
    payload = decode_webhook(firing_body)
    assert decode_webhook(encode_webhook(payload)) == payload
    alert = payload.alerts[0]
    other = msgspec.structs.replace(alert, startsAt=alert.startsAt + timedelta(days=1))
    assert other != alert and other.starts_at == "2026-11-24T23:14:16Z"
    assert msgspec.json.decode(encode_webhook(alert), type=WebhookAlert) == alert


def test_constructing_an_alert_checks_it_too() -> None:
    """An alert built in code is held to the same rules as a decoded one."""
    moment = datetime(2026, 1, 1, tzinfo=timezone.utc)  # noqa: UP017 - timezone.utc reads plainer beside offsets
    with pytest.raises(ValueError, match="alertname"):
        WebhookAlert(status="firing", labels={"job": "x"}, startsAt=moment, fingerprint="ab")
    with pytest.raises(ValueError, match="fingerprint"):
        WebhookAlert(status="firing", labels={"alertname": "A"}, startsAt=moment, fingerprint="AB")
    assert WebhookPayload(version="4", status="firing", alerts=[]).alerts == []  # lengths are checked on decoding


@pytest.mark.parametrize(
    ("field", "value", "path"),
    [
        ("fingerprint", None, "alerts.0.fingerprint"),
        ("fingerprint", "ab\n", "alerts.0.fingerprint"),
        ("labels", {"alertname": ""}, "alerts.0.labels"),
        ("labels", {"alertname": "A", "n": 1}, "alerts.0.labels"),
        ("startsAt", "yesterday", "alerts.0.startsAt"),
    ],
)
def test_a_422_names_the_field(field: str, value: Any, path: str) -> None:
    """The error names the failing field by its dotted path, as clients of the webhook read it."""
    alert = {"status": "firing", "labels": {"alertname": "A"}, "startsAt": "2026-01-01T00:00:00Z", "fingerprint": "ab"}
    body = json.dumps({"version": "4", "status": "firing", "alerts": [{**alert, field: value}]}).encode()
    with pytest.raises(InvalidPayloadError) as caught:
        decode_webhook(body)
    assert caught.value.status == 422
    assert caught.value.errors[0]["field"] == path
    assert caught.value.message.startswith(f"payload does not match the Alertmanager webhook format: {path}: ")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("startsAt", 1_764_000_000),  # a Unix time: pydantic read it as one
        ("startsAt", "2026-11-23"),  # a date alone: pydantic read it as midnight
        ("startsAt", "2026-11-23T23:14:16,5Z"),  # a decimal comma
        ("truncatedAlerts", "3"),  # a number in a string
        ("truncatedAlerts", True),
    ],
)
def test_forms_alertmanager_never_sends_are_refused(field: str, value: Any) -> None:
    """The decoder is strict where pydantic was lax: these are a 422 now, and Alertmanager never sends them."""
    alert = {"status": "firing", "labels": {"alertname": "A"}, "startsAt": "2026-01-01T00:00:00Z", "fingerprint": "ab"}
    payload: dict[str, Any] = {"version": "4", "status": "firing", "alerts": [alert]}
    if field in alert:
        alert[field] = value
    else:
        payload[field] = value
    assert oracle(json.dumps(payload).encode())[0] == 200
    with pytest.raises(InvalidPayloadError) as caught:
        decode_webhook(json.dumps(payload).encode())
    assert caught.value.status == 422


def test_sub_microsecond_digits_round_where_pydantic_truncated() -> None:
    """Fractions beyond microseconds round to the nearest one (pydantic cut them off); Prometheus sends milliseconds."""
    alert = {
        "status": "firing",
        "labels": {"alertname": "A"},
        "startsAt": "2026-01-01T00:00:00.1234567Z",
        "fingerprint": "a",
    }
    body = json.dumps({"version": "4", "status": "firing", "alerts": [alert]}).encode()
    assert decode_webhook(body).alerts[0].starts_at == "2026-01-01T00:00:00.123457Z"
    assert oracle(body)[1] is not None and oracle(body)[1].alerts[0].starts_at == "2026-01-01T00:00:00.123456Z"


def test_not_json_is_400() -> None:
    """A body that does not parse is a 400 with no field list."""
    for body in (b"", b"{", b'{"version": "4"} trailing', b"\xff"):
        with pytest.raises(InvalidPayloadError) as caught:
            decode_webhook(body)
        assert caught.value.status == 400 and caught.value.message.startswith("body is not valid JSON: ")
        assert caught.value.errors == []
