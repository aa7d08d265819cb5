"""The funding service's SQL: top-ups, issuing cards, wallet reservations. Named SQL, typed rows.

Order states change only through `esim_common.orders.transition`; this module records facts.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

import asyncpg
from pydantic import BaseModel, ConfigDict

from esim_common.events import OrderFunded
from esim_common.money import Money
from esim_common.order_repository import record
from esim_common.order_states import OrderStatus
from esim_common.providers.stripe import IssuedCard
from funding.domain import (
    RESERVING_STATES,
    ZENDIT_HOLDS_OR_RELEASED,
    CaptureFailureRecord,
    OrderCost,
    TopupStatus,
    UnsettledTopup,
    capture_failure_record,
    card_expiry,
)

# Advisory locks, two-int keys (class, id): a key space of their own, apart from one-bigint locks.
# The wallet lock serialises every "is there enough money?" decision, so two orders cannot both count
# the same balance. A top-up lock lets one worker at a time run a phase of that top-up (two deliveries
# of one order join the same top-up instead of racing through it). Both are transaction-scoped, so they
# also work behind a transaction-mode pooler (Supabase, PgBouncer) and die with a crashed worker.
WALLET_LOCK_CLASS = 7_230_001
TOPUP_LOCK_CLASS = 7_230_002
LOCK_WALLET = f"SELECT pg_advisory_xact_lock({WALLET_LOCK_CLASS}, 0)"
LOCK_TOPUP = f"SELECT pg_advisory_xact_lock({TOPUP_LOCK_CLASS}, hashtext($1))"


class WalletTopup(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: str
    amount: int
    currency: str
    status: TopupStatus
    card_id: str | None
    gateway_reference: str | None
    gateway_topup_id: str | None
    order_ids: list[str]
    failure_reason: str | None
    attempts: int
    created_at: datetime
    updated_at: datetime
    card_requested_at: datetime | None = None  # the card creation was asked for (it may exist)
    card_attempts: int = 1  # names the card's idempotency key; +1 after an attempt that made no card
    driven_by: str | None = None  # an order that took this top-up over when it stalled
    card_active: bool | None = None  # from issuing_cards; None when no card was created
    idle_seconds: float = 0.0  # since the row last changed (database clock)

    @property
    def money(self) -> Money:
        return Money(self.amount, self.currency)


# What other orders reserve (domain.reserves_wallet: a reserving status, and no Zendit status that
# says Zendit holds or released the cost; NULL is neither), summed per currency, plus the few purchases
# among them whose hold we have not seen (domain.status_unsure: purchasing, placed). One statement, so
# that the sum and those rows come from one snapshot: the sum is corrected by Zendit's answers about
# exactly these rows (domain.reserved_with_fresh_status). $1 RESERVING_STATES, $2 the deciding order,
# $3 ZENDIT_HOLDS_OR_RELEASED, $4 'purchasing'.
SELECT_RESERVATIONS = """
    WITH reserving AS (
        SELECT status, zendit_status, zendit_cost, zendit_cost_currency, zendit_transaction_id
          FROM esim_purchases
         WHERE status = ANY($1::text[]) AND transaction_id <> $2
           AND (zendit_status IS NULL OR zendit_status <> ALL($3::text[]))
    )
    SELECT true AS total, zendit_cost_currency, sum(zendit_cost)::bigint AS zendit_cost,
           NULL::text AS status, NULL::text AS zendit_status, NULL::text AS zendit_transaction_id
      FROM reserving
     WHERE zendit_cost IS NOT NULL AND zendit_cost_currency IS NOT NULL
     GROUP BY zendit_cost_currency
    UNION ALL
    SELECT false, zendit_cost_currency, zendit_cost, status, zendit_status, zendit_transaction_id
      FROM reserving
     WHERE status = $4 AND zendit_transaction_id IS NOT NULL
"""

# Orders waiting for money, in payment order (the wallet decision reads them under the wallet lock).
SELECT_WAITING = """
    SELECT transaction_id, status, offer_id, zendit_cost, zendit_cost_currency
      FROM esim_purchases
     WHERE status IN ('funding', 'awaiting_funds') AND zendit_cost IS NOT NULL
     ORDER BY paid_at NULLS LAST, transaction_id
