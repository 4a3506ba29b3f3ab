"""What only the PostgreSQL backend promises: replicas on separate pools share one store without racing.

Each `PostgresStorage` here has a pool of its own, as a replica process would: what one commits the
others see, and every check-then-write holds when they run it at the same moment.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import replace

import msgspec
import psycopg
import pytest

from healer.config import StoreConfig
from healer.healing.model import Action, ActionFilter, Charge, EpisodeState, Finish, OpenRequest, Outcome
from healer.healing.payload import WebhookAlert
from healer.storage import StoreUnavailableError
from healer.storage.postgres import PostgresStorage, migrations
from healer.storage.postgres.migrations import MIGRATIONS, Migration
from tests.conftest import PostgresDatabase
from tests.storage.support import REPLICA, RULE, FakeClock, deliver, first_step, open_with_first_step

pytestmark = pytest.mark.postgres

OTHER = "replica-b"
LEASE = 4.0

Opener = Callable[[], Awaitable[PostgresStorage]]


def store_of(database: PostgresDatabase, pool_size: int = 4) -> StoreConfig:
    return StoreConfig(url=database.url, password_file=database.password_file, pool_size=pool_size)


@pytest.fixture
async def open_replica(postgres_db: PostgresDatabase, clock: FakeClock) -> AsyncIterator[Opener]:
    """Opens a store of its own pool on the test's database, as one more replica; closes them all afterwards."""
    opened: list[PostgresStorage] = []

    async def opener() -> PostgresStorage:
        storage = await PostgresStorage.open(store_of(postgres_db), clock)
        opened.append(storage)
        return storage

    yield opener
    for storage in opened:
        await storage.close()


async def replicas(open_replica: Opener, count: int) -> list[PostgresStorage]:
    return list(await asyncio.gather(*(open_replica() for _ in range(count))))


async def due_step(storage: PostgresStorage, clock: FakeClock, alert: WebhookAlert) -> Action:
    """Open an episode of `alert` and return its first step, due now."""
    await open_with_first_step(storage, alert)
    [action] = (await storage.healing.agenda(clock.now, REPLICA)).due
    return action


async def taken_step(storage: PostgresStorage, clock: FakeClock, alert: WebhookAlert) -> Action:
    """Open an episode of `alert` and take its first step as REPLICA for one lease."""
    action = await due_step(storage, clock, alert)
    assert await storage.healing.take(action.id, REPLICA, clock.now, clock.now + LEASE)
    return action


async def test_replicas_starting_together_migrate_once(
    monkeypatch: pytest.MonkeyPatch, open_replica: Opener, postgres_db: PostgresDatabase
) -> None:
    """Three stores opened at once on an empty database apply each migration once and all end at the newest."""
    applied: list[int] = []

    def spied(migration: Migration) -> Migration:
        async def apply(conn: psycopg.AsyncConnection[object]) -> None:
            applied.append(migration.version)
            await asyncio.sleep(0.05)  # widen the window in which another replica could race
            await migration.apply(conn)

        return replace(migration, apply=apply)

    monkeypatch.setattr(migrations, "MIGRATIONS", tuple(spied(m) for m in MIGRATIONS))
    await replicas(open_replica, 3)
    assert applied == [m.version for m in MIGRATIONS]
    with postgres_db.server.connect(postgres_db.name) as conn:
        versions = [row[0] for row in conn.execute("SELECT version FROM schema_versions ORDER BY version")]
    assert versions == [m.version for m in MIGRATIONS]
    again = await open_replica()
    assert applied == [m.version for m in MIGRATIONS]  # a store at the newest version runs nothing
    assert await again.inbox.depth() == 0


async def test_an_episode_opens_once_across_replicas(open_replica: Opener, firing: WebhookAlert) -> None:
    """Replicas opening the same alerts at once, in different orders, create each episode and first step once."""
    stores = await replicas(open_replica, 3)
    alerts = [msgspec.structs.replace(firing, fingerprint=f"{i:016x}") for i in range(20)]
    positions = await deliver(stores[0], *alerts)
    requests = [
        OpenRequest(position, alert, RULE, EpisodeState.OPEN, first_step())
        for position, alert in zip(positions, alerts, strict=True)
    ]
    # Each replica in its own order: locks taken crosswise would deadlock without a common order.
    orders = [requests, requests[::-1], requests[7:] + requests[:7]]
    results = await asyncio.gather(
        *(store.healing.open_episodes(order) for store, order in zip(stores, orders, strict=True))
    )
    created = [opened.episode.id for result in results for opened in result if opened.created]
    assert len(created) == len(set(created)) == 20
    for result in results:  # every replica learns the same episode for each alert
        assert {o.episode.fingerprint: o.episode.id for o in result} == {
            o.episode.fingerprint: o.episode.id for o in results[0]
        }
    steps = await stores[1].healing.list_actions(ActionFilter(limit=1000))
    assert sorted(episode.id for _, episode in steps) == sorted(created)
    assert await stores[2].inbox.depth() == 0


