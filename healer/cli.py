"""The `healer` command line: serve, check-config, status, test-alert, demo, store."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import signal
import ssl
import sys
import tempfile
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from healer import __version__
from healer.auth import Access, ClientAuthType, TLSServerConfig, TLSVersion, WebConfigError, load_access
from healer.config import ConfigError, HealerConfig, is_loopback, load_config, split_listen
from healer.config.http_client import HTTPClientConfig
from healer.config.loading import config_warnings
from healer.config.strategy_params import run_as_root_warning
from healer.logs import configure_logging, fields

log = logging.getLogger("healer.cli")

EXIT_OK = 0
EXIT_CONFIG = 1
EXIT_USAGE = 2


WEB_CONFIG_HELP = (
    "exporter-toolkit web configuration file (basic_auth_users, tls_server_config, healer_roles, healer_tokens),"
    " overriding server.web_config_file"
)


class StartupError(Exception):
    """healer refuses to start with this config; the message says why."""


class StatusOptionsError(Exception):
    """`healer status`'s credential or TLS options cannot be used; the message names the option."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="healer", description="Prometheus-native self-healing.")
    parser.add_argument("--version", action="version", version=f"healer {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the exporter, webhook and healing engine")
    serve.add_argument("-c", "--config", type=Path, required=True, help="path to healer.yml")
    serve.add_argument("--listen", help="HOST:PORT to listen on, overriding server.listen")
    serve.add_argument("--log-format", choices=["text", "json"], help="overrides server.log_format")
    serve.add_argument("--web.config.file", dest="web_config_file", type=Path, help=WEB_CONFIG_HELP)

    check = commands.add_parser("check-config", help="validate a config file")
    check.add_argument("config", type=Path, help="path to healer.yml")
    check.add_argument("--web.config.file", dest="web_config_file", type=Path, help=WEB_CONFIG_HELP)

    status = commands.add_parser("status", help="print the unified status report of a running healer")
    status.add_argument("--url", default="http://127.0.0.1:9877", help="healer's base URL")
    status.add_argument("--json", action="store_true", help="print the JSON report")
    # The credentials and TLS of Prometheus's http_config, from files only: a password on the command line would
    # be in the shell's history and in every process listing.
    status.add_argument("--bearer-token-file", type=Path, help="file holding a bearer token (a viewer's or higher)")
    status.add_argument("--basic-auth-user", help="user name for HTTP Basic (with --basic-auth-password-file)")
    status.add_argument("--basic-auth-password-file", type=Path, help="file holding --basic-auth-user's password")
    status.add_argument("--ca-file", type=Path, help="CA certificate (PEM) that signs healer's https certificate")
    status.add_argument("--cert-file", type=Path, help="client certificate (PEM) for mutual TLS, with --key-file")
    status.add_argument("--key-file", type=Path, help="the client certificate's private key (PEM)")

    demo = commands.add_parser("demo", help="run the live demonstration on loopback")
    demo.add_argument("--scenario", action="append", help="run only this fault (repeatable)")
    demo.add_argument("--keep", action="store_true", help="leave the stack running at the end")
    demo.add_argument("--workdir", type=Path, help="directory for the stack's files (default: a new temp dir)")
    demo.add_argument("--report", type=Path, help="also write the results as JSON to this file")

    test_alert = commands.add_parser(
        "test-alert", help="show what would run for each alert of an Alertmanager payload, running nothing"
    )
    test_alert.add_argument("-c", "--config", type=Path, required=True, help="path to healer.yml")
    test_alert.add_argument("payload", type=Path, help="an Alertmanager webhook payload (JSON)")
    test_alert.add_argument("--json", action="store_true", help="print JSON instead of text")

    store = commands.add_parser("store", help="check or recover a SQLite store file (with healer stopped)")
    store_commands = store.add_subparsers(dest="store_command", required=True, metavar="STORE_COMMAND")
    store_check = store_commands.add_parser("check", help="SQLite's integrity check: exit 0 when sound, 2 if not")
    store_check.add_argument("file", type=Path, help="the store file (store.path)")
    store_recover = store_commands.add_parser("recover", help="copy what can be read of a damaged store to a new file")
    store_recover.add_argument("file", type=Path, help="the damaged store file (store.path)")
    store_recover.add_argument("--output", type=Path, help="the new file (default: FILE.recovered)")
    return parser