"""
# The top-ups naming any of these orders that are not settled yet: open, or their card still active.
# Their drivers, and the orders that joined an open one, are left out of another order's batch
# (domain.busy_with_topups). An order that drives a top-up is always among its order_ids: it started it
# with itself in them, or joined before taking over.
SELECT_UNSETTLED_TOPUPS_OF = """
    SELECT t.id, t.driven_by, t.order_ids, t.status IN ('pending', 'card_created', 'submitted') AS is_open
      FROM wallet_topups t LEFT JOIN issuing_cards c ON c.topup_id = t.id
     WHERE t.order_ids && $1::text[]
       AND (t.status IN ('pending', 'card_created', 'submitted') OR c.active)
"""
# The succeeded top-ups naming any of these orders, oldest first (order.funded names the latest).
SELECT_SUCCEEDED_TOPUPS_OF = """
    SELECT id, order_ids FROM wallet_topups
     WHERE order_ids && $1::text[] AND status = 'succeeded'
     ORDER BY created_at, id
"""
SELECT_OPEN_TOPUPS = """
    SELECT t.*, c.active AS card_active, extract(epoch FROM now() - t.updated_at)::float8 AS idle_seconds
      FROM wallet_topups t LEFT JOIN issuing_cards c ON c.topup_id = t.id
     WHERE t.status IN ('pending', 'card_created', 'submitted')
     ORDER BY t.created_at, t.id
"""
SELECT_COVERING = """
    SELECT t.*, c.active AS card_active, extract(epoch FROM now() - t.updated_at)::float8 AS idle_seconds
      FROM wallet_topups t LEFT JOIN issuing_cards c ON c.topup_id = t.id
     WHERE t.order_ids @> ARRAY[$1::text]
     ORDER BY t.created_at, t.id
"""
# An order waiting for a top-up started by another joins it, so the top-up's outcome becomes its own.
JOIN_TOPUP = """
    UPDATE wallet_topups
       SET order_ids = CASE WHEN order_ids @> ARRAY[$2::text] THEN order_ids
                            ELSE array_append(order_ids, $2::text) END
     WHERE id = $1 AND status IN ('pending', 'card_created', 'submitted')
 RETURNING id
"""
# An order takes over a stalled top-up it waits for: it is now the one to close it if it gives up, and
# the row is fresh again, so that the other waiting orders leave it to this one.
TAKE_OVER_TOPUP = """
    UPDATE wallet_topups SET driven_by = $2, updated_at = now()
     WHERE id = $1 AND status IN ('pending', 'card_created', 'submitted')
"""
# The same, by an order that joined the top-up and finds it stalled (domain.may_take_over) before it
# decides; only while it is still stalled, so of two orders finding it so, one takes it over.
TAKE_OVER_STALLED_TOPUP = """
    UPDATE wallet_topups SET driven_by = $2, updated_at = now()
     WHERE id = $1 AND status IN ('pending', 'card_created', 'submitted')
       AND updated_at <= now() - make_interval(secs => $3)
 RETURNING id
"""
SELECT_DRIVEN_BY = """
    SELECT t.*, c.active AS card_active, extract(epoch FROM now() - t.updated_at)::float8 AS idle_seconds
      FROM wallet_topups t LEFT JOIN issuing_cards c ON c.topup_id = t.id
     WHERE t.id = ANY($2::text[]) OR t.driven_by = $1
     ORDER BY t.created_at, t.id
"""
COUNT_AWAITING_FUNDS = """
    SELECT count(*) FROM esim_purchases WHERE status = 'awaiting_funds' AND transaction_id <> $1
"""
# prefunded: when an order last looked at the balance, and which waiting order is first in line.
MARK_FUNDS_CHECKED = "UPDATE esim_purchases SET funds_checked_at = now() WHERE transaction_id = $1"
SELECT_FIRST_IN_LINE = """
    SELECT transaction_id, extract(epoch FROM now() - funds_checked_at)::float8 AS checked_seconds_ago
      FROM esim_purchases
     WHERE status = 'awaiting_funds'
     ORDER BY paid_at NULLS LAST, transaction_id
     LIMIT 1
