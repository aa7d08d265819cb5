"""Applying a verified Stripe event to its order, and announcing the payment exactly once.

One database transaction per delivery records the event in the `stripe_events` inbox, locks the order,
asks `domain.decide` what the payment means for it, moves the order (guarded) and, for a paid order,
writes its `OrderPaid` to the `outbox` table — all committed together or not at all.

The order's unpublished `OrderPaid` is then *claimed* (its outbox row locked and stamped
`published_at`), published (confirmed by the broker), and the claim committed. A failed publish rolls
the stamp back and the delivery answers 5xx: Stripe redelivers, the order is already `paid` (nothing
changes twice), and the redelivery claims and publishes the still-unstamped event. Deliveries that race
each other (a duplicate, or checkout.session.completed and payment_intent.succeeded together) queue up
on the row lock and find it stamped. The outbox row, not "is the order in state paid", is what says
whether order.paid went out: that is what keeps it to exactly one message. One window remains, inherent
to "commit after confirm": if the stamp's commit fails after the broker confirmed (the database drops
at that instant, the process dies), the delivery answers 5xx and the redelivery publishes again — the
same `message_id`, which every consumer absorbs (they are idempotent per order).

The delivery that marks the order paid claims in a second transaction, after its commit, so that a
consumer of order.paid always finds the order paid. Every other delivery claims inside its own (single)
transaction: a leftover unpublished event belongs to an order whose payment was committed earlier.

Round trips are counted here (this is the edge's hot path, see bench/): one connection per delivery,
statements that do several things (`repository`), and no read that the lock did not already return.
"""

from __future__ import annotations

import logging

import asyncpg

from esim_common.events import OrderPaid
from esim_common.logging import bind_transaction_id
from esim_common.order_repository import Order, record
from esim_common.order_states import OrderStatus
from esim_common.orders import transition
from esim_common.providers.stripe import WebhookEvent
from esim_common.publisher import EventPublisher
from webhook import repository
from webhook.domain import (
    Action,
    NotAPayment,
    PaymentFailed,
    PaymentSucceeded,
    decide,
    read_payment_event,
)

log = logging.getLogger("esim.webhook.payments")

# Outcomes where money and order disagree and nothing automatic can fix it: an operator must look.
ALERT_OUTCOMES = frozenset({"amount_mismatch", "amount_mismatch_too_late", "paid_after_failure"})


async def process_event(pool: asyncpg.Pool, publisher: EventPublisher, event: WebhookEvent) -> str:
    """Record `event`, apply it to its order, publish what must be published; returns the outcome.

    Raises on a database or broker failure (the caller answers 5xx so that Stripe retries).
    """
    data = event.data_object if isinstance(event.data_object, dict) else {}
    fact = read_payment_event(event.type, data)
    txn = fact.transaction_id
    with bind_transaction_id(txn):
        published = False
        async with pool.acquire() as conn:
            async with conn.transaction():
                outcome, first_time, paid_now = await _record_and_apply(conn, event, fact)
                if txn is not None and not paid_now:
                    published = await _publish_claimed(conn, publisher, txn)
            if txn is not None and paid_now:  # committed: whoever consumes order.paid finds the order paid
                async with conn.transaction():
                    published = await _publish_claimed(conn, publisher, txn)
        # One line per delivery, once it succeeded (a failure is logged by the route, which answers 5xx;
        # alert outcomes never publish, so they cannot fail after being recorded).
        log_event = log.error if outcome in ALERT_OUTCOMES else log.info
        details = {"event_id": event.id, "event_type": event.type, "outcome": outcome}
        log_event(
            "stripe event processed",
            extra={**details, "redelivery": not first_time, "order_paid_published": published},
        )
    return outcome


async def _record_and_apply(
    conn: asyncpg.Connection, event: WebhookEvent, fact: PaymentSucceeded | PaymentFailed | NotAPayment
) -> tuple[str, bool, bool]:
    """Inside the delivery's transaction: (outcome, first delivery of the event, order marked paid now)."""
    if isinstance(fact, NotAPayment):
        await repository.record_stripe_event(conn, event.id, event.type, fact.transaction_id)
        return fact.reason, await repository.set_first_outcome(conn, event.id, fact.reason), False
    locked = await repository.record_event_and_lock_order(conn, event.id, event.type, fact.transaction_id)
    if locked is None:
        # Not an order of this deployment (another shop on the same Stripe account, a test mode
        # session): acknowledged and ignored, never retried.
        return "unknown_order", await repository.set_first_outcome(conn, event.id, "unknown_order"), False
    order, first_time = locked
    decision = decide(order.status, order.price_money, fact)
    if decision.action is Action.MARK_PAID:
        assert isinstance(fact, PaymentSucceeded) and fact.payment_intent_id is not None
        await _mark_paid(conn, order, fact.payment_intent_id, event.id, decision.outcome)
        return decision.outcome, first_time, True
    if decision.action is Action.HOLD:
        assert isinstance(fact, PaymentSucceeded)
        await _hold(conn, order, fact)
    elif decision.action is Action.MARK_PAYMENT_FAILED:
        assert isinstance(fact, PaymentFailed)
        await transition(conn, order.transaction_id, OrderStatus.PAYMENT_FAILED, failure_reason=fact.reason)
    if first_time:  # the inbox keeps what the event did when it first arrived
        await repository.set_first_outcome(conn, event.id, decision.outcome)
    return decision.outcome, first_time, False


async def _mark_paid(
    conn: asyncpg.Connection, order: Order, payment_intent_id: str, stripe_event_id: str, outcome: str
) -> None:
    """pending_payment → paid, with its PaymentIntent, its order.paid in the outbox and the event's
    outcome."""
    txn = order.transaction_id
    await transition(conn, txn, OrderStatus.PAID, reason="stripe_payment_succeeded")
    order_paid = OrderPaid(
        event_id=repository.order_paid_event_id(txn),
        transaction_id=txn,
        offer_id=order.offer_id,
        price=order.price_money,
        payment_intent_id=payment_intent_id,
    )
    await repository.record_payment(conn, order_paid, stripe_event_id=stripe_event_id, outcome=outcome)


async def _hold(conn: asyncpg.Connection, order: Order, fact: PaymentSucceeded) -> None:
    """The payment does not match the order: park it for an operator, and never announce it paid."""
    txn = order.transaction_id
    if order.stripe_payment_intent_id is None and fact.payment_intent_id is not None:
        await record(conn, txn, stripe_payment_intent_id=fact.payment_intent_id)  # for the refund
    await transition(conn, txn, OrderStatus.NEEDS_ATTENTION, failure_reason="payment_amount_mismatch")
    await repository.withdraw_unpublished_order_paid(conn, txn)
    log.error(
        "payment does not match the order",
        extra={"paid": str(fact.amount) if fact.amount else None, "price": str(order.price_money)},
    )


async def _publish_claimed(conn: asyncpg.Connection, publisher: EventPublisher, transaction_id: str) -> bool:
    """Inside the caller's transaction: claim the order's unpublished OrderPaid and publish it; the
    caller's commit makes the stamp durable, an exception rolls it back. True if one went out."""
    claim = await repository.claim_unpublished_order_paid(conn, transaction_id)
    if claim is None:
        return False
    if not claim.claimed:
        log.warning(
            "unpublished order.paid left alone: the order is no longer paid",
            extra={"status": claim.order_status},
        )
        return False
    await publisher.publish(claim.event)
    return True
