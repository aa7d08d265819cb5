"""The messages services exchange over RabbitMQ: versioned, frozen, ids and facts only.

Every event carries `event_id` (sent as the AMQP `message_id`), `transaction_id` (sent as the
`correlation_id`), `occurred_at` and `schema_version`. Events never carry secrets or card data: the
database holds the state, a message only says what happened to which order.

Changing an event: add optional fields freely; anything else is a new `schema_version` that consumers
accept side by side until every producer has moved.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field

from esim_common.money import Money


def _now() -> datetime:
    return datetime.now(UTC)


def _whole_minor_units(value: object) -> object:
    """Refuse `12.99`, `"1299"` or `true` as an amount before pydantic's lax mode can coerce them."""
    amount = value.get("amount") if isinstance(value, dict) else getattr(value, "amount", None)
    if not isinstance(amount, int) or isinstance(amount, bool):
        raise ValueError("amount must be an integer number of minor units")
    return value


def _positive(value: Money) -> Money:
    if value.amount <= 0:
        raise ValueError("amount must be positive")
    return value


# Money in an event: a positive whole number of minor units with its currency.
Amount = Annotated[Money, BeforeValidator(_whole_minor_units), AfterValidator(_positive)]


class Event(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    routing_key: ClassVar[str]

    schema_version: Literal[1] = 1
    event_id: uuid.UUID = Field(default_factory=uuid.uuid4)
    transaction_id: str = Field(min_length=1, max_length=64)
    occurred_at: datetime = Field(default_factory=_now)


class OrderPaid(Event):
    """The customer's payment succeeded (or was authorised, in manual-capture mode)."""

    routing_key: ClassVar[str] = "order.paid"
    offer_id: str
    price: Amount
    payment_intent_id: str


class OrderFunded(Event):
    """The Zendit wallet can pay for this order: its cost is reserved."""

    routing_key: ClassVar[str] = "order.funded"
    offer_id: str
    zendit_cost: Amount
    topup_id: str | None = None


class OrderProvisioned(Event):
    """Zendit delivered the eSIM and its QR code is stored."""

    routing_key: ClassVar[str] = "order.provisioned"
    zendit_transaction_id: str
    qr_code_url: str


class OrderDelivered(Event):
    """The customer has been emailed the eSIM."""

    routing_key: ClassVar[str] = "order.delivered"


# `capture`: manual capture mode, the payment of a delivered order could not be captured (the customer
# has their eSIM; an operator chases the money).
FailedStep = Literal["payment", "funding", "purchase", "delivery", "refund", "capture"]


class OrderFailed(Event):
    """A step failed for good; `reason` is a short machine-readable code, not an exception text."""

    routing_key: ClassVar[str] = "order.failed"
    step: FailedStep
    reason: str = Field(max_length=200)


class OrderRefunded(Event):
    """The customer's money was given back (refund, or cancellation of an uncaptured payment)."""

    routing_key: ClassVar[str] = "order.refunded"
    refund_id: str  # Stripe's re_...; "" when an uncaptured payment was released (nothing was charged)
    amount: Amount


class PurchaseUpdateHint(Event):
    """Zendit says a purchase changed (its webhook). A hint only: the receiver re-fetches the purchase
    with our own key before acting; nothing in the webhook's body is trusted."""

    routing_key: ClassVar[str] = "zendit.purchase-updated"
    zendit_transaction_id: str = Field(min_length=1, max_length=80)


# What an operator is told about. `needs_attention`: an order no automation can finish (provisioning's
# purchase deadline, an unreadable purchase); `wallet_short`: prefunded mode, the Zendit wallet cannot
# pay for the orders waiting (`amount_to_add`); `qr_mismatch`: an order delivered with our verified QR
# code whose Zendit QR image reads differently (ZENDIT_QR_CROSS_CHECK), for a person to compare.
AlertKind = Literal["needs_attention", "wallet_short", "qr_mismatch"]


class OperatorAlert(Event):
    """Something only a person can resolve. notify emails SERVICE_OWNER_EMAIL once per `alert_key`;
    `transaction_id` is the order concerned (for `wallet_short`, the order whose wait began the
    shortage). `facts` are ids, codes and amounts for the email, never secrets or card data."""

    routing_key: ClassVar[str] = "operator.alert"
    alert: AlertKind
    alert_key: str = Field(min_length=1, max_length=128)  # one email per key, e.g. `wallet_short:<txn>`
    reason: str = Field(max_length=200)  # short machine-readable code
    amount_to_add: Amount | None = None  # wallet_short
    facts: dict[str, str] = Field(default_factory=dict)


ALL_EVENTS: tuple[type[Event], ...] = (
    OrderPaid,
    OrderFunded,
    OrderProvisioned,
    OrderDelivered,
    OrderFailed,
    OrderRefunded,
    PurchaseUpdateHint,
    OperatorAlert,
)
