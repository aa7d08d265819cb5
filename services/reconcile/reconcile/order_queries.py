"""The SQL of the operator's order actions: named statements, typed rows.

Reads cover an order's whole timeline; the only writes are `operator_actions` rows and the outbox rows
of re-driven events. State changes go through `esim_common.orders.transition` (guarded), never here.
"""

from __future__ import annotations

import json
import uuid
from datetime import datetime
from typing import Any

import asyncpg
from pydantic import BaseModel, ConfigDict

from esim_common.order_states import OrderStatus
from reconcile.order_ops import Move

# An order's last state change: its latest transition, or (never moved) its last update.
LIST_ORDERS = """
    SELECT o.transaction_id, o.status, o.price, o.currency, o.paid_at, o.failure_reason,
           c.changed_at, floor(EXTRACT(EPOCH FROM now() - c.changed_at))::bigint AS age_seconds,
           count(*) OVER () AS total
      FROM esim_purchases AS o
      CROSS JOIN LATERAL (
          SELECT COALESCE(max(t.at), o.updated_at) AS changed_at
            FROM order_transitions AS t WHERE t.transaction_id = o.transaction_id
      ) AS c
     WHERE o.status = ANY($1::text[]) AND c.changed_at <= now() - make_interval(mins => $2)
     ORDER BY c.changed_at DESC, o.transaction_id
     LIMIT $3
"""
TRANSITIONS = """
    SELECT from_status, to_status, reason, at FROM order_transitions WHERE transaction_id = $1 ORDER BY id
"""
EVENTS = """
    SELECT event_id, routing_key, created_at, published_at FROM outbox
     WHERE transaction_id = $1 ORDER BY created_at, routing_key
"""
EMAILS = """
    SELECT template, recipient, status, message_id, created_at, sent_at FROM sent_emails
     WHERE transaction_id = $1 ORDER BY created_at, template
"""
STRIPE_EVENTS = """
    SELECT event_id, type, received_at, processed_at, outcome FROM stripe_events
     WHERE transaction_id = $1 ORDER BY received_at, event_id
"""
# The top-ups that covered the order, with their card's last four digits: the only card data we hold.
TOPUPS = """
    SELECT t.id, t.amount, t.currency, t.status, t.failure_reason, t.attempts, t.created_at, t.updated_at,
           c.card_id, c.card_last4, c.active AS card_active
      FROM wallet_topups AS t LEFT JOIN issuing_cards AS c ON c.topup_id = t.id
     WHERE t.order_ids @> ARRAY[$1::text]
     ORDER BY t.created_at, t.id
"""
ACTIONS = """
    SELECT id, action, detail::text AS detail, note, created_at FROM operator_actions
     WHERE transaction_id = $1 ORDER BY id
"""
INSERT_ACTION = """
    INSERT INTO operator_actions (transaction_id, action, detail, note) VALUES ($1, $2, $3::jsonb, $4)
    RETURNING id
"""
# The order's latest event of a kind, locked until the caller's transaction ends (a service publishing
# it at this moment is waited for; one that comes after sees it stamped).
LATEST_EVENT = """
    SELECT event_id, payload::text AS payload, published_at FROM outbox
     WHERE transaction_id = $1 AND routing_key = $2
     ORDER BY created_at DESC LIMIT 1
       FOR UPDATE
"""
# The top-up whose money funded the order (funding's order.funded names it).
LATEST_SUCCEEDED_TOPUP = """
    SELECT id FROM wallet_topups WHERE order_ids @> ARRAY[$1::text] AND status = 'succeeded'
     ORDER BY created_at DESC, id DESC LIMIT 1
"""


class _Row(BaseModel):
    model_config = ConfigDict(frozen=True)


class ListedOrder(_Row):
    transaction_id: str
    status: OrderStatus
    price: int
    currency: str
    paid_at: datetime | None
    failure_reason: str | None
    changed_at: datetime
    age_seconds: int


