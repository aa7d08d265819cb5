"""What every emulated endpoint shares: Zendit-shaped errors, bearer auth, paging, injected faults."""

from __future__ import annotations

import asyncio
import functools
import hmac
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .state import ZenditState

Handler = Callable[[Request], Awaitable[Response]]
MAX_PAGE_SIZE = 1024
_DEFAULT_MESSAGES = {
    400: ("INVALID_REQUEST", "Invalid request"),
    401: ("NOT_AUTHORIZED", "API token missing or unrecognized"),
    403: ("FORBIDDEN", "IP not allowed"),
    404: ("NOT_FOUND", "Item not found"),
    429: ("TOO_MANY_REQUESTS", "Too many requests"),
    500: ("INTERNAL_ERROR", "Internal server error"),
    503: ("SYSTEM_UNAVAILABLE", "System unavailable"),
}


class BadRequest(Exception):
    """Raised by handlers for a 400 INVALID_REQUEST; `fields` names what is wrong."""

    def __init__(self, message: str, fields: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.fields = fields or {}


def error_response(
    status: int, code: str | None = None, message: str | None = None, fields: dict[str, str] | None = None
) -> JSONResponse:
    default_code, default_message = _DEFAULT_MESSAGES.get(status, ("ERROR", "Error"))
    return JSONResponse(
        {"errorCode": code or default_code, "message": message or default_message, "fields": fields or {}},
        status_code=status,
    )


def state_of(request: Request) -> ZenditState:
    state: ZenditState = request.app.state.zendit
    return state


def _bearer_ok(request: Request, expected: str) -> bool:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), expected.encode())


async def read_json_object(request: Request) -> dict[str, Any]:
    try:
        body = await request.json()
    except ValueError:
        raise BadRequest("Body is not valid JSON") from None
    if not isinstance(body, dict):
        raise BadRequest("Body must be a JSON object")
    return body


def page_params(request: Request) -> tuple[int, int]:
    """Zendit's required `_limit` (1..1024) and `_offset` (>= 0)."""
    fields: dict[str, str] = {}
    values: dict[str, int] = {}
    for name, low, high in (("_limit", 1, MAX_PAGE_SIZE), ("_offset", 0, None)):
        raw = request.query_params.get(name)
        try:
            value = int(raw) if raw is not None else None
        except ValueError:
            value = None
        if value is None or value < low or (high is not None and value > high):
            fields[name] = f"required, integer >= {low}" + (f" and <= {high}" if high else "")
        else:
            values[name] = value
    if fields:
        raise BadRequest("Invalid paging parameters", fields)
    return values["_limit"], values["_offset"]


def page_body(items: list[dict[str, Any]], limit: int, offset: int) -> dict[str, Any]:
    return {"limit": limit, "offset": offset, "total": len(items), "list": items[offset : offset + limit]}


def endpoint(name: str, *, key: str = "api_key") -> Callable[[Handler], Handler]:
    """Bearer auth with `state.<key>`, injected faults for `name`, then the purchase clock advances."""

    def decorate(handler: Handler) -> Handler:
        @functools.wraps(handler)
        async def wrapper(request: Request) -> Response:
            state = state_of(request)
            if not _bearer_ok(request, getattr(state, key)):
                return error_response(401)
            fault = state.take_fault(name)
            if fault is not None and fault.when == "before":
                await asyncio.sleep(fault.sleep_seconds)
                if fault.status is not None:
                    return error_response(fault.status)
            state.advance()
            try:
                response = await handler(request)
            except BadRequest as exc:
                response = error_response(400, message=exc.message, fields=exc.fields)
            if fault is not None and fault.when == "after":
                await asyncio.sleep(fault.sleep_seconds)
                if fault.status is not None:
                    return error_response(fault.status)
            return response

        return wrapper

    return decorate
