"""Reconcile's reads: named SQL, typed rows. It never writes an order (state changes are the pipeline's)."""

from __future__ import annotations

from datetime import datetime

import asyncpg
from pydantic import BaseModel, ConfigDict

from esim_common.order_states import OrderStatus
from reconcile.domain import FAILED_STATES, FAILED_TOPUP_STATUSES, IN_FLIGHT_STATES, UNFINISHED_STATES

# `timed`: delivered orders with both timestamps, the ones time-to-eSIM can be measured on.
BUSINESS_FIGURES = """
    SELECT count(*) FILTER (WHERE status = 'delivered') AS delivered,
           count(*) FILTER (WHERE status = ANY($1::text[])) AS failed,
           count(*) FILTER (WHERE status = 'refunded' AND refund_id IS NOT NULL) AS refunds_issued,
           count(*) FILTER (WHERE timed) AS timed,
           COALESCE(sum(EXTRACT(EPOCH FROM emailed_at - paid_at) * 1000) FILTER (WHERE timed), 0)::float8
               AS total_timed_ms
      FROM esim_purchases,
           LATERAL (SELECT status = 'delivered' AND emailed_at IS NOT NULL AND paid_at IS NOT NULL AS timed) t
"""
COUNT_FAILED_TOPUPS = "SELECT count(*) FROM wallet_topups WHERE status = ANY($1::text[])"
COUNT_BY_STATUS = "SELECT status, count(*) AS n FROM esim_purchases GROUP BY status"

_ORDER_COLUMNS = """
    o.transaction_id, o.status, o.offer_id, o.price, o.currency, o.failure_reason, o.refund_id,
    o.refund_status, o.zendit_transaction_id, o.zendit_status, o.paid_at, o.updated_at
"""
# Orders whose funding failed: in topup_failed now, or refunded (or waiting) after passing through it.
FAILED_TOPUP_ORDERS = f"""
    SELECT {_ORDER_COLUMNS} FROM esim_purchases o
     WHERE o.status = 'topup_failed'
        OR EXISTS (SELECT 1 FROM order_transitions t
                    WHERE t.transaction_id = o.transaction_id AND t.to_status = 'topup_failed')
     ORDER BY o.updated_at DESC LIMIT $1
"""  # noqa: S608 (column list is a constant)
FAILED_TOPUPS = """
    SELECT id, amount, currency, status, card_id, failure_reason, order_ids, attempts, created_at, updated_at
      FROM wallet_topups WHERE status = ANY($1::text[]) ORDER BY updated_at DESC LIMIT $2
"""
# Orders whose Zendit purchase failed, or that were given up on while the purchase was pending.
FAILED_PURCHASE_ORDERS = f"""
    SELECT {_ORDER_COLUMNS} FROM esim_purchases o
     WHERE o.status = 'purchase_failed'
        OR o.zendit_status = 'FAILED'
        OR EXISTS (SELECT 1 FROM order_transitions t
                    WHERE t.transaction_id = o.transaction_id
                      AND (t.to_status = 'purchase_failed'
                           OR (t.from_status = 'purchasing' AND t.to_status = 'needs_attention')))
     ORDER BY o.updated_at DESC LIMIT $1
"""  # noqa: S608 (column list is a constant)
STUCK_ORDERS = f"""
    SELECT {_ORDER_COLUMNS}, count(*) OVER () AS total FROM esim_purchases o
     WHERE o.status = ANY($1::text[]) AND o.paid_at < now() - make_interval(mins => $2)
     ORDER BY o.paid_at LIMIT $3
"""  # noqa: S608 (column list is a constant)
PAID_TOTALS = """
    SELECT currency, sum(price)::bigint AS amount FROM esim_purchases
     WHERE paid_at IS NOT NULL GROUP BY currency ORDER BY currency
"""
REFUNDED_TOTALS = """
    SELECT currency, sum(price)::bigint AS amount FROM esim_purchases
     WHERE status = 'refunded' GROUP BY currency ORDER BY currency
"""


