"""Request and response models of the admin API (they are its OpenAPI documentation).

Money is always an integer number of minor units next to its ISO currency (1234 USD = 12.34 USD).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from reconcile.domain import DEFAULT_LIST_LIMIT, DEFAULT_STUCK_AFTER_MINUTES, MAX_LIST_LIMIT, AdminAction
from reconcile.repository import OrderRow, TopupRow, Total


class AdminRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    action: AdminAction = Field(description="What to do.")
    stuck_after_minutes: int = Field(
        DEFAULT_STUCK_AFTER_MINUTES,
        ge=1,
        le=7 * 24 * 60,
        description="`reconcile`: a paid order not delivered after this long is reported as stuck.",
    )
    limit: int = Field(
        DEFAULT_LIST_LIMIT, ge=1, le=MAX_LIST_LIMIT, description="Most rows returned by each list."
    )


class ZenditBalance(BaseModel):
    amount: int | None = Field(
        description="Available balance in ISO minor units of `currency`; null when Zendit's value is "
        "not a whole number of minor units (see `zendit_value` / `zendit_divisor`)."
    )
    currency: str
    zendit_value: int = Field(description="Zendit's availableBalance, as it stated it.")
    zendit_divisor: int = Field(description="Zendit's currencyDivisor for `zendit_value`.")


class CheckBalanceResponse(BaseModel):
    action: Literal["check_balance"] = "check_balance"
    balance: ZenditBalance


class ListFailedTopupsResponse(BaseModel):
    action: Literal["list_failed_topups"] = "list_failed_topups"
    orders: list[OrderRow] = Field(description="Orders whose wallet funding failed (now or before a refund).")
    topups: list[TopupRow] = Field(description="Wallet top-ups declined or failed.")


class ListFailedPurchasesResponse(BaseModel):
    action: Literal["list_failed_purchases"] = "list_failed_purchases"
    orders: list[OrderRow] = Field(
        description="Orders whose Zendit purchase failed, or that were given up on while it was pending."
    )


class StuckOrders(BaseModel):
    after_minutes: int
    count: int = Field(
        description="All paid orders not delivered after `after_minutes` (not only those listed)."
    )
    orders: list[OrderRow]


class ReconcileResponse(BaseModel):
    action: Literal["reconcile"] = "reconcile"
    generated_at: datetime
    orders_by_status: dict[str, int] = Field(description="Every order status with its count.")
    total_orders: int
    stuck: StuckOrders
    paid: list[Total] = Field(description="Sum of the prices of paid orders, per currency.")
    refunded: list[Total] = Field(description="Sum of the prices of refunded orders, per currency.")
    zendit_balance: ZenditBalance | None = Field(description="Null when Zendit could not be asked.")
    zendit_error: str | None = Field(None, description="Why the balance is missing.")
    mismatches: dict[str, int] = Field(
        default_factory=dict,
        description="Open reconciliation mismatches per kind (GET /api/admin/mismatches lists them).",
    )


AdminResponse = Annotated[
    CheckBalanceResponse | ListFailedTopupsResponse | ListFailedPurchasesResponse | ReconcileResponse,
    Field(discriminator="action"),
]


class ErrorResponse(BaseModel):
    detail: str
