"""The PostgreSQL test harness (tests/postgres.py): a real server, password logins, restarts and databases per test."""

from __future__ import annotations

import stat
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from tests.conftest import PostgresDatabase
from tests.postgres import PostgresServer, start_postgres
from tests.servers import process_alive

pytestmark = pytest.mark.postgres


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[PostgresServer]:
    """A cluster of this test's own, for stopping and starting without disturbing the session's."""
    server = start_postgres(tmp_path)
    yield server
    server.destroy()


def test_server_answers_a_query_with_the_password(postgres_db: PostgresDatabase) -> None:
    """The per-test database answers a query over TCP as `healer` with the password from the password file."""
    password = postgres_db.password_file.read_text().strip()
    assert password == postgres_db.password
    assert stat.S_IMODE(postgres_db.password_file.stat().st_mode) == 0o600
    assert postgres_db.url.startswith("postgresql://healer@127.0.0.1:") and password not in postgres_db.url
    with psycopg.connect(postgres_db.url, password=password, connect_timeout=5) as conn:
        row = conn.execute("SELECT current_user, current_database(), current_setting('fsync'), 1 + 1").fetchone()
    assert row == ("healer", postgres_db.name, "on", 2)


def test_wrong_password_is_refused(postgres: PostgresServer) -> None:
    """A login with a wrong password (or none) fails authentication: the server really checks it."""
    with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
        psycopg.connect(postgres.url, password=postgres.password + "x", connect_timeout=5)
    with pytest.raises(psycopg.OperationalError):
        psycopg.connect(postgres.url, password="", connect_timeout=5)


def test_databases_per_test_are_independent(postgres: PostgresServer) -> None:
    """Two databases created in the same cluster do not see each other's tables."""
    first, second = postgres.create_database(), postgres.create_database()
    try:
        assert first != second
        with psycopg.connect(first, password=postgres.password) as conn:
            conn.execute("CREATE TABLE only_here (n int)")
            conn.execute("INSERT INTO only_here VALUES (1)")
        with psycopg.connect(second, password=postgres.password) as conn:
            assert conn.execute("SELECT to_regclass('only_here')").fetchone() == (None,)
    finally:
        for url in (first, second):
            postgres.drop_database(url.rsplit("/", 1)[1])


def test_restart_keeps_committed_data(own_server: PostgresServer) -> None:
    """Data committed before `stop(fast)` or `stop(immediate)` is there after `start()` again on the same port."""
    with own_server.connect() as conn:
        conn.execute("CREATE TABLE kept (n int)")
        conn.execute("INSERT INTO kept VALUES (1)")
    port, first_pid = own_server.port, own_server.pid
    own_server.stop("fast")
    assert first_pid is not None and not process_alive(first_pid)
    with pytest.raises(psycopg.OperationalError):
        own_server.connect()
    own_server.start()
    assert own_server.port == port and own_server.pid not in (None, first_pid)
    with own_server.connect() as conn:
        conn.execute("INSERT INTO kept VALUES (2)")
    own_server.stop("immediate")  # a crash: recovery replays the WAL
    own_server.start()
    with own_server.connect() as conn:
        assert conn.execute("SELECT n FROM kept ORDER BY n").fetchall() == [(1,), (2,)]


def test_stopped_server_is_gone(tmp_path: Path) -> None:
    """After `destroy` the postmaster's PID is not alive and the cluster directory is deleted."""
    server = start_postgres(tmp_path)
    pid, root = server.pid, server.root
    assert pid is not None and process_alive(pid) and server.running
    assert (root / "data" / "postmaster.pid").is_file()
    server.destroy()
    assert not process_alive(pid) and not server.running
    assert not root.exists()
    server.destroy()  # a second stop is harmless
