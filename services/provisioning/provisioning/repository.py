"""Provisioning's writes to an order: each state change together with the facts it records, atomically.

State changes go through `esim_common.orders.transition` (guarded, audited); facts through
`order_repository.record`. Each function here is one transaction, so a crash leaves the order either
before the step or after it, never with a new state but without its facts.
"""

from __future__ import annotations

import uuid

import asyncpg

from esim_common.events import OrderProvisioned
from esim_common.order_repository import Order, get_order, record
from esim_common.order_states import OrderStatus
from esim_common.orders import transition
from provisioning.domain import zendit_transaction_id

S = OrderStatus

# The current attempt began when the order last entered `purchasing`; `purchased_at` keeps the first
# attempt's time (it is stamped once), so it is only the fallback. The database's clock measures it,
# the same clock that stamped it, so a skewed service host cannot shorten or stretch the deadline.
ATTEMPT_ELAPSED_SECONDS = """
    SELECT EXTRACT(EPOCH FROM now() - COALESCE(
               (SELECT max(at) FROM order_transitions WHERE transaction_id = $1 AND to_status = 'purchasing'),
               o.purchased_at,
               o.updated_at))::float8
      FROM esim_purchases AS o
     WHERE o.transaction_id = $1
"""


async def must_get(
    conn: asyncpg.Connection | asyncpg.Pool, transaction_id: str, *, lock: bool = False
) -> Order:
    order = await get_order(conn, transaction_id, lock=lock)
    if order is None:
        # order.funded is published after the order row is committed: a missing row is a bug (DLQ).
        raise LookupError(f"order {transaction_id} does not exist")
    return order


async def start_attempt(pool: asyncpg.Pool, transaction_id: str) -> Order:
    """funded → purchasing with the next attempt's Zendit id, under the row lock.

    Returns the order as it is afterwards; when another worker got there first (a duplicate message)
    the order is returned unchanged and the caller just follows its state.
    """
    async with pool.acquire() as conn, conn.transaction():
        order = await must_get(conn, transaction_id, lock=True)
        if order.status != S.FUNDED:
            return order
        attempt = order.purchase_attempts + 1
        zendit_id = zendit_transaction_id(transaction_id, attempt)
        await transition(conn, transaction_id, S.PURCHASING, reason=f"zendit purchase {zendit_id}")
        # zendit_status is cleared: the previous attempt's FAILED says nothing about this one.
        await record(
            conn,
            transaction_id,
            zendit_transaction_id=zendit_id,
            purchase_attempts=attempt,
            zendit_status=None,
        )
        return await must_get(conn, transaction_id)


async def attempt_elapsed_seconds(pool: asyncpg.Pool, transaction_id: str) -> float:
    """Seconds since the current purchase attempt started."""
    elapsed = await pool.fetchval(ATTEMPT_ELAPSED_SECONDS, transaction_id)
    if elapsed is None:
        raise LookupError(f"order {transaction_id} does not exist")
    return float(elapsed)


# Guarded: a poll that read IN_PROGRESS just before a webhook hint settled the purchase must not write
# its stale status over the settled order (or over a later attempt).
RECORD_PENDING_STATUS = """
    UPDATE esim_purchases SET zendit_status = $3, updated_at = now()
     WHERE transaction_id = $1 AND status = 'purchasing' AND zendit_transaction_id = $2
"""


async def record_pending_status(pool: asyncpg.Pool, transaction_id: str, zendit_id: str, status: str) -> None:
    """The current attempt's not-yet-final Zendit status, while the order still waits for it."""
    await pool.execute(RECORD_PENDING_STATUS, transaction_id, zendit_id, status)


# The three ways an attempt ends. Each takes the connection of the caller's transaction, which holds
# the order's row lock (`Provisioner._complete`): the decision and the change commit together.


