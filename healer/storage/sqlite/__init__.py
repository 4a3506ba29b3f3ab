"""The SQLite backend: one file, one healer, the default store."""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

from healer.storage.health import StoreHealth, classify
from healer.storage.sqlite.coordination import SQLiteCoordination
from healer.storage.sqlite.database import SQLiteDatabase
from healer.storage.sqlite.goals import SQLiteGoalRecords
from healer.storage.sqlite.healing import SQLiteHealingRecords
from healer.storage.sqlite.health import DEFAULT_WAL_MAX_BYTES
from healer.storage.sqlite.inbox import SQLiteInbox
from healer.storage.sqlite.pauses import SQLitePauseRecords
from healer.storage.sqlite.sessions import SQLiteSessionRecords
from healer.storage.sqlite.trials import SQLiteTrialRecords


class SQLiteStorage:
    """Every concern's records on one SQLite file, opened and migrated."""

    def __init__(
        self, path: Path | str, clock: Callable[[], float] = time.time, wal_max_bytes: int = DEFAULT_WAL_MAX_BYTES
    ) -> None:
        self.database = SQLiteDatabase(path, clock, wal_max_bytes)
        self._inbox = SQLiteInbox(self.database)
        self._healing = SQLiteHealingRecords(self.database)
        self._goals = SQLiteGoalRecords(self.database)
        self._trials = SQLiteTrialRecords(self.database)
        self._coordination = SQLiteCoordination(self.database)
        self._pauses = SQLitePauseRecords(self.database)
        self._sessions = SQLiteSessionRecords(self.database)

    @property
    def shared(self) -> bool:
        return False  # the lock file keeps a second healer out

    @property
    def inbox(self) -> SQLiteInbox:
        return self._inbox

    @property
    def healing(self) -> SQLiteHealingRecords:
        return self._healing

    @property
    def goals(self) -> SQLiteGoalRecords:
        return self._goals

    @property
    def trials(self) -> SQLiteTrialRecords:
        return self._trials

    @property
    def coordination(self) -> SQLiteCoordination:
        return self._coordination

    @property
    def pauses(self) -> SQLitePauseRecords:
        return self._pauses

    @property
    def sessions(self) -> SQLiteSessionRecords:
        return self._sessions

    async def health(self) -> StoreHealth:
        """The file is the one opened, takes a write and is sound; the WAL is kept within its bound."""
        try:
            return await self.database.run(self.database.health.check)
        except (sqlite3.Error, OSError) as exc:
            return StoreHealth(classify(str(exc)), str(exc))

    async def close(self) -> None:
        await self.database.close()


__all__ = ["SQLiteStorage"]
