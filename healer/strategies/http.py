"""The `http` strategy: send one HTTP request and check its status code.

Placeholders may sit anywhere in the URL (values percent-encoded) and the body (values
JSON-string escaped); header values are literals or one whole placeholder. Redirects are not
followed: a 3xx is the status that is checked. A body without a Content-Type header is sent as
`application/json`. The response body is kept up to HTTP_OUTPUT_LIMIT bytes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass, field

import aiohttp

from healer.config.secrets import SecretError
from healer.config.strategy_params import HttpParams, StrategyParams
from healer.durations import format_duration
from healer.strategies.base import params_of
from healer.strategies.exec import masked
from healer.strategies.runner import AlertContext, OutputBuffer, StepResult, one_line
from healer.strategies.templating import render, render_body, render_url

HTTP_OUTPUT_LIMIT = 64 * 1024
REDACTED = "<redacted>"
_SECRET_HEADER_WORDS = ("authorization", "cookie", "token", "secret", "key", "password")
_READ_CHUNK = 65536


@dataclass(frozen=True)
class HttpRequest:
    """A fully rendered request."""

    method: str
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)
    body: str | None = None
    timeout: float = 30.0
    expected_status: tuple[int, ...] = tuple(range(200, 300))

    def describe(self) -> dict[str, object]:
        """The plan for dry-run and audit; values of credential-like headers are redacted."""
        return {
            "method": self.method,
            "url": self.url,
            "headers": {
                name: REDACTED if any(word in name.lower() for word in _SECRET_HEADER_WORDS) else value
                for name, value in self.headers.items()
            },
            "body": self.body,
            "timeout": self.timeout,
            "expected_status": _status_ranges(self.expected_status),
        }


def _status_ranges(codes: tuple[int, ...]) -> list[str]:
    """Compact `200..299` style description of the expected status codes."""
    ranges: list[str] = []
    ordered = sorted(set(codes))
    start = previous = None
    for code in [*ordered, None]:
        if code is not None and previous is not None and code == previous + 1:
            previous = code
            continue
        if start is not None and previous is not None:
            ranges.append(str(start) if start == previous else f"{start}..{previous}")
        start = previous = code
    return ranges


class HttpRunner:
    """Runner of the `http` strategy type."""

    def request(
        self, params: StrategyParams, alert: AlertContext, secrets: Mapping[str, str] | None = None
    ) -> HttpRequest:
        """Render URL, headers and body from the alert (and `secrets`, to run only); raises UnsafeLabelError."""
        http_params = params_of(params, HttpParams, "http")
        headers = {name: render(value, params, alert, secrets) for name, value in http_params.headers.items()}
        body = None if http_params.body is None else render_body(http_params.body, params, alert, secrets)
        if body is not None and not any(name.lower() == "content-type" for name in headers):
            headers["Content-Type"] = "application/json"
        return HttpRequest(
            method=http_params.method,
            url=render_url(http_params.url, params, alert, secrets),
            headers=headers,
            body=body,
            timeout=http_params.timeout,
            expected_status=tuple(http_params.expected_status),
        )

    def plan(self, params: StrategyParams, alert: AlertContext) -> dict[str, object]:
        """method, url, headers (secrets redacted), body, timeout and expected_status."""
        return self.request(params, alert).describe()

    async def run(self, params: StrategyParams, alert: AlertContext) -> StepResult:
        """Send the request; ok when the status is expected. Network faults give ok=False.

        Secret values are filled in here only, and masked in the detail and response body returned."""
        try:
            values = params.secret_values()
        except SecretError as exc:
            return StepResult(ok=False, detail=one_line(str(exc)))
        return masked(await self._send(self.request(params, alert, values)), params, values)

    async def _send(self, request: HttpRequest) -> StepResult:
        output = OutputBuffer(HTTP_OUTPUT_LIMIT)
        try:
            async with (
                asyncio.timeout(request.timeout),
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None)) as session,
                session.request(
                    request.method,
                    request.url,
                    headers=dict(request.headers),
                    data=None if request.body is None else request.body.encode(),
                    allow_redirects=False,
                ) as response,
            ):
                async for chunk in response.content.iter_chunked(_READ_CHUNK):
                    output.feed(chunk)
                status = response.status
        except TimeoutError:
            return StepResult(
                ok=False,
                detail=f"timed out after {format_duration(request.timeout)}",
                output=output.text(),
                timed_out=True,
            )
        except aiohttp.ClientConnectionError as exc:
            return StepResult(ok=False, detail=one_line(f"connection failed: {exc}"), output=output.text())
        except (aiohttp.ClientError, ValueError) as exc:
            return StepResult(ok=False, detail=one_line(f"request failed: {exc}"), output=output.text())
        return StepResult(ok=status in request.expected_status, detail=f"HTTP {status}", output=output.text())
