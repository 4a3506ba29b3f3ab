"""Access control in one place: every request is authenticated and authorised here, by the role its route needs.

Route handlers do not check credentials; they read who the caller is from `request[IDENTITY]` (or call
`require` for a finer check, as the console does for its buttons).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import urllib.parse
from collections.abc import Awaitable, Callable

from aiohttp import web

from healer.auth.access import Access
from healer.auth.roles import LOOPBACK_ANYONE, NOBODY, CredentialKind, Identity, Role
from healer.auth.sessions import CSRF_HEADER, Sessions
from healer.http import problem
from healer.logs import fields

log = logging.getLogger(__name__)

ACCESS = web.AppKey("access", Access)
# Who the request is; set on every request that reaches a handler.
IDENTITY = web.RequestKey("identity", Identity)
# How a request without an Authorization header may still prove who it is (the console's session cookie):
# the app may set one function that answers the identity or None.
SessionAuthenticator = Callable[[web.Request], Awaitable[Identity | None]]
SESSION_AUTHENTICATOR: web.AppKey[SessionAuthenticator] = web.AppKey("session_authenticator")
# The console's sessions (installed with the login routes): the CSRF tokens that browser requests send back.
SESSIONS = web.AppKey("sessions", Sessions)
# Where a browser that opens the console without any credential is sent to log in.
LOGIN_PATH = "/login"
# Posted before a session exists (or to end one): protected by an Origin check instead of a CSRF token.
ORIGIN_CHECKED = frozenset({"/login", "/logout"})
# Routes whose role is not the default (see `route_role`): (method, canonical path) -> role, None for open.
ROUTE_ROLES: web.AppKey[dict[tuple[str, str], Role | None]] = web.AppKey("route_roles")

# Names people use to pass credentials in URLs; a credential there ends up in access logs and browser
# history, so it is refused even when its value is wrong.
QUERY_CREDENTIAL_NAMES = frozenset({"token", "access_token", "bearer", "auth", "authorization", "api_key"})
# Open whatever is configured: orchestrators probe them without credentials.
OPEN_PATHS = frozenset({"/-/healthy", "/-/ready"})
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
# The routes whose role is not the default of their method.
DEFAULT_ROUTE_ROLES: dict[tuple[str, str], Role | None] = {
    ("POST", "/api/v1/alertmanager"): Role.ALERTMANAGER,
}
# Audit names that the caller states itself. Honoured only where healer cannot tell people apart anyway (no
# credential, or only the deprecated shared token); ignored once any credential of the web config exists.
CLAIMED_NAME_HEADERS = ("X-Healer-Approver", "X-Healer-Operator")


def set_route_role(app: web.Application, method: str, path: str, role: Role | None) -> None:
    """Give a route a role other than its method's default (None: open to anyone), before the app starts."""
    app.setdefault(ROUTE_ROLES, dict(DEFAULT_ROUTE_ROLES))[(method.upper(), path)] = role


def route_role(request: web.Request) -> Role | None:
    """The role a request's route needs, None when it is open. Reads need a viewer and every other method an
    operator, unless the route table says otherwise: a route added later is closed by default."""
    access = request.app[ACCESS]
    resource = request.match_info.route.resource
    # An unknown path or method still needs a viewer, so an anonymous caller cannot map the API.
    path = resource.canonical if resource is not None else None
    table = request.app.get(ROUTE_ROLES, DEFAULT_ROUTE_ROLES)
    if path in OPEN_PATHS or (path == "/metrics" and access.metrics_open):
        return None
    method = "GET" if request.method == "HEAD" else request.method
    if path is not None and (method, path) in table:
        return table[(method, path)]
    if request.method not in READ_METHODS:
        return Role.OPERATOR
    return Role.VIEWER if access.reads_closed else None