def store_command(command: str, path: Path, output: Path | None = None) -> int:
    """`healer store check FILE` and `healer store recover FILE`: one line per finding, exit 0 or 2."""
    from healer.storage.sqlite.recovery import RecoveryError, check, recover

    try:
        if command == "check":
            problems = check(path)
            for problem in problems:
                print(f"{path}: {problem}", file=sys.stderr)
            if problems:
                print(f"{path}: damaged: run `healer store recover {path}` with healer stopped", file=sys.stderr)
                return EXIT_USAGE
            print(f"{path}: OK")
            return EXIT_OK
        target = output or path.with_name(path.name + ".recovered")
        recovered = recover(path, target)
    except RecoveryError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    counts = ", ".join(f"{name} {rows}" for name, rows in sorted(recovered.rows.items()))
    print(f"{target}: recovered by {recovered.method}: {counts}")
    print(f"with healer stopped, move {path} aside and {target} to store.path, then start healer")
    return EXIT_OK


def test_alert(config_path: Path, payload_path: Path, as_json: bool) -> int:
    """Print, for each alert in a payload, the rule, the ladder and the rendered invocations."""
    from healer.healing.ladder import first_plans
    from healer.healing.payload import InvalidPayloadError, decode_webhook
    from healer.strategies.builtin import default_registry

    config = _load_or_report(config_path)
    if config is None:
        return EXIT_CONFIG
    try:
        payload = decode_webhook(payload_path.read_bytes())
    except OSError as exc:
        print(f"{payload_path}: cannot read: {exc.strerror}", file=sys.stderr)
        return EXIT_CONFIG
    except InvalidPayloadError as exc:
        for error in exc.errors or [{"field": "(body)", "message": exc.message}]:
            print(f"{payload_path}: {error['field']}: {error['message']}", file=sys.stderr)
        return EXIT_CONFIG
    registry = default_registry()
    reports = [first_plans(config, registry, alert) for alert in payload.alerts]
    asyncio.run(_add_rails(config, payload.alerts, reports))
    if as_json:
        print(json.dumps(reports, indent=2))
        return EXIT_OK
    for report in reports:
        print(f"{report['alertname']} ({report['status']}, fingerprint {report['fingerprint']})")
        print(f"  {report['explanation']}")
        if report["skip_reason"]:
            print(f"  skip reason: {report['skip_reason']}")
        for position, step in enumerate(report["ladder"], start=1):
            flags = [
                flag
                for flag, on in (("dry run", step["dry_run"]), ("needs approval", step["approval"] == "required"))
                if on
            ]
            suffix = f" [{', '.join(flags)}]" if flags else ""
            print(f"  {position}. {step['strategy']} ({step['type']}){suffix}")
            if "plan" in step:
                print(f"     would run: {json.dumps(step['plan'])}")
            else:
                print(f"     skipped (unsafe_label): {step['error']}")
        for rail in report.get("rails", []):
            subject = rail.get("source") or rail.get("query") or rail.get("group") or ""
            holds = rail.get("holds")
            state = "" if holds is None else ("HOLDS " if holds else "clear ")
            print(f"  {rail['rail']}: {state}{subject + ': ' if subject else ''}{rail['explanation']}")
    return EXIT_OK


async def _add_rails(config: HealerConfig, alerts: Sequence[Any], reports: list[dict[str, Any]]) -> None:
    """Add to each firing, matched alert's report what the safety rails would decide, asking Prometheus."""
    from healer.healing.explain import explain_rails
    from healer.promql import PromQLClient

    rules = {rule.name: rule for rule in config.healing.rules}
    async with PromQLClient(config.prometheus) as promql:
        for alert, report in zip(alerts, reports, strict=True):
            rule = rules.get(report["rule"] or "")
            if rule is not None and alert.status == "firing":
                report["rails"] = await explain_rails(config, rule, alert, promql)


