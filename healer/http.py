"""What every route module of healer's HTTP API shares: error bodies and request parsing (access control is
healer.auth's middleware)."""

from __future__ import annotations

import json
from typing import Any, TypeVar

from aiohttp import web
from pydantic import ValidationError

# The most a list endpoint returns at once.
MAX_LIMIT = 1000

N = TypeVar("N", int, float)


def problem(status: int, message: str, **extra: Any) -> web.Response:
    """A JSON error body that says what is wrong."""
    return web.json_response({"error": message, **extra}, status=status)


def bad_request(message: str) -> web.HTTPBadRequest:
    """A 400 to raise from a parser, with the same JSON body as `problem`."""
    return web.HTTPBadRequest(text=json.dumps({"error": message}), content_type="application/json")


def require_json(request: web.Request) -> web.Response | None:
    """415 unless the body is declared JSON."""
    if request.content_type != "application/json":
        return problem(415, f"Content-Type must be application/json, not {request.content_type!r}")
    return None


def invalid_body(exc: ValidationError, what: str) -> web.Response:
    """400 for a body that is not JSON; 422 naming each field at fault for JSON that the model refuses."""
    details = exc.errors(include_url=False, include_input=False)
    if details and details[0]["type"] == "json_invalid":
        return problem(400, f"body is not valid JSON: {details[0]['msg']}")
    errors = [
        {
            "field": ".".join(str(part) for part in error["loc"]) or "(body)",
            "message": str(error["msg"]).removeprefix("Value error, "),
        }
        for error in details
    ]
    return problem(422, f"{what}: {errors[0]['field']}: {errors[0]['message']}", errors=errors[:20])


def query_number(request: web.Request, name: str, kind: type[N]) -> N | None:
    """A numeric query parameter, None when absent; raises a 400 naming it when it is not a number."""
    raw = request.query.get(name)
    if raw is None:
        return None
    try:
        return kind(raw)
    except ValueError:
        raise bad_request(f"query parameter {name!r} must be a number, not {raw!r}") from None


def query_limit(request: web.Request, default: int = 100) -> int:
    """`?limit=`, clamped to 1..MAX_LIMIT; raises a 400 when it is not an integer."""
    raw = request.query.get("limit")
    if raw is None:
        return default
    try:
        return max(1, min(int(raw), MAX_LIMIT))
    except ValueError:
        raise bad_request("limit must be an integer") from None


def path_id(request: web.Request, what: str) -> int:
    """The integer `{id}` of the path; raises a 400 saying which id is not one."""
    try:
        return int(request.match_info["id"])
    except ValueError:
        raise bad_request(f"{what} id must be an integer") from None
