"""Start real Prometheus, Alertmanager and healer processes on loopback for tests."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import yaml

if TYPE_CHECKING:
    from healer.storage import Storage

T = TypeVar("T")

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
ALERTMANAGER = (
    shutil.which("prometheus-alertmanager") or shutil.which("alertmanager") or "/usr/bin/prometheus-alertmanager"
)
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
AMTOOL = shutil.which("amtool") or "/usr/bin/amtool"
REPO = Path(__file__).resolve().parent.parent


def processes_mentioning(text: str) -> list[int]:
    """PIDs of live processes whose command line contains `text` (pgrep -f without procps)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["pid", "cmdline", "status"]):
        if proc.info["status"] != psutil.STATUS_ZOMBIE and text in " ".join(proc.info["cmdline"] or ()):
            found.append(int(proc.info["pid"]))
    return found


def free_port() -> int:
    """Return a loopback port that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(check: Callable[[], T | None], timeout: float = 30.0, interval: float = 0.1, what: str = "") -> T:
    """Call `check` until it returns something truthy, or fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while time.monotonic() < deadline:
        try:
            result = check()
            if result:
                return result
        except Exception as exc:  # the server may not be up yet
            last_error = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or check}: last error {last_error!r}")


def http_get(url: str, timeout: float = 5.0, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    """GET a URL and return its status and body, also for error statuses."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def http_json(url: str, method: str = "GET", body: Any = None, headers: dict[str, str] | None = None) -> Any:
    """Send a request with an optional JSON body and decode the JSON answer."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    with urllib.request.urlopen(request, timeout=5) as response:
        raw = response.read()
        return json.loads(raw) if raw else None


def http_post(url: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """POST a JSON body and return the status and the decoded answer, also for error statuses."""
    request = urllib.request.Request(
        url,
        data=json.dumps(body if body is not None else {}).encode(),
        method="POST",
        headers={"Content-Type": "application/json", **(headers or {})},
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


@dataclass
class Server:
    """A started server process, stopped by its own PID."""

    name: str
    process: subprocess.Popen[bytes]
    url: str
    log_path: Path
    extra: dict[str, Any] = field(default_factory=dict)
    # What a client sends to read its API: healer closes reads when any credential is configured.
    headers: dict[str, str] = field(default_factory=dict)

    @property
    def pid(self) -> int:
        return self.process.pid

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 10.0) -> int | None:
        """Signal the process by PID and wait for it; SIGKILL if it does not exit in time."""
        if self.process.poll() is None:
            os.kill(self.process.pid, sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout)
        return self.process.returncode


def _spawn(
    name: str, argv: list[str], workdir: Path, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], Path]:
    log_path = workdir / f"{name}.log"
    log_file = log_path.open("wb")
    process = subprocess.Popen(
        argv,
        stdout=log_file,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        cwd=workdir,
        env={**os.environ, **(env or {})},
    )
    log_file.close()
    return process, log_path


def _await_ready(
    server: Server,
    path: str = "/-/ready",
    timeout: float = 30.0,
    status: Callable[[str], int] = lambda url: http_get(url, timeout=1)[0],
) -> Server:
    """Wait until `path` answers 200 (by `status`, plain HTTP unless told); a server that exits or never gets
    ready is killed, and the error shows its log."""

    def ready() -> bool:
        if server.process.poll() is not None:
            raise RuntimeError(f"{server.name} exited with {server.process.returncode}:\n{server.log()}")
        return status(server.url + path) == 200

    try:
        wait_for(ready, timeout, what=f"{server.name} ready")
    except BaseException:
        server.stop(signal.SIGKILL)
        raise
    return server


def start_prometheus(
    workdir: Path,
    scrape_configs: list[dict[str, Any]],
    *,
    rule_files: list[str] | None = None,
    interval: str = "1s",
    alertmanager_url: str | None = None,
) -> Server:
    """Start /usr/bin/prometheus on a free loopback port with the given scrape jobs."""
    workdir.mkdir(parents=True, exist_ok=True)
    config: dict[str, Any] = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": interval},
        "scrape_configs": scrape_configs,
    }
    if rule_files:
        config["rule_files"] = rule_files
    if alertmanager_url:
        host = urllib.parse.urlparse(alertmanager_url).netloc
        config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": [host]}]}]}
    config_path = workdir / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    argv = [
        PROMETHEUS,
        f"--config.file={config_path}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--web.enable-lifecycle",
        "--log.level=warn",
    ]
    process, log_path = _spawn("prometheus", argv, workdir)
    return _await_ready(Server("prometheus", process, f"http://127.0.0.1:{port}", log_path))


