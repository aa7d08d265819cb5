"""The Issuing authorisation decision, as pure functions over plain data (no state, no I/O).

Order follows Stripe: card status, cardholder status, what the card may be used for (currency, spending
controls), then whether the Issuing balance can cover it. The real-time webhook, if any, comes after.
Reasons are Stripe's `request_history[].reason` values.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Spend:
    """An approved authorisation of the card: what it holds or captured, when, in which category."""

    amount: int
    created: int
    category: str


@dataclass(frozen=True)
class Decision:
    approved: bool
    reason: str
    message: str | None = None


APPROVED = Decision(True, "card_active")


def decide(
    *,
    card: dict[str, Any],
    cardholder: dict[str, Any],
    amount: int,
    currency: str,
    merchant: dict[str, Any],
    spends: list[Spend],
    issuing_available: int,
    at: int,
) -> Decision:
    for check in (
        _card_status(card, at),
        _cardholder_status(cardholder),
        _currency(card, currency),
        _controls(card["spending_controls"], amount, merchant, spends, at, "card"),
        _controls(cardholder["spending_controls"], amount, merchant, spends, at, "cardholder"),
        _float(amount, issuing_available, currency),
    ):
        if check is not None:
            return check
    return APPROVED


def _card_status(card: dict[str, Any], at: int) -> Decision | None:
    if card["status"] == "canceled":
        return Decision(False, "card_canceled", "The card is canceled.")
    if card["status"] != "active":
        return Decision(False, "card_inactive", "The card is inactive.")
    today = datetime.datetime.fromtimestamp(at, tz=datetime.UTC).date()
    if (card["exp_year"], card["exp_month"]) < (today.year, today.month):
        return Decision(False, "card_expired", "The card has expired.")
    return None


def _cardholder_status(cardholder: dict[str, Any]) -> Decision | None:
    if cardholder["status"] == "blocked":
        return Decision(False, "cardholder_blocked", "The cardholder is blocked.")
    if cardholder["status"] != "active":
        return Decision(False, "cardholder_inactive", "The cardholder is inactive.")
    return None


def _currency(card: dict[str, Any], currency: str) -> Decision | None:
    # Stripe would convert a foreign-currency purchase; the emulator refuses it so that a currency mix-up
    # in our own code shows up in tests instead of being silently converted.
    if currency != card["currency"]:
        return Decision(
            False,
            "not_allowed",
            f"Emulator: authorization currency {currency} does not match card currency {card['currency']}.",
        )
    return None


def _controls(
    controls: dict[str, Any], amount: int, merchant: dict[str, Any], spends: list[Spend], at: int, owner: str
) -> Decision | None:
    category, country = merchant["category"], merchant["country"]
    if controls.get("allowed_categories") and category not in controls["allowed_categories"]:
        return Decision(
            False, "spending_controls", f"Merchant category {category} is not allowed on this {owner}."
        )
    if category in (controls.get("blocked_categories") or []):
        return Decision(
            False, "spending_controls", f"Merchant category {category} is blocked on this {owner}."
        )
    if controls.get("allowed_merchant_countries") and country not in controls["allowed_merchant_countries"]:
        return Decision(
            False, "spending_controls", f"Merchant country {country} is not allowed on this {owner}."
        )
    if country in (controls.get("blocked_merchant_countries") or []):
        return Decision(False, "spending_controls", f"Merchant country {country} is blocked on this {owner}.")
    for limit in controls.get("spending_limits") or []:
        if limit.get("categories") and category not in limit["categories"]:
            continue
        already = 0 if limit["interval"] == "per_authorization" else _spent_since(spends, limit, at)
        if already + amount > limit["amount"]:
            return Decision(
                False,
                "spending_controls",
                f"The {limit['interval']} spending limit of {limit['amount']} on this {owner} "
                "would be exceeded.",
            )
    return None


def _spent_since(spends: list[Spend], limit: dict[str, Any], at: int) -> int:
    start = window_start(limit["interval"], at)
    categories = limit.get("categories")
    return sum(
        spend.amount
        for spend in spends
        if spend.created >= start and (not categories or spend.category in categories)
    )


def window_start(interval: str, at: int) -> int:
    """Stripe's spending-limit windows are calendar periods in UTC; weeks start on Sunday."""
    if interval == "all_time":
        return 0
    day = datetime.datetime.fromtimestamp(at, tz=datetime.UTC).date()
    if interval == "weekly":
        day -= datetime.timedelta(days=(day.weekday() + 1) % 7)
    elif interval == "monthly":
        day = day.replace(day=1)
    elif interval == "yearly":
        day = day.replace(month=1, day=1)
    start = datetime.datetime.combine(day, datetime.time.min, tzinfo=datetime.UTC)
    return int(start.timestamp())


def _float(amount: int, issuing_available: int, currency: str) -> Decision | None:
    if amount > issuing_available:
        return Decision(
            False,
            "insufficient_funds",
            f"The Issuing balance ({issuing_available} {currency}) cannot cover {amount}.",
        )
    return None
