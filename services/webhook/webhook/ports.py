"""What the routes talk to, built once per app from settings and handed to them as one dependency."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request

from esim_common.providers import stripe_gateway, zendit_client
from esim_common.providers.stripe import StripeGateway
from esim_common.providers.zendit import ZenditClient
from esim_common.service import ServiceContext
from webhook.catalogue import Catalogue
from webhook.domain import PricingPolicy
from webhook.load_shedding import InFlightLimit


@dataclass
class WalletCurrency:
    """The Zendit wallet's currency, read once: an account's wallet currency does not change, and a
    balance call per checkout would double the Zendit round trips of the shop's busiest request."""

    zendit: ZenditClient
    _currency: str | None = None
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    async def get(self) -> str:
        if self._currency is None:
            async with self._lock:
                if self._currency is None:
                    self._currency = (await self.zendit.get_balance()).currency.upper()
        return self._currency


@dataclass
class Ports:
    ctx: ServiceContext
    stripe: StripeGateway
    zendit: ZenditClient
    wallet: WalletCurrency
    pricing: PricingPolicy
    catalogue: Catalogue  # what GET /api/offers serves; started and stopped by the offers router's lifespan
    webhook_secrets: tuple[str, ...]
    issuing_webhook_secrets: tuple[str, ...]  # the real-time authorisation endpoint's own secret(s)
    deliveries: InFlightLimit  # Stripe deliveries being processed; past the limit → 503 (Stripe retries)

    @classmethod
    def build(cls, ctx: ServiceContext) -> Ports:
        settings = ctx.settings
        zendit = zendit_client(settings)
        wallet = WalletCurrency(zendit)
        pricing = PricingPolicy(
            markup_percent=settings.pricing_markup_percent,
            min_margin=settings.pricing_min_margin,
            rule=settings.pricing_rule,
        )
        return cls(
            ctx=ctx,
            stripe=stripe_gateway(settings),
            zendit=zendit,
            wallet=wallet,
            pricing=pricing,
            catalogue=Catalogue(
                zendit=zendit,
                wallet_currency=wallet.get,
                pricing=pricing,
                refresh_seconds=settings.catalogue_refresh_seconds,
            ),
            webhook_secrets=tuple(s.get_secret_value() for s in settings.stripe_webhook_secrets),
            issuing_webhook_secrets=tuple(s.get_secret_value() for s in settings.issuing_webhook_secrets),
            deliveries=InFlightLimit(settings.webhook_max_in_flight),
        )

    async def aclose(self) -> None:
        await self.catalogue.stop()  # before its Zendit client closes under a refresh in flight
        await self.stripe.aclose()
        await self.zendit.aclose()


async def get_ports(request: Request) -> Ports:
    # async: FastAPI runs a plain `def` dependency in its thread pool, a thread hop on every request.
    ports: Ports = request.app.state.ports
    return ports


PortsDep = Annotated[Ports, Depends(get_ports)]
