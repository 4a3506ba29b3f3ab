"""Ending a failed SQLite transaction, shared by the store, its health check and its migrations."""

from __future__ import annotations

import contextlib
import sqlite3


def rollback(db: sqlite3.Connection) -> None:
    """End a failed transaction, if SQLite has not already (it rolls back by itself on a full disk, and an
    explicit ROLLBACK would then raise "no transaction is active" in place of the error that matters)."""
    if db.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            db.execute("ROLLBACK")
