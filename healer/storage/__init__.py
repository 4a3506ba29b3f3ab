"""Where healer keeps what must survive a restart: one interface per concern, one implementation per backend.

Nothing outside this package knows SQL or a database driver.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from healer.config import StoreConfig
from healer.storage.errors import StoreUnavailableError
from healer.storage.health import StoreDamagedError, StoreHealth
from healer.storage.interfaces import (
    Coordination,
    GoalRecords,
    HealingRecords,
    Inbox,
    PauseRecords,
    SessionRecords,
    Storage,
    TrialRecords,
)


async def open_storage(config: StoreConfig, clock: Callable[[], float] = time.time) -> Storage:
    """Open (and create or migrate) the store the config names: PostgreSQL for `url`, else the SQLite file.

    Asynchronous because a PostgreSQL pool opens on the event loop; raises StoreUnavailableError.
    """
    if config.url is not None:
        from healer.storage.postgres import PostgresStorage

        return await PostgresStorage.open(config, clock)
    from healer.storage.sqlite import SQLiteStorage

    return SQLiteStorage(config.path, clock, config.wal_max_bytes)


def open_local_storage(config: StoreConfig, clock: Callable[[], float] = time.time) -> Storage:
    """Open the SQLite store of a single healer without an event loop; raises StoreUnavailableError."""
    if config.url is not None:
        raise StoreUnavailableError("a PostgreSQL store opens asynchronously: use `await open_storage(...)`")
    from healer.storage.sqlite import SQLiteStorage

    return SQLiteStorage(config.path, clock, config.wal_max_bytes)


__all__ = [
    "Coordination",
    "GoalRecords",
    "HealingRecords",
    "Inbox",
    "PauseRecords",
    "SessionRecords",
    "Storage",
    "StoreDamagedError",
    "StoreHealth",
    "StoreUnavailableError",
    "TrialRecords",
    "open_local_storage",
    "open_storage",
]
