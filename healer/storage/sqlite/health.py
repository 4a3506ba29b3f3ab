"""The health of one SQLite file: its identity, its writability, its integrity, and its write-ahead log's size.

Every method runs on the store's thread (the connection is used from that thread only), except the periodic
integrity check, which reads the whole file: it runs on a thread and a read-only connection of its own, so that
a large store's check does not hold up the webhook's writes (in WAL mode a reader does not block the writer).
"""

from __future__ import annotations

import logging
import os
import sqlite3
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

from healer.logs import fields
from healer.storage.health import (
    DAMAGED,
    DELETED,
    READ_ONLY,
    REPLACED,
    StoreDamagedError,
    StoreHealth,
    classify,
)
from healer.storage.sqlite.transactions import rollback

log = logging.getLogger(__name__)

# The full (quick) integrity check reads every page: at open, then this often while running.
INTEGRITY_INTERVAL = 600.0
# The write-ahead log's bound when the config gives none.
DEFAULT_WAL_MAX_BYTES = 4 * 1024 * 1024


def quick_check(db: sqlite3.Connection) -> list[str]:
    """SQLite's quick_check: [] for a sound file, else its complaints (at most 10)."""
    try:
        found = [str(row[0]) for row in db.execute("PRAGMA quick_check(10)").fetchall()]
    except sqlite3.DatabaseError as exc:
        return [str(exc)]
    # One finding per line of its own: "*** in database main ***" heads them.
    lines = [line for text in found for line in text.splitlines() if not line.startswith("***")]
    return [] if found == ["ok"] else lines


def rescue_path(path: Path) -> Path:
    """Where a store whose file was deleted under a running healer is copied to."""
    return path.with_name(path.name + ".rescued")


# The write probe's two statements: a row changed and changed back, so the check commits a real write.
PROBE_WRITES = (
    "UPDATE schema_versions SET description = description || '.'"
    " WHERE version = (SELECT max(version) FROM schema_versions)",
    "UPDATE schema_versions SET description = substr(description, 1, length(description) - 1)"
    " WHERE version = (SELECT max(version) FROM schema_versions)",
)

