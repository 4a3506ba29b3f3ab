"""A background loop that runs one cycle of work every interval, or at once when woken."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

from healer.logs import fields
from healer.storage import StoreUnavailableError

log = logging.getLogger(__name__)


class Cycle:
    """Runs `work` every `interval` seconds and whenever woken; a failing run is logged and the next still comes."""

    def __init__(self, name: str, interval: float, work: Callable[[], Awaitable[None]]) -> None:
        self.name = name
        self.interval = interval
        self._work = work
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=self.name)

    def wake(self) -> None:
        """Run the next cycle now rather than at the end of the interval."""
        self._wake.set()

    async def stop(self) -> None:
        """Cancel the loop, a cycle in progress included, and wait for it."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _run(self) -> None:
        while True:
            self._wake.clear()
            try:
                await self._work()
            except StoreUnavailableError as exc:
                log.error("cycle failed; retrying", extra=fields(cycle=self.name, reason=str(exc)))
            except Exception:  # the next cycle must still come
                log.exception("cycle failed; retrying", extra=fields(cycle=self.name))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=self.interval)
