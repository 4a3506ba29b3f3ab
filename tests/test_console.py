"""The on-call console in a real headless Chromium (Debian's `chromium`, driven by Playwright) against a
healer that a real Prometheus and Alertmanager feed: approve and reject with a click, pause from the page,
live updates without a reload, labelled controls, and a page that weighs less than 200 kB.

Screenshots go to a temporary directory; with HEALER_CONSOLE_SCREENSHOTS=docs they replace the README's
docs/console-healing.png and docs/console-approval.png.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import sys
import urllib.parse
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from healer.config import HealerConfig
from healer.console import CONSOLE_ACCESS, ConsoleAccess, add_console_routes
from tests.servers import REPO, Server, http_send, start_healer, wait_for
from tests.stack import TOKEN, HealingStack, dump, remove_fault_strategy, start_stack
from tests.test_access import AM_TOKEN, basic, bearer, call, closed_config
from tests.test_engine_safety import alert, payload
from tests.test_healing_e2e import rule
from tests.test_safety import wait_held

sync_api = pytest.importorskip("playwright.sync_api")
Browser = sync_api.Browser
Page = sync_api.Page
expect = sync_api.expect

CHROMIUM = Path("/usr/bin/chromium")
MAX_TRANSFER_BYTES = 200 * 1000
# Long enough for a fault to fire through Prometheus and Alertmanager and a step to run and be verified.
STEP_TIMEOUT_MS = 60_000
SLOW_REMOVE = "import os, sys, time; time.sleep(4); os.remove(os.path.join(sys.argv[1], sys.argv[2]))"
# Roles whose nodes a person operates, and so must have an accessible name.
CONTROL_ROLES = frozenset(
    {"button", "link", "textbox", "checkbox", "radio", "combobox", "listbox", "slider", "spinbutton", "progressbar"}
)
# A step that keeps a goal in progress until it is cancelled.
WAIT = {"type": "exec", "command": ["sleep", "60"], "timeout": "2m"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HealingStack]:
    """One stack for the module; each test uses its own fault and rule."""
    workdir = tmp_path_factory.mktemp("console")
    faults = workdir / "faults"
    remove = remove_fault_strategy(faults)
    strategies = {
        "remove-fault": remove,
        "gated-remove": {**remove, "approval": "required"},
        "slow-remove": {"type": "exec", "command": [sys.executable, "-c", SLOW_REMOVE, str(faults), "{labels.fault}"]},
        "wait": WAIT,
    }
    healing = {
        "pause_check_interval": "200ms",
        "rules": [
            rule("approved", "approved", ["gated-remove"]),
            rule("rejected", "rejected", ["gated-remove"]),
            rule("paused", "paused", ["remove-fault"], order="learned"),
            rule("healing", "healing", ["slow-remove"]),
        ],
    }
    stack = start_stack(workdir, healing, strategies)
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: scripts/dev.sh test installs Debian's chromium package")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True)
        yield browser
        browser.close()


@contextlib.contextmanager
def browser_page(browser: Browser, headers: dict[str, str]) -> Iterator[Page]:
    """A page in a fresh browser context whose every request carries `headers` (a credential)."""
    context = browser.new_context(viewport={"width": 1280, "height": 900}, extra_http_headers=headers)
    page = context.new_page()
    page.set_default_timeout(STEP_TIMEOUT_MS)
    expect.set_options(timeout=STEP_TIMEOUT_MS)
    try:
        yield page
    finally:
        context.close()


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    """A fresh browser context whose requests carry the stack's bearer token, as an operator's would."""
    with browser_page(browser, {"Authorization": f"Bearer {TOKEN}"}) as page:
        yield page


def screenshot_path(tmp_path: Path, name: str) -> Path:
    target = os.environ.get("HEALER_CONSOLE_SCREENSHOTS")
    directory = REPO / target if target else tmp_path
    return directory / name


def open_console(page: Page, url: str) -> None:
    page.goto(url + "/")
    expect(page.locator("#connection")).to_contain_text("Up to date")


def newest_action(stack: HealingStack, rule_name: str, state: str) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        actions = stack.actions(rule=rule_name)
        return actions[0] if actions and actions[0]["state"] == state else None

    try:
        return wait_for(found, STEP_TIMEOUT_MS / 1000, interval=0.2, what=f"a step of {rule_name} {state}")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{dump(stack)}") from None


@pytest.mark.slow
def test_the_console_loads_light_from_healer_alone(stack: HealingStack, page: Page) -> None:
    """The page, its script and style sheet and its first poll of the API come from healer only and weigh
    under 200 kB; it shows health, the circuit breaker and links to Prometheus and Alertmanager."""
    responses: list[Any] = []
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.on("response", lambda response: responses.append(response))
    open_console(page, stack.healer.url)
    page.wait_for_load_state("networkidle")

    origin = urllib.parse.urlsplit(stack.healer.url).netloc
    assert {urllib.parse.urlsplit(url).netloc for url in requested} == {origin}, requested
    assert all(response.ok for response in responses), [(r.url, r.status) for r in responses if not r.ok]
    transfer = 0
    for response in responses:
        sizes = response.request.sizes()
        transfer += sizes["responseBodySize"] + sizes["responseHeadersSize"]
    assert any(url.endswith(".js") or ".js?" in url for url in requested)
    assert 0 < transfer < MAX_TRANSFER_BYTES, transfer

    expect(page.get_by_role("heading", name="Health", exact=True)).to_be_visible()
    expect(page.locator("#health-body")).to_contain_text("Alerts received")
    expect(page.locator("#circuit")).to_contain_text("closed")
    expect(page.get_by_role("link", name="Prometheus alerts")).to_have_attribute(
        "href", stack.prometheus.url + "/alerts"
    )
    expect(page.get_by_role("link", name="Alertmanager")).to_have_attribute(
        "href", stack.alertmanager.url + "/#/alerts"
    )
    # No Grafana URL is configured, so no dashboard is linked.
    expect(page.get_by_role("link", name="Grafana", exact=False)).to_have_count(0)
    expect(page.locator("#ladders")).to_contain_text("Rule paused")
    expect(page.locator("#ladders")).to_contain_text("remove-fault")
    expect(page.locator("#candidates")).to_contain_text("No candidates.")
    # The Content-Security-Policy allows nothing from elsewhere.
    answer = page.request.get(stack.healer.url + "/")
    assert "default-src 'none'" in answer.headers["content-security-policy"]


def accessibility_problems(page: Page) -> list[str]:
    """Controls without an accessible name, in Chromium's own accessibility tree."""
    session = page.context.new_cdp_session(page)
    tree = session.send("Accessibility.getFullAXTree")
    problems = []
    for node in tree["nodes"]:
        if node.get("ignored"):
            continue
        role = node.get("role", {}).get("value")
        name = str(node.get("name", {}).get("value", "")).strip()
        if role in CONTROL_ROLES and not name:
            problems.append(f"a {role} without an accessible name (node {node.get('backendDOMNodeId')})")
    return problems


