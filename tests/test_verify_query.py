"""Verification by query (`verify.query`, `verify.healthy_when`, `verify.settle`): config, client and whole stack."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from healer.config import ConfigError, PrometheusConfig, load_config, parse_config
from healer.config.model import HealthyWhen
from healer.promql import PromQLClient, render_query
from tests.servers import QuietHandler, http_json, prom_query, serve_in_thread, wait_for
from tests.stack import HealingStack, dump, start_stack
from tests.test_clients import closed_url

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
# Requests per second each service of the error target serves, and errors per second while broken.
RATE = 10.0
# "More than 1% of requests failed over the last minute": once broken for a moment, it fires for about a minute.
ERROR_RATIO_RULES = {
    "groups": [
        {
            "name": "verify-query-tests",
            "rules": [
                {
                    "alert": "ErrorRatioHigh",
                    "expr": "rate(demo_errors_total[1m]) / rate(demo_requests_total[1m]) > 0.01",
                    "labels": {"severity": "warning"},
                }
            ],
        }
    ]
}
# The error ratio over the last 3 seconds: it shows the fix after three scrapes, not sixty.
SHORT_RATIO = (
    "rate(demo_errors_total{service={labels.service}, instance={labels.instance}}[3s])"
    " / rate(demo_requests_total{service={labels.service}, instance={labels.instance}}[3s])"
)


class ErrorTarget:
    """A scrape target on a thread with per-service request and error counters; `POST /fix/NAME` stops the errors."""

    # Counters follow the clock, not scrapes: requests grow by RATE a second from the start, errors
    # by RATE a second while the service is broken.

    def __init__(self, services: list[str]) -> None:
        self.started = time.monotonic()
        self.errors = dict.fromkeys(services, 0.0)
        self.broken_since: dict[str, float] = {}
        self.fixes: list[str] = []
        self.lock = threading.Lock()
        target = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                self.answer(200, target.exposition().encode())

            def do_POST(self) -> None:
                service = self.path.removeprefix("/fix/")
                if service not in target.errors:
                    self.answer(404, b"no such service\n")
                    return
                target.fix(service)
                self.answer(200, b"fixed\n")

        self.server, self.address = serve_in_thread(Handler)

    def _errors_now(self, service: str, now: float) -> float:
        since = self.broken_since.get(service)
        return self.errors[service] + (RATE * (now - since) if since is not None else 0.0)

    def exposition(self) -> str:
        now = time.monotonic()
        lines = ["# TYPE demo_requests_total counter", "# TYPE demo_errors_total counter"]
        with self.lock:
            for service in self.errors:
                lines.append(f'demo_requests_total{{service="{service}"}} {RATE * (now - self.started)}')
                lines.append(f'demo_errors_total{{service="{service}"}} {self._errors_now(service, now)}')
        return "\n".join(lines) + "\n"

    def break_(self, service: str) -> None:
        with self.lock:
            self.broken_since.setdefault(service, time.monotonic())

    def fix(self, service: str) -> None:
        with self.lock:
            self.errors[service] = self._errors_now(service, time.monotonic())
            self.broken_since.pop(service, None)
            self.fixes.append(service)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def fix_strategy(target: ErrorTarget, service: str) -> dict[str, Any]:
    return {"type": "http", "method": "POST", "url": f"http://{target.address}/fix/{service}", "timeout": "5s"}


def error_rule(service: str, verify: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": service,
        "match": ['alertname="ErrorRatioHigh"', f'service="{service}"'],
        "strategies": [f"fix-{service}"],
        "max_attempts": 1,
        "verify": {"interval": "200ms", **verify},
    }


@pytest.fixture(scope="module")
def target() -> Iterator[ErrorTarget]:
    """The error target, with one service per end-to-end test."""
    errors = ErrorTarget(["byquery", "byalert"])
    yield errors
    errors.close()


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory, target: ErrorTarget) -> Iterator[HealingStack]:
    """The healing stack, its Prometheus also scraping the error target and evaluating ErrorRatioHigh."""
    workdir = tmp_path_factory.mktemp("verify-query")
    healing = {
        "rules": [
            error_rule(
                "byquery", {"within": "20s", "settle": "1s", "query": SHORT_RATIO, "healthy_when": {"below": 0.01}}
            ),
            error_rule("byalert", {"within": "6s"}),
        ]
    }
    strategies = {f"fix-{name}": fix_strategy(target, name) for name in ("byquery", "byalert")}
    stack = start_stack(workdir, healing, strategies)
    try:
        rules = workdir / "rules.yml"
        loaded = yaml.safe_load(rules.read_text())
        loaded["groups"] += ERROR_RATIO_RULES["groups"]
        rules.write_text(yaml.safe_dump(loaded))
        config_path = workdir / "prometheus" / "prometheus.yml"
        config = yaml.safe_load(config_path.read_text())
        config["scrape_configs"].append({"job_name": "errors", "static_configs": [{"targets": [target.address]}]})
        config_path.write_text(yaml.safe_dump(config))
        http_json(f"{stack.prometheus.url}/-/reload", method="POST")
        # A reloaded target is applied on Prometheus's 5 s discovery tick; the rate needs two scrapes more.
        wait_for(
            lambda: prom_query(stack.prometheus, 'rate(demo_requests_total{job="errors"}[1m]) > 0'),
            30,
            what="the error target scraped",
        )
    except BaseException:
        stack.stop()
        raise
    yield stack
    stack.stop()


def episode_of(stack: HealingStack, rule_name: str, timeout: float = 40) -> dict[str, Any]:
    """Wait for the only step of a rule's episode to end, and return it."""

    def ended() -> dict[str, Any] | None:
        actions = stack.actions(rule=rule_name)
        return actions[0] if actions and actions[0]["episode"]["state"] != "open" else None

    try:
        return wait_for(ended, timeout, interval=0.2, what=f"episode of {rule_name} to end")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{dump(stack)}") from None


