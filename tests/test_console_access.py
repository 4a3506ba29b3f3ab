"""The console's login, sessions and CSRF protection.

Fast tests (no browser) drive a real `healer serve` over HTTP: the login form, the session cookie's
attributes, the CSRF token asked of every state-changing request that a browser sends on its own (the
session cookie, HTTP Basic from a page), login CSRF (Origin), logout and expiry. The browser tests log in
through the form in headless Chromium against a healer that a real Prometheus and Alertmanager feed.
"""

from __future__ import annotations

import json
import re
import urllib.parse
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

from healer.auth import COOKIE_NAME, CSRF_HEADER, CredentialKind, Identity, Role, Sessions
from tests.servers import Server, start_healer
from tests.test_access import AM_TOKEN, PASSWORDS, UNMATCHED, Answer, basic, bearer, call, closed_config
from tests.test_access import healer as healer  # the module's healer: alice (operator), bob (viewer), am

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
CSRF_META = re.compile(r'<meta name="healer-csrf-token" content="([^"]*)">')


def login(healer: Server, user: str, password: str | None = None, headers: dict[str, str] | None = None) -> Answer:
    """POST the login form as a browser on healer's own page would (its Origin)."""
    body = urllib.parse.urlencode(
        {"username": user, "password": PASSWORDS[user] if password is None else password}
    ).encode()
    return call("POST", healer.url + "/login", body, {**FORM, "Origin": healer.url, **(headers or {})})


def session_cookie(answer: Answer) -> SimpleCookie:
    cookie: SimpleCookie = SimpleCookie()
    cookie.load(answer[2]["Set-Cookie"])
    return cookie


def signed_in(healer: Server, user: str) -> dict[str, str]:
    """The Cookie header of a new session of `user`."""
    answer = login(healer, user)
    assert answer[0] == 303, answer
    return {"Cookie": f"{COOKIE_NAME}={session_cookie(answer)[COOKIE_NAME].value}"}


def page_token(healer: Server, headers: dict[str, str]) -> str:
    """The CSRF token that the console's page renders for these credentials."""
    status, body, _ = call("GET", healer.url + "/", headers={**headers, "Accept": "text/html"})
    assert status == 200, body
    found = CSRF_META.search(body.decode())
    assert found is not None
    return found.group(1)


def test_a_browser_without_credentials_is_sent_to_the_login_form(healer: Server) -> None:
    """`/` without credentials goes to /login, a form that loads nothing but healer's style sheet; a wrong
    password re-renders it with 401, without a cookie, a challenge or the password."""
    status, _, headers = call("GET", healer.url + "/", headers={"Accept": "text/html"})
    assert (status, headers["Location"]) == (303, "/login")
    status, body, headers = call("GET", healer.url + "/login")
    assert status == 200 and 'action="/login"' in body.decode() and 'type="password"' in body.decode()
    assert "form-action 'self'" in headers["Content-Security-Policy"]
    assert call("GET", healer.url + "/console/console.css")[0] == 200
    status, body, headers = login(healer, "alice", "not-her-password")
    assert status == 401 and "not valid" in body.decode()
    assert "Set-Cookie" not in headers and "WWW-Authenticate" not in headers
    assert b"not-her-password" not in body
    assert login(healer, "alice", "")[0] == 400
    assert "not-her-password" not in healer.log()


def test_login_sets_a_strict_http_only_session_cookie(healer: Server) -> None:
    """The session cookie: random, HttpOnly, SameSite=Strict, Path=/, with an expiry, not Secure over plain
    HTTP; it reads the API and the page as its user; its id appears in no log line."""
    answer = login(healer, "alice")
    assert (answer[0], answer[2]["Location"]) == (303, "/")
    morsel = session_cookie(answer)[COOKIE_NAME]
    assert len(morsel.value) >= 40
    assert morsel["httponly"] and morsel["samesite"] == "Strict" and morsel["path"] == "/"
    assert int(morsel["max-age"]) > 0 and not morsel["secure"]
    cookie = {"Cookie": f"{COOKIE_NAME}={morsel.value}"}
    assert call("GET", healer.url + "/api/v1/status", headers=cookie)[0] == 200
    status, body, _ = call("GET", healer.url + "/", headers=cookie)
    assert status == 200 and "signed in as alice" in body.decode() and 'action="/logout"' in body.decode()
    assert json.loads(body.decode().split('id="console-settings">', 1)[1].split("</script>", 1)[0])["canOperate"]
    assert another_session_differs(healer, morsel.value)
    assert call("GET", healer.url + "/api/v1/status", headers={"Cookie": f"{COOKIE_NAME}=forged"})[0] == 401
    log = healer.log()
    assert morsel.value not in log and PASSWORDS["alice"] not in log
    assert any(json.loads(line).get("event") == "signed in" for line in log.splitlines() if line.startswith("{"))


def another_session_differs(healer: Server, first: str) -> bool:
    return session_cookie(login(healer, "alice"))[COOKIE_NAME].value != first