"""

# paid / awaiting_funds → funding, only from the status the delivery read ($2). transition(FUNDING) would
# also move a purchasing or needs_attention order back: a delivery that read awaiting_funds, then lost
# the race to a batch that funded the order and to provisioning that started buying it, would fund it
# again. As in transition's statement, the guard reads the row as its lock returned it (`previous`),
# and the move is recorded in the order's timeline.
RECORD_COST_IF_MISSING = """
    UPDATE esim_purchases SET zendit_cost = $2, zendit_cost_currency = $3, updated_at = now()
     WHERE transaction_id = $1 AND zendit_cost IS NULL
"""

INSERT_TOPUP = """
    INSERT INTO wallet_topups (id, amount, currency, gateway_reference, order_ids)
    VALUES ($1, $2, $3, $1, $4)
    ON CONFLICT (id) DO NOTHING
"""
SELECT_TOPUPS = """
    SELECT t.*, c.active AS card_active
      FROM wallet_topups t LEFT JOIN issuing_cards c ON c.topup_id = t.id
     WHERE t.id = ANY($1::text[])
     ORDER BY t.created_at, t.id
"""
MARK_CARD_REQUESTED = """
    UPDATE wallet_topups SET card_requested_at = COALESCE(card_requested_at, now()), updated_at = now()
     WHERE id = $1 AND status = 'pending'
"""
# Stripe answered the card creation with an error: no card exists under this key, and the next attempt
# needs a new key (Stripe would replay the error for this one).
MARK_CARD_REQUEST_ANSWERED = """
    UPDATE wallet_topups SET card_requested_at = NULL, card_attempts = card_attempts + 1, updated_at = now()
     WHERE id = $1 AND status = 'pending'
"""
MARK_CARD_CREATED = """
    UPDATE wallet_topups SET status = 'card_created', card_id = $2, updated_at = now()
     WHERE id = $1 AND status = 'pending'
"""
# Counted per hand-over: a top-up that needed three gateway calls says so.
MARK_SUBMITTED = """
    UPDATE wallet_topups SET status = 'submitted', attempts = attempts + 1, updated_at = now()
     WHERE id = $1 AND status IN ('card_created', 'submitted')
"""
# Only an open top-up can end; a final one keeps its first outcome.
FINISH_TOPUP = """
    UPDATE wallet_topups
       SET status = $2, gateway_topup_id = COALESCE($3, gateway_topup_id),
           failure_reason = COALESCE($4, failure_reason), updated_at = now()
     WHERE id = $1 AND status IN ('pending', 'card_created', 'submitted')
"""
INSERT_CARD = """
    INSERT INTO issuing_cards (card_id, card_last4, card_exp, amount, currency, topup_id)
    VALUES ($1, $2, $3, $4, $5, $6)
    ON CONFLICT DO NOTHING
"""
MARK_CARD_CANCELLED = """
    UPDATE issuing_cards SET active = false, cancelled_at = COALESCE(cancelled_at, now())
     WHERE card_id = $1