def firing(stack: HealingStack, service: str) -> bool:
    """Whether Prometheus reports ErrorRatioHigh of the service firing now."""
    selector = f'ALERTS{{alertname="ErrorRatioHigh", service="{service}", alertstate="firing"}}'
    return bool(prom_query(stack.prometheus, selector))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("service", "outcome", "state"),
    [
        pytest.param("byquery", "healed", "healed", id="with-query"),
        pytest.param("byalert", "not_healed", "escalated", id="without-query"),
    ],
)
def test_windowed_alert_after_a_working_fix(
    stack: HealingStack, target: ErrorTarget, service: str, outcome: str, state: str
) -> None:
    """A working fix outlived by a 1-minute alert: healed through verify.query in seconds, not_healed without it."""
    target.break_(service)
    action = episode_of(stack, service)
    assert service in target.fixes, "the fix did not run"
    assert (action["outcome"], action["episode"]["state"]) == (outcome, state), dump(stack)
    # With the query: settle (1 s), then the 3 s window emptied of errors, well under the 20 s allowed.
    assert action["finished_at"] - action["started_at"] < 12, action
    assert firing(stack, service), "the alert stopped firing: the test shows nothing about windowed alerts"


@pytest.fixture
async def prom(stack: HealingStack) -> AsyncIterator[PromQLClient]:
    """A client of the stack's Prometheus."""
    async with PromQLClient(PrometheusConfig(url=stack.prometheus.url, timeout="2s")) as client:
        yield client


TWO_SERIES = 'label_replace(vector(0), "s", "a", "", "") or label_replace(vector(1), "s", "b", "", "")'


