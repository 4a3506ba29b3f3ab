"""`healer serve`: start-up refusals, endpoints, and graceful shutdown on signals; `healer status` against a
healer that serves HTTPS with reads closed."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import bcrypt
import pytest
import yaml

from tests.servers import Server, http_get, make_certificates, start_healer, start_healer_https


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


VIEWER_TOKEN = "status-viewer-token-61a"
AM_TOKEN = "status-am-token-0d3"
CAROL_PASSWORD = "carol-pw-58"


def _secret(path: Path, value: str) -> Path:
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


def _healer_status(*options: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "healer", "status", *options], capture_output=True, text=True, timeout=30
    )


def test_status_authenticates_and_trusts_a_ca(tmp_path: Path, servers: list[Server]) -> None:
    """`healer status` reads an HTTPS healer whose reads are closed with a token file or a user and password file
    and the CA given; without a credential, with a wrong one or with Alertmanager's it says it was refused (401,
    403) and exits 2; no secret is printed."""
    certs = make_certificates(tmp_path / "certs")
    web = {
        "tls_server_config": {"cert_file": str(certs.server_cert), "key_file": str(certs.server_key)},
        "basic_auth_users": {"carol": bcrypt.hashpw(CAROL_PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()},
        "healer_tokens": [
            {"name": "dashboards", "file": str(_secret(tmp_path / "viewer.token", VIEWER_TOKEN)), "role": "viewer"},
            {"name": "am", "file": str(_secret(tmp_path / "am.token", AM_TOKEN)), "role": "alertmanager"},
        ],
    }
    _secret(tmp_path / "web.yml", yaml.safe_dump(web))
    settings = {
        "server": {"web_config_file": str(tmp_path / "web.yml"), "shutdown_timeout": "1s"},
        "prometheus": {"url": "http://127.0.0.1:1"},
        "store": {"path": str(tmp_path / "healer.db")},
        "exporter": {"host": False},
    }
    healer = start_healer_https(tmp_path / "healer", settings, certs.context())
    servers.append(healer)
    url = ("--url", healer.url, "--ca-file", str(certs.ca))
    password = _secret(tmp_path / "carol.password", CAROL_PASSWORD)

    for credential in (
        ("--bearer-token-file", str(tmp_path / "viewer.token")),
        ("--basic-auth-user", "carol", "--basic-auth-password-file", str(password)),
    ):
        result = _healer_status(*url, *credential)
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("Health") and "Healing" in result.stdout, result.stdout
    as_json = _healer_status(*url, "--bearer-token-file", str(tmp_path / "viewer.token"), "--json")
    assert as_json.returncode == 0 and "healing" in json.loads(as_json.stdout)

    refused = _healer_status(*url)
    assert refused.returncode == 2 and refused.stdout == ""
    assert f"healer at {healer.url} refused the status request: 401 Unauthorized" in refused.stderr
    assert "--bearer-token-file" in refused.stderr, refused.stderr
    _secret(tmp_path / "wrong.token", "not-the-token")
    wrong = _healer_status(*url, "--bearer-token-file", str(tmp_path / "wrong.token"))
    assert wrong.returncode == 2 and "401 Unauthorized" in wrong.stderr and "is not valid" in wrong.stderr
    alertmanager = _healer_status(*url, "--bearer-token-file", str(tmp_path / "am.token"))
    assert alertmanager.returncode == 2 and "refused the status request: 403 Forbidden" in alertmanager.stderr
    assert "am has the role alertmanager" in alertmanager.stderr, alertmanager.stderr

    untrusted = _healer_status("--url", healer.url, "--bearer-token-file", str(tmp_path / "viewer.token"))
    assert untrusted.returncode == 2 and "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr, untrusted.stderr
    for output in (refused, wrong, alertmanager, untrusted):
        assert VIEWER_TOKEN not in output.stderr and AM_TOKEN not in output.stderr


@pytest.mark.parametrize(
    ("options", "says"),
    [
        (("--basic-auth-user", "carol"), "--basic-auth-user and --basic-auth-password-file go together"),
        (("--bearer-token-file", "{tmp}/empty.token"), "--bearer-token-file: {tmp}/empty.token is empty"),
        (("--ca-file", "{tmp}/absent.crt"), "--ca-file: cannot read {tmp}/absent.crt"),
        (("--cert-file", "{tmp}/empty.token"), "cert_file and key_file go together"),
    ],
    ids=["user-without-password", "empty-token", "absent-ca", "cert-without-key"],
)
def test_status_options_that_cannot_be_used_name_the_option(
    tmp_path: Path, options: tuple[str, ...], says: str
) -> None:
    """`healer status` with a credential or TLS option it cannot use exits 2 naming the option, before any request."""
    (tmp_path / "empty.token").write_text("\n")
    result = _healer_status("--url", "http://127.0.0.1:1", *(option.format(tmp=tmp_path) for option in options))
    assert result.returncode == 2
    assert says.format(tmp=tmp_path) in result.stderr, result.stderr
    assert "cannot read the status" not in result.stderr
