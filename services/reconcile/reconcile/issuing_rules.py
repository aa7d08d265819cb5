"""Issuing-card reconciliation: our top-ups and their single-use cards against Stripe Issuing and the
Zendit wallet ledger. Plain functions over facts; `issuing_check.py` gathers them.

Two kinds of mismatch, both keyed by the Issuing card id (what an operator opens in the Stripe Dashboard):

- `card_still_active`: a card Stripe has not `canceled` although its top-up ended more than
  ENDED_GRACE ago (or is still open after OPEN_GRACE). `inactive` counts too: Stripe declines an
  inactive card's authorisations, but anyone with the API key can set it `active` again; only
  `canceled` is final, and funding always cancels.
- `card_charged_without_credit`: a card whose captured plus still-held charges (Stripe's Issuing
  transactions and pending approved authorisations) are not matched by a DONE CREDIT of the same amount
  in Zendit's `GET /transactions`, found by the gateway top-up id our top-up row recorded (the CREDIT's
  `transactionId`). Also when the card paid more than its top-up's amount, whatever the ledger says.
  A top-up without a gateway top-up id has nothing to match: the gateway's answer never reached us, so
  a person must find the CREDIT (or its absence) in the ledger.

Cards whose `metadata.topup_id` names none of our top-ups are left alone: they belong to another
deployment sharing the Stripe account, or to a top-up older than the look-back.

Each mismatch carries `evidence_at` (as `ledger_rules` does): the oldest fact a later run must read again
to find it. A run reads top-ups created in its window (older ones only while our books call their card
active) and charges created in it; once the evidence is older than the window, not finding the mismatch
proves nothing, and the store keeps the row open until an operator acknowledges it. None means any run
sees it again: a card our books call active is re-read at any age.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from reconcile.mismatches import Mismatch

# Funding cancels a card as soon as its top-up's outcome is known, retrying through the 1/3/10 s tiers;
# ten minutes is many times that, so a card still usable after it was not going to be cancelled.
ENDED_GRACE = timedelta(minutes=10)
# A top-up still open after an hour is stuck, not slow: funding's retry tiers end in the DLQ and
# `abandon` within minutes. Until then its card is meant to be usable and a charge may be in flight.
OPEN_GRACE = timedelta(hours=1)

FINAL_TOPUP_STATUSES = frozenset({"succeeded", "declined", "failed"})


@dataclass(frozen=True)
class Topup:
    """A `wallet_topups` row. Money in minor units of `currency`."""

    id: str
    amount: int
    currency: str
    status: str
    card_id: str | None  # the card our books recorded for it
    gateway_topup_id: str | None  # the gateway's id for the credit: the CREDIT's transactionId
    order_ids: tuple[str, ...]
    created_at: datetime
    updated_at: datetime  # for a final top-up: when it ended

    @property
    def is_open(self) -> bool:
        return self.status not in FINAL_TOPUP_STATUSES

    def overdue(self, now: datetime) -> timedelta | None:
        """How long past its grace the top-up's card should have been cancelled; None while within it."""
        since, grace = (self.created_at, OPEN_GRACE) if self.is_open else (self.updated_at, ENDED_GRACE)
        age = now - since
        return age if age > grace else None


@dataclass(frozen=True)
class Card:
    """An Issuing card as Stripe reports it, tied to a top-up by `metadata.topup_id`."""

    id: str
    topup_id: str
    status: str  # active | inactive | canceled
    last4: str
    currency: str
    recorded_active: bool | None = None  # `issuing_cards.active`; None when our books lack the card


@dataclass(frozen=True)
class Authorization:
    card_id: str
    approved: bool
    status: str  # pending | closed | reversed
    amount: int  # counted only while `pending`: then it is what the approval holds
    created: datetime


@dataclass(frozen=True)
class CardTransaction:
    card_id: str
    amount: int  # Stripe's sign: a capture is negative, a refund positive
    created: datetime


@dataclass(frozen=True)
class WalletCredit:
    """A CREDIT row of Zendit's ledger, its amount in ISO minor units (None when the wallet's divisor
    cannot express it exactly)."""

    transaction_id: str
    status: str
    amount: int | None
    currency: str


def _counted(
    card_id: str, authorizations: Iterable[Authorization], transactions: Iterable[CardTransaction]
) -> list[tuple[int, datetime]]:
    """The card's charges as (paid, when): captures net of refunds, and approved holds not captured yet."""
    captured = [(-t.amount, t.created) for t in transactions if t.card_id == card_id]
    held = [
        (a.amount, a.created)
        for a in authorizations
        if a.card_id == card_id and a.approved and a.status == "pending"
    ]
    return captured + held


def charged(
    card_id: str, authorizations: Iterable[Authorization], transactions: Iterable[CardTransaction]
) -> int:
    """What the card has paid: captured (net of refunds) plus approved holds not captured yet."""
    return sum(paid for paid, _ in _counted(card_id, authorizations, transactions))