@pytest.mark.slow
@pytest.mark.parametrize(
    ("query", "healthy_when", "outcome"),
    [
        pytest.param("vector(1)", None, "healed", id="result"),
        pytest.param("vector(1) == 2", None, "not_healed", id="empty"),
        pytest.param("vector(0.5)", {"above": 0.1}, "healed", id="above"),
        pytest.param("vector(0.5)", {"below": 0.05}, "not_healed", id="not-below"),
        pytest.param("vector(0.05)", {"below": 0.05}, "healed", id="at-bound"),
        pytest.param("vector(1) == 2", {"below": 0.05}, "not_healed", id="empty-with-bound"),
        pytest.param(TWO_SERIES, {"below": 0.5}, "not_healed", id="every-series"),
        pytest.param(TWO_SERIES, {"below": 1}, "healed", id="every-series-holds"),
        pytest.param("vector(0) / 0", {"below": 1}, "not_healed", id="nan"),
    ],
)
async def test_query_outcomes(
    prom: PromQLClient, query: str, healthy_when: dict[str, float] | None, outcome: str
) -> None:
    """A result means healed; with healthy_when, every value must be on its side of the bound."""
    bound = HealthyWhen.model_validate(healthy_when) if healthy_when else None
    assert await prom.verify_query(query, within=0.5, interval=0.1, healthy_when=bound) == outcome


@pytest.mark.slow
async def test_not_healed_only_at_the_deadline(prom: PromQLClient) -> None:
    """An unhealthy query is asked until `within` has passed."""
    start = time.monotonic()
    assert await prom.verify_query("vector(1) == 2", within=0.6, interval=0.1) == "not_healed"
    assert time.monotonic() - start >= 0.6


@pytest.mark.slow
async def test_labels_enter_the_query_as_strings(prom: PromQLClient) -> None:
    """`{labels.NAME}` is filled with the alert's label as a quoted string: a hostile value cannot change the query."""
    query = "count(up{job={labels.job}}) > 0"
    assert await prom.verify_query(render_query(query, {"job": "errors"}), 0.5, 0.1) == "healed"
    hostile = {"job": 'x"}) > 0 or vector(1) or count(up{job="'}
    assert await prom.verify_query(render_query(query, hostile), 0.5, 0.1) == "not_healed"


@pytest.mark.slow
async def test_settle_comes_before_the_first_check(prom: PromQLClient) -> None:
    """With settle, even a query that is healthy at once is first asked after it; so is the alert."""
    start = time.monotonic()
    assert await prom.verify_query("vector(1)", within=5, interval=0.1, settle=0.5) == "healed"
    assert time.monotonic() - start >= 0.5
    start = time.monotonic()
    labels = {"alertname": "NeverDefined"}
    assert await prom.verify_resolved(labels, within=5, interval=0.1, settle=0.5) == "healed"
    assert time.monotonic() - start >= 0.5


@pytest.mark.slow
async def test_resolved_notification_checks_at_once(prom: PromQLClient) -> None:
    """A resolved notification cuts settle and interval short; the query, not the notification, decides."""
    resolved = asyncio.Event()
    task = asyncio.create_task(prom.verify_query("vector(1)", within=60, interval=30, settle=30, resolved=resolved))
    await asyncio.sleep(0.2)
    assert not task.done()
    resolved.set()
    assert await asyncio.wait_for(task, 5) == "healed"
    already = asyncio.Event()
    already.set()
    start = time.monotonic()
    assert await prom.verify_query("vector(1)", within=60, interval=30, settle=30, resolved=already) == "healed"
    assert time.monotonic() - start < 5
    assert await prom.verify_query("vector(1) == 2", within=0.4, interval=0.1, resolved=already) == "not_healed"


# The burn-rate query the runbook gives (and the example config's commented rule).
BURN_RATE = "probe:healer_probe_errors:ratio_rate5m{probe={labels.probe}, instance={labels.instance}} / (1 - 0.99)"


@pytest.mark.slow
async def test_shipped_verify_queries_are_valid_promql(prom: PromQLClient) -> None:
    """The verify queries of the example configs and the runbook, filled with an alert's labels, are accepted."""
    queries = [BURN_RATE]
    for example in (EXAMPLES / "healer.yml", EXAMPLES / "docker" / "healer.yml"):
        queries += [rule.verify.query for rule in load_config(example).healing.rules if rule.verify.query]
    assert len(queries) >= 3
    for query in queries:
        await prom.query(render_query(query, {"probe": "web", "instance": "127.0.0.1:9877"}))


