"""A pool of PostgreSQL connections (psycopg 3), its schema migrated at open, shared by any number of replicas.

Every write is one transaction on a connection of the pool; psycopg's and the pool's errors leave as
StoreUnavailableError, with a one-line reason from which the password has been removed.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import psycopg
from psycopg import sql
from psycopg.rows import DictRow, dict_row
from psycopg_pool import AsyncConnectionPool, PoolTimeout

from healer.storage.errors import StoreUnavailableError

T = TypeVar("T")
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
    """One connection inside one transaction, with the few ways healer's records query it."""

    def __init__(self, conn: Connection, database: PostgresDatabase) -> None:
        self.conn = conn
        self._db = database

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
        """Run one statement; return how many rows it changed."""
        async with self.conn.cursor() as cursor:
            await cursor.execute(query, params)
            return cursor.rowcount

    async def executemany(self, query: Query, params: Sequence[Params]) -> None:
        if params:
            async with self.conn.cursor() as cursor:
                await cursor.executemany(query, params)

    async def event(
        self, kind: str, detail: dict[str, Any], episode_id: int | None = None, action_id: int | None = None
    ) -> None:
        """Append one audit event inside this transaction."""
        await self.events([(kind, detail, episode_id, action_id)])

    async def events(self, events: Sequence[tuple[str, dict[str, Any], int | None, int | None]]) -> None:
        """Append audit events (kind, detail, episode, step) in order, in one round trip."""
        now = self._db.clock()
        await self.executemany(
            "INSERT INTO events (ts, episode_id, action_id, kind, detail) VALUES (%s, %s, %s, %s, %s)",
            [(now, episode_id, action_id, kind, json.dumps(detail)) for kind, detail, episode_id, action_id in events],
        )


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
                kwargs={**options, "autocommit": True},
                min_size=min(2, size),
                max_size=size,
                open=False,
                timeout=timeout,
                reconnect_timeout=RECONNECT_TIMEOUT,
                # A connection that a database restart broke is replaced before use, not failed on.
                check=AsyncConnectionPool.check_connection,
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

    async def transaction(self, work: Callable[[Transaction], Awaitable[T]]) -> T:
        """Run `work` in one transaction on a connection of the pool (it commits unless `work` raises)."""
        try:
            async with self.pool.connection() as conn, conn.transaction():
                return await work(Transaction(conn, self))
        except psycopg.Error as exc:
            # `from None`: the driver's exception may hold the connection's parameters.
            raise self.unavailable(exc) from None

    write = transaction

    async def lease_write(self, work: Callable[[Transaction], Awaitable[T]]) -> T:
        """Like `transaction`, on the connections kept for renewing claims and leadership."""
        try:
            async with self.lease_pool.connection() as conn, conn.transaction():
                return await work(Transaction(conn, self))
        except psycopg.Error as exc:
            raise self.unavailable(exc) from None

    async def read(self, query: Query, params: Params = ()) -> list[Row]:
        """One query outside any transaction (the pool's connections autocommit)."""
        try:
            async with self.pool.connection() as conn:
                return await Transaction(conn, self).rows(query, params)
        except psycopg.Error as exc:
            raise self.unavailable(exc) from None

    async def close(self) -> None:
        await self.pool.close()
        if self.lease_pool is not self.pool:
            await self.lease_pool.close()