async def test_one_alert_from_three_replicas_gives_one_step(open_replica: Opener, firing: WebhookAlert) -> None:
    """The same alert delivered to three replicas and opened by each at once is one episode with one first step."""
    stores = await replicas(open_replica, 3)
    positions = [(await deliver(store, firing))[0] for store in stores]
    results = await asyncio.gather(
        *(
            store.healing.open_episodes([OpenRequest(position, firing, RULE, EpisodeState.OPEN, first_step())])
            for store, position in zip(stores, positions, strict=True)
        )
    )
    assert sorted(opened.created for [opened] in results) == [False, False, True]
    assert len({opened.episode.id for [opened] in results}) == 1
    assert len(await stores[0].healing.list_actions(ActionFilter())) == 1


async def test_take_is_exclusive_across_replicas(open_replica: Opener, clock: FakeClock, firing: WebhookAlert) -> None:
    """Of two replicas taking the same step at once exactly one gets it, and only it may claim it."""
    first, second = await replicas(open_replica, 2)
    action = await due_step(first, clock, firing)
    until = clock.now + LEASE
    won = await asyncio.gather(
        first.healing.take(action.id, REPLICA, clock.now, until),
        second.healing.take(action.id, OTHER, clock.now, until),
    )
    assert sorted(episode is not None for episode in won) == [False, True]
    assert [episode.id for episode in won if episode is not None] == [action.episode_id]
    winner, loser = (REPLICA, OTHER) if won[0] else (OTHER, REPLICA)
    assert (await second.healing.agenda(clock.now, loser)).due == []
    assert not await first.healing.claim(action.id, None, loser)
    assert await second.healing.claim(action.id, None, winner)


async def test_a_lapsed_claim_moves_to_another_replica_and_fences_the_first(
    open_replica: Opener, clock: FakeClock, firing: WebhookAlert
) -> None:
    """A replica that stopped renewing loses its steps once another takes or settles them; then it cannot finish."""
    first, second = await replicas(open_replica, 2)
    action = await taken_step(first, clock, firing)
    assert not await second.healing.take(action.id, OTHER, clock.now, clock.now + LEASE)
    # The first replica's lease lapses before it claims: the second takes the step and runs it.
    clock.advance(LEASE + 1)
    assert [a.id for a in (await second.healing.agenda(clock.now, OTHER)).due] == [action.id]
    assert await second.healing.take(action.id, OTHER, clock.now, clock.now + LEASE)
    assert not await first.healing.claim(action.id, None, REPLICA)
    assert await second.healing.claim(action.id, None, OTHER)
    # Then the second stops renewing too: its lease lapses while the step runs, and the first settles it.
    clock.advance(LEASE + 1)
    [abandoned] = await first.healing.abandoned(clock.now)
    assert abandoned.id == action.id and abandoned.replica == OTHER
    settled = Finish(Outcome.INTERRUPTED, detail="its replica stopped renewing")
    assert await first.healing.finish(action.id, settled, abandoned_before=clock.now)
    assert not await second.healing.mark_verifying(action.id, "exit 0", OTHER)
    assert not await second.healing.finish(action.id, Finish(Outcome.HEALED), replica=OTHER)
    done = await second.healing.get_action(action.id)
    assert done is not None and done.outcome is Outcome.INTERRUPTED


async def test_a_lapsed_claim_nobody_settled_is_still_its_replicas(
    open_replica: Opener, clock: FakeClock, firing: WebhookAlert
) -> None:
    """After an outage of the store every claim has lapsed; a replica may still record its own step's outcome."""
    [first] = await replicas(open_replica, 1)
    action = await taken_step(first, clock, firing)
    assert await first.healing.claim(action.id, None, REPLICA)
    clock.advance(LEASE + 1)
    assert await first.healing.mark_verifying(action.id, "exit 0", REPLICA)
    assert await first.healing.finish(action.id, Finish(Outcome.HEALED), replica=REPLICA)


