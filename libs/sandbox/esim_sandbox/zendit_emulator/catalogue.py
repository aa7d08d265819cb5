"""The sandbox eSIM catalogue, in Zendit's offer shape (dto.ESimOffer).

Chosen to exercise the client: offers in several countries and regions, costs with and without a `fee`,
one cost in GBP (a USD wallet must refuse it), one with `currencyDivisor` 1000 (exact conversion to cents),
one disabled offer (404 on GET), and the seed's `ESIM-GLOBAL-30D-5GB`.
"""

from __future__ import annotations

import copy
from typing import Any

# Fixed so that listings are stable across runs.
_CREATED_AT = "2025-01-15T09:00:00Z"
_BRAND = "SANDBOX_MOBILE"
_BRAND_NAME = "Sandbox Mobile"


def _offer(
    offer_id: str,
    *,
    country: str,
    regions: list[str],
    data_gb: float,
    days: int,
    cost: tuple[int, int | None],
    price: tuple[int, int],
    currency: str = "USD",
    divisor: int = 100,
    unlimited: bool = False,
    roaming: list[str] | None = None,
    sub_types: list[str] | None = None,
    enabled: bool = True,
    notes: str = "",
) -> dict[str, Any]:
    fixed, fee = cost
    cost_obj: dict[str, Any] = {"currency": currency, "currencyDivisor": divisor, "fixed": fixed}
    if fee is not None:
        cost_obj["fee"] = fee
    return {
        "offerId": offer_id,
        "enabled": enabled,
        "brand": _BRAND,
        "brandName": _BRAND_NAME,
        "country": country,
        "regions": regions,
        "dataGB": 0 if unlimited else data_gb,
        "dataUnlimited": unlimited,
        "dataSpeeds": ["4G", "5G"],
        "durationDays": days,
        "subTypes": sub_types or ["Data Only"],
        "priceType": "FIXED",
        "productType": "ESIM",
        "cost": cost_obj,
        "price": {
            "currency": currency,
            "currencyDivisor": divisor,
            "fixed": price[0],
            "suggestedFixed": price[1],
        },
        "roaming": [{"country": c, "dataSpeeds": ["4G"]} for c in (roaming or [])],
        "notes": notes,
        "shortNotes": f"{'Unlimited' if unlimited else f'{data_gb:g} GB'} for {days} days",
        "smsNumber": 0,
        "smsUnlimited": False,
        "voiceMinutes": 0,
        "voiceUnlimited": False,
        "createdAt": _CREATED_AT,
        "updatedAt": _CREATED_AT,
    }


OFFERS: tuple[dict[str, Any], ...] = (
    _offer("ESIM-US-7D-1GB", country="US", regions=["North America"], data_gb=1, days=7,
           cost=(450, None), price=(900, 999)),
    _offer("ESIM-US-30D-10GB", country="US", regions=["North America"], data_gb=10, days=30,
           cost=(1800, 90), price=(3200, 3499)),
    _offer("ESIM-GB-15D-5GB", country="GB", regions=["Western Europe"], data_gb=5, days=15,
           cost=(900, 45), price=(1600, 1799)),
    _offer("ESIM-FR-10D-3GB", country="FR", regions=["Western Europe"], data_gb=3, days=10,
           cost=(650, None), price=(1200, 1299)),
    _offer("ESIM-DE-30D-20GB", country="DE", regions=["Western Europe"], data_gb=20, days=30,
           cost=(2400, 120), price=(4200, 4499)),
    _offer("ESIM-JP-7D-UL", country="JP", regions=["Asia"], data_gb=0, days=7, unlimited=True,
           cost=(1500, 75), price=(2600, 2899)),
    _offer("ESIM-AD-10D-ULE-NOROAM", country="AD", regions=["Western Europe"], data_gb=0, days=10,
           unlimited=True, cost=(1100, None), price=(1900, 1999), notes="No roaming outside Andorra."),
    _offer("ESIM-AFRICA-30D-10GB", country="", regions=["Africa"], data_gb=10, days=30,
           cost=(3500, 175), price=(5900, 6499), roaming=["ZA", "KE", "NG", "EG", "MA", "GH"]),
    _offer("ESIM-EUROPE-15D-10GB", country="", regions=["Western Europe", "Eastern Europe"], data_gb=10,
           days=15, cost=(1700, 85), price=(2900, 3199), roaming=["FR", "DE", "ES", "IT", "PL", "RO"]),
    _offer("ESIM-GLOBAL-30D-5GB", country="", regions=["Global"], data_gb=5, days=30,
           cost=(2300, 115), price=(3900, 4299), roaming=["US", "GB", "FR", "DE", "JP", "AU", "BR"]),
    # Cost in GBP: a USD wallet must refuse to buy it (the emulator fails it with CURRENCY_MISMATCH).
    _offer("ESIM-GB-30D-3GB-GBP", country="GB", regions=["Western Europe"], data_gb=3, days=30,
           currency="GBP", cost=(700, 35), price=(1200, 1399)),
    # Divisor 1000: 12.500 + 0.500 USD = 1300 cents exactly.
    _offer("ESIM-MX-7D-2GB", country="MX", regions=["North America"], data_gb=2, days=7,
           divisor=1000, cost=(12500, 500), price=(21000, 22990)),
    # Disabled: listed with enabled=false, 404 on GET, refused on purchase.
    _offer("ESIM-TH-8D-5GB", country="TH", regions=["Southeast Asia"], data_gb=5, days=8,
           cost=(800, 40), price=(1500, 1699), enabled=False),
)  # fmt: skip


def fresh_catalogue() -> dict[str, dict[str, Any]]:
    """A private, mutable copy keyed by offerId (sandbox controls may toggle `enabled`)."""
    return {offer["offerId"]: copy.deepcopy(offer) for offer in OFFERS}
