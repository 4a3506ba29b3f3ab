"""`healer store check` and `healer store recover`: the integrity of a SQLite store, and a copy of what can be read."""

from __future__ import annotations

import contextlib
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


class RecoveryError(Exception):
    """The file cannot be checked or recovered; the message says why."""


@contextlib.contextmanager
def _connect(path: Path) -> Iterator[sqlite3.Connection]:
    if not path.is_file():
        raise RecoveryError(f"{path}: no such file")
    db = sqlite3.connect(str(path), isolation_level=None)
    try:
        yield db
    finally:
        db.close()


def check(path: Path) -> list[str]:
    """SQLite's full integrity check of a store file: [] when sound, else what is wrong (at most 20 lines)."""
    with _connect(path) as db:
        try:
            found = [str(row[0]) for row in db.execute("PRAGMA integrity_check(20)").fetchall()]
        except sqlite3.DatabaseError as exc:
            return [str(exc)]
    return [] if found == ["ok"] else found


@dataclass(frozen=True)
class Recovered:
    """What a recovery wrote: the new file, how (the sqlite3 CLI's .recover or a table by table copy), the rows."""

    output: Path
    method: str
    rows: dict[str, int]


def recover(path: Path, output: Path) -> Recovered:
    """Write what can be read of `path` to the new file `output`, through the `sqlite3` command's `.recover`
    when installed, else table by table (rows up to the first unreadable one of each table)."""
    if output.exists():
        raise RecoveryError(f"{output} exists already: name a new file")
    if not path.is_file():
        raise RecoveryError(f"{path}: no such file")
    # As private as the store itself: it holds the same records.
    output.touch(mode=0o600)
    method = "sqlite3 .recover"
    cli = shutil.which("sqlite3")
    try:
        _recover_with_cli(cli, path, output)
    except (OSError, subprocess.SubprocessError):
        # No sqlite3 command, or one built without .recover's page reader (SQLITE_ENABLE_DBPAGE_VTAB).
        output.unlink(missing_ok=True)
        output.touch(mode=0o600)
        method = "table copy"
        try:
            _copy_tables(path, output)
        except (sqlite3.Error, OSError) as exc:
            output.unlink(missing_ok=True)
            raise RecoveryError(f"cannot recover {path}: {exc}") from exc
    with _connect(output) as db:
        names = [row[0] for row in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")]
        count = "SELECT count(*) FROM {}"  # the names come from the file: quoted as identifiers
        rows = {name: int(db.execute(count.format(_quoted(name))).fetchone()[0]) for name in names}
    problems = check(output)
    if problems:
        raise RecoveryError(f"the recovered file {output} is not sound either: {'; '.join(problems[:3])}")
    return Recovered(output, method, rows)


def _recover_with_cli(cli: str | None, path: Path, output: Path) -> None:
    if cli is None:
        raise FileNotFoundError("sqlite3")
    dump = subprocess.run([cli, str(path), ".recover"], capture_output=True, check=True, timeout=3600)
    subprocess.run([cli, str(output)], input=dump.stdout, capture_output=True, check=True, timeout=3600)


def _copy_tables(path: Path, output: Path) -> None:
    with _connect(path) as source:
        target = sqlite3.connect(str(output), isolation_level=None)
        try:
            schema = source.execute(
                "SELECT type, name, sql FROM sqlite_master WHERE sql IS NOT NULL AND name NOT LIKE 'sqlite_%'"
                " ORDER BY type = 'table' DESC"
            ).fetchall()
            target.execute("BEGIN")
            for kind, _, sql in schema:
                if kind == "table":
                    target.execute(sql)
            for kind, name, _ in schema:
                if kind == "table":
                    _copy_rows(source, target, name)
            for kind, _, sql in schema:
                if kind != "table":
                    with contextlib.suppress(sqlite3.Error):  # an index over damaged rows
                        target.execute(sql)
            target.execute("COMMIT")
        finally:
            target.close()


def _copy_rows(source: sqlite3.Connection, target: sqlite3.Connection, table: str) -> None:
    """Copy the rows that can be read, seeking row by row past damaged pages (a table without rowid: up to
    the first unreadable row)."""
    name = _quoted(table)  # the names come from the file: quoted as identifiers, never values
    try:
        columns = len(source.execute(f"SELECT * FROM {name} LIMIT 0").description)  # noqa: S608
    except sqlite3.DatabaseError:
        return
    insert = f"INSERT OR IGNORE INTO {name} VALUES ({', '.join('?' * columns)})"  # noqa: S608
    try:
        source.execute(f"SELECT rowid FROM {name} LIMIT 0")  # noqa: S608
    except sqlite3.OperationalError:  # WITHOUT ROWID
        with contextlib.suppress(sqlite3.DatabaseError):
            for row in source.execute(f"SELECT * FROM {name}"):  # noqa: S608
                target.execute(insert, row)
        return
    last, misses = 0, 0  # healer's rowids are positive
    while misses < MAX_MISSES:
        try:
            row = source.execute(
                f"SELECT rowid, * FROM {name} WHERE rowid > ? ORDER BY rowid LIMIT 1",  # noqa: S608
                (last,),
            ).fetchone()
        except sqlite3.DatabaseError:
            # A damaged page holds the next row: try past it, one rowid at a time.
            last, misses = last + 1, misses + 1
            continue
        if row is None:
            return
        target.execute(insert, row[1:])
        last, misses = row[0], 0


def _quoted(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


# Rowids tried past a damaged page before the rest of a table is given up.
MAX_MISSES = 100_000
