"""TLS the Prometheus way, against real processes and certificates the test makes with openssl (no committed key):
healer serves HTTPS from its web config's `tls_server_config`, a real Alertmanager posts to it with its
`tls_config` and a bearer token, a real Prometheus scrapes it with basic auth, and healer's own clients reach a
Prometheus and an Alertmanager that serve TLS and basic auth from their own `--web.config.file`."""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import subprocess
import sys
import urllib.error
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml

from healer.alertmanager import AlertmanagerClient
from healer.config import ConfigError, load_config
from healer.promql import PrometheusUnavailableError, PromQLClient
from tests.servers import (
    Certificates,
    Server,
    free_port,
    https_get,
    https_send,
    make_certificates,
    start_alertmanager_https,
    start_healer_https,
    start_prometheus_https,
    wait_for,
)

AM_TOKEN = "am-tls-token-5e1f"
SCRAPER = ("scraper", "scrape-pw-83")  # healer's viewer, for Prometheus's scrape
PROM_USER = ("healer", "prom-pw-19")  # Prometheus's and Alertmanager's own user, for healer's clients


def _hash(password: str) -> str:
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()


def _basic(user: tuple[str, str]) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user[0]}:{user[1]}".encode()).decode()}


def _secret(path: Path, value: str) -> Path:
    path.write_text(value + "\n")
    path.chmod(0o600)
    return path


def _metric(text: str, series: str) -> float | None:
    for line in text.splitlines():
        if line.startswith(series + " "):
            return float(line.split()[-1])
    return None


@dataclass
class Stack:
    certs: Certificates
    prometheus: Server
    alertmanager: Server
    healer: Server
    config_path: Path


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("tls")
    certs = make_certificates(workdir / "certs")
    trusted = certs.context()
    own_tls = {"cert_file": str(certs.server_cert), "key_file": str(certs.server_key)}
    own_web = {"tls_server_config": own_tls, "basic_auth_users": {PROM_USER[0]: _hash(PROM_USER[1])}}
    healer_port = free_port()
    started: list[Server] = []
    try:
        # Prometheus serves TLS and basic auth itself, and scrapes healer over HTTPS with basic auth.
        _secret(workdir / "scrape.password", SCRAPER[1])
        scrape = {
            "job_name": "healer",
            "scheme": "https",
            "tls_config": {"ca_file": str(certs.ca)},
            "basic_auth": {"username": SCRAPER[0], "password_file": str(workdir / "scrape.password")},
            "static_configs": [{"targets": [f"127.0.0.1:{healer_port}"]}],
        }
        prometheus = start_prometheus_https(workdir / "prometheus", [scrape], own_web, trusted, _basic(PROM_USER))
        started.append(prometheus)
        # Alertmanager serves TLS and basic auth too, and posts to healer over HTTPS with a bearer token.
        _secret(workdir / "am.token", AM_TOKEN)
        am_config = {
            "route": {"receiver": "healer", "group_wait": "0s", "group_interval": "1s", "repeat_interval": "1h"},
            "receivers": [
                {
                    "name": "healer",
                    "webhook_configs": [
                        {
                            "url": f"https://127.0.0.1:{healer_port}/api/v1/alertmanager",
                            "send_resolved": True,
                            "http_config": {
                                "authorization": {"credentials_file": str(workdir / "am.token")},
                                "tls_config": {"ca_file": str(certs.ca)},
                            },
                        }
                    ],
                }
            ],
        }
        alertmanager = start_alertmanager_https(workdir / "am", am_config, own_web, trusted, _basic(PROM_USER))
        started.append(alertmanager)
        # healer: HTTPS from its web config; its clients use tls_config (ca_file) and basic_auth.
        healer_web = {
            "tls_server_config": own_tls,
            "basic_auth_users": {SCRAPER[0]: _hash(SCRAPER[1])},
            "healer_tokens": [{"name": "am", "file": str(workdir / "am.token"), "role": "alertmanager"}],
        }
        (workdir / "web.yml").write_text(yaml.safe_dump(healer_web))
        (workdir / "web.yml").chmod(0o600)
        _secret(workdir / "upstream.password", PROM_USER[1])
        client = {
            "tls_config": {"ca_file": str(certs.ca)},
            "basic_auth": {"username": PROM_USER[0], "password_file": str(workdir / "upstream.password")},
            "check_interval": "200ms",
        }
        config: dict[str, Any] = {
            "server": {"web_config_file": str(workdir / "web.yml"), "shutdown_timeout": "1s"},
            "prometheus": {"url": prometheus.url, **client},
            "alertmanager": {"url": alertmanager.url, **client},
            "store": {"path": str(workdir / "healer.db")},
            "exporter": {"host": False},
            "healing": {"rules": [{"name": "r", "match": ['alertname="NothingMatches"'], "strategies": ["noop"]}]},
            "strategies": {"noop": {"type": "exec", "command": ["true"]}},
        }
        healer = start_healer_https(workdir / "healer", config, trusted, listen=f"127.0.0.1:{healer_port}")
        started.append(healer)
        yield Stack(certs, prometheus, alertmanager, healer, workdir / "healer" / "healer.yml")
    finally:
        for server in reversed(started):
            server.stop()


