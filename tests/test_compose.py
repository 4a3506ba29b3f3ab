"""docker-compose.yml, the Dockerfile and the systemd unit: their structure, and every config they mount validates.

The profile `ha` (PostgreSQL and a second replica) is checked with the variables of examples/docker/ha.env.

No Docker engine is needed: nothing is built or started. What a container would load is checked with the
tools that load it (promtool, amtool, healer check-config), on the same files at the same relative paths.
"""

from __future__ import annotations

import fnmatch
import ipaddress
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path, PurePosixPath
from typing import Any

import pytest
import yaml

from healer.config import load_config
from healer.durations import parse_duration
from tests.servers import AMTOOL, PROMTOOL, REPO

COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
DOCKERIGNORE = REPO / ".dockerignore"
UNIT_FILE = REPO / "examples" / "healer.service"
SERVICES = {"prometheus", "alertmanager", "grafana", "healer", "app"}
# The services of the profile `ha`, and the file of variables that switches the others to their HA configs.
HA_SERVICES = {"postgres", "healer-2"}
HEALER_REPLICAS = ("healer", "healer-2")
HA_ENV = REPO / "examples" / "docker" / "ha.env"
# The config file each service loads, as its container sees it.
PROMETHEUS_CONFIG = "/etc/prometheus/prometheus.yml"
ALERTMANAGER_CONFIG = "/etc/alertmanager/alertmanager.yml"
HEALER_CONFIG = "/etc/healer/healer.yml"
GRAFANA_PROVISIONING = "/etc/grafana/provisioning"
# Every bind mount (service, container path) and the test below that validates what is mounted there.
VALIDATED_MOUNTS = {
    ("prometheus", PROMETHEUS_CONFIG): "test_prometheus_config_loads_in_the_container_layout",
    ("prometheus", "/etc/prometheus/rules"): "test_prometheus_config_loads_in_the_container_layout",
    ("prometheus", "/etc/prometheus/app/rules.yml"): "test_prometheus_config_loads_in_the_container_layout",
    ("alertmanager", ALERTMANAGER_CONFIG): "test_alertmanager_config_passes_amtool",
    ("grafana", GRAFANA_PROVISIONING): "test_grafana_provisioning_parses_and_names_the_mounted_dashboards",
    ("grafana", "/etc/grafana/dashboards"): "test_grafana_provisioning_parses_and_names_the_mounted_dashboards",
    ("healer", HEALER_CONFIG): "test_healer_config_passes_check_config",
    ("healer-2", HEALER_CONFIG): "test_ha_healer_config_passes_check_config",
}
_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::?-(?P<default>[^}]*))?\}")


def _interpolate(value: str, env: dict[str, str] | None = None) -> str:
    """Resolve compose `${VAR:-default}` from `env`, else to its default: the checks do not read the environment."""

    def default(match: re.Match[str]) -> str:
        if env and match.group("name") in env:
            return env[match.group("name")]
        if match.group("default") is None:
            raise AssertionError(f"{match.group(0)} has no default: `docker compose up` would need it set")
        return match.group("default")

    return _VARIABLE.sub(default, value)


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE_FILE.read_text())
    assert isinstance(data, dict), "docker-compose.yml is not a YAML mapping"
    return data


def _service(name: str) -> dict[str, Any]:
    service = _compose()["services"][name]
    assert isinstance(service, dict)
    return service


def _ha_env() -> dict[str, str]:
    """The variables of examples/docker/ha.env (KEY=VALUE lines; # starts a comment)."""
    variables = {}
    for line in HA_ENV.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, sep, value = line.partition("=")
            assert sep and re.fullmatch(r"[A-Z_][A-Z0-9_]*", key), f"ha.env: {line!r}"
            variables[key] = value
    return variables


