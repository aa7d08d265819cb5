"""`create_app(...)`: the Stripe emulator as a Starlette app. Nothing is created at import time."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

import stripe
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from . import authorizations, balance, card_network, checkout, events, issuing, payments, sandbox
from .state import (
    DEFAULT_CURRENCY,
    DEFAULT_ISSUING_FLOAT,
    DEFAULT_WEBHOOK_SECRET,
    IDEMPOTENCY_TTL_SECONDS,
    StripeState,
    WebhookEndpoint,
)
from .webhooks import Webhooks


def create_app(
    *,
    webhook_url: str | None = None,
    webhook_secret: str = DEFAULT_WEBHOOK_SECRET,
    issuing_auth_webhook_url: str | None = None,
    issuing_authorization_secret: str | None = None,
    api_key: str | None = None,
    issuing_float: int = DEFAULT_ISSUING_FLOAT,
    idempotency_ttl_seconds: float = IDEMPOTENCY_TTL_SECONDS,
) -> Starlette:
    """A fresh emulator. `api_key=None` accepts any `sk_test_...` key; `issuing_float` is in USD cents;
    `issuing_authorization_secret` signs the real-time authorisation requests (None: `webhook_secret`);
    `idempotency_ttl_seconds` is how long a saved idempotent result is replayed (Stripe: 24 h).

    State is reachable as `app.state.stripe` (a `StripeState`), the event dispatcher as
    `app.state.webhooks`.
    """
    state = StripeState(
        api_key=api_key,
        # Responses and events claim the API version the installed SDK pins, as a Stripe account would.
        api_version=stripe.api_version,
        webhook=WebhookEndpoint(url=webhook_url, secret=webhook_secret),
        issuing_auth_webhook_url=issuing_auth_webhook_url,
        issuing_auth_webhook_secret=issuing_authorization_secret,
        issuing_available={DEFAULT_CURRENCY: issuing_float},
        idempotency_ttl_seconds=idempotency_ttl_seconds,
    )
    dispatcher = Webhooks(state)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await dispatcher.aclose()

    app = Starlette(
        routes=[
            *checkout.routes(),
            *payments.routes(),
            *issuing.routes(),
            *authorizations.routes(),
            *balance.routes(),
            *events.routes(),
            *sandbox.routes(),
            *card_network.routes(),
        ],
        exception_handlers={404: _unrecognized_url, 405: _unrecognized_url},
        lifespan=lifespan,
    )
    app.state.stripe = state
    app.state.webhooks = dispatcher
    return app


async def _unrecognized_url(request: Request, exc: Exception) -> Response:
    status = exc.status_code if isinstance(exc, HTTPException) else 404
    message = (
        f"Unrecognized request URL ({request.method}: {request.url.path}). The Stripe emulator implements "
        "only the endpoints esim-fulfillment uses."
    )
    return JSONResponse(
        {"error": {"type": "invalid_request_error", "code": None, "message": message, "param": None}},
        status_code=404 if status in (404, 405) else status,
    )
