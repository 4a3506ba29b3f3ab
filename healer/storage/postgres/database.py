"""A pool of PostgreSQL connections (psycopg 3), its schema migrated at open, shared by any number of replicas.

Every write is one transaction on a connection of the pool; psycopg's and the pool's errors leave as
StoreUnavailableError, with a one-line reason from which the password has been removed.

A round trip to the server costs more than most of healer's statements, and a step's way from the
webhook to its start is a chain of transactions, so each transaction waits on the server as few times
as it can: it runs in pipeline mode, BEGIN and COMMIT travel with the statements around them, a
statement whose result nobody needs now is only queued (`Transaction.send`), and `batch` sends a whole
transaction at once and waits once. Lending a connection costs no round trip either (`_check`).
"""

from __future__ import annotations

import contextlib
import json
import re
import select
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from psycopg.pq import TransactionStatus
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from healer.storage.errors import StoreUnavailableError

T = TypeVar("T")
U = TypeVar("U")
Row = DictRow
Query = str | sql.Composed | sql.SQL
Connection = psycopg.AsyncConnection[Any]
Params = Sequence[Any] | Mapping[str, Any]

# How long a request waits for a connection before the store is called unavailable: a dead database
# must give the webhook a quick 503 (Alertmanager retries) rather than hold every request.
POOL_TIMEOUT = 5.0
# How long the pool keeps retrying one lost connection before it gives up and lets the next request
# start afresh; short, so that a database back after an outage is used again within seconds.
RECONNECT_TIMEOUT = 5.0
CONNECT_TIMEOUT = 5
# Connections kept apart for renewing claims and leadership.
LEASE_POOL_SIZE = 2


class Scrubber:
    """Turns a driver's error into a one-line reason that never contains the password."""

    def __init__(self, password: str | None) -> None:
        self._password = password

    def __call__(self, exc: BaseException) -> str:
        text = " ".join(str(exc).split()) or type(exc).__name__
        if self._password:
            text = text.replace(self._password, "***")
        # libpq may echo a conninfo; a password= in it is dropped whatever it says.
        return re.sub(r"password\s*=\s*\S+", "password=***", text, flags=re.IGNORECASE)


class Transaction:
    """One connection inside one transaction, in pipeline mode, with the few ways healer's records query it.

    `rows`, `row` and `value` wait for their result (one round trip, which also carries everything
    queued before); `execute` waits for its row count; `send`, `executemany` and `events` only queue:
    they reach the server with the next statement waited for, or with the COMMIT.
    """

    def __init__(self, conn: Connection, database: PostgresDatabase, pipeline: psycopg.AsyncPipeline) -> None:
        self.conn = conn
        self._db = database
        self._pipeline = pipeline

    async def rows(self, query: Query, params: Params = ()) -> list[Row]:
        async with self.conn.cursor(row_factory=dict_row) as cursor:
            await cursor.execute(query, params)
            return await cursor.fetchall()

    async def row(self, query: Query, params: Params = ()) -> Row | None:
        async with self.conn.cursor(row_factory=dict_row) as cursor:
            await cursor.execute(query, params)
            return await cursor.fetchone()

    async def value(self, query: Query, params: Params = ()) -> Any:
        """The first column of the first row (None when there is no row)."""
        async with self.conn.cursor() as cursor:
            await cursor.execute(query, params)
            found = await cursor.fetchone()
            return found[0] if found else None

    async def execute(self, query: Query, params: Params = ()) -> int:
        """Run one statement; return how many rows it changed (waits for the server: prefer `send`)."""
        async with self.conn.cursor() as cursor:
            await cursor.execute(query, params)
            # A sync inside the explicit transaction commits nothing; it only brings the count back.
            await self._pipeline.sync()
            return cursor.rowcount

    async def query(self, query: Query, params: Params = ()) -> psycopg.AsyncCursor[Row]:
        """Queue one query; its rows come with the next wait (`fetchall` on the cursor returned)."""
        cursor = self.conn.cursor(row_factory=dict_row)
        await cursor.execute(query, params)
        return cursor

    async def send(self, query: Query, params: Params = ()) -> None:
        """Queue one statement whose result is not needed; an error in it fails the transaction later."""
        await self.conn.execute(query, params)

    async def executemany(self, query: Query, params: Sequence[Params]) -> None:
        """Queue one statement per parameter set (their results are not needed)."""
        if params:
            async with self.conn.cursor() as cursor:
                await cursor.executemany(query, params)

    async def event(
        self, kind: str, detail: dict[str, Any], episode_id: int | None = None, action_id: int | None = None
    ) -> None:
        """Append one audit event inside this transaction."""
        await self.events([(kind, detail, episode_id, action_id)])

    async def events(self, events: Sequence[tuple[str, dict[str, Any], int | None, int | None]]) -> None:
        """Append audit events (kind, detail, episode, step) in order, queued with the rest."""
        now = self._db.clock()
        await self.executemany(
            "INSERT INTO events (ts, episode_id, action_id, kind, detail) VALUES (%s, %s, %s, %s, %s)",
            [(now, episode_id, action_id, kind, json.dumps(detail)) for kind, detail, episode_id, action_id in events],
        )


