"""Scheduled reconciliation's ledger checks: fetch, compare (`ledger_rules`), store, count.

    run_ledger_checks(pool, zendit=..., stripe=..., lookback=..., grace=..., extra=[ExtraCheck, ...])

Sources and the kinds that need them (a kind is checked only when all its sources were read):

    zendit_purchases  GET /esim/purchases?createdAt=gte<window start>    paid_not_purchased,
                                                                         purchased_unknown,
                                                                         refunded_and_delivered
    stripe_refunds    GET /v1/refunds?created[gte]=<window start>        paid_not_purchased,
                                                                         refunded_and_delivered
    stripe_payment_intents                                               paid_not_purchased
                      GET /v1/payment_intents?created[gte]=<window start>
    zendit_ledger     GET /balance and GET /transactions (from the       wallet_balance_drift
                      wallet anchor's `since`), read twice around the
                      balance so that a purchase moving meanwhile is not taken for a drift
    <extra>.source    whatever the caller passes (the Issuing checks)    its own kinds

A source that fails is logged, counted in `esim_reconcile_source_errors_total{source}` and recorded on
the run; the open mismatches of its kinds stay open (an outage must not "resolve" them). A kind's rule
that needs only the sources that were read still runs (paid_not_purchased/payment_not_recorded during a
Zendit outage): what it finds is stored, nothing of the kind is resolved. Our database failing fails the
whole run: the caller's loop tries again.

An order we have as paid whose PaymentIntent took nothing (`ledger_rules.payment_state_conflicts`) is
logged as a WARNING and counted in `esim_reconcile_payment_state_conflicts_total{stripe_status}` by every
run that sees it.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, TypeVar

import asyncpg
from pydantic import BaseModel, Field

from esim_common.money import from_zendit, to_zendit
from esim_common.providers import stripe_gateway, zendit_client
from esim_common.providers.stripe import StripeGateway
from esim_common.providers.zendit import Transaction, ZenditClient
from esim_common.settings import Settings
from reconcile import ledger_rules as rules
from reconcile import metrics, mismatch_store
from reconcile.mismatches import MISMATCH_KINDS, Mismatch, MismatchKind

log = logging.getLogger("esim.reconcile.ledger")

# Zendit allows 1..1024 per page; 500 keeps one answer small while a day of orders is a few pages.
ZENDIT_PAGE_SIZE = 500
# A purchase or a debit moving between our two ledger reads makes the balance check inconclusive; a
# few quick repeats get a quiet moment on any real wallet, and past them the run says "not checked".
BALANCE_READ_ATTEMPTS = 3

NEEDS: dict[MismatchKind, frozenset[str]] = {
    "paid_not_purchased": frozenset({"zendit_purchases", "stripe_refunds", "stripe_payment_intents"}),
    "purchased_unknown": frozenset({"zendit_purchases"}),
    "refunded_and_delivered": frozenset({"zendit_purchases", "stripe_refunds"}),
    "wallet_balance_drift": frozenset({"zendit_ledger"}),
}
LEDGER_KINDS: tuple[MismatchKind, ...] = tuple(NEEDS)
# Every source a run reads (the Issuing checks report as `stripe_issuing`): their error counters start
# at 0, so the first failure after a restart is visible to increase() and ReconcileSourceFailing.
SOURCES: tuple[str, ...] = (*sorted(set().union(*NEEDS.values())), "stripe_issuing")
for _source in SOURCES:
    metrics.reconcile_source_errors_total.labels(source=_source)

T = TypeVar("T")


@dataclass(frozen=True)
class ExtraCheck:
    """Another producer stored with the ledger checks (e.g. the Issuing card checks): `produce` returns
    every mismatch of `kinds` it finds; raising means `source` could not be read."""

    source: str
    kinds: tuple[MismatchKind, ...]
    produce: Callable[[], Awaitable[list[Mismatch]]]


class LedgerRunResult(BaseModel):
    started_at: datetime
    kinds_checked: list[str] = Field(description="Kinds whose sources were all read: stored and resolved.")
    sources_failed: dict[str, str] = Field(
        description="Source → the error's class. Their kinds resolve nothing."
    )
    found: dict[str, int] = Field(description="Mismatches found by this run, per checked kind.")
    opened: int = Field(description="Mismatches seen for the first time.")
    resolved: int = Field(description="Open mismatches of checked kinds this run no longer found.")
    open: dict[str, int] = Field(description="Open mismatches per kind after the run, every kind listed.")


class _SourceFailed(Exception):
    pass


@dataclass(frozen=True)
class LedgerRead:
    wallet: rules.Wallet
    rows: list[rules.LedgerRow]


def utc_now() -> datetime:
    return datetime.now(UTC)


def _zendit_time(moment: datetime) -> str:
    """Zendit's filter syntax wants RFC 3339; whole seconds, rounded down, so nothing is left out."""
    return "gte" + moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


