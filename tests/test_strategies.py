"""Strategy runners against real processes, files, HTTP servers and signals; no mocks."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import psutil
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from healer.config import ConfigError, parse_config
from healer.config.strategy_params import run_as_root_warning
from healer.strategies.base import StrategyParams
from healer.strategies.builtin import (
    BUILTIN_TYPES,
    ExecParams,
    ExecRunner,
    HttpParams,
    HttpRunner,
    SignalParams,
    SignalRunner,
    SystemdParams,
    SystemdRunner,
    default_registry,
)
from healer.strategies.runner import AlertContext, StepResult, StrategyRunner, UnsafeLabelError
from healer.strategies.templating import MAX_VALUE_LENGTH, render, render_body, render_url

PY = sys.executable
PLUGIN_DIR = Path(__file__).resolve().parent / "plugin_fixture"
AiohttpServer = Callable[[web.Application], Awaitable[TestServer]]

WRITE_ARGV = "import json, sys; open(sys.argv[1], 'w').write(json.dumps(sys.argv[2:]))"

# A child that starts a grandchild (which may ignore SIGTERM), waits until the grandchild has
# written its pid, writes its own pid, says so on stdout and sleeps.
GRANDCHILD = (
    "import os, signal, sys, time\n"
    "if sys.argv[2] == 'ignore-term': signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
    "open(sys.argv[1] + '.tmp', 'w').write(str(os.getpid()))\n"
    "os.rename(sys.argv[1] + '.tmp', sys.argv[1])\n"
    "time.sleep(120)\n"
)
CHILD = (
    "import os, subprocess, sys, time\n"
    "directory, mode = sys.argv[1], sys.argv[2]\n"
    f"subprocess.Popen([sys.executable, '-c', {GRANDCHILD!r}, directory + '/grandchild', mode])\n"
    "while not os.path.exists(directory + '/grandchild'): time.sleep(0.01)\n"
    "open(directory + '/child.tmp', 'w').write(str(os.getpid()))\n"
    "os.rename(directory + '/child.tmp', directory + '/child')\n"
    "print('child started', flush=True)\n"
    "time.sleep(120)\n"
)


def alert(labels: Mapping[str, str] | None = None, annotations: Mapping[str, str] | None = None) -> AlertContext:
    """A firing alert named Test with the given labels."""
    return AlertContext(
        labels={"alertname": "Test", **(labels or {})},
        annotations=dict(annotations or {}),
        fingerprint="0123456789abcdef",
        starts_at="2024-05-01T12:00:00Z",
        status="firing",
    )


def exec_params(**spec: Any) -> ExecParams:
    """ExecParams validated from a config-like mapping."""
    return ExecParams.model_validate({"type": "exec", **spec})


def gone(pid: int) -> bool:
    """True when the pid no longer runs (a zombie awaiting its reaper counts as gone)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def eventually(condition: Callable[[], bool], timeout: float = 5.0) -> bool:
    """Poll a condition until it holds or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.02)
    return True


def read_pid(path: Path) -> int:
    """The pid a test process wrote to `path`."""
    return int(path.read_text())


@pytest.fixture
def reap_pids() -> Iterator[list[int]]:
    """Pids a test saw; any still alive afterwards are killed one by one."""
    pids: list[int] = []
    yield pids
    for pid in pids:
        if not gone(pid):
            os.kill(pid, signal.SIGKILL)


# --- exec ---------------------------------------------------------------------------------------


async def test_exec_label_is_one_whole_argv_element(tmp_path: Path) -> None:
    """A label placeholder becomes exactly one argv element of the program, unchanged."""
    out = tmp_path / "argv.json"
    params = exec_params(command=[PY, "-c", WRITE_ARGV, str(out), "{labels.service}", "literal"])
    result = await ExecRunner().run(params, alert({"service": "web-1"}))
    assert result == StepResult(ok=True, detail="exit 0", output="", exit_code=0)
    assert json.loads(out.read_text()) == ["web-1", "literal"]


async def test_exec_env_from_labels_and_minimal_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The program sees rendered env values, HEALER_* alert vars, PATH, and not healer's other env."""
    monkeypatch.setenv("HEALER_TEST_LEAK", "must-not-leak")
    script = "import json, os; print(json.dumps(dict(os.environ)))"
    params = exec_params(command=[PY, "-c", script], env={"SERVICE": "{labels.service}", "MODE": "fast"})
    result = await ExecRunner().run(params, alert({"service": "api"}))
    assert result.ok, result
    env = json.loads(result.output)
    assert env["SERVICE"] == "api"
    assert env["MODE"] == "fast"
    assert env["HEALER_ALERTNAME"] == "Test"
    assert env["HEALER_FINGERPRINT"] == "0123456789abcdef"
    assert env["HEALER_STATUS"] == "firing"
    assert env["PATH"] == os.environ["PATH"]
    assert "HEALER_TEST_LEAK" not in env


