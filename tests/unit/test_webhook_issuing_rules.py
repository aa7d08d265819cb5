"""The real-time Issuing authorisation rules: approve only the gateway's charge of a handed-over top-up card,
for exactly its money; read Stripe's authorisation object defensively."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from webhook.issuing_rules import (
    AuthorizationRequest,
    CardOnRecord,
    Reason,
    Verdict,
    decide,
    read_authorization_request,
)

CARD = CardOnRecord(
    active=True, topup_id="tu_txn_1", topup_status="submitted", topup_amount=5000, topup_currency="USD"
)
ASKED = AuthorizationRequest(
    authorization_id="iauth_1",
    card_id="ic_1",
    amount=5000,
    currency="USD",
    merchant_amount=5000,
    merchant_currency="USD",
    merchant_name="Zendit",
)


def asked(**changes: Any) -> AuthorizationRequest:
    return dataclasses.replace(ASKED, **changes)


def card(**changes: Any) -> CardOnRecord:
    return dataclasses.replace(CARD, **changes)


# ---------------------------------------------------------------------------------------------- decide


def test_the_gateway_charging_a_submitted_topup_card_for_its_exact_money_is_approved():
    assert decide(ASKED, CARD) == Verdict(True, Reason.TOPUP_MATCH)


def test_without_the_merchant_view_the_card_currency_amount_decides():
    assert decide(asked(merchant_amount=None, merchant_currency=None), CARD).approved


def test_a_card_we_did_not_create_is_declined():
    assert decide(ASKED, None) == Verdict(False, Reason.UNKNOWN_CARD)


def test_a_card_we_cancelled_is_declined_even_for_the_right_money():
    assert decide(ASKED, card(active=False)) == Verdict(False, Reason.CARD_INACTIVE)


@pytest.mark.parametrize("status", ["succeeded", "declined", "failed"])
def test_a_card_whose_topup_has_ended_is_declined(status: str):
    assert decide(ASKED, card(topup_status=status)) == Verdict(False, Reason.TOPUP_CLOSED)


@pytest.mark.parametrize("status", ["pending", "card_created"])
def test_a_card_not_yet_handed_to_the_gateway_is_declined(status: str):
    # funding commits `submitted` before it reveals the number: a charge before that is not the gateway's.
    assert decide(ASKED, card(topup_status=status)) == Verdict(False, Reason.TOPUP_NOT_SUBMITTED)


@pytest.mark.parametrize(
    "changes",
    [
        {"amount": 4999, "merchant_amount": 4999},  # less: the wallet would get less than we sized
        {"amount": 5001, "merchant_amount": 5001},
        {"amount": 0, "merchant_amount": 0},  # a zero-amount verification is not the top-up
        {"merchant_amount": 4600},  # converted from another amount in the merchant's currency
    ],
)
def test_any_other_amount_is_declined(changes: dict[str, Any]):
    assert decide(asked(**changes), CARD) == Verdict(False, Reason.AMOUNT_MISMATCH)


@pytest.mark.parametrize(
    "changes",
    [
        {"currency": "EUR", "merchant_currency": "EUR"},
        {"merchant_currency": "EUR"},  # the merchant charged euros, Stripe converted them
    ],
)
def test_any_other_currency_is_declined(changes: dict[str, Any]):
    assert decide(asked(**changes), CARD) == Verdict(False, Reason.CURRENCY_MISMATCH)


def test_the_card_state_is_checked_before_the_money():
    # A cancelled card of an ended top-up, charged the wrong amount: the first reason that applies wins,
    # and it says the most about what happened.
    assert (
        decide(asked(amount=1), card(active=False, topup_status="succeeded")).reason == Reason.CARD_INACTIVE
    )


# --------------------------------------------------------------------------- read_authorization_request


def stripe_authorization(**changes: Any) -> dict[str, Any]:
    """The fields we read, shaped as Stripe sends them in `issuing_authorization.request`."""
    data: dict[str, Any] = {
        "id": "iauth_1",
        "object": "issuing.authorization",
        "amount": 0,
        "approved": False,
        "card": {"id": "ic_1", "object": "issuing.card", "last4": "4242", "metadata": {"topup_id": "tu_1"}},
        "currency": "usd",
        "merchant_data": {"name": "Zendit", "category": "miscellaneous_general_services"},
        "pending_request": {
            "amount": 5000,
            "currency": "usd",
            "is_amount_controllable": False,
            "merchant_amount": 5000,
            "merchant_currency": "usd",
        },
        "status": "pending",
    }
    data.update(changes)
    return data


def test_an_authorization_request_is_read_from_its_pending_request_and_expanded_card():
    assert read_authorization_request(stripe_authorization()) == ASKED


def test_a_card_given_as_a_bare_id_is_read_too():
    read = read_authorization_request(stripe_authorization(card="ic_9"))
    assert read is not None and read.card_id == "ic_9"


def test_missing_merchant_fields_are_left_empty():
    pending = {"amount": 5000, "currency": "usd"}
    read = read_authorization_request(stripe_authorization(pending_request=pending, merchant_data=None))
    assert read == asked(merchant_amount=None, merchant_currency=None, merchant_name=None)


@pytest.mark.parametrize(
    "changes",
    [
        {"pending_request": None},  # an authorisation that is not asking for anything
        {"card": None},
        {"card": {"object": "issuing.card"}},
        {"id": None},
        {"pending_request": {"amount": "5000", "currency": "usd"}},
        {"pending_request": {"amount": True, "currency": "usd"}},
        {"pending_request": {"amount": -5, "currency": "usd"}},
        {"pending_request": {"amount": 5000, "currency": "us"}},
        {"pending_request": {"amount": 5000}},
    ],
)
def test_an_unreadable_request_yields_nothing(changes: dict[str, Any]):
    assert read_authorization_request(stripe_authorization(**changes)) is None
