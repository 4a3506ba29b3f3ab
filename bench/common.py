"""What the benchmarks in this directory share: starting and stopping child processes, waits.

The benchmarks import this as ``import common``. Running ``python bench/<script>.py`` puts
``bench/`` first on ``sys.path``, so the import needs no setup; the children the benchmarks
start as ``python bench/<script>.py _<mode>`` find it the same way. It imports nothing from
healer, and from ``tests/`` only the PostgreSQL harness (``tests/postgres.py``), inside
`start_postgres`, when a benchmark runs healer on PostgreSQL: the benchmarks drive healer only
through its command line and its HTTP API.

Every child process is started through a `Keeper` and stopped by its own PID: SIGTERM, a wait,
then SIGKILL for whatever is still running.
"""

from __future__ import annotations

import asyncio
import dataclasses
import http.client
import json
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, TypeVar

import psutil
import yaml

if TYPE_CHECKING:
    from aiohttp import web

T = TypeVar("T")

REPO = Path(__file__).resolve().parent.parent
MEGABYTE = 1_000_000
STOP_TIMEOUT_SECONDS = 15.0
WEBHOOK_PATH = "/api/v1/alertmanager"

# Loopback requests go straight to the server, never through a proxy named in the environment.
_DIRECT = urllib.request.build_opener(urllib.request.ProxyHandler({}))


# --------------------------------------------------------------------------- processes


@dataclass
class Child:
    """A process a benchmark started; stopped by its own PID."""

    name: str
    process: subprocess.Popen[bytes]
    log_path: Path | None = None  # where its output goes; None when it goes to /dev/null
    url: str = ""  # http://host:port once `wait_ready` saw it answer

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        if self.log_path is None:
            return ""
        with suppress(OSError):
            return self.log_path.read_text(errors="replace")
        return ""

    def log_tail(self, lines: int = 30) -> str:
        return "\n".join(self.log().splitlines()[-lines:])

    def exit_error(self) -> RuntimeError | None:
        """An error describing the exit if the process has already exited, else None."""
        if self.process.poll() is None:
            return None
        code = self.process.returncode
        return RuntimeError(f"{self.name} (pid {self.pid}) exited with {code}:\n{self.log_tail()}")

    def stop(self) -> None:
        stop([self])


def stop(children: list[Child], timeout: float = STOP_TIMEOUT_SECONDS) -> None:
    """SIGTERM every child still running, in the given order; wait up to `timeout`; SIGKILL the rest.

    Each signal goes to the child's own PID (through its Popen, which never signals a PID it
    has already reaped).
    """
    running = [child for child in children if child.process.poll() is None]
    for child in running:
        with suppress(ProcessLookupError):
            child.process.terminate()
    deadline = time.monotonic() + timeout
    for child in running:
        try:
            child.process.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                child.process.kill()
            child.process.wait(timeout)


