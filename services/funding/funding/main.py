"""Wiring only: `create_app(settings)` builds the funding service; nothing connects until it starts."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import timedelta

import asyncpg
from fastapi import FastAPI

from esim_common.providers import stripe_gateway, topup_gateway, zendit_client
from esim_common.providers.stripe import StripeGateway
from esim_common.providers.topup_gateway import TopupGatewayClient
from esim_common.providers.zendit import ZenditClient
from esim_common.service import ServiceContext, run_while_serving, service_app
from esim_common.settings import FundingMode, Settings
from funding import handlers
from funding.capture import CapturePayment
from funding.cardholder import PlatformCardholder
from funding.fund_order import FundOrder
from funding.metrics import funding_mode
from funding.relay import AnnouncementRelay
from funding.topups import TopupPhases

log = logging.getLogger("esim.funding")

DEFAULT_PORT = 8081


@dataclass
class Providers:
    stripe: StripeGateway
    zendit: ZenditClient
    gateway: TopupGatewayClient

    @classmethod
    def from_settings(cls, settings: Settings) -> Providers:
        return cls(
            stripe=stripe_gateway(settings), zendit=zendit_client(settings), gateway=topup_gateway(settings)
        )

    async def aclose(self) -> None:
        await self.stripe.aclose()
        await self.zendit.aclose()
        await self.gateway.aclose()


def create_app(settings: Settings) -> FastAPI:
    ctx = ServiceContext.build("funding", settings)
    providers = Providers.from_settings(settings)
    mode = settings.effective_funding_mode
    if mode == FundingMode.PREFUNDED and settings.funding_mode == FundingMode.ISSUING_CARD:
        log.warning(
            "STRIPE_ISSUING_AVAILABLE=false: funding runs in prefunded mode; short orders wait in "
            "awaiting_funds until the Zendit wallet is funded from the Zendit console"
        )
    log.info("funding mode", extra={"funding_mode": mode.value})
    _export_mode(mode)

    def pool() -> asyncpg.Pool:  # a getter: the pool exists only once the service has started
        return ctx.pool

    topups = TopupPhases(
        pool=pool,
        stripe=providers.stripe,
        gateway=providers.gateway,
        cardholder=PlatformCardholder(stripe=providers.stripe, settings=settings),
        allowed_categories=settings.stripe_issuing_allowed_categories,
        allowed_merchant_countries=settings.stripe_issuing_allowed_merchant_countries,
    )
    fund_order = FundOrder(
        pool=pool,
        publisher=ctx.publisher,
        zendit=providers.zendit,
        topups=topups,
        mode=mode,
        min_topup=settings.zendit_min_topup,
        max_topup=settings.zendit_max_topup,
        awaiting_funds_recheck_seconds=settings.awaiting_funds_recheck_seconds,
        awaiting_funds_max_age=timedelta(seconds=settings.awaiting_funds_max_age),
    )
    capture = CapturePayment(pool=pool, stripe=providers.stripe, publisher=ctx.publisher)
    handlers.register(ctx, fund_order=fund_order, stripe=providers.stripe, capture=capture)

    app = service_app(ctx, title="funding")
    app.state.fund_order = fund_order  # the use case, for operator tooling and tests
    relay = AnnouncementRelay(pool=pool, publisher=ctx.publisher)
    app.state.announcement_relay = relay
    run_while_serving(app, relay.run_forever)
    _close_on_shutdown(app, providers)
    return app


def _export_mode(mode: FundingMode) -> None:
    """esim_funding_mode{mode}: 1 for the mode in force, 0 for the other (both series exist), so that
    alert rules can tell a prefunded deployment from an issuing_card one."""
    for each in FundingMode:
        funding_mode.labels(mode=each.value).set(1 if each is mode else 0)


def _close_on_shutdown(app: FastAPI, providers: Providers) -> None:
    """Close the provider clients after the service's own lifespan (broker, pool) has stopped."""
    service_lifespan = app.router.lifespan_context

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        try:
            async with service_lifespan(app):
                yield
        finally:
            await providers.aclose()

    app.router.lifespan_context = lifespan
