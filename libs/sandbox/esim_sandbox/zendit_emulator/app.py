"""Assembles the Zendit emulator: the API under /v1, our top-up gateway, and the sandbox controls."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Mount

from . import api, control, topup, webhooks
from .http import error_response
from .state import Clock, ZenditState, utc_now

DEFAULT_API_KEY = "sand_test_key"
DEFAULT_TOPUP_API_KEY = "topup_test_key"
# $500.00: enough for a demo run, small enough that a burst of orders needs a top-up.
DEFAULT_WALLET_BALANCE = 50_000
# Real purchases finish within ~15 s (99%); 2 s keeps the demo lively but still shows every status.
DEFAULT_PURCHASE_DELAY_SECONDS = 2.0


async def _http_error(request: Request, exc: Exception) -> Response:
    # Unknown paths and wrong methods answer in Zendit's error shape, not Starlette's plain text.
    status = exc.status_code if isinstance(exc, HTTPException) else 500
    return error_response(status)


def create_app(
    *,
    api_key: str = DEFAULT_API_KEY,
    wallet_balance: int = DEFAULT_WALLET_BALANCE,
    wallet_currency: str = "USD",
    stripe_url: str | None = None,
    topup_api_key: str = DEFAULT_TOPUP_API_KEY,
    purchase_delay_seconds: float = DEFAULT_PURCHASE_DELAY_SECONDS,
    now: Clock = utc_now,
) -> Starlette:
    """A fresh emulator; its state is `app.state.zendit` (a ZenditState), its webhook sender
    `app.state.zendit_webhooks` (off until configured through `/_sandbox/webhook`).

    `wallet_balance` is in the wallet's minor units; `now` is the clock purchases progress on;
    `stripe_url` is the Stripe emulator whose card network the top-up gateway charges.
    """
    state = ZenditState(
        api_key=api_key,
        topup_api_key=topup_api_key,
        wallet_balance=wallet_balance,
        wallet_currency=wallet_currency,
        purchase_delay_seconds=purchase_delay_seconds,
        now=now,
    )
    sender = webhooks.WebhookSender(state)

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        yield
        await sender.aclose()

    app = Starlette(
        routes=[
            Mount("/v1", routes=[*api.ROUTES, *topup.ROUTES]),
            Mount("/_sandbox", routes=[*control.ROUTES, *webhooks.ROUTES]),
        ],
        exception_handlers={HTTPException: _http_error},
        lifespan=lifespan,
    )
    app.state.zendit = state
    app.state.zendit_webhooks = sender
    app.state.stripe_url = stripe_url
    app.state.topup_locks = {}
    return app
