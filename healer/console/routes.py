"""Serve the console: the page, rendered per request, and its two static files, vendored in this package.

The page holds no data of its own: its script reads the same JSON API as every other client, with
the browser's credentials, and polls it. Everything it sends is rendered as text, never as markup.
"""

from __future__ import annotations

import hashlib
import html
import json
import string
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

from aiohttp import web

from healer import __version__
from healer.auth import CredentialKind, Role, allowed, csrf_token, identity, set_route_role
from healer.config import HealerConfig

# Grafana dashboards shipped in grafana/dashboards, by their uid.
DASHBOARDS = {"healer-overview": "healer overview", "healer-host-app": "host and application"}
# Nothing the page loads or sends leaves healer: its script and style sheet are served from here, and
# links to Prometheus, Alertmanager and Grafana are navigations, not requests of the page.
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # no-referrer would make its forms' Origin "null"
    "Cache-Control": "no-store",
}
STATIC_TYPES = {"console.js": "text/javascript", "console.css": "text/css"}
# Ends the session (a plain form: logout is accepted from healer's own pages, by their Origin).
LOGOUT_FORM = '<form method="post" action="/logout" class="logout"><button type="submit">Sign out</button></form>'


def _no_token(request: web.Request) -> str | None:
    return None


def _may_operate(request: web.Request) -> bool:
    return True


def _nobody(request: web.Request) -> str | None:
    return None


def _no_session(request: web.Request) -> bool:
    return False


@dataclass(frozen=True)
class ConsoleAccess:
    """What the page asks of access control for the request that it answers.

    INTEGRATION POINT for access control (issue 12): set `app[CONSOLE_ACCESS]` to one built from the
    request's session. `csrf_token` is rendered into `<meta name="healer-csrf-token">`, and the script
    sends it back as the `X-CSRF-Token` header of every POST and DELETE (checking it is the server's
    part, not the console's); `can_operate` false hides approve, reject, pause, unpause, close-circuit
    and goal-cancel controls (the API must refuse them anyway); `identity` is shown as "signed in as".
    `signed_in` true shows a Sign out button (a session cookie, which logging out ends).
    The defaults, for a healer with no credentials configured: no token, everyone operates, no name.
    """

    csrf_token: Callable[[web.Request], str | None] = _no_token
    can_operate: Callable[[web.Request], bool] = _may_operate
    identity: Callable[[web.Request], str | None] = _nobody
    signed_in: Callable[[web.Request], bool] = _no_session


def _operator(request: web.Request) -> bool:
    return allowed(request, Role.OPERATOR)


def _name(request: web.Request) -> str | None:
    who = identity(request)
    return None if who.kind is CredentialKind.ANONYMOUS else who.name


def _session(request: web.Request) -> bool:
    return identity(request).kind is CredentialKind.SESSION


# What the page asks of access control, answered from the request's identity (healer.auth's middleware):
# operator controls for the operator role, the credential's name, and the session's CSRF token.
SIGNED_IN_ACCESS = ConsoleAccess(csrf_token=csrf_token, can_operate=_operator, identity=_name, signed_in=_session)


CONSOLE_ACCESS = web.AppKey("console_access", ConsoleAccess)


@dataclass(frozen=True)
class Asset:
    """A static file of the console with its content type and a digest that versions its URL."""

    body: bytes
    content_type: str

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.body).hexdigest()[:16]


def _read(name: str) -> bytes:
    return resources.files("healer.console").joinpath("static", name).read_bytes()


def _public_url(url: str | None) -> str | None:
    """`url` without any user name or password in it (a URL in the config may carry them)."""
    if url is None:
        return None
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # an IPv6 literal
        host = f"[{host}]"
    netloc = f"{host}:{parts.port}" if parts.port is not None else host
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def links(config: HealerConfig) -> dict[str, Any]:
    """Where the page links to: Prometheus, Alertmanager and Grafana's dashboards, when configured."""
    grafana = _public_url(config.grafana.url)
    return {
        "prometheus": _public_url(config.prometheus.url),
        "alertmanager": _public_url(config.alertmanager.url),
        "grafana": grafana,
        "dashboards": [{"title": title, "url": f"{grafana}/d/{uid}"} for uid, title in DASHBOARDS.items()]
        if grafana
        else [],
    }


def _script_json(value: Any) -> str:
    """JSON safe inside a <script type="application/json"> element: no `<` can close it."""
    return json.dumps(value, separators=(",", ":")).replace("<", "\\u003c").replace(">", "\\u003e")


class Console:
    """The page template and static files, read once from the package."""

    def __init__(self) -> None:
        self.template = string.Template(_read("index.html").decode())
        self.assets = {name: Asset(_read(name), kind) for name, kind in STATIC_TYPES.items()}

    def render(self, config: HealerConfig, access: ConsoleAccess, request: web.Request) -> str:
        operate = access.can_operate(request)
        who = access.identity(request)
        session = access.signed_in(request)
        settings = {
            "links": links(config),
            "canOperate": operate,
            "session": session,
            "pollSeconds": 2,
            "version": __version__,
        }
        return self.template.substitute(
            version=html.escape(__version__),
            csrf_token=html.escape(access.csrf_token(request) or ""),
            identity=html.escape(f"signed in as {who}" if who else ""),
            logout=LOGOUT_FORM if session else "",
            settings=_script_json(settings),
            js_version=self.assets["console.js"].digest,
            css_version=self.assets["console.css"].digest,
        )


CONSOLE = web.AppKey("console", Console)
CONFIG = web.AppKey("console_config", HealerConfig)


async def page(request: web.Request) -> web.Response:
    """The console's page; its script fills it from the API."""
    app = request.app
    access = app.get(CONSOLE_ACCESS) or ConsoleAccess()
    body = app[CONSOLE].render(app[CONFIG], access, request)
    return web.Response(text=body, content_type="text/html", charset="utf-8", headers=SECURITY_HEADERS)


async def asset(request: web.Request) -> web.Response:
    """The console's script or style sheet; its URL carries its digest, so a browser may keep it."""
    found = request.app[CONSOLE].assets.get(request.match_info["name"])
    if found is None:
        raise web.HTTPNotFound()
    headers = {"Cache-Control": "public, max-age=86400", "X-Content-Type-Options": "nosniff"}
    return web.Response(body=found.body, content_type=found.content_type, charset="utf-8", headers=headers)


def add_console_routes(app: web.Application, config: HealerConfig) -> None:
    """Serve the console at `/` and its files under `/console/`."""
    app[CONSOLE] = Console()
    app[CONFIG] = config
    app.router.add_get("/", page)
    app.router.add_get("/console/{name}", asset)
    # The script and style sheet are public (the login form uses the style sheet before anyone has logged in).
    set_route_role(app, "GET", "/console/{name}", None)