class Keeper:
    """Starts children in a work directory and stops every one of them by PID, newest first."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.children: list[Child] = []

    def start(
        self,
        name: str,
        argv: list[str],
        *,
        cwd: Path | None = None,
        executable: str | None = None,
        log: bool = True,
        stdout: Path | None = None,
    ) -> Child:
        """Start `argv` with stdin from /dev/null.

        Its output goes to ``<workdir>/<name>.log`` (to /dev/null with ``log=False``); with
        `stdout` given, stdout goes to that file and only stderr to the log.
        """
        log_path = self.workdir / f"{name}.log" if log else None
        with ExitStack() as files:
            log_file: IO[bytes] | int = files.enter_context(log_path.open("wb")) if log_path else subprocess.DEVNULL
            out = files.enter_context(stdout.open("wb")) if stdout else None
            process = subprocess.Popen(
                argv,
                executable=executable,
                stdin=subprocess.DEVNULL,
                stdout=out or log_file,
                stderr=log_file if out else subprocess.STDOUT,
                cwd=cwd or self.workdir,
            )
        child = Child(name, process, log_path)
        self.children.append(child)
        return child

    def stop_all(self) -> None:
        stop(list(reversed(self.children)))
        self.children.clear()


# --------------------------------------------------------------------------- waiting


def free_port() -> int:
    """Return a loopback port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(check: Callable[[], T | None], what: str, timeout: float = 30.0, interval: float = 0.05) -> T:
    """Call `check` until it returns something truthy; raise TimeoutError after `timeout` seconds.

    Connection errors and undecodable answers (OSError, ValueError, HTTPException) count as "not
    yet"; any other exception, such as a child's `exit_error`, ends the wait at once.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except (OSError, ValueError, http.client.HTTPException) as exc:  # not up yet
            last_error = exc
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout}s waiting for {what}; last error: {last_error!r}")


def http_get(url: str, timeout: float = 5.0, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """GET `url` directly (no proxy), with `headers` (healer's reads need its token); return the status and body,
    also for error statuses."""
    try:
        with _DIRECT.open(urllib.request.Request(url, headers=headers or {}), timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def http_post(url: str, timeout: float = 30.0) -> tuple[int, bytes]:
    """POST an empty body to `url` directly (no proxy); return the status and body, also for error statuses."""
    request = urllib.request.Request(url, data=b"", method="POST")
    try:
        with _DIRECT.open(request, timeout=timeout) as response:
            return int(response.status), response.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def wait_ready(child: Child, base_url: str, path: str = "/-/ready", timeout: float = 30.0) -> None:
    """Wait until ``GET base_url + path`` answers 200, then set ``child.url = base_url``.

    Fails at once with the child's log tail if the child exits meanwhile.
    """

    def ready() -> bool:
        if error := child.exit_error():
            raise error
        return http_get(base_url + path, timeout=2)[0] == 200

    wait_for(ready, f"{child.name} to answer {base_url}{path}", timeout)
    child.url = base_url


def wait_listening(child: Child, timeout: float = 30.0) -> str:
    """Wait for the child's JSON ``{"event": "listening", "address": ...}`` log line, then for
    ``GET /-/ready`` at that address; set and return ``child.url``.

    healer writes that line with ``--log-format json``; `serve_on_loopback` writes it too. The
    address must be on 127.0.0.1.
    """

    def address() -> str | None:
        if error := child.exit_error():
            raise error
        for line in child.log().splitlines():
            if not line.startswith("{"):
                continue
            try:
                record = json.loads(line)
            except ValueError:
                continue  # a line still being written
            if record.get("event") == "listening":
                return str(record["address"])
        return None

    found = wait_for(address, f"{child.name}'s 'listening' log line", timeout)
    if not found.startswith("127.0.0.1:"):
        raise RuntimeError(f"{child.name} reported {found}, not a 127.0.0.1 address:\n{child.log_tail()}")
    wait_ready(child, f"http://{found}", timeout=timeout)
    return child.url


# --------------------------------------------------------------------------- healer


def write_yaml(path: Path, document: dict[str, Any]) -> Path:
    """Write `document` as YAML to `path` (keys in the order given) and return the path."""
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def start_healer(
    keeper: Keeper, config_path: Path, listen: str = "127.0.0.1:0", cwd: Path | None = None, name: str = "healer"
) -> Child:
    """Start ``python -m healer serve`` with JSON logs, as child `name`; `wait_listening` waits for it."""
    argv = [sys.executable, "-m", "healer", "serve", "-c", str(config_path), "--listen", listen, "--log-format", "json"]
    return keeper.start(name, argv, cwd=cwd)


# --------------------------------------------------------------------------- PostgreSQL

STORES = ("sqlite", "postgresql")


def start_postgres(workdir: Path) -> Any:
    """Start a real PostgreSQL on loopback with tests/postgres.py's harness; the caller must `destroy()` it.

    Returns its `PostgresServer` (``url``, ``password_file``, ``create_database()``, ``destroy()``).
    The harness runs Debian's PostgreSQL as the ``postgres`` user under /tmp/healer-pg-* when run as root.
    """
    if str(REPO) not in sys.path:
        sys.path.append(str(REPO))  # after bench/, so `import common` still finds this file
    from tests.postgres import start_postgres as start  # the one import from tests/, only when needed

    return start(workdir / "postgres")


def store_config(store: str, workdir: Path, postgres: Any = None) -> dict[str, Any]:
    """healer's `store:` section: an SQLite file in `workdir`, or a fresh database of `postgres`."""
    if store == "sqlite":
        return {"path": str(workdir / "healer.db")}
    if postgres is None:
        raise ValueError("a PostgreSQL store needs a running PostgreSQL")
    return {"url": postgres.create_database(), "password_file": str(postgres.password_file)}


def stores(choice: str) -> list[str]:
    """The stores a ``--store sqlite|postgresql|both`` option asks for, SQLite first."""
    return list(STORES) if choice == "both" else [choice]


def metrics_text(base_url: str, timeout: float = 5.0, headers: dict[str, str] | None = None) -> str:
    """The body of ``base_url/metrics`` (read with `headers`); an error status raises RuntimeError."""
    status, body = http_get(f"{base_url}/metrics", timeout=timeout, headers=headers)
    if status != 200:
        raise RuntimeError(f"GET {base_url}/metrics: HTTP {status}: {body[:300]!r}")
    return body.decode()


def metric_value(base_url: str, name: str, timeout: float = 5.0, headers: dict[str, str] | None = None) -> float | None:
    """The value of an unlabelled sample `name` on ``base_url/metrics`` (read with `headers`); None when absent."""
    prefix = name + " "
    for line in metrics_text(base_url, timeout, headers).splitlines():
        if line.startswith(prefix):
            return float(line.split()[1])
    return None


# One label pair of a sample line, value escapes included.
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


def sample_sum(text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """The sum of the samples `name` in Prometheus text `text` whose labels include `labels`; 0.0 when none."""
    wanted = set((labels or {}).items())
    total = 0.0
    for line in text.splitlines():
        series, _, value = line.rpartition(" ")
        metric, _, label_text = series.partition("{")
        if metric == name and wanted <= set(_LABEL.findall(label_text)):
            total += float(value)
    return total


# --------------------------------------------------------------------------- figures


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (0.0 for no values)."""
    ordered = sorted(values)
    if not ordered:
        return 0.0
    rank = max(1, min(len(ordered), int(fraction * len(ordered) + 0.999999)))
    return ordered[rank - 1]


def summary(values: list[float], digits: int = 1) -> dict[str, float]:
    """Median, p90, max and min of `values` (nearest rank), rounded to `digits`."""
    return {
        "median": round(percentile(values, 0.5), digits),
        "p90": round(percentile(values, 0.9), digits),
        "max": round(max(values, default=0.0), digits),
        "min": round(min(values, default=0.0), digits),
    }


def emit(report: Any, as_json: bool, print_report: Callable[[Any], None]) -> int:
    """Print a dataclass report as JSON or as text; return 0 (a failed check is a FAIL line, not an exit)."""
    if as_json:
        print(json.dumps(dataclasses.asdict(report), indent=2))
    else:
        print_report(report)
    return 0


def rss_mb(pid: int) -> float:
    """Resident memory of a process in MB (10**6 bytes)."""
    return psutil.Process(pid).memory_info().rss / MEGABYTE


# --------------------------------------------------------------------------- baseline servers


def serve_on_loopback(app: web.Application) -> None:
    """Child process body: serve `app` and ``GET /-/ready`` on 127.0.0.1:0 until SIGTERM or SIGINT.

    Prints the JSON ``listening`` line that `wait_listening` reads, as healer logs it.
    """
    from aiohttp import web  # only the baseline children need aiohttp

    async def ready(request: web.Request) -> web.Response:
        return web.Response(text="ready\n")

    async def serve() -> None:
        app.router.add_get("/-/ready", ready)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        host, port = runner.addresses[0][:2]
        print(json.dumps({"event": "listening", "address": f"{host}:{port}"}), flush=True)
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stopping.set)
        await stopping.wait()
        await runner.cleanup()

    asyncio.run(serve())


def serve_exposition(port: int, body: Callable[[], bytes]) -> None:
    """Serve `body()` as Prometheus text on 127.0.0.1:`port` until SIGTERM: a tiny exporter child."""
    import http.server

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            text = body()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.send_header("Content-Length", str(len(text)))
            self.end_headers()
            self.wfile.write(text)

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    server.serve_forever()


# --------------------------------------------------------------------------- Prometheus and Alertmanager


def start_alertmanager(keeper: Keeper, directory: Path, config: dict[str, Any]) -> Child:
    """Start Alertmanager with `config` in `directory` on a free loopback port, clustering off; wait until ready."""
    import shutil

    binary = (
        shutil.which("prometheus-alertmanager") or shutil.which("alertmanager") or "/usr/bin/prometheus-alertmanager"
    )
    flags = [f"--storage.path={directory / 'data'}", "--cluster.listen-address="]
    return _start_configured(keeper, "alertmanager", binary, directory, config, flags)


def start_prometheus(keeper: Keeper, directory: Path, config: dict[str, Any]) -> Child:
    """Start Prometheus with `config` in `directory` on a free loopback port; wait until ready."""
    import shutil

    binary = shutil.which("prometheus") or "/usr/bin/prometheus"
    return _start_configured(
        keeper, "prometheus", binary, directory, config, [f"--storage.tsdb.path={directory / 'data'}"]
    )


def _start_configured(
    keeper: Keeper, name: str, binary: str, directory: Path, config: dict[str, Any], flags: list[str]
) -> Child:
    """Write `config` to ``directory/NAME.yml``, start `binary` with it and `flags` on a free loopback port (logging
    warnings only) as child `name`, and wait until it answers ``/-/ready``."""
    directory.mkdir(parents=True, exist_ok=True)
    config_path = write_yaml(directory / f"{name}.yml", config)
    port = free_port()
    argv = [
        binary,
        f"--config.file={config_path}",
        *flags,
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    child = keeper.start(name, argv)
    wait_ready(child, f"http://127.0.0.1:{port}")
    return child