@pytest.mark.slow
def test_approve_with_a_click_runs_the_step_and_shows_it_healed(
    stack: HealingStack, page: Page, tmp_path: Path
) -> None:
    """A step of a strategy with `approval: required` shows under Pending approvals, with its rendered plan;
    Approve runs it, and the page shows it healed without a reload. Every control is labelled."""
    open_console(page, stack.healer.url)
    stack.inject("approved")
    action = newest_action(stack, "approved", "awaiting_approval")
    approve = page.get_by_role("button", name=f"Approve step {action['id']}: gated-remove")
    expect(approve).to_be_visible()
    item = page.locator("#approvals-list li").filter(has=approve)
    expect(item).to_contain_text('fault="approved"')
    expect(item.locator("details.plan")).to_contain_text("Rendered plan")
    expect(item.locator("details.plan pre")).to_contain_text('"approved"')
    expect(page.get_by_role("textbox", name=f"Reason to reject step {action['id']}")).to_be_visible()
    assert accessibility_problems(page) == []
    page.screenshot(path=screenshot_path(tmp_path, "console-approval.png"))

    approve.click()
    timeline = page.locator("#timeline-body")
    expect(timeline).to_contain_text(f"episode {action['episode']['id']}")
    expect(timeline.locator(".steps .badge").first).to_have_text("healed")
    expect(timeline).to_contain_text("Exit code")
    expect(page.locator("#approvals-list li")).to_have_count(0)
    done = stack.action(action["id"])
    assert (done["outcome"], done["approved"]) == ("healed", True), dump(stack)
    assert not stack.fault_present("approved")


