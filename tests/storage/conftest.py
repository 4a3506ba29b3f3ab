"""Fixtures of the storage contract: a store per backend, on a clock that moves only when a test moves it.

A second backend joins the suite by adding its name to `support.BACKENDS` and a branch to `Backend.open`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from healer.healing.payload import WebhookAlert, decode_webhook
from healer.storage import Storage
from tests.storage.support import BACKENDS, Backend, FakeClock


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture(params=BACKENDS)
async def backend(request: pytest.FixtureRequest, tmp_path: Path, clock: FakeClock) -> AsyncIterator[Backend]:
    opener = Backend(request.param, tmp_path, clock)
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