def _in_view_since(topup: Topup, card: Card) -> datetime | None:
    """From when a run must look back to see this card again. None while our books call it active
    (its top-up is read at any age, the card fetched by id; our books turn it inactive only once Stripe
    cancelled it, so dropping out of view that way is a fix). Else its top-up's creation: an older
    top-up is not read, and a card missing from our books is listed from the window only (it is made
    after its top-up; issuing_check.CLOCK_SKEW covers Stripe's clock)."""
    return None if card.recorded_active is True else topup.created_at


def _oldest(*moments: datetime | None) -> datetime | None:
    return min((moment for moment in moments if moment is not None), default=None)


def _stamp(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment is not None else None


def card_still_active(topup: Topup, card: Card, *, now: datetime) -> Mismatch | None:
    if card.status == "canceled":
        return None
    overdue = topup.overdue(now)
    if overdue is None:
        return None
    return Mismatch(
        kind="card_still_active",
        subject=card.id,
        detail={
            "topup_id": topup.id,
            "topup_status": topup.status,
            "card_last4": card.last4,
            "amount": topup.amount,
            "currency": topup.currency,
            "stripe_status": card.status,
            "recorded_active": None if card.recorded_active is None else str(card.recorded_active).lower(),
            "age_seconds": int(overdue.total_seconds()),
            # A cancel at Stripe resolves it on the next run while the card is in view; after that, a person.
            "evidence_at": _stamp(_in_view_since(topup, card)),
        },
        transaction_id=_order_of(topup),
    )


def card_charged_without_credit(
    topup: Topup,
    card: Card,
    *,
    paid: int,
    first_charge: datetime | None,
    credit: WalletCredit | None,
    now: datetime,
) -> Mismatch | None:
    """`credit`: the ledger's CREDIT for this top-up, unless another card of it already matched it;
    `first_charge`: when the oldest charge counted in `paid` was made."""
    if paid <= 0 or (topup.is_open and topup.overdue(now) is None):
        return None  # nothing paid, or the gateway may be crediting right now
    if paid > topup.amount:
        reason = "charged_more_than_topup"
    elif credit is None or credit.status != "DONE":
        reason = "no_credit"
    elif (credit.amount, credit.currency) != (paid, topup.currency):
        reason = "credit_differs"
    else:
        return None
    return Mismatch(
        kind="card_charged_without_credit",
        subject=card.id,
        detail={
            "reason": reason,
            "topup_id": topup.id,
            "topup_status": topup.status,
            "card_last4": card.last4,
            "charged": paid,
            "topup_amount": topup.amount,
            "currency": topup.currency,
            "gateway_topup_id": topup.gateway_topup_id,
            "credit_amount": credit.amount if credit is not None else None,
            "credit_status": credit.status if credit is not None else None,
            # Charges older than the window are not listed: the card would look paid-for, wrongly.
            "evidence_at": _stamp(_oldest(first_charge, _in_view_since(topup, card))),
        },
        transaction_id=_order_of(topup),
    )


def issuing_mismatches(
    *,
    topups: Sequence[Topup],
    cards: Sequence[Card],
    authorizations: Sequence[Authorization],
    transactions: Sequence[CardTransaction],
    credits: Sequence[WalletCredit],
    now: datetime,
) -> list[Mismatch]:
    """Every mismatch of both kinds, in a stable order (by top-up, then card)."""
    by_id = {topup.id: topup for topup in topups}
    credits_by_id = {credit.transaction_id: credit for credit in credits}
    claimed: set[str] = set()  # one CREDIT pays for one card
    found: list[Mismatch] = []
    ours = [card for card in cards if card.topup_id in by_id]
    # The card our books recorded claims its top-up's CREDIT before any extra card Stripe made for it.
    ours.sort(key=lambda card: (card.topup_id, card.id != by_id[card.topup_id].card_id, card.id))
    for card in ours:
        topup = by_id[card.topup_id]
        if (active := card_still_active(topup, card, now=now)) is not None:
            found.append(active)
        counted = _counted(card.id, authorizations, transactions)
        paid = sum(amount for amount, _ in counted)
        first_charge = min((when for _, when in counted), default=None)
        credit = credits_by_id.get(topup.gateway_topup_id or "")
        if credit is not None and credit.transaction_id in claimed:
            credit = None
        if (
            unmatched := card_charged_without_credit(
                topup, card, paid=paid, first_charge=first_charge, credit=credit, now=now
            )
        ) is not None:
            found.append(unmatched)
        elif paid > 0 and credit is not None:
            claimed.add(credit.transaction_id)
    return found


def _order_of(topup: Topup) -> str | None:
    """The order that started the top-up (`tu_{txn}`); the others joined it."""
    return topup.order_ids[0] if topup.order_ids else None
