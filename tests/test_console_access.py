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
from collections.abc import Iterator
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any

import pytest
import yaml

from healer.auth import COOKIE_NAME, CSRF_HEADER
from tests.servers import Server, start_healer, wait_for
from tests.stack import HealingStack, dump, remove_fault_strategy, start_stack
from tests.test_access import (
    AM_TOKEN,
    PASSWORDS,
    UNMATCHED,
    Answer,
    basic,
    bearer,
    call,
    closed_config,
    web_config,
)
from tests.test_access import healer as healer  # the module's healer: alice (operator), bob (viewer), am
from tests.test_console import Browser, Page, accessibility_problems, expect
from tests.test_console import browser as browser  # headless chromium, a fixture
from tests.test_healing_e2e import rule

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
    status, body, _ = call("GET", healer.url + f"/api/v1/status?id={morsel.value}", headers=cookie)
    assert status == 401 and "'id' carries a credential" in json.loads(body)["error"]
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
    for sent_by_a_browser in ({"Origin": healer.url}, {"Sec-Fetch-Site": "same-origin"}):
        status, body, _ = call("POST", close, b"", {**basic("alice"), **sent_by_a_browser})
        assert status == 403 and json.loads(body)["needed_header"] == CSRF_HEADER, sent_by_a_browser
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


def test_the_cookie_is_secure_when_people_reach_healer_over_https(tmp_path: Path, servers: list[Server]) -> None:
    """With an https server.external_url (TLS ended by a proxy) the cookie is Secure, and a form posted from
    that URL's origin is accepted."""
    settings: dict[str, Any] = closed_config(tmp_path)
    settings["server"]["external_url"] = "https://healer.example:8443"
    healer = start_healer(tmp_path, settings)
    servers.append(healer)
    answer = login(healer, "alice", headers={"Origin": "https://healer.example:8443"})
    assert answer[0] == 303 and session_cookie(answer)[COOKIE_NAME]["secure"]


# --- In headless Chromium, against a healer that a real Prometheus and Alertmanager feed ----------------------