def _load_or_report(path: Path) -> HealerConfig | None:
    """Load a config, or print each of its faults on its own line to stderr and return None."""
    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return None


def _access_or_report(config: HealerConfig, path: Path, web_config_file: Path | None) -> Access | None:
    """Load the credentials, or print each fault (file and key path, never a secret) to stderr and return None."""
    try:
        return load_access(config, path, web_config_file)
    except WebConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return None


def check_config(path: Path, web_config_file: Path | None = None) -> int:
    """Print every fault and warning of a config file and its credentials, one per line; return the exit code
    (EXIT_USAGE when healer would refuse to start for its credentials, as `serve` does)."""
    config = _load_or_report(path)
    if config is None:
        return EXIT_CONFIG
    access = _access_or_report(config, path, web_config_file)
    if access is None:
        return EXIT_USAGE
    try:
        _serving_context(access, web_config_file or config.server.web_config_file)
    except StartupError as exc:
        print(exc, file=sys.stderr)
        return EXIT_USAGE
    # Warnings do not fail the check: the config runs, only not as its author probably meant.
    for warning in config_warnings(config):
        print(f"{path}: warning: {warning}", file=sys.stderr)
    for warning in access.warnings:
        print(f"{path}: warning: {warning}", file=sys.stderr)
    print(f"{path}: OK")
    return EXIT_OK


# Go's names of the TLS 1.2 suites it implements, as the exporter-toolkit reads them, in OpenSSL's names.
# TLS 1.3 suites are not configurable, in Go as in OpenSSL's cipher list: their names are accepted and kept.
_CIPHERS = {
    "TLS_RSA_WITH_AES_128_CBC_SHA": "AES128-SHA",
    "TLS_RSA_WITH_AES_256_CBC_SHA": "AES256-SHA",
    "TLS_RSA_WITH_AES_128_GCM_SHA256": "AES128-GCM-SHA256",
    "TLS_RSA_WITH_AES_256_GCM_SHA384": "AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA": "ECDHE-ECDSA-AES128-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA": "ECDHE-ECDSA-AES256-SHA",
    "TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA": "ECDHE-RSA-AES128-SHA",
    "TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA": "ECDHE-RSA-AES256-SHA",
    "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256": "ECDHE-ECDSA-AES128-GCM-SHA256",
    "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256": "ECDHE-RSA-AES128-GCM-SHA256",
    "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384": "ECDHE-ECDSA-AES256-GCM-SHA384",
    "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384": "ECDHE-RSA-AES256-GCM-SHA384",
    "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-ECDSA-CHACHA20-POLY1305",
    "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256": "ECDHE-RSA-CHACHA20-POLY1305",
}
_TLS13_SUITES = frozenset({"TLS_AES_128_GCM_SHA256", "TLS_AES_256_GCM_SHA384", "TLS_CHACHA20_POLY1305_SHA256"})
_TLS_VERSIONS = {
    TLSVersion.TLS10: ssl.TLSVersion.TLSv1,
    TLSVersion.TLS11: ssl.TLSVersion.TLSv1_1,
    TLSVersion.TLS12: ssl.TLSVersion.TLSv1_2,
    TLSVersion.TLS13: ssl.TLSVersion.TLSv1_3,
}
# Go's client_auth_type as Python's ssl can serve it. Python verifies every certificate it asks for, so
# RequestClientCert (ask, never check) asks for none, which authenticates no less: healer reads no
# certificate it has not verified. RequireAnyClientCert (require one, never check) cannot be served.
_VERIFY_MODES = {
    ClientAuthType.NO_CLIENT_CERT: ssl.CERT_NONE,
    ClientAuthType.REQUEST_CLIENT_CERT: ssl.CERT_NONE,
    ClientAuthType.VERIFY_CLIENT_CERT_IF_GIVEN: ssl.CERT_OPTIONAL,
    ClientAuthType.REQUIRE_AND_VERIFY_CLIENT_CERT: ssl.CERT_REQUIRED,
}


