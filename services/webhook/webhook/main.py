"""Wiring only: `create_app(settings)` builds the context and the provider clients and returns the app.

Routes (one router each, in `create_app`):
- POST /api/create-checkout-session (optional Idempotency-Key header)        `checkout`
- GET  /api/offers[?country=XX]: the cached Zendit catalogue, refreshed in   `offers`
  the background by that router's lifespan
- POST /api/webhooks/stripe: Stripe events (inbox, order `paid` once)        `stripe_webhooks`
- POST /api/webhooks/stripe/issuing-authorization: Stripe Issuing's          `issuing_authorizations`
  real-time authorisation (its own signing secret)
- HEAD + POST /api/webhooks/zendit: Zendit's purchase webhooks, as a hint    `zendit_webhooks`
- GET  /api/orders/{transactionId}?session_id=: order status for the shop    `order_status`
- GET  /checkout/success, /checkout/cancel: minimal pages for when           `shop_pages`
  SHOP_BASE_URL is this service
- GET  /readyz here; /healthz and /metrics from the service shell

This service consumes no queue. It publishes `order.paid` (through the outbox, from the Stripe webhook)
and `zendit.purchase-updated` (a `PurchaseUpdateHint`, from the Zendit webhook).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse

from esim_common.service import ServiceContext, service_app
from esim_common.settings import Settings
from webhook import (
    checkout,
    issuing_authorizations,
    offers,
    order_status,
    shop_pages,
    stripe_webhooks,
    zendit_webhooks,
)
from webhook.ports import Ports

SERVICE_NAME = "webhook"
DEFAULT_PORT = 8080


def _operations(ctx: ServiceContext, ports: Ports) -> APIRouter:
    """/readyz, and a lifespan that closes the provider clients' HTTP pools when the app stops (FastAPI
    nests an included router's lifespan inside the shell's, which starts and stops the context)."""

    @asynccontextmanager
    async def close_ports(app: FastAPI) -> AsyncIterator[None]:
        try:
            yield
        finally:
            await ports.aclose()

    router = APIRouter(tags=["operations"], lifespan=close_ports)

    @router.get("/readyz", responses={503: {"description": "The database or the broker does not answer."}})
    async def readyz() -> JSONResponse:
        """Ready for traffic: the database answers and the broker connection is up (publishes work)."""
        checks = await ctx.health()
        ready = all(checks.values())
        body = {"status": "ready" if ready else "not_ready", **checks}
        return JSONResponse(body, status_code=200 if ready else 503)

    return router


def create_app(settings: Settings) -> FastAPI:
    ctx = ServiceContext.build(SERVICE_NAME, settings)
    ports = Ports.build(ctx)
    app: FastAPI = service_app(
        ctx,
        title="esim webhook",
        routers=[
            checkout.router,
            offers.router,
            stripe_webhooks.router,
            issuing_authorizations.router,
            zendit_webhooks.router,
            order_status.router,
            shop_pages.router,
            _operations(ctx, ports),
        ],
    )
    app.state.ports = ports
    return app
