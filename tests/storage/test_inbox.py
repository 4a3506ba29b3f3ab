"""The inbox contract: deliveries are durable, taken in order and each alert once, committed together."""

from __future__ import annotations

import asyncio

import msgspec

from healer.healing.model import EpisodeState, OpenRequest
from healer.healing.payload import WebhookAlert
from healer.storage import Storage
from tests.storage.support import Backend, FakeClock, body_of, deliver


async def test_accepted_alerts_survive_reopening(backend: Backend, firing: WebhookAlert) -> None:
    """Alerts written by accept are in the inbox, in order, after the store is closed and opened again."""
    first = await backend.open()
    positions = await deliver(first, firing, firing) + await deliver(first, firing)
    await backend.close(first)
    again = await backend.open()
    items = await again.inbox.unprocessed()
    assert [item.position for item in items] == positions
    assert items[0].alert == firing
    assert await again.inbox.depth() == 3


async def test_a_delivery_split_between_batches_is_processed_once(storage: Storage, firing: WebhookAlert) -> None:
    """A delivery larger than one engine batch is taken in order, each alert once, and then leaves the inbox."""
    alerts = [msgspec.structs.replace(firing, fingerprint=f"{i:016x}") for i in range(5)]
    await deliver(storage, *alerts)
    taken: list[str] = []
    while batch := await storage.inbox.unprocessed(limit=2):
        await storage.healing.open_episodes(
            [OpenRequest(item.position, item.alert, None, EpisodeState.UNMATCHED, None) for item in batch]
        )
        taken += [item.alert.fingerprint for item in batch]
        assert await storage.inbox.depth() == 5 - len(taken)
    assert taken == [alert.fingerprint for alert in alerts]
    assert (await storage.healing.counts()).alerts_received == 5


async def test_unreadable_delivery_is_skipped(storage: Storage, firing: WebhookAlert) -> None:
    """A stored body the payload format no longer accepts is skipped and counted, and later deliveries still run."""
    await storage.inbox.accept(b'{"version": "3", "alerts": []}', 1)
    [good] = await deliver(storage, firing)
    assert [item.position for item in await storage.inbox.unprocessed()] == [good]
    assert storage.inbox.discarded_alerts == 1
    assert await storage.inbox.depth() == 1


async def test_group_commit_answers_every_delivery(storage: Storage, firing: WebhookAlert) -> None:
    """Concurrent deliveries are committed together, each gets its own id, and every alert is in the inbox."""
    sizes = [i % 3 + 1 for i in range(50)]
    ids = await asyncio.gather(*(storage.inbox.accept(body_of(*[firing] * size), size) for size in sizes))
    assert len(set(ids)) == 50
    assert await storage.inbox.depth() == sum(sizes)
    items = await storage.inbox.unprocessed(1000)
    assert [item.position.delivery for item in items] == [
        i for i, size in zip(ids, sizes, strict=True) for _ in range(size)
    ]


async def test_delivery_ids_are_not_reused_after_purge(
    storage: Storage, clock: FakeClock, firing: WebhookAlert
) -> None:
    """A delivery after retention emptied the inbox gets a new id, and its own alerts are the ones processed."""
    [first] = await deliver(storage, firing)
    await storage.healing.open_episodes([OpenRequest(first, firing, None, EpisodeState.UNMATCHED, None)])
    later = clock.advance(10)
    await storage.healing.purge(older_than=later)
    await storage.inbox.purge(older_than=later)
    other = msgspec.structs.replace(firing, fingerprint="00000000000000ff")
    [second] = await deliver(storage, other)
    assert second.delivery > first.delivery
    [item] = await storage.inbox.unprocessed()
    assert item.position == second and item.alert.fingerprint == "00000000000000ff"


async def test_purge_deletes_only_old_processed_deliveries(
    storage: Storage, clock: FakeClock, firing: WebhookAlert
) -> None:
    """Retention drops processed deliveries older than the horizon and never an alert still waiting."""
    [done] = await deliver(storage, firing)
    await storage.healing.open_episodes([OpenRequest(done, firing, None, EpisodeState.UNMATCHED, None)])
    clock.advance(10)
    [waiting] = await deliver(storage, firing)
    [last] = await deliver(storage, firing)
    assert await storage.inbox.purge(older_than=clock.now - 10) == 0
    assert await storage.inbox.purge(older_than=clock.now) == 1
    assert [item.position for item in await storage.inbox.unprocessed()] == [waiting, last]
