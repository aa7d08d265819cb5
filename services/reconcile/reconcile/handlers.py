"""Reconcile's consumers: every order outcome is logged with its facts and counted.

They change nothing, so any redelivery is harmless, and an event for an order this database does not
know is logged and counted, never retried or dead-lettered (it would not become known by waiting).
"""

from __future__ import annotations

import logging
from typing import Any

from esim_common.consumer import consume
from esim_common.events import Event, OrderDelivered, OrderFailed, OrderRefunded
from esim_common.order_repository import get_order
from esim_common.service import ServiceContext
from reconcile.metrics import order_outcome_events_total, unknown_order_events_total

# Failures no automation resolves: a refund that failed (money owed to the customer), an eSIM email that
# failed, a payment that could not be captured (money owed to the shop).
OPERATOR_STEPS: frozenset[str] = frozenset({"refund", "delivery", "capture"})

log = logging.getLogger("esim.reconcile")


class OutcomeLog:
    def __init__(self, ctx: ServiceContext) -> None:
        self._ctx = ctx

    async def on_order_delivered(self, event: OrderDelivered) -> None:
        """An eSIM reached its customer."""
        await self._record(event, "order delivered")

    async def on_order_failed(self, event: OrderFailed) -> None:
        """An order failed for good; a failed refund, email or capture is an operator's job (notify emails
        them), so it is logged as an error."""
        level = logging.ERROR if event.step in OPERATOR_STEPS else logging.WARNING
        await self._record(event, "order failed", level=level, step=event.step, reason=event.reason)

    async def on_order_refunded(self, event: OrderRefunded) -> None:
        """A customer got their money back."""
        await self._record(
            event,
            "order refunded",
            refund_id=event.refund_id,
            amount=event.amount.amount,
            currency=event.amount.currency,
        )

    async def _record(self, event: Event, what: str, *, level: int = logging.INFO, **facts: Any) -> None:
        order = await get_order(self._ctx.pool, event.transaction_id)
        step = str(facts.get("step", "none"))
        order_outcome_events_total.labels(event=event.routing_key, step=step).inc()
        if order is None:
            unknown_order_events_total.labels(event=event.routing_key).inc()
            log.warning(f"{what}: unknown order", extra={"event_id": str(event.event_id), **facts})
            return
        log.log(
            level,
            what,
            extra={
                "event_id": str(event.event_id),
                "status": order.status.value,
                "offer_id": order.offer_id,
                **facts,
            },
        )


def register(ctx: ServiceContext) -> OutcomeLog:
    outcomes = OutcomeLog(ctx)
    consume(
        ctx.broker, ctx.topology, "reconcile.order-delivered", OrderDelivered, outcomes.on_order_delivered
    )
    consume(ctx.broker, ctx.topology, "reconcile.order-failed", OrderFailed, outcomes.on_order_failed)
    consume(ctx.broker, ctx.topology, "reconcile.order-refunded", OrderRefunded, outcomes.on_order_refunded)
    return outcomes