def _refusal(request: web.Request, who: Identity | None, needed: Role, failure: str) -> web.Response:
    """401 for a caller without a valid credential (with the challenge of the schemes configured), 403 for a
    role too low; the JSON body names what is wrong and the role needed."""
    if who is None or not who.roles:
        scheme = "Basic" if request.app[ACCESS].users else "Bearer"
        response = problem(401, failure, needed_role=needed)
        response.headers["WWW-Authenticate"] = f'{scheme} realm="healer"'
        return response
    log.info(
        "request refused for its role",
        extra=fields(who=who.name, role=who.role, needed=needed, method=request.method, path=request.path),
    )
    message = f"{who.name} has the role {who.role}; {request.method} {request.path} needs {needed}"
    return problem(403, message, needed_role=needed, role=who.role)


def _credential_in_url(request: web.Request, access: Access) -> web.Response | None:
    """401 when the query string carries a credential, by its name or by its value (the value is never echoed)."""
    for name, value in request.query.items():
        if name.lower() in QUERY_CREDENTIAL_NAMES:
            return problem(
                401,
                "send the token in the Authorization header, never in the URL",
                headers_hint="Authorization: Bearer <token>",
            )
        sessions = request.app.get(SESSIONS)
        if value and (access.is_credential(value) or (sessions is not None and sessions.known_here(value))):
            log.warning(
                "credential in a URL refused; rotate it if the URL was logged",
                extra=fields(parameter=name, path=request.path),
            )
            return problem(
                401,
                f"query parameter {name!r} carries a credential; send credentials in the Authorization header,"
                " never in the URL",
            )
    return None


async def _authenticate(request: web.Request, access: Access) -> tuple[Identity | None, str]:
    """The identity the request proves, or None and why not (never repeating what it sent)."""
    header = request.headers.get("Authorization")
    schemes = "'Bearer <token>' or 'Basic <user:password>'" if access.users else "'Bearer <token>'"
    if header is None:
        session = request.app.get(SESSION_AUTHENTICATOR)
        identity = await session(request) if session is not None else None
        return identity, f"missing Authorization header; expected {schemes}"
    scheme, _, presented = header.partition(" ")
    presented = presented.strip()
    if scheme.lower() == "bearer" and presented:
        return access.token_identity(presented), "the bearer token is not valid"
    if scheme.lower() == "basic" and presented and access.users:
        try:
            user, colon, password = base64.b64decode(presented, validate=True).decode().partition(":")
        except (binascii.Error, UnicodeDecodeError):
            return None, "the Basic credentials are not base64 of user:password"
        if not colon:
            return None, "the Basic credentials are not base64 of user:password"
        return await access.basic_identity(user, password), "the user name or password is not valid"
    return None, f"Authorization header must use the {'Bearer or Basic' if access.users else 'Bearer'} scheme"


def _from_browser(request: web.Request) -> bool:
    """A browser sends Origin with every POST, PUT and DELETE, and Sec-Fetch-Site with every request; curl,
    Alertmanager and scripts send neither."""
    return "Origin" in request.headers or "Sec-Fetch-Site" in request.headers


def same_origin(request: web.Request) -> bool:
    """Tell whether a request comes from healer's own pages: its Origin names this host (or the host of
    server.external_url) and Sec-Fetch-Site, when sent, says same-origin; without an Origin (or with the
    "null" of a page that hides it), Sec-Fetch-Site must not say another site sent it."""
    origin = request.headers.get("Origin")
    site = request.headers.get("Sec-Fetch-Site")
    if origin == "null":  # a page whose referrer policy hides its origin: only Sec-Fetch-Site can tell
        return site == "same-origin"
    if origin is not None:
        sessions = request.app.get(SESSIONS)
        hosts = {request.host.lower(), *(sessions.hosts if sessions is not None else ())}
        return urllib.parse.urlsplit(origin).netloc.lower() in hosts and site in {None, "same-origin"}
    return site in {None, "same-origin", "none"}


def csrf_token(request: web.Request) -> str | None:
    """The CSRF token the caller's browser must send back in X-CSRF-Token with every POST, PUT and DELETE
    (rendered into the console's page); None when its credential needs none (a bearer token)."""
    sessions = request.app.get(SESSIONS)
    return sessions.csrf_token(request, identity(request)) if sessions is not None else None


