"""The platform cardholder every top-up card is issued to: configured, or found/created once per process."""

from __future__ import annotations

import asyncio
import logging

from esim_common.providers.stripe import BillingAddress, StripeGateway
from esim_common.settings import Settings

log = logging.getLogger("esim.funding.cardholder")


class PlatformCardholder:
    """`STRIPE_ISSUING_CARDHOLDER_ID` when set; otherwise the seed's STRIPE_ISSUING_* fields, looked up
    (or created) through `ensure_cardholder` on first use and cached for the life of the process."""

    def __init__(self, *, stripe: StripeGateway, settings: Settings) -> None:
        self._stripe = stripe
        self._settings = settings
        self._id: str | None = settings.stripe_issuing_cardholder_id or None
        self._lock = asyncio.Lock()

    async def id(self) -> str:
        if self._id is not None:
            return self._id
        async with self._lock:  # concurrent first top-ups create one cardholder, not several
            if self._id is None:
                s = self._settings
                holder = await self._stripe.ensure_cardholder(
                    name=s.stripe_issuing_cardholder_name,
                    email=s.service_owner_email,
                    billing_address=BillingAddress(
                        line1=s.stripe_issuing_address_line1,
                        city=s.stripe_issuing_address_city,
                        state=s.stripe_issuing_address_state,
                        postal_code=s.stripe_issuing_address_postal,
                        country=s.stripe_issuing_address_country,
                    ),
                )
                log.info(
                    "platform cardholder ready; set STRIPE_ISSUING_CARDHOLDER_ID to skip the lookup",
                    extra={"cardholder_id": holder.id},
                )
                self._id = holder.id
        return self._id