"""


@dataclass(frozen=True)
class Reservations:
    """What the other orders reserve of the wallet, read in one statement (SELECT_RESERVATIONS)."""

    totals: dict[str, int]  # currency → minor units, as domain.reserved_amount sums them
    unsure: list[OrderCost]  # the reserving purchases whose hold we have not seen (domain.status_unsure)

    def reserved(self, currency: str) -> Money:
        return Money(self.totals.get(currency, 0), currency)


async def reservations(conn: asyncpg.Connection, *, exclude: str) -> Reservations:
    rows = await conn.fetch(
        SELECT_RESERVATIONS,
        [s.value for s in RESERVING_STATES],
        exclude,
        sorted(ZENDIT_HOLDS_OR_RELEASED),
        OrderStatus.PURCHASING.value,
    )
    return Reservations(
        totals={row["zendit_cost_currency"].strip(): row["zendit_cost"] for row in rows if row["total"]},
        unsure=[_order_cost(row) for row in rows if not row["total"]],
    )


def _order_cost(row: asyncpg.Record) -> OrderCost:
    return OrderCost(
        status=OrderStatus(row["status"]),
        zendit_status=row["zendit_status"],
        cost=Money(row["zendit_cost"], row["zendit_cost_currency"].strip())
        if row["zendit_cost"] is not None and row["zendit_cost_currency"]
        else None,
        zendit_transaction_id=row["zendit_transaction_id"],
    )


@dataclass(frozen=True)
class Waiting:
    transaction_id: str
    status: OrderStatus
    offer_id: str
    cost: Money


async def waiting_orders(conn: asyncpg.Connection) -> list[Waiting]:
    """Orders in funding or awaiting_funds with a known cost, in payment order."""
    return [
        Waiting(
            transaction_id=row["transaction_id"],
            status=OrderStatus(row["status"]),
            offer_id=row["offer_id"],
            cost=Money(row["zendit_cost"], row["zendit_cost_currency"].strip()),
        )
        for row in await conn.fetch(SELECT_WAITING)
    ]


async def unsettled_topups_of(
    conn: asyncpg.Connection, transaction_ids: Sequence[str]
) -> list[UnsettledTopup]:
    """The open or card-active top-ups that name any of these orders."""
    if not transaction_ids:
        return []
    rows = await conn.fetch(SELECT_UNSETTLED_TOPUPS_OF, list(transaction_ids))
    return [
        UnsettledTopup(
            id=row["id"],
            driven_by=row["driven_by"],
            order_ids=tuple(row["order_ids"]),
            is_open=row["is_open"],
        )
        for row in rows
    ]


async def latest_succeeded_topups(conn: asyncpg.Connection, transaction_ids: Sequence[str]) -> dict[str, str]:
    """For each of these orders that a succeeded top-up names: the latest such top-up's id."""
    wanted = set(transaction_ids)
    latest: dict[str, str] = {}
    for row in await conn.fetch(SELECT_SUCCEEDED_TOPUPS_OF, list(transaction_ids)):
        for txn in wanted.intersection(row["order_ids"]):
            latest[txn] = row["id"]  # oldest first: the last one seen is the latest
    return latest


async def open_topups(conn: asyncpg.Connection) -> list[WalletTopup]:
    """Top-ups on their way, oldest first."""
    return [_topup(row) for row in await conn.fetch(SELECT_OPEN_TOPUPS)]


async def covering_topups(conn: asyncpg.Connection | asyncpg.Pool, transaction_id: str) -> list[WalletTopup]:
    """The top-ups meant to cover this order (it started or joined them), oldest first."""
    return [_topup(row) for row in await conn.fetch(SELECT_COVERING, transaction_id)]


async def join_topup(conn: asyncpg.Connection, topup_id: str, transaction_id: str) -> bool:
    """Count this order among the top-up's; False when the top-up has ended meanwhile."""
    return await conn.fetchval(JOIN_TOPUP, topup_id, transaction_id) is not None


async def take_over_topup(conn: asyncpg.Connection, topup_id: str, transaction_id: str) -> None:
    await conn.execute(TAKE_OVER_TOPUP, topup_id, transaction_id)


async def take_over_stalled_topup(
    conn: asyncpg.Connection | asyncpg.Pool, topup_id: str, transaction_id: str, stale_seconds: float
) -> bool:
    """Take the top-up over if it is open and has not moved for `stale_seconds`; False otherwise."""
    taken = await conn.fetchval(TAKE_OVER_STALLED_TOPUP, topup_id, transaction_id, float(stale_seconds))
    return taken is not None


async def topups_driven_by(
    conn: asyncpg.Connection | asyncpg.Pool, transaction_id: str, own_ids: Sequence[str]
) -> list[WalletTopup]:
    """The top-ups this order started (`own_ids`) or took over, oldest first."""
    return [_topup(row) for row in await conn.fetch(SELECT_DRIVEN_BY, transaction_id, list(own_ids))]


async def count_awaiting_funds(conn: asyncpg.Connection | asyncpg.Pool, *, besides: str = "") -> int:
    """Orders in awaiting_funds, `besides` this one."""
    return int(await conn.fetchval(COUNT_AWAITING_FUNDS, besides))


async def mark_funds_checked(conn: asyncpg.Connection, transaction_id: str) -> None:
    await conn.execute(MARK_FUNDS_CHECKED, transaction_id)


@dataclass(frozen=True)
class FirstInLine:
    transaction_id: str
    checked_seconds_ago: float | None  # None: it has not looked at the balance yet


