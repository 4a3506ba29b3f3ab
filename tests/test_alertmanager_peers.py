"""AlertmanagerClient with `alertmanager.peers`, against two real Alertmanagers in one gossip cluster.

Gossip shares silences, not alerts: alerts must reach every Alertmanager, a silence only one.
A peer that is down is a free loopback port that nothing listens on.
"""

from __future__ import annotations

import asyncio
import functools
import signal
import uuid
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar

import pytest

from healer.alertmanager import AlertmanagerClient, AlertmanagerUnavailableError
from healer.config import AlertmanagerConfig
from tests.servers import Server, free_port, start_alertmanager_cluster, wait_for

pytestmark = pytest.mark.slow

T = TypeVar("T")
NULL_ROUTE = {"route": {"receiver": "null"}, "receivers": [{"name": "null"}]}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[Server]]:
    """Two Alertmanagers gossiping with each other, for the whole module."""
    members = start_alertmanager_cluster(tmp_path_factory.mktemp("am-cluster"), [NULL_ROUTE, NULL_ROUTE])
    yield members
    for member in members:
        member.stop(signal.SIGTERM)


def down() -> str:
    """The URL of an Alertmanager that is not running."""
    return f"http://127.0.0.1:{free_port()}"


def run(url: str, peers: list[str], call: Callable[[AlertmanagerClient], Awaitable[T]]) -> T:
    """Run one call on a client of `url` with `peers`, in its own event loop."""

    async def main() -> T:
        async with AlertmanagerClient(AlertmanagerConfig(url=url, peers=peers, timeout="2s")) as client:
            return await call(client)

    return asyncio.run(main())


def alerts_on(member: Server, **labels: str) -> list[dict[str, Any]]:
    return run(member.url, [], lambda client: client.alerts(labels))


def silences_on(member: Server, comment: str) -> list[dict[str, Any]]:
    """The silences one Alertmanager holds with `comment`, in any state."""
    found = run(member.url, [], lambda client: client.silences(active_only=False))
    return [silence for silence in found if silence["comment"] == comment]


async def post(client: AlertmanagerClient, alerts: list[dict[str, Any]]) -> None:
    await client.post_alerts(alerts)


def alert(test: str) -> dict[str, Any]:
    return {"labels": {"alertname": "HealingFailed", "test": test}, "annotations": {"summary": "s"}}


def test_alerts_reach_url_and_every_peer(cluster: list[Server]) -> None:
    """Posted alerts are on url and on the peer, which gossip alone would not give them."""
    first, second = cluster
    run(first.url, [second.url], lambda client: client.post_alerts([alert("both")]))
    assert len(alerts_on(first, test="both")) == 1
    assert len(alerts_on(second, test="both")) == 1


def test_alerts_delivered_while_one_alertmanager_is_down(cluster: list[Server]) -> None:
    """With url down, a post still succeeds and reaches every peer that is up."""
    first, second = cluster
    run(down(), [first.url, second.url], lambda client: client.post_alerts([alert("url-down")]))
    assert len(alerts_on(first, test="url-down")) == 1
    assert len(alerts_on(second, test="url-down")) == 1


def test_alerts_nobody_takes_raise_with_a_status_only_when_all_agree(cluster: list[Server]) -> None:
    """All down gives no status; all refusing gives their 400; a refusal beside one down gives no status (retried)."""
    first, second = cluster
    unlabelled: dict[str, Any] = {"labels": {}, "annotations": {}}
    cases: list[tuple[list[str], dict[str, Any], int | None]] = [
        ([down(), down()], alert("nowhere"), None),
        ([first.url, second.url], unlabelled, 400),
        ([first.url, down()], unlabelled, None),
    ]
    for (url, *peers), posted, status in cases:
        with pytest.raises(AlertmanagerUnavailableError) as raised:
            run(url, peers, functools.partial(post, alerts=[posted]))
        assert raised.value.status == status, raised.value.reason
        assert all(each in raised.value.reason for each in (url, *peers)), raised.value.reason


def test_silence_goes_to_url_only_and_gossip_brings_it_to_peers(cluster: list[Server]) -> None:
    """A silence is created once, at url; the peer gets that same silence by gossip, not a second one."""
    first, second = cluster
    comment = f"once {uuid.uuid4()}"
    silence_id = run(first.url, [second.url], lambda client: client.create_silence({"test": "once"}, 60, comment))
    [on_peer] = wait_for(lambda: silences_on(second, comment), 10, what="the silence gossiped to the peer")
    assert on_peer["id"] == silence_id
    assert [silence["id"] for silence in silences_on(first, comment)] == [silence_id]


def test_silence_falls_back_to_a_peer_while_url_is_down(cluster: list[Server]) -> None:
    """With url down, a silence is created, listed and expired at the peer, and the cluster shares each change."""
    first, second = cluster
    dead = down()
    comment = f"fallback {uuid.uuid4()}"
    silence_id = run(dead, [second.url], lambda client: client.create_silence({"test": "fallback"}, 60, comment))
    listed = run(dead, [second.url], lambda client: client.silences())
    assert silence_id in [silence["id"] for silence in listed]
    wait_for(lambda: silences_on(first, comment), 10, what="the silence gossiped to the other member")
    run(dead, [first.url], lambda client: client.expire_silence(silence_id))

    def expired_on(member: Server) -> bool:
        return [silence["status"]["state"] for silence in silences_on(member, comment)] == ["expired"]

    assert expired_on(first)
    wait_for(lambda: expired_on(second), 10, what="the expiry gossiped to the peer")


def test_silence_refused_by_url_is_an_error_when_peers_are_down(cluster: list[Server]) -> None:
    """A 4xx from url is final: the error keeps its status and no peer is asked (one that is down adds no error)."""
    first, _ = cluster
    with pytest.raises(AlertmanagerUnavailableError) as raised:
        run(first.url, [down()], lambda client: client.create_silence({"": "x"}, 60, "invalid"))
    assert raised.value.status == 400 and "cannot reach" not in raised.value.reason
