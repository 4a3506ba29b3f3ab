"""PromQLClient and AlertmanagerClient against real Prometheus and Alertmanager binaries."""

from __future__ import annotations

import asyncio
import signal
import socket
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import yaml

from healer.alertmanager import (
    RUNBOOK_URL,
    AlertmanagerClient,
    AlertmanagerUnavailableError,
    healing_failed_alert,
)
from healer.config import AlertmanagerConfig, PrometheusConfig
from healer.promql import (
    PrometheusUnavailableError,
    PromQLClient,
    PromQLError,
    Sample,
    label_selector,
)
from tests.servers import (
    QuietHandler,
    Server,
    free_port,
    http_json,
    prom_query,
    serve_in_thread,
    start_alertmanager,
    start_prometheus,
    wait_for,
)

WEIRD = 'a "quoted" back\\slash\nnew line\ttab ü 🚑'
EXTERNAL = {"cluster": "test-cluster"}
RULES = {
    "groups": [
        {
            "name": "healer-client-tests",
            "rules": [
                {
                    "alert": "TestFault",
                    "expr": "test_fault > 0",
                    "labels": {"severity": "warning", "weird": WEIRD},
                    "annotations": {"summary": "test fault is on"},
                }
            ],
        }
    ]
}


class FaultTarget:
    """A scrape target on a thread that serves `test_fault <value>`, switchable by the test."""

    def __init__(self) -> None:
        self.value = 0
        target = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                self.answer(200, f"# TYPE test_fault gauge\ntest_fault {target.value}\n".encode())

        self.server, self.address = serve_in_thread(Handler)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def fault_target() -> Iterator[FaultTarget]:
    """One switchable scrape target for the whole module."""
    target = FaultTarget()
    yield target
    target.close()


@pytest.fixture(scope="module")
def prometheus(tmp_path_factory: pytest.TempPathFactory, fault_target: FaultTarget) -> Iterator[Server]:
    """A Prometheus scraping the fault target and evaluating the TestFault rule every 100 ms."""
    workdir = tmp_path_factory.mktemp("prometheus")
    (workdir / "rules.yml").write_text(yaml.safe_dump(RULES, allow_unicode=True))
    scrape = [{"job_name": "fault", "static_configs": [{"targets": [fault_target.address]}]}]
    server = start_prometheus(workdir, scrape, rule_files=[str(workdir / "rules.yml")], interval="100ms")
    try:
        # External labels reach Alertmanager but not ALERTS; the client must cope with them.
        config = yaml.safe_load((workdir / "prometheus.yml").read_text())
        config["global"]["external_labels"] = EXTERNAL
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        http_json(f"{server.url}/-/reload", method="POST")
        # Prometheus 2.42 applies discovered targets on a fixed 5 s tick: the first scrape
        # comes about 5 s after start, whatever the scrape interval. Pay for it once, here.
        wait_for(lambda: prom_query(server, 'up{job="fault"} == 1'), timeout=30, what="first scrape")
        yield server
    finally:
        server.stop(signal.SIGTERM)


@pytest.fixture
def fault(fault_target: FaultTarget) -> Iterator[FaultTarget]:
    """The fault target, switched off again after the test."""
    yield fault_target
    fault_target.value = 0


@pytest.fixture
async def prom(prometheus: Server) -> Any:
    """A PromQLClient for the module's Prometheus."""
    client = PromQLClient(PrometheusConfig(url=prometheus.url, timeout="2s"))
    yield client
    client.close()