class SQLiteHealth:
    """Checks one open SQLite file: its identity against the file opened, a write probe, integrity, the WAL."""

    def __init__(
        self,
        db: sqlite3.Connection,
        path: Path,
        wal_max_bytes: int = DEFAULT_WAL_MAX_BYTES,
        integrity_interval: float = INTEGRITY_INTERVAL,
    ) -> None:
        self.db = db
        self.path = path
        self.wal_max_bytes = wal_max_bytes
        self.integrity_interval = integrity_interval
        self.memory = str(path) == ":memory:"
        self._identity: tuple[int, int] | None = None
        self._size = 0
        self._checked = time.monotonic()
        self._rescued = False
        self._integrity: Future[list[str]] | None = None  # the check running apart, if any
        self._damage: list[str] = []  # what the last check apart found
        self._apart = ThreadPoolExecutor(1, thread_name_prefix="healer-store-integrity")
        self._apart_db: sqlite3.Connection | None = None

    def open(self) -> None:
        """At open: bound the WAL, remember the file's identity, and refuse a damaged file (StoreDamagedError)."""
        page_size = int(self.db.execute("PRAGMA page_size").fetchone()[0])
        # SQLite checkpoints at a quarter of the bound (leaving room for the transaction that crosses it) and
        # truncates the log back to the bound when it starts over after a checkpoint.
        self.db.execute(f"PRAGMA journal_size_limit={int(self.wal_max_bytes)}")
        self.db.execute(f"PRAGMA wal_autocheckpoint={max(1, self.wal_max_bytes // page_size // 4)}")
        problems = quick_check(self.db)
        if problems:
            raise StoreDamagedError(
                f"the store {self.path} is damaged ({'; '.join(problems[:3])}): stop, run `healer store check"
                f" {self.path}` and `healer store recover {self.path}` (docs/runbook.md, HealerStoreNotReady)"
            )
        if not self.memory:
            stat = os.stat(self.path)
            self._identity = (stat.st_dev, stat.st_ino)
            self._size = stat.st_size

    def check(self) -> StoreHealth:
        """One cheap check: the file is the one opened and has not shrunk, a write commits, the WAL is bounded;
        every INTEGRITY_INTERVAL also SQLite's quick_check."""
        if self._identity is not None:
            try:
                stat = os.stat(self.path)
            except FileNotFoundError:
                if not self._rescued:
                    self._rescue()
                return StoreHealth(DELETED, f"{self.path} was deleted while healer had it open")
            except OSError as exc:
                return StoreHealth(classify(str(exc)), f"cannot stat {self.path}: {exc.strerror}")
            if (stat.st_dev, stat.st_ino) != self._identity:
                return StoreHealth(REPLACED, f"{self.path} is not the file healer opened (it was replaced)")
            if stat.st_size < self._size:
                # SQLite never shrinks the file (no auto_vacuum): something else truncated it.
                return StoreHealth(DAMAGED, f"{self.path} shrank from {self._size} to {stat.st_size} bytes")
            self._size = stat.st_size
            if not os.access(self.path, os.W_OK):
                return StoreHealth(READ_ONLY, f"{self.path} is not writable")
        try:
            self.db.execute("BEGIN IMMEDIATE")
            try:
                # A real write committed through the WAL: the row is changed and changed back in one
                # transaction. Rewritten as it is, SQLite leaves the page clean and commits nothing, so a
                # full disk went unseen while every delivery failed.
                for change in PROBE_WRITES:
                    self.db.execute(change)
                self.db.execute("COMMIT")
            except BaseException:
                rollback(self.db)
                raise
        except sqlite3.Error as exc:
            return StoreHealth(classify(str(exc)), f"a write to {self.path} failed: {exc}")
        problems = self._integrity_found()
        if problems:
            return StoreHealth(DAMAGED, f"{self.path}: {'; '.join(problems[:3])}")
        return self.bound_wal()

    @property
    def checking_integrity(self) -> bool:
        """Whether an integrity check is running apart now."""
        return self._integrity is not None and not self._integrity.done()

    def _integrity_found(self) -> list[str]:
        """What the latest integrity check found; starts the next one every integrity_interval (apart, for a
        file: its answer comes with a later health check; inline for an in-memory store)."""
        if self._integrity is not None and self._integrity.done():
            self._damage, self._integrity = self._integrity.result(), None
        if self._integrity is None and time.monotonic() - self._checked >= self.integrity_interval:
            self._checked = time.monotonic()
            if self.memory:
                self._damage = quick_check(self.db)
            else:
                self._integrity = self._apart.submit(self._check_apart)
        return self._damage

    def _check_apart(self) -> list[str]:
        try:
            db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, check_same_thread=False)
        except sqlite3.Error as exc:
            # Not a finding about the file's pages: the next interval tries again; the write probe sees the rest.
            log.warning("store integrity check could not start", extra=fields(path=str(self.path), error=str(exc)))
            return []
        self._apart_db = db
        try:
            return quick_check(db)
        finally:
            self._apart_db = None
            db.close()

    def bound_wal(self) -> StoreHealth:
        """Checkpoint and truncate the WAL when it grew beyond its bound (a reader held a checkpoint back)."""
        if self.memory or self._integrity is not None:
            # The integrity check's reader holds a TRUNCATE checkpoint back, which would wait on it with the
            # store's thread: the WAL may pass its bound for the check's duration, and is truncated after it.
            return StoreHealth()
        try:
            wal = os.stat(f"{self.path}-wal").st_size
        except OSError:
            return StoreHealth()
        if wal > self.wal_max_bytes:
            try:
                self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            except sqlite3.Error as exc:
                return StoreHealth(classify(str(exc)), f"checkpoint of {self.path} failed: {exc}")
        return StoreHealth()

    def _rescue(self) -> None:
        """Copy the open (deleted) store, WAL included, next to its path: what was accepted is not lost."""
        target_path = rescue_path(self.path)
        try:
            # As private as the store itself: it holds the same records.
            target_path.touch(mode=0o600)
            target_path.chmod(0o600)
            target = sqlite3.connect(str(target_path))
            try:
                self.db.backup(target)
            finally:
                target.close()
        except (sqlite3.Error, OSError) as exc:
            log.error(
                "cannot copy the deleted store",
                extra=fields(path=str(self.path), rescue=str(target_path), reason=str(exc)),
            )
            return
        if not self._rescued:
            log.warning(
                "the deleted store was copied; stop healer and move the copy to the store's path",
                extra=fields(path=str(self.path), rescue=str(target_path)),
            )
        self._rescued = True

    def close(self) -> None:
        """Close the connection; a store deleted or replaced under healer is first copied once more, with
        everything written since, and the write-ahead log it leaves at the path (which belongs to the file
        healer had open, not to whatever is at the path now) is removed."""
        running = self._apart_db
        if running is not None:
            running.interrupt()  # a long check of a large file must not hold the stop
        self._apart.shutdown(wait=True, cancel_futures=True)
        if self._identity is None or self._identity == _identity(self.path):
            self.db.close()
            return
        self._rescue()
        self.db.close()
        for leftover in (Path(f"{self.path}-wal"), Path(f"{self.path}-shm")):
            leftover.unlink(missing_ok=True)


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(path)
    except OSError:
        return None
    return (stat.st_dev, stat.st_ino)