def _mounts(service: dict[str, Any], env: dict[str, str] | None = None) -> list[dict[str, str]]:
    """The service's volumes as {type, source, target}, short and long syntax alike."""
    mounts = []
    for entry in service.get("volumes", []):
        if isinstance(entry, str):
            parts = _interpolate(entry, env).split(":")
            assert len(parts) in (2, 3), f"cannot read volume {entry!r}"
            source, target = parts[0], parts[1]
            kind = "bind" if source.startswith((".", "/", "~")) else "volume"
        else:
            kind, source, target = entry["type"], _interpolate(entry["source"], env), entry["target"]
        mounts.append({"type": kind, "source": source, "target": target})
    return mounts


def _host_path(source: str) -> Path:
    """A compose bind-mount or secret source, relative to the compose file, as a path in the repository."""
    assert not source.startswith(("/", "~")), f"{source}: mount repository files by relative path"
    path = (COMPOSE_FILE.parent / source).resolve()
    assert path.is_relative_to(REPO), f"{source} is outside the repository"
    return path


def _bind_source(service: str, target: str, env: dict[str, str] | None = None) -> Path:
    for mount in _mounts(_service(service), env):
        if mount["type"] == "bind" and mount["target"] == target:
            return _host_path(mount["source"])
    raise AssertionError(f"{service} does not bind-mount anything at {target}")


def _secret_files() -> dict[str, Path]:
    return {name: _host_path(_interpolate(spec["file"])) for name, spec in _compose().get("secrets", {}).items()}


def _secret_paths(service: str) -> set[str]:
    """The container paths of the secrets a service is given."""
    paths = set()
    for entry in _service(service).get("secrets", []):
        if isinstance(entry, str):
            paths.add(f"/run/secrets/{entry}")
        else:
            target = entry.get("target", entry["source"])
            paths.add(target if target.startswith("/") else f"/run/secrets/{target}")
    return paths


def _mirror(service: str, root: Path) -> None:
    """Copy every bind mount of a service to `root` + its container path, recreating what the container sees."""
    for mount in _mounts(_service(service)):
        if mount["type"] != "bind":
            continue
        source, destination = _host_path(mount["source"]), root / mount["target"].lstrip("/")
        destination.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, destination)
        else:
            shutil.copy(source, destination)


def _flag(command: list[str], name: str) -> str:
    for argument in command:
        if argument.startswith(f"{name}="):
            return argument.split("=", 1)[1]
    raise AssertionError(f"{name}= is not in {command}")


def _host_of(url: str) -> str:
    return urllib.parse.urlsplit(url).hostname or ""


def _dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, arguments), continuation lines joined."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        keyword, _, arguments = (pending + stripped).partition(" ")
        instructions.append((keyword.upper(), arguments.strip()))
        pending = ""
    return instructions


def _unit() -> dict[str, dict[str, list[str]]]:
    """The systemd unit as {section: {key: [values]}}."""
    sections: dict[str, dict[str, list[str]]] = {}
    current: dict[str, list[str]] | None = None
    for line in UNIT_FILE.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            current = sections.setdefault(line[1:-1], {})
            continue
        assert current is not None, f"{line!r} is outside any section"
        key, sep, value = line.partition("=")
        assert sep, f"{line!r} is not KEY=VALUE"
        current.setdefault(key.strip(), []).append(value.strip())
    return sections


def test_compose_file_defines_the_services() -> None:
    """docker-compose.yml defines prometheus, alertmanager, grafana, healer, app; postgres and healer-2 in `ha`."""
    services = _compose()["services"]
    assert {name for name, service in services.items() if "profiles" not in service} == SERVICES
    assert {name for name, service in services.items() if service.get("profiles") == ["ha"]} == HA_SERVICES
    assert set(services) == SERVICES | HA_SERVICES


