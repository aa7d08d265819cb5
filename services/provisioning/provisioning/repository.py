"""Provisioning's writes to an order: each state change together with the facts it records, atomically.

State changes go through `esim_common.orders.transition` (guarded, audited); facts through
`order_repository.record`. Each function here is one transaction, so a crash leaves the order either
before the step or after it, never with a new state but without its facts.
"""

from __future__ import annotations

import uuid

import asyncpg

from esim_common import outbox
from esim_common.events import AlertKind, OperatorAlert
from esim_common.order_repository import Order, get_order, record
from esim_common.order_states import OrderStatus
from esim_common.orders import transition
from provisioning.domain import QR_MISMATCH_REASON, current_zendit_id, zendit_transaction_id

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
RECORD_ZENDIT_STATUS = """
    UPDATE esim_purchases SET zendit_status = $3, updated_at = now()
     WHERE transaction_id = $1 AND status = 'purchasing' AND zendit_transaction_id = $2
"""


async def record_zendit_status(pool: asyncpg.Pool, transaction_id: str, zendit_id: str, status: str) -> None:
    """The current attempt's Zendit status as last seen, while the order still waits for it (a status
    that is not final yet, or a DONE that could not be delivered: what an operator is told)."""
    await pool.execute(RECORD_ZENDIT_STATUS, transaction_id, zendit_id, status)


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


async def mark_purchase_refused(conn: asyncpg.Connection, transaction_id: str, *, reason: str) -> Order:
    """purchasing → purchase_failed: Zendit refused the POST and a GET found no purchase (so there is
    no Zendit status to record). Like `mark_purchase_failed`, it is what makes the order refundable."""
    await transition(conn, transaction_id, S.PURCHASE_FAILED, failure_reason=reason)
    return await must_get(conn, transaction_id)


# ------------------------------------------------------------------------------ announcing once
# order.provisioned and operator alerts go through the outbox (`esim_common.outbox`): queued
# in the transaction of the state change they announce, published after the commit by whoever comes
# next (the delivery itself, a redelivery, a webhook hint, the failure path). Their event ids are
# derived from the order (alerts: from its current attempt's Zendit id), so every announcer names the
# same row and it is published once.

_ORDER_PROVISIONED_NAMESPACE = uuid.UUID("0b6f9d2e-4a51-4c3e-8f7a-2d9c1e5b7a43")


def order_provisioned_event_id(transaction_id: str) -> uuid.UUID:
    return uuid.uuid5(_ORDER_PROVISIONED_NAMESPACE, f"order.provisioned:{transaction_id}")


def needs_attention_alert(order: Order, reason: str) -> OperatorAlert:
    """The alert of an order provisioning handed to a person: one per purchase attempt (notify emails
    once per `alert_key`), so an order an operator re-drove that gets stuck again is told again."""
    key = f"needs_attention:{_zendit_id(order)}"
    return _operator_alert(order, reason, kind="needs_attention", alert_key=key)


def qr_mismatch_alert(order: Order) -> OperatorAlert:
    """ZENDIT_QR_CROSS_CHECK found Zendit's QR image reading as another string than the one delivered:
    the order is delivered, but a person should compare the two (one alert per purchase)."""
    key = f"qr_mismatch:{_zendit_id(order)}"
    return _operator_alert(order, QR_MISMATCH_REASON, kind="qr_mismatch", alert_key=key)


def _zendit_id(order: Order) -> str:
    return current_zendit_id(order.transaction_id, order.zendit_transaction_id, order.purchase_attempts)


def _operator_alert(order: Order, reason: str, *, kind: AlertKind, alert_key: str) -> OperatorAlert:
    # Facts are ids and statuses only: never activation data. The event id follows from the key, so
    # every worker and redelivery names the same outbox row.
    facts = {
        "zendit_transaction_id": _zendit_id(order),
        "purchase_attempts": str(order.purchase_attempts),
        "zendit_status": order.zendit_status or "unknown",
        "offer_id": order.offer_id,
    }
    return OperatorAlert(
        event_id=outbox.stable_event_id(alert_key),
        transaction_id=order.transaction_id,
        alert=kind,
        alert_key=alert_key,
        reason=reason[:200],
        facts={name: value for name, value in facts.items() if value},
    )


async def hold_for_operator(
    pool: asyncpg.Pool, transaction_id: str, *, reason: str
) -> tuple[bool, OperatorAlert | None]:
    """purchasing → needs_attention, with its operator alert queued in the same transaction.

    Returns (moved, alert). `moved` is False when the order was not purchasing (nothing changed).
    `alert` is the order's alert whenever the order is in needs_attention now — also when it was
    already — so the caller publishes it if that is still pending: a redelivery heals a lost publish.
    """
    async with pool.acquire() as conn, conn.transaction():
        order = await must_get(conn, transaction_id, lock=True)
        if order.status == S.NEEDS_ATTENTION:
            return False, needs_attention_alert(order, order.failure_reason or reason)
        if order.status != S.PURCHASING:
            return False, None
        await transition(conn, transaction_id, S.NEEDS_ATTENTION, failure_reason=reason)
        alert = needs_attention_alert(order, reason)
        await outbox.add(conn, alert)
        return True, alert
