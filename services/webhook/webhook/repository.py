"""The edge's own SQL: the Stripe webhook inbox, the order.paid outbox, and discarding a half-made order.

Orders themselves are created, read and recorded through `esim_common.order_repository`, and moved
through `esim_common.orders.transition`.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import asyncpg

from esim_common.events import OrderPaid
from esim_common.order_repository import Order
from esim_common.order_states import OrderStatus

# The Stripe webhook is the edge's hot path (bench/webhook_load.py): the statements below each do several
# things in one round trip, and every outbox lookup goes through its primary key (the order's order.paid
# id is derived from the transaction id), never a scan of a table that grows by one row per order.

INSERT_STRIPE_EVENT = """
    INSERT INTO stripe_events (event_id, type, transaction_id) VALUES ($1, $2, $3)
    ON CONFLICT (event_id) DO NOTHING
"""
# Records the event and locks its order in one statement (a data-modifying CTE always runs to
# completion, whether or not the order exists), saying whether the event was new. A concurrent delivery
# of the same event waits on the event's primary key, one of the same order on the order's row, until
# this transaction ends.
RECORD_EVENT_AND_LOCK_ORDER = """
    WITH recorded AS (
        INSERT INTO stripe_events (event_id, type, transaction_id) VALUES ($1, $2, $3)
        ON CONFLICT (event_id) DO NOTHING
        RETURNING 1
    )
    SELECT o.*, (SELECT count(*) FROM recorded) AS _first_delivery
      FROM esim_purchases AS o
     WHERE o.transaction_id = $3
       FOR UPDATE OF o
"""
# The outcome is written in the transaction that inserted the event, so a committed event always has
# one: `outcome IS NULL` means "inserted by this transaction", i.e. the first delivery of the event.
SET_FIRST_OUTCOME = """
    UPDATE stripe_events SET outcome = $2, processed_at = now() WHERE event_id = $1 AND outcome IS NULL
"""
# After the guarded transition to `paid`: the PaymentIntent, the order.paid outbox row and the event's
# outcome (on its first delivery), in one statement.
RECORD_PAYMENT = """
    WITH intent AS (
        UPDATE esim_purchases SET stripe_payment_intent_id = $2, updated_at = now() WHERE transaction_id = $1
    ), queued AS (
        INSERT INTO outbox (event_id, routing_key, transaction_id, payload) VALUES ($3, $4, $1, $5::jsonb)
        ON CONFLICT (event_id) DO NOTHING
    )
    UPDATE stripe_events SET outcome = $7, processed_at = now() WHERE event_id = $6 AND outcome IS NULL
"""

# Claims the order's unpublished order.paid: locks its outbox row and stamps it, but only while the order
# is `paid`. The caller publishes inside the same transaction and commits only once the broker
# confirmed, so a failed publish rolls the stamp back and a redelivery publishes. Two deliveries
# finishing at once (checkout.session.completed and payment_intent.succeeded arrive together) queue up
# on the row lock; the second re-reads the row after the first commits, finds it stamped, and claims
# nothing. A row whose order is no longer `paid` is returned unclaimed, so that it can be reported.
CLAIM_UNPUBLISHED = """
    WITH pending AS (
        SELECT o.event_id, o.payload, p.status
          FROM outbox AS o JOIN esim_purchases AS p ON p.transaction_id = o.transaction_id
         WHERE o.event_id = $1 AND o.published_at IS NULL
           FOR UPDATE OF o
    ), claimed AS (
        UPDATE outbox SET published_at = now()
          FROM pending
         WHERE outbox.event_id = pending.event_id AND pending.status = $2
        RETURNING outbox.event_id
    )
    SELECT pending.payload::text AS payload, pending.status, claimed.event_id IS NOT NULL AS claimed
      FROM pending LEFT JOIN claimed ON claimed.event_id = pending.event_id
"""
DELETE_UNPUBLISHED = "DELETE FROM outbox WHERE event_id = $1 AND published_at IS NULL"

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


async def record_event_and_lock_order(
    conn: asyncpg.Connection, event_id: str, event_type: str, transaction_id: str
) -> tuple[Order, bool] | None:
    """Insert the event into the inbox; its order, locked until the transaction ends, and whether this
    is the event's first delivery. None when there is no such order (the event is recorded anyway)."""
    row = await conn.fetchrow(RECORD_EVENT_AND_LOCK_ORDER, event_id, event_type, transaction_id)
    if row is None:
        return None
    columns = dict(row)
    first_delivery = bool(columns.pop("_first_delivery"))
    return Order.model_validate(columns), first_delivery


async def set_first_outcome(conn: asyncpg.Connection, event_id: str, outcome: str) -> bool:
    """Store what the event did, if this is its first delivery; True when it was."""
    status = await conn.execute(SET_FIRST_OUTCOME, event_id, outcome)
    return bool(status == "UPDATE 1")


async def record_payment(
    conn: asyncpg.Connection, event: OrderPaid, *, stripe_event_id: str, outcome: str
) -> None:
    """The paid order's PaymentIntent, its order.paid in the outbox, and the Stripe event's outcome."""
    await conn.execute(
        RECORD_PAYMENT,
        event.transaction_id,
        event.payment_intent_id,
        event.event_id,
        event.routing_key,
        event.model_dump_json(),
        stripe_event_id,
        outcome,
    )


@dataclass(frozen=True)
class Claim:
    """The order's unpublished order.paid; `claimed` is False when the order is no longer `paid`."""

    event: OrderPaid
    order_status: str
    claimed: bool


async def claim_unpublished_order_paid(conn: asyncpg.Connection, transaction_id: str) -> Claim | None:
    """Lock and stamp the order's unpublished order.paid (None when there is none); call inside a
    transaction that commits only after the event was published."""
    row = await conn.fetchrow(CLAIM_UNPUBLISHED, order_paid_event_id(transaction_id), OrderStatus.PAID.value)
    if row is None:
        return None
    return Claim(OrderPaid.model_validate_json(row["payload"]), row["status"], row["claimed"])


async def withdraw_unpublished_order_paid(conn: asyncpg.Connection, transaction_id: str) -> None:
    """An order held for review must not be announced paid by a publish still pending."""
    await conn.execute(DELETE_UNPUBLISHED, order_paid_event_id(transaction_id))


async def discard_unpayable_order(conn: asyncpg.Connection | asyncpg.Pool, transaction_id: str) -> bool:
    """Delete an order whose Checkout Session could not be made. True if a row was deleted."""
    status = await conn.execute(DELETE_UNPAYABLE_ORDER, transaction_id)
    return bool(status == "DELETE 1")
