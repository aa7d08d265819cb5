"""Integer money: amounts in ISO-4217 minor units, never floats, never silent rounding.

Zendit states every amount as `(value, currencyDivisor)` (1234 with divisor 100 is 12.34), Stripe states
amounts in the currency's minor units. `from_zendit` / `to_zendit` convert between the two exactly and
raise `InexactConversion` when a value cannot be represented — a fraction of a cent must be a visible
error, not a rounding nobody decided on.

    MoneyError (ValueError)
    ├── UnknownCurrency      the currency is not in MINOR_UNIT_EXPONENTS
    ├── CurrencyMismatch     arithmetic or comparison across currencies
    └── InexactConversion    the value is not a whole number of target units
"""

from __future__ import annotations

import re
from dataclasses import dataclass

__all__ = [
    "MINOR_UNIT_EXPONENTS",
    "CurrencyMismatch",
    "InexactConversion",
    "Money",
    "MoneyError",
    "UnknownCurrency",
    "ceil_to_multiple",
    "from_zendit",
    "minor_unit_exponent",
    "to_zendit",
]

# ISO-4217 minor-unit exponents for the currencies an eSIM shop meets (wallets seen in GBP and USD, shops
# selling in EUR and friends). Listed explicitly rather than taken from a locale library so that an
# unexpected currency fails loudly instead of defaulting to 2 decimals.
MINOR_UNIT_EXPONENTS: dict[str, int] = {
    # two decimals
    "USD": 2, "GBP": 2, "EUR": 2, "CAD": 2, "AUD": 2, "NZD": 2, "CHF": 2, "SEK": 2, "NOK": 2, "DKK": 2,
    "PLN": 2, "CZK": 2, "HUF": 2, "RON": 2, "BGN": 2, "TRY": 2, "ILS": 2, "AED": 2, "SAR": 2, "QAR": 2,
    "INR": 2, "SGD": 2, "HKD": 2, "CNY": 2, "TWD": 2, "THB": 2, "MYR": 2, "PHP": 2, "IDR": 2, "MXN": 2,
    "BRL": 2, "ARS": 2, "COP": 2, "PEN": 2, "ZAR": 2, "EGP": 2, "MAD": 2, "NGN": 2, "KES": 2,
    # no decimals
    "JPY": 0, "KRW": 0, "VND": 0, "CLP": 0, "ISK": 0, "UGX": 0, "XOF": 0, "XAF": 0,
    # three decimals
    "KWD": 3, "BHD": 3, "JOD": 3, "OMR": 3, "TND": 3,
}  # fmt: skip

_CURRENCY_RE = re.compile(r"^[A-Z]{3}$")


class MoneyError(ValueError):
    """Base of every money error; a ValueError because the input, not the system, is wrong."""


class UnknownCurrency(MoneyError):
    pass


class CurrencyMismatch(MoneyError):
    pass


class InexactConversion(MoneyError):
    pass


def minor_unit_exponent(currency: str) -> int:
    """Decimal places of `currency`'s minor unit (USD 2, JPY 0, KWD 3)."""
    try:
        return MINOR_UNIT_EXPONENTS[currency]
    except KeyError:
        raise UnknownCurrency(f"no minor-unit exponent known for currency {currency!r}") from None


def _check_int(name: str, value: object) -> int:
    # bool is an int subclass; True cents is always a bug.
    if not isinstance(value, int) or isinstance(value, bool):
        raise MoneyError(f"{name} must be an int, got {type(value).__name__}")
    return value


@dataclass(frozen=True, slots=True)
class Money:
    """An amount in minor units of an ISO-4217 currency (`Money(1234, "USD")` is 12.34 USD)."""

    amount: int
    currency: str

    def __post_init__(self) -> None:
        _check_int("amount", self.amount)
        if not isinstance(self.currency, str) or not _CURRENCY_RE.match(self.currency):
            raise MoneyError(f"currency must be a 3-letter uppercase ISO code, got {self.currency!r}")

    @classmethod
    def zero(cls, currency: str) -> Money:
        return cls(0, currency)

    def _same(self, other: Money) -> Money:
        if not isinstance(other, Money):
            raise TypeError(f"expected Money, got {type(other).__name__}")
        if other.currency != self.currency:
            raise CurrencyMismatch(f"{self.currency} and {other.currency} cannot be combined")
        return other

    def __add__(self, other: Money) -> Money:
        return Money(self.amount + self._same(other).amount, self.currency)

    def __sub__(self, other: Money) -> Money:
        return Money(self.amount - self._same(other).amount, self.currency)

    def __neg__(self) -> Money:
        return Money(-self.amount, self.currency)

    def times(self, factor: int) -> Money:
        return Money(self.amount * _check_int("factor", factor), self.currency)

    def __lt__(self, other: Money) -> bool:
        return self.amount < self._same(other).amount

    def __le__(self, other: Money) -> bool:
        return self.amount <= self._same(other).amount

    def __gt__(self, other: Money) -> bool:
        return self.amount > self._same(other).amount

    def __ge__(self, other: Money) -> bool:
        return self.amount >= self._same(other).amount

    def format(self) -> str:
        """Human text for emails and logs, e.g. `12.34 USD`, `-0.05 EUR`, `500 JPY` (integer arithmetic)."""
        exponent = minor_unit_exponent(self.currency)
        sign = "-" if self.amount < 0 else ""
        scale: int = 10**exponent
        whole, frac = divmod(abs(self.amount), scale)
        text = f"{whole}.{frac:0{exponent}d}" if exponent else str(whole)
        return f"{sign}{text} {self.currency}"

    def __str__(self) -> str:
        return self.format()


def _check_divisor(divisor: object) -> int:
    value = _check_int("divisor", divisor)
    if value <= 0:
        raise MoneyError(f"divisor must be positive, got {value}")
    return value


def from_zendit(value: int, currency: str, divisor: int) -> Money:
    """Zendit's `(value, currencyDivisor)` as Money in ISO minor units, exactly or not at all.

    `from_zendit(1234, "USD", 100)` is 1234 cents; `from_zendit(12340, "USD", 1000)` is also 1234 cents;
    `from_zendit(12345, "USD", 1000)` (12.345 USD) raises InexactConversion.
    """
    _check_int("value", value)
    _check_divisor(divisor)
    scale: int = 10 ** minor_unit_exponent(currency)
    numerator = value * scale
    if numerator % divisor:
        raise InexactConversion(
            f"{value}/{divisor} {currency} is not a whole number of {currency} minor units"
        )
    return Money(numerator // divisor, currency)


def to_zendit(money: Money, divisor: int) -> int:
    """`money` as an integer for a Zendit amount with `currencyDivisor = divisor`, exactly or not at all."""
    _check_divisor(divisor)
    scale: int = 10 ** minor_unit_exponent(money.currency)
    numerator = money.amount * divisor
    if numerator % scale:
        raise InexactConversion(f"{money} cannot be expressed with divisor {divisor}")
    return numerator // scale


def ceil_to_multiple(amount: int, step: int) -> int:
    """Smallest multiple of `step` that is >= `amount` (top-up sizing: shortfall up to ZENDIT_MIN_TOPUP)."""
    _check_int("amount", amount)
    if _check_int("step", step) <= 0:
        raise MoneyError(f"step must be positive, got {step}")
    return -(-amount // step) * step
