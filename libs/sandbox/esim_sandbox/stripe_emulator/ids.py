"""Identifiers, clock and card-number generation."""

from __future__ import annotations

import secrets
import string
import time

_ALPHABET = string.ascii_letters + string.digits
# Stripe test-mode object ids are a prefix plus 24 base62 characters (Checkout Sessions use 58).
ID_LENGTH = 24
CHECKOUT_SESSION_ID_LENGTH = 58
# The Issuing BIN the emulator hands out: Visa test cards start 4000.
CARD_NUMBER_PREFIX = "4000"
CARD_NUMBER_LENGTH = 16


def new_id(prefix: str, length: int = ID_LENGTH) -> str:
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(length))


def now() -> int:
    return int(time.time())


def luhn_check_digit(partial: str) -> str:
    """The digit that makes `partial + digit` pass the Luhn check."""
    total = 0
    # Walking right to left, every second digit of the *final* number is doubled; the check digit
    # itself is position 0, so the partial number's rightmost digit is doubled.
    for position, char in enumerate(reversed(partial)):
        digit = int(char)
        if position % 2 == 0:
            digit *= 2
            if digit > 9:
                digit -= 9
        total += digit
    return str((10 - total % 10) % 10)


def is_luhn_valid(number: str) -> bool:
    return number.isdigit() and len(number) > 1 and luhn_check_digit(number[:-1]) == number[-1]


def new_card_number() -> str:
    body_length = CARD_NUMBER_LENGTH - len(CARD_NUMBER_PREFIX) - 1
    partial = CARD_NUMBER_PREFIX + "".join(secrets.choice(string.digits) for _ in range(body_length))
    return partial + luhn_check_digit(partial)


def new_cvc() -> str:
    return "".join(secrets.choice(string.digits) for _ in range(3))