@dataclass(frozen=True)
class Result:
    """What one statement of a `batch` returned: its rows (none for a statement without any) and row count."""

    rows: list[Row]
    rowcount: int

    def value(self) -> Any:
        """The first column of the first row (None when there is no row)."""
        return next(iter(self.rows[0].values())) if self.rows else None


def _has_input(conn: Connection) -> bool:
    """Whether an idle connection has something to read: only a server closing it sends anything unasked."""
    try:
        readable, _, _ = select.select([conn.fileno()], [], [], 0)
    except (OSError, ValueError, psycopg.Error):  # closed: no descriptor left
        return True
    return bool(readable)


async def _check(conn: Connection) -> None:
    """The pool's check of a connection before lending it: a connection broken by a database restart
    is replaced, not failed on.

    An idle connection that the server closed (a restart, a terminated backend) has its FATAL
    message or the end of the stream waiting on its socket; one that has nothing to read is
    lent without the round trip of a query, which every store call on a step's way would wait for.
    """
    if conn.closed or _has_input(conn):
        await conn.execute("")  # raises for a broken connection, which the pool then replaces


async def _results(cursors: list[psycopg.AsyncCursor[Row]]) -> list[Result]:
    return [Result(await cursor.fetchall() if cursor.description else [], cursor.rowcount) for cursor in cursors]


