"""A whole test stack: fault app → Prometheus → Alertmanager → healer, all real, on loopback."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tests.servers import (
    REPO,
    Server,
    free_port,
    http_get,
    http_json,
    start_alertmanager,
    start_healer,
    start_prometheus,
    wait_for,
)

TOKEN = "stack-token"

FAULT_RULES = {
    "groups": [
        {
            "name": "test-faults",
            "rules": [
                {
                    "alert": "FaultActive",
                    "expr": "fault_active == 1",
                    "labels": {"severity": "warning"},
                    "annotations": {"summary": "fault {{ $labels.fault }} is active"},
                }
            ],
        }
    ]
}


@dataclass
class HealingStack:
    """Started servers, the fault directory and helpers to inject faults and read healer's audit."""

    workdir: Path
    faults: Path
    app: subprocess.Popen[bytes]
    prometheus: Server
    alertmanager: Server
    healer: Server
    extra: list[Server] = field(default_factory=list)

    def inject(self, name: str) -> None:
        (self.faults / name).write_text("fault\n")

    def fault_present(self, name: str) -> bool:
        return (self.faults / name).exists()

    def actions(self, **filters: str) -> list[dict[str, Any]]:
        query = urllib.parse.urlencode(filters)
        return list(http_json(f"{self.healer.url}/api/v1/actions?{query}", headers=self.healer.headers)["actions"])

    def action(self, action_id: int) -> dict[str, Any]:
        return dict(http_json(f"{self.healer.url}/api/v1/actions/{action_id}", headers=self.healer.headers))

    def metric(self, name: str) -> float:
        """Sum of every sample of a metric in healer's /metrics (labels ignored)."""
        _, body = http_get(self.healer.url + "/metrics", headers=self.healer.headers)
        total = 0.0
        for line in body.decode().splitlines():
            if line.startswith(name) and line[len(name) : len(name) + 1] in (" ", "{"):
                total += float(line.rsplit(" ", 1)[1])
        return total

    def am_alerts(self, **matchers: str) -> list[dict[str, Any]]:
        params = urllib.parse.urlencode([("filter", f'{k}="{v}"') for k, v in matchers.items()])
        return list(http_json(f"{self.alertmanager.url}/api/v2/alerts?{params}"))

    def am_silences(self) -> list[dict[str, Any]]:
        return list(http_json(f"{self.alertmanager.url}/api/v2/silences"))

    def stop(self) -> None:
        for server in [self.healer, *self.extra, self.alertmanager, self.prometheus]:
            server.stop(signal.SIGTERM)
        self.app.kill()
        self.app.wait()


def healer_base_config(stack_dir: Path, prometheus: str, alertmanager: str) -> dict[str, Any]:
    (stack_dir / "token").write_text(TOKEN)
    return {
        "server": {"auth": {"bearer_token_file": str(stack_dir / "token")}},
        "prometheus": {"url": prometheus, "timeout": "2s"},
        "alertmanager": {"url": alertmanager},
        "store": {"path": str(stack_dir / "healer.db")},
        "exporter": {"host": False},
    }


def start_stack(
    workdir: Path,
    healing: dict[str, Any],
    strategies: dict[str, Any],
    *,
    interval: str = "1s",
    group_interval: str = "1s",
    settings: dict[str, dict[str, Any]] | None = None,
) -> HealingStack:
    """Start the fault app, Prometheus with the fault rule, Alertmanager routing to healer, and healer.

    `settings` adds keys to sections of healer's config (such as server.shutdown_timeout).
    """
    faults = workdir / "faults"
    faults.mkdir(parents=True)
    app_port = free_port()
    app = subprocess.Popen([sys.executable, str(REPO / "tests" / "fault_app.py"), str(app_port), str(faults)])
    started: list[Server] = []
    try:
        wait_for(lambda: http_get(f"http://127.0.0.1:{app_port}/")[0] == 200, 10, what="fault app")
        healer_port = free_port()
        alertmanager = start_alertmanager(
            workdir / "alertmanager",
            {
                "route": {
                    "receiver": "healer",
                    "group_by": ["alertname", "fault"],
                    "group_wait": "0s",
                    "group_interval": group_interval,
                    "repeat_interval": "1h",
                    "routes": [{"matchers": ['alertname="HealingFailed"'], "receiver": "humans"}],
                },
                "receivers": [
                    {
                        "name": "healer",
                        "webhook_configs": [
                            {
                                "url": f"http://127.0.0.1:{healer_port}/api/v1/alertmanager",
                                "send_resolved": True,
                                "http_config": {"authorization": {"credentials": TOKEN}},
                            }
                        ],
                    },
                    {"name": "humans"},
                ],
            },
        )
        started.append(alertmanager)
        rules = workdir / "rules.yml"
        rules.write_text(yaml.safe_dump(FAULT_RULES))
        prometheus = start_prometheus(
            workdir / "prometheus",
            [{"job_name": "app", "static_configs": [{"targets": [f"127.0.0.1:{app_port}"]}]}],
            rule_files=[str(rules)],
            interval=interval,
            alertmanager_url=alertmanager.url,
        )
        started.append(prometheus)
        config = healer_base_config(workdir, prometheus.url, alertmanager.url)
        config["healing"] = healing
        config["strategies"] = strategies
        for section, values in (settings or {}).items():
            config.setdefault(section, {}).update(values)
        healer = start_healer(workdir / "healer", config, listen=f"127.0.0.1:{healer_port}")
        return HealingStack(workdir, faults, app, prometheus, alertmanager, healer)
    except BaseException:
        for server in reversed(started):
            server.stop(signal.SIGKILL)
        app.kill()
        app.wait()
        raise


def remove_fault_command(faults: Path) -> list[str]:
    """An argv that deletes the fault named by the alert's `fault` label: a label as one whole argument."""
    script = "import os, sys; os.remove(os.path.join(sys.argv[1], sys.argv[2]))"
    return [sys.executable, "-c", script, str(faults), "{labels.fault}"]


def dump(stack: HealingStack) -> str:
    """Logs of every server, for assertion messages."""
    return (
        "\n".join(f"--- {s.name}\n{s.log()[-4000:]}" for s in (stack.healer, stack.prometheus, stack.alertmanager))
        + "\n--- actions\n"
        + json.dumps(stack.actions(), indent=1)[-4000:]
    )


def remove_fault_strategy(faults: Path) -> dict[str, Any]:
    """The exec strategy that heals a fault by deleting its file (remove_fault_command), for plain fault names."""
    return {
        "type": "exec",
        "command": remove_fault_command(faults),
        "allow_labels": {"fault": "^[a-z]+$"},
        "timeout": "10s",
    }


def wait_resolved(stack: HealingStack, action: dict[str, Any]) -> None:
    """Wait until healer has the resolved notification of an action's episode.

    A fault injected again before Alertmanager sent it could be deduplicated by Alertmanager (the
    group's firing alerts look unchanged) and never reach healer.
    """

    def resolved() -> bool:
        return any(event["kind"] == "resolved" for event in stack.action(action["id"])["events"])

    try:
        wait_for(resolved, 30, interval=0.2, what=f"episode {action['episode']['id']} resolved")
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{dump(stack)}") from None