# ------------------------------------------------------------------------------------------ fetches
async def zendit_purchases(zendit: ZenditClient, since: datetime) -> list[rules.ZenditPurchase]:
    """Every purchase created since `since`. Pages are newest first, so one created while we page
    shifts the rest by one: seen twice (deduplicated), never missed."""
    found: dict[str, rules.ZenditPurchase] = {}
    offset = 0
    while True:
        page = await zendit.list_purchases(
            limit=ZENDIT_PAGE_SIZE, offset=offset, created_at=_zendit_time(since)
        )
        for purchase in page.purchases:
            found.setdefault(
                purchase.transaction_id,
                rules.ZenditPurchase(purchase.transaction_id, purchase.status.value, purchase.created_at),
            )
        offset += len(page.purchases)
        if not page.purchases or offset >= page.total:
            return list(found.values())


async def _ledger_pages(zendit: ZenditClient, since: datetime) -> list[Transaction]:
    found: dict[str, Transaction] = {}
    offset = 0
    while True:
        page = await zendit.list_transactions(
            limit=ZENDIT_PAGE_SIZE, offset=offset, created_at=_zendit_time(since)
        )
        for row in page.transactions:
            found.setdefault(row.transaction_id, row)
        offset += len(page.transactions)
        if not page.transactions or offset >= page.total:
            return list(found.values())


def _ledger_row(row: Transaction, divisor: int, now: datetime) -> rules.LedgerRow:
    amount = row.amount
    if row.currency_divisor is not None and row.currency_divisor != divisor:
        # Stated in another divisor: the same amount in the wallet's, exactly (InexactConversion fails
        # the source rather than round).
        amount = to_zendit(from_zendit(row.amount, row.currency, row.currency_divisor), divisor)
    return rules.LedgerRow(
        transaction_id=row.transaction_id,
        type=row.type.value,
        product_type=row.product_type,
        status=row.status.value,
        amount=amount,
        currency=row.currency,
        created_at=row.created_at or now,  # undated: treated as new, so always inside the window
    )


async def zendit_ledger(zendit: ZenditClient, since: datetime, now: datetime) -> LedgerRead:
    """The balance with a ledger that explains the same moment: ledger, balance, ledger again, until
    both ledger reads agree on every row's effect."""
    for _ in range(BALANCE_READ_ATTEMPTS):
        before = await _ledger_pages(zendit, since)
        balance = await zendit.get_balance()
        after = await _ledger_pages(zendit, since)
        rows = [_ledger_row(row, balance.currency_divisor, now) for row in after]
        if _effects([_ledger_row(row, balance.currency_divisor, now) for row in before]) == _effects(rows):
            wallet = rules.Wallet(balance.available_balance, balance.currency, balance.currency_divisor)
            return LedgerRead(wallet, sorted(rows, key=lambda r: (r.created_at, r.transaction_id)))
    raise _SourceFailed(f"the ledger kept changing over {BALANCE_READ_ATTEMPTS} reads")


def _effects(rows: Sequence[rules.LedgerRow]) -> dict[str, int]:
    return {row.transaction_id: rules.effect(row) for row in rows}


async def stripe_refunds(stripe: StripeGateway, since: datetime) -> list[rules.StripeRefund]:
    refunds = await stripe.list_refunds(created_gte=int(since.timestamp()))
    return [
        rules.StripeRefund(
            r.id,
            r.status,
            r.amount,
            r.currency,
            r.payment_intent_id,
            datetime.fromtimestamp(r.created, UTC) if r.created is not None else None,
        )
        for r in refunds
    ]


