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
from webhook.domain import PricingPolicy


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
    webhook_secrets: tuple[str, ...]

    @classmethod
    def build(cls, ctx: ServiceContext) -> Ports:
        settings = ctx.settings
        zendit = zendit_client(settings)
        return cls(
            ctx=ctx,
            stripe=stripe_gateway(settings),
            zendit=zendit,
            wallet=WalletCurrency(zendit),
            pricing=PricingPolicy(
                markup_percent=settings.pricing_markup_percent, min_margin=settings.pricing_min_margin
            ),
            webhook_secrets=tuple(s.get_secret_value() for s in settings.stripe_webhook_secrets),
        )

    async def aclose(self) -> None:
        await self.stripe.aclose()
        await self.zendit.aclose()


def get_ports(request: Request) -> Ports:
    ports: Ports = request.app.state.ports
    return ports


PortsDep = Annotated[Ports, Depends(get_ports)]
