"""The shop-facing JSON shapes (camelCase on the wire, as the shop's front end sends them)."""

from __future__ import annotations

import re
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field, field_validator
from pydantic.alias_generators import to_camel

# Deliberately simple (no email-validator dependency): one @, a dotted domain, no spaces or angle
# brackets. Stripe and the SMTP server are the real judges; this only turns obvious typos into a 422.
_EMAIL_RE = re.compile(r"^[^@\s<>,;\"]+@[^@\s<>,;\"]+\.[A-Za-z]{2,}$")
# Zendit offer ids look like ESIM-US-7D-1GB; the same characters keep a path segment safe.
OFFER_ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"


class _Camel(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True)


class CheckoutRequest(_Camel):
    """The price is not part of the request: the server computes it from the Zendit offer."""

    model_config = ConfigDict(str_strip_whitespace=True)

    offer_id: str = Field(pattern=OFFER_ID_PATTERN)
    recipient_email: str = Field(max_length=254)
    full_name: str = Field(min_length=1, max_length=200)
    user_id: str | None = Field(default=None, max_length=200)

    @field_validator("recipient_email")
    @classmethod
    def _plausible_email(cls, value: str) -> str:
        if not _EMAIL_RE.match(value):
            raise ValueError("recipientEmail is not a valid email address")
        return value


class CheckoutCreated(_Camel):
    session_id: str
    url: str
    transaction_id: str
    amount: int  # minor units of `currency`, for the shop to display what Checkout will charge
    currency: str


class OrderView(_Camel):
    """What the shop may show its customer: no card data, no provider ids, no internal error text."""

    transaction_id: str
    status: str
    offer_id: str
    amount: int
    currency: str
    created_at: datetime
    updated_at: datetime
    paid_at: datetime | None
    delivered_at: datetime | None
    refunded_at: datetime | None
    qr_code_url: str | None  # only once the eSIM has been emailed


class ShopOffer(_Camel):
    """One sellable offer as the shop lists it, priced by the server. Never our Zendit cost."""

    offer_id: str
    country: str | None  # ISO 3166 alpha-2; None for a regional offer (see `regions`)
    regions: list[str]
    data_gb: float = Field(alias="dataGB")  # Zendit's spelling; 0 when `dataUnlimited`
    data_unlimited: bool
    duration_days: int
    notes: str
    amount: int  # minor units of `currency`: what checkout charges for this offer (unless Zendit changed it)
    currency: str


class OfferList(_Camel):
    offers: list[ShopOffer]
    updated_at: datetime  # when the catalogue was last loaded from Zendit
