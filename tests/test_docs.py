"""The reference docs stay in step with the code: metrics, config keys and the example config."""

from __future__ import annotations

import re
import subprocess
import sys
import typing
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from healer.config import HealerConfig, load_config
from healer.exporter.own import DEPENDENCIES
from healer.exporter.probes import CODE_CLASSES
from healer.healing.metrics import OUTCOMES, SKIP_REASONS, WEBHOOK_CODES
from healer.strategies.builtin import ExecParams, HttpParams, SignalParams, SystemdParams
from tests.servers import Server, http_get, start_healer

REPO = Path(__file__).resolve().parent.parent
METRICS_DOC = REPO / "docs" / "metrics.md"
CONFIG_DOC = REPO / "docs" / "configuration.md"
EXAMPLE_CONFIG = REPO / "examples" / "healer.yml"

# A metric name in prose or PromQL, but not the middle of a recording rule such as
# `probe:healer_probe_errors:ratio_rate5m`.
METRIC_TOKEN = re.compile(r"(?<![\w:])healer_[a-z0-9_]*[a-z0-9](?![\w:])")
# Names with the healer_ prefix that are not metrics: the alert label that picks a strategy.
NOT_METRICS = frozenset({"healer_strategy"})
SAMPLE_SUFFIXES = ("_bucket", "_count", "_sum", "_total", "_created", "_info")


def _exposed_families(text: str) -> dict[str, str]:
    """Map each metric family in an exposition to its type, from the `# TYPE` lines."""
    families = {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(maxsplit=3)
            families[name] = kind
    return families


def _base_names(name: str) -> set[str]:
    """The name itself and the name with one sample suffix stripped, for matching doc mentions."""
    return {name} | {name.removesuffix(suffix) for suffix in SAMPLE_SUFFIXES if name.endswith(suffix)}


@pytest.fixture(scope="module")
def exposition(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The /metrics text of a real healer with the host collector, one process watch and one probe."""
    workdir = tmp_path_factory.mktemp("docs")
    marker = f"healer-docs-{uuid.uuid4().hex[:12]}"
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)", marker])
    config: dict[str, Any] = {
        "prometheus": {"url": "http://127.0.0.1:1"},
        "alertmanager": {"url": "http://127.0.0.1:1"},
        "store": {"path": str(workdir / "healer.db")},
        "exporter": {
            "host": True,
            "processes": [{"name": "sleeper", "cmdline": marker}],
            "probes": [{"name": "nowhere", "url": "http://127.0.0.1:1/healthz", "interval": "1s", "timeout": "500ms"}],
        },
        "healing": {"rules": [{"name": "r", "match": ['alertname="X"'], "strategies": ["noop"]}]},
        "strategies": {"noop": {"type": "exec", "command": ["true"]}},
    }
    healer: Server | None = None
    try:
        healer = start_healer(workdir, config)
        status, body = http_get(healer.url + "/metrics")
        assert status == 200, body
        yield body.decode()
    finally:
        if healer is not None:
            healer.stop()
        sleeper.kill()
        sleeper.wait()


def test_every_exposed_metric_is_documented(exposition: str) -> None:
    """Every metric family on a running healer's /metrics is named in docs/metrics.md."""
    documented = set(METRIC_TOKEN.findall(METRICS_DOC.read_text()))
    families = _exposed_families(exposition)
    assert "healer_process_up" in families and "healer_probe_up" in families, "the config did not enable them"
    missing = sorted(name for name in families if name not in documented)
    assert not missing, f"exposed but not in docs/metrics.md: {missing}"


def test_every_documented_metric_is_exposed(exposition: str) -> None:
    """Every healer_* metric docs/metrics.md names exists on a running healer's /metrics."""
    exposed: set[str] = set()
    for name, kind in _exposed_families(exposition).items():
        exposed |= _base_names(name)
        if kind == "histogram":
            exposed |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    unknown = sorted(
        token
        for token in set(METRIC_TOKEN.findall(METRICS_DOC.read_text())) - NOT_METRICS
        if not _base_names(token) & exposed
    )
    assert not unknown, f"in docs/metrics.md but not exposed: {unknown}"


def test_fixed_label_values_are_documented() -> None:
    """Every value of the fixed label sets (outcome, reason, code, dependency) is listed in docs/metrics.md."""
    text = METRICS_DOC.read_text()
    values = {*OUTCOMES, *SKIP_REASONS, *WEBHOOK_CODES, *CODE_CLASSES, *DEPENDENCIES, "firing", "resolved"}
    missing = sorted(value for value in values if f"`{value}`" not in text)
    assert not missing, f"label values not in docs/metrics.md: {missing}"


def _models(model: type[BaseModel], seen: set[type[BaseModel]]) -> Iterator[type[BaseModel]]:
    """Yield a model and every model reachable through its field annotations."""
    if model in seen:
        return
    seen.add(model)
    yield model

    def nested(annotation: Any) -> Iterator[type[BaseModel]]:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            yield from _models(annotation, seen)
        for argument in typing.get_args(annotation):
            yield from nested(argument)

    for field in model.model_fields.values():
        yield from nested(field.annotation)


def _documented_keys(text: str) -> set[str]:
    """Every component of every key path written in backticks, such as `healing.rules[].cooldown`."""
    keys: set[str] = set()
    for span in re.findall(r"`([^`\n]+)`", text):
        for path in re.split(r",\s*", span):
            if re.fullmatch(r"[a-z_][a-z0-9_]*(?:\[\])?(?:\.[a-z_][a-z0-9_]*(?:\[\])?)*", path):
                keys |= {part.removesuffix("[]") for part in path.split(".")}
    return keys


def test_every_config_key_is_documented() -> None:
    """Every field of the config models and built-in strategy params models is a key in docs/configuration.md."""
    documented = _documented_keys(CONFIG_DOC.read_text())
    seen: set[type[BaseModel]] = set()
    missing = []
    for root in (HealerConfig, ExecParams, HttpParams, SignalParams, SystemdParams):
        for model in _models(root, seen):
            missing += [f"{model.__name__}.{name}" for name in model.model_fields if name not in documented]
    assert len(seen) >= 15, f"model walk found too few models: {sorted(m.__name__ for m in seen)}"
    assert not missing, f"config keys not in docs/configuration.md: {missing}"


def test_example_config_is_valid() -> None:
    """examples/healer.yml passes load_config."""
    config = load_config(EXAMPLE_CONFIG)
    assert config.healing.rules and config.strategies