def test_every_service_has_a_healthcheck() -> None:
    """Each service declares an enabled healthcheck whose probe targets its own container."""
    for name, service in _compose()["services"].items():
        check = service.get("healthcheck")
        assert check, f"{name} has no healthcheck"
        assert not check.get("disable"), f"{name} disables its healthcheck"
        test = check["test"]
        assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL") and len(test) > 1, f"{name}: {test}"
        if name == "postgres":
            assert test[1] == "pg_isready" and test[test.index("-h") + 1] == "127.0.0.1", test
        else:
            assert re.search(r"https?://(127\.0\.0\.1|localhost):\d+/", " ".join(test)), f"{name} probes another host"
        for key in ("interval", "timeout"):
            assert parse_duration(check[key]) > 0, f"{name}.healthcheck.{key}"


def test_python_healthchecks_compile() -> None:
    """The `python -c` healthchecks (healer, healer-2, app) are valid Python that requests the ready endpoint."""
    for name in (*HEALER_REPLICAS, "app"):
        test = _service(name)["healthcheck"]["test"]
        assert test[1:3] == ["python", "-c"], f"{name}: {test}"
        compile(test[3], f"{name}.healthcheck", "exec")
        assert "urllib.request.urlopen" in test[3]
    for name in HEALER_REPLICAS:
        assert "/-/ready" in _service(name)["healthcheck"]["test"][3]


def test_named_volumes_are_declared_and_hold_each_services_data() -> None:
    """Every named volume a service uses is declared, and every service keeps its data on one."""
    compose = _compose()
    declared = set(compose.get("volumes") or {})
    data_paths = {
        "prometheus": "/prometheus",
        "alertmanager": "/alertmanager",
        "grafana": "/var/lib/grafana",
        "healer": "/var/lib/healer",
        "app": "/data",
        "postgres": "/var/lib/postgresql/data",
        "healer-2": "/data",  # the app's data, for free-disk; its own state is in PostgreSQL
    }
    for name, service in compose["services"].items():
        named = {m["target"]: m["source"] for m in _mounts(service) if m["type"] == "volume"}
        assert set(named.values()) <= declared, f"{name} uses undeclared volumes {set(named.values()) - declared}"
        assert data_paths[name] in named, f"{name} keeps {data_paths[name]} off a named volume"
    assert _service("prometheus")["command"].count(f"--storage.tsdb.path={data_paths['prometheus']}") == 1
    assert _flag(_service("alertmanager")["command"], "--storage.path") == data_paths["alertmanager"]


def test_every_mounted_file_exists_and_is_validated() -> None:
    """Every bind-mount and secret source exists in the repository, and each bind mount is validated by a test here."""
    bind_mounts = set()
    for name, service in _compose()["services"].items():
        for mount in _mounts(service):
            if mount["type"] == "bind":
                assert _host_path(mount["source"]).exists(), f"{name} mounts missing {mount['source']}"
                bind_mounts.add((name, mount["target"]))
    assert bind_mounts == set(VALIDATED_MOUNTS), "a bind mount was added or removed: validate it in this file"
    for check in set(VALIDATED_MOUNTS.values()):
        assert callable(globals().get(check)), check
    for name, path in _secret_files().items():
        assert path.is_file(), f"secret {name}: {path} is missing"
        # Compose bind-mounts a file secret with the host file's mode; healer and Alertmanager run as other users.
        assert path.stat().st_mode & 0o004, f"secret {name}: {path} is not readable by the containers' users"


def test_token_secret_is_shared_by_healer_and_alertmanager() -> None:
    """healer's bearer_token_file and Alertmanager's credentials_file are the same compose secret, a one-line token."""
    config = load_config(_bind_source("healer", HEALER_CONFIG))
    token_path = str(config.server.auth.bearer_token_file)
    assert token_path in _secret_paths("healer"), f"healer is not given {token_path}"
    alertmanager = yaml.safe_load(_bind_source("alertmanager", ALERTMANAGER_CONFIG).read_text())
    webhooks = [hook for receiver in alertmanager["receivers"] for hook in receiver.get("webhook_configs", [])]
    to_healer = [hook for hook in webhooks if _host_of(hook["url"]) == "healer"]
    assert to_healer, "no Alertmanager receiver posts to the healer service"
    for hook in to_healer:
        assert hook["http_config"]["authorization"]["credentials_file"] == token_path
    assert token_path in _secret_paths("alertmanager")
    token_file = _secret_files()[PurePosixPath(token_path).name]
    token = token_file.read_text()
    assert token.strip() and len(token.strip().splitlines()) == 1 and not re.search(r"\s", token.strip())


