"""The edge's own SQL: the Stripe webhook inbox, the order.paid outbox, and discarding a half-made order.

Orders themselves are created, read and recorded through `esim_common.order_repository`, and moved
through `esim_common.orders.transition`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import asyncpg

from esim_common.events import OrderPaid

INSERT_STRIPE_EVENT = """
    INSERT INTO stripe_events (event_id, type, transaction_id) VALUES ($1, $2, $3)
    ON CONFLICT (event_id) DO NOTHING
"""
SET_STRIPE_EVENT_OUTCOME = """
    UPDATE stripe_events SET outcome = $2, processed_at = now() WHERE event_id = $1
"""

INSERT_OUTBOX = """
    INSERT INTO outbox (event_id, routing_key, transaction_id, payload) VALUES ($1, $2, $3, $4::jsonb)
    ON CONFLICT (event_id) DO NOTHING
"""
# FOR UPDATE: two deliveries finishing at once (checkout.session.completed and payment_intent.succeeded
# arrive together) queue up here; the second re-reads the row after the first commits, sees
# published_at set, and publishes nothing.
SELECT_UNPUBLISHED = """
    SELECT event_id, payload::text AS payload FROM outbox
     WHERE transaction_id = $1 AND routing_key = $2 AND published_at IS NULL
     ORDER BY created_at
       FOR UPDATE
"""
MARK_PUBLISHED = "UPDATE outbox SET published_at = now() WHERE event_id = $1"
DELETE_UNPUBLISHED = """
    DELETE FROM outbox WHERE transaction_id = $1 AND routing_key = $2 AND published_at IS NULL
"""

# Only an order nobody can pay yet: no Checkout Session recorded, still pending_payment.
DELETE_UNPAYABLE_ORDER = """
    DELETE FROM esim_purchases
     WHERE transaction_id = $1 AND status = 'pending_payment' AND stripe_checkout_session_id IS NULL
"""

# One order.paid per order, ever: its event id is derived from the transaction id, so a second insert
# for the same order (which the guarded transition already prevents) is a no-op, and a consumer that
# sees the message twice sees the same message_id.
_ORDER_PAID_NAMESPACE = uuid.UUID("5f0c3a52-6c2e-4d8e-9a53-3f9b8f0d7e11")


def order_paid_event_id(transaction_id: str) -> uuid.UUID:
    return uuid.uuid5(_ORDER_PAID_NAMESPACE, f"order.paid:{transaction_id}")


async def record_stripe_event(
    conn: asyncpg.Connection, event_id: str, event_type: str, transaction_id: str | None
) -> bool:
    """Insert the event into the inbox; False when this event id was recorded before (a redelivery)."""
    status = await conn.execute(INSERT_STRIPE_EVENT, event_id, event_type, transaction_id)
    return bool(status == "INSERT 0 1")


async def set_stripe_event_outcome(conn: asyncpg.Connection, event_id: str, outcome: str) -> None:
    await conn.execute(SET_STRIPE_EVENT_OUTCOME, event_id, outcome)


async def add_to_outbox(conn: asyncpg.Connection, event: OrderPaid) -> None:
    await conn.execute(
        INSERT_OUTBOX, event.event_id, event.routing_key, event.transaction_id, event.model_dump_json()
    )


@dataclass(frozen=True)
class PendingEvent:
    event_id: uuid.UUID
    event: OrderPaid


async def unpublished_order_paid(conn: asyncpg.Connection, transaction_id: str) -> list[PendingEvent]:
    """The order's unpublished order.paid (at most one), locked until the caller's transaction ends."""
    rows = await conn.fetch(SELECT_UNPUBLISHED, transaction_id, OrderPaid.routing_key)
    return [PendingEvent(row["event_id"], OrderPaid.model_validate_json(row["payload"])) for row in rows]


async def mark_published(conn: asyncpg.Connection, event_id: uuid.UUID) -> None:
    await conn.execute(MARK_PUBLISHED, event_id)


async def withdraw_unpublished_order_paid(conn: asyncpg.Connection, transaction_id: str) -> None:
    """An order held for review must not be announced paid by a publish still pending."""
    await conn.execute(DELETE_UNPUBLISHED, transaction_id, OrderPaid.routing_key)


async def discard_unpayable_order(conn: asyncpg.Connection | asyncpg.Pool, transaction_id: str) -> bool:
    """Delete an order whose Checkout Session could not be made. True if a row was deleted."""
    status = await conn.execute(DELETE_UNPAYABLE_ORDER, transaction_id)
    return bool(status == "DELETE 1")
