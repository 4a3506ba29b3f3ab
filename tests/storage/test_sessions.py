"""The console sessions' storage contract, on every backend: a session is found by its id's digest until it is
closed or expires, whoever closed it is recorded, the open sessions stay within their limit, expired ones are
purged, and the CSRF secret is drawn once per store. The last tests drive `healer.auth.Sessions` on the records
as two replicas would."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from typing import Any, cast

from healer.auth import CredentialKind, Identity, Role, Sessions
from healer.auth.sessions import CACHE_SECONDS, CLOSED_FOR_ROOM, MAX_STORE_LOOKUPS, SessionRecord
from healer.storage import Storage
from tests.storage.support import Backend, FakeClock

ALICE = Identity("alice", frozenset({Role.OPERATOR}), CredentialKind.SESSION)
BOB = Identity("bob", frozenset({Role.VIEWER}), CredentialKind.SESSION)


def digest(name: str) -> bytes:
    return hashlib.sha256(name.encode()).digest()


async def kept(storage: Storage) -> list[tuple[str, str, float | None, str | None]]:
    """Every session row as stored (user, the digest's hex, closed at, closed by), oldest first."""
    database = cast(Any, storage).database  # both backends read one statement the same way
    rows = await database.read("SELECT digest, user_name, closed_at, closed_by FROM sessions ORDER BY id")
    return [(row["user_name"], bytes(row["digest"]).hex(), row["closed_at"], row["closed_by"]) for row in rows]


async def test_a_session_is_found_until_it_is_closed_or_expires(backend: Backend, clock: FakeClock) -> None:
    """A session reads back with its identity after the store reopens; closing records who and when and ends it
    at once; an expired one is not found; purge deletes the expired, closed or not, and keeps the rest."""
    storage = await backend.open()
    await storage.sessions.open(digest("a"), ALICE, clock.now, clock.now + 60, 100)
    await storage.sessions.open(digest("b"), BOB, clock.now, clock.now + 30, 100)
    await backend.close(storage)
    storage = await backend.open()
    assert await storage.sessions.lookup(digest("a"), clock.now) == SessionRecord(ALICE, clock.now + 60)
    assert await storage.sessions.lookup(digest("unknown"), clock.now) is None
    assert await storage.sessions.close(digest("a"), "alice", clock.now + 1) == ALICE
    assert await storage.sessions.lookup(digest("a"), clock.now + 1) is None
    assert await storage.sessions.close(digest("a"), "alice", clock.now + 2) is None  # closed already
    assert await storage.sessions.lookup(digest("b"), clock.now + 29) == SessionRecord(BOB, clock.now + 30)
    assert await storage.sessions.lookup(digest("b"), clock.now + 30) is None
    assert await storage.sessions.close(digest("b"), "bob", clock.now + 31) is None  # expired: nothing to end
    assert await kept(storage) == [
        ("alice", digest("a").hex(), clock.now + 1, "alice"),
        ("bob", digest("b").hex(), None, None),
    ]
    assert await storage.sessions.purge(clock.now + 30) == 1
    assert [user for user, *_ in await kept(storage)] == ["alice"]
    assert await storage.sessions.purge(clock.now + 60) == 1
    assert await kept(storage) == []


async def test_at_the_limit_the_oldest_open_session_makes_room(storage: Storage, clock: FakeClock) -> None:
    """Expired sessions do not count against the limit and are deleted when it is reached; then the oldest open
    session is closed, by the session limit, and every other one stays open."""
    sessions = storage.sessions
    await sessions.open(digest("expiring"), BOB, clock.now, clock.now + 10, 2)
    await sessions.open(digest("oldest"), ALICE, clock.now, clock.now + 100, 2)
    now = clock.advance(20)
    await sessions.open(digest("newer"), BOB, now, now + 100, 2)  # one open before it: no room needed
    await sessions.open(digest("newest"), ALICE, now, now + 100, 2)
    assert await sessions.lookup(digest("oldest"), now) is None
    assert await sessions.lookup(digest("newer"), now) == SessionRecord(BOB, now + 100)
    assert await sessions.lookup(digest("newest"), now) == SessionRecord(ALICE, now + 100)
    assert [(user, closed_by) for user, _, _, closed_by in await kept(storage)] == [
        ("alice", CLOSED_FOR_ROOM),
        ("bob", None),
        ("alice", None),
    ]


async def test_the_csrf_secret_is_drawn_once_per_store(backend: Backend) -> None:
    """The first secret offered is kept; a later start (another replica, or after a restart) reads it back."""
    storage = await backend.open()
    first = bytes(range(32))
    assert await storage.sessions.csrf_secret(first) == first
    await backend.close(storage)
    storage = await backend.open()
    assert await storage.sessions.csrf_secret(bytes(32)) == first


async def test_sessions_expire_and_stay_bounded(storage: Storage, clock: FakeClock) -> None:
    """Through Sessions: a login's session has the user's roles as a session credential; past its expiry it is
    gone; when the limit is reached the oldest session makes room."""
    sessions = Sessions(storage.sessions, seconds=60, clock=clock, limit=2)
    alice = Identity("alice", frozenset({Role.OPERATOR}), CredentialKind.BASIC)
    first = await sessions.open(alice)
    found = await sessions.lookup(first)
    assert found is not None and found.kind is CredentialKind.SESSION and found.may(Role.OPERATOR)
    clock.advance(61)
    assert await sessions.lookup(first) is None
    second, third, fourth = [await sessions.open(alice) for _ in range(3)]
    assert await sessions.lookup(second) is None
    assert await sessions.lookup(third) == await sessions.lookup(fourth) == ALICE


async def test_a_logout_on_one_replica_ends_the_session_on_another_within_the_cache_bound(
    backend: Backend, clock: FakeClock
) -> None:
    """Two replicas' Sessions on one store: a session opened on A reads on B; after B ends it, A may still answer
    from its memory for at most CACHE_SECONDS, then refuses it. The store keeps the id's digest, never the id."""
    storage = await backend.open()
    replica_a = Sessions(storage.sessions, clock=clock)
    replica_b = Sessions(storage.sessions, clock=clock)
    session_id = await replica_a.open(Identity("alice", frozenset({Role.OPERATOR}), CredentialKind.BASIC))
    assert await replica_b.lookup(session_id) == ALICE
    assert await replica_a.lookup(session_id) == ALICE
    assert await replica_b.close(session_id, "alice") == ALICE
    assert await replica_b.lookup(session_id) is None
    clock.advance(CACHE_SECONDS / 2)
    assert await replica_a.lookup(session_id) == ALICE  # remembered: the bound, not longer
    clock.advance(CACHE_SECONDS / 2)
    assert await replica_a.lookup(session_id) is None
    [(user, stored, _, closed_by)] = await kept(storage)
    assert (user, stored, closed_by) == ("alice", digest(session_id).hex(), "alice")
    await backend.close(storage)
    if backend.name == "sqlite":
        assert session_id.encode() not in backend.path.read_bytes()


async def test_cookies_nobody_was_given_cost_the_store_one_lookup_each_at_most(storage: Storage) -> None:
    """Anyone can send session-shaped cookies: a repeated unknown one is answered from memory within the cache
    bound, no more than MAX_STORE_LOOKUPS lookups run at once however many arrive, and a session id in a URL is
    recognised without asking the store."""
    asked: list[int] = []
    running = 0

    class Counting:
        def __getattr__(self, name: str) -> Any:
            return getattr(storage.sessions, name)

        async def lookup(self, key: bytes, now: float) -> SessionRecord | None:
            nonlocal running
            running += 1
            asked.append(running)
            try:
                await asyncio.sleep(0.01)
                return await storage.sessions.lookup(key, now)
            finally:
                running -= 1

    sessions = Sessions(cast(Any, Counting()))
    forged = [secrets.token_urlsafe(32) for _ in range(20)]
    assert await asyncio.gather(*(sessions.lookup(value) for value in forged)) == [None] * 20
    assert len(asked) == 20 and max(asked) <= MAX_STORE_LOOKUPS
    assert await asyncio.gather(*(sessions.lookup(value) for value in forged * 5)) == [None] * 100
    assert len(asked) == 20  # the second round came from memory

    opened = await sessions.open(Identity("alice", frozenset({Role.OPERATOR}), CredentialKind.BASIC))
    assert sessions.known_here(opened) and not sessions.known_here(forged[0])
    assert len(asked) == 20
