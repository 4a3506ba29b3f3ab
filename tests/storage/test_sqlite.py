"""What only the SQLite backend promises: its file lock, its numbered migrations, and what it leaves on disk."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

from healer.healing.payload import WebhookAlert, encode_webhook
from healer.storage import StoreUnavailableError
from healer.storage.sqlite import SQLiteStorage, migrations
from healer.storage.sqlite.migrations import MIGRATIONS, Migration, schema_version
from tests.storage.support import Backend, FakeClock, body_of

OLD_INBOX = (
    "CREATE TABLE inbox (id INTEGER PRIMARY KEY, received_at REAL NOT NULL, status TEXT NOT NULL,"
    " fingerprint TEXT NOT NULL, starts_at TEXT NOT NULL, alert TEXT NOT NULL, processed_at REAL);"
    " CREATE INDEX inbox_unprocessed ON inbox(id) WHERE processed_at IS NULL;"
)


# The suite's `backend` fixture, held to SQLite whatever other backends join it.
pytestmark = pytest.mark.parametrize("backend", ["sqlite"], indirect=True)


@contextmanager
def on_disk(path: Path) -> Iterator[sqlite3.Connection]:
    """The file itself, past the store: for the tests that must prove what is on disk."""
    with closing(sqlite3.connect(path)) as db:
        db.row_factory = sqlite3.Row
        yield db


@pytest.fixture
def applied(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The versions of the migrations run from now on, in order."""
    versions: list[int] = []

    def spied(migration: Migration) -> Migration:
        def apply(db: sqlite3.Connection) -> None:
            versions.append(migration.version)
            migration.apply(db)

        return replace(migration, apply=apply)

    monkeypatch.setattr(migrations, "MIGRATIONS", tuple(spied(m) for m in MIGRATIONS))
    return versions


async def test_inbox_of_an_earlier_layout_is_migrated(backend: Backend, firing: WebhookAlert) -> None:
    """A store whose inbox held one row per alert keeps its unprocessed alerts after the upgrade."""
    alert = encode_webhook(firing).decode()
    with on_disk(backend.path) as old:
        old.executescript(OLD_INBOX)
        old.executemany(
            "INSERT INTO inbox (received_at, status, fingerprint, starts_at, alert, processed_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [(1.0, "firing", "a", "x", alert, 2.0), (3.0, "firing", "b", "x", alert, None)],
        )
        old.commit()
    storage = await backend.open()
    [item] = await storage.inbox.unprocessed()
    assert item.alert == firing and item.received_at == 3.0
    assert await storage.inbox.depth() == 1


async def test_unreadable_delivery_is_recorded_in_the_audit_trail(backend: Backend, clock: FakeClock) -> None:
    """Skipping a delivery the payload format no longer accepts leaves an audit event naming it and why."""
    storage = await backend.open()
    bad = await storage.inbox.accept(b'{"version": "3", "alerts": []}', 1)
    assert await storage.inbox.unprocessed() == []
    with on_disk(backend.path) as db:
        [event] = db.execute("SELECT ts, episode_id, kind, detail FROM events").fetchall()
    assert (event["ts"], event["episode_id"], event["kind"]) == (clock.now, None, "delivery_unreadable")
    detail = json.loads(event["detail"])
    assert detail["delivery"] == bad and "version" in detail["reason"]


async def test_unwritable_store_fails_every_waiter(backend: Backend, firing: WebhookAlert) -> None:
    """When the database refuses writes, every waiting delivery gets StoreUnavailableError."""
    storage = await backend.open()
    assert isinstance(storage, SQLiteStorage)
    storage.database.db.execute("PRAGMA query_only = ON")
    results = await asyncio.gather(
        *(storage.inbox.accept(body_of(firing), 1) for _ in range(5)), return_exceptions=True
    )
    assert all(isinstance(r, StoreUnavailableError) for r in results)


async def test_second_healer_on_one_store_is_refused(backend: Backend) -> None:
    """A second store on the same file is refused, so two healers never run each other's steps."""
    first = await backend.open()
    with pytest.raises(StoreUnavailableError, match="another healer"):
        SQLiteStorage(backend.path)
    await backend.close(first)
    await backend.open()


async def test_schema_versions_are_recorded_and_not_run_again(
    backend: Backend, clock: FakeClock, applied: list[int]
) -> None:
    """A new file gets every migration once, in order, each recorded with its time; reopening runs none."""
    await backend.close(await backend.open())
    assert applied == [m.version for m in MIGRATIONS]
    opened_at = clock.now
    clock.advance(60)
    applied.clear()
    await backend.close(await backend.open())
    assert applied == []
    with on_disk(backend.path) as db:
        recorded = [tuple(row) for row in db.execute("SELECT version, applied_at FROM schema_versions ORDER BY 1")]
        assert recorded == [(m.version, opened_at) for m in MIGRATIONS]
        assert schema_version(db) == MIGRATIONS[-1].version


async def test_a_new_migration_is_applied_alone(
    backend: Backend, monkeypatch: pytest.MonkeyPatch, applied: list[int]
) -> None:
    """A file at the previous version gets only the migration added since, and records its version."""
    await backend.close(await backend.open())
    applied.clear()
    latest = MIGRATIONS[-1].version + 1
    added = Migration(latest, "a step added after the file was made", lambda db: applied.append(latest))
    monkeypatch.setattr(migrations, "MIGRATIONS", (*migrations.MIGRATIONS, added))
    await backend.close(await backend.open())
    assert applied == [latest]
    with on_disk(backend.path) as db:
        assert schema_version(db) == latest