@pytest.mark.slow
def test_reject_with_a_reason_from_the_keyboard_escalates(stack: HealingStack, page: Page) -> None:
    """The reject form is filled and sent with the keyboard alone; the episode escalates with the reason."""
    open_console(page, stack.healer.url)
    stack.inject("rejected")
    action = newest_action(stack, "rejected", "awaiting_approval")
    reason = page.get_by_role("textbox", name=f"Reason to reject step {action['id']}")
    reject = page.get_by_role("button", name=f"Reject step {action['id']}: gated-remove")
    # An empty reason is refused in the page before any request.
    reject.click()
    expect(page.locator("#approvals-list")).to_contain_text("Say why the step is rejected.")
    reason.focus()
    page.keyboard.type("a deploy is rolling out")
    page.keyboard.press("Enter")

    timeline = page.locator("#timeline-body")
    expect(timeline).to_contain_text("Escalated:")
    expect(timeline).to_contain_text("a deploy is rolling out")
    expect(timeline.locator(".steps .badge").first).to_have_text("cancelled")
    expect(page.locator("#recent-list")).to_contain_text(f"episode {action['episode']['id']}")
    done = stack.action(action["id"])
    assert (done["outcome"], done["skip_reason"], done["episode"]["state"]) == ("cancelled", "rejected", "escalated")
    assert stack.fault_present("rejected"), "a rejected step must not run"


@pytest.mark.slow
def test_a_pause_from_the_page_holds_a_matching_alert_until_it_ends(stack: HealingStack, page: Page) -> None:
    """A pause made with the form holds the matching alert's step (recorded, not run); ending it from the page
    lets the step run and heal."""
    open_console(page, stack.healer.url)
    page.get_by_label("Matchers, one per line").fill('fault="paused"')
    page.get_by_label("Reason", exact=True).fill("database migration")
    page.get_by_label("Duration").fill("10m")
    page.get_by_role("button", name="Pause healing").click()
    expect(page.locator("#pause-status")).to_contain_text("Paused")
    pauses = page.locator("#pauses-list")
    expect(pauses).to_contain_text('fault="paused"')
    expect(pauses).to_contain_text("database migration")

    assert accessibility_problems(page) == []
    stack.inject("paused")
    held = wait_held(stack, "paused", "paused")
    firing = page.locator("#firing-list li").filter(has_text='fault="paused"')
    expect(firing).to_contain_text("paused")
    assert stack.fault_present("paused"), "a paused alert must not be acted on"
    assert stack.actions(rule="paused")[0]["started_at"] is None

    page.get_by_role("button", name="End pause", exact=False).click()
    expect(pauses.locator("li")).to_have_count(0)
    recent = page.locator("#recent-list li").filter(has_text=f"episode {held['episode']['id']}")
    expect(recent.locator(".badge").first).to_have_text("healed")
    assert not stack.fault_present("paused")


@pytest.mark.slow
def test_a_running_step_shows_live_and_the_page_fits_a_phone(stack: HealingStack, page: Page, tmp_path: Path) -> None:
    """The timeline follows the firing episode as its step runs and heals, without a reload; on a phone-sized
    screen nothing is wider than the screen."""
    open_console(page, stack.healer.url)
    stack.inject("healing")
    firing = page.locator("#firing-list li").filter(has_text='fault="healing"')
    expect(firing).to_contain_text("running")
    timeline = page.locator("#timeline-body")
    expect(timeline).to_contain_text("slow-remove")
    expect(timeline.locator(".steps .badge").first).to_have_text("running")
    page.screenshot(path=screenshot_path(tmp_path, "console-healing.png"))
    expect(timeline.locator(".steps .badge").first).to_have_text("healed")
    expect(firing).to_have_count(0)

    assert_fits_a_phone(page)