def start_alertmanager(workdir: Path, config: dict[str, Any], port: int | None = None) -> Server:
    """Start Debian's prometheus-alertmanager with clustering off on a loopback port (a free one by default)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "alertmanager.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = port or free_port()
    argv = [
        ALERTMANAGER,
        f"--config.file={config_path}",
        f"--storage.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",
        "--log.level=warn",
    ]
    process, log_path = _spawn("alertmanager", argv, workdir)
    return _await_ready(Server("alertmanager", process, f"http://127.0.0.1:{port}", log_path))


def legacy_token_headers(config_path: Path, env: dict[str, str] | None = None) -> dict[str, str]:
    """The Authorization header of the shared token a healer config gives (HEALER_TOKEN in `env` first, then
    server.auth.bearer_token_file), which also reads healer's API; none when it gives none."""
    token = (env or {}).get("HEALER_TOKEN", "").strip()
    settings = yaml.safe_load(config_path.read_text()) or {}
    token_file = ((settings.get("server") or {}).get("auth") or {}).get("bearer_token_file")
    if not token and token_file:
        token = Path(token_file).read_text().strip()
    return {"Authorization": f"Bearer {token}"} if token else {}


def start_healer(
    workdir: Path,
    config: dict[str, Any] | Path,
    env: dict[str, str] | None = None,
    timeout: float = 30.0,
    listen: str = "127.0.0.1:0",
) -> Server:
    """Start `python -m healer serve` (on 127.0.0.1:0 by default) and read the bound port from its JSON log."""
    workdir.mkdir(parents=True, exist_ok=True)
    if isinstance(config, Path):
        config_path = config
    else:
        config_path = workdir / "healer.yml"
        config_path.write_text(yaml.safe_dump(config))
    argv = [sys.executable, "-m", "healer", "serve", "-c", str(config_path), "--listen", listen, "--log-format", "json"]
    process, log_path = _spawn("healer", argv, workdir, env)
    server = Server("healer", process, "", log_path, headers=legacy_token_headers(config_path, env))

    def listening() -> str | None:
        if process.poll() is not None:
            raise RuntimeError(f"healer exited with {process.returncode}:\n{server.log()}")
        for line in server.log().splitlines():
            if line.startswith("{") and json.loads(line).get("event") == "listening":
                return str(json.loads(line)["address"])
        return None

    try:
        server.url = "http://" + wait_for(listening, timeout, what="healer listening")
    except BaseException:
        server.stop(signal.SIGKILL)
        raise
    return _await_ready(server, timeout=timeout)