async def test_exec_runs_in_cwd(tmp_path: Path) -> None:
    """The program starts in the configured working directory."""
    params = exec_params(command=[PY, "-c", "import os; print(os.getcwd())"], cwd=str(tmp_path))
    result = await ExecRunner().run(params, alert())
    assert result.output.strip() == str(tmp_path)


async def test_exec_missing_cwd_is_a_failed_step(tmp_path: Path) -> None:
    """A working directory that does not exist gives ok=False with a clear detail."""
    missing = tmp_path / "nope"
    result = await ExecRunner().run(exec_params(command=[PY, "-V"], cwd=str(missing)), alert())
    assert not result.ok
    assert result.detail.startswith(f"cannot use working directory {missing}")


async def test_exec_output_is_truncated_while_the_pipe_is_drained() -> None:
    """1 MB of output keeps only output_limit_bytes plus a marker, and the program is not blocked."""
    script = "import sys; sys.stdout.buffer.write(b'x' * 1_000_000); sys.stderr.write('tail')"
    params = exec_params(command=[PY, "-c", script], output_limit_bytes=1000, timeout="20s")
    result = await ExecRunner().run(params, alert())
    assert result.ok and not result.timed_out
    marker = "…[truncated 999004 bytes]"
    assert result.output == "x" * 1000 + marker
    assert len(result.output) <= 1000 + len(marker)


async def test_exec_stderr_is_captured_and_nonzero_exit_fails() -> None:
    """A non-zero exit is ok=False with the exit code, and stderr is in the output."""
    script = "import sys; print('to stdout', flush=True); sys.stderr.write('boom'); sys.exit(3)"
    result = await ExecRunner().run(exec_params(command=[PY, "-c", script]), alert())
    assert not result.ok
    assert result.detail == "exit 3"
    assert result.exit_code == 3
    assert result.output == "to stdout\nboom"


async def test_exec_missing_executable_is_a_failed_step() -> None:
    """A program that is not on PATH gives ok=False and a clear detail, not an exception."""
    result = await ExecRunner().run(exec_params(command=["healer-no-such-program", "x"]), alert())
    assert result == StepResult(ok=False, detail="executable not found: healer-no-such-program")


async def test_exec_killed_by_signal_is_reported() -> None:
    """A program killed by a signal reports which one."""
    script = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    result = await ExecRunner().run(exec_params(command=[PY, "-c", script]), alert())
    assert not result.ok
    assert result.detail == "killed by SIGKILL"
    assert result.exit_code == -signal.SIGKILL


async def test_exec_timeout_kills_the_whole_process_group(tmp_path: Path, reap_pids: list[int]) -> None:
    """On timeout the child and a grandchild that ignores SIGTERM are both killed (SIGKILL after 2s)."""
    params = exec_params(command=[PY, "-c", CHILD, str(tmp_path), "ignore-term"], timeout="3s")
    started = time.monotonic()
    result = await ExecRunner().run(params, alert())
    elapsed = time.monotonic() - started
    child, grandchild = read_pid(tmp_path / "child"), read_pid(tmp_path / "grandchild")
    reap_pids.extend([child, grandchild])
    assert result.timed_out and not result.ok
    assert result.detail == "timed out after 3s"
    assert "child started" in result.output
    assert await eventually(lambda: gone(child) and gone(grandchild))
    assert 4.5 <= elapsed < 10, elapsed  # 3s timeout + 2s grace for the SIGTERM-ignoring grandchild


