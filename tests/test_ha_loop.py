"""The full loop on high availability, all real: a fault app scraped by Prometheus, which posts to two
Alertmanagers in one gossip cluster, which notify three healer replicas on one PostgreSQL database.

Both documented ways of pointing Alertmanager at replicas: one `webhook_configs` entry per replica,
so every replica receives every notification from both Alertmanagers (six copies of each, the harder
case for exactly once); and each notification reaching one replica, as through an address in front of
them (here each Alertmanager posts to a replica of its own). The strategies append a line to a run log,
so runs are counted on what ran, not only on what was recorded.
"""

from __future__ import annotations

import concurrent.futures
import copy
import functools
import sys
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import PostgresDatabase, World
from tests.servers import (
    Server,
    alert_prometheus,
    free_port,
    healing_status,
    http_json,
    start_alertmanager_cluster,
    start_healer,
    wait_for,
)
from tests.stack import FAULT_RULES, TOKEN, healer_base_config
from tests.test_engine_safety import actions, events
from tests.test_ha import REPLICAS, replica_logs
from tests.test_healing_e2e import rule

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

# Appends `NAME FAULT` to the run log, then removes the fault file (heal) or exits 1 (fail).
RUN = (
    "import os, sys; log, faults, name, fault = sys.argv[1:5];"
    " open(log, 'a').write(f'{name} {fault}\\n');"
    " os.remove(os.path.join(faults, fault)) if name == 'heal' else sys.exit(1)"
)


@dataclass
class Loop:
    """The started parts: two clustered Alertmanagers, three replicas, and the fault app's directory."""

    workdir: Path
    faults: Path
    alertmanagers: list[Server]
    replicas: list[Server]

    def runs(self) -> Counter[str]:
        """How often each strategy really ran, from the run log: {"heal heal": 1, "fail hopeless": 2}."""
        path = self.workdir / "runs.log"
        return Counter(path.read_text().splitlines() if path.exists() else [])

    def logs(self) -> str:
        """The tail of every replica's and Alertmanager's log, for assertion messages."""
        return replica_logs(self.replicas + self.alertmanagers)

    def healing_failed(self, alertmanager: Server) -> list[dict[str, Any]]:
        """The HealingFailed alerts that one Alertmanager holds."""
        query = urllib.parse.urlencode({"filter": 'alertname="HealingFailed"'})
        return list(http_json(f"{alertmanager.url}/api/v2/alerts?{query}"))


def strategy(name: str, run_log: Path, faults: Path) -> dict[str, Any]:
    """An exec strategy that logs its run and heals (`heal`) or fails (`fail`)."""
    return {
        "type": "exec",
        "command": [sys.executable, "-c", RUN, str(run_log), str(faults), name, "{labels.fault}"],
        "allow_labels": {"fault": "^[a-z]+$"},
        "timeout": "10s",
    }


def alertmanager_config(replica_ports: list[int]) -> dict[str, Any]:
    """Route FaultActive to a webhook per replica port at once (new groups at once); HealingFailed to humans."""
    webhooks = [
        {
            "url": f"http://127.0.0.1:{port}/api/v1/alertmanager",
            "send_resolved": True,
            "http_config": {"authorization": {"credentials": TOKEN}},
        }
        for port in replica_ports
    ]
    return {
        "route": {
            "receiver": "healer",
            "group_by": ["alertname", "fault"],
            "group_wait": "0s",
            "group_interval": "200ms",
            "repeat_interval": "1h",
            "routes": [{"matchers": ['alertname="HealingFailed"'], "receiver": "humans"}],
        },
        "receivers": [{"name": "healer", "webhook_configs": webhooks}, {"name": "humans"}],
    }


