"""Card numbers the emulator issues: Luhn-valid Visa test numbers starting 4000."""

from __future__ import annotations

import pytest

from esim_sandbox.stripe_emulator.ids import is_luhn_valid, luhn_check_digit, new_card_number, new_cvc


@pytest.mark.parametrize(
    "number", ["4242424242424242", "4000056655665556", "5555555555554444", "378282246310005"]
)
def test_known_test_card_numbers_pass_the_luhn_check(number: str) -> None:
    assert is_luhn_valid(number)


@pytest.mark.parametrize("number", ["4242424242424241", "4000056655665555", "1234", "42424242a4242424", ""])
def test_altered_or_malformed_numbers_fail_the_luhn_check(number: str) -> None:
    assert not is_luhn_valid(number)


def test_the_check_digit_completes_a_known_number() -> None:
    assert luhn_check_digit("424242424242424") == "2"


def test_issued_numbers_are_16_luhn_valid_digits_starting_4000() -> None:
    numbers = {new_card_number() for _ in range(200)}
    assert len(numbers) == 200
    assert all(n.startswith("4000") and len(n) == 16 and is_luhn_valid(n) for n in numbers)


def test_cvcs_are_three_digits() -> None:
    assert all(len(cvc) == 3 and cvc.isdigit() for cvc in (new_cvc() for _ in range(50)))