async def test_exec_cancellation_kills_the_whole_process_group(tmp_path: Path, reap_pids: list[int]) -> None:
    """Cancelling the task that runs a step kills its process group and re-raises CancelledError."""
    params = exec_params(command=[PY, "-c", CHILD, str(tmp_path), "default"], timeout="60s")
    task = asyncio.create_task(ExecRunner().run(params, alert()))
    assert await eventually(lambda: (tmp_path / "child").exists(), timeout=15)
    child, grandchild = read_pid(tmp_path / "child"), read_pid(tmp_path / "grandchild")
    reap_pids.extend([child, grandchild])
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await eventually(lambda: gone(child) and gone(grandchild))


HOSTILE = [
    pytest.param("; touch {marker}", id="semicolon"),
    pytest.param("$(touch {marker})", id="command-substitution"),
    pytest.param("`touch {marker}`", id="backticks"),
    pytest.param("web\ntouch {marker}", id="newline"),
    pytest.param("../etc", id="dot-dot"),
    pytest.param("-rf", id="leading-dash"),
    pytest.param("a" * 100_000, id="100kB"),
]


@pytest.mark.parametrize("template", HOSTILE)
async def test_hostile_labels_are_refused_before_anything_runs(tmp_path: Path, template: str) -> None:
    """With the default allow pattern a hostile label raises UnsafeLabelError and nothing runs."""
    marker, ran = tmp_path / "marker", tmp_path / "ran"
    value = template.format(marker=marker) if len(template) < 1000 else template
    params = exec_params(command=[PY, "-c", WRITE_ARGV, str(ran), "{labels.service}"])
    with pytest.raises(UnsafeLabelError) as planned:
        ExecRunner().plan(params, alert({"service": value}))
    with pytest.raises(UnsafeLabelError) as ran_error:
        await ExecRunner().run(params, alert({"service": value}))
    assert ran_error.value.label == "service"
    assert str(ran_error.value).startswith("label 'service' value ")
    assert len(str(planned.value)) < 300  # a 100 kB value is not echoed back
    await asyncio.sleep(0.2)
    assert not ran.exists()
    assert not marker.exists()


def test_unsafe_label_message_names_label_value_and_pattern() -> None:
    """The error says which label, which value and which pattern."""
    params = exec_params(command=["x", "{labels.service}"], allow_labels={"service": "^[a-z0-9-]+$"})
    with pytest.raises(UnsafeLabelError) as error:
        render("{labels.service}", params, alert({"service": "; touch /tmp/x"}))
    assert str(error.value) == "label 'service' value '; touch /tmp/x' does not match ^[a-z0-9-]+$"
    assert error.value.label == "service"
    assert error.value.reason == "value '; touch /tmp/x' does not match ^[a-z0-9-]+$"


def test_missing_label_is_unsafe() -> None:
    """A placeholder whose label the alert lacks is an error, not an empty string."""
    params = exec_params(command=["x", "{labels.service}"])
    with pytest.raises(UnsafeLabelError, match="label 'service' is missing from the alert"):
        ExecRunner().plan(params, alert())


@pytest.mark.parametrize(
    "value",
    [
        pytest.param("ok\nsecond line", id="newline"),
        pytest.param("a\x00b", id="nul"),
        pytest.param("a" * (MAX_VALUE_LENGTH + 1), id="too-long"),
    ],
)
def test_length_and_control_characters_are_refused_even_with_a_permissive_pattern(value: str) -> None:
    """Even `.*` cannot admit a value over 1024 characters or one with NUL or newline."""
    params = exec_params(command=["x", "{labels.service}"], allow_labels={"service": "(?s).*"})
    with pytest.raises(UnsafeLabelError):
        render("{labels.service}", params, alert({"service": value}))


async def test_permissive_pattern_passes_shell_syntax_as_a_literal_argument(tmp_path: Path) -> None:
    """With allow pattern `.*`, `$(touch MARKER)` reaches argv verbatim and no shell ever runs it."""
    marker, out = tmp_path / "marker", tmp_path / "argv.json"
    value = f"$(touch {marker}); `touch {marker}` && touch {marker}"
    params = exec_params(
        command=[PY, "-c", WRITE_ARGV, str(out), "{labels.service}"],
        env={"SERVICE": "{labels.service}"},
        allow_labels={"service": ".*"},
    )
    result = await ExecRunner().run(params, alert({"service": value}))
    assert result.ok, result
    assert json.loads(out.read_text()) == [value]
    assert not marker.exists()


