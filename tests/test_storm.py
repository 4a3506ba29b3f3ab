"""An alert storm through real Prometheus, Alertmanager and healer: a small action budget bounds the strategy runs,
people get one HealingSuspended instead of a page per alert, and every episode is recorded with its reason."""

from __future__ import annotations

import sys
import threading
import urllib.error
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from tests.servers import Server, healing_status, http_get, http_json, wait_for
from tests.stack import HealingStack, dump, start_stack

pytestmark = pytest.mark.slow

ALERTS = 1000
BUDGET = 10
RECORD_RUN = "import sys; open(sys.argv[1], 'a').write(sys.argv[2] + '\\n')"


@dataclass
class HealthPoller:
    """Polls `GET /-/healthy` from a thread until stopped, each request with a deadline, and keeps what it got."""

    healer: Server
    timeout: float = 5.0
    answers: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> HealthPoller:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.answers.append(http_get(self.healer.url + "/-/healthy", timeout=self.timeout)[0])
            except (OSError, urllib.error.URLError) as exc:  # a timeout or a refused connection
                self.errors.append(repr(exc))
            self._stop.wait(0.05)

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        assert self._thread is not None
        self._thread.join(self.timeout + 1)


@pytest.fixture
def storm(tmp_path: Path) -> Iterator[HealingStack]:
    """A stack whose one rule runs a strategy that records its run and heals nothing, under a budget of 10 actions."""
    runs = tmp_path / "runs.log"
    strategies = {
        "record-run": {"type": "exec", "command": [sys.executable, "-c", RECORD_RUN, str(runs), "{labels.fault}"]}
    }
    healing = {
        "budget": {"actions": BUDGET, "window": "10m"},
        "rules": [
            {
                "name": "storm",
                "match": ['alertname="FaultActive"'],
                "strategies": ["record-run"],
                "max_attempts": 1,
                "verify": {"within": "1s", "interval": "200ms", "wait_for_prometheus": "5s"},
            }
        ],
    }
    stack = start_stack(tmp_path, healing, strategies)
    yield stack
    stack.stop()


def test_storm_of_distinct_alerts_is_bounded_and_reported_once(storm: HealingStack) -> None:
    """1,000 distinct alerts with a budget of 10: at most 10 runs, one HealingSuspended, every episode recorded
    with its reason, /-/healthy answering throughout."""
    runs = storm.workdir / "runs.log"
    with HealthPoller(storm.healer) as health:
        for index in range(ALERTS):
            storm.inject(f"storm{index:04d}")

        def all_recorded() -> list[dict[str, Any]] | None:
            found = http_json(
                f"{storm.healer.url}/api/v1/actions?rule=storm&limit={ALERTS}", headers=storm.healer.headers
            )["actions"]
            ended = [action for action in found if action["episode"]["state"] != "open"]
            return found if len(ended) == ALERTS else None

        try:
            actions = wait_for(all_recorded, 60, interval=0.5, what=f"{ALERTS} episodes ended")
            [suspended_alert] = wait_for(
                lambda: storm.am_alerts(alertname="HealingSuspended"), 20, what="HealingSuspended in Alertmanager"
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{dump(storm)}") from None
    ran = runs.read_text().splitlines() if runs.exists() else []
    assert 1 <= len(ran) <= BUDGET, ran
    assert len({action["episode"]["id"] for action in actions}) == ALERTS
    suspended = [a for a in actions if a["episode"]["state"] == "suspended"]
    acted = [a for a in actions if a["episode"]["state"] != "suspended"]
    assert {(a["outcome"], a["skip_reason"]) for a in suspended} == {("cancelled", "circuit_open")}
    # The runs that healed nothing were verified and went to people, one by one.
    assert sorted(a["episode"]["labels"]["fault"] for a in acted) == sorted(ran)
    assert {(a["outcome"], a["episode"]["state"]) for a in acted} == {("not_healed", "escalated")}
    assert healing_status(storm.healer)["episodes"]["suspended"] == len(suspended) == ALERTS - len(ran)

    assert suspended_alert["labels"]["reason"] == "circuit_open"
    assert suspended_alert["labels"]["healer_rule"] == "storm"
    assert 0 < int(suspended_alert["annotations"]["suspended"]) <= len(suspended)
    assert "rule=storm" in suspended_alert["annotations"]["audit_url"]
    # No page per suspended episode: HealingFailed only for episodes whose strategy ran.
    paged = {alert["labels"]["fault"] for alert in storm.am_alerts(alertname="HealingFailed")}
    assert paged <= set(ran) and len(paged) <= BUDGET
    assert health.errors == [] and health.answers and set(health.answers) == {200}, health.errors[:5]