@pytest.fixture(scope="module")
def alertmanager(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """An Alertmanager whose only route goes to a receiver that notifies nobody."""
    config = {
        "route": {"receiver": "null", "group_wait": "0s", "group_interval": "1s"},
        "receivers": [{"name": "null"}],
    }
    server = start_alertmanager(tmp_path_factory.mktemp("alertmanager"), config)
    yield server
    server.stop(signal.SIGTERM)


@pytest.fixture
async def am(alertmanager: Server) -> Any:
    """An AlertmanagerClient for the module's Alertmanager."""
    async with AlertmanagerClient(AlertmanagerConfig(url=alertmanager.url, timeout="2s")) as client:
        yield client


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 10.0) -> Any:
    """Await `check()` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = await check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s; last result {result!r}")
        await asyncio.sleep(0.05)


def closed_url() -> str:
    """A loopback URL on which nothing listens."""
    return f"http://127.0.0.1:{free_port()}"


ALERT = {
    "alertname": "TestFault",
    "job": "fault",
    "severity": "warning",
    "weird": WEIRD,
    **EXTERNAL,
}


# --- PromQLClient ---------------------------------------------------------------------------


def test_label_selector_escapes_and_validates() -> None:
    """Label values are escaped as PromQL string literals and bad label names are refused."""
    assert label_selector("ALERTS", {"a": 'x"y\\z\nw'}) == 'ALERTS{a="x\\"y\\\\z\\nw"}'
    with pytest.raises(ValueError, match="label name"):
        label_selector("ALERTS", {"bad-name": "x"})
    with pytest.raises(ValueError, match="label name"):
        label_selector("ALERTS", {'a="" or vector(1) or x': "x"})


@pytest.mark.slow
async def test_query_scalar_and_errors(prom: PromQLClient) -> None:
    """Queries return samples, scalar() takes one value, and a bad query raises PromQLError."""
    samples = await prom.query('label_replace(vector(2.5), "who", "me", "", "")')
    assert samples == [Sample({"who": "me"}, 2.5)]
    assert await prom.scalar("vector(3)") == 3.0
    assert await prom.scalar("7") == 7.0  # a scalar result, not a vector
    assert await prom.scalar('up{job="no-such-job"}') is None
    with pytest.raises(PromQLError, match="2 series"):
        await prom.scalar('vector(1) or label_replace(vector(2), "x", "y", "", "")')
    with pytest.raises(PromQLError, match="parse error"):
        await prom.query("sum(")
    with pytest.raises(PromQLError, match="range vector"):
        await prom.query("vector(1)[1s:100ms]")


@pytest.mark.slow
async def test_alert_firing_follows_the_fault(prom: PromQLClient, fault: FaultTarget) -> None:
    """alert_firing is True while the fault is on, exact on every label, and False once cleared."""
    await raise_fault(prom, fault)
    assert await prom.external_labels() == EXTERNAL
    without_external = {k: v for k, v in ALERT.items() if k not in EXTERNAL}
    assert await prom.alert_firing(without_external)
    assert await prom.alert_firing({"alertname": "TestFault"})
    assert not await prom.alert_firing({**ALERT, "weird": WEIRD + " "})
    assert not await prom.alert_firing({**ALERT, "cluster": "other-cluster"})
    assert not await prom.alert_firing({**ALERT, "extra": "label"})
    assert not await prom.alert_firing({**ALERT, "alertname": "OtherAlert"})
    fault.value = 0
    await eventually(lambda: _not(prom.alert_firing(ALERT)))


async def _not(awaitable: Awaitable[bool]) -> bool:
    return not await awaitable


async def raise_fault(prom: PromQLClient, fault: FaultTarget) -> None:
    """Switch the fault on and wait until TestFault fires because of it.

    An earlier test's alert can still show as firing for a rule evaluation after that test
    switched the fault off, and then resolve: waiting for it to resolve first makes sure the
    firing seen next is this fault's, with no resolution still to come.
    """
    await eventually(lambda: _not(prom.alert_firing(ALERT)))
    fault.value = 1
    await eventually(lambda: prom.alert_firing(ALERT))


@pytest.mark.slow
async def test_alert_firing_escapes_hostile_values(prom: PromQLClient, fault: FaultTarget) -> None:
    """Values with quotes, backslashes, newlines and PromQL syntax are matched literally."""
    await raise_fault(prom, fault)
    for value in [
        '"',
        "\\",
        "\n",
        '\\"',
        'x"} or vector(1) or ALERTS{a="',
        "\r\t\x00\x1b",
        "{{ $x }}",
        "ü🚑",
    ]:
        assert not await prom.alert_firing({"alertname": "TestFault", "weird": value}), value
        assert not await prom.alert_firing({"alertname": value}), value
    with pytest.raises(ValueError, match="label name"):
        await prom.alert_firing({"0abc": "x"})


@pytest.mark.slow
async def test_verify_resolved_healed_when_fault_clears_midway(prom: PromQLClient, fault: FaultTarget) -> None:
    """verify_resolved returns healed only after the fault has been cleared part-way through."""
    await raise_fault(prom, fault)
    asyncio.get_running_loop().call_later(0.5, setattr, fault, "value", 0)
    assert await prom.verify_resolved(ALERT, within=10.0, interval=0.1) == "healed"
    assert fault.value == 0, "healed while the fault was still on"


@pytest.mark.slow
async def test_verify_resolved_not_healed(prom: PromQLClient, fault: FaultTarget) -> None:
    """verify_resolved returns not_healed when the alert still fires at the deadline."""
    await raise_fault(prom, fault)
    start = time.monotonic()
    assert await prom.verify_resolved(ALERT, within=0.6, interval=0.1) == "not_healed"
    assert time.monotonic() - start >= 0.6, "gave up before its window ended"


@pytest.mark.slow
async def test_verify_resolved_event_cuts_the_wait(prom: PromQLClient, fault: FaultTarget) -> None:
    """A set `resolved` event triggers an immediate confirming query instead of the long wait."""
    await raise_fault(prom, fault)
    resolved = asyncio.Event()
    task = asyncio.create_task(prom.verify_resolved(ALERT, within=60.0, interval=30.0, resolved=resolved))
    await asyncio.sleep(0.2)
    fault.value = 0
    await eventually(lambda: _not(prom.alert_firing(ALERT)))
    resolved.set()
    # Without the event the next check would come after the 30 s interval; the deadline is far below that.
    assert await asyncio.wait_for(task, 5.0) == "healed"


@pytest.mark.slow
async def test_verify_resolved_event_does_not_override_prometheus(prom: PromQLClient, fault: FaultTarget) -> None:
    """An already-set `resolved` event does not make a still-firing alert count as healed."""
    await raise_fault(prom, fault)
    resolved = asyncio.Event()
    resolved.set()
    assert await prom.verify_resolved(ALERT, within=0.4, interval=0.1, resolved=resolved) == "not_healed"


async def test_prometheus_unreachable() -> None:
    """A closed port raises PrometheusUnavailableError and makes verification unverified."""
    client = PromQLClient(PrometheusConfig(url=closed_url(), timeout="1s"))
    try:
        with pytest.raises(PrometheusUnavailableError, match="cannot reach Prometheus"):
            await client.query("up")
        with pytest.raises(PrometheusUnavailableError):
            await client.alert_firing(ALERT)
        assert await client.verify_resolved(ALERT, within=0.3, interval=0.1) == "unverified"
    finally:
        client.close()


async def test_prometheus_timeout_applies() -> None:
    """A server that never answers makes a query fail after about the configured timeout."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(8)  # accepted by the kernel, never answered
        url = f"http://127.0.0.1:{listener.getsockname()[1]}"
        client = PromQLClient(PrometheusConfig(url=url, timeout="300ms"))
        # The error names the timeout: the configured limit ended the wait, not the outer deadline.
        with pytest.raises(PrometheusUnavailableError, match="Timeout"):
            await asyncio.wait_for(client.query("up"), 30)
        client.close()


