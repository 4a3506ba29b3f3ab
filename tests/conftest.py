"""Shared fixtures: a list of started servers that are stopped by PID after each test."""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.postgres import PostgresServer, start_postgres
from tests.servers import REPO, Server, free_port, http_get, start_prometheus, wait_for

FIXTURES = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures"
LOCAL_FIXTURES = Path(__file__).resolve().parent / "fixtures"


@pytest.fixture
def servers() -> Iterator[list[Server]]:
    """Collects servers a test starts and stops each one by its own PID afterwards."""
    started: list[Server] = []
    yield started
    for server in reversed(started):
        server.stop(signal.SIGTERM)


@pytest.fixture
def fixtures_dir() -> Path:
    """The captured Alertmanager 0.25 payloads: shared/fixtures when present, else the copy in tests/."""
    return FIXTURES if FIXTURES.is_dir() else LOCAL_FIXTURES


@dataclass
class World:
    """The fault app exporting file sizes, and Prometheus scraping it every 0.5 s."""

    files: Path
    prometheus: Server
    app: subprocess.Popen[bytes]


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    workdir = tmp_path_factory.mktemp("planner")
    files = workdir / "files"
    files.mkdir()
    port = free_port()
    app = subprocess.Popen([sys.executable, str(REPO / "tests" / "fault_app.py"), str(port), str(files)])
    try:
        wait_for(lambda: http_get(f"http://127.0.0.1:{port}/")[0] == 200, 10, what="fault app")
        prometheus = start_prometheus(
            workdir / "prometheus",
            [{"job_name": "app", "static_configs": [{"targets": [f"127.0.0.1:{port}"]}]}],
            interval="500ms",
        )
    except BaseException:
        app.kill()
        app.wait()
        raise
    yield World(files, prometheus, app)
    prometheus.stop(signal.SIGTERM)
    app.kill()
    app.wait()


@pytest.fixture(scope="session")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """One real PostgreSQL cluster per test session (per xdist worker), deleted at the end."""
    server = start_postgres(tmp_path_factory.mktemp("postgres"))
    yield server
    server.destroy()


@dataclass
class PostgresDatabase:
    """A fresh database in the session's cluster: healer's `store` section for it, and the server."""

    name: str
    url: str
    password_file: Path
    server: PostgresServer

    @property
    def password(self) -> str:
        return self.server.password

    def store(self) -> dict[str, str]:
        """The `store:` config section that points healer at this database."""
        return {"url": self.url, "password_file": str(self.password_file)}


@pytest.fixture
def postgres_db(postgres: PostgresServer) -> Iterator[PostgresDatabase]:
    """An empty database of its own for each test, dropped afterwards (the server restarted if a test stopped it)."""
    url = postgres.create_database()
    name = url.rsplit("/", 1)[1]
    yield PostgresDatabase(name, url, postgres.password_file, postgres)
    if not postgres.running:
        postgres.start()
    postgres.drop_database(name)