async def stripe_payment_intents(stripe: StripeGateway, since: datetime) -> list[rules.StripePayment]:
    intents = await stripe.list_payment_intents(created_gte=int(since.timestamp()))
    return [
        rules.StripePayment(
            id=i.id,
            status=i.status,
            amount_received=i.amount_received,
            amount_capturable=i.amount_capturable,
            currency=i.currency,
            # Stripe always dates an intent; an undated one is treated as new (inside the grace period).
            created=datetime.fromtimestamp(i.created, UTC) if i.created is not None else utc_now(),
            transaction_id=i.transaction_id,
        )
        for i in intents
    ]


def report_conflicts(conflicts: Sequence[rules.PaymentConflict]) -> None:
    for conflict in conflicts:
        metrics.reconcile_payment_state_conflicts_total.labels(stripe_status=conflict.intent_status).inc()
        log.warning(
            "order is paid in our records but its PaymentIntent took no money; an operator must look",
            extra={
                "transaction_id": conflict.transaction_id,
                "payment_intent": conflict.payment_intent_id,
                "stripe_status": conflict.intent_status,
                "order_status": conflict.order_status,
            },
        )


# ------------------------------------------------------------------------------------------ the run
class _Sources:
    """Runs each fetch, turning a failure into a recorded, counted, logged source error."""

    def __init__(self) -> None:
        self.failed: dict[str, str] = {}

    async def read(self, source: str, fetch: Awaitable[T]) -> T | None:
        try:
            return await fetch
        except Exception as exc:  # any failure of a source: the run goes on with the others
            self.failed[source] = type(exc).__name__
            metrics.reconcile_source_errors_total.labels(source=source).inc()
            log.error(
                "reconciliation source not read; its mismatch kinds keep their open rows",
                extra={"source": source, "error": f"{type(exc).__name__}: {exc}"},
            )
            return None


async def run_ledger_checks(
    pool: asyncpg.Pool,
    *,
    zendit: ZenditClient,
    stripe: StripeGateway,
    lookback: timedelta,
    grace: timedelta,
    extra: Sequence[ExtraCheck] = (),
    now: Callable[[], datetime] = utc_now,
) -> LedgerRunResult:
    """Compare, store and count; see the module doc. Raises only when our database fails."""
    started_at = now()
    window = started_at - lookback
    sources = _Sources()
    anchor = await mismatch_store.wallet_anchor(pool)
    purchases = await sources.read("zendit_purchases", zendit_purchases(zendit, window))
    refunds = await sources.read("stripe_refunds", stripe_refunds(stripe, window))
    intents = await sources.read("stripe_payment_intents", stripe_payment_intents(stripe, window))
    ledger_since = rules.window_start(anchor, started_at, lookback)
    ledger = await sources.read("zendit_ledger", zendit_ledger(zendit, ledger_since, started_at))

    paid = await mismatch_store.paid_orders_since(pool, window)
    orders = await _orders_concerned(pool, paid, purchases, refunds, ledger, intents)
    found: list[Mismatch] = []
    new_anchor: rules.WalletAnchor | None = None
    if purchases is not None:
        found += rules.purchased_unknown(purchases, orders)
        if refunds is not None:
            found += rules.paid_not_purchased(paid, purchases, refunds, now=started_at, grace=grace)
            found += rules.refunded_and_delivered(refunds, list(orders.values()), purchases)
    if intents is not None:
        if refunds is not None:
            found += rules.payment_not_recorded(intents, orders, refunds, now=started_at, grace=grace)
        report_conflicts(rules.payment_state_conflicts(intents, orders))
    if ledger is not None:
        found += rules.debit_mismatches(ledger.rows, orders, ledger.wallet)
        check = rules.check_balance(anchor, ledger.wallet, ledger.rows, now=started_at, lookback=lookback)
        found += rules.balance_mismatch(check, ledger.wallet)
        new_anchor = check.anchor

    checked: list[MismatchKind] = [k for k in LEDGER_KINDS if not NEEDS[k] & set(sources.failed)]
    for extra_check in extra:
        produced = await sources.read(extra_check.source, _produce(extra_check))
        if produced is not None:
            found += produced
            checked += extra_check.kinds

    opened, resolved = await mismatch_store.store_run(
        pool,
        started_at=started_at,
        window_start=window,
        found=found,
        kinds_checked=checked,
        sources_failed=list(sources.failed),
        anchor=new_anchor,
        anchor_read=anchor,
    )
    open_now = await refresh_gauge(pool)
    result = LedgerRunResult(
        started_at=started_at,
        kinds_checked=list(checked),
        sources_failed=sources.failed,
        found={kind: sum(m.kind == kind for m in found) for kind in checked},
        opened=opened,
        resolved=resolved,
        open=open_now,
    )
    log_line = log.warning if found or sources.failed else log.info
    log_line("reconciliation ledger checks done", extra=_summary(result))
    return result


