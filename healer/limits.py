"""Request limits of healer's HTTP server: a deadline for each request's head and for its body, a cap on
large bodies read at once, and the memory of large bodies handed back to the system once they are done.

aiohttp bounds the size of a request line and of each header, but not the time a client takes to send them
nor its body: a client that sends one byte a second holds its connection (and the body's buffer) for as
long as it likes. The deadlines live in the connection's protocol (`LimitedRequestHandler`), the cap and
the early refusals in a middleware (`request_limits`) that runs after access control, so a client without
a credential is refused before its body is read.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler
from prometheus_client import CollectorRegistry, Counter

from healer.config.model import ServerConfig
from healer.http import problem
from healer.logs import fields

log = logging.getLogger(__name__)

# How long a client told that every large-body slot is taken should wait before it retries.
BUSY_RETRY_AFTER_SECONDS = 5
# malloc_trim walks the whole heap on the event loop (milliseconds on a large one): at most this often, so
# that large notifications arriving one after another do not each pay for it.
TRIM_INTERVAL_SECONDS = 1.0
# The reasons of healer_http_requests_refused_total: a head or a body that came too slowly, a body larger than
# max_request_bytes, a large body while max_large_bodies are being read.
REFUSAL_REASONS = ("header_timeout", "body_timeout", "too_large", "busy")

# What a client whose head did not arrive in time is told before its connection closes. Written straight to
# the socket: no request exists yet that aiohttp could answer.
_HEAD_TIMEOUT_ANSWER = b'{"error": "the request head did not arrive within server.header_timeout"}\n'
HEAD_TIMEOUT_RESPONSE = (
    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Type: application/json\r\n"
    b"Content-Length: %d\r\n\r\n" % len(_HEAD_TIMEOUT_ANSWER) + _HEAD_TIMEOUT_ANSWER
)


class BodyTimeoutError(Exception):
    """A request body did not arrive completely within server.body_timeout of its head."""


class BodyTooLargeError(Exception):
    """A request body is larger than server.max_request_bytes."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"body larger than the limit of {limit} bytes (server.max_request_bytes)")
        self.limit = limit


class MemoryTrimmer:
    """Hands the free memory of the C allocator back to the system (glibc's malloc_trim), when it can.

    Large bodies are allocated and freed through glibc's malloc. Once it has freed one mmapped block, glibc
    raises its mmap threshold and serves the next large blocks from its heap, whose free pages it keeps:
    50 uploads of 900 kB left healer 90 MB larger for good. malloc_trim(0) returns those pages."""

    def __init__(self) -> None:
        self._trim: Callable[[int], int] | None = None
        name = ctypes.util.find_library("c")
        try:
            self._trim = ctypes.CDLL(name).malloc_trim if name else None
        except (OSError, AttributeError):  # not glibc (musl has no malloc_trim): nothing to hand back
            self._trim = None

    @property
    def available(self) -> bool:
        return self._trim is not None

    def trim(self) -> bool:
        """Release free heap pages to the system; False when this C library cannot."""
        if self._trim is None:
            return False
        self._trim(0)
        return True