async def test_a_renewed_claim_is_neither_settled_nor_fenced(
    open_replica: Opener, clock: FakeClock, firing: WebhookAlert
) -> None:
    """While its replica renews, a running step is not abandoned and its replica finishes it."""
    first, second = await replicas(open_replica, 2)
    action = await taken_step(first, clock, firing)
    assert await first.healing.claim(action.id, None, REPLICA)
    for _ in range(3):
        clock.advance(LEASE / 2)
        await first.coordination.renew(REPLICA, clock.now + LEASE)
    assert await second.healing.abandoned(clock.now) == []
    assert not await second.healing.finish(action.id, Finish(Outcome.INTERRUPTED), abandoned_before=clock.now)
    assert await first.healing.mark_verifying(action.id, "exit 0", REPLICA)
    assert await first.healing.finish(action.id, Finish(Outcome.HEALED), replica=REPLICA)


async def test_a_restarted_replica_forgets_what_its_predecessor_held(
    open_replica: Opener, clock: FakeClock, firing: WebhookAlert
) -> None:
    """A replica starting again drops its old slots and gives back its taken steps at once, for any replica."""
    first, second = await replicas(open_replica, 2)
    action = await taken_step(first, clock, firing)
    assert await first.coordination.take_slot(REPLICA, "restart", clock.now, clock.now + LEASE, 1, 1) is not None
    await first.coordination.forget(REPLICA)
    assert await second.coordination.take_slot(OTHER, "restart", clock.now, clock.now + LEASE, 1, 1) is not None
    assert await second.healing.take(action.id, OTHER, clock.now, clock.now + LEASE)


async def test_the_budget_holds_across_replicas(open_replica: Opener, clock: FakeClock) -> None:
    """Charges from three replicas at once never exceed the budget, and the breaker opens for all of them."""
    stores = await replicas(open_replica, 3)
    charges = await asyncio.gather(
        *(stores[i % 3].coordination.charge_budget(clock.now, 5, 3600.0, 600.0) for i in range(30))
    )
    assert charges.count(Charge.CHARGED) == 5
    assert [await store.coordination.circuit_open(clock.now) for store in stores] == [True, True, True]
    clock.advance(601)
    assert not await stores[1].coordination.circuit_open(clock.now)
    assert await stores[2].coordination.charge_budget(clock.now, 5, 3600.0, 600.0) is Charge.CHARGED


async def test_slots_are_limited_across_replicas(open_replica: Opener, clock: FakeClock) -> None:
    """Slots taken from three replicas at once hold both limits; a slot whose claim lapsed frees its place."""
    stores = await replicas(open_replica, 3)
    until = clock.now + LEASE

    async def take(i: int, strategy: str) -> int | None:
        return await stores[i % 3].coordination.take_slot(f"r{i % 3}", strategy, clock.now, until, 3, 2)

    same = await asyncio.gather(*(take(i, "restart") for i in range(12)))
    assert len([slot for slot in same if slot is not None]) == 2
    mixed = await asyncio.gather(*(take(i, f"s{i}") for i in range(12)))
    assert len([slot for slot in mixed if slot is not None]) == 1  # 3 in all, 2 of them already restarts
    [held] = [slot for slot in mixed if slot is not None]
    await stores[0].coordination.release_slot(held)
    assert await take(0, "other") is not None
    clock.advance(LEASE + 1)  # nobody renewed: every slot's claim has lapsed
    assert await take(1, "restart") is not None and await take(2, "restart") is not None


async def test_one_leader_until_its_lease_lapses(open_replica: Opener, clock: FakeClock) -> None:
    """Replicas contending at once get one leader; another takes over only once the leader stops renewing."""
    stores = await replicas(open_replica, 3)
    names = ["r0", "r1", "r2"]
    won = await asyncio.gather(
        *(
            store.coordination.lead(name, clock.now, clock.now + LEASE)
            for store, name in zip(stores, names, strict=True)
        )
    )
    assert won.count(True) == 1
    leader = won.index(True)
    other = (leader + 1) % 3
    clock.advance(LEASE / 2)
    assert await stores[leader].coordination.lead(names[leader], clock.now, clock.now + LEASE)
    assert not await stores[other].coordination.lead(names[other], clock.now, clock.now + LEASE)
    clock.advance(LEASE + 1)
    assert await stores[other].coordination.lead(names[other], clock.now, clock.now + LEASE)
    assert not await stores[leader].coordination.lead(names[leader], clock.now, clock.now + LEASE)
    await stores[other].coordination.resign(names[other])
    assert await stores[leader].coordination.lead(names[leader], clock.now, clock.now + LEASE)


