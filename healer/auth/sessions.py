"""Sessions for people who log in to the console, and the CSRF tokens of browser requests.

A session is a random id in an HttpOnly, SameSite=Strict cookie. What it stands for (the user's identity, its
expiry, who ended it and when) is kept in the store that healer is handed (`SessionStore`), keyed by the id's
SHA-256 digest: the id itself is kept nowhere. So every replica on one store knows every session, and a restart
signs nobody out. A replica remembers a session it found for at most `CACHE_SECONDS`, so that a console that
polls does not ask the store at every request; a logout on another replica therefore takes effect here within
that bound (on the replica that signs out, at once).

The CSRF token of a session is an HMAC of its id with a secret drawn once per store and kept there, the same
for every replica; a browser that authenticates with HTTP Basic gets an HMAC of its user name instead.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
import string
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from aiohttp import web

from healer.auth.roles import CredentialKind, Identity

COOKIE_NAME = "healer_session"
CSRF_HEADER = "X-CSRF-Token"
# A shift and then some: a person logs in again after at most this long.
SESSION_SECONDS = 12 * 3600
# Open sessions kept at the most; when full, the oldest open session is closed to make room.
MAX_SESSIONS = 10_000
# Who the store records as having closed a session that made room for a new one at MAX_SESSIONS.
CLOSED_FOR_ROOM = "healer (session limit)"
# How long a replica trusts a session it found in the store without asking again: the bound within which a
# logout on another replica takes effect here. Short, since a signed-out person must be out at once.
CACHE_SECONDS = 1.0
# Store lookups of sessions this replica does not remember, at once: anyone can send a cookie that looks like
# a session id, and a flood of them must queue here, not ahead of the webhook's writes in the store.
MAX_STORE_LOOKUPS = 2
# A session id is `secrets.token_urlsafe(ID_BYTES)`: 43 characters of the URL-safe alphabet. Anything else is
# no session, and is answered without asking the store.
ID_BYTES = 32
_ID_LENGTH = 43
_ID_ALPHABET = frozenset(string.ascii_letters + string.digits + "-_")


class SessionsNotStartedError(RuntimeError):
    """A CSRF token was asked for before `Sessions.start` read the shared secret from the store."""


@dataclass(frozen=True)
class SessionRecord:
    """What the store keeps of an open session: whose it is and until when."""

    identity: Identity
    expires: float
    # A digest of the password hash the user logged in with: a changed password ends the session.
    credential: bytes = b""


class SessionStore(Protocol):
    """Where sessions live, shared by every replica (the storage layer's SessionRecords). Every method is one
    transaction and raises the store's unavailability error when it cannot answer; healer answers that 503."""

    async def open(
        self, digest: bytes, identity: Identity, now: float, expires: float, limit: int, credential: bytes = b""
    ) -> None:
        """Record a new session by its id's digest (and the digest of the credential it was opened with); when
        `limit` sessions are open, close the oldest first."""
        ...

    async def lookup(self, digest: bytes, now: float) -> SessionRecord | None:
        """The session of this digest, unless it was closed or has expired by `now`."""
        ...

    async def close(self, digest: bytes, by: str, now: float) -> Identity | None:
        """End the open session of this digest, recording who ended it and when; whose it was, or None."""
        ...

    async def purge(self, now: float) -> int:
        """Delete the sessions expired by `now`, closed or not; return how many."""
        ...

    async def csrf_secret(self, candidate: bytes) -> bytes:
        """The secret CSRF tokens derive from: the one kept already, else `candidate`, kept from now on."""
        ...


def _digest(value: str) -> bytes:
    return hashlib.sha256(value.encode()).digest()


def well_formed(value: str) -> bool:
    """Tell whether a value could be a session id at all (a cookie or a query parameter worth a lookup)."""
    return len(value) == _ID_LENGTH and _ID_ALPHABET.issuperset(value)


def _unchanged(who: Identity, credential: bytes) -> Identity | None:
    return who


@dataclass(frozen=True)
class _Cached:
    identity: Identity
    expires: float
    fresh_until: float
    credential: bytes


@dataclass
class Sessions:
    """The console's sessions in the store, this replica's short memory of them, and the CSRF secret."""

    store: SessionStore
    seconds: float = SESSION_SECONDS
    clock: Callable[[], float] = time.time
    limit: int = MAX_SESSIONS
    cache_seconds: float = CACHE_SECONDS
    # Hosts (host[:port]) besides the request's own that healer's pages are served from: server.external_url's.
    hosts: frozenset[str] = frozenset()
    # Mark the cookie Secure even on a plain HTTP request (server.external_url is https: a proxy ends TLS).
    secure: bool = False
    # The identity a session's user has under the running config, None when it is no user any more: sessions
    # outlive restarts, so a user removed from the web config must not keep the console for the rest of the day.
    # Also given the digest of the password hash the session was opened with: a changed password ends it.
    current: Callable[[Identity, bytes], Identity | None] = _unchanged
    _secret: bytes | None = None
    _cache: dict[bytes, _Cached] = field(default_factory=dict)
    # Ids the store did not know, and until when that answer stands (as long as a found one's).
    _unknown: dict[bytes, float] = field(default_factory=dict)
    _store_gate: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(MAX_STORE_LOOKUPS))

    async def start(self) -> None:
        """Read the CSRF secret from the store (the first healer on a new store draws it)."""
        self._secret = await self.store.csrf_secret(secrets.token_bytes(32))

    async def open(self, user: Identity, credential: bytes = b"") -> str:
        """Start a session for a user who has just logged in with `credential` (a digest of its password hash);
        the new id (for the cookie, never for a log)."""
        session_id = secrets.token_urlsafe(ID_BYTES)
        identity = Identity(user.name, user.roles, CredentialKind.SESSION)
        now = self.clock()
        key = _digest(session_id)
        await self.store.open(key, identity, now, now + self.seconds, self.limit, credential)
        self._remember(key, _Cached(identity, now + self.seconds, now + self.cache_seconds, credential), now)
        return session_id

    def known_here(self, value: str) -> bool:
        """Tell, without asking the store, whether `value` is a session id this replica has seen lately (to
        refuse it in a URL: a check that must not let anyone make healer query its store)."""
        return well_formed(value) and _digest(value) in self._cache

    async def close(self, session_id: str, by: str) -> Identity | None:
        """End a session (logout) on every replica, recording who ended it; whose it was, or None."""
        key = _digest(session_id)
        self._cache.pop(key, None)
        if not well_formed(session_id):
            return None
        return await self.store.close(key, by, self.clock())

    async def lookup(self, session_id: str) -> Identity | None:
        """The identity of a session that exists, is open and has not expired. A store that cannot answer
        raises (the request gets 503): the person is neither signed out nor let in."""
        if not well_formed(session_id):
            return None
        key = _digest(session_id)
        now = self.clock()
        cached = self._cache.get(key)
        if cached is None or now >= cached.fresh_until or now >= cached.expires:
            if self._unknown.get(key, float("-inf")) > now:
                return None
            async with self._store_gate:
                record = await self.store.lookup(key, now)
            if record is None:
                self._cache.pop(key, None)
                self._forget_unknown(now)
                self._unknown[key] = now + self.cache_seconds
                return None
            self._unknown.pop(key, None)
            cached = _Cached(record.identity, record.expires, now + self.cache_seconds, record.credential)
            self._remember(key, cached, now)
        return self.current(cached.identity, cached.credential)

    def _forget_unknown(self, now: float) -> None:
        if len(self._unknown) >= self.limit:  # bounded like the cache: the stale go, or all when none is
            stale = [k for k, until in self._unknown.items() if until <= now]
            for k in stale or list(self._unknown):
                del self._unknown[k]

    def _remember(self, key: bytes, cached: _Cached, now: float) -> None:
        if len(self._cache) >= self.limit:  # bounded: forget what is stale, or everything if none is
            stale = [k for k, v in self._cache.items() if now >= v.fresh_until]
            for k in stale or list(self._cache):
                del self._cache[k]
        self._cache[key] = cached

    async def authenticate(self, request: web.Request) -> Identity | None:
        """The identity of the request's session cookie (the access middleware's SESSION_AUTHENTICATOR)."""
        session_id = request.cookies.get(COOKIE_NAME)
        return await self.lookup(session_id) if session_id else None

    def _mac(self, *parts: str) -> str:
        if self._secret is None:
            raise SessionsNotStartedError("the CSRF secret is read from the store when healer starts")
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
