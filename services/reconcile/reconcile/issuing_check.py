"""Gathers the facts for `issuing_rules`: our top-ups and cards (Postgres), the Issuing cards,
authorisations and transactions (Stripe), the CREDIT rows of the wallet ledger (Zendit).

A source that cannot be read raises `IssuingSourceUnavailable` naming it, never an empty list: "no
mismatches" must mean the sources were read and agree.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, timedelta
from typing import Literal

import asyncpg

from esim_common.money import MoneyError
from esim_common.providers import stripe_gateway, zendit_client
from esim_common.providers.stripe import IssuedCard, StripeGateway, StripeGatewayError, StripePermanentError
from esim_common.providers.zendit import MAX_PAGE_SIZE, Transaction, ZenditClient, ZenditError
from esim_common.settings import Settings
from reconcile import issuing_rules as rules
from reconcile import metrics
from reconcile.mismatches import Mismatch

# Stripe's and Zendit's clocks are not ours: lists are read from a little before the window.
CLOCK_SKEW = timedelta(minutes=10)
# A ledger longer than this many pages in one look-back is not a wallet we understand: stop, say so.
MAX_LEDGER_PAGES = 50

Source = Literal["stripe", "zendit"]

# The top-ups in the look-back, and older ones whose card our books still call active.
log = logging.getLogger("esim.reconcile.issuing")

SELECT_TOPUPS = """
    SELECT t.id, t.amount, t.currency, t.status, t.card_id, t.gateway_topup_id, t.order_ids,
           t.created_at, t.updated_at
      FROM wallet_topups t
     WHERE t.created_at >= $1
        OR EXISTS (SELECT 1 FROM issuing_cards c WHERE c.topup_id = t.id AND c.active)
     ORDER BY t.created_at, t.id
"""
SELECT_CARDS = """
    SELECT card_id, topup_id, card_last4, active FROM issuing_cards WHERE topup_id = ANY($1::text[])
"""


class IssuingSourceUnavailable(Exception):
    """Stripe or Zendit could not be read; the sweep must record the source as failed."""

    def __init__(self, source: Source, cause: BaseException) -> None:
        super().__init__(f"issuing reconciliation could not read {source}: {type(cause).__name__}: {cause}")
        self.source = source


async def issuing_mismatches(pool: asyncpg.Pool, settings: Settings, *, now: datetime) -> list[Mismatch]:
    since = now - timedelta(hours=settings.reconcile_lookback_hours) - CLOCK_SKEW
    topups, recorded = await _our_topups(pool, since)
    if not topups:
        return []
    try:
        async with stripe_gateway(settings) as stripe:
            cards, authorizations, transactions = await _stripe_facts(
                stripe, settings, since=int(since.timestamp()), topups=topups, recorded=recorded
            )
    except StripeGatewayError as exc:
        raise IssuingSourceUnavailable("stripe", exc) from None  # the SDK error may carry a raw body
    try:
        async with zendit_client(settings) as zendit:
            credits = await _wallet_credits(zendit, since)
    except ZenditError as exc:
        raise IssuingSourceUnavailable("zendit", exc) from exc
    return rules.issuing_mismatches(
        topups=topups,
        cards=cards,
        authorizations=authorizations,
        transactions=transactions,
        credits=credits,
        now=now,
    )


async def _our_topups(
    pool: asyncpg.Pool, since: datetime
) -> tuple[list[rules.Topup], dict[str, asyncpg.Record]]:
    """The top-ups to look at, and our books' cards of them by card id."""
    rows = await pool.fetch(SELECT_TOPUPS, since)
    topups = [
        rules.Topup(
            id=row["id"],
            amount=row["amount"],
            currency=row["currency"].strip(),  # char(3)
            status=row["status"],
            card_id=row["card_id"],
            gateway_topup_id=row["gateway_topup_id"],
            order_ids=tuple(row["order_ids"]),
            created_at=row["created_at"],
            updated_at=row["updated_at"],
        )
        for row in rows
    ]
    cards = await pool.fetch(SELECT_CARDS, [topup.id for topup in topups])
    return topups, {row["card_id"]: row for row in cards}