def assert_fits_a_phone(page: Page) -> None:
    page.set_viewport_size({"width": 390, "height": 844})
    expect(page.get_by_role("heading", name="Episode timeline")).to_be_visible()
    overflow = page.evaluate("document.documentElement.scrollWidth - window.innerWidth")
    # The elements reaching furthest right, to name the culprit when the page is too wide.
    widest = page.evaluate(
        "[...document.querySelectorAll('body *')].map(e => [Math.round(e.getBoundingClientRect().right),"
        " `${e.tagName}#${e.id}.${e.className} ${(e.textContent || '').trim().slice(0, 60)}`])"
        ".sort((a, b) => b[0] - a[0]).slice(0, 5)"
    )
    assert overflow <= 0, f"the page is {overflow} px wider than a phone's screen; widest: {widest}"


@pytest.mark.slow
def test_a_goal_shows_its_progress_and_is_cancelled_from_the_page(stack: HealingStack, page: Page) -> None:
    """An operator's goal shows with its state and a labelled progress bar; Cancel goal ends it."""
    goal = {
        "name": "console-goal",
        "type": "performance",
        "target": {"query": "vector(1)", "below": 0},
        "plan": ["wait"],
    }
    status, body = http_send("POST", stack.healer.url + "/api/v1/goals", goal, {"Authorization": f"Bearer {TOKEN}"})
    assert status == 201, body
    goal_id = body["goal"]["id"]
    open_console(page, stack.healer.url)
    item = page.locator("#goals-list li").filter(has_text="console-goal")
    expect(item.locator(".badge")).to_have_text("in progress")
    expect(page.get_by_role("progressbar", name="Progress of goal console-goal")).to_be_visible()
    assert accessibility_problems(page) == []
    page.get_by_role("button", name=f"Cancel goal {goal_id} (console-goal)").click()
    expect(item.locator(".badge")).to_have_text("cancelled")
    expect(page.locator("#goals-summary")).to_contain_text("1 cancelled")


@pytest.fixture(scope="module")
def people_healer(stack: HealingStack, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A healer with the web config's users (alice operates, bob views) whose one rule's step needs approval,
    reading the module's Prometheus (a goal's target is measured there)."""
    workdir = tmp_path_factory.mktemp("console-audit")
    settings = closed_config(workdir)
    settings["prometheus"]["url"] = stack.prometheus.url
    settings["strategies"]["wait"] = WAIT
    healer = start_healer(workdir, settings)
    yield healer
    healer.stop()


# Markup where an operator may put any text; the page must show it as text and build no element of it.
MARKUP = "<img src=x onerror=window.injected=1><script>window.injected=2</script>"
# The Audit section's rows once alice has acted, newest first.
ALICES_ACTS = [
    "Approved a step",
    "Ended a pause",
    "Paused healing",
    "Closed the circuit",
    "Cancelled a goal",
    "Opened a goal",
]


@pytest.mark.slow
def test_the_audit_section_names_who_acted_live_for_operators_and_viewers(
    people_healer: Server, browser: Browser
) -> None:
    """alice (HTTP Basic, operator) opens a goal, cancels it with the page's button, closes the circuit through the
    API, pauses and ends the pause and approves a step from the page: each act shows in the Audit section at once,
    newest first, with her name and its subject, without a reload; markup in a goal's labels or a pause's matchers
    shows as text; bob (viewer) sees the same trail, on a phone's screen too."""
    url = people_healer.url
    goal = {
        "name": "audit-goal",
        "type": "performance",
        "labels": {"team": MARKUP},
        "target": {"query": "vector(1)", "below": 0},
        "plan": ["wait"],
    }
    status, body = http_send("POST", url + "/api/v1/goals", goal, basic("alice"))
    assert status == 201, body
    goal_id = body["goal"]["id"]
    with browser_page(browser, basic("alice")) as page:
        open_console(page, url)
        page.evaluate("window.sameDocument = true")
        acts = page.locator("#audit-body tbody td:nth-child(2)")
        first = page.locator("#audit-body tbody tr").first
        expect(acts).to_have_text(ALICES_ACTS[-1:])
        expect(first).to_contain_text(f'goal {goal_id} audit-goal {{team="{MARKUP}"}}')

        page.get_by_role("button", name=f"Cancel goal {goal_id} (audit-goal)").click()
        expect(acts).to_have_text(ALICES_ACTS[-2:])
        assert call("POST", url + "/api/v1/circuit/close", b"", basic("alice"))[0] == 200
        expect(acts).to_have_text(ALICES_ACTS[-3:])

        page.get_by_label("Matchers, one per line").fill(f'team="{MARKUP}"')
        page.get_by_label("Reason", exact=True).fill("audit drill")
        page.get_by_role("button", name="Pause healing").click()
        expect(page.locator("#pause-status")).to_contain_text("Paused")
        expect(acts).to_have_text(ALICES_ACTS[-4:])
        expect(first).to_contain_text(f'team="{MARKUP}" (audit drill)')
        page.get_by_role("button", name="End pause", exact=False).click()
        expect(acts).to_have_text(ALICES_ACTS[-5:])

        assert call("POST", url + "/api/v1/alertmanager", payload(alert("audit")), bearer(AM_TOKEN))[0] == 200
        page.get_by_role("button", name=re.compile(r"^Approve step \d+: record$")).click()
        expect(acts).to_have_text(ALICES_ACTS)
        expect(first).to_contain_text("(record) of Broken episode")
        expect(page.locator("#audit-body tbody td:nth-child(3)")).to_have_text(["alice"] * len(ALICES_ACTS))
        expect(page.locator("#audit-body img, #audit-body script")).to_have_count(0)
        assert page.evaluate("[window.injected, window.sameDocument]") == [None, True]

    with browser_page(browser, basic("bob")) as page:
        open_console(page, url)
        expect(page.get_by_role("heading", name="Audit")).to_be_visible()
        expect(page.locator("#audit-body tbody td:nth-child(2)")).to_have_text(ALICES_ACTS)
        expect(page.locator("#audit-body tbody td:nth-child(3)")).to_have_text(["alice"] * len(ALICES_ACTS))
        assert accessibility_problems(page) == []
        assert_fits_a_phone(page)


