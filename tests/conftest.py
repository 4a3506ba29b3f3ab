"""Shared fixtures: a list of started servers that are stopped by PID after each test."""

from __future__ import annotations

import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers import Server

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
