import pytest

from esim_common.money import (
    CurrencyMismatch,
    InexactConversion,
    Money,
    MoneyError,
    UnknownCurrency,
    ceil_to_multiple,
    from_zendit,
    minor_unit_exponent,
    to_zendit,
)


def test_money_rejects_lowercase_or_malformed_currency_codes():
    for bad in ("usd", "US", "USDT", "", "U$D"):
        with pytest.raises(MoneyError):
            Money(100, bad)


def test_money_rejects_floats_and_bools_as_amounts():
    with pytest.raises(MoneyError):
        Money(12.5, "USD")  # type: ignore[arg-type]
    with pytest.raises(MoneyError):
        Money(True, "USD")  # type: ignore[arg-type]


def test_money_is_immutable_and_compares_by_value():
    price = Money(1234, "USD")
    assert price == Money(1234, "USD")
    assert price != Money(1234, "EUR")
    with pytest.raises(AttributeError):
        price.amount = 1  # type: ignore[misc]


def test_money_arithmetic_refuses_to_mix_currencies():
    assert Money(100, "GBP") + Money(250, "GBP") == Money(350, "GBP")
    assert Money(100, "GBP") - Money(250, "GBP") == Money(-150, "GBP")
    assert Money(100, "GBP").times(3) == Money(300, "GBP")
    with pytest.raises(CurrencyMismatch):
        Money(100, "GBP") + Money(100, "USD")
    with pytest.raises(CurrencyMismatch):
        _ = Money(100, "GBP") < Money(100, "USD")


def test_money_formats_with_the_currencys_own_decimals():
    assert Money(1234, "USD").format() == "12.34 USD"
    assert Money(-5, "EUR").format() == "-0.05 EUR"
    assert Money(500, "JPY").format() == "500 JPY"
    assert Money(1234, "KWD").format() == "1.234 KWD"


def test_minor_unit_exponents_follow_iso_4217():
    assert [minor_unit_exponent(c) for c in ("USD", "GBP", "EUR", "JPY", "KWD")] == [2, 2, 2, 0, 3]
    with pytest.raises(UnknownCurrency):
        minor_unit_exponent("XYZ")


def test_from_zendit_converts_divisor_100_one_to_one_for_cents():
    assert from_zendit(1234, "USD", 100) == Money(1234, "USD")


def test_from_zendit_converts_a_divisor_1000_amount_exactly():
    assert from_zendit(12340, "USD", 1000) == Money(1234, "USD")
    assert from_zendit(13000, "USD", 1000) == Money(1300, "USD")


def test_from_zendit_refuses_a_fraction_of_a_cent_instead_of_rounding():
    with pytest.raises(InexactConversion):
        from_zendit(12345, "USD", 1000)


def test_from_zendit_scales_up_for_small_divisors():
    assert from_zendit(12, "USD", 1) == Money(1200, "USD")
    assert from_zendit(500, "JPY", 1) == Money(500, "JPY")
    with pytest.raises(InexactConversion):
        from_zendit(1050, "JPY", 100)  # 10.50 yen


def test_from_zendit_rejects_nonsense_divisors_and_unknown_currencies():
    for divisor in (0, -100):
        with pytest.raises(MoneyError):
            from_zendit(100, "USD", divisor)
    with pytest.raises(UnknownCurrency):
        from_zendit(100, "XYZ", 100)


def test_to_zendit_is_the_exact_inverse_of_from_zendit():
    for value, divisor in ((1234, 100), (12340, 1000), (7, 1), (0, 100), (-2500, 1000)):
        assert to_zendit(from_zendit(value, "USD", divisor), divisor) == value


def test_to_zendit_refuses_an_amount_the_divisor_cannot_express():
    with pytest.raises(InexactConversion):
        to_zendit(Money(1234, "USD"), 10)  # 12.34 with one decimal


def test_ceil_to_multiple_rounds_a_shortfall_up_to_the_top_up_step():
    assert ceil_to_multiple(1, 5000) == 5000
    assert ceil_to_multiple(5000, 5000) == 5000
    assert ceil_to_multiple(5001, 5000) == 10000
    assert ceil_to_multiple(0, 5000) == 0
    assert ceil_to_multiple(-1, 5000) == 0


def test_ceil_to_multiple_rejects_a_non_positive_step():
    for step in (0, -100):
        with pytest.raises(MoneyError):
            ceil_to_multiple(100, step)
