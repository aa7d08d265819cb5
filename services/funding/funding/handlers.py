"""The funding service's subscribers: order.paid → (top-up) → order.funded, or refund on failure; and, in
manual capture mode, order.delivered → capture the authorised payment (capture.py).

What the handler raises decides the message's fate (esim_common.consumer): a Zendit/Stripe/gateway
outage retries through the tiers with the same idempotency keys; a declined top-up, an unknown offer or
a currency mismatch takes the failure path at once; a short wallet in prefunded mode checks again later.
"""

from __future__ import annotations

import logging

from esim_common.compensation import fail_and_refund
from esim_common.consumer import consume
from esim_common.events import OrderDelivered, OrderPaid
from esim_common.order_states import OrderStatus, sources_of
from esim_common.orders import IllegalTransition
from esim_common.providers.stripe import StripeGateway
from esim_common.service import ServiceContext
from funding.capture import CapturePayment
from funding.fund_order import FundOrder

log = logging.getLogger("esim.funding")

QUEUE = "funding.order-paid"
CAPTURE_QUEUE = "funding.order-delivered"


def register(
    ctx: ServiceContext, *, fund_order: FundOrder, stripe: StripeGateway, capture: CapturePayment
) -> None:
    async def on_order_paid(event: OrderPaid) -> None:
        """Make sure the Zendit wallet can pay for the order (topping it up when short), then publish
        order.funded."""
        await fund_order(event)

    async def on_funding_failed(event: OrderPaid, reason: str) -> None:
        await funding_failed(ctx, fund_order, stripe, event, reason)

    consume(ctx.broker, ctx.topology, QUEUE, OrderPaid, on_order_paid, on_failure=on_funding_failed)
    consume(
        ctx.broker,
        ctx.topology,
        CAPTURE_QUEUE,
        OrderDelivered,
        capture.on_order_delivered,
        on_failure=capture.on_capture_failed,
    )


async def funding_failed(
    ctx: ServiceContext, fund_order: FundOrder, stripe: StripeGateway, event: OrderPaid, reason: str
) -> None:
    """Funding failed for good: close its top-ups, then refund the customer once and announce it.

    Unless another order's decision funded it meanwhile (a batch funds every waiting order the money
    pays for, without this order's lock): then it is not refunded, and this delivery, the last of the
    order's order.paid, makes sure its order.funded goes out if it is still funded (the batch's own
    publish may have been lost); one provisioning has moved on since needs nothing from it."""
    await fund_order.give_up(event.transaction_id, reason)
    try:
        status = await fail_and_refund(
            pool=ctx.pool,
            stripe=stripe,
            publisher=ctx.publisher,
            transaction_id=event.transaction_id,
            failed_state=OrderStatus.TOPUP_FAILED,
            step="funding",
            reason=reason,
        )
    except IllegalTransition as exc:  # funded between the refund's look at the order and its move
        if exc.current is None or exc.current in sources_of(OrderStatus.TOPUP_FAILED):
            raise  # it could fail from there: not a race we know, let the retry look again
        # Funded by a batch, and maybe moved on by provisioning since (purchasing, provisioned, ...):
        # nothing to refund, and nothing to retry.
        log.info("not refunded: the order left funding meanwhile", extra={"status": exc.current.value})
        status = exc.current
    if status == OrderStatus.FUNDED:
        await fund_order.announce(event.transaction_id)
