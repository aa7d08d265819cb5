"""The selling price is computed on the server from the Zendit offer, in integer minor units."""

from __future__ import annotations

from typing import Any

import pytest

from esim_common.money import Money
from esim_common.providers.zendit import Offer
from esim_common.settings import PricingRule
from webhook.domain import PricingPolicy, PricingRefused, selling_price
from webhook.quotes import NotForSale, Refusal, quote

POLICY = PricingPolicy(markup_percent=30, min_margin=100)


def test_zendit_suggested_retail_price_in_the_cost_currency_is_the_price():
    assert selling_price(Money(450, "USD"), Money(999, "USD"), POLICY) == Money(999, "USD")


def test_without_a_suggested_price_the_price_is_cost_plus_the_markup():
    assert selling_price(Money(1000, "USD"), None, POLICY) == Money(1300, "USD")


def test_a_suggested_price_in_another_currency_is_ignored_for_the_markup():
    assert selling_price(Money(1000, "USD"), Money(999, "EUR"), POLICY) == Money(1300, "USD")


def test_the_markup_rounds_up_to_a_whole_minor_unit():
    # 333 * 1.30 = 432.9 → 433: rounding never eats into the margin.
    assert selling_price(Money(333, "USD"), None, PricingPolicy(30, 0)) == Money(433, "USD")
    # 1 * 1.01 = 1.01 → 2
    assert selling_price(Money(1, "USD"), None, PricingPolicy(1, 0)) == Money(2, "USD")


def test_exact_markups_are_not_rounded():
    assert selling_price(Money(2000, "USD"), None, PricingPolicy(25, 0)) == Money(2500, "USD")