@pytest.fixture(params=["webhook-per-replica", "one-replica-per-notification"])
def loop(
    request: pytest.FixtureRequest, tmp_path: Path, world: World, postgres_db: PostgresDatabase, servers: list[Server]
) -> Iterator[Loop]:
    """Start the Alertmanager cluster and the replicas, and point the world's Prometheus at both Alertmanagers."""
    ports = [free_port() for _ in range(REPLICAS)]
    if request.param == "webhook-per-replica":
        configs = [alertmanager_config(ports), alertmanager_config(ports)]
    else:
        configs = [alertmanager_config(ports[:1]), alertmanager_config(ports[1:2])]
    alertmanagers = start_alertmanager_cluster(tmp_path / "alertmanagers", configs)
    servers.extend(alertmanagers)
    rules = tmp_path / "rules.yml"
    rules.write_text(yaml.safe_dump(FAULT_RULES))
    alert_prometheus(world.prometheus, alertmanagers, rule_files=[str(rules)])

    settings = healer_base_config(tmp_path, world.prometheus.url, alertmanagers[0].url)
    settings["alertmanager"]["peers"] = [am.url for am in alertmanagers[1:]]
    settings["store"] = postgres_db.store()
    run_log = tmp_path / "runs.log"
    settings["strategies"] = {name: strategy(name, run_log, world.files) for name in ("heal", "fail")}
    settings["healing"] = {
        "rules": [rule("heal", "heal", ["heal"]), rule("hopeless", "hopeless", ["fail"], max_attempts=2)]
    }

    def start(index: int) -> Server:
        own = copy.deepcopy(settings)
        own["server"]["replica"] = f"r{index}"
        replica = start_healer(tmp_path / f"r{index}", own, listen=f"127.0.0.1:{ports[index]}")
        servers.append(replica)
        return replica

    with concurrent.futures.ThreadPoolExecutor(REPLICAS) as pool:
        replicas = list(pool.map(start, range(REPLICAS)))
    yield Loop(tmp_path, world.files, alertmanagers, replicas)
    for fault in ("heal", "hopeless"):
        (world.files / fault).unlink(missing_ok=True)


def ended(replica: Server, rule_name: str) -> list[dict[str, Any]] | None:
    """The steps of a rule, oldest first, once its newest episode has ended."""
    found = actions(replica, rule=rule_name)
    return list(reversed(found)) if found and found[0]["episode"]["state"] != "open" else None


def test_fault_heals_once_and_exhausted_ladder_pages_once_on_each_alertmanager(loop: Loop) -> None:
    """A real fault is healed by one verified run; an exhausted ladder leaves one HealingFailed on each Alertmanager."""
    (loop.faults / "heal").write_text("fault\n")
    (loop.faults / "hopeless").write_text("fault\n")

    healed = wait_for(lambda: ended(loop.replicas[0], "heal"), 60, interval=0.2, what="the heal episode ended")
    assert [(s["strategy"], s["outcome"], s["episode"]["state"]) for s in healed] == [("heal", "healed", "healed")]
    assert not (loop.faults / "heal").exists()
    hopeless = wait_for(lambda: ended(loop.replicas[1], "hopeless"), 60, interval=0.2, what="the ladder exhausted")
    assert [(s["attempt"], s["outcome"]) for s in hopeless] == [(1, "failed"), (2, "failed")], loop.logs()
    [escalated] = {s["episode"]["id"] for s in hopeless}
    assert hopeless[-1]["episode"]["state"] == "escalated"

    # However many copies of each notification reached the replicas, each strategy ran once per attempt.
    assert loop.runs() == {"heal heal": 1, "fail hopeless": 2}, loop.logs()
    for replica in loop.replicas:  # every replica answers the same, from the one database
        assert healing_status(replica)["episodes"] == {"healed": 1, "escalated": 1}
        assert actions(replica) == actions(loop.replicas[0])

    def delivered() -> bool:
        return "escalation_delivered" in events(loop.replicas[2], hopeless[-1]["id"])

    wait_for(delivered, 30, what="HealingFailed delivered")
    pages = [
        wait_for(functools.partial(loop.healing_failed, am), 30, what=f"HealingFailed on {am.name}")
        for am in loop.alertmanagers
    ]
    for page in pages:
        assert len(page) == 1, pages
        [alert] = page
        assert alert["labels"]["healer_episode"] == str(escalated)
        assert alert["labels"]["fault"] == "hopeless" and alert["labels"]["healed_alertname"] == "FaultActive"
    # Posted once by the cluster's leader (to both Alertmanagers), not once per replica.
    assert events(loop.replicas[0], hopeless[-1]["id"]).count("escalation_delivered") == 1
