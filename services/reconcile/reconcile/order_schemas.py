"""Request and response models of the admin order API (they are its OpenAPI documentation).

Money is an integer number of minor units next to its ISO currency. Nothing here carries card data
(the last four digits of an Issuing card at most), the eSIM's activation code or a signed URL's token.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

from reconcile.order_ops import ManualTarget, ResolveOutcome
from reconcile.order_queries import (
    ActionRow,
    EmailRow,
    OutboxRow,
    StripeEventRow,
    TopupRow,
    TransitionRow,
)

# No NUL character: Postgres text cannot store one (it came back as a 500; now a 422).
Note = Annotated[
    str, StringConstraints(strip_whitespace=True, min_length=1, max_length=500, pattern=r"^[^\x00]*$")
]


class Amount(BaseModel):
    amount: int = Field(description="Minor units of `currency` (1299 USD = 12.99 USD).")
    currency: str


# ------------------------------------------------------------------------------------------- listing
class OrderSummary(BaseModel):
    transaction_id: str
    status: str
    price: Amount
    paid_at: datetime | None
    last_change_at: datetime = Field(description="The order's latest state change.")
    age_seconds: int = Field(description="Seconds since `last_change_at`.")
    failure_reason: str | None


class OrderList(BaseModel):
    statuses: list[str] = Field(description="The states listed.")
    older_than_minutes: int
    count: int = Field(description="Every order that matches (not only those listed).")
    orders: list[OrderSummary] = Field(description="Most recently stuck first.")


# ------------------------------------------------------------------------------------------- timeline
class StepTimes(BaseModel):
    paid_at: datetime | None
    funded_at: datetime | None
    purchased_at: datetime | None
    qr_stored_at: datetime | None
    emailed_at: datetime | None
    failed_at: datetime | None
    refunded_at: datetime | None


class StripeFacts(BaseModel):
    checkout_session_id: str | None
    payment_intent_id: str | None
    capture_method: str
    capture_status: str | None
    captured_at: datetime | None
    capture_failure_reason: str | None
    refund_id: str | None
    refund_status: str | None


class ZenditFacts(BaseModel):
    transaction_id: str | None = Field(description="The current purchase's id at Zendit.")
    status: str | None
    purchase_attempts: int
    cost: Amount | None
    iccid: str | None
    smdp_address: str | None
    qr_code_url: str | None = Field(description="Without any query string (a signed URL's token).")


class OrderDetail(BaseModel):
    transaction_id: str
    status: str
    offer_id: str
    price: Amount
    user_id: str | None
    recipient_email: str
    recipient_name: str
    failure_reason: str | None
    funding_attempts: int
    created_at: datetime
    updated_at: datetime
    steps: StepTimes
    stripe: StripeFacts
    zendit: ZenditFacts


class OrderTimeline(BaseModel):
    order: OrderDetail
    transitions: list[TransitionRow] = Field(description="Every state change, in order.")
    events: list[OutboxRow] = Field(description="Events queued in the outbox for the order.")
    stripe_events: list[StripeEventRow] = Field(description="Stripe webhook events about the order.")
    emails: list[EmailRow]
    topups: list[TopupRow] = Field(description="Zendit wallet top-ups that covered the order.")
    operator_actions: list[ActionRow]


# ------------------------------------------------------------------------------------------- actions
class RedriveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    to: ManualTarget | None = Field(
        None, description="needs_attention orders only: the state to move the order to first."
    )
    note: Note | None = Field(None, description='Why; required with "to".')

    @model_validator(mode="after")
    def _a_manual_move_says_why(self) -> Self:
        if self.to is not None and self.note is None:
            raise ValueError('"note" is required with "to": say why the order is moved by hand')
        return self


class RetryRefundRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    note: Note | None = None


class ResolveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    outcome: ResolveOutcome = Field(description="What the operator did outside the system.")
    note: Note = Field(description="What was done, and where (1 to 500 characters).")


EventSource = Literal["republished", "pending", "rebuilt", "operator"]


class RedriveResponse(BaseModel):
    transaction_id: str
    status: str = Field(description="The order's state now.")
    moved_from: str | None = Field(description='The state it left ("to" only).')
    routing_key: str
    event_id: uuid.UUID
    event_source: EventSource = Field(
        description="`republished`: the event already published for this state, again (same id); "
        "`pending`: one queued but never published; `rebuilt`: none was queued, built as the service "
        "builds it; `operator`: a new event after the operator's move."
    )
    action_id: int


class RetryRefundResponse(BaseModel):
    transaction_id: str
    status: str
    refund_id: str | None = Field(
        description="Stripe's refund; null when an uncaptured payment was released."
    )
    refund_status: str | None
    announced_again: bool = Field(
        False,
        description=(
            "The order was refunded already: nothing was refunded, its order.refunded and order.failed "
            "were published again (the customer is emailed once)."
        ),
    )
    action_id: int


class ResolveResponse(BaseModel):
    transaction_id: str
    status: str
    action_id: int
