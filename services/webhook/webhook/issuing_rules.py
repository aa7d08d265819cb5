"""Whether to approve a Stripe Issuing authorisation: pure rules over what Stripe asks and what we recorded.

Stripe asks our real-time endpoint about an authorisation on one of our cards after its own checks (card
status, spending limits, Issuing balance) have passed. The only charge we ever mean to allow is the top-up
gateway charging the single-use card of a wallet top-up that the funding service has handed to it, for
exactly that top-up's amount and currency. Everything else is declined, with one reason from `Reason`.

Why `submitted` and not also `card_created`: the funding service commits `submitted` before it reads the
card's number and hands it to the gateway (`funding.topups`, phase `_mark_submitted`), so a legitimate
charge always finds the top-up `submitted`. A charge on a `card_created` card means someone has the number
before we gave it out, which is exactly what this endpoint is here to stop. A closed top-up (succeeded,
declined, failed) has had its one charge or has been given up: a later charge is never ours.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from typing import Any

# `wallet_topups.status` values (owned by the funding service; repeated here because services share no
# code but `esim_common`). Only this one may be charged, see the module docstring.
CHARGEABLE_TOPUP_STATUS = "submitted"
CLOSED_TOPUP_STATUSES = frozenset({"succeeded", "declined", "failed"})

_CURRENCY_LENGTH = 3


class Reason(StrEnum):
    """Why we approved or declined: a bounded set (a metric label, and metadata on the authorisation)."""

    TOPUP_MATCH = "topup_match"  # the one approval
    MALFORMED_REQUEST = "malformed_request"  # no card id, amount or currency we can read
    UNKNOWN_CARD = "unknown_card"  # not a card we created (or not recorded yet)
    CARD_INACTIVE = "card_inactive"  # we cancelled it
    TOPUP_NOT_SUBMITTED = "topup_not_submitted"  # the card was never handed to the gateway
    TOPUP_CLOSED = "topup_closed"  # its top-up already ended (succeeded, declined, failed)
    AMOUNT_MISMATCH = "amount_mismatch"
    CURRENCY_MISMATCH = "currency_mismatch"
    LOOKUP_TIMEOUT = "lookup_timeout"  # the database did not answer in time: decline rather than guess
    LOOKUP_FAILED = "lookup_failed"  # the database (or our query) failed


@dataclass(frozen=True)
class AuthorizationRequest:
    """What Stripe asks: `pending_request` of an `issuing_authorization.request` event's object."""

    authorization_id: str
    card_id: str
    amount: int  # in the card's currency, minor units
    currency: str  # upper case
    merchant_amount: int | None  # in the merchant's currency; equal to the above for a same-currency charge
    merchant_currency: str | None
    merchant_name: str | None  # for the log line only


@dataclass(frozen=True)
class CardOnRecord:
    """Our `issuing_cards` row for the card, with its top-up's status and money."""

    active: bool
    topup_id: str
    topup_status: str
    topup_amount: int
    topup_currency: str  # upper case


@dataclass(frozen=True)
class Verdict:
    approved: bool
    reason: Reason


def read_authorization_request(data_object: dict[str, Any]) -> AuthorizationRequest | None:
    """The facts of an `issuing_authorization.request`, or None when they cannot be read."""
    authorization_id = data_object.get("id")
    card = data_object.get("card")
    # Stripe sends the card expanded (an issuing.card object); accept a bare id as well.
    card_id = card.get("id") if isinstance(card, dict) else card
    pending = data_object.get("pending_request")
    if not (isinstance(authorization_id, str) and isinstance(card_id, str) and card_id):
        return None
    if not isinstance(pending, dict):
        return None
    amount, currency = _amount(pending.get("amount")), _currency(pending.get("currency"))
    if amount is None or currency is None:
        return None
    merchant = data_object.get("merchant_data")
    merchant_name = merchant.get("name") if isinstance(merchant, dict) else None
    return AuthorizationRequest(
        authorization_id=authorization_id,
        card_id=card_id,
        amount=amount,
        currency=currency,
        merchant_amount=_amount(pending.get("merchant_amount")),
        merchant_currency=_currency(pending.get("merchant_currency")),
        merchant_name=merchant_name if isinstance(merchant_name, str) else None,
    )


def decide(request: AuthorizationRequest, card: CardOnRecord | None) -> Verdict:
    """Approve only the top-up gateway's charge of a handed-over card, for exactly the top-up's money."""
    if card is None:
        return Verdict(False, Reason.UNKNOWN_CARD)
    if not card.active:
        return Verdict(False, Reason.CARD_INACTIVE)
    if card.topup_status != CHARGEABLE_TOPUP_STATUS:
        closed = card.topup_status in CLOSED_TOPUP_STATUSES
        return Verdict(False, Reason.TOPUP_CLOSED if closed else Reason.TOPUP_NOT_SUBMITTED)
    # Both views of the charge must be the top-up's money: a merchant-currency amount that Stripe
    # converted into the card's currency would credit the wallet something else than we asked for.
    merchant_currency = request.merchant_currency or request.currency
    merchant_amount = request.amount if request.merchant_amount is None else request.merchant_amount
    if not request.currency == merchant_currency == card.topup_currency:
        return Verdict(False, Reason.CURRENCY_MISMATCH)
    if not request.amount == merchant_amount == card.topup_amount:
        return Verdict(False, Reason.AMOUNT_MISMATCH)
    return Verdict(True, Reason.TOPUP_MATCH)


def _amount(value: object) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _currency(value: object) -> str | None:
    if isinstance(value, str) and len(value) == _CURRENCY_LENGTH and value.isascii() and value.isalpha():
        return value.upper()
    return None
