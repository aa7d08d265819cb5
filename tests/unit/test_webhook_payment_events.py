"""What a Stripe event means for an order: read from the event, decided without I/O."""

from __future__ import annotations

import pytest

from esim_common.money import Money
from esim_common.order_states import OrderStatus
from webhook.domain import (
    Action,
    NotAPayment,
    PaymentFailed,
    PaymentSucceeded,
    decide,
    read_payment_event,
)

TXN = "txn_0123456789abcdef01234567"
PRICE = Money(999, "USD")


def session(**fields):
    base = {
        "id": "cs_test_1",
        "object": "checkout.session",
        "client_reference_id": TXN,
        "metadata": {"transaction_id": TXN},
        "payment_status": "paid",
        "amount_total": 999,
        "currency": "usd",
        "payment_intent": "pi_1",
    }
    return {**base, **fields}


def intent(**fields):
    base = {
        "id": "pi_1",
        "object": "payment_intent",
        "metadata": {"transaction_id": TXN},
        "status": "succeeded",
        "amount": 999,
        "amount_received": 999,
        "amount_capturable": 0,
        "currency": "usd",
    }
    return {**base, **fields}


def test_a_paid_checkout_session_is_a_payment_of_its_total():
    fact = read_payment_event("checkout.session.completed", session())
    assert fact == PaymentSucceeded(TXN, Money(999, "USD"), "pi_1")


def test_an_async_payment_success_is_a_payment():
    fact = read_payment_event("checkout.session.async_payment_succeeded", session())
    assert isinstance(fact, PaymentSucceeded) and fact.amount == PRICE


def test_the_transaction_id_falls_back_to_client_reference_id():
    fact = read_payment_event("checkout.session.completed", session(metadata={}))
    assert isinstance(fact, PaymentSucceeded) and fact.transaction_id == TXN


def test_an_expanded_payment_intent_on_a_session_gives_its_id():
    fact = read_payment_event("checkout.session.completed", session(payment_intent={"id": "pi_9"}))
    assert isinstance(fact, PaymentSucceeded) and fact.payment_intent_id == "pi_9"


def test_an_unpaid_completed_session_is_not_a_payment():
    fact = read_payment_event("checkout.session.completed", session(payment_status="unpaid"))
    assert fact == NotAPayment(TXN, "session_not_paid")


def test_a_succeeded_payment_intent_is_a_payment_of_the_amount_received():
    fact = read_payment_event("payment_intent.succeeded", intent(amount_received=500))
    assert fact == PaymentSucceeded(TXN, Money(500, "USD"), "pi_1")


def test_an_authorised_manual_capture_intent_counts_as_paid_for_its_capturable_amount():
    authorised = intent(status="requires_capture", amount_received=0, amount_capturable=999)
    fact = read_payment_event("payment_intent.amount_capturable_updated", authorised)
    assert fact == PaymentSucceeded(TXN, Money(999, "USD"), "pi_1")


def test_a_capturable_update_that_is_not_awaiting_capture_is_not_a_payment():
    fact = read_payment_event("payment_intent.amount_capturable_updated", intent(status="processing"))
    assert isinstance(fact, NotAPayment)


def test_an_async_payment_failure_is_a_failed_payment():
    assert read_payment_event("checkout.session.async_payment_failed", session()) == PaymentFailed(TXN)


def test_an_expired_session_fails_the_order_but_a_declined_card_inside_checkout_does_not():
    expired = read_payment_event("checkout.session.expired", session(payment_status="unpaid"))
    assert expired == PaymentFailed(TXN, "checkout_session_expired")
    declined = read_payment_event("payment_intent.payment_failed", intent(status="requires_payment_method"))
    assert declined == NotAPayment(TXN, "payment_attempt_failed")


def test_other_event_types_and_foreign_objects_are_not_payments():
    assert read_payment_event("charge.succeeded", intent()) == NotAPayment(TXN, "ignored_type")
    foreign = intent(metadata={})
    assert read_payment_event("payment_intent.succeeded", foreign) == NotAPayment(None, "not_ours")
    assert read_payment_event("issuing_card.created", {"id": "ic_1"}) == NotAPayment(None, "not_ours")


def test_an_unreadable_amount_or_currency_never_matches_an_order():
    fact = read_payment_event("payment_intent.succeeded", intent(currency="dollars"))
    assert isinstance(fact, PaymentSucceeded) and fact.amount is None
    assert decide(OrderStatus.PENDING_PAYMENT, PRICE, fact).action is Action.HOLD


def paid(amount=PRICE, payment_intent_id="pi_1"):
    return PaymentSucceeded(TXN, amount, payment_intent_id)


def test_a_matching_payment_marks_a_pending_order_paid():
    assert decide(OrderStatus.PENDING_PAYMENT, PRICE, paid()).action is Action.MARK_PAID


@pytest.mark.parametrize(
    "status",
    [OrderStatus.PAID, OrderStatus.FUNDING, OrderStatus.PURCHASING, OrderStatus.DELIVERED],
)
def test_a_matching_payment_for_an_order_already_past_payment_changes_nothing(status):
    decision = decide(status, PRICE, paid())
    assert decision.action is Action.NOTHING and decision.outcome == "already_paid"


@pytest.mark.parametrize("amount", [Money(998, "USD"), Money(1000, "USD"), Money(999, "EUR")])
def test_a_payment_that_differs_in_amount_or_currency_holds_the_order(amount):
    decision = decide(OrderStatus.PENDING_PAYMENT, PRICE, paid(amount))
    assert decision.action is Action.HOLD and decision.outcome == "amount_mismatch"


def test_a_mismatching_payment_after_the_order_was_paid_still_holds_it_before_funding():
    assert decide(OrderStatus.PAID, PRICE, paid(Money(1, "USD"))).action is Action.HOLD


def test_a_mismatch_once_fulfilment_has_started_is_only_reported():
    decision = decide(OrderStatus.FUNDING, PRICE, paid(Money(1, "USD")))
    assert decision.action is Action.NOTHING and decision.outcome == "amount_mismatch_too_late"


def test_a_payment_without_a_payment_intent_waits_for_the_intent_event():
    decision = decide(OrderStatus.PENDING_PAYMENT, PRICE, paid(payment_intent_id=None))
    assert decision.action is Action.NOTHING and decision.outcome == "no_payment_intent"


def test_money_arriving_for_a_failed_payment_is_reported_for_an_operator():
    assert decide(OrderStatus.PAYMENT_FAILED, PRICE, paid()).outcome == "paid_after_failure"


def test_an_async_failure_fails_only_a_pending_order():
    assert decide(OrderStatus.PENDING_PAYMENT, PRICE, PaymentFailed(TXN)).action is Action.MARK_PAYMENT_FAILED
    assert decide(OrderStatus.PAID, PRICE, PaymentFailed(TXN)).action is Action.NOTHING