async def first_in_line(conn: asyncpg.Connection | asyncpg.Pool) -> FirstInLine | None:
    """The earliest-paid order waiting in awaiting_funds, and how long ago it last looked."""
    row = await conn.fetchrow(SELECT_FIRST_IN_LINE)
    return FirstInLine(row["transaction_id"], row["checked_seconds_ago"]) if row is not None else None


async def record_cost_if_missing(pool: asyncpg.Pool, transaction_id: str, cost: Money) -> None:
    await pool.execute(RECORD_COST_IF_MISSING, transaction_id, cost.amount, cost.currency)


def _topup(row: asyncpg.Record) -> WalletTopup:
    values = dict(row)
    values["currency"] = values["currency"].strip()  # char(3)
    return WalletTopup.model_validate(values)


async def get_topups(conn: asyncpg.Connection | asyncpg.Pool, ids: Sequence[str]) -> list[WalletTopup]:
    """The top-ups with these ids that exist, oldest first, with whether their card is still active."""
    return [_topup(row) for row in await conn.fetch(SELECT_TOPUPS, list(ids))]


async def get_topup(conn: asyncpg.Connection | asyncpg.Pool, topup_id: str) -> WalletTopup:
    found = await get_topups(conn, [topup_id])
    if not found:
        raise LookupError(f"top-up {topup_id} does not exist")
    return found[0]


async def start_topup(
    conn: asyncpg.Connection, *, topup_id: str, amount: Money, transaction_id: str
) -> WalletTopup:
    """Record the intent (status pending) before any card exists; a second call finds the first row."""
    await conn.execute(INSERT_TOPUP, topup_id, amount.amount, amount.currency, [transaction_id])
    return await get_topup(conn, topup_id)


async def record_card(
    conn: asyncpg.Connection, *, topup: WalletTopup, card: IssuedCard, transaction_id: str
) -> WalletTopup:
    """The card exists: keep last4 and expiry (never the number or CVC) and move to card_created."""
    async with conn.transaction():
        await conn.execute(
            INSERT_CARD,
            card.id,
            card.last4,
            card_expiry(card.exp_month, card.exp_year),
            topup.amount,
            topup.currency,
            topup.id,
        )
        await conn.execute(MARK_CARD_CREATED, topup.id, card.id)
        await record(conn, transaction_id, stripe_issuing_card_id=card.id)
    return await get_topup(conn, topup.id)


async def mark_card_requested(conn: asyncpg.Connection, topup_id: str) -> None:
    await conn.execute(MARK_CARD_REQUESTED, topup_id)


async def mark_card_request_answered(conn: asyncpg.Connection, topup_id: str) -> None:
    await conn.execute(MARK_CARD_REQUEST_ANSWERED, topup_id)


async def mark_submitted(conn: asyncpg.Connection, topup_id: str) -> None:
    await conn.execute(MARK_SUBMITTED, topup_id)


async def finish_topup(
    conn: asyncpg.Connection,
    topup_id: str,
    status: TopupStatus,
    *,
    gateway_topup_id: str | None = None,
    failure_reason: str | None = None,
) -> WalletTopup:
    await conn.execute(FINISH_TOPUP, topup_id, status.value, gateway_topup_id, failure_reason)
    return await get_topup(conn, topup_id)


async def mark_card_cancelled(conn: asyncpg.Connection, card_id: str) -> None:
    await conn.execute(MARK_CARD_CANCELLED, card_id)


# ------------------------------------------------------------------------------------ order.funded, once
# Written with the move to `funded` (same transaction); published after the commit with the row locked
# until the broker confirms, then stamped. An order funded twice (Zendit said INSUFFICIENT_FUNDS and it
# was funded again) has two rows, one per funding.