def scripted_client(answers: list[bool | Exception]) -> PromQLClient:
    """A client whose alert_firing gives these answers in turn (an exception is raised), then "down"."""

    class Scripted(PromQLClient):
        async def alert_firing(self, labels: Any) -> bool:
            answer = answers.pop(0) if answers else PrometheusUnavailableError("down")
            if isinstance(answer, Exception):
                raise answer
            return answer

        async def rules_evaluated(self) -> bool:
            return True

    return Scripted(PrometheusConfig(url=closed_url()))


async def test_verify_resolved_needs_an_answer_at_the_deadline() -> None:
    """A firing answer followed by Prometheus going away gives unverified, not not_healed, on an injected clock."""
    now = [0.0]

    async def fake_sleep(seconds: float) -> None:
        now[0] += seconds

    client = scripted_client([True, PrometheusUnavailableError("down"), PrometheusUnavailableError("down")])
    outcome = await client.verify_resolved(ALERT, 10.0, 1.0, clock=lambda: now[0], sleep=fake_sleep)
    assert outcome == "unverified"
    assert now[0] == 10.0
    client.close()


async def test_verify_resolved_waits_for_prometheus_to_come_back() -> None:
    """Past the deadline, polling goes on within the grace while Prometheus cannot answer; its first answer decides."""
    down = [PrometheusUnavailableError("down")] * 14
    for answers, grace, expected in (
        ([True, *down, False], 30.0, "healed"),
        ([True, *down, True], 30.0, "not_healed"),
        ([True], 5.0, "unverified"),
    ):
        now = [0.0]

        async def fake_sleep(seconds: float, now: list[float] = now) -> None:
            now[0] += seconds

        client = scripted_client(list(answers))
        outcome = await client.verify_resolved(
            ALERT, 10.0, 1.0, grace=grace, clock=lambda now=now: now[0], sleep=fake_sleep
        )
        assert outcome == expected
        # The sixteenth poll, five seconds past the deadline, answered, or the grace ran out there.
        assert now[0] == 15.0
        client.close()


# --- AlertmanagerClient ---------------------------------------------------------------------


ORIGINAL = {
    "alertname": "ProcessHighMemory",
    "instance": "web-1:9100",
    "process": "web",
    "severity": "warning",
}


