"""Charging a card through the Stripe emulator's card network control route.

Contract (the Stripe emulator implements it): `POST {stripe_url}/_sandbox/card_network/charge` with JSON
`{number, exp_month, exp_year, cvc, amount, currency (lowercase), merchant_name, reference}` →
200 `{approved, authorization_id, decline_reason}`. Spending limits and cancelled cards are enforced by
the Stripe emulator's Issuing authorisation, so the sandbox refuses what real Stripe would refuse.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

CHARGE_PATH = "/_sandbox/card_network/charge"
MERCHANT_NAME = "Zendit"
# Loopback call; a slow answer means the Stripe emulator is stuck, and the gateway should say 503.
CHARGE_TIMEOUT_SECONDS = 10.0


class CardNetworkUnavailable(Exception):
    """The Stripe emulator could not be asked (not configured, unreachable, 5xx, unreadable)."""


@dataclass(frozen=True)
class ChargeOutcome:
    approved: bool
    authorization_id: str | None
    decline_reason: str | None


async def charge(
    stripe_url: str | None, *, card: dict[str, Any], amount: int, currency: str, reference: str
) -> ChargeOutcome:
    if not stripe_url:
        raise CardNetworkUnavailable("no Stripe emulator configured (--stripe-url)")
    payload = {
        "number": card["number"],
        "exp_month": card["exp_month"],
        "exp_year": card["exp_year"],
        "cvc": card["cvc"],
        "amount": amount,
        "currency": currency.lower(),
        "merchant_name": MERCHANT_NAME,
        "reference": reference,
    }
    try:
        async with httpx.AsyncClient(timeout=CHARGE_TIMEOUT_SECONDS) as http:
            response = await http.post(stripe_url.rstrip("/") + CHARGE_PATH, json=payload)
    except httpx.HTTPError as exc:
        raise CardNetworkUnavailable(f"card network unreachable: {type(exc).__name__}") from None
    if response.status_code >= 500:
        raise CardNetworkUnavailable(f"card network answered {response.status_code}")
    if response.status_code != 200:
        # The network refused the request itself (unknown card, malformed data): a decline, not an outage.
        return ChargeOutcome(False, None, f"card_network_{response.status_code}")
    try:
        body = response.json()
        return ChargeOutcome(
            approved=bool(body["approved"]),
            authorization_id=body.get("authorization_id"),
            decline_reason=body.get("decline_reason"),
        )
    except (ValueError, KeyError, TypeError):
        raise CardNetworkUnavailable("card network answered an unreadable body") from None
