"""Provisioning's writes to an order: each state change together with the facts it records, atomically.

State changes go through `esim_common.orders.transition` (guarded, audited); the facts recorded with
them through one `UPDATE ... RETURNING *` each, which also gives back the order as it is afterwards (one
round trip instead of a write and a read). Each state change commits with its facts in one transaction
(its own, or for the ends of an attempt the caller's, which holds the row lock), so a crash leaves the
order either before the step or after it, never with a new state but without its facts.
"""

from __future__ import annotations

import uuid

import asyncpg

from esim_common import outbox
from esim_common.events import AlertKind, OperatorAlert
from esim_common.order_repository import Order, get_order
from esim_common.order_states import OrderStatus
from esim_common.orders import transition
from provisioning.domain import QR_MISMATCH_REASON, current_zendit_id, zendit_transaction_id

S = OrderStatus

# The current attempt began when the order last entered `purchasing`; `purchased_at` keeps the first
# attempt's time (it is stamped once), so it is only the fallback. The database's clock measures it,
# the same clock that stamped it, so a skewed service host cannot shorten or stretch the deadline.
_ELAPSED = """
    EXTRACT(EPOCH FROM now() - COALESCE(
        (SELECT max(at) FROM order_transitions WHERE transaction_id = $1 AND to_status = 'purchasing'),
        o.purchased_at,
        o.updated_at))::float8
"""
ATTEMPT_ELAPSED_SECONDS = f"SELECT {_ELAPSED} FROM esim_purchases AS o WHERE o.transaction_id = $1"  # noqa: S608
# The order locked to settle its attempt, with the attempt's age (a metric): one round trip.
LOCK_FOR_SETTLING = f"""
    SELECT o.*, {_ELAPSED} AS attempt_elapsed_seconds
      FROM esim_purchases AS o WHERE o.transaction_id = $1 FOR UPDATE OF o
"""  # noqa: S608
# Each attempt's facts, set under the lock `start_attempt` holds; returns the order as it is then.
START_ATTEMPT_FACTS = """
    UPDATE esim_purchases
       SET zendit_transaction_id = $2, purchase_attempts = $3, zendit_status = NULL, updated_at = now()
     WHERE transaction_id = $1
 RETURNING *
"""


async def must_get(
    conn: asyncpg.Connection | asyncpg.Pool, transaction_id: str, *, lock: bool = False
) -> Order:
    order = await get_order(conn, transaction_id, lock=lock)
    if order is None:
        # order.funded is published after the order row is committed: a missing row is a bug (DLQ).
        raise LookupError(f"order {transaction_id} does not exist")
    return order


async def start_attempt(conn: asyncpg.Connection, transaction_id: str) -> tuple[Order, bool]:
    """funded → purchasing with the next attempt's Zendit id, under the row lock (its own transaction).

    Returns the order as it is afterwards and whether this call started the attempt; when another
    worker got there first (a duplicate message) the order is returned unchanged, with False, and the
    caller just follows its state.
    """
    async with conn.transaction():
        order = await must_get(conn, transaction_id, lock=True)
        if order.status != S.FUNDED:
            return order, False
        attempt = order.purchase_attempts + 1
        zendit_id = zendit_transaction_id(transaction_id, attempt)
        await transition(conn, transaction_id, S.PURCHASING, reason=f"zendit purchase {zendit_id}")
        # zendit_status is cleared: the previous attempt's FAILED says nothing about this one.
        return await _updated(conn, START_ATTEMPT_FACTS, transaction_id, zendit_id, attempt), True


async def attempt_elapsed_seconds(pool: asyncpg.Pool, transaction_id: str) -> float:
    """Seconds since the current purchase attempt started."""
    return _elapsed(transaction_id, await pool.fetchval(ATTEMPT_ELAPSED_SECONDS, transaction_id))


async def lock_for_settling(conn: asyncpg.Connection, transaction_id: str) -> tuple[Order, float]:
    """The order under its row lock (the caller's transaction), and seconds since its attempt started."""
    row = await conn.fetchrow(LOCK_FOR_SETTLING, transaction_id)
    if row is None:
        raise LookupError(f"order {transaction_id} does not exist")
    facts = dict(row)
    elapsed = _elapsed(transaction_id, facts.pop("attempt_elapsed_seconds"))
    return Order.model_validate(facts), elapsed


def _elapsed(transaction_id: str, seconds: float | None) -> float:
    if seconds is None:
        raise LookupError(f"order {transaction_id} does not exist")
    return float(seconds)


async def _updated(conn: asyncpg.Connection, update: str, transaction_id: str, *args: object) -> Order:
    """Run an `UPDATE ... RETURNING *` of one order: the order as it is afterwards, in one round trip."""
    row = await conn.fetchrow(update, transaction_id, *args)
    if row is None:
        raise LookupError(f"order {transaction_id} does not exist")
    return Order.model_validate(dict(row))