async def test_annotations_use_their_own_allow_key(tmp_path: Path) -> None:
    """An annotation placeholder is checked against `allow_labels['annotations.NAME']`."""
    script = "import os; print(os.environ['SUMMARY'])"
    spec = {"command": [PY, "-c", script], "env": {"SUMMARY": "{annotations.summary}"}}
    summary = {"summary": "Memory of web is high"}
    with pytest.raises(UnsafeLabelError) as error:
        ExecRunner().plan(exec_params(**spec), alert(annotations=summary))
    assert error.value.label == "annotations.summary"
    assert str(error.value).startswith("annotation 'summary' value ")
    allowed = exec_params(**spec, allow_labels={"annotations.summary": "^[ -~]+$"})
    result = await ExecRunner().run(allowed, alert(annotations=summary))
    assert result.output.strip() == "Memory of web is high"


def test_exec_plan_shows_argv_env_and_cwd(tmp_path: Path) -> None:
    """plan() renders argv and env without running anything."""
    params = exec_params(
        command=["restart-service", "{labels.service}"],
        env={"TARGET": "{labels.service}"},
        cwd=str(tmp_path),
        timeout="30s",
    )
    assert ExecRunner().plan(params, alert({"service": "web"})) == {
        "argv": ["restart-service", "web"],
        "env": {
            "TARGET": "web",
            "HEALER_ALERTNAME": "Test",
            "HEALER_FINGERPRINT": "0123456789abcdef",
            "HEALER_STATUS": "firing",
        },
        "inherited_env": ["PATH", "LANG"],
        "cwd": str(tmp_path),
        "timeout": 30.0,
    }


# --- http ---------------------------------------------------------------------------------------


