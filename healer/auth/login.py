"""The console's login for people: a form that checks a user of basic_auth_users and opens a session.

`GET /login` serves the form, `POST /login` checks the password (bcrypt, off the event loop) and sets the
session cookie, `POST /logout` ends the session, and `GET /login/basic` lets a browser use its own HTTP
Basic prompt instead. Login and logout are accepted from healer's own pages only (Origin, and the cookie
is SameSite=Strict), so another site cannot log a browser in as someone else.
"""

from __future__ import annotations

import hmac
import html
import logging
import urllib.parse

from aiohttp import web

from healer.auth.middleware import ACCESS, LOGIN_PATH, SESSION_AUTHENTICATOR, SESSIONS, identity, set_route_role
from healer.auth.roles import CredentialKind, Identity
from healer.auth.sessions import COOKIE_NAME, Sessions, SessionStore
from healer.logs import fields

log = logging.getLogger(__name__)

# The form has no script: nothing but its style sheet loads, and it posts to healer only.
LOGIN_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src data:; form-action 'self'; base-uri 'none';"
        " frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",  # no-referrer would make its forms' Origin "null"
    "Cache-Control": "no-store",
}
_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">
<title>Sign in · healer</title>
<link rel="icon" href="data:,">
<link rel="stylesheet" href="/console/console.css">
</head>
<body>
<main>
<section class="card" aria-labelledby="login-heading">
<h1 id="login-heading">Sign in to healer</h1>
{message}
<form method="post" action="{login}">
<label for="username">User name</label>
<input id="username" name="username" type="text" autocomplete="username" required autofocus>
<label for="password">Password</label>
<input id="password" name="password" type="password" autocomplete="current-password" required>
<p><button type="submit" class="primary">Sign in</button></p>
</form>
<p class="muted"><a href="{login}/basic">Sign in with the browser's password prompt (HTTP Basic) instead</a></p>
</section>
</main>
</body>
</html>
"""


def _page(status: int, message: str = "") -> web.Response:
    notice = f'<p class="notice" role="alert">{html.escape(message)}</p>' if message else ""
    body = _PAGE.format(message=notice, login=LOGIN_PATH)
    return web.Response(status=status, text=body, content_type="text/html", charset="utf-8", headers=LOGIN_HEADERS)


async def login_page(request: web.Request) -> web.Response:
    """The login form."""
    return _page(200)


def _see_other(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, "Cache-Control": "no-store"})


async def login(request: web.Request) -> web.Response:
    """Check the form's user name and password; on success open a session and go to the console."""
    form = await request.post()
    user, password = form.get("username"), form.get("password")
    if not isinstance(user, str) or not isinstance(password, str) or not user or not password:
        return _page(400, "Enter a user name and a password.")
    access = request.app[ACCESS]
    who = await access.basic_identity(user, password)
    if who is None:
        # A name that is no user may be a password typed in the wrong field: it is not logged.
        known = {"user": user} if user in access.users else {}
        log.info("login refused", extra=fields(reason="wrong user name or password", **known))
        return _page(401, "The user name or password is not valid.")
    sessions = request.app[SESSIONS]
    previous = request.cookies.get(COOKIE_NAME)
    if previous:  # a new id at every login: a cookie planted before it never becomes a session
        await sessions.close(previous, who.name)
    session_id = await sessions.open(who, access.credential_of(who.name))
    response = _see_other("/")
    response.set_cookie(
        COOKIE_NAME,
        session_id,
        max_age=int(sessions.seconds),
        path="/",
        httponly=True,
        samesite="Strict",
        secure=request.secure or sessions.secure,
    )
    log.info("signed in", extra=fields(user=who.name, role=who.role))
    return response


async def logout(request: web.Request) -> web.Response:
    """End the session of the request's cookie, if any, and go back to the login form."""
    session_id = request.cookies.get(COOKIE_NAME)
    ended = await request.app[SESSIONS].close(session_id, identity(request).name) if session_id else None
    if ended is not None:
        log.info("signed out", extra=fields(user=ended.name))
    response = _see_other(LOGIN_PATH)
    response.del_cookie(COOKIE_NAME, path="/")
    return response


async def basic_login(request: web.Request) -> web.Response:
    """Needs a viewer, so a browser without credentials gets the HTTP Basic challenge and prompts; once it
    has them, on to the console."""
    return _see_other("/")


async def _start_sessions(app: web.Application) -> None:
    await app[SESSIONS].start()


def add_login_routes(app: web.Application, store: SessionStore, external_url: str | None = None) -> Sessions:
    """Serve the login form and accept the session cookie as its user's identity, with the sessions kept in
    `store` (shared by every replica on it); the sessions, whose CSRF tokens the console renders, read their
    secret from the store when the app starts. `external_url`: where people reach healer (its host may post
    the form, and an https URL makes the cookie Secure even behind a TLS-terminating proxy). Needs app[ACCESS]:
    a session has the roles its user has in the running config, and ends with the user."""
    parts = urllib.parse.urlsplit(external_url) if external_url else None
    users = app[ACCESS].users

    def current(who: Identity, credential: bytes) -> Identity | None:
        entry = users.get(who.name)
        if entry is None or not hmac.compare_digest(credential, app[ACCESS].credential_of(who.name)):
            return None  # no user any more, or its password changed since the login
        return Identity(who.name, entry[1].roles, CredentialKind.SESSION)

    sessions = Sessions(
        store,
        hosts=frozenset({parts.netloc.lower()}) if parts is not None and parts.netloc else frozenset(),
        secure=parts is not None and parts.scheme == "https",
        current=current,
    )
    app[SESSIONS] = sessions
    app[SESSION_AUTHENTICATOR] = sessions.authenticate
    app.on_startup.append(_start_sessions)
    for method in ("GET", "POST"):
        set_route_role(app, method, LOGIN_PATH, None)
    set_route_role(app, "POST", "/logout", None)
    app.router.add_get(LOGIN_PATH, login_page)
    app.router.add_post(LOGIN_PATH, login)
    app.router.add_post("/logout", logout)
    app.router.add_get(LOGIN_PATH + "/basic", basic_login)
    return sessions