def test_large_amounts_stay_exact_where_floats_would_not():
    cost = Money(10**17 + 1, "USD")
    assert selling_price(cost, None, PricingPolicy(30, 0)).amount == -(-(10**17 + 1) * 130 // 100)


def test_zero_decimal_currencies_are_priced_in_their_own_minor_unit():
    assert selling_price(Money(1001, "JPY"), None, PricingPolicy(30, 100)) == Money(1302, "JPY")


def test_a_price_whose_margin_is_below_the_minimum_is_refused():
    with pytest.raises(PricingRefused, match="margin"):
        selling_price(Money(300, "USD"), None, POLICY)  # 390 - 300 = 90 < 100


def test_a_margin_exactly_at_the_minimum_is_accepted():
    assert selling_price(Money(900, "USD"), Money(1000, "USD"), POLICY) == Money(1000, "USD")


def test_a_suggested_price_below_cost_plus_minimum_margin_is_refused():
    with pytest.raises(PricingRefused):
        selling_price(Money(950, "USD"), Money(999, "USD"), POLICY)


def test_a_suggested_price_below_cost_is_refused_even_without_a_minimum_margin():
    with pytest.raises(PricingRefused):
        selling_price(Money(1000, "USD"), Money(900, "USD"), PricingPolicy(30, 0))


def test_a_negative_markup_or_margin_is_a_configuration_error():
    with pytest.raises(ValueError):
        PricingPolicy(markup_percent=-5, min_margin=100)
    with pytest.raises(ValueError):
        PricingPolicy(markup_percent=30, min_margin=-1)


# ------------------------------------------------------------------------------------ PRICING_RULE

COST_PLUS = PricingPolicy(markup_percent=30, min_margin=100, rule=PricingRule.COST_PLUS_MARKUP)


def test_the_default_rule_is_zendit_suggested_retail():
    assert POLICY.rule is PricingRule.SUGGESTED_RETAIL
    assert PricingPolicy(30, 100).rule is PricingRule.SUGGESTED_RETAIL


def test_cost_plus_markup_ignores_a_suggested_retail_price_in_the_cost_currency():
    assert selling_price(Money(450, "USD"), Money(999, "USD"), COST_PLUS) == Money(585, "USD")


def test_cost_plus_markup_prices_offers_without_a_suggestion_the_same_as_suggested_retail():
    cost = Money(1000, "USD")
    assert selling_price(cost, None, COST_PLUS) == selling_price(cost, None, POLICY) == Money(1300, "USD")


def test_cost_plus_markup_still_enforces_the_minimum_margin():
    # Zendit's suggestion (9.99) would earn the margin; cost + 30% (3.90) does not, and is what counts.
    with pytest.raises(PricingRefused, match="margin"):
        selling_price(Money(300, "USD"), Money(999, "USD"), COST_PLUS)


def test_cost_plus_markup_rescues_an_offer_whose_suggested_price_is_below_cost():
    assert selling_price(Money(1000, "USD"), Money(900, "USD"), COST_PLUS) == Money(1300, "USD")
    with pytest.raises(PricingRefused):
        selling_price(Money(1000, "USD"), Money(900, "USD"), POLICY)


# ------------------------------------------------------------------- quoting a whole Zendit offer


def zendit_offer(**changes: Any) -> Offer:
    raw: dict[str, Any] = {
        "offerId": "ESIM-US-7D-1GB",
        "enabled": True,
        "country": "US",
        "priceType": "FIXED",
        "cost": {"currency": "USD", "currencyDivisor": 100, "fixed": 450},
        "price": {"currency": "USD", "currencyDivisor": 100, "fixed": 900, "suggestedFixed": 999},
    }
    raw.update(changes)
    return Offer.model_validate(raw)


def test_an_offer_is_quoted_at_the_suggested_price_with_its_cost_kept_apart():
    quoted = quote(zendit_offer(), "USD", POLICY)
    assert (quoted.price, quoted.cost) == (Money(999, "USD"), Money(450, "USD"))


def test_an_offer_is_quoted_under_the_configured_rule():
    assert quote(zendit_offer(), "USD", COST_PLUS).price == Money(585, "USD")


def test_the_quoted_cost_includes_zendits_fee_and_converts_the_divisor():
    offer = zendit_offer(cost={"currency": "USD", "currencyDivisor": 1000, "fixed": 4000, "fee": 500})
    assert quote(offer, "USD", COST_PLUS).cost == Money(450, "USD")


@pytest.mark.parametrize(
    "changes",
    [
        {"enabled": False},
        {"priceType": "RANGE"},
        {"cost": {"currency": "USD", "currencyDivisor": 100, "min": 100, "max": 900}},
    ],
    ids=["disabled", "range-priced", "no-fixed-cost"],
)
def test_an_offer_we_cannot_sell_at_a_fixed_price_is_unavailable(changes: dict[str, Any]):
    with pytest.raises(NotForSale) as caught:
        quote(zendit_offer(**changes), "USD", POLICY)
    assert caught.value.refusal is Refusal.OFFER_UNAVAILABLE
    assert "ESIM-US-7D-1GB" in caught.value.public


def test_an_offer_costing_another_currency_than_the_wallet_is_refused_naming_both():
    with pytest.raises(NotForSale) as caught:
        quote(zendit_offer(), "GBP", POLICY)
    assert caught.value.refusal is Refusal.CURRENCY_MISMATCH
    assert "USD" in caught.value.public and "GBP" in caught.value.public


def test_a_margin_refusal_tells_the_shop_nothing_about_our_cost():
    with pytest.raises(NotForSale) as caught:
        quote(zendit_offer(), "USD", PricingPolicy(30, 10_000))
    assert caught.value.refusal is Refusal.PRICING_REFUSED
    assert "4.50" not in caught.value.public and "4.50" in caught.value.internal


def test_a_cost_in_a_fraction_of_a_cent_cannot_be_priced():
    offer = zendit_offer(cost={"currency": "USD", "currencyDivisor": 1000, "fixed": 4505})
    with pytest.raises(NotForSale) as caught:
        quote(offer, "USD", POLICY)
    assert caught.value.refusal is Refusal.PRICING_REFUSED


def test_an_inexact_suggested_price_falls_back_to_the_markup():
    offer = zendit_offer(price={"currency": "USD", "currencyDivisor": 1000, "suggestedFixed": 9995})
    assert quote(offer, "USD", POLICY).price == Money(585, "USD")