STEP_TIMEOUT_MS = 60_000
OPERATOR, VIEWER = "alice", "bob"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HealingStack]:
    """The stack of tests/stack.py, its healer restarted with the web config's users (alice operates, bob views);
    Alertmanager keeps posting with the deprecated shared token."""
    workdir = tmp_path_factory.mktemp("console-access")
    gated = {**remove_fault_strategy(workdir / "faults"), "approval": "required"}
    rules = [rule(name, name, ["gated-remove"]) for name in ("operator", "viewer")]
    stack = start_stack(workdir, {"rules": rules}, {"gated-remove": gated})
    try:
        config_path = workdir / "healer" / "healer.yml"
        settings = yaml.safe_load(config_path.read_text())
        settings["server"]["web_config_file"] = str(web_config(workdir))
        config_path.write_text(yaml.safe_dump(settings))
        listen = urllib.parse.urlsplit(stack.healer.url).netloc
        stack.healer.stop()
        stack.healer = start_healer(workdir / "healer", config_path, listen=listen)
    except BaseException:
        stack.stop()
        raise
    yield stack
    stack.stop()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh browser context without any credential: a person who has to log in."""
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.set_default_timeout(STEP_TIMEOUT_MS)
    expect.set_options(timeout=STEP_TIMEOUT_MS)
    yield page
    context.close()


def sign_in(page: Page, stack: HealingStack, user: str) -> None:
    """Open the console, get sent to the login form, fill it in and land on the console as `user`."""
    page.goto(stack.healer.url + "/")
    expect(page).to_have_url(stack.healer.url + "/login")
    assert accessibility_problems(page) == []
    page.get_by_label("User name").fill(user)
    page.get_by_label("Password").fill(PASSWORDS[user])
    page.get_by_role("button", name="Sign in").click()
    expect(page).to_have_url(stack.healer.url + "/")
    expect(page.locator("#connection")).to_contain_text("Up to date")
    expect(page.locator(".who")).to_have_text(f"signed in as {user}")


def awaiting_approval(stack: HealingStack, rule_name: str) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        status, body, _ = call("GET", f"{stack.healer.url}/api/v1/actions?rule={rule_name}", headers=basic(VIEWER))
        actions = json.loads(body)["actions"] if status == 200 else []
        return actions[0] if actions and actions[0]["state"] == "awaiting_approval" else None

    try:
        return wait_for(found, STEP_TIMEOUT_MS / 1000, interval=0.2, what=f"a step of {rule_name} awaiting approval")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{dump(stack)}") from None


# A POST from the page's own script, with the page's cookie and, when asked, the CSRF token of its meta tag.
PAGE_POST = """async ([url, withToken]) => {
  const headers = {};
  if (withToken) headers["X-CSRF-Token"] = document.querySelector('meta[name="healer-csrf-token"]').content;
  const response = await fetch(url, {method: "POST", headers, credentials: "same-origin"});
  return [response.status, await response.json()];
}"""


@pytest.mark.slow
def test_an_operator_logs_in_and_approves_with_a_click(stack: HealingStack, page: Page) -> None:
    """alice logs in through the form; Approve runs the step, the page shows it healed without a reload, and
    the audit trail names her."""
    sign_in(page, stack, OPERATOR)
    stack.inject("operator")
    action = awaiting_approval(stack, "operator")
    page.get_by_role("button", name=f"Approve step {action['id']}: gated-remove").click()
    timeline = page.locator("#timeline-body")
    expect(timeline).to_contain_text(f"episode {action['episode']['id']}")
    expect(timeline.locator(".steps .badge").first).to_have_text("healed")
    expect(page.locator("#approvals-list li")).to_have_count(0)
    status, body, _ = call("GET", f"{stack.healer.url}/api/v1/actions/{action['id']}", headers=basic(VIEWER))
    done = json.loads(body)
    assert status == 200 and (done["outcome"], done["approved"]) == ("healed", True), dump(stack)
    assert [event["by"] for event in done["events"] if event["kind"] == "approved"] == [OPERATOR]
    assert not stack.fault_present("operator")


@pytest.mark.slow
def test_a_viewer_sees_the_page_without_operator_controls_and_its_posts_are_refused(
    stack: HealingStack, page: Page
) -> None:
    """bob sees a pending approval but no Approve, Reject or pause controls; a POST sent anyway, with his
    cookie, is refused with 403 whether or not it carries his CSRF token; the step still waits."""
    sign_in(page, stack, VIEWER)
    stack.inject("viewer")
    action = awaiting_approval(stack, "viewer")
    item = page.locator("#approvals-list li").filter(has_text='fault="viewer"')
    expect(item).to_contain_text("gated-remove")
    expect(page.get_by_role("button", name=re.compile(r"^(Approve|Reject) step"))).to_have_count(0)
    expect(page.get_by_role("button", name="Pause healing")).to_have_count(0)
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()

    approve = f"{stack.healer.url}/api/v1/actions/{action['id']}/approve"
    assert page.request.post(approve).status == 403
    status, refusal = page.evaluate(PAGE_POST, [approve, True])
    assert status == 403 and refusal["needed_role"] == "operator", refusal
    assert awaiting_approval(stack, "viewer")["id"] == action["id"]


@pytest.mark.slow
def test_the_session_cookie_without_its_csrf_token_is_refused(stack: HealingStack, page: Page) -> None:
    """An operator's session: a POST with the cookie but not the page's token is refused with 403 naming the
    header, from the page's script and from outside it; with the token it goes through. Signing out ends it."""
    sign_in(page, stack, OPERATOR)
    close = stack.healer.url + "/api/v1/circuit/close"
    status, refusal = page.evaluate(PAGE_POST, [close, False])
    assert status == 403 and refusal["needed_header"] == CSRF_HEADER, refusal
    answer = page.request.post(close)
    assert answer.status == 403 and answer.json()["needed_header"] == CSRF_HEADER
    status, body = page.evaluate(PAGE_POST, [close, True])
    assert status == 200 and body["by"] == OPERATOR, body

    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(stack.healer.url + "/login")
    assert page.request.get(stack.healer.url + "/api/v1/status").status == 401


EVIL_PAGE = """<!doctype html><title>elsewhere</title>
<form id="close" method="post" action="{healer}/api/v1/circuit/close"><button>close</button></form>
<form id="login" method="post" action="{healer}/login">
<input name="username" value="bob"><input name="password" value="{password}"><button>login</button></form>"""


@pytest.mark.slow
def test_another_sites_forms_neither_act_nor_log_in(stack: HealingStack, page: Page) -> None:
    """A page of another site, open in the operator's signed-in browser: its form POST to healer arrives without
    the SameSite=Strict cookie (401), and its login form (login CSRF, with bob's password) is refused (403)."""
    sign_in(page, stack, OPERATOR)
    assert accessibility_problems(page) == []
    body = EVIL_PAGE.format(healer=stack.healer.url, password=PASSWORDS[VIEWER])
    for form, refused in (("close", 401), ("login", 403)):
        evil = page.context.new_page()  # one page each: the answer's navigation must not cut the next one short
        evil.route("http://elsewhere.example/**", lambda route: route.fulfill(content_type="text/html", body=body))
        evil.goto("http://elsewhere.example/")
        with evil.expect_response(lambda response: response.request.method == "POST") as posted:
            evil.locator(f"#{form} button").click()
        assert posted.value.status == refused, (form, posted.value.status)
        assert "set-cookie" not in posted.value.headers  # Playwright lower-cases header names
        evil.close()
    page.reload()
    expect(page.locator(".who")).to_have_text(f"signed in as {OPERATOR}")
