"""The failure policy: a step failed for good, so the customer gets their money back, exactly once.

    <step>_failed ─► refund_pending ─► refunded        ─► order.refunded + order.failed (customer email)
                          │
                          └─ refund refused ─► needs_attention ─► order.failed(step=refund) (operator)

`fail_and_refund` is resumable: every call moves the order as far as it can from wherever it is, so a
redelivered message, a restarted worker or the reconciler can call it again safely. The Stripe call
carries the idempotency key `refund:{txn}` (or `cancel:{txn}` for an uncaptured payment in manual
capture mode), so a repeat returns the first refund instead of making a second one. An order that was
already provisioned or delivered is never refunded here.
"""

from __future__ import annotations

import logging

import asyncpg

from esim_common import metrics
from esim_common.events import FailedStep, OrderFailed, OrderRefunded
from esim_common.money import Money
from esim_common.order_repository import Order, get_order, record
from esim_common.order_states import OrderStatus, sources_of
from esim_common.orders import transition
from esim_common.providers.stripe import StripeGateway, StripePermanentError
from esim_common.publisher import EventPublisher

log = logging.getLogger("esim.compensation")

S = OrderStatus
# `refund_status` of a manual-capture order whose authorisation was released instead of refunded.
RELEASED = "canceled"
AFTER_FAILURE = frozenset({S.REFUND_PENDING, S.REFUNDED, S.NEEDS_ATTENTION})


async def fail_and_refund(
    *,
    pool: asyncpg.Pool,
    stripe: StripeGateway,
    publisher: EventPublisher,
    transaction_id: str,
    failed_state: OrderStatus,
    step: FailedStep,
    reason: str,
) -> OrderStatus:
    """Move the order to `failed_state`, refund it once, announce it. Returns the state it ends in."""
    order = await get_order(pool, transaction_id)
    if order is None:
        raise LookupError(f"order {transaction_id} does not exist")
    if order.status in sources_of(failed_state):
        async with pool.acquire() as conn:
            await transition(conn, transaction_id, failed_state, failure_reason=reason)
    elif order.status != failed_state and order.status not in AFTER_FAILURE:
        log.warning(
            "not refunding: the order is past the failed step",
            extra={"status": order.status.value, "failed_state": failed_state.value, "reason": reason},
        )
        return order.status

    order = await _reload(pool, transaction_id)
    if order.status == failed_state:
        async with pool.acquire() as conn:
            await transition(conn, transaction_id, S.REFUND_PENDING)
        order = await _reload(pool, transaction_id)

    if order.status == S.REFUND_PENDING:
        order = await _give_money_back(pool, stripe, order, step)

    reason_now = order.failure_reason or reason
    if order.status == S.REFUNDED:
        await publisher.publish(
            OrderRefunded(
                transaction_id=transaction_id,
                refund_id=order.refund_id or "",
                amount=Money(order.price, order.currency),
            )
        )
        await publisher.publish(
            OrderFailed(transaction_id=transaction_id, step=step, reason=reason_now[:200])
        )
    elif order.status == S.NEEDS_ATTENTION:
        await publisher.publish(
            OrderFailed(transaction_id=transaction_id, step="refund", reason=reason_now[:200])
        )
    return order.status


async def _give_money_back(
    pool: asyncpg.Pool, stripe: StripeGateway, order: Order, step: FailedStep
) -> Order:
    """Refund (or cancel the uncaptured payment); a refusal leaves the order for an operator."""
    txn = order.transaction_id
    if not order.stripe_payment_intent_id:
        return await _needs_attention(pool, txn, "refund_failed: the order has no PaymentIntent")
    try:
        if order.capture_method == "manual":
            intent = await stripe.retrieve_payment_intent(order.stripe_payment_intent_id)
            if intent.status == "requires_capture":
                await stripe.cancel_payment_intent(transaction_id=txn, payment_intent_id=intent.id)
            if intent.status in ("requires_capture", "canceled"):
                # Canceled already: by us before a crash, or its authorisation lapsed. Either way the
                # customer was never charged, and a refund of it would be refused. There is no refund
                # id to keep: refund_status `canceled` says the hold was released (notify tells the
                # customer they were not charged; reconcile does not count it as a Stripe refund), and
                # order.refunded carries an empty refund_id.
                await record(pool, txn, refund_status=RELEASED)
                return await _refunded(pool, txn, step)
        refund = await stripe.create_refund(
            transaction_id=txn, payment_intent_id=order.stripe_payment_intent_id, amount=order.price
        )
    except StripePermanentError as exc:
        # StripeTransientError propagates: the consumer retries, and the same key replays.
        return await _needs_attention(pool, txn, f"refund_failed: {exc.reason}")
    await record(pool, txn, refund_id=refund.id, refund_status=refund.status)
    if refund.status in ("failed", "canceled"):
        return await _needs_attention(pool, txn, f"refund_failed: refund {refund.status}")
    return await _refunded(pool, txn, step)


async def _refunded(pool: asyncpg.Pool, transaction_id: str, step: FailedStep) -> Order:
    async with pool.acquire() as conn:
        moved = await transition(conn, transaction_id, S.REFUNDED)
    # Counted by the one run whose move took the order to refunded: a redelivery, or a second run racing
    # this one on the same order, gets the same refund back (same key) but moves nothing.
    if moved.changed:
        metrics.refunds_total.labels(step=step).inc()
        log.info("order refunded")
    return await _reload(pool, transaction_id)


async def _needs_attention(pool: asyncpg.Pool, transaction_id: str, reason: str) -> Order:
    async with pool.acquire() as conn:
        await transition(conn, transaction_id, S.NEEDS_ATTENTION, failure_reason=reason)
    log.error("refund failed: the order needs an operator", extra={"reason": reason})
    return await _reload(pool, transaction_id)


async def _reload(pool: asyncpg.Pool, transaction_id: str) -> Order:
    order = await get_order(pool, transaction_id)
    assert order is not None  # it existed a moment ago and orders are never deleted
    return order
