"""Plumbing for the `/_sandbox/` control routes: JSON in, JSON out, Stripe-shaped errors, no auth.

These routes are not part of Stripe's API; they let tests and the other emulators play the customer,
the card network and the dashboard.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from .errors import StripeApiError

logger = logging.getLogger("esim_sandbox.stripe_emulator")

ControlHandler = Callable[[Request], Awaitable[Response | dict[str, Any]]]


def control_route(path: str, handler: ControlHandler, *, method: str) -> Route:
    async def endpoint(request: Request) -> Response:
        try:
            result = await handler(request)
        except StripeApiError as exc:
            return JSONResponse(exc.body(), exc.status)
        except Exception:
            logger.exception("unexpected_error path=%s", request.url.path)
            return JSONResponse(
                StripeApiError(500, "Unexpected emulator error.", type="api_error").body(), 500
            )
        return result if isinstance(result, Response) else JSONResponse(result)

    return Route(path, endpoint, methods=[method])


async def read_json(request: Request, *, required: bool = True) -> dict[str, Any]:
    raw = await request.body()
    if not raw.strip():
        if required:
            raise StripeApiError(400, "A JSON object body is required.")
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        raise StripeApiError(400, "The body is not valid JSON.") from None
    if not isinstance(body, dict):
        raise StripeApiError(400, "The body must be a JSON object.")
    return body


def field(body: dict[str, Any], name: str, kind: type, *, required: bool = True) -> Any:
    """A typed JSON field; a wrong or missing one is a 400 naming it (`bool` is not accepted as `int`)."""
    value = body.get(name)
    if value is None:
        if required:
            raise StripeApiError(
                400, f"Missing required field: {name}.", code="parameter_missing", param=name
            )
        return None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise StripeApiError(400, f"Invalid {name}: expected {kind.__name__}.", param=name)
    return value
