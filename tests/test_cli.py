"""`healer serve`: start-up refusals, endpoints, and graceful shutdown on signals."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import Server, http_get, start_healer


def test_refuses_public_listen_without_token(tmp_path: Path) -> None:
    """A non-loopback listen address with no token is refused with exit 2 and a reason."""
    config = tmp_path / "healer.yml"
    config.write_text("exporter: {host: false}\n")
    result = subprocess.run(
        [sys.executable, "-m", "healer", "serve", "-c", str(config), "--listen", "0.0.0.0:0", "--log-format", "json"],
        capture_output=True,
        text=True,
        timeout=30,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    event = json.loads(result.stderr.strip().splitlines()[-1])
    assert event["event"] == "cannot start" and "without a bearer token" in event["reason"]


def test_serve_reports_config_errors(tmp_path: Path) -> None:
    """`healer serve` with an invalid config exits 1 and names the key and the file."""
    config = tmp_path / "healer.yml"
    config.write_text("server: {listen: nowhere}\n")
    result = subprocess.run(
        [sys.executable, "-m", "healer", "serve", "-c", str(config)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 1
    assert f"{config}: server.listen:" in result.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_graceful_shutdown(tmp_path: Path, servers: list[Server], signum: int) -> None:
    """healer answers its health endpoints, then exits 0 on SIGTERM or SIGINT after logging its stop."""
    healer = start_healer(tmp_path, {"exporter": {"host": False}})
    servers.append(healer)
    assert http_get(healer.url + "/-/healthy")[0] == 200
    assert http_get(healer.url + "/-/ready")[0] == 200
    status, body = http_get(healer.url + "/metrics")
    assert status == 200 and b"healer_build_info" in body
    assert healer.stop(signum) == 0
    events = [json.loads(line)["event"] for line in healer.log().splitlines() if line.startswith("{")]
    assert events[-2:] == ["shutting down", "stopped"]


def test_check_config_warns_of_strategies_that_can_never_run(tmp_path: Path) -> None:
    """`healer check-config` warns, by key path, of a rule whose max_attempts is shorter than its ladder; exit 0."""
    config = tmp_path / "healer.yml"
    config.write_text(
        """
strategies:
  clear-cache: {type: exec, command: [/bin/true]}
  scale-web: {type: exec, command: [/bin/true]}
  restart-web: {type: exec, command: [/bin/true]}
healing:
  rules:
    - {name: enough, match: ['alertname="A"'], strategies: [clear-cache, scale-web], max_attempts: 2}
    - {name: repeats, match: ['alertname="B"'], strategies: [clear-cache, clear-cache], max_attempts: 5}
    - name: web
      match: ['alertname="C"']
      strategies: [clear-cache, scale-web, restart-web]
      max_attempts: 2
    - {name: again, match: ['alertname="D"'], strategies: [clear-cache, scale-web, clear-cache], max_attempts: 2}
    - name: learned
      match: ['alertname="E"']
      strategies: [clear-cache, scale-web, restart-web]
      max_attempts: 1
      order: learned
"""
    )
    result = subprocess.run(
        [sys.executable, "-m", "healer", "check-config", str(config)], capture_output=True, text=True, timeout=30
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"{config}: OK"
    assert result.stderr.splitlines() == [
        f"{config}: warning: healing.rules[2] (name web): max_attempts 2 is smaller than its 3 strategies;"
        " restart-web can never run",
        f"{config}: warning: healing.rules[3] (name again): max_attempts 2 is smaller than its 3 strategies;"
        " its rung 3 is never reached",
        f"{config}: warning: healing.rules[4] (name learned): max_attempts 1 is smaller than its 3 strategies;"
        " with order: learned at most 1 of them run in an episode",
    ]
