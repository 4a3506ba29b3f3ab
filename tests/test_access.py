"""Access control against real `healer serve` processes: the access matrix of docs/access-control.md, the web
config's errors, the deprecated shared token, the permission warning and who the audit trail names."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import bcrypt
import pytest
import yaml

from tests.servers import Server, start_healer, wait_for
from tests.test_engine_safety import alert, config, payload

AM_TOKEN = "am-token-4b1d"
LEGACY_TOKEN = "legacy-token-9c2e"
PASSWORDS = {"alice": "alice-pw-77", "bob": "bob-pw-31"}  # alice: operator; bob: no role given, so a viewer
ROLES = {"alice": "operator"}

Answer = tuple[int, bytes, dict[str, str]]


class _KeepRedirects(urllib.request.HTTPRedirectHandler):
    """A redirect is an answer to check (the console sends a browser without credentials to /login)."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


NO_REDIRECTS = urllib.request.build_opener(_KeepRedirects)


def call(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> Answer:
    """One request; the status, body and headers, also for an error status."""
    request = urllib.request.Request(
        url, data=body, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with NO_REDIRECTS.open(request, timeout=10) as response:
            return response.status, response.read(), dict(response.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def basic(user: str) -> dict[str, str]:
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{PASSWORDS[user]}".encode()).decode()}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def web_config(workdir: Path, **extra: Any) -> Path:
    """A web config file with alice (operator), bob (viewer) and Alertmanager's token; cost 4 keeps bcrypt fast."""
    token_file = workdir / "am.token"
    token_file.write_text(AM_TOKEN + "\n")
    token_file.chmod(0o600)
    users = {name: bcrypt.hashpw(pw.encode(), bcrypt.gensalt(rounds=4)).decode() for name, pw in PASSWORDS.items()}
    path = workdir / "web.yml"
    document = {
        "basic_auth_users": users,
        "healer_roles": ROLES,
        "healer_tokens": [{"name": "am", "file": "am.token", "role": "alertmanager"}],
        **extra,
    }
    path.write_text(yaml.safe_dump(document))
    path.chmod(0o600)
    return path


def closed_config(workdir: Path, **auth: Any) -> dict[str, Any]:
    """The engine-safety healer (one rule, an exec step that needs approval), with the web config's credentials."""
    settings = config(workdir, strategy={"approval": "required"})
    settings["server"] = {"web_config_file": str(web_config(workdir)), "auth": auth, "shutdown_timeout": "1s"}
    return settings


@pytest.fixture(scope="module")
def healer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    workdir = tmp_path_factory.mktemp("access")
    server = start_healer(workdir, closed_config(workdir))
    yield server
    server.stop()


# Every route of the app: (method, path, body, the role it needs or None when open, the status it gives to a
# caller whose role allows it). The bodies are harmless: unknown ids, invalid bodies, an alert no rule matches.
UNMATCHED = payload(alert("matrix", alertname="NoRuleMatches"))
ENDPOINTS: list[tuple[str, str, bytes | None, str | None, int]] = [
    ("GET", "/-/healthy", None, None, 200),
    ("GET", "/-/ready", None, None, 200),
    ("GET", "/metrics", None, "viewer", 200),
    ("GET", "/api/v1/status", None, "viewer", 200),
    ("GET", "/api/v1/actions", None, "viewer", 200),
    ("GET", "/api/v1/actions/999999", None, "viewer", 404),
    ("GET", "/api/v1/audit", None, "viewer", 200),
    ("GET", "/api/v1/pauses", None, "viewer", 200),
    ("GET", "/api/v1/goals", None, "viewer", 200),
    ("GET", "/api/v1/goals/999999", None, "viewer", 404),
    ("GET", "/api/v1/optimizations", None, "viewer", 200),
    ("GET", "/", None, "viewer", 200),
    ("GET", "/console/console.js", None, None, 200),
    ("GET", "/login", None, None, 200),
    ("GET", "/login/basic", None, "viewer", 303),
    ("POST", "/api/v1/alertmanager", UNMATCHED, "alertmanager", 200),
    ("POST", "/api/v1/actions/999999/approve", b"", "operator", 409),
    ("POST", "/api/v1/actions/999999/reject", b'{"reason": "no"}', "operator", 404),
    ("POST", "/api/v1/circuit/close", b"", "operator", 200),
    ("POST", "/api/v1/pauses", b"{}", "operator", 422),
    ("DELETE", "/api/v1/pauses/999999", None, "operator", 404),
    ("POST", "/api/v1/goals", b"{}", "operator", 422),
    ("POST", "/api/v1/goals/999999/cancel", b"", "operator", 404),
    ("POST", "/api/v1/optimizations/nothing/acknowledge", b"", "operator", 404),
    ("POST", "/login", b"", None, 400),
    ("POST", "/logout", b"", None, 303),
]
# Each column: the headers sent, the query string appended, and the roles the credential has.
CALLERS: dict[str, tuple[dict[str, str], str, frozenset[str]]] = {
    "none": ({}, "", frozenset()),
    "wrong": (bearer("not-a-token"), "", frozenset()),
    "alertmanager": (bearer(AM_TOKEN), "", frozenset({"alertmanager"})),
    "viewer": (basic("bob"), "", frozenset({"viewer"})),
    "operator": (basic("alice"), "", frozenset({"viewer", "operator"})),
    "in-query": (basic("alice"), f"?x={AM_TOKEN}", frozenset({"viewer", "operator"})),
}


# Where a caller without any credential is answered otherwise than 401: a browser opening the console is sent
# to the login form.
WITHOUT_CREDENTIAL = {("GET", "/"): 303}


def expected(needed: str | None, caller: str, ok: int, route: tuple[str, str] = ("", "")) -> int:
    """The documented status: 401 for a credential in the URL or none that is valid, 403 for a role too low."""
    _, query, roles = CALLERS[caller]
    if query:
        return 401
    if needed is None or needed in roles:
        return ok
    if caller == "none" and route in WITHOUT_CREDENTIAL:
        return WITHOUT_CREDENTIAL[route]
    return 401 if not roles else 403


@pytest.mark.parametrize("caller", list(CALLERS))
def test_access_matrix(healer: Server, caller: str) -> None:
    """Every endpoint answers each kind of caller with the status of docs/access-control.md's table."""
    headers, query, _ = CALLERS[caller]
    wrong = []
    for method, path, body, needed, ok in ENDPOINTS:
        status, answer, answer_headers = call(method, healer.url + path + query, body, headers)
        if status != expected(needed, caller, ok, (method, path)):
            wrong.append((method, path, status, expected(needed, caller, ok, (method, path)), answer[:200]))
        if status == 401:
            assert json.loads(answer)["error"], (method, path)
            if not query:  # the challenge tells a browser or a client which scheme to use
                assert answer_headers.get("WWW-Authenticate") == 'Basic realm="healer"', (method, path)
        if status == 403:
            refusal = json.loads(answer)
            assert refusal["needed_role"] == needed and refusal["role"] in CALLERS[caller][2], refusal
    assert not wrong, "\n".join(map(str, wrong))


def test_the_documented_table_is_the_tested_one() -> None:
    """docs/access-control.md holds one row per endpoint of ENDPOINTS, with the statuses the matrix asserts."""
    text = (Path(__file__).resolve().parents[1] / "docs" / "access-control.md").read_text()
    rows = {}
    for line in text.splitlines():
        cells = [cell.strip().strip("`") for cell in line.strip().strip("|").split("|")]
        if len(cells) == 2 + len(CALLERS) and cells[0] in {"GET", "POST", "DELETE"}:
            rows[(cells[0], cells[1])] = [int(cell) for cell in cells[2:]]
    for method, path, _, needed, ok in ENDPOINTS:
        generic = path.replace("999999", "{id}").replace("nothing", "{candidate}").replace("console.js", "{name}")
        documented = rows.get((method, generic))
        statuses = [expected(needed, caller, ok, (method, path)) for caller in CALLERS]
        assert documented == statuses, (method, path, documented)


def test_a_password_in_the_url_is_refused_whatever_the_parameter(healer: Server) -> None:
    """Once a password has logged in, a URL carrying it is refused under any name; a token under a known name."""
    assert call("GET", healer.url + "/api/v1/status", headers=basic("bob"))[0] == 200
    status, answer, _ = call("GET", healer.url + f"/api/v1/status?q={PASSWORDS['bob']}", headers=basic("bob"))
    assert status == 401 and "'q' carries a credential" in json.loads(answer)["error"]
    assert PASSWORDS["bob"].encode() not in answer
    status, answer, _ = call("GET", healer.url + "/api/v1/status?token=anything", headers=basic("bob"))
    assert status == 401 and "never in the URL" in json.loads(answer)["error"]
    assert PASSWORDS["bob"] not in healer.log() and AM_TOKEN not in healer.log()


def test_the_audit_trail_names_the_authenticated_operator(healer: Server) -> None:
    """An approval and a pause (created and ended) record the user who logged in, not the header it sends."""
    post = healer.url + "/api/v1/alertmanager"
    assert call("POST", post, payload(alert("needs-ok")), bearer(AM_TOKEN))[0] == 200

    def waiting() -> dict[str, Any] | None:
        _, body, _ = call("GET", healer.url + "/api/v1/actions", headers=basic("bob"))
        found = [a for a in json.loads(body)["actions"] if a["state"] == "awaiting_approval"]
        return found[0] if found else None

    action = wait_for(waiting, 20, what="a step awaiting approval")
    spoof = {**basic("alice"), "X-Healer-Approver": "mallory", "X-Healer-Operator": "mallory"}
    approve = f"{healer.url}/api/v1/actions/{action['id']}/approve"
    assert call("POST", approve, b"", {**basic("bob"), "X-Healer-Approver": "alice"})[0] == 403
    assert call("POST", approve, b"", spoof)[0] == 200
    _, body, _ = call("GET", f"{healer.url}/api/v1/actions/{action['id']}", headers=basic("bob"))
    approvals = [event for event in json.loads(body)["events"] if event["kind"] == "approved"]
    assert [event["by"] for event in approvals] == ["alice"]

    pause = {"matchers": ['alertname="Nothing"'], "reason": "maintenance", "duration": "10m"}
    status, body, _ = call("POST", healer.url + "/api/v1/pauses", json.dumps(pause).encode(), spoof)
    assert status == 201, body
    created = json.loads(body)
    assert created["pause"]["created_by"] == "alice"
    status, body, _ = call("DELETE", f"{healer.url}/api/v1/pauses/{created['id']}", None, spoof)
    assert status == 200 and json.loads(body)["pause"]["ended_by"] == "alice"
    assert "mallory" not in healer.log()


def test_legacy_token_beside_the_web_config(tmp_path: Path, servers: list[Server]) -> None:
    """bearer_token_file still posts the webhook and acts as an operator, named legacy-token; a loose credential
    file and the deprecation are warned about at start; metrics_open opens /metrics and nothing else."""
    settings = closed_config(tmp_path, metrics_open=True)
    legacy = tmp_path / "legacy.token"
    legacy.write_text(LEGACY_TOKEN)
    legacy.chmod(0o644)
    settings["server"]["auth"]["bearer_token_file"] = str(legacy)
    healer = start_healer(tmp_path, settings)
    servers.append(healer)
    url = healer.url
    assert call("GET", url + "/metrics")[0] == 200
    assert call("GET", url + "/api/v1/status")[0] == 401
    assert call("POST", url + "/api/v1/alertmanager", UNMATCHED, bearer(LEGACY_TOKEN))[0] == 200
    status, body, _ = call(
        "POST", url + "/api/v1/circuit/close", b"", {**bearer(LEGACY_TOKEN), "X-Healer-Approver": "mallory"}
    )
    assert status == 200 and json.loads(body)["by"] == "legacy-token"
    assert call("GET", url + "/api/v1/actions", headers=bearer(LEGACY_TOKEN))[0] == 200
    events = [json.loads(line) for line in healer.log().splitlines() if line.startswith("{")]
    warnings = [event["warning"] for event in events if event.get("event") == "access control"]
    assert any(f"{legacy} is readable or writable by group or others (mode 0644)" in w for w in warnings), warnings
    assert any("deprecated" in w for w in warnings), warnings
    assert LEGACY_TOKEN not in healer.log()


def test_legacy_token_alone_closes_reads(tmp_path: Path, servers: list[Server]) -> None:
    """With only HEALER_TOKEN, every read of the matrix needs it (401 without, the route's answer with it, as it
    is an operator), health and readiness stay open, and metrics_open opens /metrics and nothing else."""
    settings = config(tmp_path)
    settings["server"]["auth"] = {"metrics_open": True}
    healer = start_healer(tmp_path, settings, env={"HEALER_TOKEN": LEGACY_TOKEN})
    servers.append(healer)
    reads = [(path, ok) for method, path, _, needed, ok in ENDPOINTS if method == "GET" and needed == "viewer"]
    assert ("/api/v1/actions", 200) in reads
    wrong = []
    for path, ok in reads:
        without = call("GET", healer.url + path)[0]
        refused = 200 if path == "/metrics" else 401  # no user could log in, so / sends no one to /login
        if without != refused:
            wrong.append((path, "no credential", without, refused))
        if (status := call("GET", healer.url + path, headers=bearer(LEGACY_TOKEN))[0]) != ok:
            wrong.append((path, "legacy token", status, ok))
    assert not wrong, wrong
    assert call("GET", healer.url + "/api/v1/status", headers=bearer("wrong"))[0] == 401
    assert call("GET", healer.url + "/-/healthy")[0] == call("GET", healer.url + "/-/ready")[0] == 200
    assert call("POST", healer.url + "/api/v1/circuit/close", b"")[0] == 401
    assert call("POST", healer.url + "/api/v1/alertmanager", UNMATCHED, bearer(LEGACY_TOKEN))[0] == 200
    assert call("GET", healer.url + f"/api/v1/actions?q={LEGACY_TOKEN}", headers=bearer(LEGACY_TOKEN))[0] == 401


def check(tmp_path: Path, settings: dict[str, Any], *flags: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "healer.yml"
    path.write_text(yaml.safe_dump(settings))
    env = {key: value for key, value in os.environ.items() if key != "HEALER_TOKEN"}
    return subprocess.run(
        [sys.executable, "-m", "healer", "check-config", str(path), *flags],
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )


@pytest.mark.parametrize(
    ("change", "says"),
    [
        (lambda web: web["basic_auth_users"].update(bob="$2y$10$tooshort"), "basic_auth_users.bob: not a bcrypt hash"),
        (lambda web: web["healer_roles"].update(alice="admin"), "healer_roles.alice: Input should be 'alertmanager'"),
        (lambda web: web["healer_roles"].update(carol="viewer"), "healer_roles: carol not in basic_auth_users"),
        (lambda web: web["healer_tokens"][0].update(name="bob"), "healer_tokens[0].name: 'bob' is used twice"),
        (lambda web: web.update(rate_limit={"interval": "1s"}), "rate_limit: healer does not implement rate_limit"),
        (
            lambda web: web.update(tls_server_config={"cert_file": "missing.pem", "key_file": "web.yml"}),
            "tls_server_config.cert_file: cannot read",
        ),
        (
            lambda web: web.update(
                tls_server_config={
                    "cert_file": "web.yml",
                    "key_file": "web.yml",
                    "min_version": "TLS13",
                    "max_version": "TLS12",
                }
            ),
            "tls_server_config: min_version TLS13 is newer than max_version TLS12",
        ),
    ],
    ids=["bad-hash", "unknown-role", "role-of-no-user", "name-twice", "unsupported-key", "missing-cert", "versions"],
)
def test_web_config_errors_name_the_file_and_key(tmp_path: Path, change: Any, says: str) -> None:
    """check-config --web.config.file exits 2 with the web config's path and the key at fault, and no secret."""
    path = web_config(tmp_path)
    document = yaml.safe_load(path.read_text())
    change(document)
    path.write_text(yaml.safe_dump(document))
    result = check(tmp_path, {"exporter": {"host": False}}, "--web.config.file", str(path))
    assert result.returncode == 2, result.stderr
    assert f"{path}: {says}" in result.stderr, result.stderr
    assert AM_TOKEN not in result.stderr and "$2b$04$" not in result.stderr


def test_empty_or_unreadable_credential_files_are_errors(tmp_path: Path) -> None:
    """An empty token file, of the web config or the deprecated key, is an error naming it, not 'no auth'."""
    path = web_config(tmp_path)
    (tmp_path / "am.token").write_text("\n")
    (tmp_path / "legacy.token").write_text("  \n")
    settings = {"exporter": {"host": False}, "server": {"auth": {"bearer_token_file": str(tmp_path / "legacy.token")}}}
    result = check(tmp_path, settings, "--web.config.file", str(path))
    assert result.returncode == 2, result.stderr
    assert f"{path}: healer_tokens[0].file: {tmp_path / 'am.token'} is empty" in result.stderr
    assert f"{tmp_path / 'healer.yml'}: server.auth.bearer_token_file: {tmp_path / 'legacy.token'} is empty" in (
        result.stderr
    )
    settings["server"] = {"web_config_file": str(tmp_path / "absent.yml")}
    result = check(tmp_path, settings)
    assert result.returncode == 2 and f"{tmp_path / 'absent.yml'}: cannot read" in result.stderr


def test_serve_refuses_a_bad_web_config(tmp_path: Path) -> None:
    """`healer serve --web.config.file` with a fault exits 2 before listening, naming the key."""
    path = web_config(tmp_path)
    path.write_text(path.read_text().replace("operator", "root"))
    config_path = tmp_path / "healer.yml"
    config_path.write_text("exporter: {host: false}\n")
    result = subprocess.run(
        [sys.executable, "-m", "healer", "serve", "-c", str(config_path), "--web.config.file", str(path)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2
    assert f"{path}: healer_roles.alice:" in result.stderr