class PostgresDatabase:
    """The pool, the clock, and the scrubbing of errors; open it with `PostgresDatabase.open`."""

    def __init__(
        self,
        pool: AsyncConnectionPool[Connection],
        clock: Callable[[], float],
        scrub: Scrubber,
        lease_pool: AsyncConnectionPool[Connection] | None = None,
    ) -> None:
        self.pool = pool
        self.clock = clock
        self.scrub = scrub
        # Renewing claims and leadership never queues behind the steps' traffic: a replica whose
        # renewals waited longer than the lease would lose its steps while it is alive and running them.
        self.lease_pool = lease_pool if lease_pool is not None else pool

    def unavailable(self, exc: psycopg.Error) -> StoreUnavailableError:
        """The error to raise for a driver's error: its one-line reason, without the password."""
        if isinstance(exc, PoolTimeout):
            return StoreUnavailableError(f"PostgreSQL gave no connection within {self.pool.timeout:g} s")
        return StoreUnavailableError(self.scrub(exc))

    @classmethod
    async def open(
        cls,
        url: str,
        password: str | None,
        pool_size: int,
        clock: Callable[[], float] = time.time,
        timeout: float = POOL_TIMEOUT,
    ) -> PostgresDatabase:
        """Connect, create or migrate the schema, and open the pool; raises StoreUnavailableError."""
        from healer.storage.postgres.migrations import migrate

        scrub = Scrubber(password)
        # The password travels as its own keyword, never inside the conninfo that errors may quote.
        options: dict[str, Any] = {"connect_timeout": CONNECT_TIMEOUT, "application_name": "healer"}
        if password is not None:
            options["password"] = password
        # healer's statements are a fixed few, run again and again: prepared on first use, each is
        # planned once per connection rather than at every execution of the first five (psycopg's default).
        pool_options = {**options, "autocommit": True, "prepare_threshold": 0}
        try:
            # One connection of its own first: its error says why (refused, no database, wrong
            # password), where a pool would only report a timeout.
            async with await psycopg.AsyncConnection.connect(url, autocommit=True, **options) as conn:
                await migrate(conn, clock)
        except psycopg.Error as exc:
            raise StoreUnavailableError(f"cannot open the PostgreSQL store: {scrub(exc)}") from None

        def new_pool(name: str, size: int) -> AsyncConnectionPool[Connection]:
            return AsyncConnectionPool(
                url,
                kwargs=pool_options,
                min_size=min(2, size),
                max_size=size,
                open=False,
                timeout=timeout,
                reconnect_timeout=RECONNECT_TIMEOUT,
                # A connection that a database restart broke is replaced before use, not failed on.
                check=_check,
                name=name,
            )

        pool, lease_pool = new_pool("healer-store", pool_size), new_pool("healer-leases", LEASE_POOL_SIZE)
        try:
            await pool.open(wait=True, timeout=timeout)
            await lease_pool.open(wait=True, timeout=timeout)
        except psycopg.Error as exc:
            await pool.close()
            await lease_pool.close()
            raise StoreUnavailableError(f"cannot open the PostgreSQL store: {scrub(exc)}") from None
        return cls(pool, clock, scrub, lease_pool)

    async def transaction(self, work: Callable[[Transaction], Awaitable[T]], *, durable: bool = True) -> T:
        """Run `work` in one transaction on a connection of the pool (it commits unless `work` raises).

        `durable=False` commits without waiting for the WAL to reach the disk (see `batch`).
        """
        return await self._run(self.pool, work, durable)

    write = transaction

    async def transaction_then(
        self, work: Callable[[Transaction], Awaitable[T]], after: Callable[[T], Awaitable[U]]
    ) -> U:
        """Like `transaction`, then `after` on what `work` returned, still holding the connection: it may
        read the rows of cursors `work` queued, which came back with the COMMIT."""
        return await self._run(self.pool, work, True, after)

    async def lease_write(self, work: Callable[[Transaction], Awaitable[T]], *, durable: bool = True) -> T:
        """Like `transaction`, on the connections kept for renewing claims and leadership."""
        return await self._run(self.lease_pool, work, durable)

    async def batch(
        self, statements: Sequence[tuple[Query, Params]], *, durable: bool = True, leases: bool = False
    ) -> list[Result]:
        """Run `statements` in order in one transaction, sent together: one round trip for all of them.

        Each statement sees what the ones before it did (they are separate statements, each with a
        fresh snapshot), so a lock taken by one holds for those after it.

        `durable=False` sets synchronous_commit off for this transaction only: its COMMIT does not
        wait for the WAL flush. A server crash may then lose it (never corrupt anything), and only if
        no durable commit came after it: a durable commit flushes the whole WAL before its own record,
        other transactions' included. `leases` runs it on the connections kept for leases.
        """

        async def work(tx: Transaction) -> list[psycopg.AsyncCursor[Row]]:
            cursors = []
            for query, params in statements:
                cursor = tx.conn.cursor(row_factory=dict_row)
                await cursor.execute(query, params)
                cursors.append(cursor)
            return cursors

        # The cursors' results come in with the pipeline's final sync; read while the connection is held.
        return await self._run(self.lease_pool if leases else self.pool, work, durable, _results)

    async def _run(
        self,
        pool: AsyncConnectionPool[Connection],
        work: Callable[[Transaction], Awaitable[Any]],
        durable: bool,
        after: Callable[[Any], Awaitable[T]] | None = None,
    ) -> T:
        try:
            async with pool.connection() as conn:
                try:
                    async with conn.pipeline() as pipeline:
                        # Queued, not waited for: BEGIN reaches the server with the first statement.
                        await conn.execute("BEGIN")
                        if not durable:
                            await conn.execute("SET LOCAL synchronous_commit = off")
                        result = await work(Transaction(conn, self, pipeline))
                        await conn.execute("COMMIT")
                    # Leaving the pipeline syncs: the one wait for the COMMIT and whatever was queued.
                    return await after(result) if after is not None else result
                except BaseException:
                    # A failed statement leaves the transaction aborted, `work` raising leaves it open.
                    if conn.info.transaction_status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
                        with contextlib.suppress(psycopg.Error):
                            await conn.execute("ROLLBACK")
                    raise
        except psycopg.Error as exc:
            # `from None`: the driver's exception may hold the connection's parameters.
            raise self.unavailable(exc) from None

    async def read(self, query: Query, params: Params = ()) -> list[Row]:
        """One query outside any transaction (the pool's connections autocommit): one round trip."""
        try:
            async with self.pool.connection() as conn, conn.cursor(row_factory=dict_row) as cursor:
                await cursor.execute(query, params)
                return await cursor.fetchall()
        except psycopg.Error as exc:
            raise self.unavailable(exc) from None

    async def close(self) -> None:
        await self.pool.close()
        if self.lease_pool is not self.pool:
            await self.lease_pool.close()
