"""The Issuing authorisation decision (pure rules, no emulator running)."""

from __future__ import annotations

import datetime
from typing import Any

from esim_sandbox.stripe_emulator.auth_rules import Spend, decide, window_start
from esim_sandbox.stripe_emulator.issuing_objects import merchant_data, spending_controls

NOW = int(datetime.datetime(2030, 5, 15, 12, tzinfo=datetime.UTC).timestamp())


def card(**overrides: Any) -> dict[str, Any]:
    base = {
        "status": "active",
        "currency": "usd",
        "exp_month": 12,
        "exp_year": 2032,
        "spending_controls": spending_controls(
            {
                "spending_limits": [
                    {"amount": 5000, "interval": "per_authorization"},
                    {"amount": 8000, "interval": "all_time"},
                ]
            }
        ),
    }
    return {**base, **overrides}


HOLDER = {"status": "active", "spending_controls": spending_controls(None, for_cardholder=True)}


def outcome(
    amount: int = 5000,
    *,
    the_card: dict | None = None,
    spends: list[Spend] | None = None,
    available: int = 1_000_000,
    currency: str = "usd",
    merchant: dict | None = None,
    holder: dict | None = None,
) -> tuple[bool, str]:
    decision = decide(
        card=the_card or card(),
        cardholder=holder or HOLDER,
        amount=amount,
        currency=currency,
        merchant=merchant_data(merchant),
        spends=spends or [],
        issuing_available=available,
        at=NOW,
    )
    return decision.approved, decision.reason


def test_an_amount_within_every_limit_is_approved() -> None:
    assert outcome(5000) == (True, "card_active")


def test_more_than_the_per_authorisation_limit_is_declined() -> None:
    assert outcome(5001) == (False, "spending_controls")


def test_the_all_time_limit_counts_earlier_approved_spend() -> None:
    earlier = [Spend(amount=4000, created=NOW - 86_400 * 400, category="telecommunication_services")]
    assert outcome(4000, spends=earlier) == (True, "card_active")
    assert outcome(4001, spends=earlier) == (False, "spending_controls")


def test_a_daily_limit_ignores_yesterday() -> None:
    daily = card(
        spending_controls=spending_controls({"spending_limits": [{"amount": 100, "interval": "daily"}]})
    )
    yesterday = [Spend(amount=100, created=NOW - 86_400, category="telecommunication_services")]
    today = [Spend(amount=100, created=NOW - 60, category="telecommunication_services")]
    assert outcome(100, the_card=daily, spends=yesterday)[0] is True
    assert outcome(100, the_card=daily, spends=today) == (False, "spending_controls")


def test_card_status_is_checked_before_anything_else() -> None:
    assert outcome(999_999, the_card=card(status="canceled"), available=0) == (False, "card_canceled")
    assert outcome(1, the_card=card(status="inactive")) == (False, "card_inactive")


def test_an_expired_card_is_declined() -> None:
    assert outcome(1, the_card=card(exp_month=4, exp_year=2030)) == (False, "card_expired")
    assert outcome(1, the_card=card(exp_month=5, exp_year=2030))[0] is True


def test_an_inactive_cardholder_declines_the_card() -> None:
    assert outcome(1, holder={**HOLDER, "status": "inactive"}) == (False, "cardholder_inactive")


def test_a_foreign_currency_is_not_allowed() -> None:
    assert outcome(1, currency="eur") == (False, "not_allowed")


def test_the_issuing_float_must_cover_the_amount() -> None:
    assert outcome(5000, available=4999) == (False, "insufficient_funds")
    assert outcome(5000, available=5000) == (True, "card_active")


def test_allowed_categories_and_countries_are_enforced() -> None:
    limited = card(
        spending_controls=spending_controls(
            {"allowed_categories": ["telecommunication_services"], "allowed_merchant_countries": ["US"]}
        )
    )
    assert outcome(1, the_card=limited)[0] is True
    assert (
        outcome(1, the_card=limited, merchant={"category": "computer_software_stores"})[1]
        == "spending_controls"
    )
    assert outcome(1, the_card=limited, merchant={"country": "DE"})[1] == "spending_controls"


def test_limit_windows_are_utc_calendar_periods() -> None:
    start = datetime.datetime.fromtimestamp
    assert start(window_start("daily", NOW), datetime.UTC) == datetime.datetime(
        2030, 5, 15, tzinfo=datetime.UTC
    )
    assert start(window_start("weekly", NOW), datetime.UTC) == datetime.datetime(
        2030, 5, 12, tzinfo=datetime.UTC
    )
    assert start(window_start("monthly", NOW), datetime.UTC) == datetime.datetime(
        2030, 5, 1, tzinfo=datetime.UTC
    )
    assert window_start("all_time", NOW) == 0
