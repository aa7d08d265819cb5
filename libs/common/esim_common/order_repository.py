"""Reading and creating orders (`esim_purchases`): named SQL, typed rows.

State changes go through `esim_common.orders.transition` (guarded); this module only creates orders,
reads them, and records facts that are not states (ids handed out by providers, costs, URLs).
"""

from __future__ import annotations

from datetime import datetime

import asyncpg
from pydantic import BaseModel, ConfigDict

from esim_common.money import Money
from esim_common.order_states import OrderStatus


class Order(BaseModel):
    model_config = ConfigDict(frozen=True)

    id: int
    transaction_id: str
    user_id: str | None
    offer_id: str
    price: int
    currency: str
    zendit_cost: int | None
    zendit_cost_currency: str | None
    stripe_payment_intent_id: str | None
    stripe_issuing_card_id: str | None
    zendit_transaction_id: str | None
    zendit_status: str | None
    qr_code_url: str | None
    status: OrderStatus
    recipient_email: str
    recipient_name: str
    stripe_checkout_session_id: str | None
    capture_method: str
    refund_id: str | None
    refund_status: str | None
    failure_reason: str | None
    funding_attempts: int
    purchase_attempts: int
    created_at: datetime
    updated_at: datetime
    paid_at: datetime | None
    funded_at: datetime | None
    purchased_at: datetime | None
    qr_stored_at: datetime | None
    emailed_at: datetime | None
    failed_at: datetime | None
    refunded_at: datetime | None
    # The delivered eSIM's activation facts (migration 0002), set when the order is provisioned.
    iccid: str | None = None
    smdp_address: str | None = None
    activation_code: str | None = None
    # Manual capture (migration 0004): set once the funding service captured the payment after delivery,
    # or failed to (an operator must act). NULL for automatic-capture orders.
    capture_status: str | None = None
    captured_at: datetime | None = None
    capture_failure_reason: str | None = None
    # The plan as the Zendit offer described it at checkout (migration 0006); NULL on older orders.
    offer_data_mb: int | None = None  # Zendit's dataGB times 1000
    offer_data_unlimited: bool | None = None
    offer_duration_days: int | None = None

    @property
    def price_money(self) -> Money:
        return Money(self.price, self.currency)

    @property
    def zendit_cost_money(self) -> Money | None:
        if self.zendit_cost is None or self.zendit_cost_currency is None:
            return None
        return Money(self.zendit_cost, self.zendit_cost_currency)


INSERT_ORDER = """
    INSERT INTO esim_purchases (transaction_id, user_id, offer_id, price, currency, zendit_cost,
                                zendit_cost_currency, recipient_email, recipient_name, capture_method,
                                offer_data_mb, offer_data_unlimited, offer_duration_days)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13)
    RETURNING *
"""
SELECT_ORDER = "SELECT * FROM esim_purchases WHERE transaction_id = $1"
SELECT_ORDER_FOR_UPDATE = "SELECT * FROM esim_purchases WHERE transaction_id = $1 FOR UPDATE"


async def create_order(
    conn: asyncpg.Connection,
    *,
    transaction_id: str,
    offer_id: str,
    price: Money,
    zendit_cost: Money,
    recipient_email: str,
    recipient_name: str,
    user_id: str | None = None,
    capture_method: str = "automatic",
    offer_data_mb: int | None = None,
    offer_data_unlimited: bool | None = None,
    offer_duration_days: int | None = None,
) -> Order:
    """The offer facts (migration 0006) describe the plan in the customer's email; None = not known."""
    row = await conn.fetchrow(
        INSERT_ORDER,
        transaction_id,
        user_id,
        offer_id,
        price.amount,
        price.currency,
        zendit_cost.amount,
        zendit_cost.currency,
        recipient_email,
        recipient_name,
        capture_method,
        offer_data_mb,
        offer_data_unlimited,
        offer_duration_days,
    )
    return Order.model_validate(dict(row))


async def get_order(
    conn: asyncpg.Connection | asyncpg.Pool, transaction_id: str, *, lock: bool = False
) -> Order | None:
    """The order, or None. `lock=True` holds its row until the caller's transaction ends."""
    row = await conn.fetchrow(SELECT_ORDER_FOR_UPDATE if lock else SELECT_ORDER, transaction_id)
    return Order.model_validate(dict(row)) if row else None


# Facts recorded on an order, by name. Only these columns can be set through `record`.
RECORDABLE = frozenset(
    {
        "stripe_checkout_session_id",
        "stripe_payment_intent_id",
        "stripe_issuing_card_id",
        "zendit_transaction_id",
        "zendit_status",
        "qr_code_url",
        "iccid",
        "smdp_address",
        "activation_code",
        "refund_id",
        "refund_status",
        "failure_reason",
        "funding_attempts",
        "purchase_attempts",
    }
)


async def record(conn: asyncpg.Connection | asyncpg.Pool, transaction_id: str, **facts: object) -> None:
    """Set provider ids and other facts on an order (never its status: use `orders.transition`)."""
    unknown = set(facts) - RECORDABLE
    if unknown:
        raise ValueError(f"not recordable on an order: {sorted(unknown)}")
    if not facts:
        return
    columns = sorted(facts)
    assignments = ", ".join(f"{column} = ${index}" for index, column in enumerate(columns, start=2))
    await conn.execute(
        f"UPDATE esim_purchases SET {assignments}, updated_at = now() WHERE transaction_id = $1",  # noqa: S608
        transaction_id,
        *(facts[column] for column in columns),
    )
