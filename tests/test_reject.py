"""Rejecting a step that waits for approval, in a real healer process: recorded with who and why, escalated at once."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from tests.servers import Server, http_json, start_healer, wait_for
from tests.test_engine_safety import AUTH, actions, alert, config, episodes, metric, payload, steps_log
from tests.test_receiver import post


def awaiting(healer: Server, identifier: str) -> dict[str, Any]:
    """Send a firing alert and wait for its step to wait for approval."""
    post(healer.url + "/api/v1/alertmanager", payload(alert(identifier)), AUTH)
    found: list[dict[str, Any]] = wait_for(
        lambda: [a for a in actions(healer) if a["state"] == "awaiting_approval"], 20, what="awaiting approval"
    )
    return found[0]


def reject(healer: Server, action_id: int, body: bytes, headers: dict[str, str], **kw: str) -> tuple[int, Any]:
    return post(f"{healer.url}/api/v1/actions/{action_id}/reject", body, headers, **kw)


def test_reject_cancels_the_step_and_escalates_at_once(tmp_path: Path, servers: list[Server]) -> None:
    """A rejected step ends cancelled/rejected with who and why in the audit trail; the episode escalates."""
    healer = start_healer(tmp_path, config(tmp_path, strategy={"approval": "required"}))
    servers.append(healer)
    action_id = awaiting(healer, "refused")["id"]
    alice = {**AUTH, "X-Healer-Approver": "alice"}
    body = b'{"reason": "a deploy is rolling out"}'

    assert reject(healer, action_id, body, {})[0] == 401
    status, answer = reject(healer, action_id, body, alice, content_type="text/plain")
    assert status == 415 and "Content-Type" in answer["error"]
    for bad, field in [
        (b"{}", "reason"),
        (b'{"reason": ""}', "reason"),
        (b'{"reason": "   "}', "reason"),
        (b'{"reason": 5}', "reason"),
        (b'{"reason": "%s"}' % (b"x" * 1001), "reason"),
        (b'{"reason": "ok", "by": "mallory"}', "by"),
    ]:
        status, answer = reject(healer, action_id, bad, alice)
        assert status == 422, (bad, answer)
        assert [error["field"] for error in answer["errors"]] == [field], (bad, answer)
    assert reject(healer, action_id, b"{not json", alice)[0] == 400
    assert reject(healer, 999999, body, alice)[0] == 404
    assert episodes(healer) == {"open": 1}, "a refused request changed nothing"

    status, answer = reject(healer, action_id, body, alice)
    assert status == 200, answer
    # The shared token cannot tell people apart: the name the caller gives is kept as its claim, not as who.
    assert answer == {"rejected": action_id, "by": "legacy-token (says alice)", "reason": "a deploy is rolling out"}

    step = http_json(f"{healer.url}/api/v1/actions/{action_id}", headers=healer.headers)
    assert (step["state"], step["outcome"], step["skip_reason"]) == ("done", "cancelled", "rejected")
    assert step["episode"]["state"] == "escalated"
    kinds = {event["kind"]: event for event in step["events"]}
    assert kinds["rejected"]["by"] == "legacy-token (says alice)"
    assert kinds["rejected"]["reason"] == "a deploy is rolling out"
    assert kinds["escalated"]["reason"] == "rejected by legacy-token (says alice): a deploy is rolling out"
    assert metric(healer, "healer_skipped_total", reason="rejected") == 1.0
    assert metric(healer, "healer_actions_total", strategy="record", outcome="cancelled") == 1.0

    # Once ended, the step neither waits for approval nor can be rejected again.
    assert reject(healer, action_id, body, alice)[0] == 409
    assert post(f"{healer.url}/api/v1/actions/{action_id}/approve", b"", AUTH)[0] == 409
    time.sleep(0.5)
    assert steps_log(tmp_path) == []
    assert metric(healer, "healer_skipped_total", reason="rejected") == 1.0


def test_an_approved_step_cannot_be_rejected(tmp_path: Path, servers: list[Server]) -> None:
    """After approval the step no longer waits: a reject answers 409 and the step runs."""
    healer = start_healer(tmp_path, config(tmp_path, strategy={"approval": "required"}))
    servers.append(healer)
    action_id = awaiting(healer, "approved")["id"]
    assert post(f"{healer.url}/api/v1/actions/{action_id}/approve", b"", AUTH)[0] == 200
    assert reject(healer, action_id, b'{"reason": "too late"}', AUTH)[0] == 409
    wait_for(lambda: "end approved" in steps_log(tmp_path), 20, what="approved step ran")
    assert metric(healer, "healer_skipped_total", reason="rejected") == 0.0