async def _fetch_console(app: web.Application, paths: list[str]) -> list[tuple[int, dict[str, str], str]]:
    """Each path's status, headers and body from `app` served on a loopback port."""
    async with TestClient(TestServer(app)) as client:
        answers = []
        for path in paths:
            response = await client.get(path)
            answers.append((response.status, dict(response.headers), await response.text()))
        return answers


def test_the_page_renders_the_access_hooks_as_text_and_no_credentials_of_urls() -> None:
    """What access control hands the page (CSRF token, identity, whether to show operator controls) is
    rendered escaped; user names and passwords in configured URLs never reach the page."""
    config = HealerConfig.model_validate(
        {
            "prometheus": {"url": "http://scraper:s3cret-prom@prometheus.example:9090"},
            "alertmanager": {"url": "https://am.example/"},
            "grafana": {"url": "https://admin:s3cret-grafana@grafana.example/"},
        }
    )
    app = web.Application()
    add_console_routes(app, config)
    app[CONSOLE_ACCESS] = ConsoleAccess(
        csrf_token=lambda request: 'tok"<en>', can_operate=lambda request: False, identity=lambda request: "<alice>"
    )
    paths = ["/", "/console/console.js", "/console/console.css", "/console/index.html"]
    # Its own thread: Playwright's synchronous API may hold this thread's event loop.
    with ThreadPoolExecutor(1) as pool:
        answers = pool.submit(asyncio.run, _fetch_console(app, paths)).result()
    (status, headers, page), script, style, template = answers
    assert status == 200
    assert "default-src 'none'" in headers["Content-Security-Policy"]
    assert '<meta name="healer-csrf-token" content="tok&quot;&lt;en&gt;">' in page
    assert "signed in as &lt;alice&gt;" in page
    assert "s3cret" not in page and "scraper" not in page and "admin" not in page
    settings = json.loads(page.split('id="console-settings">', 1)[1].split("</script>", 1)[0])
    assert settings["canOperate"] is False
    assert settings["links"]["prometheus"] == "http://prometheus.example:9090"
    assert settings["links"]["alertmanager"] == "https://am.example"
    assert [d["url"] for d in settings["links"]["dashboards"]] == [
        "https://grafana.example/d/healer-overview",
        "https://grafana.example/d/healer-host-app",
    ]
    assert script[0] == 200 and "X-CSRF-Token" in script[2]
    assert style[0] == 200 and style[2]
    assert template[0] == 404
