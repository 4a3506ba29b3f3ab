"""Config loading: valid files load, every class of fault names its key path and its file."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from healer.config import ConfigError, ParamsCatalog, StrategyParams, load_config, parse_config
from healer.durations import InvalidDurationError, format_duration, parse_duration

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "healer.yml"


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "healer", "check-config", str(path)], capture_output=True, text=True, timeout=60
    )


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "healer.yml"
    path.write_text(text)
    return path


RULES_WITH_BAD_COOLDOWN = """
strategies:
  noop: {type: exec, command: ['true']}
healing:
  rules:
    - {name: a, match: ['alertname="A"'], strategies: [noop]}
    - {name: b, match: ['alertname="B"'], strategies: [noop]}
    - {name: c, match: ['alertname="C"'], strategies: [noop], cooldown: 5x}
"""


def test_example_config_is_valid() -> None:
    """The shipped example config passes `healer check-config` with exit code 0."""
    result = check_config(EXAMPLE)
    assert result.returncode == 0, result.stderr
    assert "OK" in result.stdout


@pytest.mark.parametrize(
    ("text", "key"),
    [
        pytest.param("server:\n  listen: 127.0.0.1:9877\n  colour: blue\n", "server.colour", id="unknown-key"),
        pytest.param("healing:\n  max_concurrent: many\n", "healing.max_concurrent", id="wrong-type"),
        pytest.param(RULES_WITH_BAD_COOLDOWN, "healing.rules[2].cooldown", id="bad-duration"),
        pytest.param(
            "exporter:\n  processes:\n    - {name: web, cmdline: 'demo_app('}\n",
            "exporter.processes[0].cmdline",
            id="bad-regex",
        ),
        pytest.param(
            "strategies:\n  restart:\n    type: exec\n    command: [systemctl, restart, 'x-{labels.service}']\n",
            "strategies.restart.command[2]",
            id="partial-template",
        ),
        pytest.param(
            "healing:\n  rules:\n    - {name: a, match: ['alertname=\"A\"'], strategies: [missing]}\n",
            "healing.rules[0].strategies[0]",
            id="undefined-strategy",
        ),
        pytest.param(
            "healing:\n  rules:\n    - {name: a, match: ['alertname~A'], strategies: [x]}\n",
            "healing.rules[0].match[0]",
            id="bad-matcher",
        ),
        pytest.param("strategies:\n  x: {type: teleport}\n", "strategies.x.type", id="unknown-strategy-type"),
    ],
)
def test_check_config_names_key_and_file(tmp_path: Path, text: str, key: str) -> None:
    """Each class of config fault exits 1 with a line naming the file and the key path."""
    path = write(tmp_path, text)
    result = check_config(path)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert any(line.startswith(f"{path}: {key}") for line in lines), result.stderr


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    """A config path that does not exist exits 1 and names the file."""
    result = check_config(tmp_path / "nope.yml")
    assert result.returncode == 1
    assert f"{tmp_path / 'nope.yml'}: file not found" in result.stderr


def test_invalid_yaml_names_line(tmp_path: Path) -> None:
    """Broken YAML exits 1 and says on which line."""
    result = check_config(write(tmp_path, "server:\n  listen: [\n"))
    assert result.returncode == 1
    assert "line" in result.stderr and "invalid YAML" in result.stderr


def test_every_error_on_its_own_line(tmp_path: Path) -> None:
    """Several faults in one file are all reported, one line each."""
    text = "server:\n  colour: blue\nhealing:\n  max_concurrent: many\nprometheus:\n  timeout: 5\n"
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text))
    keys = [line.split(": ")[1] for line in caught.value.errors]
    assert sorted(keys) == ["healing.max_concurrent", "prometheus.timeout", "server.colour"]


def test_bare_number_duration_refused() -> None:
    """A duration without a unit is refused, because `5` could mean seconds or minutes."""
    with pytest.raises(ConfigError, match=r"prometheus\.timeout: invalid duration 5"):
        parse_config({"prometheus": {"timeout": 5}})


def test_process_needs_exactly_one_selector() -> None:
    """A watched process names either a regex or a pidfile, not both and not neither."""
    with pytest.raises(ConfigError, match=r"exporter\.processes\[0\]: .*exactly one"):
        parse_config({"exporter": {"processes": [{"name": "web"}]}})


def test_duplicate_probe_names_refused() -> None:
    """Two probes with one name would share series, so the second is refused."""
    probe = {"name": "web", "url": "http://127.0.0.1:1/"}
    with pytest.raises(ConfigError, match="probe name 'web' is used twice"):
        parse_config({"exporter": {"probes": [probe, probe]}})


def test_token_is_never_in_repr(tmp_path: Path) -> None:
    """The bearer token read from a file is a secret that does not show in reprs or logs."""
    token_file = tmp_path / "token"
    token_file.write_text("s3cret-token\n")
    config = parse_config({"server": {"auth": {"bearer_token_file": str(token_file)}}})
    token = config.server.auth.resolve_token(environ={})
    assert token is not None and token.get_secret_value() == "s3cret-token"
    assert "s3cret" not in repr(token) and "s3cret" not in repr(config)


def test_environment_token_overrides_file(tmp_path: Path) -> None:
    """HEALER_TOKEN takes precedence over server.auth.bearer_token_file."""
    token_file = tmp_path / "token"
    token_file.write_text("from-file")
    config = parse_config({"server": {"auth": {"bearer_token_file": str(token_file)}}})
    token = config.server.auth.resolve_token(environ={"HEALER_TOKEN": "from-env"})
    assert token is not None and token.get_secret_value() == "from-env"


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("500ms", 0.5), ("30s", 30), ("5m", 300), ("1h", 3600), ("1h30m", 5400), ("2d", 172800), ("0s", 0)],
)
def test_parse_duration(text: str, seconds: float) -> None:
    """Prometheus duration strings parse to seconds."""
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5", "5x", "1m1h", "-5s", "1.5s", "s"])
def test_parse_duration_rejects(text: str) -> None:
    """Strings that are not Prometheus durations are refused."""
    with pytest.raises(InvalidDurationError):
        parse_duration(text)


@given(st.integers(min_value=1, max_value=10**12))
def test_duration_round_trip(millis: int) -> None:
    """Formatting a whole number of milliseconds and parsing it back gives the same value."""
    assert round(parse_duration(format_duration(millis / 1000)) * 1000) == millis


def test_literal_braces_are_not_templates() -> None:
    """find's `{}` is a literal argument; only `{labels.X}` placeholders are templates."""
    config = parse_config(
        {"strategies": {"purge": {"type": "exec", "command": ["find", "/x", "-exec", "rm", "{}", "+"]}}}
    )
    assert config.strategies["purge"].command[4] == "{}"  # type: ignore[attr-defined]


