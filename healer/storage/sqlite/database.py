"""One SQLite file in WAL mode, used from one dedicated thread, with its schema migrated at open.

Every write is one `BEGIN IMMEDIATE` transaction; SQLite's errors leave as StoreUnavailableError.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import sqlite3
import stat
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, TypeVar

from healer.logs import fields
from healer.storage.errors import StoreUnavailableError
from healer.storage.health import DAMAGED, StoreDamagedError, classify
from healer.storage.sqlite.health import DEFAULT_WAL_MAX_BYTES, SQLiteHealth
from healer.storage.sqlite.migrations import migrate
from healer.storage.sqlite.transactions import rollback

T = TypeVar("T")
log = logging.getLogger(__name__)

# The store holds step output and plans: only healer's user may read it, its journals and its lock.
PRIVATE_MODE = 0o600
COMPANION_SUFFIXES = ("-wal", "-shm", "-journal", ".lock")


def make_private(path: Path) -> None:
    """Create the store file mode 0600 when missing, and bring every existing store file to 0600.

    SQLite creates its -wal, -shm and -journal files with the database file's mode, so a private
    database keeps them private; a file found readable by others is fixed and warned about.
    """
    if not path.exists():
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, PRIVATE_MODE))
    for name in (str(path), *(f"{path}{suffix}" for suffix in COMPANION_SUFFIXES)):
        try:
            mode = stat.S_IMODE(os.stat(name).st_mode)
        except FileNotFoundError:
            continue
        if mode & 0o077:
            os.chmod(name, PRIVATE_MODE)
            log.warning(
                "store file was open to other users; made it readable by healer's user only",
                extra=fields(file=name, mode=f"{mode:04o}", now=f"{PRIVATE_MODE:04o}"),
            )


def _open_private(name: str) -> IO[str]:
    """Open (creating mode 0600) a file for writing, as `open(name, "w")` would."""
    return os.fdopen(os.open(name, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_MODE), "w")


class SQLiteDatabase:
    """The connection, the thread it is used from, the lock that keeps a second healer out, and the clock."""

    def __init__(
        self, path: Path | str, clock: Callable[[], float] = time.time, wal_max_bytes: int = DEFAULT_WAL_MAX_BYTES
    ) -> None:
        self.path = Path(path)
        self.clock = clock
        self._lock_file: IO[str] | None = None
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # Two healers on one file would each recover the other's running steps and run them twice.
            self._lock_file = _open_private(f"{path}.lock")  # held for the store's lifetime
            try:
                fcntl.flock(self._lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._lock_file.close()
                raise StoreUnavailableError(f"another healer is using the store {path}") from None
            try:
                make_private(self.path)
            except OSError as exc:
                self._release_lock()
                raise StoreUnavailableError(f"cannot make the store {path} private: {exc.strerror}") from exc
        try:
            self.db = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=10)
            self.db.row_factory = sqlite3.Row
            self.db.execute("PRAGMA journal_mode=WAL")
            # NORMAL with WAL survives a killed process; FULL would also survive power loss at a cost per commit.
            self.db.execute("PRAGMA synchronous=NORMAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.health = SQLiteHealth(self.db, self.path, wal_max_bytes)
            self.health.open()
            migrate(self.db, clock)
        except StoreUnavailableError:
            self._release_lock()
            raise
        except (sqlite3.Error, OSError) as exc:
            self._release_lock()
            error = StoreDamagedError if classify(str(exc)) == DAMAGED else StoreUnavailableError
            raise error(f"cannot open the store {path}: {exc}") from exc
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="healer-store")

    async def run(self, work: Callable[..., T], *args: Any) -> T:
        """Run `work(*args)` on the store's thread."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, work, *args)

    def tx(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` in one write transaction (on the store's thread)."""
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                result = work(self.db)
                self.db.execute("COMMIT")
            except BaseException:
                rollback(self.db)
                raise
            return result
        except sqlite3.Error as exc:
            raise StoreUnavailableError(str(exc)) from exc

    async def write(self, work: Callable[[sqlite3.Connection], T]) -> T:
        """Run `work` in one write transaction on the store's thread."""
        return await self.run(self.tx, work)

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """One read-only query (on the store's thread)."""
        try:
            return self.db.execute(sql, params).fetchall()
        except sqlite3.Error as exc:
            raise StoreUnavailableError(str(exc)) from exc

    async def read(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        """One read-only query on the store's thread."""
        return await self.run(self.rows, sql, params)

    def event(
        self,
        db: sqlite3.Connection,
        kind: str,
        detail: dict[str, Any],
        episode_id: int | None = None,
        action_id: int | None = None,
    ) -> None:
        """Append one audit event inside the caller's transaction."""
        db.execute(
            "INSERT INTO events (ts, episode_id, action_id, kind, detail) VALUES (?, ?, ?, ?, ?)",
            (self.clock(), episode_id, action_id, kind, json.dumps(detail)),
        )

    def _release_lock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    async def close(self) -> None:
        await self.run(self.health.close)
        await self.run(self.db.close)
        self._executor.shutdown(wait=True)
        self._release_lock()
