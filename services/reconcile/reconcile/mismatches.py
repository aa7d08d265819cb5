"""What scheduled reconciliation reports: one disagreement between our records and Stripe's or Zendit's.

Each kind is something an operator must look at (money moved without the matching fulfilment, or the
other way round); `subject` is the id they look it up by.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal, get_args

MismatchKind = Literal[
    "paid_not_purchased",  # Stripe took the money, Zendit has no eSIM for the order, nothing refunded
    "purchased_unknown",  # Zendit has a purchase whose transaction id is none of our orders'
    "refunded_and_delivered",  # the customer got both the refund and the eSIM
    "card_charged_without_credit",  # an Issuing card of a top-up was charged, the wallet shows no credit
    "card_still_active",  # a single-use top-up card still usable after its top-up ended
    "wallet_balance_drift",  # Zendit's balance differs from what its ledger and our records explain
]
MISMATCH_KINDS: tuple[MismatchKind, ...] = get_args(MismatchKind)


@dataclass(frozen=True)
class Mismatch:
    kind: MismatchKind
    # The id an operator looks it up by: our transaction id, a Zendit transaction id, an Issuing card id,
    # or the wallet's currency for a balance drift. (kind, subject) identifies a mismatch across sweeps.
    subject: str
    # Facts for a person: ids, statuses, amounts in minor units with their currency. Never card data.
    detail: Mapping[str, str | int | None] = field(default_factory=dict)
    transaction_id: str | None = None
