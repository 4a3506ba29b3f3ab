"""The SQLite backend: one file, one healer, the default store."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

from healer.storage.sqlite.coordination import SQLiteCoordination
from healer.storage.sqlite.database import SQLiteDatabase
from healer.storage.sqlite.goals import SQLiteGoalRecords
from healer.storage.sqlite.healing import SQLiteHealingRecords
from healer.storage.sqlite.inbox import SQLiteInbox
from healer.storage.sqlite.pauses import SQLitePauseRecords
from healer.storage.sqlite.trials import SQLiteTrialRecords


class SQLiteStorage:
    """Every concern's records on one SQLite file, opened and migrated."""

    def __init__(self, path: Path | str, clock: Callable[[], float] = time.time) -> None:
        self.database = SQLiteDatabase(path, clock)
        self._inbox = SQLiteInbox(self.database)
        self._healing = SQLiteHealingRecords(self.database)
        self._goals = SQLiteGoalRecords(self.database)
        self._trials = SQLiteTrialRecords(self.database)
        self._coordination = SQLiteCoordination(self.database)
        self._pauses = SQLitePauseRecords(self.database)

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

    async def close(self) -> None:
        await self.database.close()


__all__ = ["SQLiteStorage"]
