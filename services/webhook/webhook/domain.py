"""The edge's business rules, pure: the selling price of an offer, and what a Stripe event means for an order.

Nothing here does I/O, so every rule is a plain function a unit test can call:

    selling_price(cost, suggested, policy)   → Money, or PricingRefused
    read_payment_event(type, data_object)    → PaymentSucceeded | PaymentFailed | NotAPayment
    decide(status, price, fact)              → Decision (what to do with the order, and the outcome)
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from esim_common.money import Money, MoneyError
from esim_common.order_states import OrderStatus
from esim_common.settings import PricingRule

# Our transaction ids become Zendit transaction ids (`<txn>-r2` on a retry), and Zendit documents
# alphanumerics: `txn_` and 24 hex characters (96 random bits) keep them short, safe and unguessable.
TRANSACTION_ID_PREFIX = "txn_"
TRANSACTION_ID_RE = re.compile(r"^txn_[0-9a-f]{24}$")


# ------------------------------------------------------------------------------------------- pricing


class PricingRefused(Exception):
    """The offer cannot be sold at a price that covers its cost and our minimum margin."""


@dataclass(frozen=True)
class PricingPolicy:
    """How an offer is priced (PRICING_RULE, PRICING_MARKUP_PERCENT, PRICING_MIN_MARGIN).

    `markup_percent` on top of cost (always under COST_PLUS_MARKUP; under SUGGESTED_RETAIL only when
    Zendit suggests no retail price in the cost's currency); `min_margin` in minor units, either way.
    """

    markup_percent: int
    min_margin: int
    rule: PricingRule = PricingRule.SUGGESTED_RETAIL

    def __post_init__(self) -> None:
        if self.markup_percent < 0 or self.min_margin < 0:
            raise ValueError("markup_percent and min_margin must not be negative")


def selling_price(cost: Money, suggested: Money | None, policy: PricingPolicy) -> Money:
    """What the customer pays for an offer costing us `cost`.

    Under SUGGESTED_RETAIL: Zendit's suggested retail price when it gives one in the cost's currency;
    otherwise (and always under COST_PLUS_MARKUP) cost plus `markup_percent`, rounded UP to a whole
    minor unit (integer arithmetic: never a float, and the rounding always favours the margin).
    Refused when the price exceeds the cost by less than `min_margin`, whichever way it was computed.
    """
    retail = suggested if policy.rule is PricingRule.SUGGESTED_RETAIL else None
    if retail is not None and retail.currency == cost.currency:
        price = retail
    else:
        price = Money(-(-cost.amount * (100 + policy.markup_percent) // 100), cost.currency)
    margin = price.amount - cost.amount
    if margin < policy.min_margin:
        minimum = Money(policy.min_margin, cost.currency)
        raise PricingRefused(
            f"price {price} leaves a margin of {Money(margin, cost.currency)} over the cost {cost}; "
            f"at least {minimum} is required"
        )
    return price


# ------------------------------------------------------------------------------- Stripe payment events

# Event types that say the customer's money is ours (or, in manual-capture mode, authorised for us).
PAID_SESSION_EVENTS = frozenset({"checkout.session.completed", "checkout.session.async_payment_succeeded"})
PAYMENT_INTENT_SUCCEEDED = "payment_intent.succeeded"
PAYMENT_INTENT_AUTHORISED = "payment_intent.amount_capturable_updated"
ASYNC_PAYMENT_FAILED = "checkout.session.async_payment_failed"
# The customer never paid within the session's lifetime (24 h by default): nobody can pay this order now.
SESSION_EXPIRED = "checkout.session.expired"
# A declined card inside Checkout: the customer may still pay with another card, so the order waits.
PAYMENT_ATTEMPT_FAILED = "payment_intent.payment_failed"


@dataclass(frozen=True)
class PaymentSucceeded:
    """The customer paid (or authorised) `amount` for the order `transaction_id`."""

    transaction_id: str
    amount: Money | None  # None: Stripe sent an amount/currency we cannot read (never matches an order)
    payment_intent_id: str | None


@dataclass(frozen=True)
class PaymentFailed:
    """The order will never be paid through its session: a delayed method failed, or it expired."""

    transaction_id: str
    reason: str = "async_payment_failed"


@dataclass(frozen=True)
class NotAPayment:
    """Nothing to do with an order's payment (another event type, or a session still unpaid)."""

    transaction_id: str | None
    reason: str


PaymentFact = PaymentSucceeded | PaymentFailed | NotAPayment


def transaction_id_of(data_object: dict[str, Any]) -> str | None:
    """Our transaction id: metadata of sessions and PaymentIntents, or a session's client_reference_id."""
    metadata = data_object.get("metadata")
    candidates = [metadata.get("transaction_id") if isinstance(metadata, dict) else None]
    candidates.append(data_object.get("client_reference_id"))
    for candidate in candidates:
        if isinstance(candidate, str) and 0 < len(candidate) <= 64:
            return candidate
    return None


def _money(amount: object, currency: object) -> Money | None:
    if not isinstance(amount, int) or isinstance(amount, bool) or not isinstance(currency, str):
        return None
    try:
        return Money(amount, currency.upper())
    except MoneyError:
        return None


def _id_of(value: object) -> str | None:
    """An expandable field: the id, or the expanded object's id."""
    if isinstance(value, str) and value:
        return value
    if isinstance(value, dict) and isinstance(value.get("id"), str):
        return str(value["id"])
    return None


def read_payment_event(event_type: str, data_object: dict[str, Any]) -> PaymentFact:
    """What a (verified) Stripe event says about an order's payment."""
    txn = transaction_id_of(data_object)
    if txn is None:
        return NotAPayment(None, "not_ours")
    currency = data_object.get("currency")
    if event_type in PAID_SESSION_EVENTS:
        if data_object.get("payment_status") != "paid":
            # Manual capture (authorised only) or a delayed method still settling: the PaymentIntent's
            # own event, or async_payment_succeeded, says when it is paid.
            return NotAPayment(txn, "session_not_paid")
        amount = _money(data_object.get("amount_total"), currency)
        return PaymentSucceeded(txn, amount, _id_of(data_object.get("payment_intent")))
    if event_type == PAYMENT_INTENT_SUCCEEDED:
        amount = _money(data_object.get("amount_received"), currency)
        return PaymentSucceeded(txn, amount, _id_of(data_object.get("id")))
    if event_type == PAYMENT_INTENT_AUTHORISED:
        if data_object.get("status") != "requires_capture":
            return NotAPayment(txn, "not_authorised")
        amount = _money(data_object.get("amount_capturable"), currency)
        return PaymentSucceeded(txn, amount, _id_of(data_object.get("id")))
    if event_type == ASYNC_PAYMENT_FAILED:
        return PaymentFailed(txn, "async_payment_failed")
    if event_type == SESSION_EXPIRED:
        return PaymentFailed(txn, "checkout_session_expired")
    if event_type == PAYMENT_ATTEMPT_FAILED:
        return NotAPayment(txn, "payment_attempt_failed")
    return NotAPayment(txn, "ignored_type")


class Action(StrEnum):
    MARK_PAID = "mark_paid"  # pending_payment → paid, record the PaymentIntent, announce order.paid
    HOLD = "hold"  # → needs_attention: the payment does not match the order; never fulfil it
    MARK_PAYMENT_FAILED = "mark_payment_failed"  # pending_payment → payment_failed
    NOTHING = "nothing"


@dataclass(frozen=True)
class Decision:
    action: Action
    outcome: str  # stored on the stripe_events row and counted: a short, bounded code


# States in which a mismatching payment can still stop fulfilment. Later, other services own the order;
# yanking it from under them would break their state machines, so the mismatch is only reported.
_HOLDABLE = frozenset({OrderStatus.PENDING_PAYMENT, OrderStatus.PAID})


def decide(status: OrderStatus, order_price: Money, fact: PaymentSucceeded | PaymentFailed) -> Decision:
    """What a payment fact means for an order in `status` priced `order_price`.

    Idempotent by construction: a fact the order has already absorbed (a duplicate event, or the second
    of checkout.session.completed / payment_intent.succeeded) decides NOTHING.
    """
    if isinstance(fact, PaymentFailed):
        if status is OrderStatus.PENDING_PAYMENT:
            return Decision(Action.MARK_PAYMENT_FAILED, "payment_failed")
        return Decision(Action.NOTHING, "payment_failed_ignored")
    if fact.amount != order_price:
        if status in _HOLDABLE:
            return Decision(Action.HOLD, "amount_mismatch")
        if status is OrderStatus.NEEDS_ATTENTION:
            return Decision(Action.NOTHING, "amount_mismatch")
        return Decision(Action.NOTHING, "amount_mismatch_too_late")
    if status is OrderStatus.PENDING_PAYMENT:
        if fact.payment_intent_id is None:
            # OrderPaid needs the PaymentIntent (refunds, capture); its own event will bring it.
            return Decision(Action.NOTHING, "no_payment_intent")
        return Decision(Action.MARK_PAID, "order_paid")
    if status is OrderStatus.PAYMENT_FAILED:
        # Money arrived for an order we gave up on: an operator must refund or fulfil it by hand.
        return Decision(Action.NOTHING, "paid_after_failure")
    return Decision(Action.NOTHING, "already_paid")
