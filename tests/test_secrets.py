"""Secrets stay secret, stored files stay private, strategies run as the user they name (issue 12).

A real `healer serve` runs an exec step and an http step that both use `{secret.db_password}`
from a file; the http endpoint echoes every header, the URL and the body back. The secret reaches
the program and the endpoint, and nowhere else: not the store file nor its WAL, healer's log, the
actions API, the console page or `healer test-alert`.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import os
import pwd
import secrets
import signal
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest

from healer.config import ConfigError
from healer.config.loading import parse_config
from healer.config.secrets import MASK
from healer.config.strategy_params import run_as_root_warning
from healer.storage.sqlite.database import SQLiteDatabase
from healer.strategies.exec import ExecRunner
from healer.strategies.runner import AlertContext
from healer.strategies.templating import render_url
from tests.servers import QuietHandler, Server, http_get, http_json, serve_in_thread, start_healer, wait_for
from tests.test_engine_safety import AUTH, alert, config, payload
from tests.test_receiver import post

SHOW = "import os, sys; print('argv', sys.argv[1]); print('env', os.environ['DB_PASSWORD'])"
SYSTEM_PYTHON = "/usr/bin/python3"
PR_GET_PDEATHSIG = 2
WHO_AM_I = (
    "import ctypes, os; libc = ctypes.CDLL(None); death = ctypes.c_int();"
    f" libc.prctl({PR_GET_PDEATHSIG}, ctypes.byref(death), 0, 0, 0);"
    " print(os.getuid(), os.getgid(), death.value, *os.getgroups())"
)
STORE_SUFFIXES = ("", "-wal", "-shm", "-journal", ".lock")


def _secret_config(workdir: Path, echo: str, secret: str) -> dict[str, Any]:
    """Two rules: id="exec" runs `show` (argv and env carry the secret), id="http" runs `call`."""
    settings = config(workdir)
    (workdir / "db_password").write_text(secret + "\n")
    workdir.joinpath("db_password").chmod(0o600)
    settings["secrets"] = {"db_password": {"file": str(workdir / "db_password")}}
    template = settings["healing"]["rules"][0]
    settings["healing"]["rules"] = [
        {**copy.deepcopy(template), "name": name, "match": ['alertname="Broken"', f'id="{name}"'], "strategies": [name]}
        for name in ("show", "call")
    ]
    settings["strategies"] = {
        "show": {
            "type": "exec",
            "timeout": "10s",
            "command": [sys.executable, "-c", SHOW, "--password={secret.db_password}"],
            "env": {"DB_PASSWORD": "{secret.db_password}"},
        },
        "call": {
            "type": "http",
            "timeout": "5s",
            "url": f"http://{echo}/hook?apikey={{secret.db_password}}",
            "headers": {"X-Auth": "{secret.db_password}", "X-Note": "key {secret.db_password}"},
            "body": '{"password": "{secret.db_password}"}',
        },
    }
    return settings


class EchoHandler(QuietHandler):
    """Answers every request with its request line, headers and body, as a careless endpoint might."""

    received: ClassVar[list[str]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers.get("Content-Length", "0"))).decode(errors="replace")
        echoed = f"{self.requestline}\n{self.headers}\n{body}"
        EchoHandler.received.append(echoed)
        self.answer(200, echoed.encode())


def _store_bytes(database: Path) -> bytes:
    return b"".join(
        Path(f"{database}{suffix}").read_bytes() for suffix in ("", "-wal") if Path(f"{database}{suffix}").exists()
    )


def _store_modes(database: Path) -> dict[str, str]:
    return {
        f"{database.name}{suffix}": f"{stat.S_IMODE(os.stat(f'{database}{suffix}').st_mode):04o}"
        for suffix in STORE_SUFFIXES
        if Path(f"{database}{suffix}").exists()
    }


def test_secret_reaches_the_action_and_nothing_else(tmp_path: Path, servers: list[Server]) -> None:
    secret = "pw-" + secrets.token_hex(12)
    echo, address = serve_in_thread(EchoHandler)
    try:
        settings = _secret_config(tmp_path, address, secret)
        healer = start_healer(tmp_path, settings)
        servers.append(healer)
        url = healer.url + "/api/v1/alertmanager"
        assert post(url, payload(alert("show"), alert("call")), AUTH)[0] == 200

        def finished() -> list[dict[str, Any]] | None:
            found: list[dict[str, Any]] = http_json(f"{healer.url}/api/v1/actions?limit=100", headers=AUTH)["actions"]
            # Both must have ended: a running exec step has no output yet to check for the mask.
            return found if len(found) == 2 and all(step.get("finished_at") for step in found) else None

        steps = wait_for(finished, 30, what="both steps finished")
        # The secret reached the endpoint in the URL, both headers and the body: it was filled in.
        assert EchoHandler.received and all(text.count(secret) == 4 for text in EchoHandler.received)

        answers = [json.dumps(steps)]
        for step in steps:
            answers.append(json.dumps(http_json(f"{healer.url}/api/v1/actions/{step['id']}", headers=AUTH)))
        status, console = http_get(healer.url + "/", headers=AUTH)
        assert status == 200
        answers.append(console.decode(errors="replace"))
        every_answer = "\n".join(answers)
        assert secret not in every_answer
        # What the program printed and what the endpoint echoed was kept, masked; plans keep the placeholder.
        assert f"argv --password={MASK}" in every_answer and f"env {MASK}" in every_answer
        assert f"X-Auth: {MASK}" in every_answer
        assert "{secret.db_password}" in every_answer

        database = tmp_path / "healer.db"
        assert secret.encode() not in _store_bytes(database)
        assert set(_store_modes(database).values()) == {"0600"}, _store_modes(database)
        healer.stop()
        assert secret.encode() not in _store_bytes(database)
        assert set(_store_modes(database).values()) == {"0600"}, _store_modes(database)
        assert secret not in healer.log()

        (tmp_path / "payload.json").write_bytes(payload(alert("show"), alert("call")))
        paths = [str(tmp_path / "payload.json")]
        for extra in ([], ["--json"]):
            shown = subprocess.run(
                [sys.executable, "-m", "healer", "test-alert", "-c", str(tmp_path / "healer.yml"), *paths, *extra],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert shown.returncode == 0, shown.stderr
            assert "{secret.db_password}" in shown.stdout
            assert secret not in shown.stdout + shown.stderr
    finally:
        echo.shutdown()
        echo.server_close()


def _parse(tmp_path: Path, secrets_section: Any, strategy: dict[str, Any]) -> None:
    parse_config({"secrets": secrets_section, "strategies": {"fix": strategy}}, "healer.yml")


def test_secret_config_errors_name_the_key(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "empty").write_text("\n")
    (tmp_path / "good").write_text("value\n")
    exec_using = {"type": "exec", "command": ["true", "{secret.token}"]}
    cases = [
        ({"token": {"file": str(tmp_path / "empty")}}, exec_using, "secrets.token: ", "is empty"),
        ({"token": {"file": str(tmp_path / "missing")}}, exec_using, "secrets.token: ", "cannot read file"),
        ({"token": {"env": "HEALER_TEST_UNSET"}}, exec_using, "secrets.token: ", "is empty or unset"),
        (
            {"token": {"file": str(tmp_path / "good"), "env": "X"}},
            exec_using,
            "secrets.token: ",
            "exactly one of file or env",
        ),
        ({"other": {"file": str(tmp_path / "good")}}, exec_using, "strategies.fix.command[1]: ", "unknown secret"),
        (
            {"token": {"file": str(tmp_path / "good")}},
            {"type": "systemd", "unit": "x.service", "description": "{secret.token}"},
            "strategies.fix.description: ",
            "filled in only in",
        ),
        (
            {},
            {"type": "exec", "command": ["true"], "user": "no-such-user-here"},
            "strategies.fix.user: ",
            "unknown user",
        ),
        ({}, {"type": "exec", "command": ["true"], "group": "no-such-group-here"}, "strategies.fix.group: ", "unknown"),
    ]
    monkeypatch.delenv("HEALER_TEST_UNSET", raising=False)
    for section, strategy, key, message in cases:
        with pytest.raises(ConfigError) as caught:
            _parse(tmp_path, section, strategy)
        assert any(key in line and message in line for line in caught.value.errors), (key, caught.value.errors)
        assert "value\n" not in str(caught.value)


def test_a_label_cannot_pull_a_secret_in(tmp_path: Path) -> None:
    """Labels and secrets are filled in one pass: a label that reads `{secret.X}` stays that text."""
    (tmp_path / "s").write_text("hunter2")
    config_ = parse_config(
        {
            "secrets": {"s": {"file": str(tmp_path / "s")}},
            "strategies": {
                "fix": {"type": "http", "url": "http://h/{labels.x}?k={secret.s}", "allow_labels": {"x": ".*"}}
            },
        }
    )
    params = config_.strategies["fix"]
    context = AlertContext({"x": "{secret.s}"}, {}, "f", "2026-01-01T00:00:00Z", "firing")
    assert render_url("http://h/{labels.x}?k={secret.s}", params, context) == "http://h/%7Bsecret.s%7D?k={secret.s}"
    filled = render_url("http://h/{labels.x}?k={secret.s}", params, context, params.secret_values())
    assert filled == "http://h/%7Bsecret.s%7D?k=hunter2"


@pytest.mark.skipif(os.geteuid() != 0, reason="running as another user needs root; this test runs unprivileged")
@pytest.mark.skipif(not Path(SYSTEM_PYTHON).exists(), reason=f"needs {SYSTEM_PYTHON}, which nobody may run")
def test_exec_runs_as_the_user_it_names(tmp_path: Path) -> None:
    nobody = pwd.getpwnam("nobody")
    settings = parse_config(
        {
            "strategies": {
                "fix": {
                    "type": "exec",
                    "user": "nobody",
                    # Not healer's Python: nobody may not read the checkout it lives in.
                    "command": [SYSTEM_PYTHON, "-c", WHO_AM_I],
                }
            }
        }
    )
    context = AlertContext({"alertname": "A"}, {}, "f", "2026-01-01T00:00:00Z", "firing")
    runner = ExecRunner()
    assert runner.plan(settings.strategies["fix"], context)["user"] == "nobody"
    result = asyncio.run(runner.run(settings.strategies["fix"], context))
    assert result.ok, result
    uid, gid, death_signal, *groups = (int(number) for number in result.output.split())
    assert (uid, gid) == (nobody.pw_uid, nobody.pw_gid)
    assert 0 not in groups
    # Asked for after the switch to nobody, the parent-death signal survived it (Linux clears it on a change).
    assert death_signal == signal.SIGKILL


def test_store_files_made_private_with_a_warning(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    database = tmp_path / "healer.db"
    fresh = SQLiteDatabase(database)
    asyncio.run(fresh.close())
    assert set(_store_modes(database).values()) == {"0600"}
    for suffix in STORE_SUFFIXES:
        path = Path(f"{database}{suffix}")
        path.touch()
        path.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="healer.storage.sqlite.database"):
        reopened = SQLiteDatabase(database)
    try:
        assert set(_store_modes(database).values()) == {"0600"}
        assert sum("store file was open to other users" in record.getMessage() for record in caplog.records) == 5
    finally:
        asyncio.run(reopened.close())


def test_one_warning_when_root_runs_exec_strategies_without_a_user() -> None:
    strategies = parse_config(
        {
            "strategies": {
                "a": {"type": "exec", "command": ["true"]},
                "b": {"type": "exec", "command": ["true"]},
                "named": {"type": "exec", "command": ["true"], "user": "nobody"},
            }
        }
    ).strategies
    warning = run_as_root_warning(strategies, euid=0)
    assert warning is not None and "signal strategies a, b have no user" in warning and "named" not in warning
    assert run_as_root_warning(strategies, euid=1000) is None
    assert run_as_root_warning({"named": strategies["named"]}, euid=0) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="healer warns only when it runs as root")
def test_serve_as_root_warns_once_about_strategies_without_a_user(tmp_path: Path, servers: list[Server]) -> None:
    """`healer serve` as root logs one warning naming the exec strategies that would run as root."""
    healer = start_healer(tmp_path, config(tmp_path))
    servers.append(healer)
    warnings = [json.loads(line) for line in healer.log().splitlines() if "strategies run as root" in line]
    assert len(warnings) == 1 and "record" in warnings[0]["warning"], healer.log()
