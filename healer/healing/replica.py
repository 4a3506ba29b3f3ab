"""This replica: its name, the claims it keeps renewed, and whether it leads.

Every claim a replica makes in the store (a step it took, a concurrency slot, the leadership) lasts
`store.lease` unless renewed; the replica renews them all four times per lease. When it dies, its
claims run out and the other replicas take its work over. Once-per-cluster work (planner and
optimizer cycles, HealingFailed delivery, silence sweeps, approval expiry, retention) runs only on
the leader. A store that one healer owns (SQLite) has just this one replica, always the leader.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Gauge

from healer.config import HealerConfig
from healer.logs import fields
from healer.storage import Coordination, StoreUnavailableError

log = logging.getLogger(__name__)

REPLICA_ENV = "HEALER_REPLICA"
# Renewals per lease: a replica that misses up to three in a row keeps its claims.
RENEWALS_PER_LEASE = 4


def replica_name(config: HealerConfig, environ: dict[str, str] | None = None) -> str:
    """HEALER_REPLICA, else server.replica, else host:port (stable across restarts of one replica), or
    with port 0 (a port picked at start) host-pid."""
    env = os.environ if environ is None else environ
    named = env.get(REPLICA_ENV, "").strip() or config.server.replica
    if named:
        return named
    port = config.server.listen.rsplit(":", 1)[1]
    return f"{socket.gethostname()}:{port}" if port != "0" else f"{socket.gethostname()}-{os.getpid()}"


class Replica:
    """Keeps this replica's claims renewed and tells whether it leads."""

    def __init__(
        self,
        name: str,
        coordination: Coordination,
        lease: float,
        shared: bool,
        registry: CollectorRegistry,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.name = name
        self.lease = lease
        self.shared = shared
        self._coordination = coordination
        self._clock = clock
        self._leader = not shared
        # Since when every renewal has reached the store; None while it cannot be reached.
        self._steady_since: float | None = None
        self._task: asyncio.Task[None] | None = None
        self._leader_gauge = Gauge(
            "healer_replica_leader", "1 while this replica leads (runs the once-per-cluster work).", registry=registry
        )
        info = Gauge("healer_replica_info", "This replica's name (value 1).", ["replica"], registry=registry)
        info.labels(name).set(1)
        self._leader_gauge.set(int(self._leader))

    @property
    def leader(self) -> bool:
        """Whether this replica runs the once-per-cluster work now."""
        return self._leader

    @property
    def steady(self) -> bool:
        """Whether this replica has reached the store for a whole lease without a break.

        Only then may it settle other replicas' lapsed claims: after an outage of the store every
        claim has lapsed, and the live replicas need a lease to renew theirs before anyone judges them.
        """
        return self._steady_since is not None and self._clock() - self._steady_since >= self.lease

    def until(self) -> float:
        """When a claim made now runs out unless renewed."""
        return self._clock() + self.lease

    async def start(self) -> None:
        """Forget what an earlier process of this replica held, try to lead, then keep claims renewed."""
        await self._coordination.forget(self.name)
        await self._renew()
        self._task = asyncio.create_task(self._run(), name="replica-renewal")

    async def stop(self) -> None:
        """Stop renewing and hand the leadership over at once."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self.shared and self._leader:
            with contextlib.suppress(StoreUnavailableError):
                await self._coordination.resign(self.name)
        self._set_leader(not self.shared)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.lease / RENEWALS_PER_LEASE)
            await self._renew()

    async def _renew(self) -> None:
        try:
            until = self.until()
            await self._coordination.renew(self.name, until)
            if self._steady_since is None:
                self._steady_since = self._clock()
            if self.shared:
                self._set_leader(await self._coordination.lead(self.name, self._clock(), until))
        except StoreUnavailableError as exc:
            self._steady_since = None
            # Claims not renewed run out; leading without the store would do the leader's work twice.
            log.error("claims not renewed", extra=fields(replica=self.name, reason=str(exc)))
            if self.shared:
                self._set_leader(False)
        except Exception:  # the renewals must go on
            log.exception("claims not renewed", extra=fields(replica=self.name))

    def _set_leader(self, leader: bool) -> None:
        if leader != self._leader:
            log.info("leadership changed", extra=fields(replica=self.name, leader=leader))
        self._leader = leader
        self._leader_gauge.set(int(leader))
