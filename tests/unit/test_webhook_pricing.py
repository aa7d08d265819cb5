"""The selling price is computed on the server from the Zendit offer, in integer minor units."""

from __future__ import annotations

import pytest

from esim_common.money import Money
from webhook.domain import PricingPolicy, PricingRefused, selling_price

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
