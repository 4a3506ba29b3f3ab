"""Sessions for people who log in to the console, and the CSRF tokens of browser requests.

A session is a random id in an HttpOnly, SameSite=Strict cookie; healer keeps what it stands for (the user's
identity and its expiry) in this process's memory, keyed by the id's digest, so each replica has its own
sessions and a restart signs everyone out. The CSRF token of a session is an HMAC of its id with a secret
drawn at start; a browser that authenticates with HTTP Basic gets an HMAC of its user name instead.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from aiohttp import web

from healer.auth.roles import CredentialKind, Identity

COOKIE_NAME = "healer_session"
CSRF_HEADER = "X-CSRF-Token"
# A shift and then some: a person logs in again after at most this long.
SESSION_SECONDS = 12 * 3600
# Sessions kept at the most; when full, the expired go first, then the oldest.
MAX_SESSIONS = 10_000


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


@dataclass(frozen=True)
class _Session:
    identity: Identity
    expires: float


@dataclass
class Sessions:
    """The sessions of this process and the secret its CSRF tokens are derived from."""

    seconds: float = SESSION_SECONDS
    clock: Callable[[], float] = time.time
    limit: int = MAX_SESSIONS
    # Hosts (host[:port]) besides the request's own that healer's pages are served from: server.external_url's.
    hosts: frozenset[str] = frozenset()
    # Mark the cookie Secure even on a plain HTTP request (server.external_url is https: a proxy ends TLS).
    secure: bool = False
    _secret: bytes = field(default_factory=lambda: secrets.token_bytes(32))
    _sessions: dict[bytes, _Session] = field(default_factory=dict)

    def open(self, user: Identity) -> str:
        """Start a session for a user who has just logged in; the new id (for the cookie, never for a log)."""
        if len(self._sessions) >= self.limit:
            self._evict()
        session_id = secrets.token_urlsafe(32)
        identity = Identity(user.name, user.roles, CredentialKind.SESSION)
        self._sessions[_digest(session_id)] = _Session(identity, self.clock() + self.seconds)
        return session_id

    def _evict(self) -> None:
        now = self.clock()
        for key in [key for key, session in self._sessions.items() if session.expires <= now]:
            del self._sessions[key]
        while len(self._sessions) >= self.limit:
            del self._sessions[next(iter(self._sessions))]  # dicts keep insertion order: the oldest

    def close(self, session_id: str) -> Identity | None:
        """End a session (logout); whose it was, or None when there was none."""
        session = self._sessions.pop(_digest(session_id), None)
        return session.identity if session is not None else None

    def lookup(self, session_id: str) -> Identity | None:
        """The identity of a session that exists and has not expired."""
        key = _digest(session_id)
        session = self._sessions.get(key)
        if session is None:
            return None
        if session.expires <= self.clock():
            del self._sessions[key]
            return None
        return session.identity

    async def authenticate(self, request: web.Request) -> Identity | None:
        """The identity of the request's session cookie (the access middleware's SESSION_AUTHENTICATOR)."""
        session_id = request.cookies.get(COOKIE_NAME)
        return self.lookup(session_id) if session_id else None

    def _mac(self, *parts: str) -> str:
        return hmac.new(self._secret, "\0".join(parts).encode(), hashlib.sha256).hexdigest()

    def csrf_token(self, request: web.Request, who: Identity) -> str | None:
        """The CSRF token a browser request of `who` must send back: None for a caller no browser sends
        by itself (a bearer token, or anyone when no credential is configured)."""
        if who.kind is CredentialKind.SESSION:
            session_id = request.cookies.get(COOKIE_NAME, "")
            return self._mac("session", session_id) if session_id else None
        if who.kind is CredentialKind.BASIC:
            return self._mac("basic", who.name)
        return None
