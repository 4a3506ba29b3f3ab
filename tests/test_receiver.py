"""The webhook against a real healer process: authentication, bad input, durability before 2xx."""

from __future__ import annotations

import json
import signal
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.servers import Server, healing_status, read_stopped_store, start_healer

TOKEN = "s3cret-token"


def post(
    url: str, body: bytes, headers: dict[str, str] | None = None, content_type: str = "application/json"
) -> tuple[int, dict[str, Any]]:
    """POST raw bytes and return the status and the decoded JSON body."""
    request = urllib.request.Request(
        url, data=body, method="POST", headers={"Content-Type": content_type, **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, {"raw": raw.decode(errors="replace")}


AUTH = {"Authorization": f"Bearer {TOKEN}"}


def receiver_config(workdir: Path) -> dict[str, Any]:
    """A healer with a token and no healing rules, so alerts are stored and recorded as unmatched."""
    (workdir / "token").write_text(TOKEN + "\n")
    return {
        "server": {"auth": {"bearer_token_file": str(workdir / "token")}, "max_request_bytes": 65536},
        "prometheus": {"url": "http://127.0.0.1:1"},
        "alertmanager": {"url": "http://127.0.0.1:1"},
        "store": {"path": str(workdir / "healer.db")},
        "exporter": {"host": False},
    }


@pytest.fixture(scope="module")
def healer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """One healer of receiver_config shared by the module's tests."""
    workdir = tmp_path_factory.mktemp("receiver")
    server = start_healer(workdir, receiver_config(workdir))
    yield server
    server.stop(signal.SIGTERM)


def webhook(healer: Server) -> str:
    return healer.url + "/api/v1/alertmanager"


def alerts_received(healer: Server) -> int:
    """Alerts healer has accepted into its inbox, ever (GET /api/v1/status)."""
    return int(healing_status(healer)["alerts_received"])


def test_accepted_alert_is_on_disk_before_2xx(tmp_path: Path, servers: list[Server], fixtures_dir: Path) -> None:
    """A valid payload gets 200 only after each of its alerts is in the store's inbox.

    healer is killed with SIGKILL as soon as the 200 arrives, so what the store then holds was
    written before the answer, not by a graceful shutdown.
    """
    config = receiver_config(tmp_path)
    healer = start_healer(tmp_path, config)
    servers.append(healer)
    body = (fixtures_dir / "alertmanager-0.25-firing-group.json").read_bytes()
    assert alerts_received(healer) == 0
    status, answer = post(webhook(healer), body, AUTH)
    healer.stop(signal.SIGKILL)
    assert status == 200 and answer["accepted"] == 3
    counts = read_stopped_store(config, lambda storage: storage.healing.counts())
    assert counts.alerts_received == 3


@pytest.mark.parametrize(
    ("headers", "url_suffix", "status", "says"),
    [
        ({}, "", 401, "missing Authorization"),
        ({"Authorization": "Bearer wrong"}, "", 401, "not valid"),
        ({"Authorization": f"Basic {TOKEN}"}, "", 401, "Bearer scheme"),
        ({}, f"?token={TOKEN}", 401, "never in the URL"),
        (AUTH, f"?access_token={TOKEN}", 401, "never in the URL"),
    ],
    ids=["no-token", "wrong-token", "wrong-scheme", "query-token", "query-token-with-header"],
)
def test_authentication_refusals(
    healer: Server, fixtures_dir: Path, headers: dict[str, str], url_suffix: str, status: int, says: str
) -> None:
    """Requests without the right bearer token in the header are refused, and nothing is stored."""
    body = (fixtures_dir / "alertmanager-0.25-firing-one.json").read_bytes()
    before = alerts_received(healer)
    code, answer = post(webhook(healer) + url_suffix, body, headers)
    assert code == status and says in answer["error"]
    assert alerts_received(healer) == before


def test_non_json_content_type_is_415(healer: Server) -> None:
    """A body that is not declared as JSON gets 415 naming the content type."""
    code, answer = post(webhook(healer), b"alertname=x", AUTH, content_type="application/x-www-form-urlencoded")
    assert code == 415 and "application/json" in answer["error"]


def test_invalid_json_is_400(healer: Server) -> None:
    """A body that does not parse as JSON gets 400 saying so."""
    code, answer = post(webhook(healer), b'{"version": "4",', AUTH)
    assert code == 400 and "not valid JSON" in answer["error"]


def test_missing_field_is_422_naming_it(healer: Server, fixtures_dir: Path) -> None:
    """A payload missing an alert's fingerprint gets 422 naming alerts.0.fingerprint."""
    payload = json.loads((fixtures_dir / "alertmanager-0.25-firing-one.json").read_text())
    del payload["alerts"][0]["fingerprint"]
    code, answer = post(webhook(healer), json.dumps(payload).encode(), AUTH)
    assert code == 422
    assert answer["errors"][0]["field"] == "alerts.0.fingerprint"
    assert "alerts.0.fingerprint" in answer["error"]


def test_wrong_version_is_422(healer: Server, fixtures_dir: Path) -> None:
    """A payload of another webhook version is refused with the version field named."""
    payload = json.loads((fixtures_dir / "alertmanager-0.25-firing-one.json").read_text())
    payload["version"] = "3"
    code, answer = post(webhook(healer), json.dumps(payload).encode(), AUTH)
    assert code == 422 and answer["errors"][0]["field"] == "version"


def test_oversized_body_is_413(healer: Server, fixtures_dir: Path) -> None:
    """A body above server.max_request_bytes gets 413 naming the limit."""
    payload = json.loads((fixtures_dir / "alertmanager-0.25-firing-one.json").read_text())
    payload["alerts"][0]["annotations"]["description"] = "x" * 70000
    code, answer = post(webhook(healer), json.dumps(payload).encode(), AUTH)
    assert code == 413 and "65536" in answer["error"]


def test_deeply_nested_json_is_400(healer: Server) -> None:
    """JSON nested beyond the parser's depth is refused with 400, not a crash."""
    code, _ = post(webhook(healer), b"[" * 50000 + b"]" * 50000, AUTH)
    assert code in (400, 413)


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)
ALMOST_PAYLOADS = st.fixed_dictionaries(
    {
        "version": st.sampled_from(["4", "3", 4]),
        "status": st.sampled_from(["firing", "resolved", "weird"]),
        "alerts": st.lists(
            st.fixed_dictionaries(
                {
                    "status": st.sampled_from(["firing", "resolved"]),
                    "labels": st.dictionaries(st.text(max_size=10), st.text(max_size=30) | st.integers(), max_size=4),
                    "startsAt": st.sampled_from(["2026-11-23T23:14:16Z", "yesterday", ""]),
                    "fingerprint": st.text(alphabet="0123456789abcdefxyz", max_size=20),
                }
            ),
            max_size=3,
        ),
    }
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(document=JSON_VALUES | ALMOST_PAYLOADS)
def test_arbitrary_json_never_5xx(healer: Server, document: Any) -> None:
    """Whatever JSON arrives, healer answers 2xx or 4xx and keeps serving."""
    code, _ = post(webhook(healer), json.dumps(document).encode(), AUTH)
    assert code < 500


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=st.binary(max_size=2000))
def test_arbitrary_bytes_never_5xx(healer: Server, body: bytes) -> None:
    """Whatever bytes arrive, healer answers 4xx and keeps serving."""
    code, _ = post(webhook(healer), body, AUTH)
    assert 400 <= code < 500


def test_still_healthy_after_hostile_input(healer: Server) -> None:
    """After the fuzzing above the process is alive and ready."""
    assert healer.process.poll() is None
    with urllib.request.urlopen(healer.url + "/-/ready", timeout=5) as response:
        assert response.status == 200
