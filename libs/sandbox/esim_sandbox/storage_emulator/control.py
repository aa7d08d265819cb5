"""Sandbox controls under `/_sandbox/`, apart from the API and without auth (loopback only).

    GET    /_sandbox/health     liveness
    GET    /_sandbox/state      buckets, objects (size, type, cache control, sha256, writes), faults,
                                the log of API calls ({"operation", "key", "status"}), the clock offset
    POST   /_sandbox/reset      back to the buckets the emulator started with, empty; no faults
    POST   /_sandbox/faults     {"operation"="upload", "count"=1, "status"=503|null, "sleepSeconds"=0}:
                                the next `count` calls of `operation` wait `sleepSeconds`, then fail with
                                `status` (5xx/429 as the API gateway answers an outage; 500 and 4xx as
                                Storage itself) or, with `status: null`, answer normally (a slow server)
    DELETE /_sandbox/faults     clear injected faults
    POST   /_sandbox/clock      {"advanceSeconds": n}: move the emulator's clock (signed URLs expire)

Operations: bucket, upload, download, sign, signed_download, public_download, or "*" for any.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .state import OPERATIONS, Fault, StorageState


class _Invalid(Exception):
    pass


def _state(request: Request) -> StorageState:
    state: StorageState = request.app.state.storage
    return state


async def _body(request: Request) -> dict[str, Any]:
    try:
        body = await request.json() if await request.body() else {}
    except ValueError:
        raise _Invalid("body is not valid JSON") from None
    if not isinstance(body, dict):
        raise _Invalid("body must be a JSON object")
    return body


def _number(body: dict[str, Any], name: str, default: float) -> float:
    value = body.get(name, default)
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise _Invalid(f"{name} must be a number >= 0")
    return float(value)


def _control(handler: Callable[[Request], Awaitable[Response]]) -> Callable[[Request], Awaitable[Response]]:
    async def wrapper(request: Request) -> Response:
        try:
            return await handler(request)
        except _Invalid as exc:
            return JSONResponse({"error": str(exc)}, status_code=400)

    return wrapper


@_control
async def health(request: Request) -> Response:
    return JSONResponse({"ok": True})


@_control
async def show_state(request: Request) -> Response:
    return JSONResponse(_state(request).snapshot())


@_control
async def reset(request: Request) -> Response:
    _state(request).reset()
    return JSONResponse(_state(request).snapshot())


@_control
async def add_fault(request: Request) -> Response:
    body = await _body(request)
    operation = body.get("operation", "upload")
    if operation not in OPERATIONS:
        raise _Invalid(f"operation must be one of {sorted(OPERATIONS)}")
    count = body.get("count", 1)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise _Invalid("count must be an integer >= 1")
    status = body.get("status", 503)
    if status is not None and (not isinstance(status, int) or not 400 <= status <= 599):
        raise _Invalid("status must be an HTTP error status (400-599) or null")
    fault = Fault(str(operation), count, status, _number(body, "sleepSeconds", 0.0))
    _state(request).add_fault(fault)
    return JSONResponse(vars(fault))


@_control
async def clear_faults(request: Request) -> Response:
    _state(request).faults.clear()
    return JSONResponse({"faults": []})


@_control
async def advance_clock(request: Request) -> Response:
    body = await _body(request)
    _state(request).advance_clock(_number(body, "advanceSeconds", 0.0))
    return JSONResponse({"clockOffsetSeconds": _state(request).clock_offset})


ROUTES = [
    Route("/health", health, methods=["GET"]),
    Route("/state", show_state, methods=["GET"]),
    Route("/reset", reset, methods=["POST"]),
    Route("/faults", add_fault, methods=["POST"]),
    Route("/faults", clear_faults, methods=["DELETE"]),
    Route("/clock", advance_clock, methods=["POST"]),
]