def test_ladder_order_is_config_or_learned() -> None:
    """`order` takes config or learned; any other word is refused at its key."""

    def rule_with(order: str) -> dict[str, object]:
        return {
            "strategies": {"x": {"type": "exec", "command": ["true"]}},
            "healing": {"rules": [{"name": "a", "match": ['alertname="A"'], "strategies": ["x"], "order": order}]},
        }

    assert parse_config(rule_with("learned")).healing.rules[0].order == "learned"
    with pytest.raises(ConfigError, match=r"healing\.rules\[0\]\.order: Input should be 'config' or 'learned'"):
        parse_config(rule_with("random"))


@pytest.mark.parametrize("key", ["process_scan_interval"])
def test_zero_interval_refused(key: str) -> None:
    """An interval of 0s would spin a loop, so it is refused."""
    with pytest.raises(ConfigError, match=rf"exporter\.{key}: .*longer than 0s"):
        parse_config({"exporter": {key: "0s"}})


def test_partial_filter_sections_keep_defaults() -> None:
    """An empty `disks:` section keeps the default exclusion rather than demanding one."""
    config = parse_config({"exporter": {"disks": {}, "network": {}}})
    assert "loop" in config.exporter.disks.exclude


def test_empty_token_counts_as_none(tmp_path: Path) -> None:
    """A blank token file or variable is no token, so a public listen address stays refused."""
    (tmp_path / "token").write_text("  \n")
    config = parse_config({"server": {"auth": {"bearer_token_file": str(tmp_path / "token")}}})
    assert config.server.auth.resolve_token(environ={"HEALER_TOKEN": " "}) is None


def test_strategies_validate_against_the_given_catalog() -> None:
    """parse_config validates `strategies:` against the parameter models of the catalog it is given."""

    class PageParams(StrategyParams):
        pager: str

    catalog = ParamsCatalog({"page": PageParams})
    config = parse_config({"strategies": {"p": {"type": "page", "pager": "ops"}}}, registry=catalog)
    assert config.strategies["p"] == PageParams(type="page", pager="ops")
    with pytest.raises(ConfigError) as error:
        parse_config({"strategies": {"e": {"type": "exec"}, "p": {"type": "page"}}}, registry=catalog)
    assert error.value.errors == [
        "<config>: strategies.e.type: unknown strategy type 'exec'; known types: page",
        "<config>: strategies.p.pager: Field required",
    ]
