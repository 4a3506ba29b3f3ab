"""In JSON mode every log line is one JSON object, and a client that hangs up mid-request is one short debug line."""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import pytest

from healer.logs import configure_logging
from tests.servers import Server, http_get, start_healer, wait_for
from tests.test_engine_safety import AUTH, config

HANG_UPS = 30


def hang_up_mid_body(address: str) -> None:
    """Send a webhook request promising a body, send part of it, and close the connection."""
    host, port = address.rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=5) as sock:
        sock.sendall(
            b"POST /api/v1/alertmanager HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: {AUTH['Authorization']}\r\n".encode()
            + b"Content-Length: 100000\r\n\r\n"
            + b'{"version": "4", "alerts": ['
        )
        # Reset, not a clean close: what a client killed or a dropped connection looks like.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")


def test_every_line_is_json_when_clients_hang_up(tmp_path: Path, servers: list[Server]) -> None:
    """Clients that reset their connection mid-body leave no multi-line traceback in the JSON log."""
    healer = start_healer(tmp_path, config(tmp_path))
    servers.append(healer)
    address = healer.url.removeprefix("http://")
    for _ in range(HANG_UPS):
        hang_up_mid_body(address)
    wait_for(lambda: http_get(healer.url + "/-/healthy")[0] == 200, 10)
    lines = [line for line in healer.log().splitlines() if line.strip()]
    assert lines
    for line in lines:
        entry = json.loads(line)  # fails on a bare traceback line
        assert isinstance(entry, dict) and "event" in entry, line
    assert not any("Traceback" in line for line in lines)


def test_a_library_traceback_becomes_a_field(capsys: pytest.CaptureFixture[str]) -> None:
    """A record with an exception from a library logger is one JSON line with the traceback in a field."""
    configure_logging("json", "info")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("aiohttp.server").exception("Error handling request")
    try:
        raise ConnectionResetError("peer reset")
    except ConnectionResetError:
        logging.getLogger("aiohttp.server").exception("Error handling request")
    [line] = capsys.readouterr().err.splitlines()
    entry = json.loads(line)
    assert entry["logger"] == "aiohttp.server" and "RuntimeError: boom" in entry["exception"]