def test_healing_failed_alert_shape() -> None:
    """The HealingFailed alert keeps the original labels and carries the escalation annotations."""
    alert = healing_failed_alert(
        ORIGINAL,
        {"summary": "web uses too much memory"},
        rule="web-memory",
        episode=42,
        strategies_tried=["clear-cache", "restart-web"],
        audit_url="http://127.0.0.1:9877/api/v1/actions/42",
        reason="the alert still fires after 2m",
    )
    assert alert["labels"] == {
        "alertname": "HealingFailed",
        "healed_alertname": "ProcessHighMemory",
        "healer_rule": "web-memory",
        "healer_episode": "42",
        "instance": "web-1:9100",
        "process": "web",
        "severity": "critical",
    }
    annotations = alert["annotations"]
    assert annotations["summary"] == "healer could not heal ProcessHighMemory on web-1:9100"
    assert "clear-cache, restart-web" in annotations["description"]
    assert "the alert still fires after 2m" in annotations["description"]
    assert annotations["strategies_tried"] == "clear-cache,restart-web"
    assert annotations["audit_url"] == "http://127.0.0.1:9877/api/v1/actions/42"
    assert annotations["runbook_url"] == RUNBOOK_URL
    assert annotations["healed_summary"] == "web uses too much memory"
    assert alert["generatorURL"] == annotations["audit_url"]
    assert "endsAt" not in alert


@pytest.mark.slow
async def test_post_healing_failed_alert(am: AlertmanagerClient) -> None:
    """A posted HealingFailed alert is listed with the original labels and the annotations."""
    test_id = uuid.uuid4().hex
    labels = {**ORIGINAL, "test_id": test_id}
    alert = AlertmanagerClient.healing_failed_alert(
        labels,
        {},
        rule="web-memory",
        strategies_tried=["clear-cache"],
        audit_url="http://127.0.0.1:9877/api/v1/actions/7",
        reason="not healed",
    )
    await am.post_alerts([alert])
    listed = await eventually(lambda: am.alerts(filter={"alertname": "HealingFailed", "test_id": test_id}))
    assert len(listed) == 1
    assert listed[0]["labels"] == {**alert["labels"]}
    assert listed[0]["labels"]["instance"] == "web-1:9100"
    assert listed[0]["annotations"] == alert["annotations"]
    assert listed[0]["status"]["state"] == "active"
    assert await am.alerts(filter={"alertname": "HealingFailed", "test_id": "other"}) == []


@pytest.mark.slow
async def test_silence_suppresses_then_expires(am: AlertmanagerClient) -> None:
    """A silence on the alert's labels suppresses it while active, not once expired."""
    labels = {**ORIGINAL, "test_id": uuid.uuid4().hex, "odd": 'quote " back \\ nl \n end'}
    await am.post_alerts([{"labels": labels, "annotations": {"summary": "x"}}])
    await eventually(lambda: am.alerts(filter=labels))
    silence_id = await am.create_silence(labels, 60.0, "healer is working on it")
    active = await am.silences()
    mine = [s for s in active if s["id"] == silence_id]
    assert len(mine) == 1
    assert mine[0]["createdBy"] == "healer" and mine[0]["comment"] == "healer is working on it"
    assert {m["name"]: m["value"] for m in mine[0]["matchers"]} == labels

    async def state() -> str:
        return str((await am.alerts(filter=labels))[0]["status"]["state"])

    await eventually(lambda: _equals(state(), "suppressed"))
    assert (await am.alerts(filter=labels))[0]["status"]["silencedBy"] == [silence_id]

    await am.expire_silence(silence_id)
    assert silence_id not in {s["id"] for s in await am.silences()}
    expired = [s for s in await am.silences(active_only=False) if s["id"] == silence_id]
    assert expired[0]["status"]["state"] == "expired"
    await eventually(lambda: _equals(state(), "active"))
    await am.expire_silence(silence_id)  # already expired: fine
    await am.expire_silence(str(uuid.uuid4()))  # unknown: fine


async def _equals(awaitable: Awaitable[Any], expected: Any) -> bool:
    return bool(await awaitable == expected)


@pytest.mark.slow
async def test_alertmanager_rejects_bad_alert(am: AlertmanagerClient) -> None:
    """A non-2xx answer raises AlertmanagerUnavailableError carrying the status and the reason."""
    with pytest.raises(AlertmanagerUnavailableError) as info:
        await am.post_alerts([{"labels": {"bad-label name": "x"}}])
    assert info.value.status == 400
    assert "400" in str(info.value)


async def test_alertmanager_unreachable() -> None:
    """A closed port raises AlertmanagerUnavailableError for every call."""
    async with AlertmanagerClient(AlertmanagerConfig(url=closed_url(), timeout="1s")) as client:
        with pytest.raises(AlertmanagerUnavailableError, match="cannot reach Alertmanager") as info:
            await client.post_alerts([{"labels": {"alertname": "X"}}])
        assert info.value.status is None
        with pytest.raises(AlertmanagerUnavailableError):
            await client.create_silence({"alertname": "X"}, 60, "c")
        with pytest.raises(AlertmanagerUnavailableError):
            await client.expire_silence("abc")
        with pytest.raises(AlertmanagerUnavailableError):
            await client.silences()
        with pytest.raises(AlertmanagerUnavailableError):
            await client.alerts()