class _Row(BaseModel):
    model_config = ConfigDict(frozen=True)


class BusinessFigures(_Row):
    delivered: int
    failed: int
    refunds_issued: int
    timed: int
    total_timed_ms: float
    topup_failures: int


class OrderRow(_Row):
    transaction_id: str
    status: str
    offer_id: str
    price: int
    currency: str
    failure_reason: str | None
    refund_id: str | None
    refund_status: str | None
    zendit_transaction_id: str | None
    zendit_status: str | None
    paid_at: datetime | None
    updated_at: datetime


class TopupRow(_Row):
    id: str
    amount: int
    currency: str
    status: str
    card_id: str | None
    failure_reason: str | None
    order_ids: list[str]
    attempts: int
    created_at: datetime
    updated_at: datetime


class Total(_Row):
    currency: str
    amount: int


def _values(states: frozenset[OrderStatus]) -> list[str]:
    return sorted(s.value for s in states)


async def business_figures(pool: asyncpg.Pool) -> BusinessFigures:
    async with pool.acquire() as conn:
        row = await conn.fetchrow(BUSINESS_FIGURES, _values(FAILED_STATES))
        topup_failures = await conn.fetchval(COUNT_FAILED_TOPUPS, list(FAILED_TOPUP_STATUSES))
    return BusinessFigures(**dict(row), topup_failures=topup_failures)


# Only unfinished states: the status index keeps this cheap however many orders were delivered.
UNFINISHED_ORDERS = """
    SELECT status, count(*) AS orders, extract(epoch FROM now() - min(updated_at))::float8 AS oldest_seconds
      FROM esim_purchases
     WHERE status = ANY($1::text[])
     GROUP BY status
"""


async def unfinished_orders(pool: asyncpg.Pool) -> dict[str, tuple[int, float]]:
    """Per unfinished state: how many orders are in it, and seconds since the oldest of them last changed.
    Every unfinished state is present (0 orders, 0 s when empty), so the gauges never go stale."""
    found = {
        row["status"]: (row["orders"], row["oldest_seconds"])
        for row in await pool.fetch(UNFINISHED_ORDERS, _values(UNFINISHED_STATES))
    }
    return {state: found.get(state, (0, 0.0)) for state in _values(UNFINISHED_STATES)}


async def counts_by_status(pool: asyncpg.Pool) -> dict[str, int]:
    return {row["status"]: row["n"] for row in await pool.fetch(COUNT_BY_STATUS)}


async def failed_topup_orders(pool: asyncpg.Pool, limit: int) -> list[OrderRow]:
    return [OrderRow(**dict(row)) for row in await pool.fetch(FAILED_TOPUP_ORDERS, limit)]


async def failed_topups(pool: asyncpg.Pool, limit: int) -> list[TopupRow]:
    rows = await pool.fetch(FAILED_TOPUPS, list(FAILED_TOPUP_STATUSES), limit)
    return [TopupRow(**dict(row)) for row in rows]


async def failed_purchase_orders(pool: asyncpg.Pool, limit: int) -> list[OrderRow]:
    return [OrderRow(**dict(row)) for row in await pool.fetch(FAILED_PURCHASE_ORDERS, limit)]


async def stuck_orders(pool: asyncpg.Pool, after_minutes: int, limit: int) -> tuple[int, list[OrderRow]]:
    rows = await pool.fetch(STUCK_ORDERS, _values(IN_FLIGHT_STATES), after_minutes, limit)
    total = rows[0]["total"] if rows else 0
    return total, [OrderRow(**{k: v for k, v in dict(row).items() if k != "total"}) for row in rows]


async def paid_totals(pool: asyncpg.Pool) -> list[Total]:
    return [Total(**dict(row)) for row in await pool.fetch(PAID_TOTALS)]


async def refunded_totals(pool: asyncpg.Pool) -> list[Total]:
    return [Total(**dict(row)) for row in await pool.fetch(REFUNDED_TOTALS)]