def _no_password() -> str:
    # An encrypted key fails to load (as the toolkit refuses it) instead of prompting on the terminal.
    return ""


def server_ssl_context(tls: TLSServerConfig) -> ssl.SSLContext:
    """The SSLContext that serves `tls_server_config`; StartupError names the key at fault and never a secret."""
    if tls.client_auth_type not in _VERIFY_MODES:
        raise StartupError(
            f"tls_server_config.client_auth_type: healer cannot serve {tls.client_auth_type} (a client certificate"
            " required but never verified); use RequireAndVerifyClientCert with client_ca_file"
        )
    if tls.client_allowed_sans:
        raise StartupError(
            "tls_server_config.client_allowed_sans: not implemented by healer yet; remove it (every certificate"
            " client_ca_file signs is accepted) or issue client certificates from a CA of their own"
        )
    if tls.curve_preferences:
        raise StartupError(
            "tls_server_config.curve_preferences: not implemented by healer (OpenSSL chooses the curves); remove it"
        )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = _TLS_VERSIONS[tls.min_version]
    context.maximum_version = _TLS_VERSIONS[tls.max_version]
    if tls.prefer_server_cipher_suites:
        context.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    if tls.cipher_suites:
        unknown = [name for name in tls.cipher_suites if name not in _CIPHERS and name not in _TLS13_SUITES]
        if unknown:
            raise StartupError(f"tls_server_config.cipher_suites: unknown suite {', '.join(unknown)} (Go's names)")
        names = [_CIPHERS[name] for name in tls.cipher_suites if name in _CIPHERS]
        if names:
            try:
                context.set_ciphers(":".join(names))
            except ssl.SSLError:
                raise StartupError("tls_server_config.cipher_suites: OpenSSL offers none of them") from None
    with tempfile.TemporaryDirectory(prefix="healer-tls-") as folder:
        # An inline cert or key is loaded through a file only healer's user can read, removed at once.
        cert = tls.cert_file or _private_file(Path(folder) / "cert.pem", tls.cert or "")
        key = tls.key_file or _private_file(
            Path(folder) / "key.pem", tls.key.get_secret_value() if tls.key is not None else ""
        )
        what = "cert_file and key_file" if tls.cert_file and tls.key_file else "cert and key"
        try:
            context.load_cert_chain(cert, key, password=_no_password)
        except (ssl.SSLError, OSError) as exc:
            raise StartupError(
                f"tls_server_config.{what}: not a PEM certificate and its unencrypted private key ({_ssl_reason(exc)})"
            ) from None
    context.verify_mode = _VERIFY_MODES[tls.client_auth_type]
    if context.verify_mode != ssl.CERT_NONE:
        try:
            if tls.client_ca_file is not None:
                context.load_verify_locations(cafile=tls.client_ca_file)
            else:
                context.load_verify_locations(cadata=tls.client_ca or "")
        except (ssl.SSLError, OSError, ValueError) as exc:
            raise StartupError(
                f"tls_server_config.client_ca_file: no usable PEM certificate ({_ssl_reason(exc)})"
            ) from None
    return context


def _serving_context(access: Access, web_path: Path | None) -> ssl.SSLContext | None:
    """The context to serve HTTPS with, None for HTTP; StartupError names the web config file and the key."""
    if access.tls is None:
        return None
    try:
        return server_ssl_context(access.tls)
    except StartupError as exc:
        raise StartupError(f"{web_path}: {exc}") from None


def _private_file(path: Path, text: str) -> Path:
    path.touch(mode=0o600)
    path.write_text(text)
    return path