INSERT_ANNOUNCEMENT = """
    INSERT INTO outbox (event_id, routing_key, transaction_id, payload) VALUES ($1, $2, $3, $4::jsonb)
"""
SELECT_UNPUBLISHED_FUNDED = """
    SELECT payload::text FROM outbox
     WHERE transaction_id = $1 AND routing_key = 'order.funded' AND published_at IS NULL
     ORDER BY created_at
       FOR UPDATE
"""
# A batch's announcements, published by the deciding delivery: the rows that order's own delivery is
# publishing right now are skipped (it publishes them; if it fails, its retry does).
SELECT_UNPUBLISHED_FUNDED_OF = """
    SELECT payload::text FROM outbox
     WHERE transaction_id = ANY($1::text[]) AND routing_key = 'order.funded' AND published_at IS NULL
     ORDER BY created_at, array_position($1::text[], transaction_id)
       FOR UPDATE SKIP LOCKED
"""
# The announcement relay (relay.py): order.funded rows nobody has published for `$1` seconds, bar the
# ones a delivery holds while it publishes them and the ones this round has tried already ($3); the
# rows that failed last round ($4) come last, then oldest first. Through the partial index on
# unpublished rows (outbox_unpublished_idx): published rows, nearly all of the outbox, are never visited.
SELECT_STRANDED_FUNDED = """
    SELECT event_id, transaction_id, payload::text FROM outbox
     WHERE published_at IS NULL AND routing_key = 'order.funded'
       AND created_at < now() - make_interval(secs => $1)
       AND event_id <> ALL($3::uuid[])
     ORDER BY event_id = ANY($4::uuid[]), created_at
     LIMIT $2
       FOR UPDATE SKIP LOCKED
"""
# Seconds since the oldest unpublished order.funded row was written; 0 when there is none.
OLDEST_UNPUBLISHED_FUNDED = """
    SELECT COALESCE(extract(epoch FROM now() - min(created_at)), 0)::float8 FROM outbox
     WHERE published_at IS NULL AND routing_key = 'order.funded'
"""
HAS_FUNDED = """
    SELECT EXISTS (SELECT 1 FROM outbox WHERE transaction_id = $1 AND routing_key = 'order.funded')
"""
# Without a lock: published_at is set only after the broker confirmed, so "there is one and every one
# is published" stays true; anything else takes the locked path.
ALL_FUNDED_PUBLISHED = """
    SELECT bool_and(published_at IS NOT NULL) IS TRUE FROM outbox
     WHERE transaction_id = $1 AND routing_key = 'order.funded'
"""
MARK_ANNOUNCED = "UPDATE outbox SET published_at = now() WHERE event_id = $1"
MARK_ALL_ANNOUNCED = "UPDATE outbox SET published_at = now() WHERE event_id = ANY($1::uuid[])"


async def add_announcement(conn: asyncpg.Connection, event: OrderFunded) -> None:
    await add_announcements(conn, [event])


async def add_announcements(conn: asyncpg.Connection, events: Sequence[OrderFunded]) -> None:
    await conn.executemany(
        INSERT_ANNOUNCEMENT,
        [(e.event_id, e.routing_key, e.transaction_id, e.model_dump_json()) for e in events],
    )


async def unpublished_announcements_of(
    conn: asyncpg.Connection, transaction_ids: Sequence[str]
) -> list[OrderFunded]:
    """These orders' unpublished order.funded events that nobody else holds, locked until the
    transaction ends."""
    rows = await conn.fetch(SELECT_UNPUBLISHED_FUNDED_OF, list(transaction_ids))
    return [OrderFunded.model_validate_json(row["payload"]) for row in rows]


@dataclass(frozen=True)
class StrandedRow:
    """An unpublished order.funded row as stored: the relay validates each payload on its own."""

    event_id: uuid.UUID
    transaction_id: str
    payload: str


async def stranded_announcements(
    conn: asyncpg.Connection,
    *,
    older_than_seconds: float,
    limit: int,
    tried: Sequence[uuid.UUID] = (),
    failed_before: Sequence[uuid.UUID] = (),
) -> list[StrandedRow]:
    """order.funded rows unpublished for `older_than_seconds` that nobody else holds, not among
    `tried`, the `failed_before` ones last, then oldest first; locked until the transaction ends."""
    rows = await conn.fetch(
        SELECT_STRANDED_FUNDED, float(older_than_seconds), limit, list(tried), list(failed_before)
    )
    return [StrandedRow(row["event_id"], row["transaction_id"], row["payload"]) for row in rows]