def _healer_metrics(stack: Stack) -> str:
    status, body = https_get(stack.healer.url + "/metrics", stack.certs.context(), _basic(SCRAPER))
    assert status == 200, body
    return body.decode()


def test_alertmanager_posts_to_healer_over_https_with_a_bearer_token(stack: Stack) -> None:
    alert = {"labels": {"alertname": "TLSDelivered", "instance": "tls-test"}, "annotations": {}}
    status, body = https_send(
        "POST", stack.alertmanager.url + "/api/v2/alerts", stack.certs.context(), [alert], _basic(PROM_USER)
    )
    assert status == 200, body
    wait_for(
        lambda: (_metric(_healer_metrics(stack), 'healer_alerts_received_total{status="firing"}') or 0) >= 1,
        30,
        what="healer receiving Alertmanager's notification over HTTPS",
    )
    metrics = _healer_metrics(stack)
    assert (_metric(metrics, 'healer_webhook_requests_total{code="2xx"}') or 0) >= 1
    assert "am-tls-token" not in stack.healer.log()


def test_prometheus_scrapes_healer_over_https_with_basic_auth(stack: Stack) -> None:
    def up() -> bool:
        query = "/api/v1/query?query=up%7Bjob%3D%22healer%22%7D"
        status, body = https_get(stack.prometheus.url + query, stack.certs.context(), _basic(PROM_USER))
        result = json.loads(body)["data"]["result"] if status == 200 else []
        return bool(result) and result[0]["value"][1] == "1"

    wait_for(up, 30, what='up{job="healer"} == 1 over HTTPS with basic auth')


def test_healers_clients_reach_a_prometheus_and_alertmanager_with_their_own_web_config(stack: Stack) -> None:
    # The upstream checks (aiohttp) of the running healer.
    def both_up() -> bool:
        metrics = _healer_metrics(stack)
        return all(
            _metric(metrics, f'healer_dependency_up{{dependency="{name}"}}') == 1
            for name in ("prometheus", "alertmanager")
        )

    wait_for(both_up, 30, what="healer's checks of Prometheus and Alertmanager over TLS with basic auth")
    config = load_config(stack.config_path)

    async def ask() -> tuple[float | None, list[dict[str, Any]]]:
        async with PromQLClient(config.prometheus) as promql, AlertmanagerClient(config.alertmanager) as am:
            return await promql.scalar("vector(42)"), await am.alerts()

    value, _ = asyncio.run(ask())
    assert value == 42.0
    # The same clients without the CA cannot verify the servers' certificate.
    bare = config.prometheus.model_copy(update={"tls_config": None})

    async def ask_bare() -> None:
        async with PromQLClient(bare) as promql:
            await promql.scalar("vector(1)")

    with pytest.raises(PrometheusUnavailableError, match=r"CERTIFICATE_VERIFY_FAILED"):
        asyncio.run(ask_bare())


def test_mutual_tls_refuses_a_client_without_a_certificate(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path / "certs")
    web = {
        "tls_server_config": {
            "cert_file": str(certs.server_cert),
            "key_file": str(certs.server_key),
            "client_auth_type": "RequireAndVerifyClientCert",
            "client_ca_file": str(certs.ca),
        }
    }
    (tmp_path / "web.yml").write_text(yaml.safe_dump(web))
    (tmp_path / "web.yml").chmod(0o600)
    config = {
        "server": {"web_config_file": str(tmp_path / "web.yml"), "shutdown_timeout": "1s"},
        "store": {"path": str(tmp_path / "healer.db")},
        "exporter": {"host": False},
    }
    healer = start_healer_https(tmp_path / "healer", config, certs.context(client=True))
    try:
        assert https_get(healer.url + "/-/healthy", certs.context(client=True))[0] == 200
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            https_get(healer.url + "/-/healthy", certs.context())
        # A certificate from another CA is refused too.
        other = make_certificates(tmp_path / "other")
        stranger = certs.context()
        stranger.load_cert_chain(other.client_cert, other.client_key)
        with pytest.raises((ssl.SSLError, urllib.error.URLError, ConnectionError)):
            https_get(healer.url + "/-/healthy", stranger)
    finally:
        healer.stop()


