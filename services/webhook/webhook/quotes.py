"""What a Zendit offer sells for in the shop, or why it is not for sale. Pure: no I/O.

Checkout (one offer, read live) and the catalogue (every offer, cached) both go through `quote`, so
the price the shop lists is the price Checkout charges for the same offer data, and an offer the
catalogue shows is one checkout accepts.

    quote(offer, wallet_currency, policy) → Quote, or NotForSale(refusal, public, internal)
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum

from esim_common.money import Money, MoneyError
from esim_common.providers.zendit import Offer, PriceType
from webhook.domain import PricingPolicy, PricingRefused, selling_price


class Refusal(StrEnum):
    """Why an offer is not for sale; also the `outcome` label of the checkout metric."""

    OFFER_UNAVAILABLE = "offer_unavailable"  # disabled, a RANGE price, or no fixed cost
    CURRENCY_MISMATCH = "currency_mismatch"  # the wallet could never pay for it
    PRICING_REFUSED = "pricing_refused"  # no price covers cost + minimum margin, or the cost is unusable


class NotForSale(Exception):
    """`public` may be shown to the shop (it never quotes our cost); `internal` is for the log only."""

    def __init__(self, refusal: Refusal, public: str, internal: str) -> None:
        super().__init__(public)
        self.refusal = refusal
        self.public = public
        self.internal = internal


@dataclass(frozen=True)
class Quote:
    offer: Offer
    cost: Money  # what Zendit takes from the wallet: never shown to the shop
    price: Money  # what the customer pays


def quote(offer: Offer, wallet_currency: str, policy: PricingPolicy) -> Quote:
    """The selling price of `offer` for a wallet paying in `wallet_currency`, under `policy`."""
    name = repr(offer.offer_id)
    if not offer.enabled or offer.price_type is not PriceType.FIXED or offer.cost.fixed is None:
        raise NotForSale(
            Refusal.OFFER_UNAVAILABLE,
            f"offer {name} is unknown or not for sale",
            f"enabled={offer.enabled} priceType={offer.price_type} fixed cost={offer.cost.fixed}",
        )
    try:
        cost = offer.cost_money
    except MoneyError as exc:
        raise NotForSale(Refusal.PRICING_REFUSED, f"offer {name} cannot be priced", str(exc)) from None
    if cost.currency != wallet_currency:
        raise NotForSale(
            Refusal.CURRENCY_MISMATCH,
            f"offer {name} costs {cost.currency} but the wallet pays in {wallet_currency}",
            "cost currency differs from the wallet currency",
        )
    try:
        price = selling_price(cost, _suggested(offer), policy)
    except PricingRefused as exc:
        raise NotForSale(
            Refusal.PRICING_REFUSED,
            f"offer {name} cannot be sold at a price that covers its cost and margin",
            str(exc),
        ) from None
    return Quote(offer=offer, cost=cost, price=price)


def _suggested(offer: Offer) -> Money | None:
    try:
        return offer.suggested_price_money
    except MoneyError:
        return None  # a suggested price we cannot express exactly: fall back to cost + markup
