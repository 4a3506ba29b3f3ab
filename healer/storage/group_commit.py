"""Group commit: items submitted while a commit is under way are written together by the next one."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from healer.storage.errors import StoreUnavailableError

T = TypeVar("T")


class GroupCommit(Generic[T]):
    """Batches concurrent submissions into one `commit(batch)`, which returns each item's id in order."""

    def __init__(self, commit: Callable[[list[T]], Awaitable[list[int]]]) -> None:
        self._commit = commit
        self._pending: list[tuple[T, asyncio.Future[int]]] = []
        self._flushing = False

    async def submit(self, item: T) -> int:
        """Make one item durable with whatever else is pending; return its id or raise StoreUnavailableError."""
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pending.append((item, future))
        if not self._flushing:
            self._flushing = True
            asyncio.get_running_loop().create_task(self._flush())
        return await future

    async def _flush(self) -> None:
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                try:
                    ids = await self._commit([item for item, _ in batch])
                except Exception as exc:  # every waiter learns that its item was not stored
                    error = exc if isinstance(exc, StoreUnavailableError) else StoreUnavailableError(str(exc))
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(error)
                    continue
                for (_, future), item_id in zip(batch, ids, strict=True):
                    if not future.done():
                        future.set_result(item_id)
        finally:
            self._flushing = False