async def _orders_concerned(
    pool: asyncpg.Pool,
    paid: list[rules.OrderFacts],
    purchases: list[rules.ZenditPurchase] | None,
    refunds: list[rules.StripeRefund] | None,
    ledger: LedgerRead | None,
    intents: list[rules.StripePayment] | None,
) -> dict[str, rules.OrderFacts]:
    """The orders paid in the window, and the others (older, or not paid) owning a purchase, a debit,
    a refund or a PaymentIntent in it."""
    rows = ledger.rows if ledger is not None else []
    zendit_ids = [p.transaction_id for p in purchases or []] + [r.transaction_id for r in rows]
    candidates = {candidate for zid in zendit_ids for candidate in rules.order_candidates(zid)}
    # Our PaymentIntents name their order in the metadata (whether or not we have it as paid).
    candidates |= {i.transaction_id for i in intents or [] if i.transaction_id is not None}
    related = await mismatch_store.orders_matching(
        pool,
        sorted(candidates),
        sorted({r.payment_intent_id for r in refunds or [] if r.payment_intent_id}),
    )
    return {order.transaction_id: order for order in [*paid, *related]}


async def _produce(check: ExtraCheck) -> list[Mismatch]:
    """The producer's mismatches; one of a kind it did not declare is a bug, failing its source (it
    could never be resolved)."""
    produced = await check.produce()
    stray = sorted({m.kind for m in produced} - set(check.kinds))
    if stray:
        raise ValueError(f"{check.source} produced undeclared kinds {stray}")
    return produced


def _summary(result: LedgerRunResult) -> dict[str, Any]:
    return {
        "found": sum(result.found.values()),
        "opened": result.opened,
        "resolved": result.resolved,
        "sources_failed": ",".join(sorted(result.sources_failed)) or None,
    }


async def refresh_gauge(pool: asyncpg.Pool) -> dict[str, int]:
    """Set `esim_reconcile_mismatches{kind}` from the table (every kind, 0 included)."""
    counts = await mismatch_store.open_counts(pool)
    for kind in MISMATCH_KINDS:
        metrics.reconcile_mismatches.labels(kind=kind).set(counts[kind])
    return counts


async def run_with_settings(
    pool: asyncpg.Pool, settings: Settings, *, extra: Sequence[ExtraCheck] = ()
) -> LedgerRunResult:
    """`run_ledger_checks` with clients and windows from the settings (the sweep's and the API's way)."""
    async with zendit_client(settings) as zendit, stripe_gateway(settings) as stripe:
        return await run_ledger_checks(
            pool,
            zendit=zendit,
            stripe=stripe,
            lookback=timedelta(hours=settings.reconcile_lookback_hours),
            grace=timedelta(minutes=settings.reconcile_paid_grace_minutes),
            extra=extra,
        )


def scheduled_check(
    pool: Callable[[], asyncpg.Pool],
    settings: Settings,
    *,
    extra: Callable[[], Sequence[ExtraCheck]] = tuple,
) -> Callable[[], Awaitable[LedgerRunResult]]:
    """The ledger checks as one of the sweep's checks (`ReconcileSweep(checks=[...])`): `pool` is a
    getter because the pool exists only once the service has started."""

    async def ledger() -> LedgerRunResult:  # its name labels its failures (check="ledger")
        return await run_with_settings(pool(), settings, extra=extra())

    return ledger
