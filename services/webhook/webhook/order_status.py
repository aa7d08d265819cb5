"""`GET /api/orders/{transactionId}?session_id=cs_...`: the order's progress, for the shop's success page.

The Checkout Session id is the capability: Stripe hands it to the customer's browser in the success
URL, and only someone holding it sees the order. A wrong session id and an unknown order get the same
404, so the endpoint cannot be used to find out which transaction ids exist.
"""

from __future__ import annotations

import hmac
import logging

from fastapi import APIRouter, HTTPException, Query

from esim_common.order_repository import Order, get_order
from esim_common.order_states import OrderStatus
from webhook.ports import PortsDep
from webhook.responses import api_errors
from webhook.schemas import OrderView
from webhook.unavailable import DEPENDENCY_UNAVAILABLE

log = logging.getLogger("esim.webhook.orders")

router = APIRouter(prefix="/api", tags=["orders"])

NOT_FOUND = "order not found"


def holds_session(order: Order, session_id: str | None) -> bool:
    """Whether `session_id` is the order's Checkout Session (compared in constant time)."""
    recorded = order.stripe_checkout_session_id
    return bool(session_id and recorded and hmac.compare_digest(recorded, session_id))


def public_view(order: Order) -> OrderView:
    delivered = order.status is OrderStatus.DELIVERED
    return OrderView(
        transaction_id=order.transaction_id,
        status=order.status.value,
        offer_id=order.offer_id,
        amount=order.price,
        currency=order.currency,
        created_at=order.created_at,
        updated_at=order.updated_at,
        paid_at=order.paid_at,
        delivered_at=order.emailed_at,
        refunded_at=order.refunded_at,
        qr_code_url=order.qr_code_url if delivered else None,
    )


@router.get(
    "/orders/{transaction_id}",
    responses=api_errors(
        e404="No such order, or the session_id does not match it.",
        e503="The database is unavailable; try again.",
    ),
)
async def order_status(
    transaction_id: str, ports: PortsDep, session_id: str | None = Query(default=None, max_length=255)
) -> OrderView:
    try:
        order = await get_order(ports.ctx.pool, transaction_id) if len(transaction_id) <= 64 else None
    except DEPENDENCY_UNAVAILABLE:
        log.warning("order status unavailable: the database is unreachable", exc_info=True)
        raise HTTPException(status_code=503, detail="temporarily unavailable; try again") from None
    if order is None or not holds_session(order, session_id):
        raise HTTPException(status_code=404, detail=NOT_FOUND)
    return public_view(order)
