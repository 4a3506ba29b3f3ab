"""Request limits against a real `healer serve` (issue 13): slow request heads, an endless chunked body and
many large uploads end within their configured times, large bodies are capped and their memory given back,
and nothing refused is half accepted."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from pathlib import Path
from typing import Any

from tests.servers import Server, http_get, start_healer, wait_for
from tests.test_engine_safety import AUTH, alert, config, metric, payload, steps_log
from tests.test_receiver import post

HEADER_TIMEOUT = 2.0
BODY_TIMEOUT = 3.0
# Generous: the deadlines are the requirement, the margin absorbs a loaded two-core machine.
MARGIN = 8.0
SLOW_CLIENTS = 200
UPLOADS = 50
UPLOAD_BYTES = 900_000
# Default server.max_large_bodies and server.large_body_bytes.
LARGE_SLOTS = 16
LARGE_BYTES = 256 * 1024
RSS_RETURN_MIB = 10.0


def limited_healer(workdir: Path, servers: list[Server]) -> Server:
    """A healer whose one rule records each step, with short header and body timeouts."""
    settings = config(workdir)
    settings["server"].update(header_timeout=f"{HEADER_TIMEOUT:g}s", body_timeout=f"{BODY_TIMEOUT:g}s")
    healer = start_healer(workdir, settings)
    servers.append(healer)
    return healer


def address(healer: Server) -> tuple[str, int]:
    host, port = healer.url.removeprefix("http://").rsplit(":", 1)
    return host, int(port)


def webhook_head(length: int | None, *, token: bool = True) -> bytes:
    """The head of a webhook POST: Content-Length `length`, or chunked when None."""
    lines = ["POST /api/v1/alertmanager HTTP/1.1", "Host: healer", "Content-Type: application/json"]
    if token:
        lines.append(f"Authorization: {AUTH['Authorization']}")
    lines.append("Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


def answer(sock: socket.socket, timeout: float) -> tuple[int, dict[str, str], dict[str, Any]]:
    """The status, headers and JSON body of the one answer on `sock`, read until healer closes it or the
    body declared by Content-Length has arrived."""
    sock.settimeout(timeout)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed without an answer: {data!r}"
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode().split("\r\n")
    headers = {name.lower(): value.strip() for name, _, value in (line.partition(":") for line in header_lines)}
    while len(body) < int(headers.get("content-length", "0")):
        chunk = sock.recv(65536)
        assert chunk, "connection closed mid-answer"
        body += chunk
    return int(status_line.split()[1]), headers, json.loads(body) if body else {}


def closed_by_peer(sock: socket.socket, timeout: float) -> bool:
    """Whether healer closes `sock` (whatever it answers first) within `timeout`."""
    sock.settimeout(timeout)
    try:
        while sock.recv(65536):
            pass
    except TimeoutError:
        return False
    except ConnectionResetError:
        pass
    return True


def rss_mib(pid: int) -> float:
    """The resident set size of a process, from /proc/PID/status (VmRSS, in kB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


def alerts_received(healer: Server) -> int:
    _, body = http_get(healer.url + "/api/v1/status", headers=AUTH)
    return int(json.loads(body)["healing"]["alerts_received"])


def big_payload(identifier: str, size: int) -> bytes:
    """A valid webhook payload of about `size` bytes: one alert for the recording rule with a long summary."""
    return payload({**alert(identifier), "annotations": {"summary": "x" * size}})


@contextmanager
def connections(count: int, healer: Server) -> Iterator[list[socket.socket]]:
    with ExitStack() as stack:
        yield [stack.enter_context(socket.create_connection(address(healer))) for _ in range(count)]


def test_slow_request_heads_are_closed_within_the_header_timeout(tmp_path: Path, servers: list[Server]) -> None:
    """200 connections that send a request head one byte every half second are each answered 408 and closed
    within server.header_timeout (plus a margin), and healer keeps serving meanwhile."""
    healer = limited_healer(tmp_path, servers)
    with ExitStack() as stack:
        # Each connection's clock starts when it connects (healer's starts a moment later, as it accepts).
        socks: list[socket.socket] = []
        opened: list[float] = []
        for _ in range(SLOW_CLIENTS):
            sock = stack.enter_context(socket.create_connection(address(healer)))
            opened.append(time.monotonic())
            sock.sendall(b"POST /api/v1/alertmanager HTTP/1.1\r\nHost: healer\r\n")
            sock.setblocking(False)
            socks.append(sock)
        closed: dict[int, float] = {}
        answers: dict[int, bytes] = {}
        while len(closed) < SLOW_CLIENTS and time.monotonic() - opened[-1] < HEADER_TIMEOUT + MARGIN:
            for index, sock in enumerate(socks):
                if index in closed:
                    continue
                try:
                    sock.send(b"X")
                    while data := sock.recv(4096):
                        answers[index] = answers.get(index, b"") + data
                    closed[index] = time.monotonic() - opened[index]
                except BlockingIOError:
                    pass
                except (BrokenPipeError, ConnectionResetError):
                    closed[index] = time.monotonic() - opened[index]
            assert http_get(healer.url + "/-/healthy", timeout=2)[0] == 200
            time.sleep(0.5)
    assert len(closed) == SLOW_CLIENTS, f"{SLOW_CLIENTS - len(closed)} slow connections still open"
    assert max(closed.values()) < HEADER_TIMEOUT + MARGIN
    # None before its time: a head may take up to header_timeout.
    assert min(closed.values()) >= HEADER_TIMEOUT - 0.1, sorted(closed.values())[:3]
    timed_out = [reply for reply in answers.values() if reply.startswith(b"HTTP/1.1 408 ")]
    assert timed_out and all(b"server.header_timeout" in reply for reply in timed_out), list(answers.values())[:2]
    # Every connection had begun its head, so each was refused once; the client may miss a 408 that arrived
    # just before its next byte was answered by a reset, so the count is of connections, not of replies read.
    assert metric(healer, "healer_http_requests_refused_total", reason="header_timeout") == SLOW_CLIENTS


def test_heads_within_the_timeout_and_idle_keep_alive_are_served(tmp_path: Path, servers: list[Server]) -> None:
    """A head sent in pieces within server.header_timeout is served, and a kept-alive connection idle for longer
    than the header timeout between two requests serves the second one too (idleness is not a slow head)."""
    healer = limited_healer(tmp_path, servers)
    with socket.create_connection(address(healer)) as sock:
        for piece in (b"GET /-/healthy HT", b"TP/1.1\r\nHost: he", b"aler\r\n\r\n"):
            sock.sendall(piece)
            time.sleep(HEADER_TIMEOUT / 4)
        sock.settimeout(5)
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")
        time.sleep(HEADER_TIMEOUT * 1.5)
        sock.sendall(b"GET /-/healthy HTTP/1.1\r\nHost: healer\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200 ")


def test_endless_chunked_body_is_timed_out_and_nothing_accepted(tmp_path: Path, servers: list[Server]) -> None:
    """An authorised webhook whose chunked body never ends is answered 408 naming server.body_timeout and its
    connection closed, within the body timeout plus a margin; no alert of it is accepted."""
    healer = limited_healer(tmp_path, servers)
    body = payload(alert("endless"))
    with socket.create_connection(address(healer)) as sock:
        sock.sendall(webhook_head(None) + b"%x\r\n%s\r\n" % (len(body) - 1, body[:-1]))
        started = time.monotonic()
        sock.setblocking(False)
        while time.monotonic() - started < BODY_TIMEOUT + MARGIN:
            try:
                sock.sendall(b"1\r\n \r\n")  # whitespace: the JSON would stay valid, were it ever finished
            except (BrokenPipeError, ConnectionResetError):
                break
            try:
                if sock.recv(1, socket.MSG_PEEK):
                    break
            except BlockingIOError:
                pass
            time.sleep(0.2)
        status, headers, answered = answer(sock, MARGIN)
        took = time.monotonic() - started
        assert status == 408 and "server.body_timeout" in answered["error"], answered
        assert headers.get("connection", "").lower() == "close"
        assert closed_by_peer(sock, MARGIN)
    assert BODY_TIMEOUT - 0.5 <= took < BODY_TIMEOUT + MARGIN
    assert alerts_received(healer) == 0
    assert steps_log(tmp_path) == []
    assert metric(healer, "healer_http_requests_refused_total", reason="body_timeout") == 1


def test_memory_of_fifty_large_uploads_is_given_back(tmp_path: Path, servers: list[Server]) -> None:
    """50 authorised 900 kB uploads held open just short of their end: beyond server.max_large_bodies they are
    refused at once with 503 and Retry-After, the others are timed out with 408, nothing is accepted, and
    healer's RSS returns to within 10 MB of its level before them."""
    healer = limited_healer(tmp_path, servers)
    before = rss_mib(healer.pid)
    peak = before
    bodies = [big_payload(f"upload{index}", UPLOAD_BYTES) for index in range(UPLOADS)]
    results: list[tuple[int, dict[str, str], dict[str, Any]]] = []

    def upload(sock: socket.socket, body: bytes) -> None:
        # Refused (503) while still sending, the answer waits on the socket all the same.
        with suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(webhook_head(len(body)) + body[:-10])
        results.append(answer(sock, BODY_TIMEOUT + MARGIN))

    with connections(UPLOADS, healer) as socks:
        threads = [threading.Thread(target=upload, args=pair) for pair in zip(socks, bodies, strict=True)]
        for thread in threads:
            thread.start()
        while any(thread.is_alive() for thread in threads):
            peak = max(peak, rss_mib(healer.pid))
            time.sleep(0.05)
    statuses = sorted(status for status, _, _ in results)
    assert statuses == [408] * LARGE_SLOTS + [503] * (UPLOADS - LARGE_SLOTS), statuses
    for status, headers, body in results:
        if status == 503:
            assert headers.get("retry-after") and "server.max_large_bodies" in body["error"], body
    assert alerts_received(healer) == 0
    refused = {
        reason: metric(healer, "healer_http_requests_refused_total", reason=reason)
        for reason in ("busy", "body_timeout")
    }
    assert refused == {"busy": UPLOADS - LARGE_SLOTS, "body_timeout": LARGE_SLOTS}

    def returned() -> float | None:
        now = rss_mib(healer.pid)
        return now if now <= before + RSS_RETURN_MIB else None

    wait_for(returned, 15, what=f"RSS back within {RSS_RETURN_MIB} MiB of {before:.1f} MiB (peak {peak:.1f} MiB)")


def test_refusals_name_their_reason_and_refused_alerts_are_not_half_accepted(
    tmp_path: Path, servers: list[Server]
) -> None:
    """A body declared larger than server.max_request_bytes gets 413 and one without a credential 401, both
    before the body is sent; with max_large_bodies large bodies being read, one more gets 503 with
    Retry-After; each alert answered 2xx, the retried one included, runs its step exactly once, and none
    refused runs."""
    healer = limited_healer(tmp_path, servers)
    with socket.create_connection(address(healer)) as sock:
        sock.sendall(webhook_head(2 * 1024 * 1024))
        status, _, body = answer(sock, 5)
        assert status == 413 and "server.max_request_bytes" in body["error"], body
    with socket.create_connection(address(healer)) as sock:
        sock.sendall(webhook_head(UPLOAD_BYTES, token=False))
        assert answer(sock, 5)[0] == 401

    held_bodies = [big_payload(f"held{index}", LARGE_BYTES + 1000) for index in range(LARGE_SLOTS)]
    with connections(LARGE_SLOTS, healer) as held:
        for sock, body in zip(held, held_bodies, strict=True):
            sock.sendall(webhook_head(len(body)) + body[:1000])
        # The slots are taken once healer has read those heads; then one more large body is refused whole.
        late = big_payload("late", LARGE_BYTES + 1000)

        def refused() -> dict[str, Any] | None:
            code, answered = post(healer.url + "/api/v1/alertmanager", late, AUTH)
            return answered if code == 503 else None

        answered = wait_for(refused, 5, what="a large body refused while the slots are taken")
        assert "server.max_large_bodies" in answered["error"], answered
        for sock, body in zip(held, held_bodies, strict=True):
            sock.sendall(body[1000:])
        assert [answer(sock, 10)[0] for sock in held] == [200] * LARGE_SLOTS
    assert post(healer.url + "/api/v1/alertmanager", late, AUTH)[0] == 200

    accepted = {f"held{index}" for index in range(LARGE_SLOTS)} | {"late"}
    wait_for(lambda: len(steps_log(tmp_path)) == 2 * len(accepted), 30, what="every accepted alert's step")
    started = [line.removeprefix("start ") for line in steps_log(tmp_path) if line.startswith("start ")]
    assert sorted(started) == sorted(accepted)