def test_prometheus_config_loads_in_the_container_layout(tmp_path: Path) -> None:
    """`promtool check config` passes on the compose Prometheus config with its mounts where the container has them."""
    _mirror("prometheus", tmp_path)
    command = _service("prometheus")["command"]
    assert _flag(command, "--config.file") == PROMETHEUS_CONFIG
    config_path = tmp_path / PROMETHEUS_CONFIG.lstrip("/")
    config = yaml.safe_load(config_path.read_text())
    expected_rule_files = 0
    for pattern in config["rule_files"]:
        assert not pattern.startswith("/"), f"{pattern}: keep rule paths relative to the config file"
        matches = sorted(config_path.parent.glob(pattern))
        assert matches, f"rule_files entry {pattern} matches nothing in the container layout"
        expected_rule_files += len(matches)
    result = subprocess.run([PROMTOOL, "check", "config", str(config_path)], capture_output=True, text=True)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert f"SUCCESS: {expected_rule_files} rule files found" in output, output


def test_prometheus_scrapes_and_alerts_compose_services() -> None:
    """Every Prometheus target is a compose service (or Prometheus itself) and healer's job is called healer."""
    config = yaml.safe_load(_bind_source("prometheus", PROMETHEUS_CONFIG).read_text())
    jobs = {}
    for job in config["scrape_configs"]:
        for static in job["static_configs"]:
            for target in static["targets"]:
                host = target.rsplit(":", 1)[0]
                assert host in SERVICES or (host == "localhost" and job["job_name"] == "prometheus"), target
                jobs[job["job_name"]] = target
    assert jobs["healer"] == "healer:9877"
    assert jobs["app"] == "app:8000"
    alerting = [t for am in config["alerting"]["alertmanagers"] for s in am["static_configs"] for t in s["targets"]]
    assert alerting == ["alertmanager:9093"]


def test_prometheus_config_keeps_in_step_with_the_example() -> None:
    """The compose Prometheus config has the same intervals and jobs as examples/prometheus.yml."""
    compose = yaml.safe_load(_bind_source("prometheus", PROMETHEUS_CONFIG).read_text())
    example = yaml.safe_load((REPO / "examples" / "prometheus.yml").read_text())
    assert compose["global"] == example["global"]
    assert [j["job_name"] for j in compose["scrape_configs"]] == [j["job_name"] for j in example["scrape_configs"]]
    assert len(compose["rule_files"]) == len(example["rule_files"])


