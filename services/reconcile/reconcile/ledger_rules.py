"""The ledger checks of scheduled reconciliation, without I/O: our orders against Zendit's purchases and
wallet ledger and Stripe's refunds. Each function takes what the shell fetched and returns mismatches.

What each kind means exactly (the look-back window W = RECONCILE_LOOKBACK_HOURS):

paid_not_purchased   the customer's money was taken and no eSIM is on its way, for one of two reasons
                     (`detail.reason`); the grace period is RECONCILE_PAID_GRACE_MINUTES:
  - no_purchase: an order paid within W but longer than the grace period ago, with no Zendit purchase
    of any of its attempts (`<txn>`, `<txn>-r2`, ...) that is DONE or still on its way, and no refund
    (ours, or a pending or succeeded Stripe refund of its PaymentIntent). Not one: an order in
    `awaiting_funds` (it waits for the operator to fund the wallet on purpose, alerted and refunded by
    its own deadline, AWAITING_FUNDS_MAX_AGE), never paid, or a manual-capture hold we released (our
    refund_status `canceled`: no money was taken).
  - payment_not_recorded: a Stripe PaymentIntent created within W but longer than the grace period ago,
    carrying our `transaction_id` metadata, that took the money (`succeeded`) or holds it for our
    manual capture (`requires_capture`), with no pending or succeeded refund, while our database has
    its order unpaid (`pending_payment`, `payment_failed`) or has no such order at all: the payment
    events never reached us (or were refused). Subject: the transaction id, or the PaymentIntent id
    when no order has it. PaymentIntents without our metadata belong to another integration on the
    same Stripe account and are ignored; canceled ones took nothing.
  An order our database says is paid while its PaymentIntent took nothing (canceled, or back to
  requires_payment_method) is no mismatch kind: `payment_state_conflicts` finds it for a warning.
purchased_unknown    a Zendit purchase created within W, not FAILED (a failed one moved no money and made
                     no eSIM), whose transactionId is no order's transaction id, no order's recorded
                     Zendit id, and not `<an order's transaction id>-r<n>`.
refunded_and_delivered
                     a succeeded Stripe refund created within W, of an order's PaymentIntent, while the
                     order has its eSIM: a DONE Zendit purchase of one of its attempts, or our record says
                     so (zendit_status DONE, or status provisioned / delivered). Partial refunds count too:
                     an operator's goodwill refund is then acknowledged by hand.
wallet_balance_drift two checks, in Zendit's wallet units (integer amounts with the wallet's divisor):
  - subject = the wallet currency: the available balance is not what the ledger explains. A ledger row's
    effect on the available balance is +amount for a DONE CREDIT, -amount for a DEBIT that holds or took
    money (AUTHORIZED, IN_PROGRESS, DONE: Zendit holds the cost from AUTHORIZED and debits it on DONE),
    0 otherwise (ACCEPTED, PENDING, FAILED). Zendit reports no opening balance and we read only W of its
    ledger, so the check is relative to an anchor stored by the previous run: `available = base + Σ
    effect(rows created at or after since)`. drift = available now - (base + Σ effect now). The first
    run, or a change of wallet currency/divisor, sets the anchor and reports nothing. Each run moves
    `since` up to the window's start (never past a row that is not final yet, whose effect may still
    change) and folds the effects of the rows it passes into `base`, so a drift stays reported until
    the balance is corrected or an operator accepts it (which drops the anchor).
  - subject = a Zendit transaction id: a DONE DEBIT of one of our orders' purchases whose amount is not
    the zendit_cost we recorded for the order (compared exactly as Money, after converting Zendit's
    divisor; a different currency is a mismatch too).

Each mismatch but the balance drift carries `evidence_at` in its detail: when the payment, purchase,
refund or debit happened. Once that is older than the window, no run sees it again, so not finding it
proves nothing: the store keeps such a row open until an operator acknowledges it.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from esim_common.money import InexactConversion, Money, MoneyError, from_zendit
from reconcile.mismatches import Mismatch

# Our order states in which no purchase is expected yet, on purpose (see the module doc).
WAITING_STATES = frozenset({"awaiting_funds"})
NEVER_PAID_STATES = frozenset({"pending_payment", "payment_failed"})
DELIVERED_STATES = frozenset({"provisioned", "delivered"})
# A Stripe refund in these states gives (or will give) the customer their money back.
REFUNDING = frozenset({"pending", "succeeded", "requires_action"})
# Our `refund_status` also says `canceled` for a manual-capture hold released instead of refunded
# (esim_common.compensation.RELEASED): the customer's money was never taken.
OUR_REFUNDED = REFUNDING | {"canceled"}
# PaymentIntent statuses in which the customer's money is taken, or held for our manual capture.
TOOK_MONEY = frozenset({"succeeded", "requires_capture"})
# ... and in which it is not (a released or lapsed hold, a payment that failed after all).
TOOK_NOTHING = frozenset({"canceled", "requires_payment_method"})
# Zendit purchase statuses that mean "an eSIM exists or is being made" (FAILED is the only other one).
LIVE_PURCHASE = frozenset({"ACCEPTED", "PENDING", "AUTHORIZED", "IN_PROGRESS", "DONE"})
HOLDING = frozenset({"AUTHORIZED", "IN_PROGRESS", "DONE"})
FINAL = frozenset({"DONE", "FAILED"})

_RETRY_SUFFIX = re.compile(r"^(?P<base>.+)-r(?P<n>[2-9]|[1-9][0-9]+)$")


# ------------------------------------------------------------------------------------------- facts
@dataclass(frozen=True)
class OrderFacts:
    transaction_id: str
    status: str
    paid_at: datetime | None
    stripe_payment_intent_id: str | None
    refund_status: str | None
    zendit_transaction_id: str | None
    zendit_status: str | None
    zendit_cost: Money | None


@dataclass(frozen=True)
class ZenditPurchase:
    transaction_id: str
    status: str
    created_at: datetime | None


@dataclass(frozen=True)
class LedgerRow:
    """A `GET /transactions` row; `amount` in the wallet's divisor (Zendit's rows carry none)."""

    transaction_id: str
    type: str  # CREDIT | DEBIT
    product_type: str
    status: str
    amount: int
    currency: str
    created_at: datetime


@dataclass(frozen=True)
class Wallet:
    available: int  # Zendit's availableBalance, in `divisor`
    currency: str
    divisor: int


@dataclass(frozen=True)
class StripeRefund:
    id: str
    status: str | None
    amount: int
    currency: str
    payment_intent_id: str | None
    created: datetime | None = None


@dataclass(frozen=True)
class StripePayment:
    """A PaymentIntent; `transaction_id` from its metadata (None: another integration's)."""

    id: str
    status: str
    amount_received: int  # taken (succeeded, or partly captured)
    amount_capturable: int  # held for a manual capture (requires_capture)
    currency: str
    created: datetime
    transaction_id: str | None


@dataclass(frozen=True)
class PaymentConflict:
    """An order we have as paid whose PaymentIntent Stripe says took nothing."""

    transaction_id: str
    payment_intent_id: str
    intent_status: str
    order_status: str


@dataclass(frozen=True)
class WalletAnchor:
    """What the last run knew: `available = base + Σ effect(ledger rows created at or after since)`."""

    currency: str
    divisor: int
    since: datetime
    base: int


# ------------------------------------------------------------------------------------------- ids
def order_candidates(zendit_id: str) -> tuple[str, ...]:
    """The order transaction ids a Zendit transactionId may belong to: itself, and without `-r<n>`."""
    match = _RETRY_SUFFIX.match(zendit_id)
    return (zendit_id, match.group("base")) if match else (zendit_id,)


def owner_of(zendit_id: str, orders: Mapping[str, OrderFacts]) -> OrderFacts | None:
    """The order whose purchase attempt `zendit_id` is; `orders` by transaction id."""
    for candidate in order_candidates(zendit_id):
        order = orders.get(candidate)
        if order is not None:
            return order
    for order in orders.values():
        if order.zendit_transaction_id == zendit_id:
            return order
    return None


def _purchases_by_order(
    purchases: Iterable[ZenditPurchase], orders: Mapping[str, OrderFacts]
) -> dict[str, list[ZenditPurchase]]:
    found: dict[str, list[ZenditPurchase]] = {}
    for purchase in purchases:
        order = owner_of(purchase.transaction_id, orders)
        if order is not None:
            found.setdefault(order.transaction_id, []).append(purchase)
    return found


# ------------------------------------------------------------------------------------------- rules
def paid_not_purchased(
    orders: Sequence[OrderFacts],
    purchases: Sequence[ZenditPurchase],
    refunds: Sequence[StripeRefund],
    *,
    now: datetime,
    grace: timedelta,
) -> list[Mismatch]:
    by_id = {order.transaction_id: order for order in orders}
    bought = _purchases_by_order(purchases, by_id)
    refunded_intents = {r.payment_intent_id for r in refunds if r.status in REFUNDING and r.payment_intent_id}
    found = []
    for order in orders:
        if order.paid_at is None or order.paid_at > now - grace:
            continue
        if order.status in WAITING_STATES | NEVER_PAID_STATES or order.status == "refunded":
            continue
        if order.refund_status in OUR_REFUNDED or order.stripe_payment_intent_id in refunded_intents:
            continue
        if any(p.status in LIVE_PURCHASE for p in bought.get(order.transaction_id, [])):
            continue
        found.append(
            Mismatch(
                kind="paid_not_purchased",
                subject=order.transaction_id,
                transaction_id=order.transaction_id,
                detail={
                    "evidence_at": order.paid_at.isoformat(),
                    "reason": "no_purchase",
                    "status": order.status,
                    "payment_intent": order.stripe_payment_intent_id,
                    "zendit_transaction_id": order.zendit_transaction_id,
                    "zendit_statuses": ",".join(p.status for p in bought.get(order.transaction_id, []))
                    or None,
                },
            )
        )
    return found


def payment_not_recorded(
    intents: Sequence[StripePayment],
    orders: Mapping[str, OrderFacts],
    refunds: Sequence[StripeRefund],
    *,
    now: datetime,
    grace: timedelta,
) -> list[Mismatch]:
    """paid_not_purchased for money Stripe took for an order we do not have as paid (see the module
    doc). `orders`: by transaction id, every order the intents' metadata may name."""
    refunded_intents = {r.payment_intent_id for r in refunds if r.status in REFUNDING and r.payment_intent_id}
    found: dict[str, Mismatch] = {}
    for intent in intents:
        if intent.transaction_id is None or intent.status not in TOOK_MONEY:
            continue
        if intent.created > now - grace or intent.id in refunded_intents:
            continue
        order = orders.get(intent.transaction_id)
        if order is not None and (
            order.status not in NEVER_PAID_STATES or order.refund_status in OUR_REFUNDED
        ):
            continue
        subject = order.transaction_id if order is not None else intent.id
        found.setdefault(  # one per order: a second intent of it would only repeat the news
            subject,
            Mismatch(
                kind="paid_not_purchased",
                subject=subject,
                transaction_id=order.transaction_id if order is not None else None,
                detail={
                    "evidence_at": intent.created.isoformat(),
                    "reason": "payment_not_recorded",
                    "status": order.status if order is not None else None,
                    "payment_intent": intent.id,
                    "payment_intent_status": intent.status,
                    "metadata_transaction_id": intent.transaction_id,
                    "amount": intent.amount_received + intent.amount_capturable,
                    "currency": intent.currency,
                },
            ),
        )
    return list(found.values())


def payment_state_conflicts(
    intents: Sequence[StripePayment], orders: Mapping[str, OrderFacts]
) -> list[PaymentConflict]:
    """Orders we have as paid whose PaymentIntent took nothing, unless we released the hold ourselves
    (our refund_status `canceled`). `orders`: every order that may own one of the intents."""
    by_intent = {o.stripe_payment_intent_id: o for o in orders.values() if o.stripe_payment_intent_id}
    conflicts = []
    for intent in intents:
        order = by_intent.get(intent.id)
        if order is None or intent.status not in TOOK_NOTHING:
            continue
        if order.paid_at is None or order.status in NEVER_PAID_STATES or order.refund_status in OUR_REFUNDED:
            continue
        conflicts.append(PaymentConflict(order.transaction_id, intent.id, intent.status, order.status))
    return conflicts


def purchased_unknown(
    purchases: Sequence[ZenditPurchase], orders: Mapping[str, OrderFacts]
) -> list[Mismatch]:
    """`orders`: every order any of the purchases could belong to (see `order_candidates`)."""
    return [
        Mismatch(
            kind="purchased_unknown",
            subject=purchase.transaction_id,
            detail={
                "evidence_at": purchase.created_at.isoformat() if purchase.created_at else None,
                "zendit_status": purchase.status,
            },
        )
        for purchase in purchases
        if purchase.status in LIVE_PURCHASE and owner_of(purchase.transaction_id, orders) is None
    ]


def refunded_and_delivered(
    refunds: Sequence[StripeRefund], orders: Sequence[OrderFacts], purchases: Sequence[ZenditPurchase]
) -> list[Mismatch]:
    """`orders`: the orders of the refunds' PaymentIntents."""
    by_intent = {o.stripe_payment_intent_id: o for o in orders if o.stripe_payment_intent_id}
    bought = _purchases_by_order(purchases, {o.transaction_id: o for o in orders})
    found = []
    for refund in refunds:
        order = by_intent.get(refund.payment_intent_id) if refund.payment_intent_id else None
        if refund.status != "succeeded" or order is None:
            continue
        done = [p.transaction_id for p in bought.get(order.transaction_id, []) if p.status == "DONE"]
        if not done and order.zendit_status != "DONE" and order.status not in DELIVERED_STATES:
            continue
        found.append(
            Mismatch(
                kind="refunded_and_delivered",
                subject=order.transaction_id,
                transaction_id=order.transaction_id,
                detail={
                    "evidence_at": refund.created.isoformat() if refund.created else None,
                    "refund_id": refund.id,
                    "refund_amount": refund.amount,
                    "currency": refund.currency,
                    "status": order.status,
                    "zendit_transaction_id": done[0] if done else order.zendit_transaction_id,
                },
            )
        )
    return found


def debit_mismatches(
    rows: Sequence[LedgerRow], orders: Mapping[str, OrderFacts], wallet: Wallet
) -> list[Mismatch]:
    """DONE DEBITs of our purchases whose amount is not the zendit_cost recorded for the order."""
    found = []
    for row in rows:
        if row.type != "DEBIT" or row.status != "DONE":
            continue
        order = owner_of(row.transaction_id, orders)
        if order is None:
            continue  # not ours: purchased_unknown's business
        charged = _money(abs(row.amount), row.currency, wallet.divisor)
        if charged is not None and charged == order.zendit_cost:
            continue
        found.append(
            Mismatch(
                kind="wallet_balance_drift",
                subject=row.transaction_id,
                transaction_id=order.transaction_id,
                detail={
                    "evidence_at": row.created_at.isoformat(),
                    "check": "debit",
                    "ledger_amount": abs(row.amount),
                    "ledger_currency": row.currency,
                    "ledger_divisor": wallet.divisor,
                    "recorded_cost": order.zendit_cost.amount if order.zendit_cost else None,
                    "recorded_currency": order.zendit_cost.currency if order.zendit_cost else None,
                },
            )
        )
    return found


def _money(amount: int, currency: str, divisor: int) -> Money | None:
    try:
        return from_zendit(amount, currency, divisor)
    except (InexactConversion, MoneyError):
        return None  # not a whole number of minor units, or an unknown currency: never equal


# ------------------------------------------------------------------------------------------- wallet
def effect(row: LedgerRow) -> int:
    """The row's effect on the available balance, in wallet units (see the module doc). Amounts are
    taken as magnitudes: the type says the direction, whatever sign Zendit writes."""
    if row.type == "CREDIT" and row.status == "DONE":
        return abs(row.amount)
    if row.type == "DEBIT" and row.status in HOLDING:
        return -abs(row.amount)
    return 0


def window_start(anchor: WalletAnchor | None, now: datetime, lookback: timedelta) -> datetime:
    """Where this run must read the ledger from: the anchor's `since`, or the window's start if earlier."""
    start = now - lookback
    return min(anchor.since, start) if anchor is not None else start


@dataclass(frozen=True)
class BalanceCheck:
    drift: int | None  # None: nothing to compare with yet (a new anchor)
    expected: int | None
    anchor: WalletAnchor  # to store for the next run


def check_balance(
    anchor: WalletAnchor | None,
    wallet: Wallet,
    rows: Sequence[LedgerRow],
    *,
    now: datetime,
    lookback: timedelta,
) -> BalanceCheck:
    """`rows`: the whole ledger from `window_start(anchor, now, lookback)`, read around `wallet`."""
    ours = [row for row in rows if row.currency == wallet.currency]
    if anchor is None or (anchor.currency, anchor.divisor) != (wallet.currency, wallet.divisor):
        since = now - lookback
        base = wallet.available - sum(effect(r) for r in ours if r.created_at >= since)
        return BalanceCheck(None, None, WalletAnchor(wallet.currency, wallet.divisor, since, base))
    expected = anchor.base + sum(effect(r) for r in ours if r.created_at >= anchor.since)
    pending = [r.created_at for r in ours if r.status not in FINAL and r.created_at >= anchor.since]
    since = max(anchor.since, min([now - lookback, *pending]))
    passed = sum(effect(r) for r in ours if anchor.since <= r.created_at < since)
    moved = replace(anchor, since=since, base=anchor.base + passed)
    return BalanceCheck(wallet.available - expected, expected, moved)


def balance_mismatch(check: BalanceCheck, wallet: Wallet) -> list[Mismatch]:
    if not check.drift:
        return []
    return [
        Mismatch(
            kind="wallet_balance_drift",
            subject=wallet.currency,
            detail={
                "check": "balance",
                "available": wallet.available,
                "expected": check.expected,
                "drift": check.drift,
                "currency": wallet.currency,
                "divisor": wallet.divisor,
            },
        )
    ]
