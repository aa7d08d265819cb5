"""The admin actions: reads of our tables and of the Zendit wallet, nothing that moves money."""

from __future__ import annotations

from datetime import UTC, datetime

import asyncpg

from esim_common.money import InexactConversion
from esim_common.providers import zendit_client
from esim_common.providers.zendit import ZenditError
from esim_common.settings import Settings
from reconcile import mismatch_store, repository
from reconcile.domain import status_counts
from reconcile.schemas import (
    AdminRequest,
    CheckBalanceResponse,
    ListFailedPurchasesResponse,
    ListFailedTopupsResponse,
    ReconcileResponse,
    StuckOrders,
    ZenditBalance,
)


async def zendit_balance(settings: Settings) -> ZenditBalance:
    """Raises ZenditError (transient or permanent) when Zendit cannot say."""
    async with zendit_client(settings) as zendit:
        wallet = await zendit.get_balance()
    try:
        amount: int | None = wallet.available.amount
    except InexactConversion:
        amount = None
    return ZenditBalance(
        amount=amount,
        currency=wallet.currency,
        zendit_value=wallet.available_balance,
        zendit_divisor=wallet.currency_divisor,
    )


async def check_balance(settings: Settings) -> CheckBalanceResponse:
    return CheckBalanceResponse(balance=await zendit_balance(settings))


async def list_failed_topups(pool: asyncpg.Pool, request: AdminRequest) -> ListFailedTopupsResponse:
    return ListFailedTopupsResponse(
        orders=await repository.failed_topup_orders(pool, request.limit),
        topups=await repository.failed_topups(pool, request.limit),
    )


async def list_failed_purchases(pool: asyncpg.Pool, request: AdminRequest) -> ListFailedPurchasesResponse:
    return ListFailedPurchasesResponse(orders=await repository.failed_purchase_orders(pool, request.limit))


async def reconcile(pool: asyncpg.Pool, settings: Settings, request: AdminRequest) -> ReconcileResponse:
    """Statistics from our tables, and Zendit's balance when Zendit answers (the rest is still useful
    to an operator while Zendit is down)."""
    counts = status_counts(await repository.counts_by_status(pool))
    stuck_count, stuck = await repository.stuck_orders(pool, request.stuck_after_minutes, request.limit)
    balance: ZenditBalance | None = None
    zendit_error: str | None = None
    try:
        balance = await zendit_balance(settings)
    except ZenditError as exc:
        zendit_error = f"Zendit did not answer the balance request ({type(exc).__name__})"
    return ReconcileResponse(
        generated_at=datetime.now(UTC),
        orders_by_status=counts,
        total_orders=sum(counts.values()),
        stuck=StuckOrders(after_minutes=request.stuck_after_minutes, count=stuck_count, orders=stuck),
        paid=await repository.paid_totals(pool),
        refunded=await repository.refunded_totals(pool),
        zendit_balance=balance,
        zendit_error=zendit_error,
        mismatches=await mismatch_store.open_counts(pool),
    )