@dataclass
class RequestLimits:
    """The limits of one server, the large bodies it is reading now, and the count of what it refused."""

    header_timeout: float
    body_timeout: float
    max_request_bytes: int
    large_body_bytes: int
    max_large_bodies: int
    refused: Counter
    trimmer: MemoryTrimmer = field(default_factory=MemoryTrimmer)
    large_in_flight: int = 0
    _trimmed_at: float = float("-inf")
    _trim_later: asyncio.TimerHandle | None = None

    @classmethod
    def from_config(cls, server: ServerConfig, registry: CollectorRegistry) -> RequestLimits:
        refused = Counter(
            "healer_http_requests_refused",
            "HTTP requests refused by the request limits (server.header_timeout, body_timeout, max_request_bytes,"
            " max_large_bodies), by reason.",
            ["reason"],
            registry=registry,
        )
        for reason in REFUSAL_REASONS:
            refused.labels(reason)
        return cls(
            header_timeout=server.header_timeout,
            body_timeout=server.body_timeout,
            max_request_bytes=server.max_request_bytes,
            large_body_bytes=server.large_body_bytes,
            max_large_bodies=server.max_large_bodies,
            refused=refused,
        )

    def refuse(self, reason: str) -> None:
        self.refused.labels(reason).inc()

    def is_large(self, request: web.BaseRequest) -> bool:
        """A body above large_body_bytes, or of unknown length (chunked), which may grow as large."""
        if not request.body_exists:
            return False
        length = request.content_length
        return length is None or length > self.large_body_bytes

    def enter_large(self) -> bool:
        """Take a slot for a large body; False when all max_large_bodies are taken."""
        if self.large_in_flight >= self.max_large_bodies:
            return False
        self.large_in_flight += 1
        return True

    def leave_large(self) -> None:
        """Give a slot back; the last large body out hands its memory back to the system, at once or, when it
        was handed back less than TRIM_INTERVAL_SECONDS ago, once that interval is over."""
        self.large_in_flight -= 1
        if self.large_in_flight > 0 or self._trim_later is not None:
            return
        loop = asyncio.get_running_loop()
        wait = self._trimmed_at + TRIM_INTERVAL_SECONDS - loop.time()
        if wait <= 0:
            self._trim()
        else:
            self._trim_later = loop.call_later(wait, self._trim)

    def _trim(self) -> None:
        self._trim_later = None
        if self.large_in_flight == 0:  # else the last of those bodies trims when it leaves
            self._trimmed_at = asyncio.get_running_loop().time()
            self.trimmer.trim()


LIMITS = web.AppKey("limits", RequestLimits)


async def read_body(request: web.Request) -> bytes:
    """The whole body, refused with BodyTooLargeError past server.max_request_bytes; not cached on the request,
    so a kept-alive connection does not hold its last large body until the next request."""
    limits = request.app[LIMITS]
    limit = limits.max_request_bytes
    chunks: list[bytes] = []
    size = 0
    try:
        while chunk := await request.content.readany():
            size += len(chunk)
            if size > limit:
                limits.refuse("too_large")
                raise BodyTooLargeError(limit)
            chunks.append(chunk)
    except BaseException:
        # The exception's traceback keeps this frame alive as long as the request (its body stream holds a
        # timeout's exception): the part read so far is freed now, before the large-body slot is given back.
        chunks.clear()
        raise
    return b"".join(chunks)


def _closing(response: web.Response) -> web.Response:
    # The unread rest of the body must not be taken for the next request: the connection ends here.
    response.force_close()
    return response