def test_a_session_changes_state_only_with_its_csrf_token(healer: Server) -> None:
    """POST and DELETE authenticated by the session cookie need the X-CSRF-Token of its page: without it, or
    with another session's, 403 naming the header; with it, the operator acts under its own name."""
    cookie = signed_in(healer, "alice")
    close = healer.url + "/api/v1/circuit/close"
    status, body, _ = call("POST", close, b"", cookie)
    refusal = json.loads(body)
    assert status == 403 and refusal["needed_header"] == CSRF_HEADER and CSRF_HEADER in refusal["error"]
    other = page_token(healer, signed_in(healer, "alice"))
    status, body, _ = call("POST", close, b"", {**cookie, CSRF_HEADER: other})
    assert status == 403 and "not this session's token" in json.loads(body)["error"]
    assert other not in body.decode()
    token = page_token(healer, cookie)
    status, body, _ = call("POST", close, b"", {**cookie, CSRF_HEADER: token})
    assert status == 200 and json.loads(body)["by"] == "alice"
    assert call("DELETE", healer.url + "/api/v1/pauses/999999", None, cookie)[0] == 403
    assert call("DELETE", healer.url + "/api/v1/pauses/999999", None, {**cookie, CSRF_HEADER: token})[0] == 404


def test_a_viewer_session_sees_no_operator_controls_and_may_not_act(healer: Server) -> None:
    """A viewer's page says it may not operate; its POST with the right CSRF token is still refused for its role."""
    cookie = signed_in(healer, "bob")
    status, body, _ = call("GET", healer.url + "/", headers=cookie)
    settings = json.loads(body.decode().split('id="console-settings">', 1)[1].split("</script>", 1)[0])
    assert status == 200 and settings["canOperate"] is False and "signed in as bob" in body.decode()
    token = page_token(healer, cookie)
    status, body, _ = call("POST", healer.url + "/api/v1/circuit/close", b"", {**cookie, CSRF_HEADER: token})
    assert status == 403 and json.loads(body)["needed_role"] == "operator"


def test_basic_auth_from_a_browser_needs_the_token_and_scripts_do_not(healer: Server) -> None:
    """HTTP Basic with an Origin or Sec-Fetch-Site (a browser) needs the page's CSRF token; curl's Basic and
    any bearer token, which no browser sends on its own, do not."""
    close = healer.url + "/api/v1/circuit/close"
    for browser in ({"Origin": healer.url}, {"Sec-Fetch-Site": "same-origin"}):
        status, body, _ = call("POST", close, b"", {**basic("alice"), **browser})
        assert status == 403 and json.loads(body)["needed_header"] == CSRF_HEADER, browser
    token = page_token(healer, basic("alice"))
    assert call("POST", close, b"", {**basic("alice"), "Origin": healer.url, CSRF_HEADER: token})[0] == 200
    assert call("POST", close, b"", basic("alice"))[0] == 200
    webhook = healer.url + "/api/v1/alertmanager"
    assert call("POST", webhook, UNMATCHED, {**bearer(AM_TOKEN), "Origin": "https://elsewhere.example"})[0] == 200


def test_login_and_logout_only_from_healers_own_pages(healer: Server) -> None:
    """Login CSRF: a login form posted from another site's page (its Origin, or Sec-Fetch-Site: cross-site) is
    refused before any password is checked; so is a logout."""
    for foreign in ({"Origin": "https://evil.example"}, {"Origin": "null"}, {"Sec-Fetch-Site": "cross-site"}):
        headers = {**FORM, **foreign}
        body = urllib.parse.urlencode({"username": "alice", "password": PASSWORDS["alice"]}).encode()
        status, answer, answer_headers = call("POST", healer.url + "/login", body, headers)
        assert status == 403 and "Set-Cookie" not in answer_headers, foreign
        assert "own pages" in json.loads(answer)["error"]
        assert call("POST", healer.url + "/logout", b"", {**signed_in(healer, "bob"), **foreign})[0] == 403


def test_logout_ends_the_session(healer: Server) -> None:
    """POST /logout clears the cookie and ends the session on the server: the old cookie no longer reads."""
    cookie = signed_in(healer, "bob")
    assert call("GET", healer.url + "/api/v1/status", headers=cookie)[0] == 200
    status, _, headers = call("POST", healer.url + "/logout", b"", {**cookie, "Origin": healer.url})
    assert (status, headers["Location"]) == (303, "/login")
    cleared = SimpleCookie()
    cleared.load(headers["Set-Cookie"])
    assert cleared[COOKIE_NAME].value == "" and cleared[COOKIE_NAME]["max-age"] == "0"
    assert call("GET", healer.url + "/api/v1/status", headers=cookie)[0] == 401
    status, _, headers = call("GET", healer.url + "/", headers=cookie)
    assert (status, headers["Location"]) == (303, "/login")


def test_sessions_expire_and_stay_bounded() -> None:
    """A session past its expiry is gone; when the table is full the oldest session makes room."""
    now = [1000.0]
    sessions = Sessions(seconds=60, clock=lambda: now[0], limit=2)
    alice = Identity("alice", frozenset({Role.OPERATOR}), CredentialKind.BASIC)
    first = sessions.open(alice)
    found = sessions.lookup(first)
    assert found is not None and found.kind is CredentialKind.SESSION and found.may(Role.OPERATOR)
    now[0] += 61
    assert sessions.lookup(first) is None
    second, third, fourth = sessions.open(alice), sessions.open(alice), sessions.open(alice)
    assert sessions.lookup(second) is None and sessions.lookup(third) and sessions.lookup(fourth)


def test_the_cookie_is_secure_when_people_reach_healer_over_https(tmp_path: Path, servers: list[Server]) -> None:
    """With an https server.external_url (TLS ended by a proxy) the cookie is Secure, and a form posted from
    that URL's origin is accepted."""
    settings: dict[str, Any] = closed_config(tmp_path)
    settings["server"]["external_url"] = "https://healer.example:8443"
    healer = start_healer(tmp_path, settings)
    servers.append(healer)
    answer = login(healer, "alice", headers={"Origin": "https://healer.example:8443"})
    assert answer[0] == 303 and session_cookie(answer)[COOKIE_NAME]["secure"]