async def oldest_unpublished_announcement_seconds(conn: asyncpg.Connection | asyncpg.Pool) -> float:
    """How long the oldest unpublished order.funded row has waited (0 when none waits)."""
    return float(await conn.fetchval(OLDEST_UNPUBLISHED_FUNDED))


async def all_announced(conn: asyncpg.Connection | asyncpg.Pool, transaction_id: str) -> bool:
    """The order has an order.funded and every one of them is published."""
    return bool(await conn.fetchval(ALL_FUNDED_PUBLISHED, transaction_id))


async def mark_all_announced(conn: asyncpg.Connection, event_ids: Sequence[uuid.UUID]) -> None:
    if event_ids:
        await conn.execute(MARK_ALL_ANNOUNCED, list(event_ids))


async def unpublished_announcements(conn: asyncpg.Connection, transaction_id: str) -> list[OrderFunded]:
    """The order's order.funded events nobody has published yet, locked until the transaction ends."""
    rows = await conn.fetch(SELECT_UNPUBLISHED_FUNDED, transaction_id)
    return [OrderFunded.model_validate_json(row["payload"]) for row in rows]


async def has_announcement(conn: asyncpg.Connection, transaction_id: str) -> bool:
    return bool(await conn.fetchval(HAS_FUNDED, transaction_id))


async def mark_announced(conn: asyncpg.Connection, event_id: uuid.UUID) -> None:
    await conn.execute(MARK_ANNOUNCED, event_id)


# ------------------------------------------------------------------------------------ capture after delivery

# Facts on the order, never its status (it stays delivered). A recorded capture is never overwritten by a
# failure that a late, concurrent delivery of the same order.delivered reports.
MARK_CAPTURED = """
    UPDATE esim_purchases
       SET capture_status = 'captured', captured_at = COALESCE(captured_at, now()),
           capture_failure_reason = NULL, updated_at = now()
     WHERE transaction_id = $1 AND capture_status IS DISTINCT FROM 'captured'
 RETURNING transaction_id
"""
# The attempt's number names its Stripe idempotency key and sets its backoff.
COUNT_CAPTURE_ATTEMPT = """
    UPDATE esim_purchases SET capture_attempts = capture_attempts + 1, updated_at = now()
     WHERE transaction_id = $1
 RETURNING capture_attempts
"""
SELECT_CAPTURE_FOR_UPDATE = """
    SELECT capture_method, capture_status, capture_failure_reason
      FROM esim_purchases WHERE transaction_id = $1 FOR UPDATE
"""
MARK_CAPTURE_FAILED = """
    UPDATE esim_purchases
       SET capture_status = 'failed', capture_failure_reason = $2, updated_at = now()
     WHERE transaction_id = $1
"""
MAX_REASON_LENGTH = 200


async def mark_captured(pool: asyncpg.Pool, transaction_id: str) -> bool:
    """Record the capture; False when it was already recorded (a redelivery)."""
    return await pool.fetchval(MARK_CAPTURED, transaction_id) is not None


async def count_capture_attempt(pool: asyncpg.Pool, transaction_id: str) -> int:
    """The number of the capture attempt that starts now: 1, 2, ..."""
    attempt = await pool.fetchval(COUNT_CAPTURE_ATTEMPT, transaction_id)
    if attempt is None:
        raise LookupError(f"order {transaction_id} does not exist")
    return int(attempt)


async def record_capture_failure(
    pool: asyncpg.Pool, transaction_id: str, reason: str
) -> CaptureFailureRecord:
    """Record a failed capture under the row lock, so that two runs of the failure path cannot both
    see the failure as new. Writes only when something changes (`CaptureFailureRecord.NEW`)."""
    reason = reason[:MAX_REASON_LENGTH]
    async with pool.acquire() as conn, conn.transaction():
        row = await conn.fetchrow(SELECT_CAPTURE_FOR_UPDATE, transaction_id)
        if row is None:
            raise LookupError(f"order {transaction_id} does not exist")
        outcome = capture_failure_record(
            capture_method=row["capture_method"],
            capture_status=row["capture_status"],
            recorded_reason=row["capture_failure_reason"],
            reason=reason,
        )
        if outcome is CaptureFailureRecord.NEW:
            await conn.execute(MARK_CAPTURE_FAILED, transaction_id, reason)
        return outcome