class Recorder:
    """A real aiohttp app that records what it receives."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.app = web.Application()
        self.app.router.add_route("*", "/restart/{service}", self.restart)
        self.app.router.add_get("/fail", self.fail)
        self.app.router.add_get("/slow", self.slow)
        self.app.router.add_get("/big", self.big)

    async def restart(self, request: web.Request) -> web.Response:
        self.requests.append(
            {
                "method": request.method,
                "raw_path": request.raw_path,
                "service": request.match_info["service"],
                "query": dict(request.query),
                "headers": dict(request.headers),
                "body": await request.text(),
            }
        )
        return web.Response(text="restarted")

    async def fail(self, request: web.Request) -> web.Response:
        return web.Response(status=500, text="broken")

    async def slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(10)
        return web.Response(text="late")

    async def big(self, request: web.Request) -> web.Response:
        return web.Response(body=b"y" * 200_000)


@pytest.fixture
async def recorder(aiohttp_server: AiohttpServer) -> tuple[Recorder, str]:
    """A started Recorder and its base URL."""
    rec = Recorder()
    server = await aiohttp_server(rec.app)
    return rec, str(server.make_url("")).rstrip("/")


def http_params(**spec: Any) -> HttpParams:
    """HttpParams validated from a config-like mapping."""
    return HttpParams.model_validate({"type": "http", **spec})


async def test_http_expected_status_is_ok(recorder: tuple[Recorder, str]) -> None:
    """A 2xx answer is ok; the server sees the rendered URL, headers and JSON-escaped body."""
    rec, base = recorder
    params = http_params(
        url=f"{base}/restart/{{labels.service}}",
        headers={"X-Service": "{labels.service}"},
        body='{"service": "{labels.service}", "summary": "{annotations.summary}"}',
        allow_labels={"annotations.summary": "^[ -~]+$"},
    )
    summary = 'say "hi" \\ there'
    result = await HttpRunner().run(params, alert({"service": "web"}, {"summary": summary}))
    assert result == StepResult(ok=True, detail="HTTP 200", output="restarted")
    [seen] = rec.requests
    assert seen["method"] == "POST"
    assert seen["raw_path"] == "/restart/web"
    assert seen["headers"]["X-Service"] == "web"
    assert seen["headers"]["Content-Type"] == "application/json"
    assert json.loads(seen["body"]) == {"service": "web", "summary": summary}


async def test_http_unexpected_status_is_not_ok(recorder: tuple[Recorder, str]) -> None:
    """A 500 answer is ok=False, with the status in the detail and the body in the output."""
    _, base = recorder
    result = await HttpRunner().run(http_params(method="GET", url=f"{base}/fail"), alert())
    assert result == StepResult(ok=False, detail="HTTP 500", output="broken")


async def test_http_expected_status_can_be_configured(recorder: tuple[Recorder, str]) -> None:
    """A status listed in expected_status is ok even when it is not 2xx."""
    _, base = recorder
    params = http_params(method="GET", url=f"{base}/fail", expected_status=[500])
    assert (await HttpRunner().run(params, alert())).ok


async def test_http_url_placeholder_is_percent_encoded(recorder: tuple[Recorder, str]) -> None:
    """A label in the URL is percent-encoded: it stays one path segment or one query value."""
    rec, base = recorder
    value = "a/b c?d=1&e#f"
    params = http_params(
        url=f"{base}/restart/{{labels.service}}?who={{labels.service}}&x=1",
        allow_labels={"service": ".*"},
    )
    result = await HttpRunner().run(params, alert({"service": value}))
    assert result.ok, result
    [seen] = rec.requests
    # '=' and '&' are legal inside a path segment, so the URL library may leave them unescaped.
    assert seen["raw_path"].startswith("/restart/a%2Fb%20c%3Fd")
    assert seen["service"] == value
    assert seen["query"] == {"who": value, "x": "1"}


@pytest.mark.parametrize("value", [".", ".."])
def test_http_url_refuses_dot_segments(value: str) -> None:
    """`.` and `..` are refused in a URL because normalisation would make them path traversal."""
    params = http_params(url="http://127.0.0.1/restart/{labels.service}", allow_labels={"service": ".*"})
    with pytest.raises(UnsafeLabelError, match="relative path segment"):
        render_url(params.url, params, alert({"service": value}))


def test_http_url_and_body_refuse_hostile_labels_with_default_pattern() -> None:
    """URL and body placeholders go through the same allowlist as argv elements."""
    params = http_params(url="http://127.0.0.1/restart/{labels.service}", body='"{labels.service}"')
    hostile = alert({"service": "x;$(id)"})
    with pytest.raises(UnsafeLabelError):
        render_url(params.url, params, hostile)
    with pytest.raises(UnsafeLabelError):
        render_body('"{labels.service}"', params, hostile)


async def test_http_timeout(recorder: tuple[Recorder, str]) -> None:
    """A server slower than the timeout gives timed_out=True and ok=False."""
    _, base = recorder
    params = http_params(method="GET", url=f"{base}/slow", timeout="300ms")
    started = time.monotonic()
    result = await HttpRunner().run(params, alert())
    assert result.timed_out and not result.ok
    assert result.detail == "timed out after 300ms"
    assert time.monotonic() - started < 5


async def test_http_body_is_truncated(recorder: tuple[Recorder, str]) -> None:
    """A response body is kept up to 64 KiB with a truncation marker."""
    _, base = recorder
    result = await HttpRunner().run(http_params(method="GET", url=f"{base}/big"), alert())
    assert result.ok
    assert result.output == "y" * 65536 + f"…[truncated {200_000 - 65536} bytes]"


async def test_http_connection_refused_is_a_failed_step() -> None:
    """A closed port gives ok=False with a connection detail, not an exception."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = await HttpRunner().run(http_params(url=f"http://127.0.0.1:{port}/x"), alert())
    assert not result.ok
    assert result.detail.startswith("connection failed: ")
    assert "\n" not in result.detail


def test_http_plan_shows_request_and_redacts_credentials() -> None:
    """plan() shows method, URL, headers and body, hiding credential header values."""
    params = http_params(
        method="PUT",
        url="http://127.0.0.1:8000/restart/{labels.service}",
        headers={"Authorization": "Bearer s3cret", "X-Service": "{labels.service}"},
        body='{"service": "{labels.service}"}',
        timeout="5s",
    )
    assert HttpRunner().plan(params, alert({"service": "web"})) == {
        "method": "PUT",
        "url": "http://127.0.0.1:8000/restart/web",
        "headers": {
            "Authorization": "<redacted>",
            "X-Service": "web",
            "Content-Type": "application/json",
        },
        "body": '{"service": "web"}',
        "timeout": 5.0,
        "expected_status": ["200..299"],
    }


