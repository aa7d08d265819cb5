"""Order states and the transitions between them. Pure: no I/O, so tests and every service agree.

    pending_payment ─► paid ─► funding ─► funded ─► purchasing ─► provisioned ─► delivered
                        │        │  ▲  ▲               │   │
                        │        ▼  │  └───────────────┘   │  (Zendit INSUFFICIENT_FUNDS: fund again)
                        │   awaiting_funds                 │
                        │        │                         │
                        ▼        ▼                         ▼
                  needs_attention  topup_failed      purchase_failed
                                     └──────► refund_pending ◄──┘ ─► refunded
                                                     │
                                                     ▼
                                              needs_attention (compensation failed: an operator acts)

`pending_payment → payment_failed` covers async payment methods that fail. `paid → needs_attention`
covers a payment whose amount or currency does not match the order (never fulfilled automatically).
"""

from __future__ import annotations

from enum import StrEnum


class OrderStatus(StrEnum):
    PENDING_PAYMENT = "pending_payment"
    PAID = "paid"
    FUNDING = "funding"
    AWAITING_FUNDS = "awaiting_funds"
    FUNDED = "funded"
    PURCHASING = "purchasing"
    PROVISIONED = "provisioned"
    DELIVERED = "delivered"
    PAYMENT_FAILED = "payment_failed"
    TOPUP_FAILED = "topup_failed"
    PURCHASE_FAILED = "purchase_failed"
    REFUND_PENDING = "refund_pending"
    REFUNDED = "refunded"
    NEEDS_ATTENTION = "needs_attention"


S = OrderStatus

ALLOWED_TRANSITIONS: dict[OrderStatus, frozenset[OrderStatus]] = {
    S.PENDING_PAYMENT: frozenset({S.PAID, S.PAYMENT_FAILED, S.NEEDS_ATTENTION}),
    S.PAID: frozenset({S.FUNDING, S.NEEDS_ATTENTION}),
    S.FUNDING: frozenset({S.AWAITING_FUNDS, S.FUNDED, S.TOPUP_FAILED, S.NEEDS_ATTENTION}),
    S.AWAITING_FUNDS: frozenset({S.FUNDING, S.FUNDED, S.TOPUP_FAILED, S.NEEDS_ATTENTION}),
    S.FUNDED: frozenset({S.PURCHASING, S.NEEDS_ATTENTION}),
    S.PURCHASING: frozenset({S.PROVISIONED, S.FUNDING, S.PURCHASE_FAILED, S.NEEDS_ATTENTION}),
    S.PROVISIONED: frozenset({S.DELIVERED, S.NEEDS_ATTENTION}),
    S.DELIVERED: frozenset(),
    S.PAYMENT_FAILED: frozenset(),
    S.TOPUP_FAILED: frozenset({S.REFUND_PENDING, S.NEEDS_ATTENTION}),
    S.PURCHASE_FAILED: frozenset({S.REFUND_PENDING, S.NEEDS_ATTENTION}),
    S.REFUND_PENDING: frozenset({S.REFUNDED, S.NEEDS_ATTENTION}),
    S.REFUNDED: frozenset(),
    # An operator resolves these by hand (admin API): retry the refund, or re-drive fulfilment.
    S.NEEDS_ATTENTION: frozenset({S.REFUND_PENDING, S.FUNDING, S.PROVISIONED, S.REFUNDED, S.DELIVERED}),
}

TERMINAL_STATES: frozenset[OrderStatus] = frozenset(s for s, nxt in ALLOWED_TRANSITIONS.items() if not nxt)

# The column stamped when an order enters a state (per-step timestamps for time-to-eSIM).
STEP_TIMESTAMP_COLUMN: dict[OrderStatus, str] = {
    S.PAID: "paid_at",
    S.FUNDED: "funded_at",
    S.PURCHASING: "purchased_at",  # the Zendit purchase was placed
    S.PROVISIONED: "qr_stored_at",
    S.DELIVERED: "emailed_at",
    S.PAYMENT_FAILED: "failed_at",
    S.TOPUP_FAILED: "failed_at",
    S.PURCHASE_FAILED: "failed_at",
    S.REFUNDED: "refunded_at",
}


def can_transition(current: OrderStatus, target: OrderStatus) -> bool:
    return target in ALLOWED_TRANSITIONS[current]


def sources_of(target: OrderStatus) -> frozenset[OrderStatus]:
    """Every state from which `target` may be entered (the guard of the UPDATE)."""
    return frozenset(s for s, nxt in ALLOWED_TRANSITIONS.items() if target in nxt)