@web.middleware
async def request_limits(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Refuse a body that declares itself too large, or a large one while max_large_bodies are being read,
    before it is read; answer 408 when a body does not arrive within body_timeout."""
    limits = request.app[LIMITS]
    length = request.content_length
    if length is not None and length > limits.max_request_bytes:
        limits.refuse("too_large")
        return _closing(problem(413, str(BodyTooLargeError(limits.max_request_bytes)), length=length))
    large = limits.is_large(request)
    if large and not limits.enter_large():
        limits.refuse("busy")
        answer = problem(
            503,
            f"{limits.max_large_bodies} request bodies larger than {limits.large_body_bytes} bytes are being read"
            " (server.max_large_bodies); retry",
            reason="busy",
        )
        # Alertmanager retries a 5xx; Retry-After tells other clients when.
        answer.headers["Retry-After"] = str(BUSY_RETRY_AFTER_SECONDS)
        return _closing(answer)
    try:
        return await handler(request)
    except BodyTimeoutError as exc:
        limits.refuse("body_timeout")
        return _closing(problem(408, str(exc)))
    finally:
        if large:
            limits.leave_large()


class LimitedRequestHandler(RequestHandler):
    """aiohttp's connection protocol with a deadline on each request head and on each body.

    A head's clock starts when the connection opens (first request) or at the first byte of the next
    request (keep-alive: an idle connection is aiohttp's keepalive_timeout's business); when it runs out
    the client gets a 408 and the connection closes. A body's clock starts when its head is complete; when
    it runs out, a handler reading the body gets BodyTimeoutError (answered 408 by `request_limits`), and a
    body nobody is reading ends the connection."""

    def __init__(self, manager: web.Server, limits: RequestLimits, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self._limits = limits
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_started = False
        self._body: StreamReader | None = None
        self._body_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self._arm_head_timer()

    def data_received(self, data: bytes) -> None:
        if data and (self._body is None or self._body.is_eof()):
            # Bytes of a head; the first of a kept-alive connection's next request starts its clock.
            if self._head_timer is None:
                self._arm_head_timer()
            self._head_started = True
        heads = self._request_count
        super().data_received(data)
        if self._request_count > heads and self._messages:
            # A complete head: its clock stops, its body's starts.
            self._cancel_head_timer()
            self._head_started = False
            body = self._messages[-1][1]
            if not body.is_eof():
                self._arm_body_timer(body)

    def connection_lost(self, exc: BaseException | None) -> None:
        self._cancel_head_timer()
        self._cancel_body_timer()
        super().connection_lost(exc)

    def _arm_head_timer(self) -> None:
        self._head_timer = self._loop.call_later(self._limits.header_timeout, self._head_timed_out)

    def _cancel_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self._request_in_progress:
            # A pipelined head behind a request still being answered: its answer must not be cut by a 408
            # written into it; the head gets another period, after which the connection is judged again.
            self._arm_head_timer()
            return
        log.debug("request head timed out", extra=fields(peer=str(self.peername)))
        if self._head_started:
            # A connection that never sent a byte is closed without an answer (nor a count), as an idle one.
            transport.write(HEAD_TIMEOUT_RESPONSE)
            self._limits.refuse("header_timeout")
        self.force_close()

    def _arm_body_timer(self, body: StreamReader) -> None:
        self._cancel_body_timer()
        self._body = body
        self._body_timer = self._loop.call_later(self._limits.body_timeout, self._body_timed_out, body)
        body.on_eof(self._cancel_body_timer)

    def _cancel_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _body_timed_out(self, body: StreamReader) -> None:
        self._body_timer = None
        if body.is_eof() or self.transport is None:
            return
        log.debug("request body timed out", extra=fields(peer=str(self.peername)))
        # The rest of a late body is not waited for after the answer either (aiohttp's lingering close).
        self._lingering_time = 0.0
        if self._request_in_progress:
            body.set_exception(
                BodyTimeoutError(
                    f"the request body did not arrive within {self._limits.body_timeout:g}s of its head"
                    " (server.body_timeout)"
                )
            )
        else:
            # No handler reads it: its answer (a refusal, often) is sent and counted; the connection just ends.
            self.force_close()


class LimitedServer(web.Server):
    """aiohttp's low-level server whose connections are `LimitedRequestHandler`s."""

    def __init__(self, inner: web.Server, limits: RequestLimits, **kwargs: Any) -> None:
        super().__init__(
            inner.request_handler,
            request_factory=inner.request_factory,
            handler_cancellation=inner.handler_cancellation,
            **kwargs,
        )
        self._limits = limits
        self._handler_kwargs = kwargs

    def __call__(self) -> RequestHandler:
        return LimitedRequestHandler(self, self._limits, loop=self._loop, **self._handler_kwargs)


class LimitedAppRunner(web.AppRunner):
    """web.AppRunner serving its app through `LimitedServer`, with the limits in the app's LIMITS."""

    async def _make_server(self) -> web.Server:
        inner = await super()._make_server()
        return LimitedServer(inner, self.app[LIMITS], **self._kwargs)