# --- signal -------------------------------------------------------------------------------------

SIGHUP_LISTENER = (
    "import signal, sys, time\n"
    "def hup(signum, frame):\n"
    "    open(sys.argv[1], 'a').write('hup\\n')\n"
    "signal.signal(signal.SIGHUP, hup)\n"
    "print('ready', flush=True)\n"
    "time.sleep(60)\n"
)


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[str], Path, str]]:
    """A real process with a SIGHUP handler that appends to a file; its cmdline has a unique token."""
    token = f"healer-signal-test-{uuid.uuid4().hex}"
    got = tmp_path / "got-hup"
    proc = subprocess.Popen([PY, "-c", SIGHUP_LISTENER, str(got), token], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    yield proc, got, token
    proc.kill()
    proc.wait(timeout=10)


async def test_signal_by_pidfile(tmp_path: Path, listener: tuple[subprocess.Popen[str], Path, str]) -> None:
    """The process named in a pidfile receives the signal."""
    proc, got, _ = listener
    pidfile = tmp_path / "app.pid"
    pidfile.write_text(f"{proc.pid}\n")
    params = SignalParams.model_validate({"type": "signal", "signal": "HUP", "pidfile": str(pidfile)})
    result = await SignalRunner().run(params, alert())
    assert result == StepResult(ok=True, detail=f"SIGHUP sent to 1 process ({proc.pid})")
    assert await eventually(lambda: got.exists() and got.read_text() == "hup\n")


async def test_signal_by_cmdline_regex(listener: tuple[subprocess.Popen[str], Path, str]) -> None:
    """Processes whose command line matches the regex receive the signal; healer itself does not."""
    proc, got, token = listener
    params = SignalParams.model_validate({"type": "signal", "cmdline": f" {token}$"})
    assert SignalRunner().plan(params, alert()) == {
        "signal": "SIGHUP",
        "target": f"cmdline regex ' {token}$'",
        "pids": [proc.pid],
    }
    result = await SignalRunner().run(params, alert())
    assert result == StepResult(ok=True, detail=f"SIGHUP sent to 1 process ({proc.pid})")
    assert await eventually(lambda: got.exists() and got.read_text() == "hup\n")


async def test_signal_without_a_match_fails() -> None:
    """No matching process is ok=False, saying what did not match."""
    pattern = f"healer-no-such-process-{uuid.uuid4().hex}"
    params = SignalParams.model_validate({"type": "signal", "cmdline": pattern})
    result = await SignalRunner().run(params, alert())
    assert result == StepResult(ok=False, detail=f"no process matches cmdline regex {pattern!r}")


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        pytest.param(None, "not found", id="missing"),
        pytest.param("0", "does not hold a positive pid", id="zero"),
        pytest.param("-1", "does not hold a positive pid", id="negative"),
        pytest.param("self", "names healer itself", id="self"),
    ],
)
async def test_signal_pidfile_problems_fail_safely(tmp_path: Path, content: str | None, problem: str) -> None:
    """A missing pidfile, pid 0 or below, or healer's own pid sends nothing and is ok=False."""
    pidfile = tmp_path / "app.pid"
    if content is not None:
        pidfile.write_text(str(os.getpid()) if content == "self" else content)
    params = SignalParams.model_validate({"type": "signal", "pidfile": str(pidfile)})
    result = await SignalRunner().run(params, alert())
    assert not result.ok
    assert problem in result.detail


needs_root = pytest.mark.skipif(os.geteuid() != 0, reason="sending a signal as another user needs root")


@needs_root
async def test_signal_as_nobody_cannot_reach_a_root_process(
    tmp_path: Path, listener: tuple[subprocess.Popen[str], Path, str]
) -> None:
    """With `user: nobody` a root-owned process is not signalled: the step fails saying the kernel denied nobody,
    and the process lives on (a signal sent as healer still reaches it, once)."""
    proc, got, _ = listener
    pidfile = tmp_path / "app.pid"
    pidfile.write_text(f"{proc.pid}\n")
    spec = {"type": "signal", "signal": "HUP", "pidfile": str(pidfile)}
    params = SignalParams.model_validate({**spec, "user": "nobody"})
    assert SignalRunner().plan(params, alert())["user"] == "nobody"
    result = await SignalRunner().run(params, alert())
    assert not result.ok, result
    assert result.detail.startswith(f"SIGHUP not delivered; failed for {proc.pid} (permission denied as user nobody")
    assert "Operation not permitted" in result.detail, result.detail
    assert proc.poll() is None and not got.exists()
    as_healer = await SignalRunner().run(SignalParams.model_validate(spec), alert())
    assert as_healer.ok
    assert await eventually(lambda: got.exists() and got.read_text() == "hup\n")