def _forgery_refusal(request: web.Request, who: Identity, path: str | None) -> web.Response | None:
    """403 for a state-changing request that a browser may have been tricked into sending: one that the
    session cookie authenticates, or HTTP Basic from a browser, without its CSRF token; a login or logout
    from another site's page. Bearer tokens are never sent by a browser on its own, so they are not asked."""
    if request.method in READ_METHODS:
        return None
    if path in ORIGIN_CHECKED:
        if same_origin(request):
            return None
        return problem(403, f"{request.method} {path} is accepted from healer's own pages only (Origin)")
    if who.kind is not CredentialKind.SESSION and not (who.kind is CredentialKind.BASIC and _from_browser(request)):
        return None
    sessions = request.app.get(SESSIONS)
    expected = sessions.csrf_token(request, who) if sessions is not None else None
    presented = request.headers.get(CSRF_HEADER, "")
    if expected is not None and presented and hmac.compare_digest(presented.encode(), expected.encode()):
        return None
    log.info(
        "request refused without its CSRF token",
        extra=fields(who=who.name, method=request.method, path=request.path, token_sent=bool(presented)),
    )
    if presented:
        message = f"the {CSRF_HEADER} header is not this session's token; reload the console"
    else:
        message = f"missing {CSRF_HEADER} header: a browser's {request.method} needs the token of the console's page"
    return problem(403, message, needed_header=CSRF_HEADER)


def _wants_login_page(request: web.Request) -> bool:
    """A browser opening the console without any credential is sent to the login form, when there are users who
    could log in there (with only tokens it would be a dead end)."""
    return (
        request.method == "GET"
        and request.path == "/"
        and "Authorization" not in request.headers
        and SESSIONS in request.app
        and bool(request.app[ACCESS].users)
    )


@web.middleware
async def access_control(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Refuse credentials in URLs, authenticate, check the route's role, and record who the caller is."""
    access = request.app[ACCESS]
    refused = _credential_in_url(request, access)
    if refused is not None:
        return refused
    if access.no_credentials:  # as before access control: anyone, and healer only listens on loopback
        request[IDENTITY] = LOOPBACK_ANYONE
        return await handler(request)
    needed = route_role(request)
    who, failure = await _authenticate(request, access)
    resource = request.match_info.route.resource
    forged = _forgery_refusal(request, who or NOBODY, resource.canonical if resource is not None else None)
    if forged is not None:
        return forged
    if needed is None:  # open: a wrong credential is ignored, as nothing is asked for
        request[IDENTITY] = who or NOBODY
        return await handler(request)
    if who is None and _wants_login_page(request):
        raise web.HTTPSeeOther(location=LOGIN_PATH)
    if who is None or not who.may(needed):
        return _refusal(request, who, needed, failure)
    request[IDENTITY] = who
    return await handler(request)


def identity(request: web.Request) -> Identity:
    """Who the request is (set by the middleware; an anonymous caller without roles if it did not run)."""
    try:
        return request[IDENTITY]
    except KeyError:  # request.get would lose the key's type
        return NOBODY


def allowed(request: web.Request, needed: Role) -> bool:
    """Tell whether the caller may do what `needed` allows, e.g. whether the console shows Approve."""
    return identity(request).may(needed)


def require(request: web.Request, needed: Role) -> Identity:
    """The caller's identity when its role satisfies `needed`; else raise 401 (no credential) or 403 (too low),
    with the same JSON body as the middleware's."""
    who = identity(request)
    if who.may(needed):
        return who
    refusal = _refusal(request, who, needed, f"{request.method} {request.path} needs {needed}; log in")
    error = web.HTTPUnauthorized if refusal.status == 401 else web.HTTPForbidden
    raise error(body=refusal.body, headers=refusal.headers)


def actor(request: web.Request) -> str:
    """The name the audit trail records for the caller: the authenticated identity's. Where healer cannot tell
    people apart (no credential, or only the deprecated shared token), a name the caller states in
    X-Healer-Approver or X-Healer-Operator is added as a claim, never in place of the identity: "legacy-token
    (says alice)"; it is ignored otherwise."""
    who = identity(request)
    if not request.app[ACCESS].names_people:
        for header in CLAIMED_NAME_HEADERS:
            claimed = " ".join(request.headers.get(header, "").split())[:64]
            if claimed:
                return f"{who.name} (says {claimed})"
    return who.name