def test_a_key_that_does_not_match_the_certificate_is_one_line_and_exit_2(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path / "certs")
    web = tmp_path / "web.yml"
    web.write_text(yaml.safe_dump({"tls_server_config": {"cert_file": "certs/server.crt", "key_file": "certs/ca.key"}}))
    web.chmod(0o600)
    config = tmp_path / "healer.yml"
    config.write_text(yaml.safe_dump({"store": {"path": str(tmp_path / "healer.db")}, "exporter": {"host": False}}))
    base = [sys.executable, "-m", "healer"]
    checked = subprocess.run(
        [*base, "check-config", str(config), "--web.config.file", str(web)], capture_output=True, text=True, timeout=60
    )
    assert checked.returncode == 2
    assert checked.stderr.strip().splitlines() == [
        f"{web}: tls_server_config.cert_file and key_file: not a PEM certificate and its unencrypted private key"
        " (KEY_VALUES_MISMATCH)"
    ]
    served = subprocess.run(
        [*base, "serve", "-c", str(config), "--web.config.file", str(web), "--log-format", "json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert served.returncode == 2
    lines = [json.loads(line) for line in served.stderr.splitlines() if line.startswith("{")]
    assert [line["event"] for line in lines] == ["cannot start"]
    assert "KEY_VALUES_MISMATCH" in lines[0]["reason"]
    assert "PRIVATE KEY" not in served.stderr + checked.stderr
    assert certs.server_key.exists()


def _client_config_errors(tmp_path: Path, section: dict[str, Any]) -> list[str]:
    path = tmp_path / "healer.yml"
    path.write_text(yaml.safe_dump({"prometheus": {"url": "https://127.0.0.1:9090", **section}}))
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    return caught.value.errors


def test_client_tls_and_auth_settings_are_checked_and_name_the_key(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path / "certs")
    absent = tmp_path / "absent.pem"
    errors = _client_config_errors(tmp_path, {"tls_config": {"ca_file": str(absent)}})
    assert any("prometheus.tls_config.ca_file" in line and "cannot read" in line for line in errors), errors
    errors = _client_config_errors(tmp_path, {"tls_config": {"cert_file": str(certs.client_cert)}})
    assert any("prometheus.tls_config" in line and "cert_file and key_file go together" in line for line in errors)
    errors = _client_config_errors(
        tmp_path, {"tls_config": {"cert_file": str(certs.client_cert), "key_file": str(certs.server_key)}}
    )
    assert any("KEY_VALUES_MISMATCH" in line for line in errors), errors
    password = _secret(tmp_path / "password", "hunter2-secret")
    empty = tmp_path / "empty"
    empty.write_text("\n")
    errors = _client_config_errors(
        tmp_path, {"basic_auth": {"username": "u", "password_file": str(password)}, "bearer_token_file": str(password)}
    )
    assert any("basic_auth and bearer_token_file are exclusive" in line for line in errors), errors
    errors = _client_config_errors(tmp_path, {"bearer_token_file": str(empty)})
    assert any("prometheus.bearer_token_file" in line and "is empty" in line for line in errors), errors
    assert not any("hunter2" in line for line in errors)


def test_tls_settings_healer_cannot_honour_stop_it_at_start(tmp_path: Path) -> None:
    certs = make_certificates(tmp_path / "certs")
    config = tmp_path / "healer.yml"
    config.write_text(yaml.safe_dump({"store": {"path": str(tmp_path / "healer.db")}, "exporter": {"host": False}}))
    own = {"cert_file": str(certs.server_cert), "key_file": str(certs.server_key)}
    for extra, says in (
        ({"client_auth_type": "RequireAnyClientCert"}, "client_auth_type: healer cannot serve RequireAnyClientCert"),
        (
            {"client_auth_type": "RequireAndVerifyClientCert", "client_ca_file": str(certs.ca),
             "client_allowed_sans": ["client.test"]},
            "client_allowed_sans: not implemented",
        ),
        ({"curve_preferences": ["X25519"]}, "curve_preferences: not implemented"),
        ({"cipher_suites": ["TLS_NOT_A_SUITE"]}, "cipher_suites: unknown suite TLS_NOT_A_SUITE"),
    ):  # fmt: skip
        web = tmp_path / "web.yml"
        web.write_text(yaml.safe_dump({"tls_server_config": {**own, **extra}}))
        web.chmod(0o600)
        checked = subprocess.run(
            [sys.executable, "-m", "healer", "check-config", str(config), "--web.config.file", str(web)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert checked.returncode == 2, checked.stderr
        assert len(checked.stderr.strip().splitlines()) == 1 and says in checked.stderr, checked.stderr