@needs_root
async def test_signal_as_nobody_reaches_a_process_of_nobody(tmp_path: Path) -> None:
    """With `user: nobody` (and its group) a process that nobody owns receives the signal."""
    proc = subprocess.Popen(["sleep", "60"], user="nobody", group="nogroup", stdin=subprocess.DEVNULL)
    try:
        pidfile = tmp_path / "app.pid"
        pidfile.write_text(f"{proc.pid}\n")
        spec = {"type": "signal", "signal": "SIGTERM", "pidfile": str(pidfile), "user": "nobody", "group": "nogroup"}
        result = await SignalRunner().run(SignalParams.model_validate(spec), alert())
        assert result == StepResult(ok=True, detail=f"SIGTERM sent to 1 process ({proc.pid})")
        assert proc.wait(timeout=10) == -signal.SIGTERM
    finally:
        proc.kill()
        proc.wait(timeout=10)


def test_signal_user_and_group_are_checked_and_warned_about() -> None:
    """An unknown user of a signal strategy is a config error naming its key; as root, a signal strategy without
    a user is named in the one run-as-root warning, one with a user is not."""
    with pytest.raises(ConfigError) as error:
        parse_config({"strategies": {"hup": {"type": "signal", "cmdline": "x", "user": "no-such-user-4f1"}}})
    assert "strategies.hup.user: unknown user 'no-such-user-4f1'" in str(error.value), error.value
    strategies = parse_config(
        {
            "strategies": {
                "hup": {"type": "signal", "cmdline": "x"},
                "scoped": {"type": "signal", "cmdline": "x", "user": "nobody"},
            }
        }
    ).strategies
    warning = run_as_root_warning(strategies, euid=0)
    assert warning is not None and "strategies hup have no user" in warning and "scoped" not in warning


# --- systemd ------------------------------------------------------------------------------------