def prom_query(prometheus: Server, expr: str) -> list[dict[str, Any]]:
    """Run an instant PromQL query through Prometheus's HTTP API and return the result vector."""
    status, body = http_get(f"{prometheus.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
    payload = json.loads(body)
    if status != 200 or payload.get("status") != "success":
        raise AssertionError(f"query {expr!r} failed: {payload}")
    return list(payload["data"]["result"])


def prom_value(prometheus: Server, expr: str) -> float | None:
    """Return the single value of an instant query, or None when it returns nothing."""
    result = prom_query(prometheus, expr)
    if not result:
        return None
    assert len(result) == 1, f"{expr!r} returned {len(result)} series: {result}"
    return float(result[0]["value"][1])


def process_alive(pid: int) -> bool:
    """Tell whether a process exists and has not exited (a zombie has)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie has exited; only its parent has not collected it yet.
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


def healing_status(healer: Server) -> dict[str, Any]:
    """The `healing` part of GET /api/v1/status: alerts_received, episodes by state, actions by outcome, in_progress."""
    status, body = http_get(healer.url + "/api/v1/status", headers=healer.headers)
    assert status == 200, body
    return dict(json.loads(body)["healing"])


def read_stopped_store(config: dict[str, Any], read: Callable[[Storage], Awaitable[T]]) -> T:
    """The one place a test opens healer's store itself, to prove what is on disk after healer died.

    Everything else reads through healer's HTTP API. This reads through the storage interface
    (`healer.storage.open_storage` with the config's `store` section, so it follows the configured
    backend and knows no table), and only with healer stopped: a running healer holds the store's
    exclusive lock, and while it runs the API shows the same facts. A test that kills healer with
    SIGKILL right after an answer and then finds the facts here proves they were durable, not merely
    in the dead process's memory or written by a graceful shutdown.
    """
    from healer.config import parse_config
    from healer.storage import open_storage

    async def main() -> T:
        storage = await open_storage(parse_config(config).store)
        try:
            return await read(storage)
        finally:
            await storage.close()

    return asyncio.run(main())


class QuietHandler(BaseHTTPRequestHandler):
    """A request handler for test targets: plain-text answers, no access log on stderr."""

    def answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; version=0.0.4")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


def serve_in_thread(handler: type[BaseHTTPRequestHandler]) -> tuple[ThreadingHTTPServer, str]:
    """Serve `handler` on a free loopback port from a daemon thread; return the server and its address."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"127.0.0.1:{server.server_address[1]}"


def start_alertmanager_cluster(workdir: Path, configs: list[dict[str, Any]]) -> list[Server]:
    """Start one Alertmanager per config in one gossip cluster on loopback; return them once each sees every peer.

    Each listens for gossip on a free port and names every other as `--cluster.peer`; the short
    gossip, push-pull and settle times make silences and the notification log spread in tests.
    """
    size = len(configs)
    gossip = [free_port() for _ in range(size)]
    members: list[Server] = []
    try:
        for index, (own, config) in enumerate(zip(gossip, configs, strict=True)):
            directory = workdir / f"am{index}"
            directory.mkdir(parents=True, exist_ok=True)
            config_path = directory / "alertmanager.yml"
            config_path.write_text(yaml.safe_dump(config))
            port = free_port()
            argv = [
                ALERTMANAGER,
                f"--config.file={config_path}",
                f"--storage.path={directory / 'data'}",
                f"--web.listen-address=127.0.0.1:{port}",
                f"--cluster.listen-address=127.0.0.1:{own}",
                *(f"--cluster.peer=127.0.0.1:{other}" for other in gossip if other != own),
                "--cluster.settle-timeout=1s",
                "--cluster.gossip-interval=50ms",
                "--cluster.pushpull-interval=1s",
                "--log.level=warn",
            ]
            process, log_path = _spawn("alertmanager", argv, directory)
            members.append(_await_ready(Server(f"alertmanager{index}", process, f"http://127.0.0.1:{port}", log_path)))
        for member in members:

            def sees_all(member: Server = member) -> bool:
                return len(http_json(member.url + "/api/v2/status")["cluster"].get("peers") or []) == size

            wait_for(sees_all, 30, what=f"{member.name} seeing {size} cluster peers")
    except BaseException:
        for member in members:
            member.stop(signal.SIGKILL)
        raise
    return members


def alert_prometheus(prometheus: Server, alertmanagers: list[Server], rule_files: list[str]) -> None:
    """Make a running Prometheus (from start_prometheus) evaluate `rule_files` and post to each of `alertmanagers`.

    Rewrites its config's `rule_files` and `alerting`, reloads it, and waits until Prometheus reports
    every Alertmanager active.
    """
    config_path = prometheus.log_path.parent / "prometheus.yml"
    config = yaml.safe_load(config_path.read_text())
    targets = [urllib.parse.urlparse(am.url).netloc for am in alertmanagers]
    config["rule_files"] = rule_files
    config["alerting"] = {"alertmanagers": [{"static_configs": [{"targets": targets}]}]}
    config_path.write_text(yaml.safe_dump(config))
    http_json(prometheus.url + "/-/reload", method="POST")

    def active() -> bool:
        found = http_json(prometheus.url + "/api/v1/alertmanagers")["data"]["activeAlertmanagers"]
        return sorted(urllib.parse.urlparse(am["url"]).netloc for am in found) == sorted(targets)

    wait_for(active, 10, what="Prometheus posting to every Alertmanager")


def restart_server(server: Server, timeout: float = 30.0) -> Server:
    """Start a server that has exited again with its own command line (same port, same data directory).

    Its output is appended to the same log; `server.process` becomes the new process, so `stop` and
    `pid` follow it.
    """
    if server.process.poll() is None:
        raise RuntimeError(f"{server.name} (pid {server.pid}) is still running")
    with server.log_path.open("ab") as log_file:
        server.process = subprocess.Popen(
            list(server.process.args),  # type: ignore[arg-type]
            stdout=log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            cwd=server.log_path.parent,
        )
    return _await_ready(server, timeout=timeout)


def http_send(method: str, url: str, body: Any = None, headers: dict[str, str] | None = None) -> tuple[int, Any]:
    """Send any method with an optional JSON body; return the status and the decoded answer, also for errors."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            raw = response.read()
            return response.status, json.loads(raw) if raw else None
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        return exc.code, json.loads(raw) if raw else None


# --- TLS: test certificates made by openssl, and servers reached over HTTPS -------------------------------------


@dataclass(frozen=True)
class Certificates:
    """A throw-away CA, a server certificate for 127.0.0.1 and localhost, and a client certificate, as PEM files."""

    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path

    def context(self, client: bool = False) -> ssl.SSLContext:
        """A client context trusting the CA (with the client certificate when `client`)."""
        context = ssl.create_default_context(cafile=str(self.ca))
        if client:
            context.load_cert_chain(self.client_cert, self.client_key)
        return context


def make_certificates(folder: Path) -> Certificates:
    """Generate a CA and certificates it signs with the openssl command (EC P-256, valid one day)."""
    folder.mkdir(parents=True, exist_ok=True)

    def run(*argv: str) -> None:
        subprocess.run(["openssl", *argv], cwd=folder, check=True, capture_output=True, timeout=60)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    run("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "1", "-subj", "/CN=healer test CA",
        "-addext", "basicConstraints=critical,CA:TRUE", "-addext", "keyUsage=critical,keyCertSign,cRLSign")  # fmt: skip
    for name, extensions in (
        ("server", "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n"),
        ("client", "subjectAltName=DNS:client.test\nextendedKeyUsage=clientAuth\n"),
    ):
        (folder / f"{name}.ext").write_text(extensions)
        run("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}")
        run("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "1", "-extfile", f"{name}.ext")  # fmt: skip
    for key in folder.glob("*.key"):
        key.chmod(0o600)
    return Certificates(
        folder / "ca.crt", folder / "server.crt", folder / "server.key", folder / "client.crt", folder / "client.key"
    )


def https_get(
    url: str, context: ssl.SSLContext, headers: dict[str, str] | None = None, timeout: float = 5.0
) -> tuple[int, bytes]:
    """GET over HTTPS with a given client context; the status and body, also for error statuses."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=timeout, context=context) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def https_send(
    method: str, url: str, context: ssl.SSLContext, body: Any = None, headers: dict[str, str] | None = None
) -> tuple[int, bytes]:
    """Send a JSON body over HTTPS; the status and the raw answer, also for error statuses."""
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(
        url, data=data, method=method, headers={"Content-Type": "application/json", **(headers or {})}
    )
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _await_https_ready(
    server: Server, context: ssl.SSLContext, headers: dict[str, str] | None, path: str, timeout: float
) -> Server:
    return _await_ready(server, path, timeout, lambda url: https_get(url, context, headers, timeout=1)[0])


