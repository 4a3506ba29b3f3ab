"""Steps the storage tests share: deliver alerts, open an episode with its first step, take and finish steps."""

from __future__ import annotations

from pathlib import Path

from healer.config import StoreConfig
from healer.healing.model import Action, EpisodeState, Finish, InboxPosition, NewAction, OpenRequest, Outcome
from healer.healing.payload import WebhookAlert, WebhookPayload, encode_webhook
from healer.storage import Storage
from healer.storage.postgres import PostgresStorage
from healer.storage.sqlite import SQLiteStorage

BACKENDS = ["sqlite", "postgresql"]
# The replica the contract tests act as.
REPLICA = "replica-a"
RULE = "web"


class FakeClock:
    """The time the store reads: fixed until a test sets or advances it."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


class Backend:
    """Opens stores of one backend on one place (so that a test can reopen it) and closes what a test left open.

    The place is a file for SQLite and, for PostgreSQL, the test's own database that `store` names.
    """

    def __init__(self, name: str, tmp_path: Path, clock: FakeClock, store: StoreConfig | None = None) -> None:
        self.name = name
        self.path = tmp_path / "healer.db"
        self.clock = clock
        self.store = store
        self._open: list[Storage] = []

    async def open(self) -> Storage:
        if self.name == "sqlite":
            storage: Storage = SQLiteStorage(self.path, clock=self.clock)
        elif self.name == "postgresql" and self.store is not None:
            storage = await PostgresStorage.open(self.store, self.clock)
        else:
            raise ValueError(f"no such storage backend: {self.name}")
        self._open.append(storage)
        return storage

    async def close(self, storage: Storage) -> None:
        self._open.remove(storage)
        await storage.close()

    async def close_all(self) -> None:
        while self._open:
            await self.close(self._open[-1])


def body_of(*alerts: WebhookAlert) -> bytes:
    """A webhook body carrying these alerts."""
    return encode_webhook(WebhookPayload(version="4", status=alerts[0].status, alerts=list(alerts)))


async def deliver(storage: Storage, *alerts: WebhookAlert) -> list[InboxPosition]:
    """Accept one delivery of these alerts; return where each of them sits in the inbox."""
    delivery = await storage.inbox.accept(body_of(*alerts), len(alerts))
    return [InboxPosition(delivery, index) for index in range(len(alerts))]


def first_step(not_before: float = 0.0) -> NewAction:
    return NewAction(1, 0, RULE, "restart", not_before)


async def open_with_first_step(storage: Storage, alert: WebhookAlert, not_before: float = 0.0) -> tuple[int, bool]:
    """Deliver a firing alert and open its episode with a first step; return the episode id and whether it is new."""
    [position] = await deliver(storage, alert)
    [opened] = await storage.healing.open_episodes(
        [OpenRequest(position, alert, RULE, EpisodeState.OPEN, first_step(not_before))]
    )
    return opened.episode.id, opened.created


async def due(storage: Storage, now: float) -> list[Action]:
    return (await storage.healing.agenda(now, REPLICA)).due


async def claim_only_step(storage: Storage, now: float) -> Action:
    """Claim the one step due at `now`; return it as it was before the claim."""
    [action] = await due(storage, now)
    assert await storage.healing.claim(action.id, None, REPLICA)
    return action


async def escalate(storage: Storage, alert: WebhookAlert, now: float) -> int:
    """Open an episode for `alert` and end its only step escalated; return the episode id."""
    episode_id, _ = await open_with_first_step(storage, alert)
    action = await claim_only_step(storage, now)
    finish = Finish(Outcome.NOT_HEALED, episode_state=EpisodeState.ESCALATED, escalation="the alert still fires")
    await storage.healing.finish(action.id, finish)
    return episode_id