class TransitionRow(_Row):
    from_status: str
    to_status: str
    reason: str | None
    at: datetime


class OutboxRow(_Row):
    event_id: uuid.UUID
    routing_key: str
    created_at: datetime
    published_at: datetime | None


class EmailRow(_Row):
    template: str
    recipient: str
    status: str
    message_id: str | None
    created_at: datetime
    sent_at: datetime | None


class StripeEventRow(_Row):
    event_id: str
    type: str
    received_at: datetime
    processed_at: datetime | None
    outcome: str | None


class TopupRow(_Row):
    id: str
    amount: int
    currency: str
    status: str
    failure_reason: str | None
    attempts: int
    created_at: datetime
    updated_at: datetime
    card_id: str | None
    card_last4: str | None
    card_active: bool | None


class ActionRow(_Row):
    id: int
    action: str
    detail: dict[str, Any]
    note: str | None
    created_at: datetime


class QueuedEvent(_Row):
    event_id: uuid.UUID
    payload: str
    published_at: datetime | None


async def list_orders(
    pool: asyncpg.Pool, statuses: tuple[OrderStatus, ...], older_than_minutes: int, limit: int
) -> tuple[int, list[ListedOrder]]:
    """(all matching, the `limit` most recently changed of them)."""
    rows = await pool.fetch(LIST_ORDERS, [s.value for s in statuses], older_than_minutes, limit)
    total = rows[0]["total"] if rows else 0
    return total, [ListedOrder(**{k: v for k, v in dict(row).items() if k != "total"}) for row in rows]


async def transitions(conn: asyncpg.Connection | asyncpg.Pool, transaction_id: str) -> list[TransitionRow]:
    return [TransitionRow(**dict(row)) for row in await conn.fetch(TRANSITIONS, transaction_id)]


def moves(rows: list[TransitionRow]) -> list[Move]:
    return [Move(r.from_status, r.to_status, r.reason) for r in rows]


async def events(pool: asyncpg.Pool, transaction_id: str) -> list[OutboxRow]:
    return [OutboxRow(**dict(row)) for row in await pool.fetch(EVENTS, transaction_id)]


async def emails(pool: asyncpg.Pool, transaction_id: str) -> list[EmailRow]:
    return [EmailRow(**dict(row)) for row in await pool.fetch(EMAILS, transaction_id)]


async def stripe_events(pool: asyncpg.Pool, transaction_id: str) -> list[StripeEventRow]:
    return [StripeEventRow(**dict(row)) for row in await pool.fetch(STRIPE_EVENTS, transaction_id)]


async def topups(pool: asyncpg.Pool, transaction_id: str) -> list[TopupRow]:
    return [TopupRow(**dict(row)) for row in await pool.fetch(TOPUPS, transaction_id)]


async def actions(pool: asyncpg.Pool, transaction_id: str) -> list[ActionRow]:
    return [
        ActionRow(**{**dict(row), "detail": json.loads(row["detail"])})
        for row in await pool.fetch(ACTIONS, transaction_id)
    ]


async def record_action(
    conn: asyncpg.Connection, transaction_id: str, action: str, detail: dict[str, Any], note: str | None
) -> int:
    """Append an operator action (call inside the transaction of the change it made); its id."""
    action_id: int = await conn.fetchval(INSERT_ACTION, transaction_id, action, json.dumps(detail), note)
    return action_id


async def latest_event(conn: asyncpg.Connection, transaction_id: str, routing_key: str) -> QueuedEvent | None:
    row = await conn.fetchrow(LATEST_EVENT, transaction_id, routing_key)
    return QueuedEvent(**dict(row)) if row else None


async def latest_succeeded_topup(conn: asyncpg.Connection, transaction_id: str) -> str | None:
    topup_id: str | None = await conn.fetchval(LATEST_SUCCEEDED_TOPUP, transaction_id)
    return topup_id