def _ssl_reason(exc: BaseException) -> str:
    """OpenSSL's reason (KEY_VALUES_MISMATCH, NO_START_LINE...) or the OS error: never a file's content."""
    return str(getattr(exc, "reason", None) or getattr(exc, "strerror", None) or type(exc).__name__)


def _listen_address(config: HealerConfig, override: str | None, access: Access) -> tuple[str, int]:
    host, port = split_listen(override or config.server.listen)
    if not is_loopback(host) and access.no_credentials:
        raise StartupError(
            f"refusing to listen on {host}:{port} without a bearer token or any other credential: give users or"
            " tokens in a web config file (--web.config.file), or listen on 127.0.0.1"
        )
    return host, port


async def _serve(
    config: HealerConfig, host: str, port: int, access: Access, ssl_context: ssl.SSLContext | None = None
) -> None:
    from prometheus_client import disable_created_metrics

    from healer.healing.routes import ENGINE
    from healer.limits import LimitedAppRunner
    from healer.server import create_app
    from healer.storage import open_storage

    # `_created` series double the series count and nothing in healer's rules reads them.
    disable_created_metrics()  # type: ignore[no-untyped-call]
    # The address actually served (--listen may override the config) also names the replica by default.
    server = config.server.model_copy(update={"listen": f"{host}:{port}"})
    config = config.model_copy(update={"server": server})
    app = create_app(config, storage=await open_storage(config.store), access=access)
    # The runner's connections time out slow request heads and bodies (server.header_timeout, body_timeout).
    runner = LimitedAppRunner(app, shutdown_timeout=config.server.shutdown_timeout, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, ssl_context=ssl_context)
    await site.start()
    bound = runner.addresses
    address = f"{bound[0][0]}:{bound[0][1]}" if bound else f"{host}:{port}"
    scheme = "https" if ssl_context is not None else "http"
    if config.server.external_url is None:
        app[ENGINE].escalator.external_url = f"{scheme}://{address}"
    # The modules, config and app built so far live as long as the process. Freezing them keeps the
    # collector from walking them on every full collection: 13% more webhook throughput with 50-alert
    # deliveries (bench/receiver.py).
    gc.freeze()
    log.info("listening", extra=fields(address=address, scheme=scheme, version=__version__))
    # Once healer is up: a store or config that stops the start says so in one line, without this beside it.
    if root_warning := run_as_root_warning(config.strategies):
        log.warning("strategies run as root", extra=fields(warning=root_warning))

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    log.info("shutting down")
    await runner.cleanup()
    log.info("stopped")


def serve(path: Path, listen: str | None, log_format: str | None, web_config_file: Path | None = None) -> int:
    """Run healer until SIGTERM or SIGINT; return the exit code."""
    config = _load_or_report(path)
    if config is None:
        return EXIT_CONFIG
    access = _access_or_report(config, path, web_config_file)
    if access is None:
        return EXIT_USAGE
    configure_logging(log_format or config.server.log_format, config.server.log_level)
    try:
        host, port = _listen_address(config, listen, access)
        context = _serving_context(access, web_config_file or config.server.web_config_file)
    except (StartupError, ValueError, OSError) as exc:
        log.error("cannot start", extra=fields(reason=str(exc)))
        return EXIT_USAGE
    from healer.storage import StoreUnavailableError

    try:
        asyncio.run(_serve(config, host, port, access, context))
    except (OSError, StoreUnavailableError) as exc:
        log.error("cannot start", extra=fields(reason=str(exc)))
        return EXIT_USAGE
    return EXIT_OK


# The option of `healer status` that sets each key of its client config, to name it in an error.
_STATUS_OPTIONS = {
    "bearer_token_file": "--bearer-token-file",
    "basic_auth.username": "--basic-auth-user",
    "basic_auth.password_file": "--basic-auth-password-file",
    "basic_auth": "--basic-auth-user and --basic-auth-password-file",
    "tls_config.ca_file": "--ca-file",
    "tls_config.cert_file": "--cert-file",
    "tls_config.key_file": "--key-file",
    "tls_config": "--ca-file, --cert-file and --key-file",
}


