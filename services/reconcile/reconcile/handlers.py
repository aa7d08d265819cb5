"""Reconcile's consumers: every order outcome is logged with its facts and counted; failures are kept.

They change no order. `order.failed` events and the observation copies of dead letters are written to
the failure history (`order_failures`, `dead_letter_events`) idempotently, so any redelivery is
harmless. An event for an order this database does not know is logged and counted, never retried or
dead-lettered (it would not become known by waiting).
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any

from faststream.rabbit.annotations import RabbitMessage

from esim_common.consumer import consume, consume_raw
from esim_common.events import Event, OrderDelivered, OrderFailed, OrderRefunded
from esim_common.logging import bind_transaction_id
from esim_common.order_repository import get_order
from esim_common.service import ServiceContext
from reconcile.dead_letters import DeadLetter
from reconcile.failure_history import observed_dead_letter_queues, record_of
from reconcile.history_repository import insert_dead_letter_event, insert_order_failure
from reconcile.metrics import dead_letters_total, order_outcome_events_total, unknown_order_events_total

# Failures no automation resolves: a refund that failed (money owed to the customer), an eSIM email that
# failed, a payment that could not be captured (money owed to the shop).
OPERATOR_STEPS: frozenset[str] = frozenset({"refund", "delivery", "capture"})

# A Postgres restart or failover takes seconds to minutes. The observer waits one out for about an hour
# (the 1 s and 3 s tiers, then every 10 s) before dead-lettering a copy to its own DLQ for a replay:
# retrying is safe (the insert is idempotent) and the DLQ keeps the message itself meanwhile.
DATABASE_OUTAGE_ATTEMPTS = 360

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
        await insert_order_failure(
            self._ctx.pool,
            event_id=event.event_id,
            transaction_id=event.transaction_id,
            step=event.step,
            reason=event.reason,
            occurred_at=event.occurred_at,
        )
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


class DeadLetterHistory:
    def __init__(self, ctx: ServiceContext) -> None:
        self._ctx = ctx
        self._observed = observed_dead_letter_queues(ctx.topology)
        # Every series at 0 from the start, so increase() sees the first dead letter after a restart.
        for queue in self._observed:
            dead_letters_total.labels(queue=queue)

    async def on_dead_letter(self, message: RabbitMessage) -> None:
        """A copy of a message some consumer dead-lettered (the DLQ keeps its own): recorded once in
        `dead_letter_events` and counted in `esim_dead_letters_total`."""
        raw = message.raw_message  # FastStream invents ids that are missing; the history must not
        letter = DeadLetter(
            message_id=raw.message_id,
            correlation_id=raw.correlation_id,
            routing_key=raw.routing_key,
            redelivered=bool(raw.redelivered),
            headers=dict(raw.headers or {}),
            body=raw.body,
        )
        record = record_of(letter, self._observed, received_at=datetime.now(UTC))
        if not await insert_dead_letter_event(self._ctx.pool, record):
            return  # this copy was recorded before: a redelivery
        dead_letters_total.labels(queue=record.queue).inc()
        with bind_transaction_id(record.transaction_id):
            log.warning(
                "dead letter recorded",
                extra={"queue": record.queue, "message_id": record.event_id, "error": record.error},
            )


def register(ctx: ServiceContext) -> OutcomeLog:
    outcomes = OutcomeLog(ctx)
    consume(
        ctx.broker, ctx.topology, "reconcile.order-delivered", OrderDelivered, outcomes.on_order_delivered
    )
    consume(ctx.broker, ctx.topology, "reconcile.order-failed", OrderFailed, outcomes.on_order_failed)
    consume(ctx.broker, ctx.topology, "reconcile.order-refunded", OrderRefunded, outcomes.on_order_refunded)
    consume_raw(
        ctx.broker,
        ctx.topology,
        "reconcile.dead-letters",
        DeadLetterHistory(ctx).on_dead_letter,
        database_outage_attempts=DATABASE_OUTAGE_ATTEMPTS,
    )
    return outcomes
