"""The PostgreSQL backend: one database shared by any number of healer replicas."""

from __future__ import annotations

import time
from collections.abc import Callable

from healer.config import StoreConfig
from healer.storage.errors import StoreUnavailableError
from healer.storage.health import StoreHealth, classify
from healer.storage.postgres.coordination import PostgresCoordination
from healer.storage.postgres.database import POOL_TIMEOUT, PostgresDatabase, Transaction
from healer.storage.postgres.goals import PostgresGoalRecords
from healer.storage.postgres.healing import PostgresHealingRecords
from healer.storage.postgres.inbox import PostgresInbox
from healer.storage.postgres.pauses import PostgresPauseRecords
from healer.storage.postgres.sessions import PostgresSessionRecords
from healer.storage.postgres.trials import PostgresTrialRecords


class PostgresStorage:
    """Every concern's records in one PostgreSQL database, through a pool; open it with `PostgresStorage.open`."""

    def __init__(self, database: PostgresDatabase) -> None:
        self.database = database
        self._inbox = PostgresInbox(database)
        self._healing = PostgresHealingRecords(database)
        self._goals = PostgresGoalRecords(database)
        self._trials = PostgresTrialRecords(database)
        self._coordination = PostgresCoordination(database)
        self._pauses = PostgresPauseRecords(database)
        self._sessions = PostgresSessionRecords(database)

    @classmethod
    async def open(
        cls, config: StoreConfig, clock: Callable[[], float] = time.time, timeout: float = POOL_TIMEOUT
    ) -> PostgresStorage:
        """Connect to `config.url` with the configured password, migrate, and open the pool."""
        if config.url is None:
            raise ValueError("a PostgreSQL store needs store.url")
        try:
            secret = config.resolve_password()
        except OSError as exc:
            raise StoreUnavailableError(
                f"cannot read store.password_file {config.password_file}: {exc.strerror}"
            ) from None
        password = secret.get_secret_value() if secret is not None else None
        return cls(await PostgresDatabase.open(config.url, password, config.pool_size, clock, timeout))

    @property
    def shared(self) -> bool:
        return True  # any number of replicas use one database

    @property
    def inbox(self) -> PostgresInbox:
        return self._inbox

    @property
    def healing(self) -> PostgresHealingRecords:
        return self._healing

    @property
    def goals(self) -> PostgresGoalRecords:
        return self._goals

    @property
    def trials(self) -> PostgresTrialRecords:
        return self._trials

    @property
    def coordination(self) -> PostgresCoordination:
        return self._coordination

    @property
    def pauses(self) -> PostgresPauseRecords:
        return self._pauses

    @property
    def sessions(self) -> PostgresSessionRecords:
        return self._sessions

    async def health(self) -> StoreHealth:
        """A connection of the pool and a committed write."""
        try:
            await self.database.write(_probe)
        except StoreUnavailableError as exc:  # scrubbed: never the password
            return StoreHealth(classify(str(exc)), str(exc))
        return StoreHealth()

    async def close(self) -> None:
        await self.database.close()


async def _probe(tx: Transaction) -> None:
    # A real write (the row rewritten as it is), committed: the server has a connection and takes writes.
    await tx.execute(
        "UPDATE schema_versions SET description = description"
        " WHERE version = (SELECT max(version) FROM schema_versions)"
    )


__all__ = ["PostgresStorage"]