# Guarded: a poll that read IN_PROGRESS just before a webhook hint settled the purchase must not write
# its stale status over the settled order (or over a later attempt).
RECORD_ZENDIT_STATUS = """
    UPDATE esim_purchases SET zendit_status = $3, updated_at = now()
     WHERE transaction_id = $1 AND status = 'purchasing' AND zendit_transaction_id = $2
"""


# The same, and the attempt's age, in one round trip (the poll's wait). The age is read from the
# statement's snapshot, so it does not see the `updated_at` just written (only its last fallback reads it).
RECORD_ZENDIT_STATUS_AND_ELAPSED = f"""
    WITH recorded AS ({RECORD_ZENDIT_STATUS})
    SELECT {_ELAPSED} FROM esim_purchases AS o WHERE o.transaction_id = $1
"""  # noqa: S608


async def record_zendit_status(pool: asyncpg.Pool, transaction_id: str, zendit_id: str, status: str) -> bool:
    """The current attempt's Zendit status as last seen, while the order still waits for it (a status
    that is not final yet, or a DONE that could not be delivered: what an operator is told).

    False when nothing was recorded: the order is no longer purchasing with this Zendit id recorded."""
    result: str = await pool.execute(RECORD_ZENDIT_STATUS, transaction_id, zendit_id, status)
    return result == "UPDATE 1"


async def record_zendit_status_and_elapsed(
    pool: asyncpg.Pool, transaction_id: str, zendit_id: str, status: str
) -> float:
    """`record_zendit_status`, then `attempt_elapsed_seconds`, as one statement."""
    elapsed = await pool.fetchval(RECORD_ZENDIT_STATUS_AND_ELAPSED, transaction_id, zendit_id, status)
    return _elapsed(transaction_id, elapsed)


# The three ways an attempt ends. Each runs in the caller's transaction, which holds the order's row
# lock (`Provisioner._complete`): the decision and the change commit together. Each moves the order
# first and then records its facts with `RETURNING *`, which is the order as it is afterwards.
MARK_PROVISIONED_FACTS = """
    UPDATE esim_purchases
       SET zendit_status = 'DONE', qr_code_url = $2, iccid = $3, smdp_address = $4, activation_code = $5,
           updated_at = now()
     WHERE transaction_id = $1
 RETURNING *
"""
SET_ZENDIT_STATUS = """
    UPDATE esim_purchases SET zendit_status = $2, updated_at = now() WHERE transaction_id = $1 RETURNING *
"""


def _require_transaction(conn: asyncpg.Connection) -> None:
    if not conn.is_in_transaction():
        raise RuntimeError("an attempt ends inside the transaction that holds the order's row lock")


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
    _require_transaction(conn)
    await transition(conn, transaction_id, S.PROVISIONED, reason="qr code stored")
    return await _updated(
        conn,
        MARK_PROVISIONED_FACTS,
        transaction_id,
        qr_code_url,
        iccid or None,
        smdp_address or None,
        activation_code or None,
    )


async def send_back_to_funding(conn: asyncpg.Connection, transaction_id: str, *, reason: str) -> Order:
    """purchasing → funding after a purchase FAILED for lack of wallet funds."""
    _require_transaction(conn)
    await transition(conn, transaction_id, S.FUNDING, reason=reason)
    # Cleared, not "FAILED": funding reserves the cost of funded orders whose purchase has not been
    # authorised yet, and must do so for this order's next attempt too.
    return await _updated(conn, SET_ZENDIT_STATUS, transaction_id, None)


async def mark_purchase_failed(conn: asyncpg.Connection, transaction_id: str, *, reason: str) -> Order:
    """purchasing → purchase_failed: Zendit will not deliver. The refund is the failure path's job."""
    _require_transaction(conn)
    await transition(conn, transaction_id, S.PURCHASE_FAILED, failure_reason=reason)
    return await _updated(conn, SET_ZENDIT_STATUS, transaction_id, "FAILED")


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


# Without a lock: `published_at` is set only once the broker confirmed the publish and never cleared, so
# a row seen published stays so. Rows not (yet) published are left to `outbox.publish_pending`, which
# locks and looks again. (A helper for `esim_common.outbox`, kept here until it has one.)
OUTBOX_PUBLISHED = "SELECT event_id, published_at IS NOT NULL FROM outbox WHERE event_id = ANY($1::uuid[])"


async def outbox_published(pool: asyncpg.Pool, event_ids: list[uuid.UUID]) -> dict[uuid.UUID, bool]:
    """Whether each queued event was published; ids without an outbox row are left out."""
    rows = await pool.fetch(OUTBOX_PUBLISHED, event_ids)
    return {row[0]: row[1] for row in rows}


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
