"""Healing steps posted as Grafana annotations.

No Grafana can be installed on these machines, so a small recorder stands in for Grafana's
`POST /api/annotations`; the request it records is what Grafana's HTTP API documents.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.servers import Server, free_port, http_get, start_healer, wait_for
from tests.test_engine_safety import AUTH, alert, config, payload
from tests.test_receiver import post


@pytest.fixture
def recorder() -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """An HTTP endpoint that records annotation requests and answers as Grafana does."""
    received: list[dict[str, Any]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            received.append({"path": self.path, "auth": self.headers.get("Authorization"), "body": body})
            answer = b'{"message":"Annotation added","id":1}'
            self.send_response(200)
            self.send_header("Content-Length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer)

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", received
    server.shutdown()


def test_finished_step_is_annotated(
    tmp_path: Path, servers: list[Server], recorder: tuple[str, list[dict[str, Any]]]
) -> None:
    """A finished step is posted once to /api/annotations with the token, its tags and its time span."""
    url, received = recorder
    (tmp_path / "grafana-token").write_text("glsa_test\n")
    settings = config(tmp_path, step_seconds=0.2, rule={"max_attempts": 1})
    settings["grafana"] = {"url": url, "api_token_file": str(tmp_path / "grafana-token")}
    healer = start_healer(tmp_path, settings)
    servers.append(healer)
    post(healer.url + "/api/v1/alertmanager", payload(alert("annotated")), AUTH)
    [annotation] = wait_for(lambda: list(received), 30, what="annotation posted")
    assert annotation["path"] == "/api/annotations" and annotation["auth"] == "Bearer glsa_test"
    body = annotation["body"]
    assert set(body["tags"]) >= {"healer", "strategy:record", "outcome:unverified", "alertname:Broken"}
    assert body["timeEnd"] - body["time"] >= 200
    assert "record" in body["text"] and "unverified" in body["text"]
    _, metrics = http_get(healer.url + "/metrics", headers=healer.headers)
    assert b'healer_grafana_annotations_total{result="ok"} 1.0' in metrics


def test_unreachable_grafana_does_not_stop_healing(tmp_path: Path, servers: list[Server]) -> None:
    """When Grafana cannot be reached the step still finishes and the failed post is counted."""
    settings = config(tmp_path, rule={"max_attempts": 1})
    settings["grafana"] = {"url": f"http://127.0.0.1:{free_port()}"}
    healer = start_healer(tmp_path, settings)
    servers.append(healer)
    post(healer.url + "/api/v1/alertmanager", payload(alert("no-grafana")), AUTH)

    def counted() -> bool:
        _, metrics = http_get(healer.url + "/metrics", headers=healer.headers)
        return b'healer_grafana_annotations_total{result="error"} 1.0' in metrics

    wait_for(counted, 30, what="failed annotation counted")
    assert "end no-grafana" in (tmp_path / "steps.log").read_text()