async def _stripe_facts(
    stripe: StripeGateway,
    settings: Settings,
    *,
    since: int,
    topups: list[rules.Topup],
    recorded: dict[str, asyncpg.Record],
) -> tuple[list[rules.Card], list[rules.Authorization], list[rules.CardTransaction]]:
    ours = {topup.id for topup in topups}
    listed = await stripe.list_issuing_cards(
        created_gte=since, cardholder_id=settings.stripe_issuing_cardholder_id or None
    )
    by_id = {card.id: card for card in listed if card.metadata.get("topup_id") in ours}
    # Cards in our books that the list did not show: older than the window, or another cardholder.
    unknown: list[str] = []
    for card_id in sorted(set(recorded) - set(by_id)):
        try:
            by_id[card_id] = await stripe.retrieve_card(card_id)
        except StripePermanentError as exc:
            if exc.http_status != 404:
                raise
            unknown.append(card_id)  # not at this Stripe account: neither active nor charged here
    if unknown:
        # Our books name cards this Stripe account does not have: another account or mode (a test key in
        # production, a switched account), or a sandbox database kept across emulator restarts. Not a
        # reason to stop checking every other card; said once per run, and counted.
        metrics.reconcile_cards_unknown_to_stripe_total.inc(len(unknown))
        log.warning(
            "issuing cards in our books are unknown to Stripe; check STRIPE_API_KEY's account and mode",
            extra={"cards": len(unknown), "card_ids": ", ".join(unknown[:5])},
        )
    cards = [_card(card, recorded.get(card.id)) for card in by_id.values()]
    authorizations = [
        rules.Authorization(
            card_id=a.card_id, approved=a.approved, status=a.status, amount=a.amount, created=_at(a.created)
        )
        for a in await stripe.list_issuing_authorizations(created_gte=since)
        if a.card_id in by_id
    ]
    transactions = [
        rules.CardTransaction(card_id=t.card_id, amount=t.amount, created=_at(t.created))
        for t in await stripe.list_issuing_transactions(created_gte=since)
        if t.card_id in by_id
    ]
    return cards, authorizations, transactions


def _at(epoch_seconds: int) -> datetime:
    return datetime.fromtimestamp(epoch_seconds, UTC)


def _card(card: IssuedCard, recorded: asyncpg.Record | None) -> rules.Card:
    # A card in our books keeps the top-up it was recorded for, whatever its metadata says now.
    topup_id = recorded["topup_id"] if recorded is not None else card.metadata.get("topup_id", "")
    return rules.Card(
        id=card.id,
        topup_id=topup_id,
        status=card.status,
        last4=card.last4,
        currency=card.currency,
        recorded_active=recorded["active"] if recorded is not None else None,
    )


async def _wallet_credits(zendit: ZenditClient, since: datetime) -> list[rules.WalletCredit]:
    """Every CREDIT row since `since`, walked with _limit/_offset."""
    divisor = (await zendit.get_balance()).currency_divisor
    stamp = since.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    credits: list[rules.WalletCredit] = []
    for page_number in range(MAX_LEDGER_PAGES):
        page = await zendit.list_transactions(
            limit=MAX_PAGE_SIZE, offset=page_number * MAX_PAGE_SIZE, created_at=f"gte{stamp}", type="CREDIT"
        )
        credits.extend(_credit(row, divisor) for row in page.transactions)
        if len(page.transactions) < MAX_PAGE_SIZE:
            return credits
    raise IssuingSourceUnavailable(
        "zendit", RuntimeError(f"more than {MAX_LEDGER_PAGES * MAX_PAGE_SIZE} CREDIT rows in the look-back")
    )


def _credit(row: Transaction, divisor: int) -> rules.WalletCredit:
    try:
        money = row.money(divisor)
    except MoneyError:  # a fraction of a minor unit, or a currency we cannot name: cannot match
        return rules.WalletCredit(row.transaction_id, row.status.value, None, row.currency)
    return rules.WalletCredit(row.transaction_id, row.status.value, money.amount, money.currency)
