"""Fixtures of the storage contract: a store per backend, on a clock that moves only when a test moves it.

A backend joins the suite by adding its name to `support.BACKENDS` and a branch to `Backend.open`;
PostgreSQL's tests each get a database of their own in the session's real server (`postgres_db`).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from healer.config import StoreConfig
from healer.healing.payload import WebhookAlert, decode_webhook
from healer.storage import Storage
from tests.storage.support import BACKENDS, Backend, FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


# PostgreSQL's runs are marked, so that `-m "not postgres"` leaves out what needs its server.
_PARAMS = [pytest.param(name, marks=pytest.mark.postgres) if name == "postgresql" else name for name in BACKENDS]


@pytest.fixture(params=_PARAMS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> AsyncIterator[Backend]:
    store = None
    if request.param == "postgresql":
        database = request.getfixturevalue("postgres_db")
        # Two connections: the contract never needs more, and reopening tests hold two stores.
        store = StoreConfig(url=database.url, password_file=database.password_file, pool_size=2)
    opener = Backend(request.param, tmp_path, clock, store)
    yield opener
    await opener.close_all()


@pytest.fixture
async def storage(backend: Backend) -> Storage:
    return await backend.open()


def _first_alert(path: Path) -> WebhookAlert:
    return decode_webhook(path.read_bytes()).alerts[0]


@pytest.fixture
def firing(fixtures_dir: Path) -> WebhookAlert:
    return _first_alert(fixtures_dir / "alertmanager-0.25-firing-one.json")


@pytest.fixture
def resolved(fixtures_dir: Path) -> WebhookAlert:
    return _first_alert(fixtures_dir / "alertmanager-0.25-resolved.json")
