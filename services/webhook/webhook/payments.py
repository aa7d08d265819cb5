"""Applying a verified Stripe event to its order, and announcing the payment exactly once.

One database transaction per delivery: the event goes into the `stripe_events` inbox, the order is
locked, `domain.decide` says what the payment means for it, the order moves (guarded), and a paid order
gets its `OrderPaid` written to the `outbox` table — all committed together or not at all.

After the commit the order's unpublished `OrderPaid` is published (confirmed by the broker) and stamped
`published_at`. Whichever delivery gets there first publishes; a duplicate event, or the second of
checkout.session.completed / payment_intent.succeeded, finds it stamped and publishes nothing. If the
publish fails the stamp is not written and the delivery answers 5xx: Stripe redelivers, the order is
already `paid` (nothing changes twice), and the redelivery publishes the still-unstamped event. The
outbox row, not "is the order in state paid", is what says whether order.paid went out: that is what
keeps it to exactly one message, even when both events race each other.
"""

from __future__ import annotations

import logging

import asyncpg

from esim_common.events import OrderPaid
from esim_common.logging import bind_transaction_id
from esim_common.order_repository import Order, get_order, record
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
    with bind_transaction_id(fact.transaction_id):
        async with pool.acquire() as conn, conn.transaction():
            first_time = await repository.record_stripe_event(conn, event.id, event.type, fact.transaction_id)
            outcome = fact.reason if isinstance(fact, NotAPayment) else await _apply(conn, fact)
            if first_time:  # the inbox keeps what the event did when it first arrived
                await repository.set_stripe_event_outcome(conn, event.id, outcome)
        log_event = log.error if outcome in ALERT_OUTCOMES else log.info
        details = {"event_id": event.id, "event_type": event.type, "outcome": outcome}
        log_event("stripe event processed", extra={**details, "redelivery": not first_time})
        if fact.transaction_id is not None:
            await publish_order_paid(pool, publisher, fact.transaction_id)
    return outcome


async def _apply(conn: asyncpg.Connection, fact: PaymentSucceeded | PaymentFailed) -> str:
    order = await get_order(conn, fact.transaction_id, lock=True)
    if order is None:
        # Not an order of this deployment (another shop on the same Stripe account, a test mode
        # session): acknowledged and ignored, never retried.
        return "unknown_order"
    decision = decide(order.status, order.price_money, fact)
    if decision.action is Action.MARK_PAID:
        assert isinstance(fact, PaymentSucceeded) and fact.payment_intent_id is not None
        await _mark_paid(conn, order, fact.payment_intent_id)
    elif decision.action is Action.HOLD:
        assert isinstance(fact, PaymentSucceeded)
        await _hold(conn, order, fact)
    elif decision.action is Action.MARK_PAYMENT_FAILED:
        await transition(
            conn, order.transaction_id, OrderStatus.PAYMENT_FAILED, failure_reason="async_payment_failed"
        )
    return decision.outcome


async def _mark_paid(conn: asyncpg.Connection, order: Order, payment_intent_id: str) -> None:
    txn = order.transaction_id
    await transition(conn, txn, OrderStatus.PAID, reason="stripe_payment_succeeded")
    await record(conn, txn, stripe_payment_intent_id=payment_intent_id)
    await repository.add_to_outbox(
        conn,
        OrderPaid(
            event_id=repository.order_paid_event_id(txn),
            transaction_id=txn,
            offer_id=order.offer_id,
            price=order.price_money,
            payment_intent_id=payment_intent_id,
        ),
    )


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


async def publish_order_paid(pool: asyncpg.Pool, publisher: EventPublisher, transaction_id: str) -> int:
    """Publish the order's unpublished OrderPaid while the order is `paid`; returns how many went out."""
    async with pool.acquire() as conn, conn.transaction():
        pending = await repository.unpublished_order_paid(conn, transaction_id)
        if not pending:
            return 0
        order = await get_order(conn, transaction_id)
        if order is None or order.status is not OrderStatus.PAID:
            log.warning(
                "unpublished order.paid left alone: the order is no longer paid",
                extra={"status": order.status.value if order else None},
            )
            return 0
        for item in pending:
            await publisher.publish(item.event)
            await repository.mark_published(conn, item.event_id)
    log.info("order.paid published", extra={"offer_id": order.offer_id})
    return len(pending)