@pytest.fixture
def fake_systemctl(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fake `systemctl` first on PATH that records its argv (one per line) and exits $FAKE_EXIT."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    record = tmp_path / "systemctl-argv"
    script = bindir / "systemctl"
    script.write_text(
        f"#!/bin/sh\nprintf '%s\\n' \"$@\" > '{record}'\necho \"did $1 $2\"\n"
        f"exit $(cat '{tmp_path}/exit' 2>/dev/null || echo 0)\n"
    )
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    return record


def systemd_params(**spec: Any) -> SystemdParams:
    """SystemdParams validated from a config-like mapping."""
    return SystemdParams.model_validate({"type": "systemd", **spec})


async def test_systemd_runs_systemctl_with_the_rendered_unit(fake_systemctl: Path) -> None:
    """`systemctl ACTION UNIT` runs with the unit from a checked label; exit 0 is ok."""
    params = systemd_params(unit="{labels.unit}", action="reload")
    result = await SystemdRunner().run(params, alert({"unit": "web-1.service"}))
    assert result == StepResult(ok=True, detail="exit 0", output="did reload web-1.service\n", exit_code=0)
    assert fake_systemctl.read_text().splitlines() == ["reload", "web-1.service"]


async def test_systemd_failure_is_not_ok(fake_systemctl: Path) -> None:
    """systemctl exiting non-zero is ok=False with its exit code."""
    (fake_systemctl.parent / "exit").write_text("5")
    result = await SystemdRunner().run(systemd_params(unit="web.service"), alert())
    assert not result.ok
    assert result.detail == "exit 5"
    assert fake_systemctl.read_text().splitlines() == ["restart", "web.service"]


async def test_systemd_refuses_hostile_and_option_like_units(fake_systemctl: Path) -> None:
    """A hostile unit label, or one starting with '-', is refused and systemctl never runs."""
    with pytest.raises(UnsafeLabelError):
        await SystemdRunner().run(systemd_params(unit="{labels.unit}"), alert({"unit": "a;reboot"}))
    permissive = systemd_params(unit="{labels.unit}", allow_labels={"unit": ".*"})
    with pytest.raises(UnsafeLabelError, match="systemctl option"):
        await SystemdRunner().run(permissive, alert({"unit": "--force"}))
    assert not fake_systemctl.exists()


async def test_systemd_without_systemctl_is_a_failed_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With no systemctl on PATH the step fails with a clear detail."""
    monkeypatch.setenv("PATH", str(tmp_path))
    result = await SystemdRunner().run(systemd_params(unit="web.service"), alert())
    assert result == StepResult(ok=False, detail="executable not found: systemctl")


def test_systemd_plan_shows_systemctl_argv() -> None:
    """plan() shows the systemctl argv it would run."""
    plan = SystemdRunner().plan(systemd_params(unit="{labels.unit}", timeout="10s"), alert({"unit": "db"}))
    assert plan["argv"] == ["systemctl", "restart", "db"]
    assert plan["timeout"] == 10.0


# --- registry and plugins -----------------------------------------------------------------------


def test_builtin_types_have_runners() -> None:
    """Every built-in strategy type is registered with a runner that follows StrategyRunner."""
    registry = default_registry(plugins=False)
    assert list(registry) == ["exec", "http", "signal", "systemd"]
    for strategy_type in BUILTIN_TYPES:
        assert isinstance(registry.get(strategy_type.name).runner, StrategyRunner)


def test_parse_config_validates_builtin_params_into_runner_models() -> None:
    """Strategies from config come back as the parameter model their runner expects."""
    config = parse_config(
        {
            "strategies": {
                "restart": {"type": "exec", "command": ["systemctl", "restart", "{labels.service}"]},
                "hup": {"type": "signal", "pidfile": "/run/app.pid"},
            }
        }
    )
    assert isinstance(config.strategies["restart"], ExecParams)
    assert isinstance(config.strategies["hup"], SignalParams)


@pytest.fixture
def plugin_on_path(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The test-only `myplug` distribution (module and dist-info) installed on sys.path."""
    monkeypatch.syspath_prepend(str(PLUGIN_DIR))
    yield
    sys.modules.pop("myplug", None)


async def test_installed_plugin_is_registered_and_validated(plugin_on_path: None) -> None:
    """An installed plugin's type is in the default registry and config validates its own params."""
    registry = default_registry()
    assert "myplug" in registry
    strategy_type = registry.get("myplug")
    assert isinstance(strategy_type.runner, StrategyRunner)

    config = parse_config({"strategies": {"page": {"type": "myplug", "pager": "ops", "repeat": 2}}}, registry=registry)
    params = config.strategies["page"]
    assert type(params).__name__ == "PageParams"
    result = await strategy_type.runner.run(params, alert({"team": "db"}))
    assert result == StepResult(ok=True, detail="paged db 2 times")

    with pytest.raises(ConfigError) as error:
        parse_config(
            {"strategies": {"page": {"type": "myplug", "repeat": 0, "colour": "red"}}},
            "healer.yml",
            registry=registry,
        )
    message = str(error.value)
    assert "healer.yml: strategies.page.pager: Field required" in message
    assert "healer.yml: strategies.page.repeat: " in message
    assert "healer.yml: strategies.page.colour: " in message


def test_config_finds_plugin_params_without_a_registry(plugin_on_path: None) -> None:
    """Given no registry, config validates an installed plugin's strategy against the plugin's own parameter model."""
    config = parse_config({"strategies": {"page": {"type": "myplug", "pager": "ops"}}})
    assert type(config.strategies["page"]).__name__ == "PageParams"
    with pytest.raises(ConfigError, match=r"strategies\.page\.pager: Field required"):
        parse_config({"strategies": {"page": {"type": "myplug"}}})


def test_plugin_is_absent_without_installation() -> None:
    """Without the distribution on sys.path the plugin type is unknown."""
    assert "myplug" not in default_registry()


def test_runner_rejects_params_of_another_type() -> None:
    """A runner given another type's params fails loudly instead of misreading them."""
    params: StrategyParams = systemd_params(unit="web")
    with pytest.raises(TypeError):
        ExecRunner().plan(params, alert())