def status_client(args: argparse.Namespace) -> HTTPClientConfig:
    """The client config of `healer status`'s credential and TLS options, checked as healer checks its own clients'
    (files readable, a secret file not empty, a key matching its certificate); StatusOptionsError names the option."""
    raw: dict[str, Any] = {}
    if args.bearer_token_file is not None:
        raw["bearer_token_file"] = args.bearer_token_file
    if args.basic_auth_user is not None or args.basic_auth_password_file is not None:
        if args.basic_auth_user is None or args.basic_auth_password_file is None:
            raise StatusOptionsError("--basic-auth-user and --basic-auth-password-file go together: give both")
        raw["basic_auth"] = {"username": args.basic_auth_user, "password_file": args.basic_auth_password_file}
    tls = {key: value for key in ("ca_file", "cert_file", "key_file") if (value := getattr(args, key)) is not None}
    if tls:
        raw["tls_config"] = tls
    try:
        return HTTPClientConfig.model_validate(raw)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            where = ".".join(str(part) for part in error["loc"])
            message = str(error["msg"]).removeprefix("Value error, ")
            problems.append(f"{_STATUS_OPTIONS.get(where, where or 'options')}: {message}")
        raise StatusOptionsError("; ".join(problems)) from None


def status(url: str, as_json: bool, client: HTTPClientConfig | None = None) -> int:
    """Fetch and print the status report of a running healer, with the credential and CA of `client`."""
    from healer.status import render_status

    client = client or HTTPClientConfig()
    headers = {"Accept": "application/json"}
    if (authorization := client.authorization()) is not None:
        headers["Authorization"] = authorization
    # The user names healer's URL; only its status path is appended.
    request = urllib.request.Request(f"{url.rstrip('/')}/api/v1/status", headers=headers)  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=15, context=client.client_ssl_context()) as response:  # noqa: S310
            report = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        print(_status_refusal(url, exc, authorization is not None), file=sys.stderr)
        return EXIT_USAGE
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"cannot read the status from {url}: {exc}", file=sys.stderr)
        return EXIT_USAGE
    print(json.dumps(report, indent=2) if as_json else render_status(report))
    return EXIT_OK


def _status_refusal(url: str, exc: urllib.error.HTTPError, sent_credential: bool) -> str:
    """What `healer status` says when healer answers with an error: for 401 and 403, that it was refused and
    what to give; healer's JSON error is quoted (it never carries a credential)."""
    try:
        reason = str(json.loads(exc.read())["error"])
    except (ValueError, KeyError, TypeError, OSError):
        reason = exc.reason
    if exc.code == 401:
        hint = (
            "the credential given is not valid"
            if sent_credential
            else "give a viewer's credential: --bearer-token-file FILE, or --basic-auth-user USER with"
            " --basic-auth-password-file FILE"
        )
        return f"healer at {url} refused the status request: 401 Unauthorized ({reason}); {hint}"
    if exc.code == 403:
        return f"healer at {url} refused the status request: 403 Forbidden ({reason}); use a viewer's credential"
    return f"cannot read the status from {url}: HTTP {exc.code} ({reason})"


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `healer` console script."""
    args = _parser().parse_args(argv)
    if args.command == "check-config":
        return check_config(args.config, args.web_config_file)
    if args.command == "status":
        try:
            client = status_client(args)
        except StatusOptionsError as exc:
            print(f"healer status: {exc}", file=sys.stderr)
            return EXIT_USAGE
        return status(args.url, args.json, client)
    if args.command == "demo":
        from healer.demo import run_demo

        return run_demo(args.scenario, keep=args.keep, workdir=args.workdir, report=args.report)
    if args.command == "test-alert":
        return test_alert(args.config, args.payload, args.json)
    if args.command == "store":
        return store_command(args.store_command, args.file, getattr(args, "output", None))
    if args.command == "serve":
        return serve(args.config, args.listen, args.log_format, args.web_config_file)
    raise AssertionError(f"unhandled command {args.command}")