async def mark_provisioned(
    conn: asyncpg.Connection,
    transaction_id: str,
    *,
    qr_code_url: str,
    iccid: str,
    smdp_address: str,
    activation_code: str,
) -> Order:
    """purchasing → provisioned with the QR URL and the activation facts the email needs."""
    async with conn.transaction():
        await record(
            conn,
            transaction_id,
            zendit_status="DONE",
            qr_code_url=qr_code_url,
            iccid=iccid or None,
            smdp_address=smdp_address or None,
            activation_code=activation_code or None,
        )
        await transition(conn, transaction_id, S.PROVISIONED, reason="qr code stored")
        return await must_get(conn, transaction_id)


async def send_back_to_funding(conn: asyncpg.Connection, transaction_id: str, *, reason: str) -> Order:
    """purchasing → funding after a purchase FAILED for lack of wallet funds."""
    async with conn.transaction():
        # Cleared, not "FAILED": funding reserves the cost of funded orders whose purchase has not been
        # authorised yet, and must do so for this order's next attempt too.
        await record(conn, transaction_id, zendit_status=None)
        await transition(conn, transaction_id, S.FUNDING, reason=reason)
        return await must_get(conn, transaction_id)


async def mark_purchase_failed(conn: asyncpg.Connection, transaction_id: str, *, reason: str) -> Order:
    """purchasing → purchase_failed: Zendit will not deliver. The refund is the failure path's job."""
    async with conn.transaction():
        await record(conn, transaction_id, zendit_status="FAILED")
        await transition(conn, transaction_id, S.PURCHASE_FAILED, failure_reason=reason)
        return await must_get(conn, transaction_id)


# ------------------------------------------------------------------------------ announcing once
# order.provisioned goes through the `outbox` table: the row (one per order, its event id derived
# from the order) is stamped `published_at` in the transaction that holds it locked while the broker
# confirms the publish. So a second announcer — a redelivered message, or the scheduled poll coming
# back after a webhook hint already delivered the order — finds it stamped and publishes nothing,
# while a publish lost to a crash or a broker error (row not stamped) is published by the next one.

_ORDER_PROVISIONED_NAMESPACE = uuid.UUID("0b6f9d2e-4a51-4c3e-8f7a-2d9c1e5b7a43")

INSERT_ANNOUNCEMENT = """
    INSERT INTO outbox (event_id, routing_key, transaction_id, payload) VALUES ($1, $2, $3, $4::jsonb)
    ON CONFLICT (event_id) DO NOTHING
"""
SELECT_UNPUBLISHED_ANNOUNCEMENT = """
    SELECT payload::text FROM outbox WHERE event_id = $1 AND published_at IS NULL FOR UPDATE
"""
MARK_ANNOUNCED = "UPDATE outbox SET published_at = now() WHERE event_id = $1"


def order_provisioned_event_id(transaction_id: str) -> uuid.UUID:
    return uuid.uuid5(_ORDER_PROVISIONED_NAMESPACE, f"order.provisioned:{transaction_id}")


async def add_announcement(conn: asyncpg.Connection, event: OrderProvisioned) -> None:
    """Queue `event` (idempotent: the first version written is the one published)."""
    await conn.execute(
        INSERT_ANNOUNCEMENT, event.event_id, event.routing_key, event.transaction_id, event.model_dump_json()
    )


async def unpublished_announcement(conn: asyncpg.Connection, event_id: uuid.UUID) -> OrderProvisioned | None:
    """The queued event if nobody has published it yet, locked until the caller's transaction ends."""
    payload = await conn.fetchval(SELECT_UNPUBLISHED_ANNOUNCEMENT, event_id)
    return OrderProvisioned.model_validate_json(payload) if payload is not None else None


async def mark_announced(conn: asyncpg.Connection, event_id: uuid.UUID) -> None:
    await conn.execute(MARK_ANNOUNCED, event_id)


async def hold_for_operator(pool: asyncpg.Pool, transaction_id: str, *, reason: str) -> bool:
    """purchasing → needs_attention; False when the order is no longer purchasing (nothing changed)."""
    async with pool.acquire() as conn, conn.transaction():
        order = await must_get(conn, transaction_id, lock=True)
        if order.status != S.PURCHASING:
            return False
        await transition(conn, transaction_id, S.NEEDS_ATTENTION, failure_reason=reason)
        return True