def start_prometheus_https(
    workdir: Path,
    scrape_configs: list[dict[str, Any]],
    web_config: dict[str, Any],
    context: ssl.SSLContext,
    headers: dict[str, str] | None = None,
    interval: str = "1s",
) -> Server:
    """Start /usr/bin/prometheus serving its own --web.config.file (TLS, basic auth); readiness is checked with
    `context` and `headers` (its credentials)."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = {
        "global": {"scrape_interval": interval, "evaluation_interval": interval, "scrape_timeout": interval},
        "scrape_configs": scrape_configs,
    }
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    (workdir / "web.yml").write_text(yaml.safe_dump(web_config))
    port = free_port()
    argv = [
        PROMETHEUS,
        f"--config.file={workdir / 'prometheus.yml'}",
        f"--web.config.file={workdir / 'web.yml'}",
        f"--storage.tsdb.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--log.level=warn",
    ]
    process, log_path = _spawn("prometheus", argv, workdir)
    server = Server("prometheus", process, f"https://127.0.0.1:{port}", log_path)
    return _await_https_ready(server, context, headers, "/-/ready", 30.0)


def start_alertmanager_https(
    workdir: Path,
    config: dict[str, Any],
    web_config: dict[str, Any],
    context: ssl.SSLContext,
    headers: dict[str, str] | None = None,
) -> Server:
    """Start prometheus-alertmanager (clustering off) serving its own --web.config.file."""
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "alertmanager.yml").write_text(yaml.safe_dump(config))
    (workdir / "web.yml").write_text(yaml.safe_dump(web_config))
    port = free_port()
    argv = [
        ALERTMANAGER,
        f"--config.file={workdir / 'alertmanager.yml'}",
        f"--web.config.file={workdir / 'web.yml'}",
        f"--storage.path={workdir / 'data'}",
        f"--web.listen-address=127.0.0.1:{port}",
        "--cluster.listen-address=",
        "--log.level=warn",
    ]
    process, log_path = _spawn("alertmanager", argv, workdir)
    server = Server("alertmanager", process, f"https://127.0.0.1:{port}", log_path)
    return _await_https_ready(server, context, headers, "/-/ready", 30.0)


def start_healer_https(
    workdir: Path,
    config: dict[str, Any],
    context: ssl.SSLContext,
    listen: str = "127.0.0.1:0",
    timeout: float = 30.0,
) -> Server:
    """Start `python -m healer serve` whose web config serves TLS; the URL is https:// from its `listening`
    line (which must say scheme https), readiness checked with `context`."""
    workdir.mkdir(parents=True, exist_ok=True)
    config_path = workdir / "healer.yml"
    config_path.write_text(yaml.safe_dump(config))
    argv = [sys.executable, "-m", "healer", "serve", "-c", str(config_path), "--listen", listen, "--log-format", "json"]
    process, log_path = _spawn("healer", argv, workdir)
    server = Server("healer", process, "", log_path)

    def listening() -> dict[str, Any] | None:
        if process.poll() is not None:
            raise RuntimeError(f"healer exited with {process.returncode}:\n{server.log()}")
        for line in server.log().splitlines():
            if line.startswith("{") and json.loads(line).get("event") == "listening":
                return dict(json.loads(line))
        return None

    try:
        line = wait_for(listening, timeout, what="healer listening")
        assert line.get("scheme") == "https", line
        server.url = f"https://{line['address']}"
    except BaseException:
        server.stop(signal.SIGKILL)
        raise
    return _await_https_ready(server, context, None, "/-/ready", timeout)