async def test_a_wrong_password_is_refused_without_showing_it(
    monkeypatch: pytest.MonkeyPatch, postgres_db: PostgresDatabase, clock: FakeClock
) -> None:
    """A wrong password (the environment's, over the file's) gives a one-line reason that contains no password."""
    wrong = "not-the-password-4f1b2c"
    monkeypatch.setenv("HEALER_STORE_PASSWORD", wrong)
    with pytest.raises(StoreUnavailableError) as refused:
        await PostgresStorage.open(store_of(postgres_db), clock)
    message = str(refused.value)
    assert "password authentication failed" in message and "\n" not in message
    assert wrong not in message and postgres_db.password not in message
    # Nor does the driver's exception travel with it, where a traceback would print its parameters.
    assert refused.value.__cause__ is None and refused.value.__suppress_context__


async def test_a_missing_database_is_named(postgres_db: PostgresDatabase, clock: FakeClock) -> None:
    """A database that does not exist gives a one-line reason naming it."""
    store = StoreConfig(url=postgres_db.url + "_missing", password_file=postgres_db.password_file)
    with pytest.raises(StoreUnavailableError, match=f'database "{postgres_db.name}_missing" does not exist'):
        await PostgresStorage.open(store, clock)


async def test_a_stopped_server_is_unavailable_quickly_then_back(
    open_replica: Opener, postgres_db: PostgresDatabase, firing: WebhookAlert
) -> None:
    """With the server stopped, reads and writes fail fast as unavailable, without the password; after a start, work."""
    storage = await open_replica()
    await deliver(storage, firing)
    postgres_db.server.stop()
    for attempt in (storage.inbox.depth(), storage.inbox.accept(b"{}", 1)):
        began = time.monotonic()
        with pytest.raises(StoreUnavailableError) as stopped:
            await attempt
        assert time.monotonic() - began < 8.0  # the pool's 5 s timeout, not a hang
        assert postgres_db.password not in str(stopped.value)
    with pytest.raises(StoreUnavailableError, match="cannot open the PostgreSQL store"):
        await PostgresStorage.open(store_of(postgres_db), time.time)
    postgres_db.server.start()
    began = time.monotonic()
    assert await storage.inbox.depth() == 1
    assert time.monotonic() - began < 8.0
    await deliver(storage, firing)
    assert await storage.inbox.depth() == 2


async def test_the_budget_window_and_the_breaker_reset(open_replica: Opener, clock: FakeClock) -> None:
    """Charges leave the budget after its window; a spent budget opens the breaker, whose reset empties the budget."""
    [store] = await replicas(open_replica, 1)
    coordination = store.coordination

    async def charge() -> bool:
        return await coordination.charge_budget(clock.now, 2, 10.0, 60.0) is Charge.CHARGED

    assert [await charge(), await charge()] == [True, True]
    clock.advance(11)  # both charges left the window
    assert [await charge(), await charge(), await charge()] == [True, True, False]
    assert await coordination.circuit_open(clock.now)
    clock.advance(30)  # the charges left the window, but the breaker is still open
    assert not await charge()
    clock.advance(31)  # the breaker's reset passed: it closes with its budget empty
    assert [await charge(), await charge(), await charge()] == [True, True, False]


async def test_a_failed_batch_commits_nothing_and_leaves_its_connection_usable(
    open_replica: Opener, firing: WebhookAlert
) -> None:
    """A statement that fails in a batch undoes the statements before it; the pool's connections still work."""
    storage = await open_replica()
    database = storage.database
    with pytest.raises(StoreUnavailableError, match="division by zero"):
        await database.batch([("INSERT INTO budget (started_at) VALUES (1)", ()), ("SELECT 1 / 0", ())], durable=False)
    assert (await database.read("SELECT count(*) AS n FROM budget"))[0]["n"] == 0
    for _ in range(8):  # every connection of the pool, whichever took the failed batch
        assert (await database.batch([("SELECT 1 AS one", ())]))[0].value() == 1
    await deliver(storage, firing)
    assert await storage.inbox.depth() == 1


async def test_connections_the_server_ended_are_replaced_unasked(
    open_replica: Opener, postgres_db: PostgresDatabase, firing: WebhookAlert
) -> None:
    """Idle connections whose backends the server ended are replaced when lent, not failed on: no caller sees it."""
    storage = await open_replica()
    await asyncio.gather(*(storage.inbox.depth() for _ in range(4)))  # several connections in the pool
    async with await psycopg.AsyncConnection.connect(
        postgres_db.url, password=postgres_db.password, autocommit=True
    ) as admin:
        ended = await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid != pg_backend_pid()",
            (postgres_db.name,),
        )
        assert len(await ended.fetchall()) >= 2
    await asyncio.sleep(0.2)  # the ends reach the sockets
    for _ in range(6):
        await deliver(storage, firing)
    assert await storage.inbox.depth() == 6