def test_alertmanager_config_passes_amtool() -> None:
    """`amtool check-config` passes on the Alertmanager config the compose service mounts."""
    assert _flag(_service("alertmanager")["command"], "--config.file") == ALERTMANAGER_CONFIG
    path = _bind_source("alertmanager", ALERTMANAGER_CONFIG)
    result = subprocess.run([AMTOOL, "check-config", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alertmanager_config_keeps_in_step_with_the_example() -> None:
    """The compose Alertmanager config routes like examples/alertmanager.yml and differs only in the healer webhook."""
    compose = yaml.safe_load(_bind_source("alertmanager", ALERTMANAGER_CONFIG).read_text())
    example = yaml.safe_load((REPO / "examples" / "alertmanager.yml").read_text())
    assert compose["route"] == example["route"]
    assert compose["inhibit_rules"] == example["inhibit_rules"]

    def without_healer_endpoint(config: dict[str, Any]) -> list[Any]:
        receivers = json.loads(json.dumps(config["receivers"]))
        for receiver in receivers:
            if receiver["name"] == "healer":
                for hook in receiver["webhook_configs"]:
                    hook["url"] = urllib.parse.urlsplit(hook["url"]).path
                    del hook["http_config"]["authorization"]["credentials_file"]
        return receivers

    assert without_healer_endpoint(compose) == without_healer_endpoint(example)
    healer = next(r for r in compose["receivers"] if r["name"] == "healer")
    assert healer["webhook_configs"][0]["url"] == "http://healer:9877/api/v1/alertmanager"


def check_config_outside_the_container(path: Path) -> subprocess.CompletedProcess[str]:
    """Run `healer check-config` here on a config made for the container: its token secret, a file only
    there, comes from HEALER_TOKEN as a container without the secret file would give it."""
    env = {**os.environ, "HEALER_TOKEN": "check-config-token"}
    return subprocess.run(
        [sys.executable, "-m", "healer", "check-config", str(path)], capture_output=True, text=True, cwd=REPO, env=env
    )


def test_healer_config_passes_check_config() -> None:
    """`python -m healer check-config` accepts the healer config the compose service mounts."""
    result = check_config_outside_the_container(_bind_source("healer", HEALER_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr


def test_healer_config_fits_the_containers() -> None:
    """The compose healer config reaches services by name, keeps its store on its volume and watches no processes."""
    config = load_config(_bind_source("healer", HEALER_CONFIG))
    assert config.prometheus.url == "http://prometheus:9090"
    assert config.alertmanager.url == "http://alertmanager:9093"
    assert [probe.url for probe in config.exporter.probes] == ["http://app:8000/healthz"]
    assert config.exporter.processes == []
    host = config.server.listen.rpartition(":")[0]
    assert not ipaddress.ip_address(host).is_loopback, "other containers could not reach healer"
    volume_targets = [m["target"] for m in _mounts(_service("healer")) if m["type"] == "volume"]
    assert any(config.store.path.is_relative_to(target) for target in volume_targets), config.store.path
    for name, strategy in config.strategies.items():
        url = getattr(strategy, "url", None)
        if url is not None:
            assert _host_of(url) in SERVICES, f"strategy {name} calls {url}"
        assert strategy.type != "signal", f"strategy {name}: healer cannot signal another container's processes"
        command = getattr(strategy, "command", None)
        if command and command[0] == "find":
            # free-disk works on the app's data directory, which both containers mount.
            app_data = {m["source"] for m in _mounts(_service("app")) if m["target"] == command[1]}
            healer_data = {m["source"] for m in _mounts(_service("healer")) if m["target"] == command[1]}
            assert app_data and app_data == healer_data, f"strategy {name}: {command[1]} is not shared with the app"
    grace = parse_duration(_service("healer")["stop_grace_period"])
    assert grace > config.server.shutdown_timeout, "docker stop would kill running actions before shutdown_timeout"


def test_grafana_provisioning_parses_and_names_the_mounted_dashboards() -> None:
    """The mounted Grafana provisioning parses, its dashboard provider reads the mounted dashboards, and they parse."""
    provisioning = _bind_source("grafana", GRAFANA_PROVISIONING)
    files = sorted(provisioning.rglob("*.y*ml"))
    assert files, f"no provisioning files under {provisioning}"
    provider_paths = []
    datasource_urls = []
    for path in files:
        data = yaml.safe_load(path.read_text())
        assert isinstance(data, dict) and data.get("apiVersion") == 1, path
        provider_paths += [provider["options"]["path"] for provider in data.get("providers", [])]
        datasource_urls += [source["url"] for source in data.get("datasources", [])]
    assert provider_paths, "no dashboard provider"
    for container_path in provider_paths:
        dashboards = _bind_source("grafana", container_path)
        boards = sorted(dashboards.glob("*.json"))
        assert boards, f"no dashboards in {dashboards}"
        for board in boards:
            assert isinstance(json.loads(board.read_text()).get("panels"), list), board
    assert datasource_urls and all(_host_of(url) in SERVICES for url in datasource_urls), datasource_urls


def test_app_command_uses_the_apps_cli() -> None:
    """The app service runs examples.app.app with flags its argument parser accepts, on the shared data volume."""
    service = _service("app")
    argv = [*service["entrypoint"], *service["command"]]
    assert argv[:3] == ["python", "-m", "examples.app.app"]
    result = subprocess.run(
        [sys.executable, "-m", "examples.app.app", "--help"], capture_output=True, text=True, cwd=REPO, timeout=60
    )
    assert result.returncode == 0, result.stderr
    for flag in (arg for arg in argv[3:] if arg.startswith("--")):
        assert flag in result.stdout, f"examples.app.app has no {flag}"
    assert argv[argv.index("--host") + 1] == "0.0.0.0"
    assert argv[argv.index("--data-dir") + 1] == "/data"


def test_dockerfile_builds_a_non_root_healer_image() -> None:
    """The Dockerfile starts from python:3.11-slim, pip-installs the package, runs as non-root and serves on 9877."""
    instructions = _dockerfile()
    keywords = [keyword for keyword, _ in instructions]
    assert instructions[0] == ("FROM", "python:3.11-slim")
    assert any(keyword == "RUN" and re.search(r"\bpip install \.(\s|$)", args) for keyword, args in instructions)
    users = [args for keyword, args in instructions if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert keywords.index("USER") > max(i for i, k in enumerate(keywords) if k == "RUN"), "a RUN after USER"
    assert ("EXPOSE", "9877") in instructions
    entrypoint = json.loads(next(args for keyword, args in instructions if keyword == "ENTRYPOINT"))
    command = json.loads(next(args for keyword, args in instructions if keyword == "CMD"))
    assert entrypoint == ["healer"]
    assert command == ["serve", "-c", HEALER_CONFIG, "--listen", "0.0.0.0:9877"]
    assert "build" in _service("healer") and "command" not in _service("healer")


def test_dockerfile_healthcheck_gets_ready() -> None:
    """The image's HEALTHCHECK runs Python's urllib against /-/ready on the exposed port."""
    check = next(args for keyword, args in _dockerfile() if keyword == "HEALTHCHECK")
    options, _, command = check.partition("CMD ")
    for option in shlex.split(options):
        assert re.fullmatch(r"--(interval|timeout|start-period|retries)=\w+", option), option
    argv = json.loads(command)
    assert argv[:2] == ["python", "-c"]
    compile(argv[2], "HEALTHCHECK", "exec")
    assert "urllib.request.urlopen('http://127.0.0.1:9877/-/ready'" in argv[2]


def _ignored(path: str, patterns: list[str]) -> bool:
    parts = PurePosixPath(path).parts
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    for pattern in patterns:
        bare = pattern.removeprefix("**/")
        for prefix in prefixes:
            if fnmatch.fnmatchcase(prefix, pattern) or (
                pattern.startswith("**/") and fnmatch.fnmatchcase(PurePosixPath(prefix).name, bare)
            ):
                return True
    return False


def test_dockerfile_copies_files_the_build_context_keeps() -> None:
    """Every COPY source exists and .dockerignore excludes none of it, nor the files the image needs."""
    patterns = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.strip().startswith("#")
    ]
    assert not any(pattern.startswith("!") for pattern in patterns), "exceptions are not modelled here"
    sources = []
    for keyword, args in _dockerfile():
        if keyword in ("COPY", "ADD"):
            words = [word for word in args.split() if not word.startswith("--")]
            sources += words[:-1]
    needed = [
        *sources,
        "healer/__init__.py",
        "healer/py.typed",
        "examples/__init__.py",
        "examples/app/__init__.py",
        "examples/app/app.py",
    ]
    for source in needed:
        assert (REPO / source).exists(), f"{source} is missing"
        assert not _ignored(source, patterns), f".dockerignore excludes {source}"
    assert _ignored("healer/__pycache__/cli.cpython-311.pyc", patterns)
    assert _ignored(".git", patterns)
    assert "examples/docker/healer.yml" in sources, "the image's default config"


def test_systemd_unit_structure() -> None:
    """examples/healer.service has [Unit], [Service], [Install], runs `healer serve` hardened and stops gracefully."""
    unit = _unit()
    assert {"Unit", "Service", "Install"} <= set(unit)
    service = unit["Service"]
    exec_start = shlex.split(service["ExecStart"][-1])
    assert exec_start[0].endswith("/healer") and exec_start[1] == "serve"
    assert exec_start[exec_start.index("-c") + 1] == HEALER_CONFIG
    expected = {
        "User": "healer",
        "NoNewPrivileges": "yes",
        "ProtectSystem": "strict",
        "PrivateTmp": "yes",
        "Restart": "on-failure",
        "KillSignal": "SIGTERM",
    }
    for key, value in expected.items():
        assert service.get(key, [None])[-1] == value, f"{key}={service.get(key)}"
    assert "/var/lib/healer" in " ".join(service["ReadWritePaths"]).split()
    assert service.get("Type", ["simple"])[-1] == "simple"
    example = load_config(REPO / "examples" / "healer.yml")
    stop_timeout = parse_duration(service["TimeoutStopSec"][-1])
    assert stop_timeout > example.server.shutdown_timeout, "systemd would kill running actions before shutdown_timeout"
    assert unit["Install"]["WantedBy"] == ["multi-user.target"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_unit_verifies(tmp_path: Path) -> None:
    """`systemd-analyze verify` finds no unknown keys or errors, with ExecStart pointed at the installed healer."""
    healer = shutil.which("healer") or str(Path(sys.executable).parent / "healer")
    if not Path(healer).exists():
        pytest.skip("no healer console script to point ExecStart at")
    unit = tmp_path / "healer.service"
    unit.write_text(UNIT_FILE.read_text().replace("/usr/local/bin/healer", healer))
    result = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    complaints = [line for line in (result.stdout + result.stderr).splitlines() if "healer.service" in line]
    assert result.returncode == 0 and not complaints, "\n".join(complaints) or result.stderr


def _ha_healer_config() -> Path:
    path = _bind_source("healer", HEALER_CONFIG, _ha_env())
    assert path == _bind_source("healer-2", HEALER_CONFIG), "the two replicas load different configs"
    return path


def test_ha_env_switches_healer_and_alertmanager_to_their_ha_configs() -> None:
    """ha.env sets exactly the variables of healer's and Alertmanager's config mounts, to the HA files that exist."""
    env = _ha_env()
    assert set(env) == {"HEALER_CONFIG_FILE", "ALERTMANAGER_CONFIG_FILE"}
    assert _bind_source("healer", HEALER_CONFIG, env) == REPO / "examples" / "docker" / "healer-ha.yml"
    docker = REPO / "examples" / "docker"
    assert _bind_source("alertmanager", ALERTMANAGER_CONFIG, env) == docker / "alertmanager-ha.yml"
    # Without it, the default stack is unchanged.
    assert _bind_source("healer", HEALER_CONFIG) == REPO / "examples" / "docker" / "healer.yml"
    assert _bind_source("alertmanager", ALERTMANAGER_CONFIG) == REPO / "examples" / "docker" / "alertmanager.yml"
    compose_text = COMPOSE_FILE.read_text()
    assert f"--env-file {HA_ENV.relative_to(REPO)} --profile ha up" in compose_text
    assert f"--env-file {HA_ENV.relative_to(REPO)} --profile ha up" in HA_ENV.read_text()


def test_ha_healer_config_passes_check_config() -> None:
    """`python -m healer check-config` accepts the HA config both replicas load."""
    from healer.config.model import StoreConfig

    if "url" not in StoreConfig.model_fields:
        pytest.skip("the PostgreSQL store (store.url) is not in healer's config model yet")
    result = check_config_outside_the_container(_ha_healer_config())
    assert result.returncode == 0, result.stdout + result.stderr


def test_ha_healer_config_differs_from_the_single_one_only_in_its_store() -> None:
    """healer-ha.yml is healer.yml with the store on the postgres service's database, its password a shared secret."""
    ha = yaml.safe_load(_ha_healer_config().read_text())
    single = yaml.safe_load(_bind_source("healer", HEALER_CONFIG).read_text())
    assert {key: value for key, value in ha.items() if key != "store"} == {
        key: value for key, value in single.items() if key != "store"
    }
    store = ha["store"]
    assert "path" not in store
    assert {key: value for key, value in store.items() if key not in ("url", "password_file")} == {
        key: value for key, value in single["store"].items() if key != "path"
    }
    url = urllib.parse.urlsplit(store["url"])
    postgres = _service("postgres")
    assert url.scheme == "postgresql" and url.hostname == "postgres" and url.port == 5432 and url.password is None
    assert url.username == postgres["environment"]["POSTGRES_USER"]
    assert url.path == "/" + postgres["environment"]["POSTGRES_DB"]
    password_file = store["password_file"]
    assert postgres["environment"]["POSTGRES_PASSWORD_FILE"] == password_file
    for name in (*HEALER_REPLICAS, "postgres"):
        assert password_file in _secret_paths(name), f"{name} is not given {password_file}"
    secret = _secret_files()[PurePosixPath(password_file).name]
    assert len(secret.read_text().strip().splitlines()) == 1


def test_ha_services_run_like_the_first_replica() -> None:
    """healer-2 is healer's image, hardening and secrets under its own name; postgres is healthy before it starts."""
    first, second = _service("healer"), _service("healer-2")
    for key in ("build", "image", "healthcheck", "stop_signal", "stop_grace_period", "init", "read_only", "tmpfs"):
        assert second.get(key) == first.get(key), key
    for key in ("cap_drop", "security_opt", "restart"):
        assert second[key] == first[key], key
    assert set(second["secrets"]) == set(first["secrets"])
    assert {first["environment"]["HEALER_REPLICA"], second["environment"]["HEALER_REPLICA"]} == set(HEALER_REPLICAS)
    assert second["depends_on"]["postgres"]["condition"] == "service_healthy"
    # A dependency on a service of an inactive profile would break plain `docker compose up` on older Compose.
    assert "postgres" not in first.get("depends_on", {})
    published = {port.rsplit(":", 2)[0] + ":" + port.rsplit(":", 2)[1] for port in (*first["ports"], *second["ports"])}
    assert len(published) == 2 and all(port.startswith("127.0.0.1:") for port in published), published
    postgres = _service("postgres")
    assert re.fullmatch(r"postgres:\d+(\.\d+)?", postgres["image"]), postgres["image"]
    assert "ports" not in postgres, "PostgreSQL is for the replicas only"


def test_ha_alertmanager_config_posts_to_every_replica() -> None:
    """The HA Alertmanager config passes amtool and is the single one with one healer webhook per replica."""
    path = _bind_source("alertmanager", ALERTMANAGER_CONFIG, _ha_env())
    result = subprocess.run([AMTOOL, "check-config", str(path)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    ha = yaml.safe_load(path.read_text())
    single = yaml.safe_load(_bind_source("alertmanager", ALERTMANAGER_CONFIG).read_text())
    assert {key: value for key, value in ha.items() if key != "receivers"} == {
        key: value for key, value in single.items() if key != "receivers"
    }
    assert [r for r in ha["receivers"] if r["name"] != "healer"] == [
        r for r in single["receivers"] if r["name"] != "healer"
    ]
    (template,) = next(r for r in single["receivers"] if r["name"] == "healer")["webhook_configs"]
    hooks = next(r for r in ha["receivers"] if r["name"] == "healer")["webhook_configs"]
    assert [_host_of(hook["url"]) for hook in hooks] == list(HEALER_REPLICAS)
    for hook, replica in zip(hooks, HEALER_REPLICAS, strict=True):
        assert hook == {**template, "url": template["url"].replace("//healer:", f"//{replica}:")}