@pytest.mark.slow
async def test_rejected_query_is_unverified(prom: PromQLClient) -> None:
    """A query Prometheus rejects proves nothing either way: unverified, not not_healed."""
    assert await prom.verify_query("rate(up[1m]", within=0.3, interval=0.1) == "unverified"


async def test_unreachable_prometheus_is_unverified() -> None:
    """Prometheus that cannot be asked on any poll gives unverified."""
    async with PromQLClient(PrometheusConfig(url=closed_url(), timeout="1s")) as client:
        assert await client.verify_query("vector(1)", within=0.3, interval=0.1) == "unverified"


def rule_config(verify: dict[str, Any]) -> dict[str, Any]:
    return {
        "strategies": {"x": {"type": "exec", "command": ["true"]}},
        "healing": {"rules": [{"name": "a", "match": ['alertname="A"'], "strategies": ["x"], "verify": verify}]},
    }


def test_verify_keys_load() -> None:
    """query, healthy_when and settle load; settle defaults to 0 and the others to none."""
    verify = parse_config(rule_config({})).healing.rules[0].verify
    assert (verify.query, verify.healthy_when, verify.settle) == (None, None, 0.0)
    verify = (
        parse_config(rule_config({"query": "up{job={labels.job}}", "healthy_when": {"below": 0.05}, "settle": "30s"}))
        .healing.rules[0]
        .verify
    )
    assert verify.query == "up{job={labels.job}}" and verify.settle == 30.0
    assert verify.healthy_when is not None and verify.healthy_when.holds(0.05) and not verify.healthy_when.holds(0.06)


@pytest.mark.parametrize(
    ("verify", "error"),
    [
        pytest.param(
            {"healthy_when": {"below": 1}}, r"verify\.healthy_when: .*set query too", id="bound-without-query"
        ),
        pytest.param(
            {"query": "up", "healthy_when": {"below": 1, "above": 2}},
            r"verify\.healthy_when: give exactly one of below or above",
            id="two-bounds",
        ),
        pytest.param(
            {"query": "up", "healthy_when": {}}, r"verify\.healthy_when: give exactly one of below", id="no-bound"
        ),
        pytest.param(
            {"query": "up", "healthy_when": {"equal": 1}},
            r"verify\.healthy_when\.equal: Extra inputs",
            id="unknown-bound",
        ),
        pytest.param(
            {"query": "up", "healthy_when": {"below": float("nan")}}, r"verify\.healthy_when\.below", id="nan-bound"
        ),
        pytest.param(
            {"query": "x{a={annotations.b}}"}, r"verify\.query: .*only '\{labels\.NAME\}'", id="other-placeholder"
        ),
        pytest.param({"query": "  "}, r"verify\.query: must be a PromQL expression", id="empty-query"),
        pytest.param({"settle": "2m"}, r"verify\.settle: must be shorter than within", id="settle-not-within"),
        pytest.param({"settle": 5}, r"verify\.settle: invalid duration", id="bare-settle"),
        pytest.param({"querry": "up"}, r"verify\.querry: Extra inputs", id="unknown-key"),
    ],
)
def test_verify_errors_name_the_key(verify: dict[str, Any], error: str) -> None:
    """Each fault in the verify keys is reported at its key path."""
    with pytest.raises(ConfigError, match=r"healing\.rules\[0\]\." + error):
        parse_config(rule_config(verify))


def test_check_config_names_the_verify_key(tmp_path: Path) -> None:
    """`healer check-config` names a verify fault by file and key path."""
    path = tmp_path / "healer.yml"
    path.write_text(yaml.safe_dump(rule_config({"healthy_when": {"above": 1}})))
    result = subprocess.run(
        [sys.executable, "-m", "healer", "check-config", str(path)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 1
    assert f"{path}: healing.rules[0].verify.healthy_when" in result.stderr, result.stderr
